"""`vlx bootsvc run|status|discovered`: run this machine's boot-service replica, read its
counters, and list the unknown machines it has seen.

`run` prints one line `ready dhcp=67 tftp=69` on stdout once every service listens (the ports
it got: `--port tftp=0` takes any free one), and its status file says "running" with them; a
test or bench waits for either. Everything else it says goes to stderr."""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
from pathlib import Path

from virtualinux.bootsvc import daemon, dhcp, options
from virtualinux.bootsvc.service import SERVICE_NAMES, service_class
from virtualinux.bootsvc.status import State, Status, read_status
from virtualinux.netboot import layout, render

from ..db import Database, default_path, default_url
from ..errors import VlxError
from ..store import parse_url
from .common import add_json_flag, add_verb, database, plural, print_json, print_table

log = logging.getLogger("virtualinux.bootsvc")

DEFAULT_STATE_DIR = Path("/run/virtualinux/bootsvc")
DEFAULT_NETBOOT_ROOT = render.default_out() / render.CURRENT


def register(nouns: argparse._SubParsersAction) -> None:
    parser = nouns.add_parser(
        "bootsvc", help="the replicated boot services (DHCP, TFTP, ...)",
        description="Run this machine's boot-service replica (DHCP, TFTP, HTTP, ...), read "
                    "its counters, list the unknown machines it has seen.")
    parser.add_shared_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                               metavar="DIR", help=f"where the replica writes its status "
                                                   f"(default: {DEFAULT_STATE_DIR})")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    run = verbs.add_parser(
        "run", help="run this replica's boot services until SIGTERM",
        description="Run this replica's boot services until SIGTERM. With --store etcd://..., "
                    "they serve from a local copy of the store (the file --db names, default "
                    "$VLX_DB or /var/lib/virtualinux/cluster.db), kept up to date by a watch.")
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
    run.add_argument("--netboot-root", type=Path, default=DEFAULT_NETBOOT_ROOT, metavar="DIR",
                     help=f"the netboot tree TFTP and HTTP serve "
                          f"(default: {DEFAULT_NETBOOT_ROOT})")
    run.add_argument("--poll", type=float, default=daemon.POLL_INTERVAL, metavar="SECONDS",
                     help="how often to look for a new database generation (default: 1)")
    run.add_argument("--set", dest="settings", action="append", default=[],
                     metavar="SERVICE.FIELD=VALUE",
                     help="a service option, e.g. tftp.workers=2 or tftp.max_blksize=1468 "
                          "(the fields of each service's Options)")
    run.add_argument("--port", dest="ports", action="append", default=[],
                     metavar="SERVICE=PORT",
                     help="short for --set SERVICE.port=PORT (0: any free port)")
    run.add_argument("--quiet", action="store_true",
                     help="do not log every answer (DHCPACK ...), only problems")
    run.set_defaults(handler=cmd_run, logs_events=True)

    add_verb(verbs, "status", cmd_status, help="the counters of a running replica", json=True)

    found = verbs.add_parser("discovered",
                             help="unknown MACs this replica answered from the discovery pool")
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
    missing = missing_tree_warning(args.services, args.netboot_root)
    if missing:
        log.warning("%s", missing)
    service_options = options.parse(args.services, args.settings, args.ports)
    url = parse_url(args.store) if args.store else default_url()
    follower = None
    if url.scheme == "etcd":
        # Serve from a local copy of the replicated store (--db names it), which a thread
        # keeps up to date; the daemon polls that file like any other database. A good copy
        # (start-up has just written one on a node) is served at once, and the thread, started
        # once every service listens, catches up: the store's client is not imported before.
        from .. import replica_copy
        follower = replica_copy.ReplicaCopy(url, Path(args.db) if args.db else default_path(),
                                            poll_interval=args.poll)
        if not follower.open_local():
            follower.prepare()
        db = Database(follower.path)
    else:
        db = database(args)
    cluster = db.load()
    replica = daemon.resolve_replica(cluster, args.interface, args.node, args.address,
                                     args.netboot_root, args.state_dir, args.services)
    if args.quiet:
        for name in args.services:
            logging.getLogger(f"virtualinux.bootsvc.{name}").setLevel(logging.WARNING)

    def running(status: Status) -> None:
        _print_ready(status)
        if follower:
            follower.start()

    runner = daemon.Daemon(db, replica, args.services, poll_interval=args.poll,
                           options=service_options, on_running=running,
                           store_status=follower.status if follower else None)
    try:
        asyncio.run(runner.run())
    except PermissionError as err:
        raise VlxError(f"{err}: serving boot protocols needs root (or CAP_NET_BIND_SERVICE "
                       "and CAP_NET_RAW)") from None
    except OSError as err:
        raise VlxError(f"cannot serve on {args.interface}: {err}") from None
    finally:
        if follower:
            follower.stop()
    return 0


