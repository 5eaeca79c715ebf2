"""The gateway heartbeat: VRRPv3 (RFC 5798) between the gateway-primary and gateway-backup
nodes, with IP takeover of `gateway_vip`. Wire-compatible with keepalived (`vrrp_version 3`).

The one stateful boot service: which replica holds the VIP depends on what it has heard, not
on the database alone. The database says who is in the pair, the VIP, the VRID, the interval,
the preempt delay, the priorities and the uplink (Settings.vrrp_*, gateway_*). A replica that
is not a node of the pair refuses to start, naming the pair, unless its `Options` give it a
role or a priority (the lab runs replicas beside the nodes).

Pieces: `vrrp_wire` (bytes <-> Advertisement, every malformed case a counted drop),
`vrrp_state.Router` (the RFC's state machine, pure, clock passed in), `gateway_net.Gateway`
(VIP, gratuitous ARP, NAT). Here: a raw IP socket of protocol 112 joined to 224.0.0.18 on the
replica's interface, the router's timer on the event loop, state changes applied in order by
one task (take or release the gateway, then the notify hook), and an optional tracked link
whose loss lowers our priority (keepalived's track_interface with a weight).
Imports the model, `vrrp_wire`, `vrrp_state`, `gateway_net`.
"""

from __future__ import annotations

import asyncio
import ctypes
import dataclasses
import errno
import logging
import socket
import struct

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError
from virtualinux.vvcm import Cluster, VlxError
from virtualinux.vvcm.model import Role

from . import vrrp_wire as wire
from .gateway_net import Gateway, run_hook
from .service import Replica, Service
from .vrrp_state import Config, Router, Send, State, Transition

log = logging.getLogger(__name__)

ROLES = ("primary", "backup")
MAX_PACKET = 65535
LOG_ONCE_LIMIT = 4096        # remembered (source, reason) pairs, only to avoid repeating a line
DRAIN_BATCH = 64
IFF_RUNNING = 0x40           # carrier: what a cut cable or a peer's veth going down clears
SO_ATTACH_FILTER = 26        # Linux; Python's socket module does not name it


class _DropAll:
    """A classic BPF program of one instruction, `ret #0`: the socket queues nothing."""

    def __init__(self) -> None:
        self.code = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, 0))
        self.program = struct.pack("HL", 1, ctypes.addressof(self.code))


_DROP_ALL = _DropAll()


def router_config(cluster: Cluster, replica: Replica,
                  options: HeartbeatService.Options) -> Config:
    """Who we are in the pair and what the pair holds, from the database and the options."""
    settings = cluster.settings
    if settings is None:
        raise VlxError("heartbeat: the database has no [cluster] settings, so no gateway_vip")
    if options.role and options.role not in ROLES:
        raise VlxError(f"heartbeat: role {options.role!r} is not primary or backup")
    role = options.role
    if not role and replica.node is not None:
        role = next((r for r in ROLES if f"gateway-{r}" in replica.node.roles), "")
    if options.priority:
        if not 1 <= options.priority <= 255:
            raise VlxError(f"heartbeat: priority {options.priority} is not between 1 and 255")
        priority = options.priority
    elif role:
        priority = (settings.vrrp_priority_primary if role == "primary"
                    else settings.vrrp_priority_backup)
    else:
        holders = {r: [n.name for n in cluster.nodes_with_role(Role(f"gateway-{r}"))]
                   for r in ROLES}
        pair = ", ".join(f"gateway-{r} {', '.join(names) or '(none)'}"
                         for r, names in holders.items())
        who = replica.node.name if replica.node else f"{replica.address} (not a node)"
        raise VlxError(f"heartbeat: {who} is not a node of the gateway pair ({pair}): run "
                       "heartbeat on those two, or give this replica a role or priority")
    return Config(vrid=settings.vrrp_id, priority=priority,
                  interval=round(settings.vrrp_interval * 100), address=replica.address,
                  addresses=(settings.gateway_vip,), preempt=options.preempt,
                  preempt_delay=settings.vrrp_preempt_delay)


