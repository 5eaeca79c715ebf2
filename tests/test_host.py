"""The host helpers every area shares (vvcm/host.py)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

from virtualinux.vvcm.host import in_netns, pid_alive, sha256_file


def test_sha256_file_reads_every_block(tmp_path):
    data = os.urandom(3 * (1 << 20) + 17)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_a_zombie_and_a_recycled_pid_are_not_alive():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    # Not reaped yet: the child has exited but is still a zombie.
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)
    assert not pid_alive(child.pid)
    child.wait()
    assert pid_alive(os.getpid())
    assert pid_alive(os.getpid(), b"python") or pid_alive(os.getpid(), b"pytest")
    assert not pid_alive(os.getpid(), b"tgtd")     # alive, but not the program asked for
    assert not pid_alive(0) and not pid_alive(-1)


def test_in_netns_keeps_the_callers_mounts():
    assert in_netns("vlxlab-net", ["tgtd", "-f"]) == [
        "nsenter", "--net=/run/netns/vlxlab-net", "--", "tgtd", "-f"]
    assert in_netns("/proc/1/ns/net", ["true"])[1] == "--net=/proc/1/ns/net"
