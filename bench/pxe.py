"""PXE benchmark: power-on to /init of QEMU lab nodes, from our replica and from the peers,
holding the protocol equal.

    python -m virtualinux.bench.pxe [--counts 1,4] [--firmware bios,uefi] [--repeat 3]
        [--rows tftp-ours,tftp-dnsmasq,...] [--inventory FILE] [--json FILE]

For each firmware (SeaBIOS, or OVMF for UEFI), node count N (the first N nodes of the
inventory, powered on at once) and row, it brings up a lab (vm-test/lab.py: bridge, taps,
QEMU TCG nodes with Debian's iPXE ROM), times each node from QEMU's start to the tiny image's
/init line on its serial console, and takes the lab down. Rows (`--rows`):

    tftp-ours            one replica of ours, DHCP + TFTP: every file over TFTP
    tftp-dnsmasq         one dnsmasq, DHCP + TFTP: the same files over TFTP
    http-ours            one replica of ours, DHCP + TFTP + HTTP: iPXE, boot.ipxe and the node
                         script over TFTP, kernel and initrd over HTTP
    http-dnsmasq-nginx   dnsmasq for DHCP + TFTP, nginx for HTTP: the same split
    http-ours-2          as http-ours with two replicas (extra; not a headline row)
    http-ours-no-ra      as http-ours without the router advertisement: the "before" of the
                         iPXE IPv6 wait (shared/LAB.md)

Every row but the last has the same "no default router here" RA on the segment: ours from its
`ra` service, the peers from radvd (router lifetime 0, no prefix, 3-4 s). Ours is started
through bench/common.py like every bench; the all-TFTP rows render the tree with the cluster
setting `boot_files_over = "tftp"` (ours and dnsmasq serve that one tree). Everyone hands out
the same addresses, kernel, initrd and command line.
Cells: median (min-max) seconds over all nodes and runs, rows interleaved run by run; the
ratio is ours against the peer row of the same protocol (below 1: we are faster). Where the
time goes, per node: power-on to its DHCPACK (in the server's log), DHCPACK to its first file
request (where iPXE waits on IPv6; ours only: dnsmasq logs no request line), and DHCPACK to
the kernel's first line on the serial console (iPXE's scripts, kernel and initrd). Needs root;
everything runs in namespaces it makes and removes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from virtualinux.image.tiny import build_tiny
from virtualinux.netboot import layout as netboot_layout
from virtualinux.netboot import render
from virtualinux.vm_test import lab as vlab
from virtualinux.vm_test import plan as vplan
from virtualinux.vm_test.netns import Namespace
from virtualinux.vm_test.state import LabRecord
from virtualinux.vvcm import Cluster, Database, inventory
from virtualinux.vvcm.model import BootFilesOver

from . import common
from .common import Stat
from .http import nginx_config
from .tftp import wait_listening

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "cluster.toml"
KERNEL_ARGS = ("console=ttyS0",)
BOOT_TIMEOUT = 300.0
# How often the nodes' consoles and the servers' logs are read: each time is known to within
# it. At 50 ms the rows' phases came in 50 ms steps, as wide as what was left between ours and
# dnsmasq over TFTP; reading what two logs gained takes the bench ~10 us.
POLL_INTERVAL = 0.01
SERVER_START_TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True)
class Row:
    key: str
    protocol: str        # "tftp": every file over TFTP; "http": kernel and initrd over HTTP
    ours: bool
    replicas: int = 1
    ra: bool = True
    headline: bool = True

    @property
    def label(self) -> str:
        who = (f"ours, {self.replicas} replica{'s' if self.replicas > 1 else ''}" if self.ours
               else "dnsmasq" if self.protocol == "tftp" else "dnsmasq + nginx")
        return f"{who}, {'all TFTP' if self.protocol == 'tftp' else 'DHCP + HTTP'}" + (
            "" if self.ra else ", no RA (before)")


ROWS = (Row("tftp-ours", "tftp", True), Row("tftp-dnsmasq", "tftp", False),
        Row("http-ours", "http", True), Row("http-dnsmasq-nginx", "http", False),
        Row("http-ours-2", "http", True, replicas=2, headline=False),
        Row("http-ours-no-ra", "http", True, ra=False, headline=False))


def load_cluster(path: Path, cpus: int | None = None) -> Cluster:
    """The inventory's cluster; with `cpus`, every node given that many vCPUs."""
    cluster = inventory.apply(Cluster(0, None), inventory.load(path), str(path))
    if cpus is None:
        return cluster
    return dataclasses.replace(cluster, nodes=tuple(dataclasses.replace(node, cpus=cpus)
                                                    for node in cluster.nodes))


