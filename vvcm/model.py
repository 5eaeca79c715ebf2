"""The cluster model: frozen values every area reads, and nothing else of the project.

A `Cluster` is one generation of the database, whole: settings, physical nodes, virtual
clusters with their VMs, and volumes. Boot services compute every answer from a `Cluster`, so
two replicas holding the same generation answer the same.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import math
import re
from collections.abc import Callable, Iterable, Iterator
from functools import cached_property
from typing import TypeVar

from .errors import NotFound, VlxError
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
    parse_ipv4_interface,
    parse_ipv4_list,
    parse_kernel_args,
    parse_mac,
    parse_memory_mib,
    parse_name,
    parse_ratio,
    parse_seconds,
    parse_ssh_public_keys,
    ranged_int,
    setting,
)


class Role(enum.StrEnum):
    """What a node does beyond hosting VMs. A StrEnum: TOML, JSON and comparisons with the
    plain names keep working."""

    GATEWAY_PRIMARY = "gateway-primary"
    GATEWAY_BACKUP = "gateway-backup"
    STORAGE = "storage"
    METAMASTER = "metamaster"
    # When any node has it, only those nodes are DHCP replicas (bootsvc/balance.py).
    DHCP = "dhcp"
    # An etcd member of the replicated store; with any, every node boots with the store's
    # endpoints (vlx.store=) and serves from a local copy of it.
    DB = "db"


GATEWAY_ROLES = (Role.GATEWAY_PRIMARY, Role.GATEWAY_BACKUP)


class VolumeKind(enum.StrEnum):
    GOLDEN = "golden"
    SNAPSHOT = "snapshot"       # a copy-on-write clone of a golden volume


class StorageBackend(enum.StrEnum):
    """Where a volume's bytes live; the module storage/NAME (with _ for -) implements it."""

    REFLINK = "reflink"
    LVM_THIN = "lvm-thin"
    QCOW2 = "qcow2"


ROLES = tuple(Role)
# The credential holding the replicated store's cluster CA (cluster_ca); not a DNS label, so
# no node or VM can own it.
STORE_CA_OWNER = "@store-ca"
# The intermediate CA that issues each node's store certificate (cluster_ca.node_pair).
STORE_NODE_CA_OWNER = "@store-node-ca"
# Per-node secrets other than the CHAP login (owner = the node's name): the node's SSH host
# key (host_keys), a credential of owner PREFIX + node name, which is not a DNS label either.
SSH_HOST_KEY_PREFIX = "@ssh-host-key:"
NODE_SECRET_PREFIXES = (SSH_HOST_KEY_PREFIX,)
STORE_CLIENT_PORT = 2379    # etcd's client port on every member


class Hypervisor(enum.StrEnum):
    """What runs the VMs. auto: KVM where the node's libvirt offers it, plain QEMU (TCG) where
    it does not."""

    AUTO = "auto"
    KVM = "kvm"
    QEMU = "qemu"
    XEN_PV = "xen-pv"
    XEN_HVM = "xen-hvm"


HYPERVISORS = tuple(Hypervisor)


