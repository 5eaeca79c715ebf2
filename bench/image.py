"""Image build benchmark: our node/guest builds against a plain `disk-image-create
debian-minimal` of the same release, cold and again, with the sizes, in one run.

    python -m virtualinux.bench.image [--kinds guest,node] [--release bookworm] [--json FILE]

"Cold" starts from an empty cache for both sides (debootstrap runs, every package is
fetched). "Again" repeats the same build: ours finds its cache entry by the input hash and
returns it; plain DIB has no output cache and builds again (with its debootstrap tarball
cached from the cold run). Sizes: plain DIB's tar; ours, the artifacts (kernel, initrd, ext4
root image as allocated on disk, and its apparent size). Needs root; takes minutes (about
2 min for plain DIB, 3 for our guest, 5-6 for our node on a 2-core machine), so each row is
run once (no --repeat); the table goes out through bench/common.py like every bench's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from virtualinux.image import dib
from virtualinux.image.build import REPOSITORY, build_image, image_spec, wheel_sources

from . import common


@dataclasses.dataclass(frozen=True)
class Row:
    what: str
    cold_s: float
    again_s: float
    size_mb: float           # on disk (allocated blocks)
    apparent_mb: float


def allocated_mb(paths: list[Path]) -> float:
    return sum(path.stat().st_blocks * 512 for path in paths) / 1e6


def apparent_mb(paths: list[Path]) -> float:
    return sum(path.stat().st_size for path in paths) / 1e6


def plain_dib(release: str, work: Path) -> Row:
    work.mkdir(parents=True)
    env = dib.environment(release, dib.Mirrors(), work / "dib-cache", {})
    env.pop("ELEMENTS_PATH")
    times = []
    tool = shutil.which("disk-image-create", path=env["PATH"])
    if tool is None:
        raise RuntimeError("no disk-image-create on PATH (pip install diskimage-builder)")
    for run in (1, 2):
        output = work / f"plain{run}"
        started = time.monotonic()
        with (work / f"plain{run}.log").open("w") as log:
            subprocess.run([tool, "-t", "tar",
                            "-o", str(output), "debian-minimal"], env=env, check=True,
                           stdout=log, stderr=subprocess.STDOUT)
        times.append(time.monotonic() - started)
    tar = [work / "plain2.tar"]
    return Row(f"plain disk-image-create debian-minimal ({release}, tar)", times[0], times[1],
               allocated_mb(tar), apparent_mb(tar))


def frozen_source(work: Path) -> Path:
    """A copy of the checkout's packaged files: the node image installs the code, so its key
    follows the code, and a shared checkout edited during the run would make "again" a
    rebuild instead of a cache hit."""
    copy = work / "source"
    for name in wheel_sources(REPOSITORY):
        if (REPOSITORY / name).is_dir():
            shutil.copytree(REPOSITORY / name, copy / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            copy.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPOSITORY / name, copy / name)
    return copy


def ours(kind: str, release: str, work: Path) -> Row:
    spec = image_spec(kind, release=release, source=frozen_source(work))
    cache_dir = work / "cache"
    started = time.monotonic()
    entry = build_image(spec, cache_dir=cache_dir, progress=lambda message: None)
    cold = time.monotonic() - started
    started = time.monotonic()
    again_entry = build_image(spec, cache_dir=cache_dir, progress=lambda message: None)
    again = time.monotonic() - started
    if again_entry != entry:
        raise SystemExit(f"bench: the repeated {kind} build made a new entry {again_entry}")
    files = [entry / name for name in ("vmlinuz", "initrd.img", "root.img")]
    return Row(f"vlx image build {kind} (kernel, initrd, ext4 root)", cold, again,
               allocated_mb(files), apparent_mb(files))


def print_row(row: Row, anchor: Row) -> None:
    # Each row as soon as it is measured: a run takes a quarter of an hour.
    print(f"{row.what:<58} {row.cold_s:8.1f} {row.again_s:8.1f} {row.size_mb:8.0f} "
          f"{row.apparent_mb:11.0f} {row.cold_s / anchor.cold_s:10.2f} "
          f"{row.again_s / anchor.again_s:11.3f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default="guest,node")
    parser.add_argument("--release", default="bookworm")
    parser.add_argument("--json", type=Path, metavar="FILE",
                        help="also write the table as JSON to FILE")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/image needs root (diskimage-builder chroots)", file=sys.stderr)
        return 2
    common.PIN = False   # builds use both CPUs: nothing here is pinned
    report = common.Report("image", argv if argv is not None else sys.argv[1:])
    rows = []
    with tempfile.TemporaryDirectory(prefix="vlx-bench-image-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        anchor = plain_dib(args.release, work / "plain")
        print(f"{'build':<58} {'cold s':>8} {'again s':>8} {'disk MB':>8} "
              f"{'apparent MB':>11} {'cold/plain':>10} {'again/plain':>11}", flush=True)
        print_row(anchor, anchor)
        rows.append(anchor)
        for kind in args.kinds.split(","):
            rows.append(ours(kind, args.release, work / kind))
            print_row(rows[-1], anchor)
    report.table("Image builds, seconds and MB (one run each)",
                 ["build", "cold s", "again s", "disk MB", "apparent MB", "cold/plain",
                  "again/plain"],
                 [[row.what, f"{row.cold_s:.1f}", f"{row.again_s:.1f}", f"{row.size_mb:.0f}",
                   f"{row.apparent_mb:.0f}", f"{row.cold_s / anchor.cold_s:.2f}",
                   f"{row.again_s / anchor.again_s:.3f}"] for row in rows])
    report.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main))
