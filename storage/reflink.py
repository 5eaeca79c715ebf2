"""The reflink backend: volumes are files in one directory of a btrfs or XFS file system, and a
snapshot is a reflink clone of its golden file (the FICLONE ioctl): it shares every extent with
the golden until written, so it costs metadata only and no data is ever copied.

N snapshots are one loop in this process over already-open golden file: one create and one
ioctl each, then one fsync of the directory, instead of N `cp` processes.
"""

from __future__ import annotations

import errno
import fcntl
import os
from collections.abc import Sequence
from pathlib import Path

from virtualinux.vvcm.errors import VlxError
from virtualinux.vvcm.model import Volume

from .backend import (
    Backend,
    NoSpace,
    allocated_bytes,
    check_image,
    copy_sparse,
    file_open_for_writing,
    free_bytes,
    fsync_directory,
    make_all_or_none,
)

FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h; Python's fcntl lacks it before 3.12
# Room kept free per new clone (its metadata, with margin): a pool with less is "full".
CLONE_RESERVE = 1024 * 1024
SUFFIX = ".img"
HOW_TO_POOL = ("a reflink pool is a directory on btrfs or XFS (reflink=1); `vlx storage pool "
               "create DIR --size 20GiB` makes a loop-mounted btrfs one to try things out, or "
               "use --backend qcow2 (VM disks only: tgt cannot serve qcow2)")


def clone_file(source_fd: int, target: str) -> None:
    """Create `target` as a reflink clone of the open file `source_fd` (target must not exist)."""
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        fcntl.ioctl(fd, FICLONE, source_fd)
    except BaseException:
        os.close(fd)
        os.unlink(target)
        raise
    os.close(fd)


class ReflinkBackend(Backend):
    how_to_pool = HOW_TO_POOL
    name = "reflink"

    @classmethod
    def pool_of(cls, volume: Volume) -> str:
        return os.path.dirname(volume.path)

    def path_for(self, name: str) -> str:
        return os.path.join(self.pool, name + SUFFIX)

    def golden_path(self, name: str) -> str:
        return self.path_for(name)

    def _check_pool(self) -> None:
        if not os.path.isdir(self.pool):
            what = "is not a directory" if os.path.exists(self.pool) else "does not exist"
            raise VlxError(f"pool {self.pool} {what}: {self.how_to_pool}")

    def add_golden(self, name: str, image: Path) -> tuple[str, int]:
        self._check_pool()
        size = check_image(image)
        self._probe_pool()   # before copying a big image into a pool that cannot clone it
        path = self.golden_path(name)
        if os.path.lexists(path):
            raise VlxError(f"{path} exists already (a volume not in the database?): remove it "
                           "or choose another name")
        partial = os.path.join(self.pool, f".{name}{SUFFIX}.partial")
        with open(image, "rb") as src:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                try:
                    # Same file system: share the image's extents instead of copying them.
                    fcntl.ioctl(fd, FICLONE, src.fileno())
                except OSError as err:
                    if err.errno not in (errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    if allocated_bytes(str(image)) > free_bytes(self.pool):
                        raise NoSpace(f"no space left in pool {self.pool} for image {image} "
                                      f"({free_bytes(self.pool)} bytes free)") from None
                    os.ftruncate(fd, size)
                    copy_sparse(image, fd, size)
                os.fsync(fd)
            except BaseException:
                os.close(fd)
                os.unlink(partial)
                raise
            os.close(fd)
        try:
            self._probe_reflink(partial)
        except BaseException:
            os.unlink(partial)
            raise
        os.chmod(partial, 0o444)  # a golden is never written once snapshots exist
        os.rename(partial, path)
        fsync_directory(self.pool)
        return path, size

    def _probe_reflink(self, path: str) -> None:
        """Refuse a pool that cannot clone now rather than at the first snapshot."""
        probe = path + ".probe"
        with open(path, "rb") as src:
            try:
                clone_file(src.fileno(), probe)
            except OSError as err:
                raise VlxError(f"pool {self.pool} cannot make reflink clones ({err.strerror}): "
                               f"{HOW_TO_POOL}") from None
        os.unlink(probe)

    def _probe_pool(self) -> None:
        probe = os.path.join(self.pool, ".reflink-probe")
        with open(probe, "wb") as out:
            out.write(b"\1" * 4096)
        try:
            self._probe_reflink(probe)
        finally:
            os.unlink(probe)

    def _new_paths(self, names: Sequence[str]) -> list[str]:
        """The pool paths of `names`, none of which may exist yet."""
        self._check_pool()
        targets = [self.path_for(name) for name in names]
        existing = [t for t in targets if os.path.lexists(t)]
        if existing:
            raise VlxError(f"{existing[0]} exists already (a volume not in the database?)")
        return targets

    def snapshot(self, golden: Volume, names: Sequence[str]) -> list[str]:
        targets = self._new_paths(names)
        needed = CLONE_RESERVE * len(targets)
        if free_bytes(self.pool) < needed:
            raise NoSpace(f"no space left in pool {self.pool}: {len(targets)} snapshots need "
                          f"{needed} bytes free, {free_bytes(self.pool)} are")
        with open(golden.path, "rb") as src:
            def clone(target: str) -> None:
                try:
                    clone_file(src.fileno(), target)
                except OSError as err:
                    if err.errno == errno.ENOSPC:
                        raise
                    raise VlxError(f"cannot clone {golden.path}: {err.strerror}") from None

            make_all_or_none(targets, clone, self.pool, "snapshots")
        return targets

    def remove(self, volume: Volume) -> None:
        try:
            os.unlink(volume.path)
        except FileNotFoundError:
            pass

    def grow(self, volume: Volume, size: int) -> None:
        os.truncate(volume.path, size)

    def open_for_writing(self, volume: Volume) -> bool:
        return file_open_for_writing(volume.path)


BACKEND = ReflinkBackend