class BootFilesOver(enum.StrEnum):
    """How iPXE fetches a node's kernel and initrds: HTTP (fast, the default) or TFTP, for
    networks where HTTP is unwanted (every replica's tftp service serves the same files)."""

    HTTP = "http"
    TFTP = "tftp"


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
    kernel_args: tuple[str, ...] = setting(
        "kernel arguments every node boots with, after its own (e.g. console=ttyS0); every "
        "node renders its netboot tree with them", parse_kernel_args, list, default=(),
        metavar="ARG,...")
    boot_files_over: BootFilesOver = setting(
        "how iPXE fetches kernel and initrds: http (the replicas' http service) or tftp "
        "(networks where HTTP is unwanted)", lambda v: _one_of(v, BootFilesOver), str,
        default=BootFilesOver.HTTP, metavar="http|tftp")
    lease_time: int = setting("DHCP lease time in seconds", parse_seconds, default=3600)
    discovery_pool: tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | None = setting(
        "FIRST-LAST addresses DHCP hands to unknown MACs, so a metamaster learns new nodes "
        "(default: unknown MACs get no answer)", parse_address_range, dump_address_range,
        default=None, metavar="FIRST-LAST")
    dhcp_answering: int = setting(
        "DHCP replicas that answer each client at once, picked by a hash of its MAC among the "
        "nodes with role dhcp (or all nodes); 0: every replica answers", ranged_int(0, 65535),
        default=2)
    dhcp_fallback_secs: int = setting(
        "a client whose DHCP secs field reached this many seconds is answered by every "
        "replica, in case its chosen ones are down", ranged_int(0, 65535), default=3)

    store_heartbeat_ms: int = setting(
        "etcd heartbeat interval of `vlx db serve` members, in ms (etcd's default suits real "
        "hardware; members in TCG guests on a shared machine need more)", ranged_int(10, 10_000),
        default=100)
    store_election_ms: int = setting(
        "etcd election timeout of `vlx db serve` members, in ms (at least 5 heartbeats)",
        ranged_int(50, 50_000), default=1000)
    store_bootstrap: tuple[ipaddress.IPv4Address, ...] = setting(
        "etcd members outside the nodes (a metamaster's or the lab's bootstrap) that the "
        "store URL names before the db nodes: a node booting while the db nodes have not "
        "joined yet reaches the store there; cleared when the bootstrap goes",
        parse_ipv4_list, dump_list, default=(), metavar="IP,...")
    admin_ssh_keys: tuple[str, ...] = setting(
        "SSH public keys (`TYPE BASE64 [COMMENT]`, no options) that may log in as root on "
        "every node: start-up writes them to root's authorized_keys",
        parse_ssh_public_keys, list, default=(), metavar="KEY")
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
    router_advertisements: bool = setting(
        "every node's replica sends IPv6 router advertisements saying \"no default router "
        "here\" (lifetime 0, no prefix): this ends iPXE's ~13 s wait for IPv6 configuration "
        "at every boot; false where switches guard against any RA", lambda v: _boolean(v),
        default=True, metavar="true|false")
    hypervisor: Hypervisor = setting(
        f"what runs the VMs, one of {', '.join(HYPERVISORS)} (auto: KVM where the node's "
        "libvirt offers it, else QEMU's TCG)", lambda v: _one_of(v, Hypervisor), str,
        default=Hypervisor.AUTO)
    libvirt_uri: str = setting(
        "how each node's libvirt is reached; {driver} (qemu or xen), {ip} and {name} are "
        "filled in per node", lambda v: _uri_template(v), default="{driver}+tcp://{ip}/system",
        metavar="URI")
    vm_log_dir: str = setting("where each VM's serial console is logged on its node",
                              lambda v: _text(v), default="/var/log/virtualinux/vms",
                              metavar="DIR")
    storage_shared_unseen: bool = setting(
        "VM disks are on storage every node shares but libvirt cannot tell is shared (the "
        "lab's one host file system): live migrations then skip libvirt's shared-storage "
        "check", lambda v: _boolean(v), default=False, metavar="BOOL")
    vlan_uplink: str = setting("the node interface that carries VC VLANs (VCs with a vlan id)",
                               lambda v: _interface(v), default="eth0", metavar="IFNAME")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Node:
    """A physical, diskless node of the cluster network."""

    name: str = setting("host name (a DNS label)", parse_name)
    mac: str = setting("boot MAC address", parse_mac)
    ip: ipaddress.IPv4Address = setting("address on the cluster network", parse_ipv4, dump_str)
    cpus: int = setting("physical CPUs", parse_count)
    memory: int = setting("memory, e.g. 4GiB (an integer means MiB)", parse_memory_mib,
                          dump_memory_mib)
    roles: tuple[Role, ...] = setting(f"roles, any of {', '.join(ROLES)}",
                                      lambda v: tuple(map(Role, choice_list(ROLES)(v))),
                                      lambda roles: [str(role) for role in roles], default=(),
                                      metavar="ROLE,...")
    libvirt_uri: str | None = setting(
        "this node's libvirt URI, instead of the cluster's libvirt_uri (the lab's unix "
        "sockets, say)", lambda v: _uri_template(v), default=None, metavar="URI")
    netns: str | None = setting(
        "network namespace that stands for this node (lab nodes): VC bridges are made there",
        lambda v: _interface(v), default=None, metavar="NAME")
    uplink_address: ipaddress.IPv4Interface | None = setting(
        "this gateway node's address on the cluster's gateway_uplink, with its prefix (the "
        "start-up puts it there; the master masquerades the cluster network behind it)",
        parse_ipv4_interface, dump_str, default=None, metavar="ADDR/PREFIX")

    @property
    def is_gateway(self) -> bool:
        """One of the gateway pair (it runs the heartbeat and holds the uplink)."""
        return any(role in GATEWAY_ROLES for role in self.roles)


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
    kernel: str | None = setting("kernel to boot the VMs with directly (default: boot the disk)",
                                 lambda v: _path(v), default=None, metavar="PATH")
    initrd: str | None = setting("initrd for the direct kernel boot", lambda v: _path(v),
                                 default=None, metavar="PATH")
    cmdline: str | None = setting("extra kernel command line for the direct kernel boot",
                                  lambda v: _text(v), default=None, metavar="ARGS")


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
    kind: VolumeKind = setting("golden or snapshot", lambda v: _one_of(v, VolumeKind), str)
    backend: StorageBackend = setting(
        f"storage backend, one of {', '.join(StorageBackend)}",
        lambda v: _one_of(v, StorageBackend), str)
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

    # Indexes, built once per generation on first use: a Cluster is frozen, so they never go
    # stale, and every lookup below is O(1) however many nodes, VMs and volumes there are.
    @cached_property
    def _nodes_by_name(self) -> dict[str, Node]:
        return {node.name: node for node in self.nodes}

    @cached_property
    def nodes_by_mac(self) -> dict[str, Node]:
        return {node.mac: node for node in self.nodes}

    @cached_property
    def _vcs_by_name(self) -> dict[str, VirtualCluster]:
        return {vc.name: vc for vc in self.vcs}

    @cached_property
    def _volumes_by_name(self) -> dict[str, Volume]:
        return {volume.name: volume for volume in self.volumes}

    @cached_property
    def _credentials_by_owner(self) -> dict[str, Credential]:
        return {credential.owner: credential for credential in self.credentials}

    @cached_property
    def _vms_by_vc(self) -> dict[str, tuple[VM, ...]]:
        return _group(self.vms, lambda vm: vm.vc)

    @cached_property
    def _vms_by_node(self) -> dict[str, tuple[VM, ...]]:
        return _group(self.vms, lambda vm: vm.node)

    @cached_property
    def _volumes_by_owner(self) -> dict[str, tuple[Volume, ...]]:
        return _group((v for v in self.volumes if v.owner is not None),
                      lambda volume: volume.owner or "")

    def node(self, name: str) -> Node:
        try:
            return self._nodes_by_name[name]
        except KeyError:
            raise NotFound(f"no node named {name!r}") from None

    def has_node(self, name: str) -> bool:
        return name in self._nodes_by_name

    def vc(self, name: str) -> VirtualCluster:
        try:
            return self._vcs_by_name[name]
        except KeyError:
            raise NotFound(f"no virtual cluster named {name!r}") from None

    def has_vc(self, name: str) -> bool:
        return name in self._vcs_by_name

    def volume(self, name: str) -> Volume:
        try:
            return self._volumes_by_name[name]
        except KeyError:
            raise NotFound(f"no volume named {name!r}") from None

    def credential(self, owner: str) -> Credential | None:
        return self._credentials_by_owner.get(owner)

    def secret_owners(self) -> set[str]:
        """The owners whose credentials this cluster keeps: its nodes (CHAP, host key), its
        VMs (CHAP) and the store's CAs."""
        nodes = [node.name for node in self.nodes]
        return ({*nodes, *(vm.name for vm in self.vms), STORE_CA_OWNER, STORE_NODE_CA_OWNER}
                | {prefix + name for prefix in NODE_SECRET_PREFIXES for name in nodes})

    def vms_of(self, vc: str) -> tuple[VM, ...]:
        return self._vms_by_vc.get(vc, ())

    def vms_on(self, node: str) -> tuple[VM, ...]:
        return self._vms_by_node.get(node, ())

    def volumes_owned_by(self, owner: str) -> tuple[Volume, ...]:
        """The volumes of a node or VM, in database order."""
        return self._volumes_by_owner.get(owner, ())

    def required_settings(self) -> Settings:
        """The settings, for work that cannot go on without them (an empty database has
        none until an inventory is imported)."""
        if self.settings is None:
            raise VlxError("the cluster has no settings yet: import an inventory first")
        return self.settings

    def fqdn(self, name: str) -> str:
        return f"{name}.{self.settings.domain}" if self.settings else name

    def nodes_with_role(self, role: Role) -> tuple[Node, ...]:
        return tuple(node for node in self.nodes if role in node.roles)

    def store_url(self) -> str | None:
        """`etcd://IP:2379,...` of the bootstrap members (`store_bootstrap`, first: they answer
        while the db nodes are still joining) and the nodes with role db, or None when there
        are none (the database is then a file)."""
        outside = self.settings.store_bootstrap if self.settings else ()
        addresses = [*outside, *(node.ip for node in self.nodes_with_role(Role.DB))]
        if not addresses:
            return None
        return "etcd://" + ",".join(f"{address}:{STORE_CLIENT_PORT}" for address in addresses)

    def networks(self) -> Iterator[Network]:
        """The cluster network first, then one private network per VC."""
        if self.settings:
            yield Network(name=CLUSTER_NETWORK, cidr=self.settings.cidr,
                          gateway=self.settings.gateway_vip)
        for vc in self.vcs:
            if vc.vlan is not None:
                yield Network(name=vc.name, cidr=vc.cidr, vlan=vc.vlan)
            else:
                yield Network(name=vc.name, cidr=vc.cidr, vxlan=vc.vxlan)


