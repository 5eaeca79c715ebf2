"""The cluster model: frozen values every area reads, and nothing else of the project.

A `Cluster` is one generation of the database, whole: settings, physical nodes, virtual
clusters with their VMs, and volumes. Boot services compute every answer from a `Cluster`, so
two replicas holding the same generation answer the same.
"""

from __future__ import annotations

import dataclasses
import ipaddress
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
# auto: KVM where the node's libvirt offers it, plain QEMU (TCG) where it does not.
HYPERVISORS = ("auto", "kvm", "qemu", "xen-pv", "xen-hvm")


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
    hypervisor: str = setting(
        f"what runs the VMs, one of {', '.join(HYPERVISORS)} (auto: KVM where the node's "
        "libvirt offers it, else QEMU's TCG)", lambda v: _one_of(v, HYPERVISORS),
        default="auto")
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
        "check", lambda v: _bool(v), default=False, metavar="BOOL")
    vlan_uplink: str = setting("the node interface that carries VC VLANs (VCs with a vlan id)",
                               lambda v: _ifname(v), default="eth0", metavar="IFNAME")


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
    libvirt_uri: str | None = setting(
        "this node's libvirt URI, instead of the cluster's libvirt_uri (the lab's unix "
        "sockets, say)", lambda v: _uri_template(v), default=None, metavar="URI")
    netns: str | None = setting(
        "network namespace that stands for this node (lab nodes): VC bridges are made there",
        lambda v: _ifname(v), default=None, metavar="NAME")


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


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise ValueError("expected true or false")


def _path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/") or "\0" in value:
        raise ValueError("expected an absolute path")
    return value


def _ifname(value: object) -> str:
    # Linux interface and namespace names: at most 15 bytes, no '/', no white space.
    if not isinstance(value, str) or not 0 < len(value) <= 15 or any(
            c in value for c in "/: \t\n\0"):
        raise ValueError("expected an interface name of 1-15 characters")
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
