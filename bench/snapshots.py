"""Bench: N snapshot volumes of a 1 GiB golden image, by `vlx volume snapshot` and by a plain
`cp --reflink=always` loop (the peer: what one would script by hand), side by side at every N,
plus the time to export them over iSCSI.

    sudo .venv/bin/python -m virtualinux.bench.snapshots [--sizes 10,100,1000] [--repeat 3]
        [--golden-mib 1024] [--full-copy-sizes 10] [--json FILE]

Everything happens on a btrfs file system in a sparse file, loop-mounted in a temp directory,
with a private tgtd in a lab namespace (198.18.0.11); all of it is removed at the end, also on
failure. Both sides get the same handling: the same number of interleaved repeats, each timed
as wall time of the whole command (ours: Python start-up and the database transaction
included) plus a `sync -f` of the pool; space is what the file system reports used, after a
sync, per volume. Full copies (`cp --reflink=never`) run only at `--full-copy-sizes`: N=100 of
1 GiB would need 100 GiB, more than these machines' disks hold.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from virtualinux.vm_test.netns import Netns
from virtualinux.vvcm.command import vlx_command

from . import common
from .common import Stat

MIB = 1 << 20
PORTAL = "198.18.0.11:3260"
CONTROL_PORT = 32760
GOAL_RATIO = 3.0
GOAL_SECONDS = 10.0
GOAL_BYTES_PER_SNAPSHOT = 1_000_000


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"bench: {' '.join(cmd[:4])} ... failed: {result.stderr.strip()}")
    return elapsed


def used_bytes(mountpoint: Path) -> int:
    subprocess.run(["btrfs", "filesystem", "sync", str(mountpoint)], check=True,
                   capture_output=True)
    stat = os.statvfs(mountpoint)
    return (stat.f_blocks - stat.f_bfree) * stat.f_frsize


def inventory(path: Path, nodes: int) -> Path:
    lines = ['[cluster]', 'name = "bench"', 'domain = "bench.lab"', 'cidr = "198.18.0.0/21"',
             'gateway_vip = "198.18.7.254"']
    for index in range(1, nodes + 1):
        lines += ["[[node]]", f'name = "node{index}"',
                  f'mac = "52:54:00:01:{index // 256:02x}:{index % 256:02x}"',
                  f'ip = "198.18.{index // 250}.{index % 250 + 1}"', "cpus = 1",
                  'memory = "1GiB"']
    path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def btrfs(backing: Path, size: int, mountpoint: Path):
    with open(backing, "wb") as handle:
        handle.truncate(size)
    subprocess.run(["mkfs.btrfs", "-q", str(backing)], check=True, capture_output=True)
    mountpoint.mkdir()
    subprocess.run(["mount", "-o", "loop", str(backing), str(mountpoint)], check=True)
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mountpoint)], capture_output=True)
        for device in subprocess.run(["losetup", "-n", "-O", "NAME", "-j", str(backing)],
                                     capture_output=True, text=True).stdout.split():
            subprocess.run(["losetup", "-d", device], capture_output=True)


def write_golden(path: Path, mib: int) -> None:
    # Random data: nothing for the file system to compress or find as zero.
    with open(path, "wb") as handle:
        for _ in range(mib):
            handle.write(os.urandom(MIB))


def synced(seconds: float, pool: Path) -> float:
    """`seconds` plus a sync of the pool: both sides are timed until their data is down."""
    start = time.perf_counter()
    subprocess.run(["sync", "-f", str(pool)], check=True)
    return seconds + time.perf_counter() - start


def copies(pool: Path, count: int, reflink: str) -> float:
    """The peer: a plain `cp` loop making `count` copies of the golden volume's file."""
    target = pool / f"copies-{reflink}"
    target.mkdir()
    start = time.perf_counter()
    for index in range(count):
        subprocess.run(["cp", f"--reflink={reflink}", str(pool / "node.img"),
                        str(target / f"{index}.img")], check=True)
    return synced(time.perf_counter() - start, pool)


