"""The cluster model: frozen values every area reads, and nothing else of the project.

A `Cluster` is one generation of the database, whole: settings, physical nodes, virtual
clusters with their VMs, and volumes. Boot services compute every answer from a `Cluster`, so
two replicas holding the same generation answer the same.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from collections.abc import Iterator
from functools import cached_property

from .errors import NotFound
from .fields import (
    choice_list,
    dump_address_range,
    dump_list,
    dump_memory_mib,
    dump_str,
    parse_address_range,
    parse_cidr,
    parse_count,
    parse_domain,
    parse_ipv4,
    parse_ipv4_list,
    parse_mac,
    parse_memory_mib,
    parse_name,
    parse_ratio,
    parse_seconds,
    ranged_int,
    setting,
)

ROLES = ("gateway-primary", "gateway-backup", "storage", "metamaster")
VOLUME_KINDS = ("golden", "snapshot")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """Cluster-wide settings: the cluster network and how VMs may share nodes."""

    name: str = setting("cluster name, also the base of iSCSI target names", parse_name,
                        default="virtualinux")
    domain: str = setting("DNS domain of the cluster network", parse_domain)
    cidr: ipaddress.IPv4Network = setting("the cluster network", parse_cidr, dump_str,
                                          metavar="CIDR")
    gateway_vip: ipaddress.IPv4Address = setting(
        "gateway address held by the gateway-primary/backup pair", parse_ipv4, dump_str,
        metavar="IP")
    upstream_dns: tuple[ipaddress.IPv4Address, ...] = setting(
        "DNS servers outside the cluster, reached through the gateway", parse_ipv4_list,
        dump_list, default=(), metavar="IP,...")
    ntp_servers: tuple[ipaddress.IPv4Address, ...] = setting(
        "NTP servers outside the cluster, reached through the gateway", parse_ipv4_list,
        dump_list, default=(), metavar="IP,...")
    lease_time: int = setting("DHCP lease time in seconds", parse_seconds, default=3600)
    discovery_pool: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None = setting(
        "FIRST-LAST addresses DHCP hands to unknown MACs, so a metamaster learns new nodes "
        "(default: unknown MACs get no answer)", parse_address_range, dump_address_range,
        default=None, metavar="FIRST-LAST")
    cpu_overcommit: float = setting("VCPUs a node may carry per physical CPU", parse_ratio,
                                    default=1.0)
    memory_overcommit: float = setting("VM memory a node may carry per MiB it has",
                                       parse_ratio, default=1.0)
    # The gateway heartbeat (VRRPv3, RFC 5798) of the gateway-primary/backup pair.
    vrrp_id: int = setting("VRRP virtual router id of the gateway pair (VRID; unique on the "
                           "cluster network)", ranged_int(1, 255), default=51)
    vrrp_interval: float = setting(
        "seconds between the gateway master's VRRP advertisements (0.01-40.95, in steps of "
        "0.01); the backup takes over after about 3.5 of them", lambda v: _centiseconds(v),
        default=1.0)
    vrrp_preempt_delay: float = setting(
        "seconds the gateway-primary, back up, leaves the address with the backup before "
        "taking it over", lambda v: _preempt_delay(v), default=0.0)
    vrrp_priority_primary: int = setting("VRRP priority of the gateway-primary node",
                                         ranged_int(1, 254), default=200)
    vrrp_priority_backup: int = setting("VRRP priority of the gateway-backup node",
                                        ranged_int(1, 254), default=100)
    gateway_uplink: str | None = setting(
        "interface of the gateway pair that leads out; the master masquerades the cluster "
        "network out of it (default: no NAT, the VIP only)", lambda v: _interface(v),
        default=None, metavar="IF")
    vrrp_vmac: bool = setting(
        "the gateway master answers for the VIP with the VRRP virtual MAC 00:00:5e:00:01:VRID "
        "(on a macvlan), so hosts need no new ARP entry after a takeover", lambda v: _boolean(v),
        default=False, metavar="true|false")
    vrrp_track_uplink: bool = setting(
        "while gateway_uplink has no carrier, the gateway node's VRRP priority drops by 150, "
        "so the other node of the pair takes the gateway over", lambda v: _boolean(v),
        default=False, metavar="true|false")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Node:
    """A physical, diskless node of the cluster network."""

    name: str = setting("host name (a DNS label)", parse_name)
    mac: str = setting("boot MAC address", parse_mac)
    ip: ipaddress.IPv4Address = setting("address on the cluster network", parse_ipv4, dump_str)
    cpus: int = setting("physical CPUs", parse_count)
    memory: int = setting("memory, e.g. 4GiB (an integer means MiB)", parse_memory_mib,
                          dump_memory_mib)
    roles: tuple[str, ...] = setting(f"roles, any of {', '.join(ROLES)}", choice_list(ROLES),
                                     list, default=(), metavar="ROLE,...")


@dataclasses.dataclass(frozen=True, kw_only=True)
class VirtualCluster:
    """A named set of VMs on a private network of its own."""

    name: str = setting("VC name (a DNS label); its VMs are NAME-1, NAME-2, ...", parse_name)
    vms: int = setting("number of VMs", ranged_int(1, 4096))
    vcpus: int = setting("VCPUs per VM", ranged_int(1, 512))
    memory: int = setting("memory per VM, e.g. 512MiB", parse_memory_mib, dump_memory_mib)
    cidr: ipaddress.IPv4Network = setting("the VC's private network", parse_cidr, dump_str,
                                          metavar="CIDR")
    image: str = setting("guest image the VMs' volumes are snapshots of", parse_name,
                         default="guest")
    vxlan: int | None = setting("VXLAN id of the private network (default: the lowest free)",
                                ranged_int(1, 2**24 - 1), default=None)
    vlan: int | None = setting("802.1Q VLAN id instead of VXLAN (for real switches)",
                               ranged_int(1, 4094), default=None)


@dataclasses.dataclass(frozen=True)
class VM:
    """One VM of a VC; MAC and IP are derived from names, so every node computes the same."""

    name: str
    vc: str
    index: int
    node: str
    mac: str
    ip: ipaddress.IPv4Address
    volume: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Volume:
    """A golden volume or a copy-on-write snapshot of one, and where it is exported."""

    name: str = setting("volume name", parse_name)
    kind: str = setting("golden or snapshot", lambda v: _one_of(v, VOLUME_KINDS))
    backend: str = setting("storage backend, e.g. reflink, lvm-thin, qcow2", parse_name)
    path: str = setting("where the backend keeps it", lambda v: _text(v))
    size: int = setting("size in bytes", ranged_int(0, 2**63 - 1))
    origin: str | None = setting("golden volume it was cloned from", parse_name, default=None)
    owner: str | None = setting("node or VM whose disk it is", parse_name, default=None)
    iqn: str | None = setting("iSCSI target name it is exported as", lambda v: _text(v),
                              default=None)
    portal: str | None = setting("iSCSI portal ADDRESS:PORT", lambda v: _text(v), default=None)


@dataclasses.dataclass(frozen=True)
class Credential:
    """A secret the tools generate for an owner (a node's iSCSI CHAP login, say)."""

    owner: str
    username: str
    secret: str


@dataclasses.dataclass(frozen=True)
class Change:
    generation: int
    time: str
    user: str
    action: str
    detail: str


@dataclasses.dataclass(frozen=True)
class Cluster:
    """One generation of the whole database."""

    generation: int
    settings: Settings | None
    nodes: tuple[Node, ...] = ()
    vcs: tuple[VirtualCluster, ...] = ()
    vms: tuple[VM, ...] = ()
    volumes: tuple[Volume, ...] = ()
    credentials: tuple[Credential, ...] = ()

    @cached_property
    def _nodes_by_name(self) -> dict[str, Node]:
        return {node.name: node for node in self.nodes}

    @cached_property
    def nodes_by_mac(self) -> dict[str, Node]:
        return {node.mac: node for node in self.nodes}

    def node(self, name: str) -> Node:
        try:
            return self._nodes_by_name[name]
        except KeyError:
            raise NotFound(f"no node named {name!r}") from None

    def vc(self, name: str) -> VirtualCluster:
        for vc in self.vcs:
            if vc.name == name:
                return vc
        raise NotFound(f"no virtual cluster named {name!r}")

    def volume(self, name: str) -> Volume:
        for volume in self.volumes:
            if volume.name == name:
                return volume
        raise NotFound(f"no volume named {name!r}")

    def credential(self, owner: str) -> Credential | None:
        for credential in self.credentials:
            if credential.owner == owner:
                return credential
        return None

    def vms_of(self, vc: str) -> tuple[VM, ...]:
        return tuple(vm for vm in self.vms if vm.vc == vc)

    def vms_on(self, node: str) -> tuple[VM, ...]:
        return tuple(vm for vm in self.vms if vm.node == node)

    def fqdn(self, name: str) -> str:
        return f"{name}.{self.settings.domain}" if self.settings else name

    def nodes_with_role(self, role: str) -> tuple[Node, ...]:
        return tuple(node for node in self.nodes if role in node.roles)

    def networks(self) -> Iterator[dict[str, object]]:
        """The cluster network first, then one private network per VC."""
        if self.settings:
            yield {"name": "cluster", "cidr": str(self.settings.cidr),
                   "gateway": str(self.settings.gateway_vip)}
        for vc in self.vcs:
            net: dict[str, object] = {"name": vc.name, "cidr": str(vc.cidr)}
            if vc.vlan is not None:
                net["vlan"] = vc.vlan
            else:
                net["vxlan"] = vc.vxlan
            yield net


def _one_of(value: object, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"choose from {', '.join(choices)}")
    return str(value)


def _centiseconds(value: object) -> float:
    """Seconds in the 12-bit centisecond field of a VRRPv3 advertisement."""
    seconds = _number(value)
    centis = round(seconds * 100)
    if not 1 <= centis <= 4095 or abs(centis - seconds * 100) > 1e-6:
        raise ValueError("must be 0.01 to 40.95 seconds, in steps of 0.01")
    return centis / 100


def _preempt_delay(value: object) -> float:
    seconds = _number(value)
    if not 0 <= seconds <= 3600:
        raise ValueError("must be 0 to 3600 seconds")
    return seconds


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("not a number")
    try:
        number = float(value)
    except ValueError:
        raise ValueError("not a number") from None
    if not math.isfinite(number):
        raise ValueError("not a finite number")
    return number


def _boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ValueError("expected true or false")


def _interface(value: object) -> str:
    # Linux interface names: at most 15 bytes, no slash, no white space.
    if not isinstance(value, str) or not re.fullmatch(r"[^/\s:]{1,15}", value) \
            or value in (".", ".."):
        raise ValueError("expected a network interface name (1-15 characters)")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError("expected a non-empty string")
    return value
