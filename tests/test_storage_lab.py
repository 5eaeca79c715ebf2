"""Storage against real peers: reflink clones on a loop-mounted btrfs, tgtd serving them inside
lab namespaces, libiscsi's tools and QEMU's iscsi:// driver as initiators. Needs root."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from virtualinux.storage import backup, tgt
from virtualinux.storage.backend import sparse_sha256
from virtualinux.storage.naming import initiator_iqn, target_iqn
from virtualinux.vvcm.command import vlx_command
from virtualinux.vvcm.db import Database

from .conftest import EXAMPLE, require, vlx

pytestmark = pytest.mark.lab

MIB = 1 << 20
PORTAL = "198.18.0.11:3260"


@contextlib.contextmanager
def loop_filesystem(backing: Path, size: int, mountpoint: Path, fstype: str = "btrfs"):
    """A file system in a sparse file, loop-mounted; unmounted and its loop device gone
    afterwards."""
    mkfs = {"btrfs": ["mkfs.btrfs", "-q"], "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"]}[fstype]
    require(mkfs[0], "losetup")
    with open(backing, "wb") as handle:
        handle.truncate(size)
    subprocess.run(mkfs + [str(backing)], check=True, capture_output=True)
    mountpoint.mkdir()
    subprocess.run(["mount", "-o", "loop", str(backing), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
        loops = subprocess.run(["losetup", "-n", "-O", "NAME", "-j", str(backing)],
                               capture_output=True, text=True).stdout.split()
        for device in loops:
            subprocess.run(["losetup", "-d", device], capture_output=True)


@pytest.fixture
def btrfs_pool(tmp_path, monkeypatch):
    with loop_filesystem(tmp_path / "pool.fs", 384 * MIB, tmp_path / "pool") as pool:
        monkeypatch.setenv("VLX_POOL", str(pool))
        yield pool


@pytest.fixture
def storage_state(btrfs_pool, tmp_path, monkeypatch):
    """State dir for our tgtds; every tgtd recorded there is stopped (before the unmount)."""
    directory = tmp_path / "state"
    monkeypatch.setenv("VLX_STORAGE_STATE", str(directory))
    try:
        yield directory
    finally:
        if directory.exists():
            for daemon in tgt.recorded_daemons(directory):
                tgt.stop(daemon, directory)


def write_image(path: Path, random_mib: int, zero_mib: int = 0) -> bytes:
    data = os.urandom(random_mib * MIB) + bytes(zero_mib * MIB)
    path.write_bytes(data)
    return data


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def exclusive_bytes(*paths: Path) -> dict[str, int]:
    """btrfs's own count of the bytes each file does not share with any other."""
    out = subprocess.run(["btrfs", "filesystem", "du", "--raw", *map(str, paths)],
                         check=True, capture_output=True, text=True).stdout
    return {Path(line.split()[-1]).name: int(line.split()[1])
            for line in out.splitlines()[1:]}


def example_with_golden(capsys, tmp_path: Path, mib: int = 4) -> bytes:
    """The example cluster in the test's database and golden volume `node` (random bytes)."""
    assert vlx(capsys, "db", "init")[0] == 0
    assert vlx(capsys, "db", "import", str(EXAMPLE))[0] == 0
    data = write_image(tmp_path / "node.raw", mib)
    code, _, err = vlx(capsys, "volume", "golden", "add", "node", "--from",
                       str(tmp_path / "node.raw"))
    assert code == 0, err
    return data


def many_nodes_inventory(path: Path, count: int) -> Path:
    lines = ['[cluster]', 'name = "vlxlab"', 'domain = "cluster.lab"',
             'cidr = "198.18.0.0/22"', 'gateway_vip = "198.18.3.254"']
    for index in range(1, count + 1):
        lines += ["[[node]]", f'name = "node{index}"',
                  f'mac = "52:54:00:00:{index // 256:02x}:{index % 256:02x}"',
                  f'ip = "198.18.{index // 250}.{index % 250 + 1}"', "cpus = 1",
                  'memory = "1GiB"']
    path.write_text("\n".join(lines) + "\n")
    return path


