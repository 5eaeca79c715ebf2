"""A deterministic writer of "newc" cpio archives, the format the Linux kernel unpacks as an
initramfs. Used for the small per-node archive appended after the shared initrd.

Every header field that could vary between runs (mtime, inode numbers, owner) is fixed, so the
same entries always give the same bytes on every replica.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"
# The kernel needs nothing past 4-byte alignment between archives; whole 512-byte blocks also
# keep the archive appendable after anything padded the same way (LAB.md: `truncate -s %512`).
ARCHIVE_ALIGN = 512


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str         # relative path inside the archive, parents listed before children
    mode: int         # full st_mode: 0o040755 for a directory, 0o100600 for a private file
    data: bytes = b""


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def _header(inode: int, entry: Entry) -> bytes:
    name = entry.name.encode() + b"\0"
    fields = (inode, entry.mode, 0, 0, 2 if entry.mode & 0o040000 else 1, 0, len(entry.data),
              0, 0, 0, 0, len(name), 0)
    header = NEWC_MAGIC + b"".join(b"%08X" % value for value in fields)
    return header + name + _pad4(len(header) + len(name))


def archive(entries: Iterable[Entry]) -> bytes:
    parts: list[bytes] = []
    inode = 0
    for inode, entry in enumerate(entries, start=1):
        parts += [_header(inode, entry), entry.data, _pad4(len(entry.data))]
    parts.append(_header(inode + 1, Entry(TRAILER, 0)))
    body = b"".join(parts)
    return body + b"\0" * (-len(body) % ARCHIVE_ALIGN)
