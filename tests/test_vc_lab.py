"""A VC on two lab nodes: two network namespaces, each with its own libvirtd (vm-test/libvirtd.py)
and its boot services' DHCP and DNS (`vlx bootsvc run`), joined by a bridge in a third. VMs
boot the tiny image directly (kernel + initrd, TCG), get their address from DHCP on the VC's
bridge, find each other by short name through DNS and over the VC's VXLAN network and not
another VC's, one VM migrates live and keeps counting, and destroy leaves nothing behind.
Everything goes with the namespaces, also when a test fails.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import libvirt
import pytest
from virtualinux.bootsvc.status import read_status
from virtualinux.image.tiny import build_tiny
from virtualinux.vm_test.libvirtd import LabLibvirtd, lab_nodes
from virtualinux.vm_test.wait import wait_for as wait_until
from virtualinux.vvcm.virt.connect import silence_libvirt

from .conftest import require, vlx
from .test_dhcp_lab import VLX, Replica

pytestmark = pytest.mark.lab
BOOT_TIMEOUT = 240.0  # TCG on a shared 2-core machine: seconds normally, minutes when loaded


def inventory(nodes: list[tuple[str, LabLibvirtd]], logs: Path) -> str:
    text = f"""
[cluster]
name = "vclab"
domain = "vc.lab"
cidr = "198.18.0.0/24"
gateway_vip = "198.18.0.254"
hypervisor = "qemu"
# Both lab nodes see the pool on this host's own file system, which libvirt takes for local.
storage_shared_unseen = true
vm_log_dir = "{logs}"
"""
    for index, (name, daemon) in enumerate(nodes, start=1):
        text += f"""
[[node]]
name = "{name}"
mac = "52:54:00:00:00:{10 + index}"
ip = "{daemon.address}"
cpus = 4
memory = "1GiB"
libvirt_uri = "{daemon.uri}"
netns = "{daemon.ns.name}"
"""
    return text


def boot_services(daemon: LabLibvirtd, node: str, db_path: Path, tmp_path: Path) -> Replica:
    """The node's DHCP and DNS replica, in its namespace: it serves the VC bridges made there."""
    state_dir, log = tmp_path / f"bootsvc-{node}", tmp_path / f"bootsvc-{node}.log"
    process = daemon.ns.popen([*VLX, "--db", str(db_path), "bootsvc", "run", "--interface",
                               "eth0", "--node", node, "--services", "dhcp,dns", "--state-dir",
                               str(state_dir)], stdout=log.open("w"), stderr=subprocess.STDOUT)
    replica = Replica(daemon.address, process, state_dir, log, daemon.ns)
    try:
        replica.wait_running()
    except BaseException:
        replica.stop()
        raise
    return replica


@pytest.fixture
def lab(netns, tmp_path, db, db_path, capsys):
    """Nodes node1 (198.18.0.11) and node2 (.12), each a namespace with its own libvirtd and
    boot services; a qcow2 golden volume `guest`; VCs blue (2 VMs, one per node) and red (1
    VM)."""
    require("libvirtd", "virtlogd", "qemu-system-x86_64", "qemu-img")
    silence_libvirt()
    image = build_tiny()
    daemons = lab_nodes(netns, tmp_path)
    replicas: list[Replica] = []
    try:
        logs = tmp_path / "logs"
        (tmp_path / "cluster.toml").write_text(inventory(
            [("node1", daemons[0]), ("node2", daemons[1])], logs))
        assert vlx(capsys, "db", "import", str(tmp_path / "cluster.toml"))[0] == 0
        golden = tmp_path / "guest.raw"
        golden.write_bytes(b"Z" * (16 << 20))  # not zeros: a full backup must carry it
        pool = tmp_path / "pool"
        pool.mkdir()
        assert vlx(capsys, "volume", "golden", "add", "guest", "--from", str(golden),
                   "--backend", "qcow2", "--pool", str(pool))[0] == 0
        for name, count, cidr in (("blue", "2", "198.19.6.0/24"), ("red", "1", "198.19.7.0/24")):
            code, _, err = vlx(capsys, "vc", "define", name, "--vms", count, "--vcpus", "1",
                               "--memory", "160MiB", "--cidr", cidr,
                               "--kernel", str(image / "vmlinuz"),
                               "--initrd", str(image / "initrd.img"))
            assert code == 0, err
        for index, daemon in enumerate(daemons, start=1):
            replicas.append(boot_services(daemon, f"node{index}", db_path, tmp_path))
        yield {"daemons": daemons, "logs": logs, "pool": pool, "replicas": replicas}
    finally:
        for replica in replicas:
            replica.stop()
        for daemon in daemons:
            daemon.stop()