def test_100_snapshots_share_the_golden_until_one_is_written(btrfs_pool, db_path, tmp_path,
                                                             capsys):
    vlx(capsys, "db", "init")
    assert vlx(capsys, "db", "import", str(many_nodes_inventory(tmp_path / "c.toml", 100)))[0] == 0
    original = write_image(tmp_path / "node.raw", 16)
    assert vlx(capsys, "volume", "golden", "add", "node", "--from",
               str(tmp_path / "node.raw"))[0] == 0
    golden = btrfs_pool / "node.img"

    code, out, err = vlx(capsys, "volume", "snapshot", "node", "--count", "100")
    assert code == 0, err
    assert "made 100 snapshots of node: node1-root .. node100-root" in out
    snapshots = [btrfs_pool / f"node{i}-root.img" for i in range(1, 101)]
    assert all(path.stat().st_size == len(original) for path in snapshots)
    # Not one byte copied: every snapshot shares all its extents with the golden.
    assert set(exclusive_bytes(*snapshots).values()) == {0}

    patch = os.urandom(MIB)
    with open(snapshots[41], "r+b") as disk:
        os.pwrite(disk.fileno(), patch, 4 * MIB)
        os.fsync(disk.fileno())
    assert sha(golden) == hashlib.sha256(original).hexdigest()
    changed = original[:4 * MIB] + patch + original[5 * MIB:]
    assert sha(snapshots[41]) == hashlib.sha256(changed).hexdigest()
    untouched = {sha(path) for i, path in enumerate(snapshots) if i != 41}
    assert untouched == {hashlib.sha256(original).hexdigest()}
    assert exclusive_bytes(snapshots[41], snapshots[40]) == {"node42-root.img": MIB,
                                                             "node41-root.img": 0}


def test_reflink_pool_on_xfs(tmp_path, db_path, monkeypatch, capsys):
    with loop_filesystem(tmp_path / "xfs.fs", 512 * MIB, tmp_path / "xfs", "xfs") as pool:
        monkeypatch.setenv("VLX_POOL", str(pool))
        vlx(capsys, "db", "init")
        vlx(capsys, "db", "import", str(EXAMPLE))
        original = write_image(tmp_path / "node.raw", 8)
        assert vlx(capsys, "volume", "golden", "add", "node", "--from",
                   str(tmp_path / "node.raw"))[0] == 0
        code, _, err = vlx(capsys, "volume", "snapshot", "node", "--for", "nodes")
        assert code == 0, err
        extents = subprocess.run(["filefrag", "-v", str(pool / "node3-root.img")],
                                 capture_output=True, text=True, check=True).stdout
        assert "shared" in extents  # XFS says the clone's extents are shared
        with open(pool / "node1-root.img", "r+b") as disk:
            os.pwrite(disk.fileno(), b"\x77" * MIB, 0)
        assert (pool / "node.img").read_bytes() == original
        assert all((pool / f"node{i}-root.img").read_bytes() == original for i in (2, 3, 4))
        assert vlx(capsys, "volume", "remove", "--snapshots-of", "node", "node")[0] == 0
        assert os.listdir(pool) == []


def fill(directory: Path) -> None:
    """Allocate files in `directory` until the file system has no data space left."""
    directory.mkdir()
    for step in (64 * MIB, 4 * MIB, 256 * 1024):
        while subprocess.run(["fallocate", "-l", str(step), str(directory / str(len(
                os.listdir(directory))))], capture_output=True).returncode == 0:
            pass