_Item = TypeVar("_Item")


def _group(items: Iterable[_Item], key: Callable[[_Item], str]) -> dict[str, tuple[_Item, ...]]:
    groups: dict[str, list[_Item]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return {name: tuple(members) for name, members in groups.items()}


CLUSTER_NETWORK = "cluster"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Network:
    """The cluster network (it has the gateway) or a VC's private one (a VXLAN or VLAN id)."""

    name: str
    cidr: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address | None = None
    vxlan: int | None = None
    vlan: int | None = None

    def to_json(self) -> dict[str, object]:
        """Name and CIDR, then only what this network has (gateway, vxlan or vlan)."""
        out: dict[str, object] = {"name": self.name, "cidr": str(self.cidr)}
        if self.gateway is not None:
            out["gateway"] = str(self.gateway)
        if self.vlan is not None:
            out["vlan"] = self.vlan
        elif self.gateway is None:
            out["vxlan"] = self.vxlan
        return out


E = TypeVar("E", bound=enum.StrEnum)


def _one_of(value: object, choices: type[E]) -> E:
    if not isinstance(value, str) or value not in set(choices):
        raise ValueError(f"choose from {', '.join(choices)}")
    return choices(value)


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


def _path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise ValueError("expected an absolute path")
    return value


def _uri_template(value: object) -> str:
    text = _text(value)
    try:
        text.format(driver="qemu", ip="198.18.0.1", name="node")
    except (KeyError, IndexError, ValueError) as err:
        raise ValueError(f"bad URI template ({err}): use {{driver}}, {{ip}}, {{name}}") from None
    if "://" not in text:
        raise ValueError("not a libvirt URI like qemu+tcp://{ip}/system")
    return text


def _text(value: object) -> str:
    if not isinstance(value, str) or not value or "\0" in value:
        raise ValueError("expected a non-empty string")
    return value
