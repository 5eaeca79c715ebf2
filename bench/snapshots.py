"""Bench: N snapshot volumes of a 1 GiB golden image, by `vlx volume snapshot` and by plain
full copies (`cp --reflink=never`), side by side, plus the time to export them over iSCSI.

    sudo .venv/bin/python -m virtualinux.bench.snapshots [--sizes 10,100,1000] [--golden-mib 1024]

Everything happens on a btrfs file system in a sparse file, loop-mounted in a temp directory,
with a private tgtd in a lab namespace (198.18.0.11); all of it is removed at the end, also on
failure. Time is wall time of the whole `vlx` command (Python start-up and the database
transaction included); space is what the file system reports used, after a sync, per volume.
Full copies run for N=10 only: N=100 of 1 GiB would need 100 GiB, more than these machines'
disks hold (`--cp-sizes` changes that).
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

MIB = 1 << 20
PORTAL = "198.18.0.11:3260"
CONTROL_PORT = 32760
REPEATS = 3
GOAL_RATIO = 3.0
GOAL_SECONDS = 10.0
GOAL_BYTES_PER_SNAPSHOT = 1_000_000


def vlx_command() -> list[str]:
    script = Path(sys.executable).with_name("vlx")
    return [str(script)] if script.exists() else [sys.executable, "-c",
                                                  "from virtualinux.vvcm.cli import main; "
                                                  "import sys; sys.exit(main())"]


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


def run(sizes: list[int], cp_sizes: list[int], golden_mib: int, workdir: Path) -> list[dict]:
    vlx = vlx_command()
    rows = []
    pool_size = (golden_mib * MIB) * (max(cp_sizes, default=0) + 2) + 4096 * MIB
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
                # Best of REPEATS: the machine is shared (2 cores), and what we want is
                # what the command costs, not what a neighbour's burst costs.
                times = []
                for attempt in range(REPEATS):
                    if attempt:
                        timed(vlx + ["volume", "remove", *names], env)
                    before = used_bytes(pool)
                    times.append(timed(vlx + ["volume", "snapshot", "node", "--count",
                                              str(count)], env))
                    space = used_bytes(pool) - before
                seconds = min(times)
                export = timed(vlx + ["volume", "export", "--portal", PORTAL, *names], env)
                # tgtd restarted: every export comes back from the database.
                timed(vlx + ["storage", "stop", "--portal", PORTAL], env)
                restore = timed(vlx + ["storage", "serve", "--portal", PORTAL,
                                       "--control-port", str(CONTROL_PORT), "--netns",
                                       san.name], env)
                timed(vlx + ["volume", "unexport", *names], env)
                timed(vlx + ["volume", "remove", *names], env)
                row = {"n": count, "vlx_s": seconds, "vlx_max_s": max(times),
                       "vlx_bytes": space / count,
                       "export_s": export, "restore_s": restore}
                if count in cp_sizes:
                    copies = pool / "copies"
                    copies.mkdir()
                    before = used_bytes(pool)
                    start = time.perf_counter()
                    for index in range(count):
                        subprocess.run(["cp", "--reflink=never", str(pool / "node.img"),
                                        str(copies / f"{index}.img")], check=True)
                    subprocess.run(["sync", "-f", str(copies)], check=True)
                    row["cp_s"] = time.perf_counter() - start
                    row["cp_bytes"] = (used_bytes(pool) - before) / count
                    shutil.rmtree(copies)
                rows.append(row)
                print(f"N={count}: done", file=sys.stderr)
        finally:
            subprocess.run(vlx + ["storage", "stop", "--portal", PORTAL], env=env,
                           capture_output=True)
    return rows


def report(rows: list[dict], golden_mib: int) -> bool:
    print(f"\nsnapshots of a {golden_mib} MiB golden on loop-mounted btrfs (2 cores)\n")
    print(f"vlx time: best (worst) of {REPEATS} runs of the whole command; load average "
          f"at the end {os.getloadavg()[0]:.1f} (others share this machine)\n")
    print("| N | vlx volume snapshot | space per snapshot | cp --reflink=never | space per copy "
          "| cp / vlx | export (vlx volume export) | re-export after tgtd restart |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        cp_s = f"{row['cp_s']:.2f} s" if "cp_s" in row else "not run"
        cp_b = f"{row['cp_bytes'] / MIB:.0f} MiB" if "cp_bytes" in row else "-"
        ratio = f"{row['cp_s'] / row['vlx_s']:.0f}x" if "cp_s" in row else "-"
        print(f"| {row['n']} | {row['vlx_s']:.2f} s ({row['vlx_max_s']:.2f}) | "
              f"{row['vlx_bytes'] / 1024:.1f} KiB | "
              f"{cp_s} | {cp_b} | {ratio} | {row['export_s']:.2f} s | "
              f"{row['restore_s']:.2f} s |")
    by_n = {row["n"]: row for row in rows}
    ok = True
    if 10 in by_n and 1000 in by_n:
        ratio = by_n[1000]["vlx_s"] / by_n[10]["vlx_s"]
        good = ratio <= GOAL_RATIO and by_n[1000]["vlx_s"] < GOAL_SECONDS
        ok &= good
        print(f"\ngoal N=1000 within {GOAL_RATIO:g}x of N=10 and under {GOAL_SECONDS:g} s: "
              f"{ratio:.2f}x, {by_n[1000]['vlx_s']:.2f} s -> {'met' if good else 'MISSED'}")
    worst = max(row["vlx_bytes"] for row in rows)
    good = worst < GOAL_BYTES_PER_SNAPSHOT
    ok &= good
    print(f"goal < 1 MB per unwritten snapshot: worst {worst / 1000:.1f} kB -> "
          f"{'met' if good else 'MISSED'}")
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10,100,1000")
    parser.add_argument("--cp-sizes", default="10")
    parser.add_argument("--golden-mib", type=int, default=1024)
    parser.add_argument("--workdir", type=Path, default=Path("/var/tmp"))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (loop mount, network namespace, tgtd)", file=sys.stderr)
        return 2
    sizes = [int(n) for n in args.sizes.split(",")]
    cp_sizes = [int(n) for n in args.cp_sizes.split(",") if n]
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="vlx-bench-") as workdir:
        rows = run(sizes, cp_sizes, args.golden_mib, Path(workdir))
    return 0 if report(rows, args.golden_mib) else 1


if __name__ == "__main__":
    sys.exit(main())