def test_faults_leave_every_volume_as_it_was(btrfs_pool, db_path, tmp_path, capsys):
    vlx(capsys, "db", "init")
    vlx(capsys, "db", "import", str(EXAMPLE))
    write_image(tmp_path / "node.raw", 8)
    assert vlx(capsys, "volume", "golden", "add", "node", "--from",
               str(tmp_path / "node.raw"))[0] == 0
    golden_sum = sha(btrfs_pool / "node.img")
    generation = Database(db_path).generation()

    # A golden open for writing (an image build still running) is not snapshotted.
    with open(btrfs_pool / "node.img", "r+b"):
        code, _, err = vlx(capsys, "volume", "snapshot", "node", "--count", "2")
    assert code == 2 and "in use read-write" in err

    # An image bigger than the pool: no space, no partial file left behind.
    big = tmp_path / "big.raw"
    with open(big, "wb") as handle:
        for _ in range(400):
            handle.write(os.urandom(MIB))
    code, _, err = vlx(capsys, "volume", "golden", "add", "big", "--from", str(big))
    assert code == 2 and "no space left" in err
    assert sorted(os.listdir(btrfs_pool)) == ["node.img"]

    # A pool too full for the clones' metadata: refused before the first clone.
    fill(btrfs_pool / "filler")
    code, _, err = vlx(capsys, "volume", "snapshot", "node", "--count", "4")
    assert code == 2 and "no space left in pool" in err
    assert sorted(os.listdir(btrfs_pool)) == ["filler", "node.img"]
    shutil.rmtree(btrfs_pool / "filler")

    assert sha(btrfs_pool / "node.img") == golden_sum
    assert Database(db_path).generation() == generation


@pytest.fixture
def san(netns, storage_state):
    """A storage namespace (198.18.0.11, node1's address) and a client namespace (.200) on one
    bridge; tgtds recorded in `storage_state` stop before the namespaces go."""
    require("tgtd", "tgtadm", "iscsi-ls", "iscsi-inq", "iscsi-readcapacity16", "qemu-io")
    hub = netns.namespace("hub")
    bridge = netns.bridge(hub)
    server = netns.namespace("san")
    client = netns.namespace("cli")
    netns.plug(hub, bridge, server, address="198.18.0.11/24")
    netns.plug(hub, bridge, client, address="198.18.0.200/24")
    return server, client


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""      # gone meanwhile


def finish(process: subprocess.Popen) -> None:
    """Wait for a process we started to end; kill it if it will not."""
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def iscsi_url(target: str, user: str, secret: str) -> str:
    return f"iscsi://{user}%{secret}@{PORTAL}/{target}"


def qemu_io(client, target: str, initiator: str, user: str, secret: str, *commands: str):
    options = (f"driver=iscsi,transport=tcp,portal={PORTAL},target={target},lun=1,"
               f"initiator-name={initiator},user={user},password={secret}")
    argv = ["qemu-io", "--image-opts", options]
    for command in commands:
        argv += ["-c", command]
    return client.run(argv, check=False, timeout=60)


