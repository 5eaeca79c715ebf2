"""The interface every boot service implements, and how the daemon finds one by name.

A service is an asyncio object: `start()` binds its sockets, `stop()` releases them, and
`reload(cluster)` swaps in a new generation (it must be quick and must not fail on a valid
cluster: precompute there, answer from the precomputed state). `counters` counts what happened
(answers, drops by reason) for `vlx bootsvc status`.

The service named NAME lives in `virtualinux.bootsvc.NAME` as that module's `SERVICE` class.
"""

from __future__ import annotations

import abc
import dataclasses
import importlib
import ipaddress
from collections import Counter
from pathlib import Path
from typing import ClassVar

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

    def __init__(self, replica: Replica, cluster: Cluster):
        self.replica = replica
        self.cluster = cluster
        self.counters: Counter[str] = Counter()

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    def reload(self, cluster: Cluster) -> None:
        self.cluster = cluster

    def details(self) -> dict[str, object]:
        """What the service has seen beyond its counters, for the status file."""
        return {}


def service_class(name: str) -> type[Service]:
    if name not in SERVICE_NAMES:
        raise VlxError(f"unknown service {name!r} (choose from {', '.join(SERVICE_NAMES)})")
    try:
        module = importlib.import_module(f"{__package__}.{name}")
    except ModuleNotFoundError:
        raise VlxError(f"service {name!r} is not built yet") from None
    return module.SERVICE
