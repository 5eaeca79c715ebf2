"""The interface every boot service implements, and how the daemon finds one by name.

A service is an asyncio object: `start()` binds its sockets, `stop()` releases them, and
`reload(cluster)` swaps in a new generation (it must be quick and must not fail on a valid
cluster: precompute there, answer from the precomputed state). `counters` counts what happened
(answers, drops by reason) for `vlx bootsvc status`.

Each service declares its settings as a nested frozen dataclass `Options` whose fields all have
defaults (`port: int = 69`, `workers: int = 1`); the daemon builds it from typed `--set
SERVICE.FIELD=VALUE` flags (bootsvc.options) and hands it to the constructor
`(replica, cluster, options=None)`. A service that binds a port sets `self.port` to the one it
got in `start()` (port 0 in a test: any free one); the status file and the ready line show it.

The service named NAME lives in `virtualinux.bootsvc.NAME` as that module's `SERVICE` class.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import ipaddress
import socket
from collections import Counter
from pathlib import Path
from typing import Any, ClassVar

from virtualinux.vvcm import Cluster, Node, VlxError

SERVICE_NAMES = ("dhcp", "tftp", "http", "dns", "heartbeat", "ra")


@dataclasses.dataclass(frozen=True)
class Replica:
    """Who this replica is: the node it serves as (None for a replica that is not a cluster
    node, as in the lab before nodes run a host OS), and where it listens."""

    node: Node | None
    interface: str
    address: ipaddress.IPv4Address
    netboot_root: Path
    state_dir: Path
    # Every service this daemon runs, so one can point clients at another (DHCP hands iPXE
    # an http:// URL only when the http service runs beside it).
    services: tuple[str, ...] = ()


class Service(abc.ABC):
    name: ClassVar[str]

    @dataclasses.dataclass(frozen=True)
    class Options:
        """A service without settings; each service declares its own."""

    def __init__(self, replica: Replica, cluster: Cluster, options: Any = None):
        self.replica = replica
        self.cluster = cluster
        self.options = options if options is not None else type(self).Options()
        self.counters: Counter[str] = Counter()
        # The port bound in start(); None for a service that listens on none.
        self.port: int | None = None

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    def reload(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def details(self) -> dict[str, object]:
        """What the service has seen beyond its counters, for the status file."""
        return {}


def check_port(port: int) -> None:
    """For a service's `Options`: 0 (any free port, for tests) to 65535."""
    if not 0 <= port <= 65535:
        raise ValueError("port must be from 0 to 65535")


SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)   # Linux; Python names it from 3.12


def set_receive_buffer(sock: socket.socket, size: int) -> None:
    """A UDP service's `receive_buffer` option: SO_RCVBUF bytes for bursts (the kernel doubles
    it), past net.core.rmem_max where root may; 0 leaves the kernel's default."""
    if not size:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def service_class(name: str) -> type[Service]:
    if name not in SERVICE_NAMES:
        raise VlxError(f"unknown service {name!r} (choose from {', '.join(SERVICE_NAMES)})")
    try:
        module = importlib.import_module(f"{__package__}.{name}")
    except ModuleNotFoundError:
        raise VlxError(f"service {name!r} is not built yet") from None
    return module.SERVICE
