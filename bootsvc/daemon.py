"""The boot-service daemon: one asyncio process hosting a replica's services.

`resolve_replica` works out who this replica is (a node, or a bare address beside the nodes as
in the lab); `Daemon.run` starts the chosen services (`service.service_class(name)`), polls the
database generation (a cheap read, off the event loop), reloads every service when it grows,
refuses to go back to an older one, and writes its counters to `STATUS_FILE` in the state
directory about once a second for `vlx bootsvc status`. SIGTERM and SIGINT stop it cleanly.
Imports the model and the services; never the CLI.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from virtualinux.vvcm import Cluster, Database, VlxError

from .service import Replica, Service, service_class

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
POLL_INTERVAL = 1.0


def resolve_replica(cluster: Cluster, interface: str, node_name: str | None,
                    address: ipaddress.IPv4Address | None, netboot_root: Path,
                    state_dir: Path, services: tuple[str, ...]) -> Replica:
    """The replica named on the command line: `--node` wins; else `--address`; else the
    node whose address is on `interface`."""
    try:
        socket.if_nametoindex(interface)
    except OSError:
        raise VlxError(f"no network interface {interface!r} here", "--interface") from None
    node = None
    if node_name is not None:
        node = cluster.node(node_name)
        address = address or node.ip
    elif address is not None:
        node = next((n for n in cluster.nodes if n.ip == address), None)
    else:
        present = interface_addresses(interface)
        node = next((n for n in cluster.nodes if n.ip in present), None)
        if node is None:
            shown = ", ".join(map(str, present)) or "none"
            raise VlxError(f"no node's address is on {interface} (it has {shown}): name the "
                           "node with --node or this replica's address with --address",
                           "--interface")
        address = node.ip
    if address not in interface_addresses(interface):
        raise VlxError(f"{address} is not an address of {interface}: clients would be told "
                       "to come back to an address nobody holds", "--address")
    return Replica(node=node, interface=interface, address=address,
                   netboot_root=netboot_root, state_dir=state_dir, services=services)


def interface_addresses(interface: str) -> list[ipaddress.IPv4Address]:
    out = subprocess.run(["ip", "-j", "-4", "addr", "show", "dev", interface],
                         capture_output=True, text=True, check=False).stdout
    try:
        links = json.loads(out or "[]")
    except json.JSONDecodeError:
        return []
    return [ipaddress.IPv4Address(info["local"]) for link in links
            for info in link.get("addr_info", []) if "local" in info]


class Daemon:
    def __init__(self, database: Database, replica: Replica, service_names: tuple[str, ...],
                 poll_interval: float = POLL_INTERVAL,
                 store_status: Callable[[], dict[str, Any]] | None = None):
        self.database = database
        # Where the local copy comes from (vvcm.replica_copy), shown in the status.
        self.store_status = store_status
        self.replica = replica
        self.service_names = service_names
        self.poll_interval = poll_interval
        # Resolve every name first, so a typo fails before anything binds a socket.
        self.classes = [service_class(name) for name in service_names]
        self.services: list[Service] = []
        self.generation = -1
        self.reloads = 0
        self.stale_generations = 0
        self.started = _now()
        self._stop = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        cluster = await asyncio.to_thread(self.database.load)
        self.generation = cluster.generation
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            for cls in self.classes:
                service = cls(self.replica, cluster)
                await service.start()
                self.services.append(service)
            log.info("bootsvc %s on %s (%s): %s, gen %d",
                     self.replica.node.name if self.replica.node else "(not a node)",
                     self.replica.interface, self.replica.address,
                     ",".join(self.service_names), self.generation)
            while not self._stop.is_set():
                self.write_status("running")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), self.poll_interval)
                if not self._stop.is_set():
                    await self.poll()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            for service in reversed(self.services):
                await service.stop()
            self.write_status("stopped")
            log.info("bootsvc stopped at gen %d", self.generation)

    async def poll(self) -> None:
        """Reload on a newer generation; keep serving the one we have on anything else."""
        try:
            generation = await asyncio.to_thread(self.database.generation)
            if generation == self.generation:
                return
            if generation < self.generation:
                self._refuse(generation)
                return
            cluster = await asyncio.to_thread(self.database.load)
        except (VlxError, OSError, ValueError) as err:
            # A database being replaced or briefly unreadable must not stop the boot services.
            log.warning("cannot read the database (%s); still serving gen %d", err,
                        self.generation)
            return
        if cluster.generation < self.generation:
            self._refuse(cluster.generation)
            return
        for service in self.services:
            service.reload(cluster)
        log.info("reloaded gen %d -> %d", self.generation, cluster.generation)
        self.generation = cluster.generation
        self.reloads += 1

    def _refuse(self, generation: int) -> None:
        self.stale_generations += 1
        if self.stale_generations == 1 or self.stale_generations % 60 == 0:
            log.warning("the database is at gen %d, older than gen %d served already: keeping "
                        "gen %d (a database restored from an old copy?)", generation,
                        self.generation, self.generation)

    def status(self, state: str) -> dict[str, Any]:
        replica = self.replica
        return {"state": state, "pid": os.getpid(), "started": self.started, "updated": _now(),
                "node": replica.node.name if replica.node else None,
                "interface": replica.interface, "address": str(replica.address),
                "database": str(self.database.path), "generation": self.generation,
                "reloads": self.reloads, "stale_generations_refused": self.stale_generations,
                "store": self.store_status() if self.store_status else None,
                "services": {service.name: dict(sorted(service.counters.items()))
                             for service in self.services},
                "details": {service.name: details for service in self.services
                            if (details := service.details())}}

    def write_status(self, state: str) -> None:
        path = self.replica.state_dir / STATUS_FILE
        fresh = path.with_name(path.name + ".new")
        try:
            self.replica.state_dir.mkdir(parents=True, exist_ok=True)
            fresh.write_text(json.dumps(self.status(state), indent=2) + "\n")
            os.replace(fresh, path)
        except OSError as err:
            log.warning("cannot write %s: %s", path, err)


def read_status(state_dir: Path) -> dict[str, Any]:
    path = state_dir / STATUS_FILE
    try:
        status = json.loads(path.read_text())
    except FileNotFoundError:
        raise VlxError(f"no status at {path}: is `vlx bootsvc run` running with this "
                       "--state-dir?") from None
    except (OSError, json.JSONDecodeError) as err:
        raise VlxError(f"cannot read {path}: {err}") from None
    if status.get("state") == "running" and not _alive(int(status.get("pid", 0))):
        status["state"] = "dead"   # killed without a chance to say so
    return status


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
