"""Benchmark: our HTTP boot-file service against `python -m http.server`, and against our TFTP.

    sudo .venv/bin/python -m virtualinux.bench.http [--size-mb 100] [--repeat 3]

The same namespaces as bench/tftp.py (ours on 198.18.0.1, the anchor on 198.18.0.2, clients
in their own namespace, servers on CPU 1 and clients on CPU 0). Rows: one curl client, then 20
and 50 at once (aggregate MB/s). A second table sets our HTTP beside our TFTP for one client
(the issue's goal: HTTP at least 10x TFTP).
"""

from __future__ import annotations

import argparse
import statistics
import sys

from .tftp import ANCHOR, CLIENT_TIMEOUT, OURS, BenchLab, atftp, curl_tftp, print_table


def curl_http(server: str, name: str) -> list[str]:
    return ["curl", "-sS", "--fail", "--max-time", str(CLIENT_TIMEOUT), "-o", "/dev/null",
            f"http://{server}/{name}"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m virtualinux.bench.http")
    parser.add_argument("--size-mb", type=int, default=100, help="file size per HTTP client")
    parser.add_argument("--tftp-size-mb", type=int, default=10, help="file size for TFTP")
    parser.add_argument("--repeat", type=int, default=3, help="runs per one-client row")
    args = parser.parse_args(argv)
    size, tftp_size = args.size_mb << 20, args.tftp_size_mb << 20
    name, tftp_name = "images/bench-http.bin", "images/bench-tftp.bin"
    rows, versus_tftp = [], []
    with BenchLab({name: size, tftp_name: tftp_size}) as lab:
        lab.start_ours("tftp", "http")
        lab.start_anchor([sys.executable, "-m", "http.server", "--bind", ANCHOR,
                          "--directory", str(lab.tree), "80"], 80)

        def rate(commands, repeat: int, nbytes: int) -> float:
            return len(commands) * nbytes / statistics.median(
                lab.timed(commands) for _ in range(repeat)) / 1e6

        for clients in (1, 20, 50):
            repeat = args.repeat if clients == 1 else 1
            ours = rate([curl_http(OURS, name)] * clients, repeat, size)
            anchor = rate([curl_http(ANCHOR, name)] * clients, repeat, size)
            label = "curl, one client" if clients == 1 else f"{clients} x curl"
            rows.append([label, f"{ours:.0f}", f"{anchor:.0f}", f"{ours / anchor:.2f}"])
        http_one = rate([curl_http(OURS, name)], args.repeat, size)
        for label, command in (
                ("TFTP curl, blksize 1468", curl_tftp(OURS, tftp_name, 1468)),
                ("TFTP atftp, blksize 1468, windowsize 16", atftp(OURS, tftp_name, 1468, 16))):
            tftp = rate([command], args.repeat, tftp_size)
            versus_tftp.append([label, f"{http_one:.0f}", f"{tftp:.1f}", f"{http_one / tftp:.1f}"])
    print_table(f"HTTP, {args.size_mb} MB per client, MB/s (median of {args.repeat} for one "
                "client)", ["row", "ours", "http.server", "ours/http.server"], rows)
    print()
    print_table("Our HTTP against our TFTP, one client, MB/s",
                ["TFTP client", "HTTP", "TFTP", "HTTP/TFTP"], versus_tftp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
