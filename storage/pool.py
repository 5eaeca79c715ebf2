"""A pool to try things out on a host whose root is neither btrfs nor XFS: a sparse file,
formatted btrfs (or XFS with reflink), loop-mounted on the pool directory. For a real cluster
make the pool on real storage; a loop mount does not come back after a reboot by itself (we
print the /etc/fstab line that would bring it back).
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

from virtualinux.vvcm.errors import VlxError

FILESYSTEMS = {"btrfs": ["mkfs.btrfs", "-q"], "xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"]}
MIN_SIZE = {"btrfs": 128 << 20, "xfs": 320 << 20}   # below these the mkfs tools refuse


@dataclasses.dataclass(frozen=True)
class LoopPool:
    directory: Path
    backing: Path
    fstype: str
    size: int

    @property
    def fstab_line(self) -> str:
        return f"{self.backing} {self.directory} {self.fstype} loop 0 0"


def default_backing(directory: Path) -> Path:
    """`/var/lib/virtualinux/volumes` -> `/var/lib/virtualinux/volumes.fs` (beside it)."""
    return directory.with_name(directory.name + ".fs")


def _run(cmd: list[str], what: str) -> None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise VlxError(f"{cmd[0]} is missing (apt-get install btrfs-progs xfsprogs)") from None
    if done.returncode != 0:
        raise VlxError(f"{what} failed: {(done.stderr or done.stdout).strip()}")


def create_loop_pool(directory: Path, size: int, fstype: str = "btrfs",
                     backing: Path | None = None) -> LoopPool:
    """Make `backing` (sparse, `size` bytes), put a file system on it and mount it on
    `directory`; all or nothing."""
    directory = directory.absolute()
    backing = (backing or default_backing(directory)).absolute()
    if fstype not in FILESYSTEMS:
        raise VlxError(f"file system {fstype!r}: choose {' or '.join(FILESYSTEMS)}")
    if size < MIN_SIZE[fstype]:
        raise VlxError(f"--size: {fstype} needs at least {MIN_SIZE[fstype] >> 20} MiB")
    if os.geteuid() != 0:
        raise VlxError("mounting a pool needs root")
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise VlxError(f"{directory} exists and is not an empty directory: a pool is mounted "
                       "on an empty one")
    if os.path.ismount(directory):
        raise VlxError(f"{directory} is a mount point already")
    if backing.exists():
        raise VlxError(f"{backing} exists already: remove it or name another with --backing")
    made_directory = not directory.exists()
    backing.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(backing, "xb") as out:
            out.truncate(size)
        _run(FILESYSTEMS[fstype] + [str(backing)], f"mkfs.{fstype} on {backing}")
        directory.mkdir(parents=True, exist_ok=True)
        _run(["mount", "-o", "loop", str(backing), str(directory)],
             f"mounting {backing} on {directory}")
    except BaseException:
        if made_directory and directory.is_dir() and not os.path.ismount(directory):
            directory.rmdir()
        backing.unlink(missing_ok=True)
        raise
    return LoopPool(directory, backing, fstype, size)


def remove_loop_pool(directory: Path, backing: Path | None = None) -> Path:
    """Unmount a pool made by `create_loop_pool` and delete its backing file (its volumes go
    with it: the caller checks that the database records none there)."""
    directory = directory.absolute()
    backing = (backing or default_backing(directory)).absolute()
    if not os.path.ismount(directory):
        raise VlxError(f"{directory} is not a mounted pool")
    if not backing.is_file():
        raise VlxError(f"{backing} is not there: is {directory} a pool `vlx storage pool "
                       "create` made? (name its file with --backing)")
    _run(["umount", str(directory)], f"unmounting {directory}")
    # `mount -o loop` sets autoclear: the loop device goes with the unmount.
    backing.unlink()
    return backing