def dnsmasq_command(cluster: Cluster, server: vplan.ReplicaPlan, tree: Path,
                    state_dir: Path) -> list[str]:
    settings = cluster.settings
    assert settings is not None
    cmd = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
           "--user=root", "--group=root", f"--interface={vplan.REPLICA_INTERFACE}",
           "--bind-interfaces", "--dhcp-authoritative", "--no-ping", "--log-dhcp",
           "--log-facility=-", f"--pid-file={state_dir / 'dnsmasq.pid'}",
           f"--dhcp-leasefile={state_dir / 'dnsmasq.leases'}",
           f"--dhcp-range={settings.cidr.network_address},static,{settings.cidr.netmask},"
           f"{settings.lease_time}",
           f"--dhcp-option=option:router,{settings.gateway_vip}",
           "--enable-tftp", f"--tftp-root={tree}",
           # iPXE (Debian's ROM) runs the boot script; anything else gets iPXE first.
           "--dhcp-userclass=set:ipxe,iPXE",
           # A UEFI PXE client asks as arch 7 (x86-64 UEFI): it gets the UEFI iPXE build.
           "--dhcp-match=set:efi64,option:client-arch,7",
           f"--dhcp-boot=tag:ipxe,{netboot_layout.IPXE_SCRIPT},,{server.address}",
           f"--dhcp-boot=tag:!ipxe,tag:!efi64,{netboot_layout.BIOS_BOOTFILE},,"
           f"{server.address}",
           f"--dhcp-boot=tag:!ipxe,tag:efi64,{netboot_layout.UEFI_X86_64_BOOTFILE},,"
           f"{server.address}"]
    cmd += [f"--dhcp-host={node.mac},{node.ip},{node.name}" for node in cluster.nodes]
    return cmd


def radvd_config(directory: Path) -> Path:
    """The peers' RA: the same as our `ra` service sends."""
    conf = directory / "radvd.conf"
    conf.write_text(f"interface {vplan.REPLICA_INTERFACE} {{ AdvSendAdvert on; "
                    "AdvDefaultLifetime 0; MinRtrAdvInterval 3; MaxRtrAdvInterval 4; };\n")
    return conf


def wait_for_text(log: Path, text: str, what: str) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while text not in (log.read_text(errors="replace") if log.exists() else ""):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start: {vlab.tail(log)}")
        time.sleep(0.05)


def start_servers(running: vlab.Lab, row: Row, fresh: Cluster) -> None:
    """The row's servers in each replica namespace, each ready before the nodes power on."""
    paths = running.paths
    for replica in running.plan.replicas:
        directory = paths.replica_dir(replica.name)
        directory.mkdir(parents=True, exist_ok=True)
        log = paths.replica_log(replica.name)    # the lab's watcher reads DHCPACK lines here
        if row.ours:
            services = ["dhcp", "tftp"] + (["http"] if row.protocol == "http" else []) + (
                ["ra"] if row.ra else [])
            running.spawn(f"replica-{replica.name}", replica.namespace, common.ours_command(
                paths.database, paths.netboot_root, str(replica.address), services,
                interface=vplan.REPLICA_INTERFACE, state_dir=directory,
                # The lab's watcher reads DHCPACK lines; dnsmasq logs them too (--log-dhcp).
                quiet=False), log)
            wait_for_text(log, "ready ", f"our replica {replica.name}")
            continue
        served = paths.netboot_root.resolve()
        running.spawn(f"replica-{replica.name}", replica.namespace,
                      dnsmasq_command(fresh, replica, served, directory), log)
        wait_for_text(log, "started, version", "dnsmasq")
        if row.protocol == "http":
            work = directory / "nginx"
            work.mkdir()
            running.spawn(f"nginx-{replica.name}", replica.namespace,
                          ["nginx", "-p", str(work), "-e", str(work / "error.log"), "-c",
                           str(nginx_config(work, served, str(replica.address)))],
                          directory / "nginx.log")
            wait_listening(Namespace(replica.namespace), str(replica.address), 80,
                           udp=False, timeout=SERVER_START_TIMEOUT)
        if row.ra:
            radvd_log = directory / "radvd.log"
            running.spawn(f"radvd-{replica.name}", replica.namespace,
                          ["radvd", "-n", "-C", str(radvd_config(directory)), "-p",
                           str(directory / "radvd.pid"), "-m", "stderr", "-d", "1"], radvd_log)
            wait_for_text(radvd_log, "polling for", "radvd")   # its main loop runs


