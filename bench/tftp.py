"""Benchmark: our TFTP service against dnsmasq's and atftpd's, the same files to the same
clients, in one run.

    sudo .venv/bin/python -m virtualinux.bench.tftp [--size-mb 10] [--repeat 3] [--json FILE]

Inside network namespaces made for the run: a client namespace holding a bridge, and a server
namespace plugged into it with three addresses, ours on 198.18.0.1, dnsmasq on 198.18.0.2 and
atftpd on 198.18.0.3, all serving one directory, all pinned to CPU 1 (clients on CPU 0).
Two tables:

- speed, lock-step (RFC 1350/2348, what every server does): curl at blksize 512 and 1468, one
  client, then 20 and 50 at once; the ratio is ours against the best peer;
- a feature, windowsize (RFC 7440, what iPXE-class clients may ask for): atftp with windowsize
  8 and 16. dnsmasq has no windowsize and answers lock-step; atftpd is the windowed peer and
  the ratio is against it.

Cells are aggregate MB/s, median (min-max) of `--repeat` runs, servers interleaved, and a third
table gives each server's CPU time per MB sent (what a busy shared machine moves least). Every
client run is bounded in time. `BenchLab` is shared with bench/http.py.
"""


from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from virtualinux.bootsvc.tftp import MAX_WORKERS
from virtualinux.vm_test.netns import Netns
from virtualinux.vvcm import inventory
from virtualinux.vvcm.db import Database

from . import common
from .common import CLIENT_CPU, SERVER_CPU, Stat, cpu_seconds, pinned

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cluster.toml"
OURS, ANCHOR, THIRD, CLIENT = "198.18.0.1", "198.18.0.2", "198.18.0.3", "198.18.0.200"
CLIENT_TIMEOUT = 300        # seconds for one row, all clients together


