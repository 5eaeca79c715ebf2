"""Small facts about this host that every area asks the same way: a file's SHA-256, whether a
process is alive, how to run a command inside a named network namespace. One definition
each, so the storage, netboot, image and lab code cannot drift apart (no project imports)."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

NETNS_DIR = Path("/run/netns")
HASH_BLOCK = 1 << 20


def sha256_file(path: Path | str) -> str:
    """The hex SHA-256 of a file's bytes, read a block at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def pid_alive(pid: int, command: bytes | None = None) -> bool:
    """Whether process `pid` runs (an exited zombie does not; LAB.md: pid 1 here may keep one
    around for a while). With `command`, also that its command line holds it, so a recycled
    pid running something else does not count."""
    if pid <= 0:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes() if command else b""
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and (command is None or command in cmdline)


def in_netns(netns: str | Path, cmd: Sequence[str]) -> list[str]:
    """`cmd` run with the network of namespace `netns` (a name under /run/netns, or a path)
    but the caller's mounts: `ip netns exec` would hide file systems mounted later (LAB.md)."""
    path = netns if "/" in str(netns) else NETNS_DIR / str(netns)
    return ["nsenter", f"--net={path}", "--", *cmd]
