"""Run some boot services in the foreground, outside the daemon: for tests, benches and the lab.

    nsenter --net=/run/netns/NS python -m virtualinux.bootsvc.standalone \\
        --db cluster.db --root /srv/netboot/current --address 198.18.0.1 tftp http

It prints one line `ready tftp=69 http=80` once every service listens, reloads the database on
SIGHUP, and on SIGTERM or SIGINT stops them and prints their counters as one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import ipaddress
import json
import logging
import signal
import sys
from pathlib import Path

from virtualinux.vvcm.db import Database

from .service import Replica, service_class


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m virtualinux.bootsvc.standalone")
    parser.add_argument("--db", required=True, type=Path, help="cluster database")
    parser.add_argument("--root", required=True, type=Path, help="netboot tree (OUT/current)")
    parser.add_argument("--address", required=True, type=ipaddress.IPv4Address)
    parser.add_argument("--interface", default="eth0")
    parser.add_argument("--state-dir", type=Path, default=Path("/tmp"))
    parser.add_argument("--port", action="append", default=[], metavar="SERVICE=PORT",
                        help="listen on another port, e.g. tftp=6969 (0: any free port)")
    parser.add_argument("--set", action="append", default=[], metavar="SERVICE.NAME=VALUE",
                        help="another setting of a service, e.g. tftp.workers=2 or "
                             "heartbeat.role=primary")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("services", nargs="+", metavar="SERVICE")
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> dict[str, dict[str, int]]:
    database = Database(args.db)
    cluster = database.load()
    replica = Replica(None, args.interface, args.address, args.root, args.state_dir)
    ports = dict(item.split("=", 1) for item in args.port)
    settings: dict[str, dict[str, int]] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        service_name, _, setting = key.partition(".")
        settings.setdefault(service_name, {})[setting] = _typed(service_name, setting, value)
    services = []
    for name in args.services:
        kwargs = {"port": int(ports[name])} if name in ports else {}
        kwargs.update(settings.get(name, {}))
        services.append(service_class(name)(replica, cluster, **kwargs))
    for service in services:
        await service.start()
    print("ready " + " ".join(f"{s.name}={getattr(s, 'port', '-')}" for s in services),
          flush=True)

    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()

    def reload() -> None:
        newer = database.load()
        for service in services:
            service.reload(newer)

    loop.add_signal_handler(signal.SIGHUP, reload)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    for service in services:
        await service.stop()
    return {service.name: dict(service.counters) for service in services}


def _typed(service_name: str, setting: str, text: str) -> object:
    """An integer, unless the service's `Options` declares the field a str or a bool."""
    options = getattr(service_class(service_name), "Options", None)
    kinds = {f.name: str(f.type) for f in dataclasses.fields(options)} if options else {}
    if kinds.get(setting) == "str":
        return text
    if kinds.get(setting) == "bool":
        return text.lower() in ("1", "true", "yes")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    counters = asyncio.run(run(args))
    print(json.dumps(counters, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