def console_log(lab, vm: str) -> str:
    path = lab["logs"] / f"{vm}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_for(lab, vm: str, pattern: str, timeout: float = BOOT_TIMEOUT,
             start: int = 0) -> re.Match:
    """The first match of `pattern` in the VM's console log after offset `start`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = re.compile(pattern, re.MULTILINE).search(console_log(lab, vm), start)
        if match:
            return match
        time.sleep(0.2)
    raise AssertionError(f"{vm} never printed {pattern!r}; console:\n"
                         f"{console_log(lab, vm)[-2000:]}")


def type_into(lab, daemon: LabLibvirtd, vm: str, line: str, expect: str,
              timeout: float = 90) -> re.Match:
    """Type a line on the VM's serial console through libvirt's console stream, and wait for
    `expect` in what the console prints after it. The stream stays open until then: closing
    it at once can drop bytes QEMU has not read from the pty yet."""
    start = len(console_log(lab, vm))
    conn = libvirt.open(daemon.uri)
    try:
        stream = conn.newStream(0)
        conn.lookupByName(vm).openConsole(None, stream, libvirt.VIR_DOMAIN_CONSOLE_FORCE)
        stream.send((line + "\n").encode())
        try:
            return wait_for(lab, vm, expect, timeout=timeout, start=start)
        finally:
            stream.finish()
    finally:
        conn.close()


def domains(daemon: LabLibvirtd) -> list[str]:
    conn = libvirt.open(daemon.uri)
    try:
        return sorted(d.name() for d in conn.listAllDomains())
    finally:
        conn.close()


def vlx_links(daemon: LabLibvirtd) -> list[str]:
    out = daemon.ns.run(["ip", "-o", "link", "show"]).stdout
    return sorted(name for name in re.findall(r"^\d+: ([^:@]+)", out, re.MULTILINE)
                  if name.startswith("vlx"))


def test_vc_boots_pings_is_isolated_migrates_live_and_destroys_clean(lab, db, capsys):
    node1, node2 = lab["daemons"]
    placed = {vm.name: vm.node for vm in db.load().vms}
    assert placed["blue-1"] != placed["blue-2"]  # one VM per node: the VXLAN is crossed
    by_node = {"node1": node1, "node2": node2}
    for vc in ("blue", "red"):
        code, out, err = vlx(capsys, "vc", "create", vc)
        assert code == 0, err
        code, out, err = vlx(capsys, "vc", "start", vc)
        assert code == 0, err
    for vm in ("blue-1", "blue-2", "red-1"):
        up = wait_for(lab, vm, rf"virtualinux: node {vm} up 198\.19\.\d+\.\d+")
        # The shell flushes what was typed before it started: wait for its prompt.
        wait_for(lab, vm, r"^/ # ", start=up.end())
    # The addresses came from DHCP on the VC bridges (the kernel command line has none).
    assert {vm: wait_for(lab, vm, rf"virtualinux: node {vm} up (\S+)").group(1)
            for vm in placed} == {"blue-1": "198.19.6.1", "blue-2": "198.19.6.2",
                                  "red-1": "198.19.7.1"}
    # A replica writes its counters to its status file once per poll: the last ACK may be
    # seen by the VM before it is in the file.
    def acks() -> int:
        return sum(read_status(r.state_dir).services["dhcp"].counters.get("DHCPACK", 0)
                   for r in lab["replicas"])
    wait_until(lambda: acks() >= 3, 30, "the replicas' status to count the three DHCPACKs")
    assert acks() >= 3
    rows = json.loads(vlx(capsys, "vc", "status", "--json")[1])
    assert {(r["vm"], r["node"], r["state"]) for r in rows} == {
        (vm, node, "running") for vm, node in placed.items()}
    for name, daemon in by_node.items():
        red_here = ["vlxbr101", "vlxvx101"] if placed["red-1"] == name else []
        assert vlx_links(daemon) == sorted(["vlxbr100", "vlxvx100"] + red_here)

    blue1, blue2 = by_node[placed["blue-1"]], by_node[placed["blue-2"]]
    # One VM finds the other by short name: DNS at the VC's service address, search list
    # from DHCP (the VMs are on different nodes: blue-1 asks its own node's replica).
    type_into(lab, blue1, "blue-1", "nslookup blue-2 | grep -q 'Address: 198.19.6.2$' && "
              "echo found$((40+2))", r"^found42")
    # Markers are computed by the guest's shell, so the echoed command line never matches.
    # 1400 bytes of payload: near-full frames cross the VXLAN (guest MTU 1450, underlay 1500).
    type_into(lab, blue1, "blue-1",
              "ping -c 3 -W 2 -s 1400 198.19.6.2 >/dev/null && echo reach$((40+2))",
              r"^reach42")
    # red-1 takes an address in blue's network: blue's VMs are still out of its reach.
    red = by_node[placed["red-1"]]
    type_into(lab, red, "red-1", "ip addr add 198.19.6.200/24 dev eth0; "
              "ping -c 3 -W 1 198.19.6.2 >/dev/null || echo isol$((6*7))ated", r"^isol42ated")

    before = int(type_into(lab, blue2, "blue-2",
                           "(i=0; while :; do echo tick$i; i=$((i+1)); sleep 0.3; done) &",
                           r"^tick(\d+)").group(1))
    wait_for(lab, "blue-2", rf"^tick{before + 3}\b", timeout=60)
    target = placed["blue-1"]
    code, out, err = vlx(capsys, "vc", "migrate", "blue", "blue-2", "--to", target)
    assert code == 0, err
    moved_at = len(console_log(lab, "blue-2"))
    last = max(int(n) for n in re.findall(r"^tick(\d+)", console_log(lab, "blue-2"), re.M))
    # The counter goes on past where it was, on the target, without a new boot.
    wait_for(lab, "blue-2", rf"^tick{last + 5}\b", timeout=60, start=moved_at)
    assert console_log(lab, "blue-2").count("virtualinux: node blue-2 up") == 1
    assert "blue-2" in domains(blue1) and "blue-2" not in domains(blue2)
    assert {vm.name: vm.node for vm in db.load().vms}["blue-2"] == target
    type_into(lab, blue1, "blue-1",
              "ping -c 3 -W 2 198.19.6.2 >/dev/null && echo again$((40+2))", r"^again42")

    # Drain the node that now holds both blue VMs: everything ends up on the other one.
    other = "node2" if target == "node1" else "node1"
    drained_at = len(console_log(lab, "blue-2"))
    code, out, err = vlx(capsys, "node", "drain", target)
    assert code == 0, err
    assert {vm.node for vm in db.load().vms} == {other}
    assert domains(by_node[target]) == [] and domains(by_node[other]) == [
        "blue-1", "blue-2", "red-1"]
    last = max(int(n) for n in re.findall(r"^tick(\d+)", console_log(lab, "blue-2"), re.M))
    wait_for(lab, "blue-2", rf"^tick{last + 3}\b", timeout=60, start=drained_at)
    assert vlx_links(by_node[target]) == []

    for vc in ("blue", "red"):
        code, out, err = vlx(capsys, "vc", "destroy", vc)
        assert code == 0, err
    assert domains(node1) == domains(node2) == []
    assert vlx_links(node1) == vlx_links(node2) == []
    assert list(lab["pool"].glob("*.qcow2")) == []
    assert [v.name for v in db.load().volumes] == ["guest"]


def disk_bytes(tmp_path: Path, image: Path, offset: int, length: int) -> bytes:
    """`length` bytes at `offset` of a disk image as the guest sees it (qcow2 chains too)."""
    raw = tmp_path / "read.raw"
    raw.unlink(missing_ok=True)
    subprocess.run(["qemu-img", "convert", "-O", "raw", str(image), str(raw)], check=True)
    with open(raw, "rb") as handle:
        handle.seek(offset)
        return handle.read(length)


def test_live_full_and_incremental_backup_then_restore_beside_the_original(lab, db, capsys,
                                                                           tmp_path):
    placed = {vm.name: vm.node for vm in db.load().vms}
    daemon = dict(zip(("node1", "node2"), lab["daemons"], strict=True))[placed["blue-1"]]
    assert vlx(capsys, "vc", "create", "blue")[0] == 0
    assert vlx(capsys, "vc", "start", "blue")[0] == 0
    up = wait_for(lab, "blue-1", r"virtualinux: node blue-1 up ")
    wait_for(lab, "blue-1", r"^/ # ", start=up.end())
    write = "echo {text} | dd of=/dev/vda bs=512 seek={block} conv=fsync 2>/dev/null && " \
            "echo wr$((1+1))ote{block}"
    type_into(lab, daemon, "blue-1", write.format(text="first-marker", block=2048),
              r"^wr2ote2048")
    # A plain backup of a running VC is refused (its disks are open for writing).
    code, _, err = vlx(capsys, "vc", "backup", "blue", str(tmp_path / "plain"))
    assert code == 2 and "--live" in err
    code, out, err = vlx(capsys, "vc", "backup", "blue", str(tmp_path / "full"), "--live")
    assert code == 0 and "(2 live)" in out, err
    type_into(lab, daemon, "blue-1", write.format(text="second-marker", block=4096),
              r"^wr2ote4096")
    code, out, err = vlx(capsys, "vc", "backup", "blue", str(tmp_path / "incr"), "--since",
                         str(tmp_path / "full"))
    assert code == 0 and "(2 live, incremental)" in out, err
    full, incr = tmp_path / "full" / "blue-1-disk.qcow2", tmp_path / "incr" / "blue-1-disk.qcow2"
    assert disk_bytes(tmp_path, full, 2048 * 512, 12) == b"first-marker"
    assert disk_bytes(tmp_path, full, 4096 * 512, 13) == b"Z" * 13
    assert disk_bytes(tmp_path, incr, 4096 * 512, 13) == b"second-marker"
    # The full file carries the whole 16 MiB disk; the incremental one only what changed.
    assert full.stat().st_size > 16 << 20
    assert incr.stat().st_size < 1 << 20
    conn = libvirt.open(daemon.uri)
    try:
        points = [p.getName() for p in conn.lookupByName("blue-1").listAllCheckpoints()]
    finally:
        conn.close()
    assert points == [json.loads((tmp_path / "incr" / "vc.json").read_text())["volumes"][0][
        "checkpoint"]]  # the newest only: older bitmaps would cost every guest write

    code, out, err = vlx(capsys, "vc", "restore", str(tmp_path / "incr"), "--as", "green",
                         "--cidr", "198.19.8.0/24")
    assert code == 0 and "restored green" in out, err
    restored = db.load()
    green = restored.vc("green")
    assert green.vxlan not in (None, restored.vc("blue").vxlan)
    assert [vm.volume for vm in restored.vms_of("green")] == ["green-1-disk", "green-2-disk"]
    disk = Path(restored.volume("green-1-disk").path)
    assert disk_bytes(tmp_path, disk, 2048 * 512, 12) == b"first-marker"
    assert disk_bytes(tmp_path, disk, 4096 * 512, 13) == b"second-marker"
    for vc in ("blue", "green"):
        assert vlx(capsys, "vc", "destroy", vc)[0] == 0