def missing_tree_warning(services: tuple[str, ...], root: Path) -> str | None:
    """What to say when TFTP or HTTP would serve a netboot tree that is not there."""
    serving = [name for name in services if name in ("tftp", "http")]
    if not serving or (root / layout.IPXE_SCRIPT).exists():
        return None
    what = "does not exist" if not root.exists() else f"holds no {layout.IPXE_SCRIPT}"
    return (f"netboot tree {root} {what}: {' and '.join(serving)} will answer 'not found' "
            "until `vlx netboot render` makes it (or name another with --netboot-root)")


def _print_ready(status: Status) -> None:
    # `ready tftp=69 http=80 heartbeat`: each service, with the port it bound if it has one.
    shown = " ".join(name if service.port is None else f"{name}={service.port}"
                     for name, service in status.services.items())
    print(f"ready {shown}".rstrip(), flush=True)


def cmd_status(args: argparse.Namespace) -> int:
    status = read_status(args.state_dir)
    code = 0 if status.state == State.RUNNING else 1   # the same with and without --json
    if args.json:
        print_json(status.to_json())
        return code
    node = status.node or "(not a node)"
    print(f"{status.state}: {node} on {status.interface} ({status.address}), "
          f"pid {status.pid}, gen {status.generation}, updated {status.updated}")
    print(f"reloads {status.reloads}, older generations refused "
          f"{status.stale_generations_refused}")
    if status.store:
        print(f"store: {status.store['message']}")
    rows = [(name, counter, value)
            for name, service in status.services.items()
            for counter, value in service.counters.items()]
    if rows:
        print()
        print_table(("SERVICE", "COUNTER", "VALUE"), rows)
    # What each service holds beyond its counters (DNS: its cache and hit ratio; the
    # heartbeat: state and VIP), one table of every service's details.
    details = [(name, key.replace("_", " "), detail_text(key, value))
               for name, service in status.services.items()
               for key, value in service.details.items()]
    if details:
        print()
        print_table(("SERVICE", "DETAIL", "VALUE"), details)
    ours = database(args).path      # None for an etcd store: no file to compare with
    if status.database and ours is not None and \
            Path(status.database).resolve() != ours.resolve():
        print(f"\nnote: this replica serves {status.database}, not {ours} (--db, VLX_DB)")
    return code


def detail_text(key: str, value: object) -> str:
    """One service detail as a person reads it: lists joined, a table by its size (the full
    one is in --json), a ratio in percent, nothing yet as '-'."""
    if value is None:
        return "-"
    if isinstance(value, dict):
        return plural(len(value), "entry", "entries") + " (--json lists them)"
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) or "none"
    if isinstance(value, float) and key.endswith("ratio"):
        return f"{value:.1%}"
    return str(value)


def cmd_discovered(args: argparse.Namespace) -> int:
    found = dhcp.discovered(read_status(args.state_dir))
    if args.json:
        print_json([{"mac": mac, "ip": ip} for mac, ip in found.items()])
        return 0
    if not found:
        print("no unknown MACs seen (is discovery_pool set in [cluster]?)")
        return 0
    print_table(["MAC", "POOL ADDRESS"], sorted(found.items()))
    print("\nadd one with: vlx node add NAME --mac MAC --ip IP --cpus N --memory SIZE")
    return 0
