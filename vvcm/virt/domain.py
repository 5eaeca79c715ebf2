"""Libvirt domain XML of a VM, rendered from the database alone: hypervisor-neutral.

One function, `domain_xml(cluster, vm, hypervisor)`, gives the whole `<domain>`; the four
hypervisors differ only in a few elements:

| hypervisor | `<domain type>` | `<os><type>` | disk bus | console |
| --- | --- | --- | --- | --- |
| kvm | kvm | hvm, machine pc | virtio (vda) | ttyS0 |
| qemu | qemu (TCG, where KVM is missing) + a qemu64 CPU | hvm, machine pc | virtio | ttyS0 |
| xen-pv | xen | linux, machine xenpv | xen (xvda) | hvc0 |
| xen-hvm | xen | hvm, machine xenfv | xen (xvda) | ttyS0 |

A VC with a `kernel` boots it directly (with its `initrd`, and a command line that names the
VM and asks for DHCP with `ip=`: the boot services of its node answer on the VC's bridge);
otherwise the disk boots.
The UUID is derived from the cluster and VM names, so rendering twice defines the same domain.

Disks: a file (qcow2 overlay, reflink clone) or a block device (lvm-thin); a volume the
database records as exported over iSCSI (it has an `iqn` and a `portal`) is a network disk
instead: QEMU logs in to the storage node itself (libiscsi) as the owner's initiator name
(`Initiator`, handed in: storage names it), with the owner's CHAP login, whose secret is a
libvirt secret on the node (`secret_usage`; `secrets` defines it), never in the XML.
"""

from __future__ import annotations

import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import PurePosixPath

from ..allocate import service_address
from ..errors import VlxError
from ..model import VM, Cluster, VirtualCluster, Volume

CONCRETE = ("kvm", "qemu", "xen-pv", "xen-hvm")
# Guests see a 1450-byte MTU: VXLAN adds 50 bytes and the cluster network carries 1500.
GUEST_MTU = 1450
BRIDGE_PREFIX = "vlxbr"
XEN_HVMLOADER = "/usr/lib/xen/boot/hvmloader"
# tgt's LUN 0 is its controller: the exported disk is LUN 1 (see storage/tgt.py).
ISCSI_LUN = 1
# The initiator name an owner (a VM) logs in to its volume's target with: (cluster, owner).
Initiator = Callable[[str, str], str]


def secret_usage(cluster: Cluster, owner: str) -> str:
    """The usage name of the libvirt secret that holds `owner`'s CHAP secret on a node."""
    name = cluster.settings.name if cluster.settings else ""
    return f"virtualinux:{name}:{owner}"   # no "/": libvirt refuses it in a usage name


def is_iscsi(volume: Volume) -> bool:
    return bool(volume.iqn and volume.portal)


def bridge_name(vc: VirtualCluster) -> str:
    """The VC's bridge on every node that hosts one of its VMs (at most 13 characters)."""
    if vc.vlan is not None:
        return f"{BRIDGE_PREFIX}v{vc.vlan}"
    return f"{BRIDGE_PREFIX}{vc.vxlan}"


def driver_of(hypervisor: str) -> str:
    """The libvirt driver name of a hypervisor: what `{driver}` means in a URI template."""
    return "xen" if hypervisor.startswith("xen") else "qemu"


def domain_uuid(cluster: Cluster, vm: VM) -> str:
    name = cluster.settings.name if cluster.settings else ""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"virtualinux:{name}/{vm.name}"))


def console_log(cluster: Cluster, vm: VM) -> str:
    base = cluster.settings.vm_log_dir if cluster.settings else "/var/log/virtualinux/vms"
    return str(PurePosixPath(base) / f"{vm.name}.log")


def kernel_cmdline(vc: VirtualCluster, vm: VM, hypervisor: str) -> str:
    """`console=` for the hypervisor's console, `ip=` with the VM's name and DHCP on eth0
    (the kernel's nfsroot syntax, which initramfs-tools and our tiny image both read: the
    address comes from the boot services, like the nodes'), then the VC's own arguments. A
    VC network too small for a service address (/31, /32) has no DHCP: the address is given
    here instead."""
    console = "hvc0" if hypervisor == "xen-pv" else "ttyS0"
    if service_address(vc.cidr) is None:
        address = f"ip={vm.ip}:::{vc.cidr.netmask}:{vm.name}:eth0:off"
    else:
        address = f"ip=::::{vm.name}:eth0:dhcp"
    words = [f"console={console}", address]
    if vc.cmdline:
        words.append(vc.cmdline)
    return " ".join(words)


def domain_xml(cluster: Cluster, vm: VM, hypervisor: str,
               initiator: Initiator | None = None) -> str:
    """The `<domain>` of `vm` for a concrete hypervisor (see `CONCRETE`); `initiator` names
    the iSCSI initiator of a VM whose disk is exported."""
    if hypervisor not in CONCRETE:
        raise VlxError(f"hypervisor {hypervisor!r} is not one of {', '.join(CONCRETE)}")
    vc = cluster.vc(vm.vc)
    xen = hypervisor.startswith("xen")
    if hypervisor == "xen-pv" and not vc.kernel:
        raise VlxError(f"VC {vc.name}: a Xen PV guest needs a kernel to boot (--kernel PATH)")
    root = ET.Element("domain", type="xen" if xen else hypervisor)
    _text(root, "name", vm.name)
    _text(root, "uuid", domain_uuid(cluster, vm))
    _text(root, "title", f"VM {vm.index} of virtual cluster {vc.name}")
    _text(root, "memory", str(vc.memory), unit="MiB")
    _text(root, "vcpu", str(vc.vcpus))
    _os(root, vc, vm, hypervisor)
    if hypervisor != "xen-pv":
        features = ET.SubElement(root, "features")
        for name in ("acpi", "apic"):
            ET.SubElement(features, name)
    if hypervisor == "qemu":
        cpu = ET.SubElement(root, "cpu", mode="custom", match="exact")
        _text(cpu, "model", "qemu64", fallback="allow")
    elif hypervisor == "kvm":
        ET.SubElement(root, "cpu", mode="host-model")
    _text(root, "on_poweroff", "destroy")
    _text(root, "on_reboot", "restart")
    _text(root, "on_crash", "destroy")
    devices = ET.SubElement(root, "devices")
    if vm.volume:
        volume = cluster.volume(vm.volume)
        if is_iscsi(volume):
            _iscsi_disk(devices, cluster, volume, hypervisor, initiator)
        else:
            _disk(devices, volume, xen)
    _interface(devices, vc, vm, hypervisor)
    _console(devices, cluster, vm, hypervisor)
    if not xen:
        ET.SubElement(devices, "memballoon", model="none")
    ET.indent(root, space="  ")
    return ET.tostring(root, encoding="unicode") + "\n"