class HeartbeatService(Service):
    name = "heartbeat"

    @dataclasses.dataclass(frozen=True)
    class Options:
        # "primary"/"backup": the role of a replica that is not a node of the pair (the lab).
        role: str = ""
        # 1-255: overrides the role's priority from the database.
        priority: int = 0
        # An executable run as `NOTIFY STATE` (master, backup, initialize) after each change.
        notify: str = ""
        # While this interface has no carrier, our priority is lower by track_weight
        # (default: gateway_uplink when the cluster sets vrrp_track_uplink).
        track_interface: str = ""
        track_weight: int = 150
        preempt: bool = True

    options: Options

    def __init__(self, replica: Replica, cluster: Cluster, options: Options | None = None):
        super().__init__(replica, cluster, options)
        if not 0 <= self.options.track_weight <= 254:
            raise VlxError(f"heartbeat: track_weight {self.options.track_weight} is not "
                           "between 0 and 254")
        self.router = Router(router_config(cluster, replica, self.options))
        self.gateway = self._gateway(cluster)
        self.last_change = ""
        self.track_down = False
        # The uplink from the database, or any interface the options name; a newer generation
        # that turns vrrp_track_uplink on or off, or names another uplink, is followed live.
        self.tracked = self._tracked_of(cluster)
        self._track_task: asyncio.Task | None = None
        self._sock: socket.socket | None = None
        self._vmac_sock: socket.socket | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._changes: asyncio.Queue[State | Gateway] = asyncio.Queue()
        self._tasks: list[asyncio.Task] = []
        self._encoded: dict[tuple[int, int], bytes] = {}
        self._logged: set[tuple[str, str]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _tracked_of(self, cluster: Cluster) -> str:
        settings = cluster.settings
        assert settings is not None    # router_config refused a cluster without settings
        return self.options.track_interface or (
            settings.gateway_uplink or "" if settings.vrrp_track_uplink else "")

    def _gateway(self, cluster: Cluster) -> Gateway:
        settings = cluster.settings
        assert settings is not None    # router_config refused a cluster without settings
        return Gateway(self.replica.interface, settings.gateway_vip, settings.vrrp_id,
                       settings.cidr, settings.gateway_uplink, settings.vrrp_vmac)

    async def start(self) -> None:
        self.tracked = self._tracked_of(self.cluster)
        if self.tracked:
            try:
                socket.if_nametoindex(self.tracked)
            except OSError:
                raise VlxError(f"heartbeat: no interface {self.tracked!r} to track") from None
        self._loop = asyncio.get_running_loop()
        # A predecessor killed with SIGKILL may have left the VIP and the NAT: a backup must
        # not answer for the VIP, so start from nothing held.
        await self.gateway.release()
        self._sock = self._open_socket()
        self._loop.add_reader(self._sock.fileno(), self._drain)
        self._tasks.append(asyncio.create_task(self._apply_changes()))
        self._follow(self.tracked)
        self._perform(self.router.start(self._loop.time()))
        log.info("VRRP VRID %d on %s as %s, priority %d, interval %.2f s, VIP %s",
                 self.router.config.vrid, self.replica.interface, self.replica.address,
                 self.router.priority, self.router.config.interval / 100, self.gateway.vip)

    async def stop(self) -> None:
        if self._loop is None:
            return
        self._perform(self.router.shutdown(self._loop.time()))
        if self._timer is not None:
            self._timer.cancel()
        if self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        await self._changes.join()          # the release and the hook of the shutdown
        self._send_from(None)
        tasks = self._tasks + ([self._track_task] if self._track_task else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._track_task = None

    def reload(self, cluster: Cluster) -> None:
        try:
            config = router_config(cluster, self.replica, self.options)
        except VlxError as err:
            log.warning("%s; keeping gen %d's settings", err, self.cluster.generation)
            return
        self.cluster = cluster
        if self._loop is None:
            return
        gateway = self._gateway(cluster)
        if _what_it_holds(gateway) != _what_it_holds(self.gateway):
            # The old settings' VIP, NAT and macvlan go, the new ones come (if master), in
            # order with the state changes: through the same queue.
            self._changes.put_nowait(self.gateway)
            self.gateway = gateway
        if config != self.router.config:
            self._perform(self.router.reconfigure(config, self._loop.time()))
        tracked = self._tracked_of(cluster)
        if tracked != self.tracked:
            log.info("VRRP now tracks %s", tracked or "no uplink")
            self._follow(tracked)

    def details(self) -> dict[str, object]:
        router = self.router
        return {"state": router.state.value, "priority": router.priority,
                "vrid": router.config.vrid, "interval": router.config.interval / 100,
                "master": str(router.master_address) if router.master_address else None,
                "vip": str(self.gateway.vip), "vip_held": self.gateway.held,
                "last_change": self.last_change,
                **({"tracked": self.tracked, "track_down": self.track_down}
                   if self.tracked else {})}

    def _send_from(self, index: int | None) -> None:
        """Adverts go out of the virtual MAC's macvlan while it exists (RFC 5798 7.3): a
        second raw socket bound to it (one bound to a device cannot send out of another),
        which reads nothing (a filter that drops all), and is closed when the macvlan goes."""
        if self._vmac_sock is not None:
            self._vmac_sock.close()
            self._vmac_sock = None
        if index is None or self._sock is None:
            return
        self._vmac_sock = self._raw_socket(socket.if_indextoname(index), index, join=False)

    def _open_socket(self) -> socket.socket:
        interface = self.replica.interface
        return self._raw_socket(interface, socket.if_nametoindex(interface), join=True)

    def _raw_socket(self, interface: str, index: int, join: bool) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, wire.PROTOCOL)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, interface.encode())
            membership = struct.pack("4s4si", wire.GROUP.packed, self.replica.address.packed,
                                     index)
            if join:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
            else:
                sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, _DROP_ALL.program)
            # Sent from our address out of our interface; TTL 255 so receivers can tell the
            # packet has not crossed a router; our own adverts are not looped back to us.
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, membership)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, wire.TTL)
            sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    def _drain(self) -> None:
        assert self._sock is not None and self._loop is not None
        for _ in range(DRAIN_BATCH):
            try:
                data, (source, _) = self._sock.recvfrom(MAX_PACKET)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as err:
                self.counters["receive_errors"] += 1
                log.warning("VRRP receive on %s: %s", self.replica.interface, err)
                return
            self.handle(data, source)

    def handle(self, data: bytes, source: str) -> None:
        """One packet from the raw socket: counted, then dropped or fed to the router."""
        try:
            advert = wire.decode(data, self.router.config.vrid)
        except wire.MalformedAdvert as err:
            self.counters[f"dropped_{err.reason}"] += 1
            self._log_once(source, err.reason, f"VRRP packet from {source} dropped: {err}")
            return
        if advert.source == self.replica.address:
            self.counters["dropped_own"] += 1
            return
        self.counters["adverts_received"] += 1
        if advert.addresses != self.router.config.addresses:
            # RFC 5798 7.1 asks only that this be logged: the VRID decides who we follow.
            self.counters["address_mismatch"] += 1
            self._log_once(source, "addresses", f"VRRP VRID {advert.vrid} from {source} "
                           f"announces {', '.join(map(str, advert.addresses))}, we hold "
                           f"{', '.join(map(str, self.router.config.addresses))}")
        assert self._loop is not None
        self._perform(self.router.receive(advert, self._loop.time()))

    def _on_timer(self) -> None:
        self._timer = None
        assert self._loop is not None
        self._perform(self.router.tick(self._loop.time()))

    def _perform(self, actions: list[Send | Transition]) -> None:
        for action in actions:
            if isinstance(action, Send):
                self._send(action.advert)
            else:
                self._transition(action)
        self._reschedule()

    def _reschedule(self) -> None:
        assert self._loop is not None
        deadline = self.router.deadline()
        if self._timer is not None and (deadline is None or self._timer.when() != deadline):
            self._timer.cancel()
            self._timer = None
        if deadline is not None and self._timer is None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _send(self, advert: wire.Advertisement) -> None:
        sock = self._vmac_sock or self._sock
        if sock is None:
            return
        key = (advert.priority, advert.interval)
        message = self._encoded.get(key)
        if message is None or len(self._encoded) > 16:
            if len(self._encoded) > 16:
                self._encoded.clear()
            message = self._encoded[key] = wire.encode(advert, self.replica.address)
        try:
            sock.sendto(message, (str(wire.GROUP), 0))
        except OSError as err:
            # A link that is down must not stop the timers: we try again next interval.
            self.counters["send_errors"] += 1
            self._log_once("-", f"send {err.errno}", f"VRRP send on {self.replica.interface}"
                           f" failed: {err}")
            return
        self.counters["adverts_sent"] += 1

    def _transition(self, change: Transition) -> None:
        self.last_change = f"{change.old.value} -> {change.new.value} ({change.reason})"
        log.info("VRRP %s", self.last_change)
        self.counters[f"became_{change.new.value}"] += 1
        self._changes.put_nowait(change.new)

    async def _apply_changes(self) -> None:
        """Take or give back the gateway, then run the hook, one change at a time in order;
        a `Gateway` in the queue is one a reload replaced, to be swapped for the new one."""
        while True:
            change = await self._changes.get()
            try:
                if isinstance(change, Gateway):
                    await self._swap(change)
                else:
                    await self._apply(change)
            except Exception:   # the next change, and stop(), must not wait on a dead task
                self.counters["gateway_errors"] += 1
                log.exception("VRRP: applying %s failed", change)
            finally:
                self._changes.task_done()

    async def _apply(self, state: State) -> None:
        try:
            if state is State.MASTER:
                self.counters["garp_sent"] += await self.gateway.take()
            elif self.gateway.held or state is State.INITIALIZE:
                await self.gateway.release()
            # A master sends from the virtual MAC's macvlan (RFC 5798 7.3), when there is one.
            self._send_from(self.gateway.sending_index)
        except (OSError, NetlinkError) as err:
            # Still master by the protocol (the peer must not take over too); the operator
            # sees the error in the log and the counter.
            self.counters["gateway_errors"] += 1
            log.error("VRRP %s: cannot %s the gateway %s: %s", state.value,
                      "take" if state is State.MASTER else "release", self.gateway.vip, err)
        if self.options.notify:
            code = await run_hook(self.options.notify, state.value)
            self.counters["hooks_run" if code == 0 else "hooks_failed"] += 1

    async def _swap(self, old: Gateway) -> None:
        try:
            await old.release()
            if self.router.state is State.MASTER:
                self.counters["garp_sent"] += await self.gateway.take()
            self._send_from(self.gateway.sending_index)
            log.info("VRRP gateway now %s", _what_it_holds(self.gateway))
        except (OSError, NetlinkError) as err:
            self.counters["gateway_errors"] += 1
            log.error("VRRP: cannot move the gateway %s -> %s: %s", old.vip, self.gateway.vip,
                      err)

    def _follow(self, name: str) -> None:
        """Track `name` from now on ("": nothing): the previous link's watch ends and its
        penalty goes (the new link's watch lowers the priority again if it is down)."""
        if self._track_task is not None:
            self._track_task.cancel()
            self._track_task = None
        self._track_update(True)
        self.tracked = name
        if name:
            self._track_task = asyncio.create_task(self._track(name))

    async def _track(self, name: str) -> None:
        try:
            await self._follow_link(name)
        except asyncio.CancelledError:
            raise
        except Exception as err:   # the heartbeat goes on at the priority it has
            self.counters["track_errors"] += 1
            log.error("VRRP: cannot follow %s any more: %s", name, err)

    async def _follow_link(self, name: str) -> None:
        """Follow the tracked link's carrier through netlink events, not polling. A link that
        does not exist (yet) counts as down until it appears."""
        async with AsyncIPRoute() as monitor:
            await monitor.bind()
            async with AsyncIPRoute() as ipr:
                try:
                    links = await ipr.link("get", ifname=name)
                except NetlinkError as err:
                    if err.code != errno.ENODEV:
                        raise
                    log.warning("VRRP: tracked interface %s does not exist: down", name)
                    links = []
                self._track_update(bool(links and links[0]["flags"] & IFF_RUNNING))
            while True:
                async for msg in monitor.get():
                    if msg.get("event") == "RTM_NEWLINK" and msg.get("IFLA_IFNAME") == name:
                        self._track_update(bool(msg["flags"] & IFF_RUNNING))
                    elif msg.get("event") == "RTM_DELLINK" and msg.get("IFLA_IFNAME") == name:
                        self._track_update(False)

    def _track_update(self, up: bool) -> None:
        if self.track_down == (not up):
            return
        self.track_down = not up
        base = self.router.config.priority
        priority = max(1, base - self.options.track_weight) if self.track_down else base
        log.info("VRRP tracked %s is %s: priority %d", self.tracked,
                 "down" if self.track_down else "up", priority)
        self.counters["track_down" if self.track_down else "track_up"] += 1
        assert self._loop is not None
        self._perform(self.router.set_priority(priority, self._loop.time()))

    def _log_once(self, source: str, reason: str, line: str) -> None:
        if (source, reason) in self._logged or len(self._logged) >= LOG_ONCE_LIMIT:
            return
        self._logged.add((source, reason))
        log.warning("%s", line)


def _what_it_holds(gateway: Gateway) -> dict[str, object]:
    return {"vip": str(gateway.vip), "vrid": gateway.vrid, "network": str(gateway.network),
            "uplink": gateway.uplink, "vmac": gateway.vmac}


SERVICE = HeartbeatService
