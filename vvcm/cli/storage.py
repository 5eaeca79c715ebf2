"""`vlx storage`: the iSCSI target of a storage node (a private tgtd per portal).

`serve` starts tgtd if it is not running (or has died) and makes its targets match the
database; run it again any time, or keep it running with `--watch` to restart a dying tgtd
(the loop is `tgt.watch`). `status` shows every portal with a tgtd or with exports; `stop` is
idempotent. `pool create|remove` make a loop-mounted pool to try things out (`storage.pool`).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
from pathlib import Path

from virtualinux.storage import pool as pool_module
from virtualinux.storage import tgt, volumes
from virtualinux.storage.naming import format_size, parse_portal, parse_size
from virtualinux.storage.volumes import default_portal

from ..errors import VlxError
from .common import add_verb, database, plural, print_json, print_table

log = logging.getLogger("virtualinux.storage")


def register(nouns: argparse._SubParsersAction) -> None:
    parser = nouns.add_parser("storage", help="the iSCSI target (tgtd) of a storage node",
                              description="Start, stop and inspect the tgtd that exports "
                                          "volumes over iSCSI.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    serve = verbs.add_parser("serve", help="start tgtd if needed and export what the "
                                           "database says")
    _portal_flag(serve)
    serve.add_argument("--control-port", type=int, metavar="N",
                       help="tgtd's management port (default: derived from the portal)")
    serve.add_argument("--netns", metavar="NAME",
                       help="run tgtd in this network namespace (the lab's storage node)")
    serve.add_argument("--watch", action="store_true",
                       help="stay in the foreground; restart tgtd and its exports if it dies; "
                            "stop it on SIGTERM/SIGINT")
    serve.set_defaults(handler=cmd_serve)

    stop = verbs.add_parser("stop", help="stop the tgtd of a portal (all its targets go)")
    _portal_flag(stop)
    stop.set_defaults(handler=cmd_stop)

    pool = verbs.add_parser("pool", help="make a loop-mounted pool to try things out",
                            description="Make or remove a loop-mounted reflink pool."
                            ).add_subparsers(dest="pool_verb", metavar="VERB", required=True)
    create = pool.add_parser(
        "create", help="a sparse file, formatted btrfs (or XFS), loop-mounted on DIR",
        description="Make a reflink pool where the host has no btrfs or XFS: a sparse file "
                    "beside DIR, formatted and loop-mounted on DIR. For trying things out; "
                    "real clusters keep their pools on real storage.")
    create.add_argument("directory", type=Path, metavar="DIR",
                        help=f"the pool (e.g. {volumes.DEFAULT_POOL})")
    create.add_argument("--size", required=True, metavar="SIZE",
                        help="how big, e.g. 20GiB (sparse: takes room as it is written)")
    create.add_argument("--fs", choices=sorted(pool_module.FILESYSTEMS), default="btrfs",
                        help="file system (default: btrfs)")
    create.add_argument("--backing", type=Path, metavar="FILE",
                        help="the file that holds it (default: DIR.fs beside DIR)")
    create.set_defaults(handler=cmd_pool_create)
    remove = pool.add_parser("remove", help="unmount a pool `pool create` made and delete "
                                            "its file (refused while volumes live there)")
    remove.add_argument("directory", type=Path, metavar="DIR")
    remove.add_argument("--backing", type=Path, metavar="FILE")
    remove.set_defaults(handler=cmd_pool_remove)

    add_verb(verbs, "status", cmd_status, help="the tgtd of each portal and its targets", json=True)


def _portal_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--portal", metavar="IP[:PORT]",
                        help="iSCSI portal (default: the first storage node, port 3260)")


def _portal(args: argparse.Namespace) -> str:
    if args.portal:
        return parse_portal(args.portal)
    return default_portal(database(args).load())


def cmd_serve(args: argparse.Namespace) -> int:
    db = database(args)
    portal = _portal(args)
    control_port = args.control_port or tgt.default_control_port(portal)
    try:
        daemon, added, started = tgt.serve(db.load(), portal, control_port, args.netns)
    except tgt.ExportsFailed as err:
        if not args.watch:
            raise
        log.error("%s", err)  # keep watching what is served
        recorded = tgt.recorded_daemon(portal)
        if recorded is None:
            raise
        daemon = recorded
    else:
        print(f"tgtd pid {daemon.pid} {'started' if started else 'running'} on {portal} "
              f"(control port {daemon.control_port}): {plural(added, 'target')} added",
              flush=True)
    if not args.watch:
        return 0
    if not args.verbose:   # a watcher's restarts are its events: log them
        logging.getLogger("virtualinux").setLevel(logging.INFO)
    stopping = False

    def request_stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    tgt.watch(daemon, db.load, lambda: stopping)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    portal = _portal(args)
    daemon = tgt.recorded_daemon(portal)
    if daemon is None:   # stopping what is stopped succeeds, like `vlx lab down`
        print(f"no tgtd runs for {portal}: nothing to stop")
        return 0
    tgt.stop(daemon)
    print(f"stopped tgtd for {portal}")
    return 0


def cmd_pool_create(args: argparse.Namespace) -> int:
    made = pool_module.create_loop_pool(args.directory, parse_size(args.size), args.fs,
                                        args.backing)
    print(f"made pool {made.directory}: {made.fstype} on {made.backing} "
          f"({format_size(made.size)}, sparse)")
    print(f"use it: `vlx volume golden add NAME --from IMAGE --pool {made.directory}` "
          f"(or VLX_POOL={made.directory}); after a reboot: mount -o loop {made.backing} "
          f"{made.directory} (fstab: {made.fstab_line})")
    return 0


def cmd_pool_remove(args: argparse.Namespace) -> int:
    directory = args.directory.absolute()
    inside = [v.name for v in database(args).load().volumes
              if Path(v.path).absolute().is_relative_to(directory)]
    if inside:
        raise VlxError(f"pool {directory} holds volumes the database records "
                       f"({', '.join(inside[:5])}{' ...' if len(inside) > 5 else ''}): "
                       "`vlx volume remove` them first")
    backing = pool_module.remove_loop_pool(directory, args.backing)
    print(f"removed pool {directory} and {backing}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    rows = tgt.portal_status(database(args).load())
    if args.json:
        print_json([dataclasses.asdict(row) for row in rows])
    else:
        print_table(["PORTAL", "PID", "STATE", "LISTENING", "EXPORTS", "TARGETS", "SESSIONS",
                     "MISSING"],
                    [[r.portal, r.pid or "-", r.state.upper() if r.state == "dead" else r.state,
                      ",".join(r.listening) or "-", r.exports, r.targets, r.sessions,
                      len(r.missing)] for r in rows])
    dead = [r.portal for r in rows if r.state == "dead"]
    if dead:
        raise tgt.TgtDown(f"tgtd for {', '.join(dead)} has died: `vlx storage serve` "
                          "restarts it and restores its exports")
    exposed = [r for r in rows if r.state == "running" and list(r.listening) != [r.portal]]
    if exposed:
        raise tgt.PortalNotBound(
            f"tgtd for {exposed[0].portal} listens on {', '.join(exposed[0].listening)}, "
            f"not only on its portal: stop it (`vlx storage stop --portal "
            f"{exposed[0].portal}`)")
    unserved = [r for r in rows if r.state == "no tgtd"]
    for row in unserved:
        print(f"portal {row.portal}: {plural(row.exports, 'export')}, no tgtd: "
              f"`vlx storage serve --portal {row.portal}` serves them", file=sys.stderr)
    return 1 if unserved else 0
