"""The VC bridges on this node and the addresses on them, followed through netlink.

A node's boot services answer DHCP and DNS for a VC on the VC's bridge, and only on nodes
where that bridge is: `vvcm.virt.network` builds it, with the VC's service address, on every
node that hosts one of the VC's VMs (from `vlx vc create`, a migration, or the start-up step
`vcnet`). Which VCs exist is the database's business (`vc_interfaces`); which bridges are here
is the kernel's, and a bridge comes and goes without a new generation. So `LinkFollower` binds
an rtnetlink socket to link and address events (pyroute2), and after each one that touches a
VC bridge tells its service what is present: bridge name -> the IPv4 addresses on it. A
service serves a VC once its bridge is here and carries the service address, and stops when
either goes.
Imports the model and `vvcm.virt`'s naming of bridges and service addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import socket
from collections import Counter
from collections.abc import Callable

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_LINK
from virtualinux.vvcm import Cluster
from virtualinux.vvcm.virt.domain import BRIDGE_PREFIX, bridge_name
from virtualinux.vvcm.virt.network import service_address

log = logging.getLogger(__name__)

Present = dict[str, frozenset[ipaddress.IPv4Address]]
LINK_EVENTS = ("RTM_NEWLINK", "RTM_DELLINK")
ADDRESS_EVENTS = ("RTM_NEWADDR", "RTM_DELADDR")


@dataclasses.dataclass(frozen=True)
class VcInterface:
    """Where a VC is served on a node that hosts it."""

    vc: str
    bridge: str
    address: ipaddress.IPv4Interface


def vc_interfaces(cluster: Cluster) -> dict[str, VcInterface]:
    """Every VC with room for a service address, by its bridge name."""
    found = {}
    for vc in cluster.vcs:
        address = service_address(vc)
        if address is not None:
            found[bridge_name(vc)] = VcInterface(vc.name, bridge_name(vc), address)
    return found


def served_here(interfaces: dict[str, VcInterface], present: Present) -> list[VcInterface]:
    """The VCs whose bridge is here with the service address on it."""
    return [interface for bridge, interface in sorted(interfaces.items())
            if interface.address.ip in present.get(bridge, ())]


class LinkFollower:
    """Calls `on_change(present)` with the VC bridges here once started, and again after every
    change to them, until stopped. Errors of the follower are counted and logged; the service
    goes on with what it has."""

    def __init__(self, on_change: Callable[[Present], None], counters: Counter[str]):
        self.on_change = on_change
        self.counters = counters
        self.present: Present = {}
        self._task: asyncio.Task | None = None

    async def start(self) -> None:
        """Bind to the events first, then read what is there: nothing falls in between."""
        monitor = AsyncIPRoute()
        try:
            # Links and IPv4 addresses only: a node's route and neighbour events (many, with
            # its VMs) would each be parsed for nothing.
            await monitor.bind(groups=RTMGRP_LINK | RTMGRP_IPV4_IFADDR)
            await self._rescan()
        except BaseException:
            monitor.close()
            raise
        self._task = asyncio.ensure_future(self._follow(monitor))

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _follow(self, monitor: AsyncIPRoute) -> None:
        try:
            while True:
                async for message in monitor.get():
                    if _touches_vc_bridge(message):
                        await self._rescan()
        except asyncio.CancelledError:
            raise
        except (OSError, NetlinkError) as err:
            self.counters["link_follow_errors"] += 1
            log.error("cannot follow the VC bridges any more (%s): serving those there now",
                      err)
        finally:
            monitor.close()

    async def _rescan(self) -> None:
        async with AsyncIPRoute() as ipr:
            bridges = {link["index"]: link.get("IFLA_IFNAME")
                       async for link in await ipr.get_links()
                       if (link.get("IFLA_IFNAME") or "").startswith(BRIDGE_PREFIX)}
            addresses: dict[str, set[ipaddress.IPv4Address]] = {
                name: set() for name in bridges.values()}
            async for message in await ipr.get_addr(family=socket.AF_INET):
                name = bridges.get(message["index"])
                if name is not None:
                    addresses[name].add(ipaddress.IPv4Address(message.get("IFA_ADDRESS")))
        present = {name: frozenset(found) for name, found in addresses.items()}
        if present != self.present:
            self.present = present
            self.counters["link_changes"] += 1
            self.on_change(present)


def _touches_vc_bridge(message: object) -> bool:
    get = getattr(message, "get", None)
    if get is None:
        return False
    event = get("event")
    if event in LINK_EVENTS:
        return (get("IFLA_IFNAME") or "").startswith(BRIDGE_PREFIX)
    if event in ADDRESS_EVENTS:
        return (get("IFA_LABEL") or "").startswith(BRIDGE_PREFIX)
    return False
