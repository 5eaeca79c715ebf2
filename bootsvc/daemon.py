"""The boot-service daemon: one asyncio process hosting a replica's services.

`resolve_replica` works out who this replica is (a node, or a bare address beside the nodes as
in the lab); `Daemon.run` starts the chosen services (`service.service_class(name)`, each with
its typed `Options`), polls the database generation (a cheap read, off the event loop), reloads
every service when it grows, refuses to go back to an older one, and writes its `Status`
(bootsvc.status) to the state directory about once a second for `vlx bootsvc status`; under
systemd it says when it is ready (sd_notify). SIGHUP looks for a new generation at once;
SIGTERM and SIGINT stop it cleanly. This is the one way services run: production, the lab,
the tests and the benches all start `vlx bootsvc run`.
Imports the model and the services; never the CLI.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import logging
import os
import signal
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute
from virtualinux.vvcm import Cluster, Database, VlxError

from .service import Replica, Service, service_class
from .status import ServiceStatus, State, Status, now

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0
# The signals the daemon handles: stop, and look at the database now.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


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
    """The IPv4 addresses on `interface` (none if there is no such interface)."""
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=interface)
        if not index:
            return []
        return [ipaddress.IPv4Address(message.get("local") or message.get("address"))
                for message in ipr.get_addr(family=socket.AF_INET, index=index[0])]


def notify_systemd(state: str) -> bool:
    """Tell systemd how the replica is (sd_notify(3): "READY=1" once every service listens,
    so a unit of Type=notify is started only then, and the units ordered after it, the etcd
    member on a node, start once it serves). One datagram to $NOTIFY_SOCKET, the whole of the
    protocol; nothing when systemd did not ask. True if it was sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):          # an abstract socket
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as err:
        log.warning("cannot tell systemd %s: %s", state, err)
        return False
    return True


def settle_heap() -> None:
    """Once a generation is loaded and every service precomputed from it: collect, then
    freeze what is left (gc.freeze), so the collector's later passes skip it. A generation of
    10,000 nodes is ~85,000 tracked objects, and a full pass over them took 17-75 ms here: in
    the middle of a burst of DHCP that is longer than the default receive buffer lasts (~166
    datagrams, 20 ms at 4,000 DORA/s), and the answers' cache growing was what set one off.
    Unfreezing first lets a previous generation's cycles be collected, at a reload, which
    holds the loop anyway."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Daemon:
    def __init__(self, database: Database, replica: Replica, service_names: tuple[str, ...],
                 poll_interval: float = POLL_INTERVAL, options: dict[str, object] | None = None,
                 on_running: Callable[[Status], None] | None = None,
                 store_status: Callable[[], dict[str, Any]] | None = None):
        self.database = database
        # Where the local copy comes from (vvcm.replica_copy), shown in the status.
        self.store_status = store_status
        self.replica = replica
        self.service_names = service_names
        self.poll_interval = poll_interval
        # Resolve every name first, so a typo fails before anything binds a socket.
        self.classes = [service_class(name) for name in service_names]
        self.options = options or {}
        # Called once every service listens (the CLI prints its "ready" line).
        self.on_running = on_running
        self.services: list[Service] = []
        self.generation = -1
        self.reloads = 0
        self.stale_generations = 0
        self.unreadable = 0      # polls that could not read the database
        self.started = now()
        self._stop = asyncio.Event()
        self._look_now = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    def request_poll(self) -> None:
        self._look_now.set()

    async def run(self) -> None:
        cluster = await asyncio.to_thread(self.database.load)
        self.generation = cluster.generation
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_poll)
        try:
            self.write_status(State.STARTING)
            for cls in self.classes:
                service = cls(self.replica, cluster, self.options.get(cls.name))
                await service.start()
                self.services.append(service)
            settle_heap()
            log.info("bootsvc %s on %s (%s): %s, gen %d",
                     self.replica.node.name if self.replica.node else "(not a node)",
                     self.replica.interface, self.replica.address,
                     ",".join(self.service_names), self.generation)
            running = self.write_status(State.RUNNING)
            if self.on_running is not None:
                self.on_running(running)
            notify_systemd("READY=1")
            while not self._stop.is_set():
                await self._sleep()
                if not self._stop.is_set():
                    await self.poll()
                    self.write_status(State.RUNNING)
        finally:
            notify_systemd("STOPPING=1")
            for sig in (*STOP_SIGNALS, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            for service in reversed(self.services):
                await service.stop()
            self.write_status(State.STOPPED)
            log.info("bootsvc stopped at gen %d", self.generation)

    async def _sleep(self) -> None:
        """Until the poll interval passes, a SIGHUP asks to look now, or a stop."""
        waits = [asyncio.ensure_future(event.wait()) for event in (self._stop, self._look_now)]
        try:
            await asyncio.wait(waits, timeout=self.poll_interval,
                               return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        self._look_now.clear()

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
            self.unreadable += 1
            log.warning("cannot read the database (%s); still serving gen %d", err,
                        self.generation)
            return
        if cluster.generation < self.generation:
            self._refuse(cluster.generation)
            return
        for service in self.services:
            service.reload(cluster)
        settle_heap()
        log.info("reloaded gen %d -> %d", self.generation, cluster.generation)
        self.generation = cluster.generation
        self.reloads += 1

    def _refuse(self, generation: int) -> None:
        self.stale_generations += 1
        if self.stale_generations == 1 or self.stale_generations % 60 == 0:
            log.warning("the database is at gen %d, older than gen %d served already: keeping "
                        "gen %d (a database restored from an old copy?)", generation,
                        self.generation, self.generation)

    def status(self, state: State) -> Status:
        replica = self.replica
        return Status(
            state=state, pid=os.getpid(), started=self.started, updated=now(),
            node=replica.node.name if replica.node else None, interface=replica.interface,
            address=str(replica.address), database=str(self.database.path),
            generation=self.generation, reloads=self.reloads,
            stale_generations_refused=self.stale_generations,
            database_unreadable=self.unreadable,
            store=self.store_status() if self.store_status else None,
            services={service.name: ServiceStatus(
                port=service.port, counters=dict(sorted(service.counters.items())),
                details=service.details()) for service in self.services})

    def write_status(self, state: State) -> Status:
        status = self.status(state)
        try:
            status.write(self.replica.state_dir)
        except OSError as err:
            log.warning("cannot write the status to %s: %s", self.replica.state_dir, err)
        return status
