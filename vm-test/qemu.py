"""One lab node as a QEMU machine: the command line, and what the host must have to run it.

A node is a TCG machine (`-accel tcg`: KVM does not work on these hosts, see LAB.md) with the
node's CPUs, memory and boot MAC, no disk (a gateway node of the node-image lab also has a
second NIC, on the uplink segment, at a fixed PCI slot), and one virtio-net NIC on a tap of
the lab bridge,
whose option ROM is Debian's iPXE (package ipxe-qemu): QEMU's default ROM for that NIC,
`efi-virtio.rom`, which holds iPXE for BIOS and for UEFI, so either firmware's network boot is
iPXE already. It is left as QEMU's default on purpose: QEMU patches the PCI ids of its default
ROM to the device's, and Debian's ROMs say 1af4:1041 (modern virtio) while virtio-net-pci is
1af4:1000 on these machines, so SeaBIOS silently skips a ROM named with `romfile=` (tried).
The serial console is a unix socket (for `vlx lab console --attach`) whose output QEMU also
appends to a log file (for the progress display and `vlx lab console`).

Imports the model only.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from virtualinux.vvcm import Node, VlxError

QEMU = "qemu-system-x86_64"
IPXE_ROM_DIR = Path("/usr/lib/ipxe/qemu")
# Where Debian's QEMU looks for its default NIC ROMs (its firmware path), and virtio's.
IPXE_ROM = "efi-virtio.rom"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
FIRMWARES = ("bios", "uefi")
# A PXE boot that failed (a replica died mid-transfer, say) is retried by the firmware after
# this long, as a real machine's boot order would; SeaBIOS's own default is never.
REBOOT_TIMEOUT_MS = 2000
# QEMU's own memory beside the guest's, counted when checking that the host has enough.
OVERHEAD_MIB = 64
# A gateway node's uplink NIC: at a fixed PCI slot after the boot NIC's (slot 1 or 2), so the
# guest's kernel probes it second and names it eth1 on either machine type; no option ROM
# (it never boots).
UPLINK_PCI_SLOT = 0x10


@dataclasses.dataclass(frozen=True)
class Machine:
    """What QEMU needs to run one node, all paths decided by the lab."""

    node: Node
    tap: str
    node_dir: Path
    firmware: str = "bios"
    uplink_tap: str | None = None
    uplink_mac: str | None = None

    @property
    def serial_log(self) -> Path:
        return self.node_dir / "serial.log"

    @property
    def serial_socket(self) -> Path:
        return self.node_dir / "serial.sock"

    @property
    def monitor_socket(self) -> Path:
        return self.node_dir / "monitor.sock"

    @property
    def pidfile(self) -> Path:
        return self.node_dir / "qemu.pid"

    @property
    def uefi_vars(self) -> Path:
        return self.node_dir / "OVMF_VARS.fd"


def command(machine: Machine, qemu: str = QEMU) -> list[str]:
    """The QEMU command line for `machine` (run it in the bridge's namespace)."""
    node = machine.node
    cmd = [qemu, "-name", node.name, "-accel", "tcg", "-nodefaults", "-no-user-config",
           "-display", "none", "-smp", str(node.cpus), "-m", f"{node.memory}M",
           "-pidfile", str(machine.pidfile)]
    if machine.firmware == "uefi":
        cmd += ["-machine", "q35",
                "-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                "-drive", f"if=pflash,format=raw,file={machine.uefi_vars}"]
    else:
        cmd += ["-machine", "pc", "-boot", f"order=n,reboot-timeout={REBOOT_TIMEOUT_MS}"]
    cmd += ["-netdev", f"tap,id=net0,ifname={machine.tap},script=no,downscript=no",
            "-device", f"virtio-net-pci,netdev=net0,mac={node.mac},bootindex=1",
            "-chardev", f"socket,id=serial0,path={machine.serial_socket},server=on,wait=off,"
                        f"logfile={machine.serial_log},logappend=on",
            "-serial", "chardev:serial0",
            "-monitor", f"unix:{machine.monitor_socket},server=on,wait=off"]
    if machine.uplink_tap:
        cmd += ["-netdev", f"tap,id=net1,ifname={machine.uplink_tap},script=no,downscript=no",
                "-device", f"virtio-net-pci,netdev=net1,mac={machine.uplink_mac},"
                           f"addr={UPLINK_PCI_SLOT:#x},romfile="]
    return cmd


def prepare(machine: Machine) -> None:
    """Files the machine needs before it starts: its directory and, for UEFI, its own copy of
    the firmware's variable store (the firmware writes its boot entries there)."""
    machine.node_dir.mkdir(parents=True, exist_ok=True)
    if machine.firmware == "uefi":
        shutil.copyfile(OVMF_VARS, machine.uefi_vars)


def check_host(nodes: list[Node], firmware: str, qemu: str = QEMU,
               rom_dir: Path = IPXE_ROM_DIR, meminfo: Path = Path("/proc/meminfo")) -> None:
    """Refuse, before anything is made, what this host cannot run."""
    if firmware not in FIRMWARES:
        raise VlxError(f"unknown firmware {firmware!r} (choose from {', '.join(FIRMWARES)})",
                       "--firmware")
    if shutil.which(qemu) is None:
        raise VlxError(f"{qemu} is not installed (apt-get install qemu-system-x86)")
    rom = rom_dir / IPXE_ROM
    if not rom.is_file():
        raise VlxError(f"the iPXE ROM {rom} is missing (apt-get install ipxe-qemu)")
    if firmware == "uefi":
        for path in (OVMF_CODE, OVMF_VARS):
            if not path.is_file():
                raise VlxError(f"{path} is missing (apt-get install ovmf)", "--firmware")
    wanted = sum(node.memory + OVERHEAD_MIB for node in nodes)
    available = available_memory_mib(meminfo)
    if wanted > available:
        detail = ", ".join(f"{node.name} {node.memory} MiB" for node in nodes)
        raise VlxError(f"the nodes need {wanted} MiB ({detail}, plus {OVERHEAD_MIB} MiB for "
                       f"each QEMU) but this host has {available} MiB available: boot fewer "
                       "with --nodes, or give them less memory in the inventory")


def available_memory_mib(meminfo: Path = Path("/proc/meminfo")) -> int:
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) // 1024
    raise VlxError(f"{meminfo} says nothing about MemAvailable")
