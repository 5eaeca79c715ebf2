"""Bench: how the database and what reads it scale with the number of nodes.

    .venv/bin/python -m virtualinux.bench.scale [--sizes 1000,10000] [--store URL]

For each N it writes an inventory of N nodes, each with an exported root snapshot of one golden
volume (N + 1 volumes), and times, in this process (no Python start-up counted):
  import   `vlx db import` of the file into an empty database (parse, validate, store)
  add      one `vlx node add` on top of it
  load     one `Database.load()` (what every reader pays per generation)
  render   `netboot.render` of the whole tree: N node scripts and N cpios written
  dhcp     the DHCP service's reload (`served_networks`) plus 1,000 unknown MACs answered
           from the discovery pool
and prints them with the goals of issue 11 (import of 10,000 < 3 s, add at 10,000 < 0.3 s,
render of 10,000 with 10,000 volumes < 5 s) and the load average, since the machine is shared.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import ipaddress
import os
import sys
import tempfile
import time
from pathlib import Path

from virtualinux.bench import common
from virtualinux.bootsvc import dhcp_networks
from virtualinux.netboot import render
from virtualinux.vvcm.cli import main as vlx_main
from virtualinux.vvcm.db import Database

GOALS = {("import", 10_000): 3.0, ("add", 10_000): 0.3, ("render", 10_000): 5.0}
FIRST = ipaddress.IPv4Address("198.18.0.10")
UNKNOWN_MACS = 1000


def inventory(count: int) -> str:
    """N nodes on 198.18.0.0/15 (room for 131,000), each owning an exported root snapshot."""
    lines = ['[cluster]', 'name = "scale"', 'domain = "scale.lab"', 'cidr = "198.18.0.0/15"',
             'gateway_vip = "198.18.0.1"', 'discovery_pool = "198.19.255.1-198.19.255.200"', '',
             '[[volume]]', 'name = "node"', 'kind = "golden"', 'backend = "reflink"',
             'path = "/pool/node.img"', 'size = 1073741824', '']
    for i in range(count):
        name = f"n{i}"
        lines += ['[[node]]', f'name = "{name}"', f'mac = "{_mac(i)}"',
                  f'ip = "{FIRST + i}"', 'cpus = 8', 'memory = "16GiB"', '']
    for i in range(count):
        lines += ['[[volume]]', f'name = "n{i}-root"', 'kind = "snapshot"',
                  'backend = "reflink"', f'path = "/pool/n{i}-root.img"', 'size = 1073741824',
                  'origin = "node"', f'owner = "n{i}"',
                  f'iqn = "iqn.2026-11.org.virtualinux:scale.n{i}-root"',
                  'portal = "198.18.0.10:3260"', '']
    return "\n".join(lines)


def _mac(i: int) -> str:
    return "52:54:" + ":".join(f"{b:02x}" for b in i.to_bytes(4, "big"))


def timed(what, *args):
    start, cpu = time.perf_counter(), time.process_time()
    result = what(*args)
    CPU[what.__name__ if what is not vlx else f"vlx {args[2]} {args[3]}"] = \
        time.process_time() - cpu
    return time.perf_counter() - start, result


# CPU seconds of this process per step: on a shared machine, the part that is ours.
CPU: dict[str, float] = {}


def vlx(*argv: str) -> None:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) \
            as err:
        code = vlx_main(list(argv))
    if code != 0:
        raise SystemExit(f"vlx {' '.join(argv)} failed: {err.getvalue().strip()}")


def run(count: int, work: Path, store: str | None) -> dict[str, float]:
    toml = work / f"scale-{count}.toml"
    toml.write_text(inventory(count))
    target = ["--store", store] if store else ["--db", str(work / f"scale-{count}.db")]
    vlx(*target, "db", "init", "--force")
    results: dict[str, float] = {}
    results["import"], _ = timed(vlx, *target, "db", "import", str(toml))
    results["add"], _ = timed(vlx, *target, "node", "add", "extra", "--mac",
                              "52:54:ff:ff:ff:ff", "--ip", str(FIRST + count), "--cpus", "4",
                              "--memory", "4GiB")
    database = Database(store=store) if store else Database(work / f"scale-{count}.db")
    results["load"], cluster = timed(database.load)
    image = work / "image"
    image.mkdir(exist_ok=True)
    (image / "vmlinuz").write_bytes(b"k" * 4096)
    (image / "initrd.img").write_bytes(b"i" * 4096)
    results["render"], _ = timed(render.render, cluster, image, work / f"netboot-{count}")

    def dhcp_reload_and_unknowns() -> None:
        networks = dhcp_networks.served_networks(cluster)
        for i in range(UNKNOWN_MACS):
            networks[0].pool_host(b"\x02\x00" + i.to_bytes(4, "big"))

    results["dhcp"], _ = timed(dhcp_reload_and_unknowns)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,10000",
                        help="node counts, comma-separated (50000 works too; default 1000,10000)")
    parser.add_argument("--store", help="time against this store URL instead of a SQLite file")
    args = parser.parse_args(argv)
    sizes = [int(size) for size in args.sizes.split(",")]
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    header = f"{'nodes':>7} {'import':>8} {'add':>8} {'load':>8} {'render':>8} {'dhcp':>8}"
    print(header + "   (seconds)")
    with tempfile.TemporaryDirectory(prefix="vlx-scale-") as tmp:
        for count in sizes:
            results = run(count, Path(tmp), args.store)
            print(f"{count:>7} " + " ".join(f"{results[k]:>8.3f}" for k in
                                           ("import", "add", "load", "render", "dhcp")))
            print("        cpu: " + ", ".join(f"{k} {v:.3f}" for k, v in CPU.items()))
            for (what, size), goal in GOALS.items():
                if size == count:
                    verdict = "met" if results[what] < goal else "MISSED"
                    print(f"        goal {what} < {goal:g} s at {size}: {verdict} "
                          f"({results[what] / goal:.2f} of the goal)")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main))
