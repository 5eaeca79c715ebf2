"""A deterministic writer of "newc" cpio archives, the format the kernel unpacks as an initramfs.

Used for the per-node archive appended after the shared initrd (a few private files, so its
CHAP secret stays off the kernel command line) and by image/ for the tiny lab initramfs, which
needs directories, symlinks (busybox applets) and device nodes (/dev/console must exist before
/init runs, or the kernel starts /init with no console). Building the archive in Python needs
no root for the device nodes and gives the same bytes on every run and every replica: owner,
inode numbers and mtime are fixed.
"""

from __future__ import annotations

import dataclasses
import stat
from collections.abc import Iterable

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str          # path inside the archive, without a leading "/"; parents first
    mode: int          # full st_mode, e.g. stat.S_IFDIR | 0o755
    data: bytes = b""  # file contents, or the target of a symlink
    rdev: tuple[int, int] = (0, 0)  # (major, minor) of a device node


def directory(name: str, perm: int = 0o755) -> Entry:
    return Entry(name, stat.S_IFDIR | perm)


def regular(name: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(name, stat.S_IFREG | perm, data)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, stat.S_IFLNK | 0o777, target.encode())


def char_device(name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(name, stat.S_IFCHR | perm, rdev=(major, minor))


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _header(inode: int, entry: Entry) -> bytes:
    name = entry.name.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (inode, entry.mode, 0, 0, nlink, 0, len(entry.data), 0, 0,
              entry.rdev[0], entry.rdev[1], len(name), 0)
    header = NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)
    return header + name + _pad4(len(header) + len(name))


def archive(entries: Iterable[Entry], align: int = 4) -> bytes:
    """The archive of `entries` in the given order, closed by the trailer and padded to a
    multiple of `align` bytes (512 keeps it appendable after an initrd padded the same way,
    LAB.md's `truncate -s %512`)."""
    parts: list[bytes] = []
    names: set[str] = set()
    inode = 0
    for inode, entry in enumerate(entries, start=1):
        if entry.name in names:
            raise ValueError(f"cpio: {entry.name!r} listed twice")
        names.add(entry.name)
        parts += [_header(inode, entry), entry.data, _pad4(len(entry.data))]
    parts.append(_header(inode + 1, Entry(TRAILER, 0)))
    body = b"".join(parts)
    return body + b"\0" * (-len(body) % align)
