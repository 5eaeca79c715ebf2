"""Benchmark: our TFTP service against dnsmasq's, the same files to the same clients, one run.

    sudo .venv/bin/python -m virtualinux.bench.tftp [--size-mb 10] [--repeat 3]

Inside network namespaces made for the run: a client namespace holding a bridge, and a server
namespace plugged into it with two addresses, ours on 198.18.0.1 and dnsmasq on 198.18.0.2,
both serving one directory. Rows: one client (curl at blksize 512 and 1468, atftp with
windowsize 8 and 16), then 20 and 50 clients at once, curl and atftp (aggregate MB/s). Prints
a table with the ratio ours/dnsmasq per row. Every client run is bounded in time.

`BenchLab` is shared with bench/http.py.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from virtualinux.vm_test.lab import VLX
from virtualinux.vm_test.netns import Netns
from virtualinux.vvcm import inventory
from virtualinux.vvcm.db import Database

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cluster.toml"
OURS, ANCHOR, CLIENT = "198.18.0.1", "198.18.0.2", "198.18.0.200"
CLIENT_TIMEOUT = 300        # seconds for one row, all clients together
# Left alone, the scheduler sometimes puts a lock-step server on the client's CPU and sometimes
# not, and that alone changes a row 3x here. So the servers get CPU 1 and the clients CPU 0,
# like a server and its clients on different machines: every packet wakes the other side.
SERVER_CPU, CLIENT_CPU = "1", "0"


PIN = (os.cpu_count() or 1) > 1       # --no-pin: leave placement to the scheduler


def pinned(cpu: str, cmd: Sequence[str]) -> list[str]:
    return (["taskset", "-c", cpu] if PIN else []) + list(cmd)


class BenchLab:
    """Namespaces, a served directory with random files, and server processes; all removed
    on exit."""

    def __init__(self, file_sizes: dict[str, int]):
        self.file_sizes = file_sizes
        self.netns = Netns(prefix="vb")
        self.workdir = Path(tempfile.mkdtemp(prefix="vlx-bench-"))
        self.tree = self.workdir / "tree"
        self.processes: list[subprocess.Popen] = []

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
        self.server.add_address("eth0", f"{ANCHOR}/24")

    def start_ours(self, *services: str) -> None:
        # The way production runs them: `vlx bootsvc run`, one process for all services.
        process = self.server.popen(pinned(SERVER_CPU, [
            *VLX, "--db", str(self.workdir / "cluster.db"), "bootsvc", "run",
            "--interface", "eth0", "--address", OURS, "--services", ",".join(services),
            "--netboot-root", str(self.tree), "--state-dir", str(self.workdir / "state")]),
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.processes.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"our services did not start: {line!r}")

    def start_anchor(self, cmd: Sequence[str], port: int, udp: bool = False) -> None:
        self.processes.append(self.server.popen(pinned(SERVER_CPU, cmd), stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL))
        wait_listening(self.server, ANCHOR, port, udp)

    def timed(self, commands: Sequence[Sequence[str]]) -> float:
        """Run the client commands at once in the client namespace; seconds until all are done."""
        start = time.perf_counter()
        running = [self.client.popen(pinned(CLIENT_CPU, cmd), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for cmd in commands]
        deadline = start + CLIENT_TIMEOUT
        failures = []
        for process in running:
            try:
                out, err = process.communicate(timeout=max(1.0, deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                process.kill()
                out, err = process.communicate()
                failures.append(f"timed out: {process.args!r}")
                continue
            if process.returncode != 0:
                failures.append(f"exit {process.returncode}: {str(process.args)[-120:]} "
                                f"{err[-200:]}")
        elapsed = time.perf_counter() - start
        if failures:
            raise RuntimeError("; ".join(failures[:3]))
        return elapsed

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.netns.close()
        shutil.rmtree(self.workdir, ignore_errors=True)


def wait_listening(ns, address: str, port: int, udp: bool, timeout: float = 10) -> None:
    flag = "-uln" if udp else "-tln"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f"{address}:{port} " in ns.run(["ss", flag], check=False).stdout:
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


def curl_tftp(server: str, name: str, blksize: int | None) -> list[str]:
    cmd = ["curl", "-sS", "--fail", "--max-time", str(CLIENT_TIMEOUT), "-o", "/dev/null"]
    if blksize:
        cmd += ["--tftp-blksize", str(blksize)]
    return cmd + [f"tftp://{server}/{name}"]


def atftp(server: str, name: str, blksize: int, windowsize: int) -> list[str]:
    return ["timeout", str(CLIENT_TIMEOUT), "atftp", "--option", f"blksize {blksize}",
            "--option", f"windowsize {windowsize}", "-g", "-r", name, "-l", "/dev/null", server]


def add_pin_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin servers to CPU 1 and clients to CPU 0")


def set_pinning(args: argparse.Namespace) -> None:
    global PIN
    PIN = PIN and not args.no_pin


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    print(title)
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  ".join(str(cell).rjust(width) if i else str(cell).ljust(width)
                        for i, (cell, width) in enumerate(zip(row, widths, strict=True))))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m virtualinux.bench.tftp")
    parser.add_argument("--size-mb", type=int, default=10, help="file size per client")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row and server")
    parser.add_argument("--rows", help="only these rows, e.g. 1,5 (default: all)")
    add_pin_flag(parser)
    args = parser.parse_args(argv)
    size = args.size_mb << 20
    name = "images/bench.bin"
    rows_spec = [
        ("curl, blksize 512", 1, lambda s: curl_tftp(s, name, None)),
        ("curl, blksize 1468", 1, lambda s: curl_tftp(s, name, 1468)),
        ("atftp, blksize 1468, windowsize 8", 1, lambda s: atftp(s, name, 1468, 8)),
        ("atftp, blksize 1468, windowsize 16", 1, lambda s: atftp(s, name, 1468, 16)),
        ("20 x curl, blksize 1468", 20, lambda s: curl_tftp(s, name, 1468)),
        ("50 x curl, blksize 1468", 50, lambda s: curl_tftp(s, name, 1468)),
        # A rack of iPXE-class clients asking for windowsize: dnsmasq ignores the option.
        ("20 x atftp, blksize 1468, windowsize 16", 20, lambda s: atftp(s, name, 1468, 16)),
        ("50 x atftp, blksize 1468, windowsize 16", 50, lambda s: atftp(s, name, 1468, 16)),
    ]
    set_pinning(args)
    if args.rows:
        rows_spec = [rows_spec[int(i) - 1] for i in args.rows.split(",")]
    rows = []
    with BenchLab({name: size}) as lab:
        lab.start_ours("tftp")
        lab.start_anchor(["dnsmasq", "-d", "--port=0", "--enable-tftp",
                          f"--tftp-root={lab.tree}", f"--listen-address={ANCHOR}",
                          "--bind-interfaces", "--user=root", "--pid-file=",
                          "--tftp-max=200", "--log-facility=/dev/null"], 69, udp=True)
        for label, clients, command in rows_spec:
            times: dict[str, list[float]] = {OURS: [], ANCHOR: []}
            for _ in range(args.repeat):            # interleaved, so load from elsewhere
                for server in (OURS, ANCHOR):       # falls on both alike
                    times[server].append(lab.timed([command(server)] * clients))
            rates = {server: clients * size / statistics.median(runs) / 1e6
                     for server, runs in times.items()}
            rows.append([label, f"{rates[OURS]:.1f}", f"{rates[ANCHOR]:.1f}",
                         f"{rates[OURS] / rates[ANCHOR]:.2f}"])
    print_table(f"TFTP, {args.size_mb} MB per client, MB/s (median of {args.repeat} runs, "
                f"load average {os.getloadavg()[0]:.1f}, {'pinned' if PIN else 'not pinned'})",
                ["row", "ours", "dnsmasq", "ours/dnsmasq"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
