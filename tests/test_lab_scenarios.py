"""The lab's scenarios with real QEMU nodes PXE-booting from our replicas (marked `lab`).

- boot: all four nodes of the example cluster reach /init with the database's addresses, and
  both replicas answered (active replication); `up` a second time is refused.
- replica-failure: the replica a node took its DHCP answer from is killed while the node boots;
  the node's firmware retries and every node still boots from the other replica.
- clean-down: `up` killed half-way, then `down`: no namespace, process, tap or file is left.
- uefi: one node boots with OVMF.

Every test runs `vlx lab down` in a fixture (pass or fail) and checks that nothing is left.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from pyroute2 import IPRoute
from virtualinux.vm_test import lab, plan, state
from virtualinux.vvcm import Database
from virtualinux.vvcm.command import vlx_command

from .conftest import EXAMPLE, require

pytestmark = pytest.mark.lab

VLX = vlx_command()
BOOT_TIMEOUT = 240


def vlx(*argv: str, timeout: float = BOOT_TIMEOUT + 60) -> subprocess.CompletedProcess:
    return subprocess.run([*VLX, *argv], capture_output=True, text=True, timeout=timeout)


def leftovers(state_dir: Path) -> list[str]:
    """Anything of the lab at `state_dir` still on the machine."""
    found = [f"namespace {name}" for name in lab.lab_namespaces(plan.namespace_prefix(state_dir))]
    if state_dir.exists():
        found.append(f"directory {state_dir}")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if str(state_dir).encode() in cmdline and int(proc.name) != os.getpid():
            shown = cmdline.replace(b"\0", b" ")[:120]
            found.append(f"process {proc.name}: {shown!r}")
    with IPRoute() as ipr:
        taps = [link.get("ifname") for link in ipr.get_links()
                if link.get(("linkinfo", "kind")) == "tun"]
    found += [f"tap in the host namespace: {name}" for name in taps
              if plan.namespace_prefix(state_dir) in name]
    return found


@pytest.fixture
def lab_dir(tmp_path):
    """A state directory for one lab; the lab is taken down after the test and must leave
    nothing behind."""
    require("qemu-system-x86_64", "nsenter", "busybox")
    state_dir = tmp_path / "lab"
    try:
        yield state_dir
    finally:
        lab.down(state_dir)
        left = leftovers(state_dir)
        assert not left, f"the lab left {left}"


def status(state_dir: Path) -> dict:
    done = vlx("lab", "status", "--json", "--state-dir", str(state_dir), timeout=60)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def init_line(state_dir: Path, name: str) -> str:
    log = state_dir / "nodes" / name / "serial.log"
    lines = [line for line in log.read_text(errors="replace").splitlines()
             if line.startswith("virtualinux: node ")]
    assert lines, f"{name} never reached /init: {log.read_text(errors='replace')[-2000:]}"
    return lines[-1].strip()


def test_boot_four_nodes_reach_init_with_the_database_addresses(lab_dir):
    started = time.monotonic()
    done = vlx("lab", "up", "--image", "tiny",
               "--inventory", str(EXAMPLE), "--state-dir", str(lab_dir),
               "--timeout", str(BOOT_TIMEOUT))
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done.stdout + done.stderr
    print(f"4 nodes ready in {time.monotonic() - started:.1f} s")
    cluster = Database(lab_dir / "cluster.db").load()
    assert len(cluster.nodes) == 4
    for node in cluster.nodes:
        assert init_line(lab_dir, node.name) == f"virtualinux: node {node.name} up {node.ip}"
    report = status(lab_dir)
    assert [n["phase"] for n in report["nodes"]] == ["ready"] * 4
    # Active replication: every replica answered DISCOVERs, and the nodes' ACKs add up.
    counters = [r["counters"]["dhcp"] for r in report["replicas"]]
    assert all(c.get("DHCPOFFER", 0) >= 4 for c in counters), counters
    assert sum(c.get("DHCPACK", 0) for c in counters) >= 4, counters
    assert "NODE" in done.stdout and "REPLICA" in done.stdout

    record = (lab_dir / state.RECORD).read_bytes()
    again = vlx("lab", "up", "--image", "tiny",
                "--inventory", str(EXAMPLE), "--state-dir", str(lab_dir),
                timeout=60)
    assert again.returncode == 2
    assert "a lab is up already" in again.stderr
    assert (lab_dir / state.RECORD).read_bytes() == record
    assert [n["phase"] for n in status(lab_dir)["nodes"]] == ["ready"] * 4


def first_ack(state_dir: Path, deadline: float) -> str:
    """The replica that sent the first DHCPACK: the node that took it talks to it next."""
    while time.monotonic() < deadline:
        for name in ("r1", "r2"):
            log = state_dir / "replicas" / name / "log"
            if log.exists() and "DHCPACK" in log.read_text():
                return name
        time.sleep(0.05)
    raise AssertionError("no replica sent a DHCPACK")


def test_every_node_boots_when_a_replica_is_killed_while_nodes_boot(lab_dir):
    up = subprocess.Popen([*VLX, "lab", "up", "--image", "tiny",
                           "--inventory", str(EXAMPLE), "--nodes", "2",
                           "--state-dir", str(lab_dir), "--timeout", str(BOOT_TIMEOUT)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        victim = first_ack(lab_dir, time.monotonic() + 120)
        entry = state.LabRecord.load(lab_dir).process(f"replica-{victim}")
        os.kill(entry.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        output, _ = up.communicate(timeout=BOOT_TIMEOUT + 60)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    print(output)
    print(f"killed {victim}; nodes ready {time.monotonic() - killed_at:.1f} s later")
    assert up.returncode == 0, output
    report = status(lab_dir)
    assert [n["phase"] for n in report["nodes"]] == ["ready", "ready"]
    states = {r["name"]: r["state"] for r in report["replicas"]}
    assert states[victim] == "dead"
    assert list(states.values()).count("running") == 1
    cluster = Database(lab_dir / "cluster.db").load()
    for name in ("node1", "node2"):
        assert init_line(lab_dir, name) == f"virtualinux: node {name} up {cluster.node(name).ip}"


def test_down_after_up_was_killed_half_way_leaves_nothing(lab_dir):
    """`up` is killed at one exact point: replicas spawned, none serving yet, no QEMU. The
    test holds the lab database locked once `up` has filled it, so the replicas wait in their
    first read (VLX_DB_TIMEOUT) and `up` waits for them; no race with how fast `up` is."""
    up = subprocess.Popen([*VLX, "lab", "up", "--image", "tiny",
                           "--inventory", str(EXAMPLE), "--nodes", "1",
                           "--state-dir", str(lab_dir)],
                          env={**os.environ, "VLX_DB_TIMEOUT": "300"},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    holder = None
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and up.poll() is None:
            try:
                record = state.LabRecord.load(lab_dir)
            except state.StateError:
                record = None     # caught between two writes of the record
            # A namespace in the record: the database is filled and `up` writes it no more.
            if record is not None and record.namespaces and holder is None:
                holder = sqlite3.connect(lab_dir / "cluster.db", isolation_level=None)
                holder.execute("BEGIN EXCLUSIVE")
            entry = record.process("replica-r2") if record is not None else None
            if holder is not None and entry is not None and entry.pid is not None:
                break
            time.sleep(0.02)
        else:
            pytest.fail(f"`up` never started replica r2 (exit {up.poll()})")
        up.kill()
        up.wait()
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
        if holder is not None:
            holder.execute("ROLLBACK")
            holder.close()
    record = state.LabRecord.load(lab_dir)
    assert record is not None and record.phase == "starting"
    assert record.process("qemu-node1") is None
    pids = [p.pid for p in record.processes if p.pid is not None]
    assert lab.lab_namespaces(record.prefix) and pids
    done = vlx("lab", "down", "--state-dir", str(lab_dir), timeout=60)
    assert done.returncode == 0, done.stderr
    assert "the lab is down" in done.stdout
    assert leftovers(lab_dir) == []
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists() or \
            Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    again = vlx("lab", "down", "--state-dir", str(lab_dir), timeout=60)
    assert again.returncode == 0 and "nothing to remove" in again.stdout


def test_a_uefi_node_boots_with_ovmf(lab_dir):
    require("qemu-system-x86_64")
    done = vlx("lab", "up", "--image", "tiny",
               "--inventory", str(EXAMPLE), "--nodes", "1", "--firmware", "uefi",
               "--state-dir", str(lab_dir), "--timeout", str(BOOT_TIMEOUT))
    print(done.stdout, done.stderr)
    assert done.returncode == 0, done.stdout + done.stderr
    assert init_line(lab_dir, "node1") == "virtualinux: node node1 up 198.18.0.11"
    assert status(lab_dir)["firmware"] == "uefi"
