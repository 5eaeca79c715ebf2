"""Bench: the etcd store against etcd itself, and how fast replicas see a change.

    .venv/bin/python -m virtualinux.bench.store [--writes 200] [--replicas 1,10,100]
                                               [--import-nodes 10000]     (as root)

One etcd member (`vlx db serve`, Debian's etcd 3.4, default Raft timing) runs in a lab
namespace; the measuring side runs in a second namespace on the same bridge. In one run:

  etcd put        the floor: `--writes` puts of a value as big as the example cluster's
                  snapshot, one client, one at a time (etcd3gw, the client the store uses)
  vlx write       `--writes` single-node changes through `Database.update` (read head, load
                  the snapshot, apply, validate, one CAS transaction): latency and writes/s,
                  and the ratio to the floor (goal: at most 2x)
  visible on R    R replicas following the store (R ReplicaCopy objects in one process, each
                  with its own watch on etcd, its own thread and its own local SQLite file,
                  i.e. what R `vlx bootsvc run --store` processes do minus the boot services);
                  a `vlx node add` process runs, and from its return we time until every
                  local copy holds the new generation (a daemon then picks the file up at
                  its next --poll, 1 s by default, not counted; every copy's file is checked
                  for the new node after). Each replica takes only what is new: the head
                  from its watch event, the snapshot and the newer change-log entries in one
                  etcd transaction, and the rows that differ in one SQLite transaction
                  (replica_copy). Goal: 100 replicas within 1 s
  import          `vlx db import` of `--import-nodes` nodes (one volume each), one change,
                  into etcd and into a SQLite file, as whole `vlx` processes

It prints the load average before and after: the machine is shared.
"""

from __future__ import annotations

import argparse
import functools
import ipaddress
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from virtualinux.bench import common
from virtualinux.bench.scale import inventory as scale_inventory
from virtualinux.vm_test.etcd import VLX, Lab
from virtualinux.vm_test.netns import Netns

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cluster.toml"
GOAL_VISIBLE_100 = 1.0
GOAL_RATIO = 2.0


def worker(url: str, writes: int, replicas: list[int], import_nodes: int, tmp: Path) -> dict:
    """Runs inside the client namespace; returns the figures."""
    from virtualinux.vvcm import Node, changes, inventory, snapshot
    from virtualinux.vvcm.db import Database
    from virtualinux.vvcm.replica_copy import ReplicaCopy
    from virtualinux.vvcm.store import parse_url
    from virtualinux.vvcm.store_etcd import EtcdStore

    results: dict = {}
    db = Database.create(store=url, force=True)
    # The example cluster on a /16, so there is room for the nodes the bench adds.
    wide = inventory.parse(EXAMPLE.read_text().replace('cidr = "198.18.0.0/24"',
                                                       'cidr = "198.18.0.0/16"'), "bench")
    cluster = db.update("db import", "bench", lambda c: inventory.apply(c, wide, "bench"))
    blob = snapshot.encode(cluster)
    if not isinstance(db.backend, EtcdStore):
        raise RuntimeError(f"{url} is no etcd store")
    client = db.backend.clients[0]
    put = []
    for i in range(writes):
        start = time.perf_counter()
        client.put(f"bench/floor/{i % 10}", blob)
        put.append(time.perf_counter() - start)
    client.delete_prefix("bench/")
    results["etcd_put_ms"] = statistics.median(put) * 1000

    write = []
    for i in range(writes):
        node = Node(name=f"w{i}", mac=f"52:54:00:aa:{i // 256:02x}:{i % 256:02x}",
                    ip=ipaddress.IPv4Address("198.18.0.0") + 1024 + i, cpus=1, memory=1024)
        start = time.perf_counter()
        db.update("node add", node.name, functools.partial(changes.add_node, node=node))
        write.append(time.perf_counter() - start)
    results["vlx_write_ms"] = statistics.median(write) * 1000
    results["writes_per_s"] = writes / sum(write)

    results["visible"] = {}
    for count in replicas:
        copies = [ReplicaCopy(parse_url(url), tmp / f"r{count}-{i}.db", poll_interval=1.0)
                  for i in range(count)]
        for copy in copies:
            copy.prepare()
            copy.start()
        target = db.generation() + 1
        name = f"v{count}"
        subprocess.run([*VLX, "--store", url, "node", "add", name, "--mac",
                        f"52:54:00:bb:00:{len(results['visible']):02x}", "--ip",
                        str(ipaddress.IPv4Address("198.18.0.0") + 4000 + count), "--cpus", "1",
                        "--memory", "1GiB"], check=True, capture_output=True)
        returned = time.perf_counter()
        seen: list[float] = []
        pending = list(copies)
        deadline = returned + 60
        while pending and time.perf_counter() < deadline:
            for copy in list(pending):
                if copy.generation >= target:
                    seen.append(time.perf_counter() - returned)
                    pending.remove(copy)
            time.sleep(0.002)
        for copy in copies:
            copy.stop()
        # Timed on what each replica says; checked on what its file holds.
        wrong = [copy.path.name for copy in copies
                 if name not in {node.name for node in Database(copy.path).load().nodes}]
        if wrong:
            raise RuntimeError(f"local copies without node {name}: {', '.join(wrong[:5])}")
        results["visible"][count] = (statistics.median(seen) if seen else None,
                                     max(seen) if seen and not pending else None,
                                     sum(copy.copies_whole for copy in copies),
                                     sum(copy.copies_written for copy in copies))

    toml = tmp / "import.toml"
    toml.write_text(scale_inventory(import_nodes))
    for label, target_args in (("etcd", ["--store", url]),
                               ("sqlite", ["--db", str(tmp / "import.db")])):
        subprocess.run([*VLX, *target_args, "db", "init", "--force"], check=True,
                       capture_output=True)
        start = time.perf_counter()
        subprocess.run([*VLX, *target_args, "db", "import", "--replace", str(toml)], check=True,
                       capture_output=True)
        results[f"import_{label}_s"] = time.perf_counter() - start
    return results


