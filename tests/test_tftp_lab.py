"""TFTP against real clients in namespaces: tftp-hpa, curl and atftp download byte-identical
files, traversal is refused with a TFTP error, bad packets do not stop the service, and 50
clients at once all finish. The `bootfiles_lab` fixture is shared with test_http_lab.py."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from virtualinux.bootsvc.status import State, read_status
from virtualinux.netboot import render, scripts
from virtualinux.vm_test.lab import VLX
from virtualinux.vvcm import Credential, Volume, changes, inventory

from .conftest import EXAMPLE, require

pytestmark = pytest.mark.lab

SERVER, CLIENT = "198.18.0.1", "198.18.0.200"
BIG = 10 << 20
ROLLOVER = 65_536 * 512 + 1000      # more blocks than a 16-bit block number counts at 512


@dataclasses.dataclass
class BootFilesLab:
    client: object          # the client Namespace
    tree: Path              # the rendered tree (OUT/current)
    cluster: object
    process: subprocess.Popen
    state_dir: Path         # the replica's --state-dir
    download: Path          # a directory for what clients fetch

    def stop(self) -> dict[str, dict[str, int]]:
        """Stop the services (running transfers get to finish); their final counters."""
        self.process.terminate()
        assert self.process.wait(timeout=20) == 0
        status = read_status(self.state_dir)
        assert status.state == State.STOPPED
        return {name: status.counters(name) for name in status.services}

    def run(self, cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        return self.client.run(cmd, check=False, timeout=timeout)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def service_settings() -> list[str]:
    """Extra `--set SERVICE.FIELD=VALUE` for the services; a test overrides this fixture."""
    return []


@pytest.fixture
def bootfiles_lab(db, db_path, netns, tmp_path, service_settings):
    cluster = db.update("db import", "test",
                        lambda c: inventory.apply(c, inventory.load(EXAMPLE), "test"))
    golden = Volume(name="golden", kind="golden", backend="reflink", path="/pool/golden",
                    size=1 << 30)
    volume = Volume(name="node1-root", kind="snapshot", backend="reflink", path="/pool/n1",
                    size=1 << 30, origin="golden", owner="node1",
                    iqn="iqn.2026-11.org.virtualinux:vlxlab.node1-root", portal="198.18.0.11:3260")
    cluster = db.update("volume put", "test", lambda c: dataclasses.replace(
        changes.put_volumes(c, [golden, volume]),
        credentials=(Credential("node1", "node1", "pw"),)))
    image = tmp_path / "image"
    image.mkdir()
    (image / "vmlinuz").write_bytes(os.urandom(BIG))
    (image / "initrd.img").write_bytes(os.urandom(ROLLOVER))
    out = tmp_path / "netboot"
    render.render(cluster, image, out, ["console=ttyS0"])
    (out / render.CURRENT / "notes.txt").write_text("line one\nline two\r\nend\n")
    (tmp_path / "outside.txt").write_text("secret")
    os.symlink(tmp_path / "outside.txt", out / render.CURRENT / "escape")

    client = netns.namespace("client")
    bridge = netns.bridge(client)
    client.add_address(bridge, f"{CLIENT}/24")
    server = netns.namespace("server")
    netns.plug(client, bridge, server, address=f"{SERVER}/24")
    state_dir = tmp_path / "replica"
    process = server.popen(
        [*VLX, "--db", str(db_path), "bootsvc", "run", "--interface", "eth0",
         "--address", SERVER, "--services", "tftp,http", "--state-dir", str(state_dir),
         "--netboot-root", str(out / render.CURRENT),
         *[f"--set={setting}" for setting in service_settings]],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert process.stdout.readline() == "ready tftp=69 http=80\n", "services did not start"
        download = tmp_path / "download"
        download.mkdir()
        yield BootFilesLab(client, out / render.CURRENT, cluster, process, state_dir, download)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def test_real_clients_download_byte_identical_files(bootfiles_lab):
    require("tftp", "curl", "atftp")
    lab, tree, got = bootfiles_lab, bootfiles_lab.tree, bootfiles_lab.download
    fetches = {
        "tftp-hpa": ["tftp", "-m", "binary", SERVER, "-c", "get", "images/vmlinuz",
                     str(got / "tftp-hpa")],
        "curl": ["curl", "-sS", "--fail", "-o", str(got / "curl"),
                 f"tftp://{SERVER}/images/vmlinuz"],
        "curl-1468": ["curl", "-sS", "--fail", "--tftp-blksize", "1468",
                      "-o", str(got / "curl-1468"), f"tftp://{SERVER}/images/vmlinuz"],
        "atftp-window16": ["atftp", "--option", "blksize 1468", "--option", "windowsize 16",
                           "-g", "-r", "images/vmlinuz", "-l", str(got / "atftp-window16"),
                           SERVER],
    }
    for name, cmd in fetches.items():
        result = lab.run(cmd)
        assert result.returncode == 0, (name, result.stderr)
        assert digest(got / name) == digest(tree / "images/vmlinuz"), name
    # More than 65535 blocks of 512 bytes: the block number rolls over, windowed and not.
    for name, window in (("rollover-lockstep", "1"), ("rollover-window8", "8")):
        result = lab.run(["atftp", "--option", "blksize 512", "--option", f"windowsize {window}",
                          "-g", "-r", "images/initrd.img", "-l", str(got / name), SERVER])
        assert result.returncode == 0, (name, result.stderr)
        assert digest(got / name) == digest(tree / "images/initrd.img"), name
    counters = lab.stop()["tftp"]
    assert counters["sent"] == 6 and counters.get("failed", 0) == 0
    # Clients on this machine ACK within the transfer thread's spin: most waits end in it,
    # without the sleep and wake-up that cost more than the round trip (bootsvc.tftp_window).
    waits = read_status(lab.state_dir).details("tftp")
    lock_step_blocks = 2 * BIG // 512 + ROLLOVER // 512     # tftp-hpa, curl, rollover-lockstep
    assert waits["spin_hits"] > lock_step_blocks // 2, waits


def test_node_script_is_made_from_the_database_and_netascii_converts(bootfiles_lab):
    lab = bootfiles_lab
    result = lab.run(["curl", "-sS", "--fail", f"tftp://{SERVER}/nodes/52-54-00-00-00-11.ipxe"])
    cluster = lab.cluster
    assert result.stdout == scripts.node_script(cluster, cluster.node("node1"), ["console=ttyS0"])
    # The node's cpio (its CHAP secret) goes to the node's own address only.
    cpio = f"tftp://{SERVER}/nodes/52-54-00-00-00-11.cpio"
    result = lab.run(["curl", "-sS", "-o", "/dev/null", cpio])
    assert result.returncode == 69          # curl's "TFTP: access violation"
    lab.client.add_address("br0", "198.18.0.11/24")
    result = lab.run(["curl", "-sS", "--fail", "--interface", "198.18.0.11",
                      "-o", str(lab.download / "cpio"), cpio])
    assert result.returncode == 0, result.stderr
    assert (lab.download / "cpio").read_bytes() == scripts.node_cpio(cluster, cluster.node("node1"))
    # tftp-hpa in ascii mode turns the netascii we send back into the file's own line ends.
    result = lab.run(["tftp", SERVER, "-c", "get", "notes.txt", str(lab.download / "notes")])
    assert result.returncode == 0, result.stderr
    assert (lab.download / "notes").read_bytes() == (lab.tree / "notes.txt").read_bytes()


@pytest.mark.parametrize("path, code", [
    ("../outside.txt", 2), ("images/../../outside.txt", 2), ("escape", 2),
    ("/etc/passwd", 1), ("no-such-file", 1), ("x" * 300, 2)])
def test_traversal_and_missing_files_get_tftp_errors(bootfiles_lab, path, code):
    result = bootfiles_lab.run(["tftp", "-m", "binary", SERVER, "-c", "get", path,
                                str(bootfiles_lab.download / "out")])
    assert f"Error code {code}:" in result.stderr + result.stdout
    assert not (bootfiles_lab.download / "out").exists() or \
        (bootfiles_lab.download / "out").stat().st_size == 0


def test_bad_packets_are_dropped_and_the_service_keeps_serving(bootfiles_lab):
    lab = bootfiles_lab
    garbage = [b"", b"\x00", b"\xff\xff\xff\xff", b"\x00\x01no-nul", b"\x00\x03\x00\x01x",
               b"\x00\x01a\0octet\0blksize\0", os.urandom(600), b"\x00\x02w\0octet\0",
               b"\x00\x01a\0mail\0", b"\x00\x01\xc3\xa9\0octet\0"]
    sender = ("import socket, sys\n"
              "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
              f"for p in {garbage!r}:\n"
              f"    s.sendto(p, ('{SERVER}', 69))\n")
    assert lab.run([sys.executable, "-c", sender]).returncode == 0
    # The request port takes datagrams in order: this request comes after all the garbage.
    result = lab.run(["curl", "-sS", "--fail", f"tftp://{SERVER}/boot.ipxe"])
    assert result.returncode == 0 and result.stdout.startswith("#!ipxe"), result.stderr
    counters = lab.stop()["tftp"]
    assert counters["malformed"] >= 6, counters
    assert (counters["write"], counters["bad_mode"], counters["sent"]) == (1, 1, 1), counters


@pytest.mark.parametrize("service_settings", [["tftp.workers=1"], ["tftp.workers=2"]],
                         ids=["one-transfer-thread", "two-transfer-threads"])
def test_fifty_clients_at_once_all_finish_byte_identical(bootfiles_lab):
    require("curl")
    lab, got = bootfiles_lab, bootfiles_lab.download
    script = " ".join(
        f"curl -sS --fail --max-time 240 --tftp-blksize 1468 -o {got}/c{i} "
        f"tftp://{SERVER}/images/vmlinuz &" for i in range(50)) + " wait"
    started = time.monotonic()
    result = lab.run(["sh", "-c", script], timeout=300)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    expected = digest(lab.tree / "images/vmlinuz")
    assert [i for i in range(50) if digest(got / f"c{i}") != expected] == []
    counters = lab.stop()["tftp"]
    assert counters["sent"] == 50, (counters, elapsed)


def test_tsize_timeout_blksize_and_windowsize_are_acknowledged(bootfiles_lab):
    require("atftp")
    lab = bootfiles_lab
    size = (lab.tree / "boot.ipxe").stat().st_size
    result = lab.run(["atftp", "--trace", "--option", "tsize 0", "--option", "timeout 2",
                      "--option", "blksize 1000", "--option", "windowsize 4", "-g",
                      "-r", "boot.ipxe", "-l", str(lab.download / "boot.ipxe"), SERVER])
    assert result.returncode == 0, result.stderr
    oack = next(line for line in (result.stdout + result.stderr).splitlines()
                if line.startswith("received OACK"))
    for option in (f"tsize: {size},", "timeout: 2,", "blksize: 1000,", "windowsize: 4,"):
        assert option in oack, oack
    assert (lab.download / "boot.ipxe").read_bytes() == (lab.tree / "boot.ipxe").read_bytes()
