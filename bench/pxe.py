"""PXE benchmark: power-on to /init of QEMU lab nodes, from our replicas and from dnsmasq.

    python -m virtualinux.bench.pxe [--counts 1,4] [--repeat 3] [--inventory FILE]

For each node count N (the first N nodes of the inventory, booted at once) and each server it
brings up a lab (vm-test/lab.py: bridge, taps, QEMU TCG nodes with Debian's iPXE ROM), powers
the nodes on, and times each node from QEMU's start to the tiny image's /init line on its
serial console; then takes the lab down. Servers:

    virtualinux   the lab as `vlx lab up` makes it: two replicas, DHCP + TFTP + HTTP (iPXE
                  fetches its scripts, kernel and initrd over HTTP)
    dnsmasq       one dnsmasq, DHCP + TFTP (the same tree, its iPXE scripts naming tftp://)

Both hand out the same addresses, the same kernel, initrd and kernel command line. It prints,
per N and server, the median seconds from power-on to /init over all nodes and runs, the
median time until the last node of a run was up, and the ratio ours / dnsmasq (below 1: we
are faster). Needs root; everything runs in namespaces it makes and removes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

from virtualinux.image.tiny import build_tiny
from virtualinux.netboot import layout as netboot_layout
from virtualinux.netboot import render
from virtualinux.vm_test import lab as vlab
from virtualinux.vm_test import plan as vplan
from virtualinux.vm_test.state import LabRecord
from virtualinux.vvcm import Cluster, Database, inventory

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "cluster.toml"
KERNEL_ARGS = ("console=ttyS0",)
SERVERS = ("virtualinux", "dnsmasq")
BOOT_TIMEOUT = 300.0


def load_cluster(path: Path) -> Cluster:
    return inventory.apply(Cluster(0, None), inventory.load(path), str(path))


def dnsmasq_tree(ours: Path, out: Path, cluster: Cluster) -> Path:
    """Our rendered tree with the node scripts fetching over TFTP, for dnsmasq to serve."""
    shutil.copytree(ours, out, symlinks=False)
    for node in cluster.nodes:
        script = out / netboot_layout.node_script_name(node.mac)
        script.write_text(script.read_text().replace("http://${next-server}",
                                                     "tftp://${next-server}"))
    return out


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
           f"--dhcp-boot=tag:ipxe,{netboot_layout.IPXE_SCRIPT},,{server.address}",
           f"--dhcp-boot=tag:!ipxe,{netboot_layout.BIOS_BOOTFILE},,{server.address}"]
    cmd += [f"--dhcp-host={node.mac},{node.ip},{node.name}" for node in cluster.nodes]
    return cmd


def boot_once(cluster: Cluster, count: int, server: str, image_dir: Path,
              state_dir: Path) -> list[float]:
    """Power `count` nodes on at once; seconds from power-on to /init for each."""
    replicas = 2 if server == "virtualinux" else 1
    layout = vplan.plan(cluster, state_dir, count, replicas)

    def fill(db):
        return db.update("bench", "pxe", lambda old: inventory_copy(cluster, old))

    def render_tree(fresh: Cluster, out: Path) -> None:
        render.render(fresh, image_dir, out, KERNEL_ARGS)

    if server == "virtualinux":
        running = vlab.start(layout, fill, render_tree)
    else:
        running = start_with_dnsmasq(layout, cluster, fill, render_tree)
    try:
        watcher = running.wait(BOOT_TIMEOUT, until="init")
        times = []
        for name, node in watcher.nodes.items():
            if "init" not in node.seen:
                raise RuntimeError(f"{server}: {name} did not reach /init in "
                                   f"{BOOT_TIMEOUT:g} s (state in {state_dir})")
            times.append(node.seen["init"] - node.seen["powered"])
        return times
    finally:
        vlab.down(state_dir)


def inventory_copy(cluster: Cluster, old: Cluster) -> Cluster:
    return dataclasses.replace(cluster, generation=old.generation)


def start_with_dnsmasq(layout: vplan.LabPlan, cluster: Cluster, fill, render_tree) -> vlab.Lab:
    """The lab's network and nodes, with one dnsmasq in the replica namespace."""
    vlab.preflight(layout)
    if shutil.which("dnsmasq") is None:
        raise SystemExit("dnsmasq is not installed (apt-get install dnsmasq-base)")
    layout.state_dir.mkdir(parents=True)
    record = LabRecord(state_dir=layout.state_dir, prefix=layout.prefix, started=time.time(),
                       nodes={p.node.name: {"mac": p.node.mac, "ip": str(p.node.ip),
                                            "tap": p.tap} for p in layout.nodes},
                       replicas={r.name: {"namespace": r.namespace, "address": str(r.address),
                                          "mac": r.mac} for r in layout.replicas})
    record.save()
    running = vlab.Lab(layout, record)
    try:
        fresh = fill(Database.create(running.paths.database))
        render_tree(fresh, running.paths.netboot)
        tree = dnsmasq_tree(running.paths.netboot_root.resolve(),
                            layout.state_dir / "dnsmasq-tree", fresh)
        running.make_network()
        server = layout.replicas[0]
        running.spawn(f"replica-{server.name}", server.namespace,
                      dnsmasq_command(fresh, server, tree, layout.state_dir),
                      running.paths.replica_log(server.name))
        log = running.paths.replica_log(server.name)
        deadline = time.monotonic() + 10
        while "started, version" not in log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"dnsmasq did not start: {vlab.tail(log)}")
            time.sleep(0.05)
        running.start_nodes()
    except BaseException:
        vlab.down(layout.state_dir)
        raise
    return running


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m virtualinux.bench.pxe",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1,4", help="node counts (default: 1,4)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per count and server")
    parser.add_argument("--inventory", type=Path, default=EXAMPLE)
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--state-dir", type=Path, default=Path("/run/virtualinux/bench-pxe"))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (network namespaces, taps, QEMU)", file=sys.stderr)
        return 2
    counts = [int(c) for c in args.counts.split(",")]
    servers = [s for s in args.servers.split(",") if s]
    cluster = load_cluster(args.inventory)
    image_dir = build_tiny()
    results: dict[tuple[int, str], list[list[float]]] = {}
    for run in range(args.repeat):
        for count in counts:
            for server in servers:   # interleaved, so a slow minute of the host hits both
                times = boot_once(cluster, count, server, image_dir, args.state_dir)
                results.setdefault((count, server), []).append(times)
                print(f"run {run + 1}: {count} node(s) from {server}: "
                      + " ".join(f"{t:.1f}" for t in times), flush=True)
    print()
    print(f"{'nodes':>5}  {'server':<12} {'runs':>4}  {'median s':>8}  {'last up s':>9}  "
          f"{'ratio':>5}")
    for count in counts:
        medians = {}
        for server in servers:
            runs = results[(count, server)]
            per_node = statistics.median(t for times in runs for t in times)
            last_up = statistics.median(max(times) for times in runs)
            medians[server] = (per_node, last_up)
        for server in servers:
            per_node, last_up = medians[server]
            ratio = ""
            if "dnsmasq" in medians and server != "dnsmasq":
                ratio = f"{per_node / medians['dnsmasq'][0]:.2f}"
            print(f"{count:>5}  {server:<12} {len(results[(count, server)]):>4}  "
                  f"{per_node:>8.1f}  {last_up:>9.1f}  {ratio:>5}")
    print("\nratio: our median / dnsmasq's median, power-on to /init (below 1: we are faster)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