def test_nodes_attach_only_their_own_volume_over_iscsi_and_exports_survive_tgtd(
        san, btrfs_pool, db_path, tmp_path, capsys):
    server, client = san
    vlx(capsys, "db", "init")
    vlx(capsys, "db", "import", str(EXAMPLE))
    original = write_image(tmp_path / "node.raw", 16)
    vlx(capsys, "volume", "golden", "add", "node", "--from", str(tmp_path / "node.raw"))
    port = str(32000 + os.getpid() % 700)
    code, out, err = vlx(capsys, "storage", "serve", "--control-port", port,
                         "--netns", server.name)
    assert code == 0, err
    assert f"started on {PORTAL}" in out and "0 targets added" in out
    code, out, err = vlx(capsys, "volume", "snapshot", "node", "--count", "2", "--export")
    assert code == 0, err
    assert f"exported on {PORTAL}" in out

    cluster = Database(db_path).load()
    node1, node2 = cluster.credential("node1"), cluster.credential("node2")
    target1, target2 = target_iqn("vlxlab", "node1-root"), target_iqn("vlxlab", "node2-root")
    init1, init2 = initiator_iqn("vlxlab", "node1"), initiator_iqn("vlxlab", "node2")
    assert cluster.volume("node1-root").iqn == target1
    shown = json.loads(vlx(capsys, "volume", "show", "node1-root", "--json")[1])
    assert (shown["iqn"], shown["portal"], shown["initiator"], shown["chap_user"]) == (
        target1, PORTAL, init1, "node1")
    assert node1.secret not in json.dumps(shown)

    # Discovery as node1 shows node1's target only, disk on LUN 1.
    listing = client.run(["iscsi-ls", "-s", "-i", init1,
                          f"iscsi://node1%{node1.secret}@{PORTAL}"]).stdout
    assert target1 in listing and target2 not in listing
    assert "Lun:1" in listing and "DIRECT_ACCESS" in listing
    size = client.run(["iscsi-readcapacity16", "-i", init1,
                       iscsi_url(target1, "node1", node1.secret) + "/1"]).stdout
    assert f"Total size:{len(original)}" in size

    # node1 writes its disk; the golden and node2's disk do not change.
    result = qemu_io(client, target1, init1, "node1", node1.secret,
                     f"write -P 0x5a {MIB} 65536", f"read -P 0x5a {MIB} 65536")
    assert result.returncode == 0, result.stderr
    assert (btrfs_pool / "node1-root.img").read_bytes()[MIB:MIB + 65536] == b"\x5a" * 65536
    assert (btrfs_pool / "node.img").read_bytes() == original
    assert (btrfs_pool / "node2-root.img").read_bytes() == original

    # Another node's initiator, or a wrong secret, is refused.
    wrong_initiator = qemu_io(client, target1, init2, "node1", node1.secret, "read 0 512")
    assert wrong_initiator.returncode != 0
    assert "Failed to log in" in wrong_initiator.stderr
    foreign_login = qemu_io(client, target1, init2, "node2", node2.secret, "read 0 512")
    assert foreign_login.returncode != 0
    wrong_secret = client.run(["iscsi-inq", "-i", init1,
                               iscsi_url(target1, "node1", "WrongSecret1234") + "/1"],
                              check=False)
    assert wrong_secret.returncode != 0 and "Authentication failure" in wrong_secret.stderr

    # An exported volume is not removed.
    code, _, err = vlx(capsys, "volume", "remove", "node2-root")
    assert code == 2 and "still exported" in err
    assert (btrfs_pool / "node2-root.img").exists()

    # tgtd dies: every command that needs it says so and changes nothing ...
    daemon = tgt.recorded_daemon(PORTAL)
    os.kill(daemon.pid, signal.SIGKILL)
    os.waitpid(daemon.pid, 0)
    generation = Database(db_path).generation()
    for argv in (["storage", "status"], ["volume", "unexport", "node2-root"],
                 ["volume", "snapshot", "node", "--count", "1", "--export"]):
        code, _, err = vlx(capsys, *argv)
        assert code == 2 and "has died" in err, (argv, err)
    assert Database(db_path).generation() == generation
    assert not (btrfs_pool / "node3-root.img").exists()

    # ... and `serve` brings it back with every export and node1's data.
    code, out, err = vlx(capsys, "storage", "serve", "--control-port", port,
                         "--netns", server.name)
    assert code == 0 and "started" in out and "2 targets added" in out, err
    result = qemu_io(client, target1, init1, "node1", node1.secret, f"read -P 0x5a {MIB} 65536")
    assert result.returncode == 0, result.stderr
    status = json.loads(vlx(capsys, "storage", "status", "--json")[1])
    assert [(s["portal"], s["state"], s["listening"], s["targets"], s["missing"])
            for s in status] == [(PORTAL, "running", [PORTAL], 2, [])]

    # A volume a node is logged in to is not unexported unless forced.
    options = (f"driver=iscsi,transport=tcp,portal={PORTAL},target={target2},lun=1,"
               f"initiator-name={init2},user=node2,password={node2.secret}")
    session = client.popen(["qemu-io", "--image-opts", options], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        session.stdin.write(b"read 0 512\n")
        session.stdin.flush()
        assert b"read 512/512" in session.stdout.readline()
        code, _, err = vlx(capsys, "volume", "unexport", "node2-root")
        assert code == 2 and "has an iSCSI session" in err
        assert Database(db_path).load().volume("node2-root").iqn == target2
    finally:
        session.stdin.close()
        finish(session)

    # Unexport ends the target; then the volume may go.
    assert vlx(capsys, "volume", "unexport", "node2-root")[0] == 0
    listing = client.run(["iscsi-ls", "-i", init2,
                          f"iscsi://node2%{node2.secret}@{PORTAL}"]).stdout
    assert target2 not in listing
    assert vlx(capsys, "volume", "remove", "node2-root")[0] == 0
    assert not (btrfs_pool / "node2-root.img").exists()

    code, out, _ = vlx(capsys, "storage", "stop")
    assert code == 0
    assert not tgt.Daemon(PORTAL, int(port), daemon.pid).alive()
    assert tgt.recorded_daemons() == []


def test_serve_watch_restarts_a_dying_tgtd_with_its_exports(san, btrfs_pool, db_path,
                                                            tmp_path, capsys):
    server, client = san
    example_with_golden(capsys, tmp_path)
    assert vlx(capsys, "volume", "snapshot", "node", "--for", "node3", "--portal", PORTAL)[0] == 0
    credential = Database(db_path).load().credential("node3")
    url = iscsi_url(target_iqn("vlxlab", "node3-root"), "node3", credential.secret) + "/1"
    init3 = initiator_iqn("vlxlab", "node3")
    watcher = subprocess.Popen(vlx_command("storage", "serve", "--portal", PORTAL,
                                           "--control-port", str(31000 + os.getpid() % 700),
                                           "--netns", server.name, "--watch"),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "started" in watcher.stdout.readline()
        first = tgt.recorded_daemon(PORTAL)
        assert client.run(["iscsi-inq", "-i", init3, url], check=False).returncode == 0
        os.kill(first.pid, signal.SIGKILL)
        deadline = time.monotonic() + 20
        while True:
            current = tgt.recorded_daemon(PORTAL)
            # Restarted, and its export restored: tgtd is recorded before its targets are
            # made, so wait for the target itself, not only for the new pid.
            if (current and current.pid != first.pid and current.alive()
                    and target_iqn("vlxlab", "node3-root") in current.admin.targets()):
                break
            assert time.monotonic() < deadline, "the watcher did not restore tgtd's export"
            time.sleep(0.2)
        assert client.run(["iscsi-inq", "-i", init3, url], check=False).returncode == 0
    finally:
        watcher.send_signal(signal.SIGTERM)
        finish(watcher)
    assert watcher.returncode == 0, watcher.stderr.read()
    assert tgt.recorded_daemons() == []
    assert not current.alive()


def test_serve_on_an_address_the_host_lacks_offers_no_volume_anywhere(san, btrfs_pool, db_path,
                                                                     tmp_path, capsys):
    """tgtd falls back to 0.0.0.0 and [::] when it cannot bind its portal: that tgtd must be
    stopped before any target is added, with one line that says why."""
    server, client = san
    example_with_golden(capsys, tmp_path)
    elsewhere = "198.18.0.99:3260"      # not an address of the storage namespace
    assert vlx(capsys, "volume", "snapshot", "node", "--count", "2", "--export",
               "--portal", elsewhere)[0] == 0
    port = 32700 + os.getpid() % 60
    code, out, err = vlx(capsys, "storage", "serve", "--portal", elsewhere, "--control-port",
                         str(port), "--netns", server.name)
    assert code == 2 and out == ""
    assert (f"tgtd could not bind its portal {elsewhere} (Cannot assign requested address"
            in err and "0.0.0.0:3260" in err and "nothing is exported" in err), err
    assert tgt.recorded_daemons() == []
    assert [pid for pid in server.pids() if b"tgtd" in cmdline(pid)] == []
    # Nothing answers on the storage namespace's real address either.
    probe = client.run([sys.executable, "-c", "import socket; socket.create_connection("
                        "('198.18.0.11', 3260), timeout=5)"], check=False)
    assert probe.returncode != 0 and "ConnectionRefusedError" in probe.stderr


def test_exports_with_no_tgtd_are_recorded_and_said_so_and_stop_is_idempotent(
        san, btrfs_pool, db_path, tmp_path, capsys):
    server, _ = san
    example_with_golden(capsys, tmp_path)
    hint = (f"no tgtd serves {PORTAL} yet: the export is recorded; `vlx storage serve "
            f"--portal {PORTAL}` serves it")
    code, out, _ = vlx(capsys, "volume", "snapshot", "node", "--count", "2", "--export")
    assert code == 0 and hint in out
    code, out, err = vlx(capsys, "storage", "status")
    assert code == 1
    assert out.splitlines()[1].split() == [PORTAL, "-", "no", "tgtd", "-", "2", "0", "0", "2"]
    assert f"portal {PORTAL}: 2 exports, no tgtd" in err
    port = str(31300 + os.getpid() % 300)
    assert vlx(capsys, "storage", "serve", "--control-port", port, "--netns", server.name)[0] == 0
    code, out, _ = vlx(capsys, "storage", "status")
    assert code == 0 and out.splitlines()[1].split()[2:] == ["running", PORTAL, "2", "2", "0", "0"]
    assert vlx(capsys, "storage", "stop")[:2] == (0, f"stopped tgtd for {PORTAL}\n")
    assert vlx(capsys, "storage", "stop")[:2] == (
        0, f"no tgtd runs for {PORTAL}: nothing to stop\n")
    code, out, _ = vlx(capsys, "volume", "unexport", "node2-root")
    assert code == 0
    code, out, _ = vlx(capsys, "volume", "export", "node2-root")
    assert code == 0 and hint in out
    assert json.loads(vlx(capsys, "storage", "status", "--json")[1])[0]["state"] == "no tgtd"


def test_a_lost_volume_does_not_keep_the_others_from_being_served(san, btrfs_pool, db_path,
                                                                  tmp_path, capsys):
    server, client = san
    example_with_golden(capsys, tmp_path)
    assert vlx(capsys, "volume", "snapshot", "node", "--count", "2", "--export")[0] == 0
    (btrfs_pool / "node2-root.img").unlink()  # lost behind our back
    port = str(31700 + os.getpid() % 290)
    code, _, err = vlx(capsys, "storage", "serve", "--control-port", port,
                       "--netns", server.name)
    assert code == 2
    assert "1 of 2 exports on 198.18.0.11:3260 failed (the others are served)" in err
    assert "node2-root.img is missing" in err
    credential = Database(db_path).load().credential("node1")
    url = iscsi_url(target_iqn("vlxlab", "node1-root"), "node1", credential.secret) + "/1"
    inquiry = client.run(["iscsi-inq", "-i", initiator_iqn("vlxlab", "node1"), url],
                         check=False)
    assert inquiry.returncode == 0, inquiry.stderr
    status = json.loads(vlx(capsys, "storage", "status", "--json")[1])
    assert [(s["targets"], s["missing"]) for s in status] == [
        (1, [target_iqn("vlxlab", "node2-root")])]


def test_vc_backup_and_restore_round_trip_verified_by_checksums(btrfs_pool, db_path, tmp_path,
                                                                capsys):
    vlx(capsys, "db", "init")
    vlx(capsys, "db", "import", str(EXAMPLE))
    original = write_image(tmp_path / "guest.raw", 4, zero_mib=4)
    vlx(capsys, "volume", "golden", "add", "guest", "--from", str(tmp_path / "guest.raw"))
    assert vlx(capsys, "volume", "snapshot", "guest", "--for", "vc:green")[0] == 0
    patch = os.urandom(MIB)
    with open(btrfs_pool / "green-2-disk.img", "r+b") as disk:
        os.pwrite(disk.fileno(), patch, 6 * MIB)
    written = original[:6 * MIB] + patch + original[7 * MIB:]
    db = Database(db_path)
    before = db.load()

    directory = tmp_path / "backup"
    manifest = backup.backup_vc(db, "green", directory)
    assert sorted(os.listdir(directory)) == sorted(
        ["vc.json"] + [f"green-{i}-disk.raw" for i in range(1, 5)])
    raw = directory / "green-1-disk.raw"
    assert raw.stat().st_size == len(original)
    assert raw.stat().st_blocks * 512 <= 5 * MIB  # the zero half stayed a hole
    dense = tmp_path / "green-2-written"   # the same bytes, stored without holes
    dense.write_bytes(written)
    assert {e["name"]: e["sparse_sha256"] for e in manifest["volumes"]}["green-2-disk"] == \
        sparse_sha256(dense)

    assert vlx(capsys, "volume", "remove", "guest")[0] == 2  # its snapshots are there
    names = [f"green-{i}-disk" for i in range(1, 5)]
    assert vlx(capsys, "volume", "remove", *names)[0] == 0
    assert vlx(capsys, "vc", "remove", "green")[0] == 0

    vc = backup.restore_vc(db, directory)
    after = db.load()
    assert vc == before.vc("green")
    assert after.vms_of("green") == before.vms_of("green")
    assert [after.volume(n) for n in names] == [before.volume(n) for n in names]
    assert sha(btrfs_pool / "green-2-disk.img") == hashlib.sha256(written).hexdigest()
    assert sha(btrfs_pool / "green-1-disk.img") == hashlib.sha256(original).hexdigest()
    # Restored as snapshots again: only the written chunk is green-2's own.
    assert exclusive_bytes(btrfs_pool / "green-1-disk.img",
                           btrfs_pool / "green-2-disk.img") == {
        "green-1-disk.img": 0, "green-2-disk.img": MIB}

    # A damaged backup is refused before anything is touched.
    with open(directory / "green-3-disk.raw", "r+b") as damaged:
        damaged.write(b"\xff")
    generation = db.generation()
    with pytest.raises(backup.VlxError, match="does not match its SHA-256"):
        backup.restore_vc(db, directory)
    assert db.generation() == generation



def test_pool_create_makes_a_loop_mounted_btrfs_pool_that_golden_add_can_use(
        db_path, tmp_path, monkeypatch, capsys):
    require("mkfs.btrfs", "losetup")
    monkeypatch.setenv("VLX_STORAGE_STATE", str(tmp_path / "state"))
    pool = tmp_path / "volumes"
    backing = tmp_path / "volumes.fs"
    vlx(capsys, "db", "init")
    vlx(capsys, "db", "import", str(EXAMPLE))
    try:
        code, out, err = vlx(capsys, "storage", "pool", "create", str(pool), "--size", "256MiB")
        assert code == 0, err
        assert out.startswith(f"made pool {pool}: btrfs on {backing} (256 MiB, sparse)")
        assert os.path.ismount(pool) and backing.stat().st_size == 256 * MIB
        code, _, err = vlx(capsys, "storage", "pool", "create", str(pool), "--size", "256MiB")
        assert code == 2 and f"{pool} is a mount point already" in err
        write_image(tmp_path / "node.raw", 4)
        code, _, err = vlx(capsys, "volume", "golden", "add", "node", "--from",
                           str(tmp_path / "node.raw"), "--pool", str(pool))
        assert code == 0, err
        assert vlx(capsys, "volume", "snapshot", "node", "--for", "node1")[0] == 0
        assert exclusive_bytes(pool / "node1-root.img")["node1-root.img"] == 0   # a reflink
        code, _, err = vlx(capsys, "storage", "pool", "remove", str(pool))
        assert code == 2 and "node, node1-root" in err and os.path.ismount(pool)
        assert vlx(capsys, "volume", "remove", "node", "--snapshots-of", "node")[0] == 0
        code, out, _ = vlx(capsys, "storage", "pool", "remove", str(pool))
        assert code == 0 and out == f"removed pool {pool} and {backing}\n"
        assert not os.path.ismount(pool) and not backing.exists()
    finally:
        if os.path.ismount(pool):
            subprocess.run(["umount", str(pool)], check=False)
