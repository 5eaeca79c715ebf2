"""The lab's uplink: a namespace standing for the outside world, reached only through the VIP.

    PREFIX-world   bridge br1 holding the addresses the inventory names outside the cluster
                   (upstream_dns, ntp_servers) and one more to ping; the gateways' `up0`
                   veths plug into it, each at an address of the uplink network

The world has no route to the cluster network: a node reaches it only through the gateway
VIP, whose master masquerades the cluster network out of `up0` (bootsvc.heartbeat with
`gateway_uplink = "up0"`). `plan` is pure; `make_world` builds it in a `Netns`; `start` does
both for a running lab and runs the heartbeat on its first two replicas (primary, backup),
which the tiny image needs (its nodes run no host OS). With the node image the pair runs on
the gateway nodes themselves: `start_for_nodes` puts the world on an uplink segment in the
hub, where the gateway nodes' second NICs are (their addresses from the database).

The world also serves what the inventory says is out there (`world_servers`): DNS on every
`upstream_dns` address (dnsmasq answering for WORLD_ZONE from its own records, nothing
forwarded: `ping.world.test` is the address to ping, and each server has a name) and NTP on
every `ntp_servers` address (chronyd as a local stratum, `-x`: it never sets the host's
clock). So a node's DNS forwarding and its chrony reach real servers, through the VIP.
Imports the model only.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from virtualinux.vvcm import Cluster, Database, Settings, VlxError, changes
from virtualinux.vvcm.command import vlx_command

from .netns import Namespace, Netns
from .plan import LAB_RANGE, REPLICA_INTERFACE

if TYPE_CHECKING:
    from .lab import Lab

UPLINK_INTERFACE = "up0"
WORLD_ZONE = "world.test"      # RFC 6761: never a real name
NTP_STRATUM = 8
WORLD_BRIDGE = "br1"
# A node-image lab: the uplink segment's bridge in the hub, and the world's leg into it.
UPLINK_BRIDGE = "br1"
WORLD_LEG = "hub0"
# Where the world is when the inventory names nothing outside the cluster.
DEFAULT_NETWORK = ipaddress.IPv4Network("198.18.255.0/24")
ROLES = ("primary", "backup")


@dataclasses.dataclass(frozen=True)
class UplinkPlan:
    network: ipaddress.IPv4Network
    outside: tuple[ipaddress.IPv4Address, ...]     # held by the world; the first is to ping
    gateways: tuple[ipaddress.IPv4Address, ...]    # the gateways' up0 addresses, in order


def plan(settings: Settings, gateways: int = 2) -> UplinkPlan:
    """The world's network: the /24 of the first outside address the inventory names."""
    named = tuple(dict.fromkeys((*settings.upstream_dns, *settings.ntp_servers)))
    network = (ipaddress.IPv4Network(f"{named[0]}/24", strict=False) if named
               else DEFAULT_NETWORK)
    for address in named:
        if address not in LAB_RANGE or address in settings.cidr or address not in network:
            raise VlxError(f"the lab's world holds {address} on {network}, which must be in "
                           f"{LAB_RANGE} and outside the cluster network {settings.cidr}: "
                           "give upstream_dns and ntp_servers addresses of one /24",
                           "[cluster]")
    if network.overlaps(settings.cidr) or not network.subnet_of(LAB_RANGE):
        raise VlxError(f"the lab's world network {network} must be in {LAB_RANGE} and "
                       f"outside the cluster network {settings.cidr}", "[cluster]")
    free = [a for a in network.hosts() if a not in named]
    ping = free[0]
    ups = tuple(reversed(free[-gateways:]))
    return UplinkPlan(network, (ping, *named), ups)


def make_world(netns: Netns, uplink: UplinkPlan, gateways: Sequence[Namespace]) -> Namespace:
    world = netns.namespace("world")
    netns.bridge(world, WORLD_BRIDGE)
    for address in uplink.outside:
        world.add_address(WORLD_BRIDGE, f"{address}/{uplink.network.prefixlen}")
    for gateway, address in zip(gateways, uplink.gateways, strict=False):
        netns.plug(world, WORLD_BRIDGE, gateway, UPLINK_INTERFACE,
                   address=f"{address}/{uplink.network.prefixlen}")
    return world


def world_names(uplink: UplinkPlan, settings: Settings) -> dict[str, ipaddress.IPv4Address]:
    """The names the world's DNS answers: ping.world.test (the address to ping), dnsN and
    ntpN for the servers the inventory names."""
    names = {f"ping.{WORLD_ZONE}": uplink.outside[0]}
    names.update({f"dns{i}.{WORLD_ZONE}": a for i, a in enumerate(settings.upstream_dns, 1)})
    names.update({f"ntp{i}.{WORLD_ZONE}": a for i, a in enumerate(settings.ntp_servers, 1)})
    return names