def report(results: dict, writes: int, import_nodes: int) -> None:
    ratio = results["vlx_write_ms"] / results["etcd_put_ms"]
    print(f"etcd put (floor)   median {results['etcd_put_ms']:.2f} ms  ({writes} puts)")
    print(f"vlx write          median {results['vlx_write_ms']:.2f} ms, "
          f"{results['writes_per_s']:.0f} writes/s  ({writes} single-node changes)")
    print(f"                   ratio to etcd put: {ratio:.2f}x "
          f"(goal <= {GOAL_RATIO:g}x: {'met' if ratio <= GOAL_RATIO else 'MISSED'})")
    print("replicas simulated as R ReplicaCopy objects in this one process, each with its own "
          "etcd client, watch, thread and local SQLite file: each fetches, decodes and "
          "fsync-writes the generation itself, all under one GIL (real ones have a machine "
          "each)")
    for count, (median, slowest, whole, written) in results["visible"].items():
        shown = f"median {median * 1000:.0f} ms, all {slowest * 1000:.0f} ms" if slowest \
            else "NOT all within 60 s"
        goal = ""
        if int(count) == 100:
            met = slowest is not None and slowest <= GOAL_VISIBLE_100
            goal = f"  (goal: within {GOAL_VISIBLE_100:g} s: {'met' if met else 'MISSED'})"
        print(f"visible on {count:>3}     {shown}{goal}; {written} copies written, "
              f"{whole} of them whole (the first of each replica)")
    print(f"import {import_nodes} nodes  etcd {results['import_etcd_s']:.2f} s, "
          f"sqlite {results['import_sqlite_s']:.2f} s (whole vlx processes)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=200)
    parser.add_argument("--replicas", default="1,10,100")
    parser.add_argument("--import-nodes", type=int, default=10_000)
    parser.add_argument("--worker", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    replicas = [int(r) for r in args.replicas.split(",")]
    if args.worker:
        with tempfile.TemporaryDirectory(prefix="vlx-store-bench-") as tmp:
            print(json.dumps(worker(args.worker, args.writes, replicas, args.import_nodes,
                                    Path(tmp))))
        return 0
    if os.geteuid() != 0:
        print("bench.store needs root (network namespaces)", file=sys.stderr)
        return 2
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with Netns(prefix="vb") as netns, tempfile.TemporaryDirectory(prefix="vlx-etcd-") as tmp:
        lab = Lab(netns, Path(tmp))
        try:
            url = lab.etcd(1, heartbeat_ms=100, election_ms=1000)
            result = lab.admin.run([sys.executable, "-m", "virtualinux.bench.store",
                                    "--worker", url, "--writes", str(args.writes),
                                    "--replicas", args.replicas,
                                    "--import-nodes", str(args.import_nodes)], timeout=1800)
        finally:
            lab.close()
    report(json.loads(result.stdout.splitlines()[-1]), args.writes, args.import_nodes)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main))
