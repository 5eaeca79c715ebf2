"""`python -m virtualinux.initscripts`: run a node's start-up steps (the unit
virtualinux-startup.service does this at boot). Exit 0 when every step succeeded, 1 when one
failed (the others still ran), 2 when start-up could not begin."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from virtualinux.vvcm import Cluster, Database, VlxError
from virtualinux.vvcm.db import default_path
from virtualinux.vvcm.replica_copy import ReplicaCopy
from virtualinux.vvcm.store import parse_url

from .startup import Boot, discover, node_from_cmdline, read_cmdline, run_steps

# A first boot waits this long for the store to answer (db nodes booting together join one
# after the other, and the store has no quorum while a new member starts), trying again
# every FIRST_COPY_RETRY seconds.
FIRST_COPY_TIMEOUT = 900.0
FIRST_COPY_RETRY = 3.0


def load_cluster(cmdline: tuple[str, ...], clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> Cluster:
    """The database this node starts from. `vlx.store=` on the kernel command line (or
    VLX_STORE) names a replicated store: a local copy of it is made (or, with the store
    unreachable, the copy kept from the last boot is used) and read; else VLX_DB's file.
    With no copy yet and the store unreachable, it waits for the store (FIRST_COPY_TIMEOUT)."""
    store = next((arg.split("=", 1)[1] for arg in cmdline if arg.startswith("vlx.store=")),
                 None) or os.environ.get("VLX_STORE")
    if not store or not store.startswith("etcd://"):
        return Database().load()
    os.environ["VLX_STORE"] = store          # for the steps and what they start
    local = default_path()
    copy = ReplicaCopy(parse_url(store), local)
    deadline = clock() + FIRST_COPY_TIMEOUT
    waiting = False
    while True:
        try:
            copy.prepare()
            return Database(local).load()
        except VlxError as err:
            # No usable copy (a first boot) and the store has no quorum for a while (a db
            # node added before this one is still starting its member): wait for it.
            if copy.rebuilt_reason is None or clock() > deadline:
                raise
            if not waiting:
                print(f"virtualinux: waiting for the store: {err}", flush=True)
                waiting = True
        sleep(FIRST_COPY_RETRY)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m virtualinux.initscripts",
                                     description="Run this node's start-up steps.")
    parser.add_argument("--node", help="the node to start as (default: vlx.node= on the "
                                       "kernel command line)")
    parser.add_argument("--root", type=Path, default=Path("/"),
                        help="write under this directory instead of / and start nothing")
    parser.add_argument("--only", action="append", default=[], metavar="STEP",
                        help="run only this step (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the steps and exit")
    args = parser.parse_args(argv)
    try:
        steps = discover()
        if args.list:
            for step in steps:
                needs = f" (needs {', '.join(step.needs)})" if step.needs else ""
                print(f"{step.order:02d} {step.name}: {step.makes}{needs}")
            return 0
        unknown = sorted(set(args.only) - {step.name for step in steps})
        if unknown:
            raise VlxError(f"no start-up step {unknown[0]!r} "
                           f"(there are {', '.join(s.name for s in steps)})")
        cmdline = read_cmdline()
        cluster = load_cluster(cmdline)
        node = cluster.node(args.node) if args.node else node_from_cmdline(cluster, cmdline)
    except VlxError as err:
        print(f"virtualinux: start-up cannot begin: {err}", file=sys.stderr)
        return 2
    live = args.root == Path("/")
    boot = Boot(node=node, cluster=cluster, root=args.root, cmdline=cmdline, live=live)
    chosen = [step for step in steps if not args.only or step.name in args.only]
    outcomes = run_steps(boot, chosen)
    return 0 if all(outcome.state == "ok" for outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
