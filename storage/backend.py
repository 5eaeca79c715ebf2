"""The one small interface every storage backend implements, and the registry that picks one.

A backend keeps golden volumes and copy-on-write snapshots of them in a *pool* (a directory on
btrfs/XFS for `reflink`, a directory for `qcow2`, `VG/THINPOOL` for `lvm-thin`). It knows
nothing of the database: `volumes` decides names and records results; a backend only makes,
grows and removes what it is told, all-or-nothing, and raises `VlxError` (exit 2) on a fault
with nothing changed. Backend modules are `virtualinux.storage.NAME` (dashes become
underscores) with a `BACKEND` class, like the boot services.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from virtualinux.vvcm.errors import VlxError
from virtualinux.vvcm.model import StorageBackend, Volume, VolumeKind

BACKENDS = tuple(StorageBackend)
CHUNK = 1024 * 1024


class NoSpace(VlxError):
    """The pool has not room for what was asked; nothing was made."""


class InUse(VlxError):
    """A volume is open for writing (or exported) where that is not allowed."""


class Backend(ABC):
    """A family of volumes in one pool; see the module docstring for the contract."""

    name: str = ""
    # Whether `open_for_writing` can tell writers from readers (LVM only knows "open").
    knows_open_mode = True

    def __init__(self, pool: str):
        self.pool = pool

    @classmethod
    @abstractmethod
    def pool_of(cls, volume: Volume) -> str:
        """The pool a recorded volume lives in (snapshots go where their golden is)."""

    @abstractmethod
    def path_for(self, name: str) -> str:
        """Where a volume named `name` lives in this pool."""

    @abstractmethod
    def add_golden(self, name: str, image: Path) -> tuple[str, int]:
        """Store `image` (a raw disk image) as golden volume `name`; returns (path, size)."""

    @abstractmethod
    def snapshot(self, golden: Volume, names: Sequence[str]) -> list[str]:
        """Make one copy-on-write snapshot of `golden` per name, all or none; returns paths."""

    @abstractmethod
    def remove(self, volume: Volume) -> None:
        """Delete the volume's storage (a missing one is not an error: it is gone already)."""

    @abstractmethod
    def grow(self, volume: Volume, size: int) -> None:
        """Make the volume `size` bytes (never smaller)."""

    @abstractmethod
    def open_for_writing(self, volume: Volume) -> bool:
        """True if some process has the volume open for writing right now."""

    def export_path(self, volume: Volume) -> str:
        """What tgt serves as the LUN for this volume (a raw file or block device)."""
        return volume.path

    def backup_to(self, volume: Volume, target: Path, progress: Progress | None = None) -> None:
        """Write the volume's raw contents to the new file `target`, sparse: only the data
        extents of the volume are read, and zero chunks in them are not written."""
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, volume.size)
            copy_sparse(Path(self.export_path(volume)), fd, volume.size, progress)
            os.fsync(fd)
        finally:
            os.close(fd)

    def free_bytes(self) -> int | None:
        """Bytes the pool has left for volumes to grow into, if the backend can tell cheaply."""
        try:
            return free_bytes(self.pool)
        except OSError:
            return None

    def restore_snapshot(self, golden: Volume, name: str, source: Path, size: int) -> str:
        """Make snapshot `name` of `golden` whose contents are `source` (`size` bytes), writing
        only the chunks that differ from the golden, so unchanged data stays shared."""
        path = self.snapshot(golden, [name])[0]
        volume = Volume(name=name, kind=VolumeKind.SNAPSHOT, backend=StorageBackend(self.name),
                        path=path,
                        size=golden.size, origin=golden.name)
        try:
            if size > golden.size:
                self.grow(volume, size)
            self.write_changes(volume, golden, source, size)
        except BaseException as err:
            self.remove(volume)
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                raise NoSpace(f"no space left in the pool restoring {name}; not kept") from None
            raise
        return path

    def write_changes(self, volume: Volume, golden: Volume, source: Path, size: int) -> None:
        """Write into `volume` (a fresh snapshot of `golden`) the chunks where `source`
        differs from it."""
        target = self.export_path(volume)
        fd = os.open(target, os.O_RDWR)
        try:
            for offset, chunk in changed_chunks(source, Path(target), size):
                os.pwrite(fd, chunk, offset)
            os.fsync(fd)
        finally:
            os.close(fd)

    def exists(self, name: str) -> bool:
        return os.path.lexists(self.path_for(name))


def backend_class(name: str) -> type[Backend]:
    if name not in BACKENDS:
        raise VlxError(f"unknown storage backend {name!r} (choose from {', '.join(BACKENDS)})")
    module = importlib.import_module(f"virtualinux.storage.{name.replace('-', '_')}")
    return module.BACKEND


def backend_for(volume: Volume) -> Backend:
    cls = backend_class(volume.backend)
    return cls(cls.pool_of(volume))


# Helpers the file-based backends share.

