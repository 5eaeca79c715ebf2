"""Bench: create and start a VC of N VMs, by `vlx vc create` + `vlx vc start` and by a plain
shell loop of `qemu-img create -b` + `virsh define` + `virsh start` per VM, side by side in one
run; then one live migration each way (`vlx vc migrate` against `virsh migrate --p2p`), its wall
time and the downtime the destination's libvirt measured.

    sudo .venv/bin/python -m virtualinux.bench.vc [--sizes 1,4,8] [--repeat 3] [--json FILE]

Two lab nodes, each a network namespace with its own libvirtd (vm-test/libvirtd.py); VMs are
QEMU/TCG guests (96 MiB, 1 VCPU) booting the tiny image directly, spread over both nodes.
Both sides get the same domain XML (rendered by us), the same golden volume and the same
VC bridge (made for the loop beforehand and not timed; ours makes its own inside the timing).
Each node runs its boot services' DHCP (`vlx bootsvc run`), as a real node does: the VMs take
their address from it on their VC bridge. Times are wall time until every domain runs (libvirt
has started it), Python start-up of `vlx` included. Everything is removed at the end, also on
failure. Goal: 8 VMs in at most 2x the time of 1.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import libvirt
from virtualinux.bench import common
from virtualinux.bench.common import Report, Stat, start_ours, stop
from virtualinux.image.tiny import build_tiny
from virtualinux.vm_test.libvirtd import LabLibvirtd, lab_nodes
from virtualinux.vm_test.netns import Netns
from virtualinux.vvcm import changes
from virtualinux.vvcm.command import vlx_command
from virtualinux.vvcm.db import Database
from virtualinux.vvcm.model import StorageBackend, Volume, VolumeKind
from virtualinux.vvcm.virt import network
from virtualinux.vvcm.virt.connect import silence_libvirt
from virtualinux.vvcm.virt.domain import domain_xml

GOAL_RATIO = 2.0
BOOT_TIMEOUT = 300.0
MEMORY = "96MiB"


def vlx(db: Path, *argv: str, out: list[str] | None = None) -> float:
    cmd = vlx_command("--db", str(db))
    start = time.perf_counter()
    result = subprocess.run(cmd + list(argv), capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"bench: vlx {' '.join(argv)} failed: {result.stderr.strip()}")
    if out is not None:
        out.append(result.stdout.strip())
    return elapsed


def inventory(daemons: list[LabLibvirtd], logs: Path, sizes: list[int]) -> str:
    text = f"""
[cluster]
name = "benchvc"
domain = "bench.lab"
cidr = "198.18.0.0/24"
gateway_vip = "198.18.0.254"
hypervisor = "qemu"
storage_shared_unseen = true
vm_log_dir = "{logs}"
cpu_overcommit = 16.0
"""
    for index, daemon in enumerate(daemons, start=1):
        text += f"""
