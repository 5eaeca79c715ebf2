"""Benchmark: our HTTP boot-file service against `python -m http.server`, and against our TFTP.

    sudo .venv/bin/python -m virtualinux.bench.http [--size-mb 100] [--repeat 3]

The same namespaces as bench/tftp.py (ours on 198.18.0.1, the anchor on 198.18.0.2, clients
in their own namespace, servers on CPU 1 and clients on CPU 0). Rows: one curl client, then 20
and 50 at once (aggregate MB/s). A second table sets our HTTP beside our TFTP for one client
(the issue's goal: HTTP at least 10x TFTP).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

from . import tftp as tftp_bench
from .tftp import ANCHOR, CLIENT_TIMEOUT, OURS, BenchLab, atftp, curl_tftp, print_table


def curl_http(server: str, name: str) -> list[str]:
    return ["curl", "-sS", "--fail", "--max-time", str(CLIENT_TIMEOUT), "-o", "/dev/null",
            f"http://{server}/{name}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m virtualinux.bench.http")
    parser.add_argument("--size-mb", type=int, default=100, help="file size per HTTP client")
    parser.add_argument("--tftp-size-mb", type=int, default=10, help="file size for TFTP")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row and server")
    tftp_bench.add_pin_flag(parser)
    args = parser.parse_args(argv)
    tftp_bench.set_pinning(args)
    size, tftp_size = args.size_mb << 20, args.tftp_size_mb << 20
    name, tftp_name = "images/bench-http.bin", "images/bench-tftp.bin"
    rows, versus_tftp = [], []
    with BenchLab({name: size, tftp_name: tftp_size}) as lab:
        lab.start_ours("tftp", "http")
        lab.start_anchor([sys.executable, "-m", "http.server", "--bind", ANCHOR,
                          "--directory", str(lab.tree), "80"], 80)

        def rates(commands_by_server: dict[str, list], nbytes: int) -> dict[str, float]:
            """MB/s per server: runs interleaved, so load from elsewhere falls on both alike."""
            times: dict[str, list[float]] = {server: [] for server in commands_by_server}
            for _ in range(args.repeat):
                for server, commands in commands_by_server.items():
                    times[server].append(lab.timed(commands))
            return {server: len(commands_by_server[server]) * nbytes
                    / statistics.median(runs) / 1e6 for server, runs in times.items()}

        for clients in (1, 20, 50):
            got = rates({OURS: [curl_http(OURS, name)] * clients,
                         ANCHOR: [curl_http(ANCHOR, name)] * clients}, size)
            label = "curl, one client" if clients == 1 else f"{clients} x curl"
            rows.append([label, f"{got[OURS]:.0f}", f"{got[ANCHOR]:.0f}",
                         f"{got[OURS] / got[ANCHOR]:.2f}"])
        for label, command in (
                ("curl, blksize 1468", curl_tftp(OURS, tftp_name, 1468)),
                ("atftp, blksize 1468, windowsize 16", atftp(OURS, tftp_name, 1468, 16))):
            http_one = rates({OURS: [curl_http(OURS, name)]}, size)[OURS]
            tftp = rates({OURS: [command]}, tftp_size)[OURS]
            versus_tftp.append([label, f"{http_one:.0f}", f"{tftp:.1f}", f"{http_one / tftp:.1f}"])
    print_table(f"HTTP, {args.size_mb} MB per client, MB/s (median of {args.repeat} runs, "
                f"load average {os.getloadavg()[0]:.1f}, "
                f"{'pinned' if tftp_bench.PIN else 'not pinned'})",
                ["row", "ours", "http.server", "ours/http.server"], rows)
    print()
    print_table("Our HTTP against our TFTP, one client, MB/s",
                ["TFTP client", "HTTP", "TFTP", "HTTP/TFTP"], versus_tftp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