class BenchLab:
    """Namespaces, a served directory with random files, and server processes; all removed
    on exit."""

    def __init__(self, file_sizes: dict[str, int]):
        self.file_sizes = file_sizes
        self.netns = Netns(prefix="vb")
        self.workdir = Path(tempfile.mkdtemp(prefix="vlx-bench-"))
        self.tree = self.workdir / "tree"
        self.processes: list[subprocess.Popen] = []
        self.pids: dict[str, int] = {}      # server address -> its process, for CPU time
        self.cpu_ms_per_mb: dict[str, Stat] = {}   # of the last `rates` call

    def __enter__(self) -> BenchLab:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _setup(self) -> None:
        for name, size in self.file_sizes.items():
            path = self.tree / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(os.urandom(size))
        database = Database.create(self.workdir / "cluster.db")
        database.update("db import", "bench", lambda c: inventory.apply(
            c, inventory.load(EXAMPLE), "bench"))
        self.client = self.netns.namespace("client")
        bridge = self.netns.bridge(self.client)
        self.client.add_address(bridge, f"{CLIENT}/24")
        self.server = self.netns.namespace("server")
        self.netns.plug(self.client, bridge, self.server, address=f"{OURS}/24")
        for address in (ANCHOR, THIRD):
            self.server.add_address("eth0", f"{address}/24")

    def start_ours(self, *services: str, settings: dict[str, object] | None = None) -> None:
        self.processes.append(common.start_ours(self.server, {
            "db": self.workdir / "cluster.db", "root": self.tree, "address": OURS,
            "services": services, "settings": settings}))
        self.pids[OURS] = self.processes[-1].pid

    def start_anchor(self, cmd: Sequence[str], port: int, udp: bool = False,
                     address: str = ANCHOR) -> None:
        self.processes.append(self.server.popen(pinned(SERVER_CPU, cmd),
                                                stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL))
        self.pids[address] = self.processes[-1].pid
        wait_listening(self.server, address, port, udp)

    def timed(self, commands: Sequence[Sequence[str]]) -> float:
        """Run the client commands at once in the client namespace; seconds until all are done."""
        start = time.perf_counter()
        cmds = [pinned(CLIENT_CPU, cmd) for cmd in commands]
        running = [self.client.popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True) for cmd in cmds]
        deadline = start + CLIENT_TIMEOUT
        failures = []
        for cmd, process in zip(cmds, running, strict=True):
            try:
                out, err = process.communicate(timeout=max(1.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                process.kill()
                out, err = process.communicate()
                failures.append(f"timed out: {cmd}")
                continue
            if process.returncode != 0:
                failures.append(f"exit {process.returncode}: {cmd[-3:]} {err[-200:]}")
        elapsed = time.perf_counter() - start
        if failures:
            raise RuntimeError("; ".join(failures[:3]))
        return elapsed

    def rates(self, repeat: int, commands: dict[str, Sequence[Sequence[str]]],
              nbytes: int) -> dict[str, Stat]:
        """Aggregate MB/s per server over `repeat` interleaved runs; the server's CPU time
        per MB sent goes to `cpu_ms_per_mb` (the figure a busy shared machine moves least)."""
        cpu: dict[str, list[float]] = {server: [] for server in commands}

        def rate(server: str, cmds: Sequence[Sequence[str]]) -> float:
            pid = self.pids.get(server)
            before = cpu_seconds(pid) if pid else 0.0
            seconds = self.timed(cmds)
            if pid:
                cpu[server].append((cpu_seconds(pid) - before) * 1e3 / (len(cmds) * nbytes / 1e6))
            return len(cmds) * nbytes / seconds / 1e6

        runs: dict[str, Callable[[], float]] = {
            server: functools.partial(rate, server, cmds) for server, cmds in commands.items()}
        rates = {server: Stat.of(values)
                 for server, values in common.interleaved(repeat, runs).items()}
        self.cpu_ms_per_mb = {server: Stat.of(values, digits=2)
                              for server, values in cpu.items() if values}
        return rates

    def close(self) -> None:
        for process in self.processes:
            common.stop(process)
        self.netns.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def wait_listening(ns, address: str, port: int, udp: bool, timeout: float = 10) -> None:
    flag = "-uln" if udp else "-tln"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f"{address}:{port} " in ns.run(["ss", flag], check=False).stdout:
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {address}:{port} after {timeout} s")


def curl_tftp(server: str, name: str, blksize: int | None) -> list[str]:
    cmd = ["curl", "-sS", "--fail", "--max-time", str(CLIENT_TIMEOUT), "-o", "/dev/null"]
    if blksize:
        cmd += ["--tftp-blksize", str(blksize)]
    return cmd + [f"tftp://{server}/{name}"]


def atftp(server: str, name: str, blksize: int, windowsize: int) -> list[str]:
    return ["timeout", str(CLIENT_TIMEOUT), "atftp", "--option", f"blksize {blksize}",
            "--option", f"windowsize {windowsize}", "-g", "-r", name, "-l", "/dev/null", server]


def ratio(ours: Stat, theirs: Stat) -> str:
    return f"{ours.median / theirs.median:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m virtualinux.bench.tftp")
    parser.add_argument("--size-mb", type=int, default=10, help="file size per client")
    parser.add_argument("--clients", default="20,50",
                        help="client counts of the many-clients rows (default: 20,50)")
    parser.add_argument("--workers", type=int, default=0,
                        help="our transfer threads, `--set tftp.workers` (default: 0, the "
                             "service's own: one per CPU it may run on, at most "
                             f"{MAX_WORKERS})")
    common.add_flags(parser)
    args = parser.parse_args(argv)
    common.apply_flags(args)
    size = args.size_mb << 20
    name = "images/bench.bin"
    many = [int(n) for n in args.clients.split(",") if n]
    lock_step = [("curl, blksize 512", 1, lambda s: curl_tftp(s, name, None)),
                 ("curl, blksize 1468", 1, lambda s: curl_tftp(s, name, 1468))]
    lock_step += [(f"{n} x curl, blksize 1468", n, lambda s: curl_tftp(s, name, 1468))
                  for n in many]
    windowed: list[tuple[str, int, Callable[[str], list[str]]]] = [
        (f"atftp, blksize 1468, windowsize {w}", 1,
         functools.partial(atftp, name=name, blksize=1468, windowsize=w)) for w in (8, 16)]
    windowed += [(f"{n} x atftp, blksize 1468, windowsize 16", n,
                  lambda s: atftp(s, name, 1468, 16)) for n in many]
    report = common.Report("tftp", argv if argv is not None else sys.argv[1:])
    speed: list[list[object]] = []
    cpu: list[list[object]] = []
    feature: list[list[object]] = []
    with BenchLab({name: size}) as lab:
        lab.start_ours("tftp", settings={"tftp.workers": args.workers})
        lab.start_anchor(["dnsmasq", "-d", "--port=0", "--enable-tftp",
                          f"--tftp-root={lab.tree}", f"--listen-address={ANCHOR}",
                          "--bind-interfaces", "--user=root", "--pid-file=",
                          "--tftp-max=200", "--log-facility=/dev/null"], 69, udp=True)
        lab.start_anchor(["atftpd", "--daemon", "--no-fork", "--bind-address", THIRD,
                          "--port", "69", "--user", "root", "--group", "root", "-m", "200",
                          "--logfile", "/dev/null", str(lab.tree)], 69, udp=True,
                         address=THIRD)
        for table, rows in ((speed, lock_step), (feature, windowed)):
            for label, clients, command in rows:
                got = lab.rates(args.repeat, {s: [command(s)] * clients
                                              for s in (OURS, ANCHOR, THIRD)}, size)
                best = got[THIRD] if table is feature else max(
                    (got[ANCHOR], got[THIRD]), key=lambda stat: stat.median)
                table.append([label, got[OURS], got[ANCHOR], got[THIRD], ratio(got[OURS], best)])
                cpu.append([label, *(lab.cpu_ms_per_mb.get(s) for s in (OURS, ANCHOR, THIRD))])
    report.table(f"TFTP speed, lock-step, {args.size_mb} MB per client, aggregate MB/s",
                 ["row", "ours", "dnsmasq", "atftpd", "ours/best peer"], speed)
    report.table("TFTP feature, windowsize (RFC 7440): dnsmasq ignores it and answers "
                 "lock-step; atftpd is the windowed peer", ["row", "ours", "dnsmasq (lock-step)",
                                                            "atftpd", "ours/atftpd"], feature)
    report.table("Server CPU time per MB sent, ms (user + system, all threads)",
                 ["row", "ours", "dnsmasq", "atftpd"], cpu)
    report.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main))