def _os(root: ET.Element, vc: VirtualCluster, vm: VM, hypervisor: str) -> None:
    os_element = ET.SubElement(root, "os")
    if hypervisor == "xen-pv":
        _text(os_element, "type", "linux", arch="x86_64", machine="xenpv")
    elif hypervisor == "xen-hvm":
        _text(os_element, "type", "hvm", arch="x86_64", machine="xenfv")
        _text(os_element, "loader", XEN_HVMLOADER, type="rom")
    else:
        _text(os_element, "type", "hvm", arch="x86_64", machine="pc")
    if vc.kernel:
        _text(os_element, "kernel", vc.kernel)
        if vc.initrd:
            _text(os_element, "initrd", vc.initrd)
        _text(os_element, "cmdline", kernel_cmdline(vc, vm, hypervisor))
    elif hypervisor != "xen-pv":
        ET.SubElement(os_element, "boot", dev="hd")


def _disk(devices: ET.Element, volume: Volume, xen: bool) -> None:
    block = volume.backend == "lvm-thin"
    disk = ET.SubElement(devices, "disk", type="block" if block else "file", device="disk")
    fmt = "qcow2" if volume.backend == "qcow2" and volume.kind == "snapshot" else "raw"
    # cache=none: what libvirt requires of a disk for a safe live migration.
    ET.SubElement(disk, "driver", name="qemu", type=fmt, cache="none")
    ET.SubElement(disk, "source", {"dev": volume.path} if block else {"file": volume.path})
    ET.SubElement(disk, "target", dev="xvda" if xen else "vda", bus="xen" if xen else "virtio")


def _iscsi_disk(devices: ET.Element, cluster: Cluster, volume: Volume, hypervisor: str,
                initiator: Initiator | None) -> None:
    if hypervisor.startswith("xen"):
        # libxl takes no iSCSI source: the host would have to log in and hand a block device.
        raise VlxError(f"volume {volume.name} is exported over iSCSI, which Xen guests cannot "
                       "use directly: unexport it (`vlx volume unexport`) to use its file")
    owner = volume.owner
    credential = cluster.credential(owner) if owner else None
    if owner is None or credential is None or initiator is None:
        raise VlxError(f"volume {volume.name} is exported over iSCSI but "
                       + ("has no owner" if owner is None else
                          f"{owner} has no CHAP login" if credential is None else
                          "no initiator name was given") + " to log in with")
    assert volume.iqn is not None and volume.portal is not None      # is_iscsi
    disk = ET.SubElement(devices, "disk", type="network", device="disk")
    # An iSCSI LUN of tgt holds the raw disk; cache=none as for files (live migration).
    ET.SubElement(disk, "driver", name="qemu", type="raw", cache="none")
    source = ET.SubElement(disk, "source", protocol="iscsi", name=f"{volume.iqn}/{ISCSI_LUN}")
    host, _, port = volume.portal.rpartition(":")
    ET.SubElement(source, "host", name=host, port=port)
    auth = ET.SubElement(source, "auth", username=credential.username)
    ET.SubElement(auth, "secret", type="iscsi", usage=secret_usage(cluster, owner))
    cluster_name = cluster.settings.name if cluster.settings else ""
    ET.SubElement(ET.SubElement(source, "initiator"), "iqn", name=initiator(cluster_name, owner))
    ET.SubElement(disk, "target", dev="vda", bus="virtio")


def _interface(devices: ET.Element, vc: VirtualCluster, vm: VM, hypervisor: str) -> None:
    interface = ET.SubElement(devices, "interface", type="bridge")
    ET.SubElement(interface, "mac", address=vm.mac)
    ET.SubElement(interface, "source", bridge=bridge_name(vc))
    if hypervisor in ("kvm", "qemu"):
        ET.SubElement(interface, "model", type="virtio")
    ET.SubElement(interface, "mtu", size=str(GUEST_MTU))


def _console(devices: ET.Element, cluster: Cluster, vm: VM, hypervisor: str) -> None:
    if hypervisor == "xen-pv":
        console = ET.SubElement(devices, "console", type="pty")
        ET.SubElement(console, "log", file=console_log(cluster, vm), append="on")
        ET.SubElement(console, "target", type="xen", port="0")
        return
    # append: a migration's destination adds to the log instead of starting it over.
    serial = ET.SubElement(devices, "serial", type="pty")
    ET.SubElement(serial, "log", file=console_log(cluster, vm), append="on")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="pty")
    ET.SubElement(console, "target", type="serial", port="0")


def _text(parent: ET.Element, tag: str, text: str, **attributes: str) -> ET.Element:
    element = ET.SubElement(parent, tag, attributes)
    element.text = text
    return element