def world_servers(uplink: UplinkPlan, settings: Settings,
                  directory: Path) -> dict[str, list[str]]:
    """The world's DNS and NTP servers: name -> command, run in the world namespace (each in
    the foreground, its files in `directory`)."""
    directory.mkdir(parents=True, exist_ok=True)
    servers: dict[str, list[str]] = {}
    if settings.upstream_dns:
        servers["world-dns"] = [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
            "--no-hosts", "--bind-interfaces", "--user=root", "--group=root",
            f"--pid-file={directory / 'dnsmasq.pid'}", "--log-facility=-",
            f"--local=/{WORLD_ZONE}/", f"--domain={WORLD_ZONE}",
            *(f"--listen-address={a}" for a in settings.upstream_dns),
            *(f"--host-record={name},{address}"
              for name, address in world_names(uplink, settings).items())]
    if settings.ntp_servers:
        conf = directory / "chrony.conf"
        # No bindaddress: the world holds only world addresses, and chronyd binds one
        # address at most, so it answers on every ntp_servers address this way.
        conf.write_text(f"local stratum {NTP_STRATUM}\nallow all\ncmdport 0\n"
                        f"pidfile {directory / 'chronyd.pid'}\n")
        servers["world-ntp"] = ["chronyd", "-d", "-x", "-u", "root", "-f", str(conf)]
    return servers


def heartbeat_command(database: Path, state_dir: Path, address: ipaddress.IPv4Address,
                      role: str) -> list[str]:
    """The heartbeat of a replica that is not a node: its role comes from the options."""
    return vlx_command("--db", str(database), "bootsvc", "run", "--address", str(address),
                       "--interface", REPLICA_INTERFACE, "--services", "heartbeat",
                       "--state-dir", str(state_dir), "--set", f"heartbeat.role={role}")


def use_uplink(database: Database) -> Cluster:
    """The gateway's NAT goes out of the lab's uplink interface."""
    return database.update("lab up", f"gateway_uplink {UPLINK_INTERFACE}",
                           lambda c: changes.set_settings(c, dataclasses.replace(
                               c.required_settings(), gateway_uplink=UPLINK_INTERFACE)))


def start(lab: Lab, cluster: Cluster) -> None:
    """The world for a running lab with its DNS and NTP servers, and the gateway pair on its
    first two replicas."""
    if cluster.settings is None:
        return
    replicas = lab.plan.replicas[:len(ROLES)]
    uplink = plan(cluster.settings, len(replicas))
    lab.record.add_namespace(f"{lab.plan.prefix}-world")
    world = make_world(lab.netns, uplink, [Namespace(r.namespace) for r in replicas])
    _serve(lab, world, uplink, cluster.settings)
    use_uplink(Database(lab.paths.database))
    for replica, role in zip(replicas, ROLES, strict=False):
        lab.spawn(f"heartbeat-{replica.name}", replica.namespace,
                  heartbeat_command(lab.paths.database,
                                    lab.paths.replica_dir(replica.name) / "heartbeat",
                                    replica.address, role),
                  lab.paths.replica_dir(replica.name) / "heartbeat.log")


def start_for_nodes(lab: Lab, cluster: Cluster) -> None:
    """The world for a node-image lab, whose gateway pair runs on the nodes themselves: the
    uplink segment is a bridge UPLINK_BRIDGE in the hub (QEMU opens taps in its own namespace),
    holding the gateway nodes' uplink taps (lab.start_nodes) and a veth to the world's bridge.
    The hub has no address on either bridge, so nothing crosses from the cluster's segment to
    the world's but what the VRRP master routes. The nodes' uplink addresses are theirs in
    the database; they must be on the world's network and not one of its own."""
    settings = cluster.required_settings()
    gateways = [p.node for p in lab.plan.nodes if p.uplink_tap]
    if not gateways:
        return
    uplink = plan(settings, len(gateways))
    for node in gateways:
        address = node.uplink_address
        assert address is not None      # plan._node_plan gives an uplink tap only with one
        if address.network != uplink.network or address.ip in uplink.outside:
            raise VlxError(f"{node.name}'s uplink_address {address} must be on the lab's "
                           f"world network {uplink.network} and none of "
                           f"{', '.join(map(str, uplink.outside))}", "--inventory")
    lab.record.add_namespace(f"{lab.plan.prefix}-world")
    world = make_world(lab.netns, uplink, [])
    hub = Namespace(lab.plan.hub)
    lab.netns.bridge(hub, UPLINK_BRIDGE)
    lab.netns.plug(hub, UPLINK_BRIDGE, world, WORLD_LEG)
    with world.netlink() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=WORLD_LEG)[0],
                 master=ipr.link_lookup(ifname=WORLD_BRIDGE)[0])
    _serve(lab, world, uplink, settings)


def _serve(lab: Lab, world: Namespace, uplink: UplinkPlan, settings: Settings) -> None:
    directory = lab.plan.state_dir / "world"
    for name, cmd in world_servers(uplink, settings, directory).items():
        lab.spawn(name, world.name, cmd, directory / f"{name}.log")
