"""Benchmark: our HTTP boot-file service against nginx, and against our TFTP.

    sudo .venv/bin/python -m virtualinux.bench.http [--size-mb 100] [--repeat 3] [--json FILE]

The same namespaces as bench/tftp.py: ours on 198.18.0.1, nginx on 198.18.0.2 (Debian's
nginx-light: `sendfile on`, one worker process, access log off), Python's `http.server` on
198.18.0.3 as a footnote row only; clients in their own namespace; every server on CPU 1 and
the clients on CPU 0. Rows: one curl client, then 20 and 50 at once (aggregate MB/s, median
(min-max) of `--repeat` interleaved runs). A second table sets our HTTP beside our TFTP for
one client (the goal: HTTP at least 10x TFTP).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import common
from .tftp import ANCHOR, CLIENT_TIMEOUT, OURS, THIRD, BenchLab, atftp, curl_tftp, ratio


def curl_http(server: str, name: str) -> list[str]:
    return ["curl", "-sS", "--fail", "--max-time", str(CLIENT_TIMEOUT), "-o", "/dev/null",
            f"http://{server}/{name}"]


def nginx_config(work: Path, tree: Path, address: str) -> Path:
    """nginx as one would deploy it to hand out boot files, kept inside `work`."""
    for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        (work / name).mkdir(exist_ok=True)
    conf = work / "nginx.conf"
    conf.write_text(f"""daemon off;
user root;   # as ours runs; the tree is in a private (0700) directory
worker_processes 1;
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    default_type application/octet-stream;
    client_body_temp_path {work}/client_body;
    proxy_temp_path {work}/proxy;
    fastcgi_temp_path {work}/fastcgi;
    uwsgi_temp_path {work}/uwsgi;
    scgi_temp_path {work}/scgi;
    server {{
        listen {address}:80;
        root {tree};
    }}
}}
""")
    return conf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m virtualinux.bench.http")
    parser.add_argument("--size-mb", type=int, default=100, help="file size per HTTP client")
    parser.add_argument("--tftp-size-mb", type=int, default=10, help="file size for TFTP")
    parser.add_argument("--clients", default="20,50",
                        help="client counts of the many-clients rows (default: 20,50)")
    common.add_flags(parser)
    args = parser.parse_args(argv)
    common.apply_flags(args)
    size, tftp_size = args.size_mb << 20, args.tftp_size_mb << 20
    name, tftp_name = "images/bench-http.bin", "images/bench-tftp.bin"
    report = common.Report("http", argv if argv is not None else sys.argv[1:])
    rows, versus_tftp = [], []
    with BenchLab({name: size, tftp_name: tftp_size}) as lab:
        lab.start_ours("tftp", "http")
        nginx = lab.workdir / "nginx"
        nginx.mkdir()
        lab.start_anchor(["nginx", "-p", str(nginx), "-e", str(nginx / "error.log"), "-c",
                          str(nginx_config(nginx, lab.tree, ANCHOR))], 80)
        lab.start_anchor([sys.executable, "-m", "http.server", "--bind", THIRD,
                          "--directory", str(lab.tree), "80"], 80, address=THIRD)
        for clients in [1] + [int(n) for n in args.clients.split(",") if n]:
            got = lab.rates(args.repeat, {s: [curl_http(s, name)] * clients
                                          for s in (OURS, ANCHOR, THIRD)}, size)
            label = "curl, one client" if clients == 1 else f"{clients} x curl"
            rows.append([label, got[OURS], got[ANCHOR], ratio(got[OURS], got[ANCHOR]),
                         got[THIRD]])
        for label, command in (
                ("curl, blksize 1468", curl_tftp(OURS, tftp_name, 1468)),
                ("atftp, blksize 1468, windowsize 16", atftp(OURS, tftp_name, 1468, 16))):
            http_one = lab.rates(args.repeat, {OURS: [curl_http(OURS, name)]}, size)[OURS]
            tftp = lab.rates(args.repeat, {OURS: [command]}, tftp_size)[OURS]
            versus_tftp.append([label, http_one, tftp, ratio(http_one, tftp)])
    report.table(f"HTTP, {args.size_mb} MB per client, aggregate MB/s",
                 ["row", "ours", "nginx", "ours/nginx", "footnote: http.server"], rows)
    report.table("Our HTTP against our TFTP, one client, MB/s",
                 ["TFTP client", "HTTP", "TFTP", "HTTP/TFTP"], versus_tftp)
    report.note("nginx: nginx-light, sendfile on, one worker; http.server (HTTP/1.0, no "
                "sendfile) is no deployable peer and is shown only as a footnote")
    report.finish(args.json)
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main))
