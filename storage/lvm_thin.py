"""The lvm-thin backend, for real SANs: a golden volume is a thin LV in a thin pool, and a
snapshot is a thin snapshot of it (`lvcreate --snapshot` of a thin LV: metadata only, no size,
no data copied). The pool is named `VG/THINPOOL`; volumes live at `/dev/VG/NAME` (udev's
stable name, never a dm-N device).

The commands are built by small pure functions so their shape is tested without LVM; running
them needs device-mapper (present in a Debian kernel guest, absent on our lab hosts).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from pathlib import Path

from virtualinux.vvcm.errors import VlxError
from virtualinux.vvcm.model import StorageBackend, Volume, VolumeKind

from .backend import Backend, NoSpace, check_image, copy_sparse

# A thin pool fuller than this (data or metadata) takes no new volumes: a full thin pool
# stalls every volume in it, golden included.
FULL_PERCENT = 95.0


def split_pool(pool: str) -> tuple[str, str]:
    vg, _, thin_pool = pool.partition("/")
    if not vg or not thin_pool or "/" in thin_pool:
        raise VlxError(f"lvm-thin pool {pool!r}: expected VG/THINPOOL")
    return vg, thin_pool


def create_thin_command(vg: str, thin_pool: str, name: str, size: int) -> list[str]:
    return ["lvcreate", "--yes", "--type", "thin", "--virtualsize", f"{size}b",
            "--thinpool", thin_pool, "--name", name, vg]


def snapshot_command(vg: str, golden: str, name: str) -> list[str]:
    # Thin snapshots skip activation by default; a volume we export must be active and
    # writable even though its golden is read-only.
    return ["lvcreate", "--yes", "--snapshot", "--setactivationskip", "n", "--activate", "y",
            "--permission", "rw", "--name", name, f"{vg}/{golden}"]


def readonly_command(vg: str, name: str) -> list[str]:
    return ["lvchange", "--permission", "r", f"{vg}/{name}"]


def remove_command(vg: str, name: str) -> list[str]:
    return ["lvremove", "--yes", f"{vg}/{name}"]


def grow_command(vg: str, name: str, size: int) -> list[str]:
    return ["lvextend", "--size", f"{size}b", f"{vg}/{name}"]


def report_command(vg: str, lv: str, fields: Sequence[str]) -> list[str]:
    return ["lvs", "--noheadings", "--nosuffix", "--units", "b", "--separator", "|",
            "-o", ",".join(fields), f"{vg}/{lv}"]


def run_lvm(cmd: list[str]) -> str:
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
    except FileNotFoundError:
        raise VlxError(f"{cmd[0]} not found: the lvm-thin backend needs lvm2") from None
    if result.returncode != 0:
        message = result.stderr.strip() or f"exit code {result.returncode}"
        if "insufficient free space" in message.lower() or "no space" in message.lower():
            raise NoSpace(f"no space left in the thin pool ({message})")
        raise VlxError(f"{' '.join(cmd[:2])} failed: {message}")
    return result.stdout


class LvmThinBackend(Backend):
    name = "lvm-thin"
    knows_open_mode = False

    def __init__(self, pool: str):
        super().__init__(pool)
        self.vg = pool.partition("/")[0]

    @classmethod
    def pool_of(cls, volume: Volume) -> str:
        # /dev/VG/NAME: a snapshot goes where its golden is; the VG finds the thin pool.
        return Path(volume.path).parent.name

    def path_for(self, name: str) -> str:
        return f"/dev/{self.vg}/{name}"

    def _report(self, lv: str, fields: Sequence[str]) -> list[str]:
        return [v.strip() for v in run_lvm(report_command(self.vg, lv, fields)).split("|")]

    def _check_room(self, thin_pool: str) -> None:
        data, meta = (float(v or 0) for v in self._report(thin_pool, ["data_percent",
                                                                      "metadata_percent"]))
        if max(data, meta) >= FULL_PERCENT:
            raise NoSpace(f"thin pool {self.vg}/{thin_pool} is full (data {data:g}%, "
                          f"metadata {meta:g}%)")

    def add_golden(self, name: str, image: Path) -> tuple[str, int]:
        vg, thin_pool = split_pool(self.pool)
        size = check_image(image)
        self._check_room(thin_pool)
        run_lvm(create_thin_command(vg, thin_pool, name, size))
        volume = Volume(name=name, kind=VolumeKind.GOLDEN, backend=StorageBackend(self.name),
                        path=self.path_for(name), size=size)
        try:
            fd = os.open(volume.path, os.O_WRONLY)
            try:
                copy_sparse(image, fd, size)  # a thin LV reads zeros where never written
                os.fsync(fd)
            finally:
                os.close(fd)
            run_lvm(readonly_command(vg, name))
            actual = int(self._report(name, ["lv_size"])[0])
        except BaseException:
            self.remove(volume)
            raise
        return volume.path, actual

    def snapshot(self, golden: Volume, names: Sequence[str]) -> list[str]:
        golden_lv = Path(golden.path).name
        thin_pool = self._report(golden_lv, ["pool_lv"])[0]
        if not thin_pool:
            raise VlxError(f"volume {golden.name} ({golden.path}) is not a thin LV")
        self._check_room(thin_pool)
        made: list[str] = []
        try:
            for name in names:
                run_lvm(snapshot_command(self.vg, golden_lv, name))
                made.append(name)
        except BaseException:
            for name in made:
                subprocess.run(remove_command(self.vg, name), capture_output=True)
            raise
        return [self.path_for(name) for name in names]

    def remove(self, volume: Volume) -> None:
        if os.path.lexists(volume.path):
            run_lvm(remove_command(self.vg, Path(volume.path).name))

    def grow(self, volume: Volume, size: int) -> None:
        run_lvm(grow_command(self.vg, Path(volume.path).name, size))

    def free_bytes(self) -> int | None:
        return None   # the thin pool's data_percent would need an lvs call per question

    def open_for_writing(self, volume: Volume) -> bool:
        # lv_attr's 6th character is "o" while the device is open (LVM cannot tell the mode).
        attr = self._report(Path(volume.path).name, ["lv_attr"])[0]
        return len(attr) > 5 and attr[5] == "o"


BACKEND = LvmThinBackend
