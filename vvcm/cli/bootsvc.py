"""`vlx bootsvc run|status|discovered`: run this machine's boot-service replica, read its
counters, and list the unknown machines it has seen."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
from pathlib import Path

from virtualinux.bootsvc import daemon
from virtualinux.bootsvc.service import SERVICE_NAMES, service_class

from ..errors import VlxError
from .common import add_json_flag, database, print_json, print_table

DEFAULT_STATE_DIR = Path("/run/virtualinux/bootsvc")
DEFAULT_NETBOOT_ROOT = Path("/var/lib/virtualinux/netboot/current")


def register(nouns: argparse._SubParsersAction) -> None:
    parser = nouns.add_parser("bootsvc", help="the replicated boot services (DHCP, TFTP, ...)")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    run = verbs.add_parser("run", help="run this replica's boot services until SIGTERM")
    run.add_argument("--interface", required=True, metavar="IF",
                     help="the cluster network interface to serve on")
    run.add_argument("--node", metavar="NAME",
                     help="the node this replica runs on (default: the node whose address "
                          "is on IF)")
    run.add_argument("--address", metavar="IP", type=_address,
                     help="serve as this address of IF, which need not be a node's "
                          "(the lab runs replicas beside the nodes)")
    run.add_argument("--services", default="dhcp", type=_services, metavar="NAME,...",
                     help=f"services to run, any of {','.join(SERVICE_NAMES)} (default: dhcp)")
    run.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR",
                     help=f"where the counters are written (default: {DEFAULT_STATE_DIR})")
    run.add_argument("--netboot-root", type=Path, default=DEFAULT_NETBOOT_ROOT, metavar="DIR",
                     help=f"the netboot tree TFTP and HTTP serve "
                          f"(default: {DEFAULT_NETBOOT_ROOT})")
    run.add_argument("--poll", type=float, default=daemon.POLL_INTERVAL, metavar="SECONDS",
                     help="how often to look for a new database generation (default: 1)")
    run.add_argument("--quiet", action="store_true",
                     help="do not log every answer (DHCPACK ...), only problems")
    run.set_defaults(handler=cmd_run)

    status = verbs.add_parser("status", help="the counters of a running replica")
    status.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR")
    add_json_flag(status)
    status.set_defaults(handler=cmd_status)

    found = verbs.add_parser("discovered",
                             help="unknown MACs this replica answered from the discovery pool")
    found.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR, metavar="DIR")
    add_json_flag(found)
    found.set_defaults(handler=cmd_discovered)


def _address(text: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an IPv4 address") from None


def _services(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names:
        raise argparse.ArgumentTypeError("name at least one service")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a service is named twice in {text!r}")
    return names


def cmd_run(args: argparse.Namespace) -> int:
    for name in args.services:
        try:
            service_class(name)
        except VlxError as err:
            raise VlxError(str(err), "--services") from None
    if args.poll <= 0:
        raise VlxError("must be more than 0 seconds", "--poll")
    db = database(args)
    cluster = db.load()
    replica = daemon.resolve_replica(cluster, args.interface, args.node, args.address,
                                     args.netboot_root, args.state_dir, args.services)
    if args.quiet:
        for name in args.services:
            logging.getLogger(f"virtualinux.bootsvc.{name}").setLevel(logging.WARNING)
    runner = daemon.Daemon(db, replica, args.services, poll_interval=args.poll)
    try:
        asyncio.run(runner.run())
    except PermissionError as err:
        raise VlxError(f"{err}: serving boot protocols needs root (or CAP_NET_BIND_SERVICE "
                       "and CAP_NET_RAW)") from None
    except OSError as err:
        raise VlxError(f"cannot serve on {args.interface}: {err}") from None
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    status = daemon.read_status(args.state_dir)
    if args.json:
        print_json(status)
        return 0
    node = status.get("node") or "(not a node)"
    print(f"{status['state']}: {node} on {status['interface']} ({status['address']}), "
          f"pid {status['pid']}, gen {status['generation']}, updated {status['updated']}")
    print(f"reloads {status['reloads']}, older generations refused "
          f"{status['stale_generations_refused']}")
    rows = [(service, counter, value)
            for service, counters in status["services"].items()
            for counter, value in counters.items()]
    if rows:
        print()
        print_table(("SERVICE", "COUNTER", "VALUE"), rows)
    # One line per service of what it holds beyond counters (the heartbeat's state and VIP).
    for service, details in status.get("details", {}).items():
        shown = {k: v for k, v in details.items() if not isinstance(v, dict | list)}
        if shown:
            print(f"\n{service}: " + ", ".join(f"{k} {v}" for k, v in shown.items()))
    return 0 if status["state"] == "running" else 1


def cmd_discovered(args: argparse.Namespace) -> int:
    status = daemon.read_status(args.state_dir)
    found = status.get("details", {}).get("dhcp", {}).get("discovered", {})
    if args.json:
        print_json([{"mac": mac, "ip": ip} for mac, ip in found.items()])
        return 0
    if not found:
        print("no unknown MACs seen (is discovery_pool set in [cluster]?)")
        return 0
    print_table(["MAC", "POOL ADDRESS"], sorted(found.items()))
    print("\nadd one with: vlx node add NAME --mac MAC --ip IP --cpus N --memory SIZE")
    return 0