def servers_cpu_seconds(running: vlab.Lab) -> float:
    """CPU time the row's servers (ours, or dnsmasq, nginx and radvd) have used so far."""
    return sum(common.tree_cpu_seconds(entry.pid) for entry in running.record.processes
               if entry.pid is not None and not entry.role.startswith("qemu-"))


def start(layout: vplan.LabPlan, row: Row, cluster: Cluster,
          image_dir: Path) -> tuple[vlab.Lab, float]:
    """The lab's network and nodes, with the row's servers in the replica namespaces; and the
    CPU time the servers had used when the nodes powered on (their start-up)."""
    vlab.preflight(layout)
    layout.state_dir.mkdir(parents=True)
    record = LabRecord(state_dir=layout.state_dir, prefix=layout.prefix, started=time.time(),
                       firmware=layout.firmware,
                       nodes={p.node.name: {"mac": p.node.mac, "ip": str(p.node.ip),
                                            "tap": p.tap} for p in layout.nodes},
                       replicas={r.name: {"namespace": r.namespace, "address": str(r.address),
                                          "mac": r.mac} for r in layout.replicas})
    record.save()
    running = vlab.Lab(layout, record)
    try:
        # All-TFTP rows: the cluster setting boot_files_over = "tftp", so the node scripts
        # ours and dnsmasq serve (one rendered tree) name kernel and initrd by tftp://.
        settings = dataclasses.replace(common.settings_of(cluster), boot_files_over=(
            BootFilesOver.TFTP if row.protocol == "tftp" else BootFilesOver.HTTP))
        fresh = Database.create(running.paths.database).update(
            "bench", "pxe", lambda old: dataclasses.replace(cluster, settings=settings,
                                                             generation=old.generation))
        render.render(fresh, image_dir, running.paths.netboot, KERNEL_ARGS)
        running.make_network()
        start_servers(running, row, fresh)
        started = servers_cpu_seconds(running)
        running.start_nodes()
    except BaseException:
        vlab.down(layout.state_dir)
        raise
    return running, started


@dataclasses.dataclass(frozen=True)
class Boot:
    to_init: list[float]
    dhcp_to_file: list[float]
    to_dhcp: list[float]          # power-on to the node's DHCPACK in the server's log
    dhcp_to_kernel: list[float]   # DHCPACK to "Linux version" on the serial console: iPXE's
                                  # wait, its scripts, and the kernel and initrd transfers
    server_cpu: float             # CPU seconds the servers used from power-on to the last /init


