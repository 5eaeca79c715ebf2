"""The qcow2 backend: for libvirt guests. A golden volume is a raw file; a snapshot is a qcow2
overlay whose backing file is the golden (`qemu-img create -f qcow2 -b GOLDEN -F raw`).

Every fresh overlay of one golden is byte-for-byte the same (it names its backing file, not
itself), so N snapshots cost one `qemu-img create` of a template and N clones (or ~200 KiB
copies) of it, not N processes. Overlays are for QEMU/libvirt to open; tgt cannot serve them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import tempfile
import uuid
from collections.abc import Sequence
from pathlib import Path

from virtualinux.vvcm.errors import VlxError
from virtualinux.vvcm.model import StorageBackend, Volume, VolumeKind

from .backend import CHUNK, NoSpace, free_bytes, fsync_directory
from .reflink import FICLONE, ReflinkBackend

OVERLAY_SUFFIX = ".qcow2"
OVERLAY_RESERVE = 1024 * 1024
QEMU_IO_BATCH = 256  # commands per qemu-io process: keeps the argument list short


def overlay_command(golden_path: str, overlay: str, size: int | None = None) -> list[str]:
    cmd = ["qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.abspath(golden_path),
           "-F", "raw", overlay]
    return cmd + ([str(size)] if size is not None else [])


def run_qemu_img(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        message = result.stderr.strip() or f"exit code {result.returncode}"
        if "No space left" in message:
            raise NoSpace(f"no space left in the pool ({message})")
        raise VlxError(f"{' '.join(cmd[:2])} failed: {message}")


class Qcow2Backend(ReflinkBackend):
    name = "qcow2"

    def path_for(self, name: str) -> str:
        return os.path.join(self.pool, name + OVERLAY_SUFFIX)

    def golden_path(self, name: str) -> str:
        return super().path_for(name)

    def exists(self, name: str) -> bool:
        return os.path.lexists(self.path_for(name)) or os.path.lexists(self.golden_path(name))

    def _probe_reflink(self, path: str) -> None:
        """Overlays need no reflink: any file system will do."""

    def snapshot(self, golden: Volume, names: Sequence[str]) -> list[str]:
        targets = self._new_paths(names)
        if free_bytes(self.pool) < OVERLAY_RESERVE * len(targets):
            raise NoSpace(f"no space left in pool {self.pool} for {len(targets)} overlays")
        template = os.path.join(self.pool, f".template-{uuid.uuid4().hex[:8]}{OVERLAY_SUFFIX}")
        run_qemu_img(overlay_command(golden.path, template))
        made: list[str] = []
        try:
            with open(template, "rb") as src:
                header = src.read()
                for target in targets:
                    self._copy_template(src.fileno(), header, target)
                    made.append(target)
            fsync_directory(self.pool)
        except BaseException as err:
            for path in made:
                os.unlink(path)
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                raise NoSpace(f"no space left in pool {self.pool}; no overlay kept") from None
            raise
        finally:
            os.unlink(template)
        return targets

    @staticmethod
    def _copy_template(source_fd: int, data: bytes, target: str) -> None:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                fcntl.ioctl(fd, FICLONE, source_fd)
            except OSError:
                os.write(fd, data)  # no reflink here: the overlay is small, copy it
        except BaseException:
            os.close(fd)
            os.unlink(target)
            raise
        os.close(fd)

    def grow(self, volume: Volume, size: int) -> None:
        if volume.kind == "golden":
            super().grow(volume, size)
        else:
            run_qemu_img(["qemu-img", "resize", "-q", "-f", "qcow2", volume.path, str(size)])

    def export_path(self, volume: Volume) -> str:
        if volume.kind == "golden":
            return volume.path
        raise VlxError(f"volume {volume.name} is a qcow2 overlay, which tgt cannot serve: "
                       "qcow2 volumes are for libvirt guests; export a reflink or lvm-thin "
                       "volume over iSCSI")

    def backup_to(self, volume: Volume, target: Path) -> None:
        if volume.kind == "golden":
            return super().backup_to(volume, target)
        run_qemu_img(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", "-S", "4k",
                      volume.path, str(target)])

    def restore_snapshot(self, golden: Volume, name: str, source: Path, size: int) -> str:
        """A fresh overlay of `golden`, then only the chunks of `source` that differ from the
        golden written into it (by qemu-io, each from a small file of its own): unchanged
        data stays in the golden, as it was before the backup."""
        path = self.snapshot(golden, [name])[0]
        volume = Volume(name=name, kind=VolumeKind.SNAPSHOT, backend=StorageBackend(self.name),
                        path=path,
                        size=golden.size, origin=golden.name)
        try:
            if size > golden.size:
                self.grow(volume, size)
            with tempfile.TemporaryDirectory(dir=self.pool, prefix=".restore-") as scratch:
                commands = []
                with open(source, "rb") as src, open(golden.path, "rb") as base:
                    offset = 0
                    while chunk := src.read(CHUNK):
                        if base.read(len(chunk)) != chunk:
                            piece = os.path.join(scratch, str(offset))
                            with open(piece, "wb") as out:
                                out.write(chunk)
                            commands.append(f"write -q -s {piece} {offset} {len(chunk)}")
                        offset += len(chunk)
                for first in range(0, len(commands), QEMU_IO_BATCH):
                    _run_qemu_io(path, commands[first:first + QEMU_IO_BATCH])
        except BaseException as err:
            self.remove(volume)
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:
                raise NoSpace(f"no space left in the pool restoring {name}; not kept") from None
            raise
        return path


def _run_qemu_io(image: str, commands: list[str]) -> None:
    argv = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        argv += ["-c", command]
    result = subprocess.run(argv + [image], capture_output=True, text=True)
    # qemu-io reports a failed command ("write failed: ...") and may still exit 0.
    failed = result.returncode != 0 or "failed" in (result.stdout + result.stderr)
    if failed:
        message = (result.stderr or result.stdout).strip()[-300:]
        if "No space left" in message:
            raise NoSpace(f"no space left in the pool ({message})")
        raise VlxError(f"qemu-io into {image} failed: {message}")


BACKEND = Qcow2Backend