def run(sizes: list[int], full_sizes: list[int], golden_mib: int, repeat: int,
        workdir: Path) -> list[dict]:
    vlx = vlx_command()
    rows = []
    pool_size = (golden_mib * MIB) * (max(full_sizes, default=0) + 2) + 4096 * MIB
    with btrfs(workdir / "pool.fs", pool_size, workdir / "pool") as pool, \
            Netns(prefix="vb") as netns:
        env = {**os.environ, "VLX_DB": str(workdir / "cluster.db"), "VLX_POOL": str(pool),
               "VLX_STORAGE_STATE": str(workdir / "state")}
        san = netns.namespace("san")
        san.add_address("lo", "198.18.0.11/24")
        subprocess.run(vlx + ["db", "init"], env=env, check=True, capture_output=True)
        subprocess.run(vlx + ["db", "import", str(inventory(workdir / "c.toml", max(sizes)))],
                       env=env, check=True, capture_output=True)
        golden = pool / "golden.raw"
        write_golden(golden, golden_mib)
        subprocess.run(vlx + ["volume", "golden", "add", "node", "--from", str(golden)],
                       env=env, check=True, capture_output=True)
        golden.unlink()
        try:
            timed(vlx + ["storage", "serve", "--portal", PORTAL, "--control-port",
                         str(CONTROL_PORT), "--netns", san.name], env)
            for count in sizes:
                names = [f"node{i}-root" for i in range(1, count + 1)]
                peers = ["always"] + (["never"] if count in full_sizes else [])
                results: dict[str, list[float]] = {"vlx": [], **{p: [] for p in peers}}
                space: dict[str, float] = {}
                # Interleaved repeats, each timed until a sync has put its data down.
                for attempt in range(repeat):
                    if attempt:
                        timed(vlx + ["volume", "remove", *names], env)
                    before = used_bytes(pool)
                    results["vlx"].append(synced(timed(vlx + [
                        "volume", "snapshot", "node", "--count", str(count)], env), pool))
                    space["vlx"] = (used_bytes(pool) - before) / count
                    for reflink in peers:
                        before = used_bytes(pool)
                        results[reflink].append(copies(pool, count, reflink))
                        space[reflink] = (used_bytes(pool) - before) / count
                        shutil.rmtree(pool / f"copies-{reflink}")
                export = timed(vlx + ["volume", "export", "--portal", PORTAL, *names], env)
                # tgtd restarted: every export comes back from the database.
                timed(vlx + ["storage", "stop", "--portal", PORTAL], env)
                restore = timed(vlx + ["storage", "serve", "--portal", PORTAL,
                                       "--control-port", str(CONTROL_PORT), "--netns",
                                       san.name], env)
                timed(vlx + ["volume", "unexport", *names], env)
                timed(vlx + ["volume", "remove", *names], env)
                rows.append({"n": count, "seconds": {k: Stat.of(v, 2) for k, v in results.items()},
                             "bytes": space, "export_s": export, "restore_s": restore})
                print(f"N={count}: done", file=sys.stderr)
        finally:
            subprocess.run(vlx + ["storage", "stop", "--portal", PORTAL], env=env,
                           capture_output=True)
    return rows


def report(rows: list[dict], golden_mib: int, repeat: int, out: common.Report) -> bool:
    table = []
    for row in rows:
        seconds, space = row["seconds"], row["bytes"]
        full = seconds.get("never")
        table.append([row["n"], seconds["vlx"], f"{space['vlx'] / 1024:.1f} KiB",
                      seconds["always"], f"{space['always'] / 1024:.1f} KiB",
                      f"{seconds['always'].median / seconds['vlx'].median:.2f}x",
                      full, f"{space['never'] / MIB:.0f} MiB" if full else None,
                      f"{row['export_s']:.2f} s", f"{row['restore_s']:.2f} s"])
    out.table(f"Snapshots of a {golden_mib} MiB golden on loop-mounted btrfs, seconds "
              f"(each side timed until a sync has put its data down), {repeat} interleaved "
              "repeats", ["N", "vlx volume snapshot", "space per snapshot",
                          "cp --reflink=always loop", "space per copy", "cp loop / vlx",
                          "cp --reflink=never loop", "space per full copy",
                          "export (vlx volume export)", "re-export after tgtd restart"], table)
    by_n = {row["n"]: row["seconds"]["vlx"].median for row in rows}
    ok = True
    if 10 in by_n and 1000 in by_n:
        ratio = by_n[1000] / by_n[10]
        good = ratio <= GOAL_RATIO and by_n[1000] < GOAL_SECONDS
        ok &= good
        out.note(f"goal N=1000 within {GOAL_RATIO:g}x of N=10 and under {GOAL_SECONDS:g} s: "
                 f"{ratio:.2f}x, {by_n[1000]:.2f} s -> {'met' if good else 'MISSED'}")
    worst = max(row["bytes"]["vlx"] for row in rows)
    good = worst < GOAL_BYTES_PER_SNAPSHOT
    ok &= good
    out.note(f"goal < 1 MB per unwritten snapshot: worst {worst / 1000:.1f} kB -> "
             f"{'met' if good else 'MISSED'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--full-copy-sizes", default="",
                        help="N at which to add a `cp --reflink=never` loop too (default: none)")
    parser.add_argument("--golden-mib", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    common.add_flags(parser)
    args = parser.parse_args(argv)
    common.apply_flags(args)
    if os.geteuid() != 0:
        print("bench: needs root (loop mount, network namespace, tgtd)", file=sys.stderr)
        return 2
    sizes = [int(n) for n in args.sizes.split(",")]
    full_sizes = [int(n) for n in args.full_copy_sizes.split(",") if n]
    out = common.Report("snapshots", argv if argv is not None else sys.argv[1:])
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="vlx-bench-") as workdir:
        rows = run(sizes, full_sizes, args.golden_mib, args.repeat, Path(workdir))
    ok = report(rows, args.golden_mib, args.repeat, out)
    out.finish(args.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(common.run(main))