[[node]]
name = "node{index}"
mac = "52:54:00:00:00:{10 + index}"
ip = "{daemon.address}"
cpus = 2
memory = "{max(sizes) * 128 + 512}MiB"
libvirt_uri = "{daemon.uri}"
netns = "{daemon.ns.name}"
"""
    return text


def loop_script(db: Database, vc: str, golden: str, pool: Path, daemons: dict[str, str],
                xml_dir: Path) -> str:
    """The peer: one `qemu-img create` + `virsh define` + `virsh start` per VM, in order."""
    cluster = db.load()
    lines = ["set -e"]
    for vm in cluster.vms_of(vc):
        disk = pool / f"{vm.name}.qcow2"
        volume = Volume(name=f"{vm.name}-disk", kind=VolumeKind.SNAPSHOT,
                        backend=StorageBackend.QCOW2, path=str(disk), size=0, origin="guest",
                        owner=vm.name)
        shaped = dataclasses.replace(
            cluster, volumes=cluster.volumes + (volume,),
            vms=tuple(dataclasses.replace(v, volume=volume.name) if v == vm else v
                      for v in cluster.vms))
        xml = xml_dir / f"{vm.name}.xml"
        xml.write_text(domain_xml(shaped, dataclasses.replace(vm, volume=volume.name), "qemu"))
        uri = daemons[vm.node]
        lines += [f"qemu-img create -q -f qcow2 -b {golden} -F raw {disk}",
                  f"virsh -q -c '{uri}' define {xml} >/dev/null",
                  f"virsh -q -c '{uri}' start {vm.name} >/dev/null"]
    return "\n".join(lines) + "\n"


def remove_loop_vms(db: Database, vc: str, pool: Path, daemons: dict[str, str]) -> None:
    cluster = db.load()
    for vm in cluster.vms_of(vc):
        conn = libvirt.open(daemons[vm.node])
        try:
            for name in (vm.name,):
                try:
                    domain = conn.lookupByName(name)
                except libvirt.libvirtError:
                    continue
                if domain.isActive():
                    domain.destroy()
                domain.undefine()
        finally:
            conn.close()
        (pool / f"{vm.name}.qcow2").unlink(missing_ok=True)


def downtime_ms(uri: str, name: str) -> str:
    conn = libvirt.open(uri)
    try:
        stats = conn.lookupByName(name).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED
                                                 | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED)
    finally:
        conn.close()
    return f"{stats['downtime']} ms" if "downtime" in stats else "-"


def run(sizes: list[int], repeat: int, json_path: Path | None = None) -> int:
    silence_libvirt()
    common.PIN = False      # guests and daemons on both CPUs, as on a node: nothing is pinned
    report = Report("vc", sys.argv[1:])
    image = build_tiny()
    with tempfile.TemporaryDirectory(prefix="bench-vc-") as tmp, Netns(prefix="bvc") as lab:
        root = Path(tmp)
        daemons = lab_nodes(lab, root)
        replicas: list[subprocess.Popen] = []
        try:
            return _measure(root, image, daemons, replicas, sizes, repeat, report, json_path)
        finally:
            for replica in replicas:
                stop(replica)
            for daemon in daemons:
                daemon.stop()


def _measure(root: Path, image: Path, daemons: list[LabLibvirtd],
             replicas: list[subprocess.Popen], sizes: list[int], repeat: int, report: Report,
             json_path: Path | None) -> int:
    db_path = root / "cluster.db"
    db = Database.create(db_path)
    (root / "cluster.toml").write_text(inventory(daemons, root / "logs", sizes))
    vlx(db_path, "db", "import", str(root / "cluster.toml"))
    # Each node's boot services, as on a real node: the VMs ask DHCP on their VC bridge for
    # their address, and a guest that gets none never says it is up (the migration waits on it).
    netboot = root / "netboot"
    netboot.mkdir()
    for daemon in daemons:
        replicas.append(start_ours(daemon.ns, {
            "db": db_path, "root": netboot, "address": daemon.address, "services": ["dhcp"],
            "state_dir": root / f"bootsvc-{daemon.address}"},
            log=root / f"bootsvc-{daemon.address}.log"))
    golden = root / "guest.raw"
    golden.write_bytes(b"\0" * (16 << 20))
    pool = root / "pool"
    pool.mkdir()
    xml_dir = root / "xml"
    xml_dir.mkdir()
    vlx(db_path, "volume", "golden", "add", "guest", "--from", str(golden), "--backend",
        "qcow2", "--pool", str(pool))
    uris = {f"node{i}": d.uri for i, d in enumerate(daemons, start=1)}
    kernel = ["--kernel", str(image / "vmlinuz"), "--initrd", str(image / "initrd.img")]
    # Warm-up, not timed: each libvirtd's first domain makes it probe QEMU (seconds).
    vlx(db_path, "vc", "define", "warm", "--vms", "2", "--vcpus", "1", "--memory", MEMORY,
        "--cidr", "198.19.250.0/24", *kernel)
    for verb in ("create", "start", "destroy", "remove"):
        vlx(db_path, "vc", verb, "warm")
    results: dict[int, tuple[Stat, Stat]] = {}
    for size in sizes:
        ours_times, loop_times = [], []
        for run in range(repeat):
            name, peer = f"o{size}r{run + 1}", f"p{size}r{run + 1}"
            cidr_base = 2 * (run + 1 + 10 * sizes.index(size))
            for vc, third in ((name, cidr_base), (peer, cidr_base + 1)):
                vlx(db_path, "vc", "define", vc, "--vms", str(size), "--vcpus", "1",
                    "--memory", MEMORY, "--cidr", f"198.19.{third}.0/24", *kernel)
            # Ours and the loop take turns within each run, so load drifts hit both alike.
            made = vlx(db_path, "vc", "create", name)
            started = vlx(db_path, "vc", "start", name)
            print(f"  {size} VMs, run {run + 1}: vlx vc create {made:.2f}s, "
                  f"vlx vc start {started:.2f}s", flush=True)
            ours_times.append(made + started)
            cluster = db.load()
            # The loop gets its network for free, on both nodes (its migration needs it).
            plans = network.node_plans(cluster, peer, [node.name for node in cluster.nodes])
            for plan in plans:
                network.ensure(plan)
            script = loop_script(db, peer, str(golden), pool, uris, xml_dir)
            start = time.perf_counter()
            subprocess.run(["sh", "-c", script], check=True)
            loop_times.append(time.perf_counter() - start)
            print(f"  {size} VMs, run {run + 1}: qemu-img+virsh loop "
                  f"{loop_times[-1]:.2f}s", flush=True)
            if size == sizes[0] and run == 0:
                _migrations(db, db_path, name, peer, uris, daemons, report)
            vlx(db_path, "vc", "destroy", name)
            remove_loop_vms(db, peer, pool, uris)
            for plan in plans:
                network.remove(plan)
            for vc in (name, peer):
                vlx(db_path, "vc", "remove", vc)
        results[size] = (Stat.of(ours_times, 2), Stat.of(loop_times, 2))
    report.table("create and start a VC (s, wall, until libvirt runs every domain)",
                 ["VMs", "vlx vc create + start", "qemu-img + virsh loop", "loop / ours"],
                 [[size, ours, loop, f"{loop.median / ours.median:.2f}x"]
                  for size, (ours, loop) in results.items()])
    first, last = min(sizes), max(sizes)
    ratio = results[last][0].median / results[first][0].median
    verdict = "meets" if ratio <= GOAL_RATIO else "misses"
    report.note(f"ours: {last} VMs take {ratio:.2f}x the time of {first} (medians; {verdict} "
                f"the goal of <= {GOAL_RATIO:g}x); the loop: "
                f"{results[last][1].median / results[first][1].median:.2f}x")
    report.finish(json_path)
    return 0


def _booted(logs: Path, names: list[str], timeout: float = BOOT_TIMEOUT) -> None:
    """Until each guest's console says it is up: both migrate a guest at rest, not one
    still booting (a booting guest dirties more memory, which makes its migration longer)."""
    deadline = time.monotonic() + timeout
    for name in names:
        log = logs / f"{name}.log"
        while f"virtualinux: node {name} up" not in (log.read_text(errors="replace")
                                                      if log.exists() else ""):
            if time.monotonic() > deadline:
                raise SystemExit(f"bench: {name} did not boot in {timeout:g} s")
            time.sleep(0.2)


def _migrations(db: Database, db_path: Path, ours: str, peer: str, uris: dict[str, str],
                daemons: list[LabLibvirtd], report: Report) -> None:
    cluster = db.load()
    _booted(Path(cluster.required_settings().vm_log_dir),
            [cluster.vms_of(ours)[0].name, cluster.vms_of(peer)[0].name])
    vm = cluster.vms_of(ours)[0]
    target = "node2" if vm.node == "node1" else "node1"
    said: list[str] = []
    seconds = vlx(db_path, "vc", "migrate", ours, vm.name, "--to", target, out=said)
    ours_down = downtime_ms(uris[target], vm.name)
    peer_vm = cluster.vms_of(peer)[0]
    peer_target = "node2" if peer_vm.node == "node1" else "node1"
    address = daemons[int(peer_target[-1]) - 1].address
    start = time.perf_counter()
    result = subprocess.run(["virsh", "-q", "-c", uris[peer_vm.node], "migrate", "--live",
                             "--p2p", "--persistent", "--undefinesource", "--unsafe",
                             peer_vm.name, f"qemu+tcp://{address}/system"],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"bench: virsh migrate failed: {result.stderr.strip()}")
    peer_seconds = time.perf_counter() - start
    peer_down = downtime_ms(uris[peer_target], peer_vm.name)
    # The loop's VM now lives on the other node: its clean-up must look there.
    db.update("bench", "peer moved", lambda c: changes.move_vm(c, peer_vm.name, peer_target))
    print(f"  vlx said: {said[0]}", flush=True)
    report.table("live migration of one booted VM (one run)",
                 ["tool", "wall (s)", "downtime"],
                 [["vlx vc migrate", f"{seconds:.2f}", ours_down],
                  ["virsh migrate --live --p2p", f"{peer_seconds:.2f}", peer_down]])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m virtualinux.bench.vc",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1,4,8", help="VMs per VC (default: %(default)s)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="runs per size, ours and the loop in turn (default: %(default)s)")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the tables as JSON to FILE")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        raise SystemExit("--repeat: at least 1")
    return run([int(n) for n in args.sizes.split(",")], args.repeat, args.json)


if __name__ == "__main__":
    sys.exit(common.run(main))