def boot_once(cluster: Cluster, count: int, row: Row, firmware: str, image_dir: Path,
              state_dir: Path) -> Boot:
    """Power `count` nodes on at once; seconds from power-on to /init for each."""
    layout = vplan.plan(cluster, state_dir, count, row.replicas, firmware)
    running, started = start(layout, row, cluster, image_dir)
    try:
        watcher = running.wait(BOOT_TIMEOUT, until="init", interval=POLL_INTERVAL)
        server_cpu = servers_cpu_seconds(running) - started
        to_init, waits, to_dhcp, to_kernel = [], [], [], []
        for name, node in watcher.nodes.items():
            if "init" not in node.seen:
                # The state directory goes with the lab: what it said goes in the error.
                paths = running.paths
                logs = [paths.node_dir(name) / "serial.log",
                        *map(paths.replica_log, running.record.replicas)]
                raise RuntimeError(
                    f"{row.key}: {name} did not reach /init in {BOOT_TIMEOUT:g} s (reached: "
                    f"{', '.join(node.seen) or 'nothing'})\n"
                    + "\n".join(f"--- {path.name} ({path.parent.name})\n{vlab.tail(path, 40)}"
                                for path in logs))
            to_init.append(node.seen["init"] - node.seen["powered"])
            seen = node.seen
            if "dhcp" in seen and "files" in seen:
                waits.append(seen["files"] - seen["dhcp"])
            if "dhcp" in seen:
                to_dhcp.append(seen["dhcp"] - seen["powered"])
                if "kernel" in seen:
                    to_kernel.append(seen["kernel"] - seen["dhcp"])
        return Boot(to_init, waits, to_dhcp, to_kernel, server_cpu)
    finally:
        vlab.down(state_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m virtualinux.bench.pxe",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1,4", help="node counts (default: 1,4)")
    parser.add_argument("--firmware", default="bios,uefi", help="bios, uefi or both")
    parser.add_argument("--rows", default=",".join(row.key for row in ROWS),
                        help="rows to run (default: all)")
    parser.add_argument("--inventory", type=Path, default=EXAMPLE)
    # One: a TCG guest's vCPUs are host threads, and the inventory's 4 per node put 16 on two
    # cores for 4 nodes; SMP guests also hung in TCG now and then (3 of ~150 boots, both sides).
    parser.add_argument("--cpus", type=int, default=1,
                        help="vCPUs per node (default: 1; 0: the inventory's)")
    parser.add_argument("--state-dir", type=Path, default=Path("/run/virtualinux/bench-pxe"))
    common.add_flags(parser)
    args = parser.parse_args(argv)
    common.apply_flags(args)
    common.PIN = False   # QEMU's TCG nodes need both CPUs: nothing here is pinned
    if os.geteuid() != 0:
        print("needs root (network namespaces, taps, QEMU)", file=sys.stderr)
        return 2
    by_key = {row.key: row for row in ROWS}
    try:
        rows = [by_key[key] for key in args.rows.split(",") if key]
    except KeyError as err:
        print(f"--rows: unknown row {err} (choose from {', '.join(by_key)})", file=sys.stderr)
        return 2
    if args.cpus < 0:
        print("--cpus: a number of vCPUs, or 0 for the inventory's", file=sys.stderr)
        return 2
    counts = [int(c) for c in args.counts.split(",")]
    firmwares = [f for f in args.firmware.split(",") if f]
    report = common.Report("pxe", argv if argv is not None else sys.argv[1:])
    cluster = load_cluster(args.inventory, args.cpus or None)
    image_dir = build_tiny()
    results: dict[tuple[str, int, str], list[Boot]] = {}
    for run in range(args.repeat):
        for firmware in firmwares:
            for count in counts:
                for row in rows:   # interleaved, so a slow minute of the host hits all alike
                    boot = boot_once(cluster, count, row, firmware, image_dir, args.state_dir)
                    results.setdefault((firmware, count, row.key), []).append(boot)
                    print(f"run {run + 1}: {firmware}, {count} node(s), {row.label}: "
                          + " ".join(f"{t:.1f}" for t in boot.to_init), flush=True)
    table = []
    for firmware in firmwares:
        for count in counts:
            medians: dict[str, Stat] = {}
            for row in rows:
                boots = results[(firmware, count, row.key)]
                medians[row.key] = Stat.of([t for b in boots for t in b.to_init])
            for row in rows:
                boots = results[(firmware, count, row.key)]
                last_up = Stat.of([max(b.to_init) for b in boots])
                waits = [w for b in boots for w in b.dhcp_to_file]
                to_dhcp = [t for b in boots for t in b.to_dhcp]
                to_kernel = [t for b in boots for t in b.dhcp_to_kernel]
                peer = next((r for r in rows if not r.ours and r.protocol == row.protocol),
                            None)
                ratio = (f"{medians[row.key].median / medians[peer.key].median:.2f}"
                         if row.ours and peer else None)
                # The goal "N nodes at once <= 1.3x one": the last node up against one alone.
                alone = results.get((firmware, 1, row.key))
                scaling = (f"{last_up.median / Stat.of([b.to_init[0] for b in alone]).median:.2f}"
                           if alone and count > 1 else None)
                table.append([firmware, count, row.label, medians[row.key], last_up,
                              Stat.of(to_dhcp) if to_dhcp else None,
                              Stat.of(waits) if waits else None,
                              Stat.of(to_kernel) if to_kernel else None,
                              Stat.of([b.server_cpu * 1000 for b in boots], digits=0), ratio,
                              scaling])
    report.table("PXE: seconds from power-on to /init (QEMU TCG)",
                 ["firmware", "nodes", "row", "power-on to /init", "last node up",
                  "power-on to DHCPACK", "DHCPACK to first file", "DHCPACK to kernel",
                  "server CPU ms", "ours/peer, same protocol", "last up / 1 node"], table)
    report.note("every row but 'no RA' has the 'no default router' RA on the segment: ours "
                "from the ra service, the peers from radvd")
    report.note("server CPU ms: what the row's servers (ours; dnsmasq, nginx and radvd) used "
                "from power-on to the last node's /init, their start-up not counted")
    report.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main))