def file_open_for_writing(path: str) -> bool:
    """True if any process holds `path` open for writing.

    The kernel grants a read lease only while nobody has the file open for writing (tgtd
    serving it read-write counts), so trying for one asks exactly our question, race-free at
    that instant, without scanning /proc.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
    except OSError as err:
        if err.errno == errno.EAGAIN:
            return True
        if err.errno in (errno.EACCES, errno.EPERM):
            raise VlxError(f"cannot tell whether {path} is open for writing: only its owner "
                           "or root may ask (run vlx as root)") from None
        raise
    else:
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_UNLCK)
        return False
    finally:
        os.close(fd)


def free_bytes(directory: str) -> int:
    stat = os.statvfs(directory)
    return stat.f_bavail * stat.f_frsize


def allocated_bytes(path: str) -> int:
    return os.stat(path).st_blocks * 512


def make_all_or_none(targets: Sequence[str], make_one: Callable[[str], None], pool: str,
                     what: str) -> None:
    """`make_one(target)` for every target, then the pool directory synced; on any fault the
    ones made are removed again (NoSpace when the pool filled up)."""
    made: list[str] = []
    try:
        for target in targets:
            make_one(target)
            made.append(target)
        fsync_directory(pool)
    except BaseException as err:
        for path in made:
            os.unlink(path)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            raise NoSpace(f"no space left in pool {pool} after {len(made)} of {len(targets)} "
                          f"{what}; none kept") from None
        raise


def fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of each region of the first `size` bytes of `fd` that may hold data,
    by SEEK_DATA/SEEK_HOLE: holes are never read. Where the file system cannot say (EINVAL),
    the whole range is one extent."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as err:
            if err.errno == errno.ENXIO:       # only a hole is left
                return
            if err.errno == errno.EINVAL:
                yield offset, size - offset
                return
            raise
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end - start
        offset = end


# progress(bytes of data done, bytes of data in all): called as a copy goes on.
Progress = Callable[[int, int], None]


def copy_sparse(source: Path, target_fd: int, size: int, progress: Progress | None = None) -> None:
    """Copy `size` bytes of `source` to `target_fd`, reading only its data extents and skipping
    (not writing) zero chunks, so a thin target stays thin and a sparse 50 GiB disk holding
    30 MB costs 30 MB of reads. Raises NoSpace if the target fills up."""
    zero = bytes(CHUNK)
    with open(source, "rb") as src:
        extents = list(data_extents(src.fileno(), size))
        total = sum(length for _, length in extents)
        done = 0
        if progress:
            progress(0, total)
        for start, length in extents:
            offset, end = start, start + length
            while offset < end:
                chunk = os.pread(src.fileno(), min(CHUNK, end - offset), offset)
                if not chunk:
                    break
                if chunk != zero[:len(chunk)]:
                    try:
                        os.pwrite(target_fd, chunk, offset)
                    except OSError as err:
                        if err.errno == errno.ENOSPC:
                            raise NoSpace("no space left in the pool") from None
                        raise
                offset += len(chunk)
                done += len(chunk)
                if progress:
                    progress(done, total)


def _chunk_offsets(fd: int, size: int) -> Iterator[int]:
    for start, length in data_extents(fd, size):
        yield from range(start - start % CHUNK, start + length, CHUNK)


def changed_chunks(source: Path, base: Path, size: int) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes of `source`) for each CHUNK of the first `size` bytes where `source`
    differs from `base` (past its end, `base` reads as zeros). Only chunks where either file
    may hold data are read: a chunk that is a hole in both is zero in both."""
    with open(source, "rb") as src, open(base, "rb") as ref:
        offsets = sorted(set(_chunk_offsets(src.fileno(), size))
                         | set(_chunk_offsets(ref.fileno(), size)))
        for offset in offsets:
            length = min(CHUNK, size - offset)
            new = os.pread(src.fileno(), length, offset).ljust(length, b"\0")
            if new != os.pread(ref.fileno(), length, offset).ljust(length, b"\0"):
                yield offset, new


def sparse_sha256(path: Path | str) -> str:
    """A SHA-256 of a file's contents that reads only its data extents: over the size, then
    each non-zero CHUNK of a fixed grid with its offset. Holes and zero chunks count alike,
    so the same bytes give the same hash whether stored sparse or not."""
    digest = hashlib.sha256()
    zero = bytes(CHUNK)
    with open(path, "rb") as handle:
        fd = handle.fileno()
        size = os.fstat(fd).st_size
        digest.update(f"sparse-sha256 {size} {CHUNK}\n".encode())
        next_chunk = 0
        for start, length in data_extents(fd, size):
            offset = max(start - start % CHUNK, next_chunk)
            while offset < start + length:
                chunk = os.pread(fd, min(CHUNK, size - offset), offset)
                if chunk != zero[:len(chunk)]:
                    digest.update(offset.to_bytes(8, "big"))
                    digest.update(chunk)
                offset += CHUNK
            next_chunk = offset
    return digest.hexdigest()


def check_image(image: Path) -> int:
    """The size of a raw image file or block device, or VlxError if it cannot be read."""
    try:
        with open(image, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
    except OSError as err:
        raise VlxError(f"cannot read image {image}: {err.strerror}") from None
    if size == 0:
        raise VlxError(f"image {image} is empty")
    return size
