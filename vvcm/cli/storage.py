"""`vlx storage`: the iSCSI target of a storage node (a private tgtd per portal).

`serve` starts tgtd if it is not running (or has died) and makes its targets match the
database; run it again any time, or keep it running with `--watch` to restart a dying tgtd.
"""

from __future__ import annotations

import argparse
import logging
import signal
import time
from typing import Any

from virtualinux.storage import tgt
from virtualinux.storage.naming import parse_portal
from virtualinux.storage.volumes import default_portal

from ..errors import VlxError
from .common import add_json_flag, database, print_json, print_table

log = logging.getLogger("virtualinux.storage")
WATCH_INTERVAL = 1.0


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

    status = verbs.add_parser("status", help="the tgtd of each portal and its targets")
    add_json_flag(status)
    status.set_defaults(handler=cmd_status)


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
              f"(control port {daemon.control_port}): {added} targets added", flush=True)
    if not args.watch:
        return 0
    stopping = False

    def request_stop(signum, frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    try:
        while not stopping:
            time.sleep(WATCH_INTERVAL)
            if not daemon.alive():
                log.warning("tgtd pid %d died: restarting it with its exports", daemon.pid)
                try:
                    daemon, added, _ = tgt.serve(db.load(), portal, control_port, args.netns)
                except VlxError as err:  # keep watching: the next round tries again
                    log.error("restart failed: %s", err)
                    daemon = tgt.recorded_daemon(portal) or daemon
                    continue
                log.info("tgtd pid %d restored %d targets", daemon.pid, added)
    finally:
        tgt.stop(daemon)
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    portal = _portal(args)
    daemon = tgt.recorded_daemon(portal)
    if daemon is None:
        raise VlxError(f"no tgtd was started for {portal}")
    tgt.stop(daemon)
    print(f"stopped tgtd for {portal}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cluster = database(args).load()
    rows: list[dict[str, Any]] = []
    for daemon in tgt.recorded_daemons():
        alive = daemon.alive()
        targets = daemon.admin.targets() if alive else {}
        wanted = tgt.wanted_exports(cluster, daemon.portal)
        rows.append({"portal": daemon.portal, "pid": daemon.pid, "alive": alive,
                     "control_port": daemon.control_port, "targets": len(targets),
                     "sessions": sum(t.sessions for t in targets.values()),
                     "missing": sorted(set(wanted) - set(targets)) if alive else sorted(wanted)})
    if args.json:
        print_json(rows)
    else:
        print_table(["PORTAL", "PID", "STATE", "TARGETS", "SESSIONS", "MISSING"],
                    [[r["portal"], r["pid"], "running" if r["alive"] else "DEAD", r["targets"],
                      r["sessions"], len(r["missing"])] for r in rows])
    dead = [r["portal"] for r in rows if not r["alive"]]
    if dead:
        raise tgt.TgtDown(f"tgtd for {', '.join(dead)} has died: `vlx storage serve` "
                          "restarts it and restores its exports")
    return 0
