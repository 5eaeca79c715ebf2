"""Changes to the cluster: pure functions from one `Cluster` to the next, each validated whole.

The database applies one of these inside a write transaction; if it raises, nothing is stored.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping

from .allocate import free_vxlan_id, service_address, vm_addresses, vm_mac, vm_name
from .errors import NotFound, VlxError
from .model import (
    NODE_SECRET_PREFIXES,
    VM,
    Cluster,
    Node,
    Role,
    Settings,
    VirtualCluster,
    Volume,
)
from .placement import node_load, place


def set_settings(cluster: Cluster, settings: Settings) -> Cluster:
    return validated(dataclasses.replace(cluster, settings=settings))


def add_node(cluster: Cluster, node: Node) -> Cluster:
    if cluster.has_node(node.name):
        raise VlxError(f"node {node.name} exists already")
    return validated(dataclasses.replace(cluster, nodes=cluster.nodes + (node,)))


def add_nodes(cluster: Cluster, nodes: Iterable[Node]) -> Cluster:
    """Many nodes as one change, validated once (an import of 10,000 nodes stays linear)."""
    return validated(dataclasses.replace(cluster, nodes=cluster.nodes + tuple(nodes)))


def remove_node(cluster: Cluster, name: str) -> Cluster:
    cluster.node(name)
    hosted = [vm.name for vm in cluster.vms_on(name)]
    if hosted:
        raise VlxError(f"node {name} hosts {len(hosted)} VMs ({', '.join(hosted)}): "
                       "remove their VCs first")
    owned = [volume.name for volume in cluster.volumes if volume.owner == name]
    if owned:
        raise VlxError(f"node {name} owns volumes ({', '.join(owned)}): remove them first")
    nodes = tuple(node for node in cluster.nodes if node.name != name)
    # Its host key and store certificate go with it (a node added again gets new ones).
    gone = {prefix + name for prefix in NODE_SECRET_PREFIXES}
    credentials = tuple(c for c in cluster.credentials if c.owner not in gone)
    return validated(dataclasses.replace(cluster, nodes=nodes, credentials=credentials))


def define_vc(cluster: Cluster, vc: VirtualCluster,
              placement: Mapping[str, str] | None = None) -> Cluster:
    """Add a VC with its VMs: names, MACs and IPs derived, nodes chosen by `place` unless the
    inventory gives an explicit `placement` (as `vlx db export` writes it)."""
    if cluster.settings is None:
        raise VlxError("the cluster has no settings yet: import an inventory first")
    if cluster.has_vc(vc.name):
        raise VlxError(f"virtual cluster {vc.name} exists already")
    if vc.vxlan is not None and vc.vlan is not None:
        raise VlxError(f"VC {vc.name}: give a vxlan or a vlan id, not both")
    if vc.vxlan is None and vc.vlan is None:
        vc = dataclasses.replace(vc, vxlan=free_vxlan_id(v.vxlan for v in cluster.vcs
                                                         if v.vxlan is not None))
    names = [vm_name(vc.name, index) for index in range(1, vc.vms + 1)]
    vcs = cluster.vcs + (vc,)
    if placement is not None:
        unknown = sorted(set(placement) - set(names))
        if unknown:
            raise VlxError(f"VC {vc.name}: placement names {unknown[0]!r}, which is not one of "
                           f"its VMs ({names[0]} .. {names[-1]})")
        missing = [name for name in names if name not in placement]
        chosen = dict(placement)
        if missing:
            chosen.update(zip(missing, place(vc, missing, cluster.nodes, cluster.settings,
                                             cluster.vms, vcs), strict=True))
        nodes = [chosen[name] for name in names]
    else:
        nodes = place(vc, names, cluster.nodes, cluster.settings, cluster.vms, vcs)
    taken_macs = {node.mac for node in cluster.nodes} | {vm.mac for vm in cluster.vms}
    vms = []
    addresses = vm_addresses(vc.cidr, vc.vms, _service_addresses(vc.cidr))
    for index, (name, node, ip) in enumerate(zip(names, nodes, addresses, strict=True), start=1):
        mac = vm_mac(vc.name, name, taken_macs)
        taken_macs.add(mac)
        vms.append(VM(name=name, vc=vc.name, index=index, node=node, mac=mac, ip=ip))
    return validated(dataclasses.replace(cluster, vcs=vcs, vms=cluster.vms + tuple(vms)))


def _service_addresses(network: ipaddress.IPv4Network) -> list[ipaddress.IPv4Address]:
    """The VC's service address, which no VM may take (allocate.service_address)."""
    address = service_address(network)
    return [address.ip] if address is not None else []


def remove_vc(cluster: Cluster, name: str) -> Cluster:
    cluster.vc(name)
    vm_names = {vm.name for vm in cluster.vms_of(name)}
    owned = [volume.name for volume in cluster.volumes if volume.owner in vm_names]
    if owned:
        raise VlxError(f"VC {name} still has volumes ({', '.join(owned)}): "
                       f"remove them first (`vlx vc remove {name} --volumes` does both)")
    return validated(dataclasses.replace(
        cluster,
        vcs=tuple(vc for vc in cluster.vcs if vc.name != name),
        vms=tuple(vm for vm in cluster.vms if vm.vc != name)))


def _not_a_host(address, net) -> str:
    if address == net.network_address:
        return f"is the network address of the cluster network {net}, not a host address"
    if address == net.broadcast_address:
        return f"is the broadcast address of the cluster network {net}, not a host address"
    return f"is outside the cluster network {net}"


def put_volumes(cluster: Cluster, volumes: Iterable[Volume]) -> Cluster:
    """Add volumes, or replace those of the same name (an export recorded, a size grown)
    where they stand, so listings keep their order."""
    new = {volume.name: volume for volume in volumes}
    kept = tuple(new.pop(volume.name, volume) for volume in cluster.volumes)
    return validated(dataclasses.replace(cluster, volumes=kept + tuple(new.values())))


def remove_volumes(cluster: Cluster, names: Iterable[str]) -> Cluster:
    gone = set(names)
    for name in gone:
        cluster.volume(name)
    clones = [v.name for v in cluster.volumes if v.origin in gone and v.name not in gone]
    if clones:
        raise VlxError(f"volumes {', '.join(clones)} are snapshots of it: remove them first")
    return validated(dataclasses.replace(
        cluster, volumes=tuple(v for v in cluster.volumes if v.name not in gone)))


def validated(cluster: Cluster) -> Cluster:
    """The cluster itself if every invariant holds; otherwise VlxError naming the first broken."""
    settings = cluster.settings
    if settings is None:
        if cluster.nodes or cluster.vcs:
            raise VlxError("nodes and VCs need cluster settings (domain, cidr, gateway_vip)")
        _check_volumes(cluster)
        return cluster
    if settings.store_election_ms < 5 * settings.store_heartbeat_ms:
        raise VlxError(f"store_election_ms {settings.store_election_ms} is under 5 heartbeats "
                       f"of store_heartbeat_ms {settings.store_heartbeat_ms} (etcd refuses "
                       "that)", "cluster")
    net = settings.cidr
    if not _is_host(settings.gateway_vip, net):
        raise VlxError(f"gateway_vip {settings.gateway_vip} is not a host address of {net}",
                       "cluster")
    _unique("node name", ((node.name, f"node {node.name}") for node in cluster.nodes))
    _unique("MAC", [(node.mac, f"node {node.name}") for node in cluster.nodes]
            + [(vm.mac, f"VM {vm.name}") for vm in cluster.vms])
    _unique("cluster IP", [(node.ip, f"node {node.name}") for node in cluster.nodes]
            + [(settings.gateway_vip, "gateway_vip")])
    if settings.discovery_pool is not None:
        first, last = settings.discovery_pool
        if not (_is_host(first, net) and _is_host(last, net)):
            raise VlxError(f"discovery_pool {first}-{last} is not inside {net}", "cluster")
        taken = [(node.ip, f"node {node.name}") for node in cluster.nodes] + [
            (settings.gateway_vip, "gateway_vip")]
        for address, owner in taken:
            if first <= address <= last:
                raise VlxError(f"discovery_pool {first}-{last} holds {address} of {owner}",
                               "cluster")
    for node in cluster.nodes:
        if not _is_host(node.ip, net):
            raise VlxError(f"ip {node.ip} {_not_a_host(node.ip, net)}", f"node {node.name}")
    for role in (Role.GATEWAY_PRIMARY, Role.GATEWAY_BACKUP):
        holders = [node.name for node in cluster.nodes_with_role(role)]
        if len(holders) > 1:
            raise VlxError(f"only one node may be {role}, not {', '.join(holders)}")
    for node in cluster.nodes:
        if {"gateway-primary", "gateway-backup"} <= set(node.roles):
            raise VlxError("a node cannot be both gateway-primary and gateway-backup",
                           f"node {node.name}")
    _unique("VC name", ((vc.name, "VC") for vc in cluster.vcs))
    clash = {node.name for node in cluster.nodes} & (
        {vc.name for vc in cluster.vcs} | {vm.name for vm in cluster.vms})
    if clash:
        raise VlxError(f"name {sorted(clash)[0]!r} is both a node and a VC or VM (DNS needs "
                       "one meaning per name)")
    networks = [("the cluster network", net)] + [(f"VC {vc.name}", vc.cidr) for vc in cluster.vcs]
    for i, (owner_a, a) in enumerate(networks):
        for owner_b, b in networks[i + 1:]:
            if a.overlaps(b):
                raise VlxError(f"{owner_b}'s network {b} overlaps {owner_a}'s {a}")
    _unique("VXLAN id", ((vc.vxlan, f"VC {vc.name}") for vc in cluster.vcs
                         if vc.vxlan is not None))
    _unique("VLAN id", ((vc.vlan, f"VC {vc.name}") for vc in cluster.vcs
                        if vc.vlan is not None))
    for vc in cluster.vcs:
        if vc.vxlan is not None and vc.vlan is not None:
            raise VlxError("give a vxlan or a vlan id, not both", f"VC {vc.name}")
    node_names = {node.name for node in cluster.nodes}
    for vm in cluster.vms:
        if vm.node not in node_names:
            raise NotFound(f"VM {vm.name} is placed on unknown node {vm.node!r}")
    vcpus, memory = node_load(cluster.vms, cluster.vcs)
    for node in cluster.nodes:
        if vcpus[node.name] > node.cpus * settings.cpu_overcommit:
            raise VlxError(f"node {node.name} would carry {vcpus[node.name]} VCPUs on "
                           f"{node.cpus} CPUs, over cpu_overcommit {settings.cpu_overcommit:g}")
        if memory[node.name] > node.memory * settings.memory_overcommit:
            raise VlxError(f"node {node.name} would carry {memory[node.name]} MiB of VMs on "
                           f"{node.memory} MiB, over memory_overcommit "
                           f"{settings.memory_overcommit:g}")
    _check_volumes(cluster)
    return cluster


def _check_volumes(cluster: Cluster) -> None:
    _unique("volume name", ((volume.name, "volume") for volume in cluster.volumes))
    kinds = {volume.name: volume.kind for volume in cluster.volumes}
    for volume in cluster.volumes:
        if volume.kind == "snapshot" and kinds.get(volume.origin or "") != "golden":
            raise VlxError(f"snapshot's origin {volume.origin!r} is not a golden volume",
                           f"volume {volume.name}")
        if volume.kind == "golden" and volume.origin is not None:
            raise VlxError("a golden volume has no origin", f"volume {volume.name}")
    _unique("iSCSI target name", ((v.iqn, f"volume {v.name}") for v in cluster.volumes
                                  if v.iqn))


def _unique(what: str, values: Iterable[tuple[object, str]]) -> None:
    """`values` are (value, owner) pairs; a value held twice names both owners."""
    seen: dict[object, str] = {}
    for value, owner in values:
        if value in seen:
            raise VlxError(f"duplicate {what} {value} ({seen[value]} and {owner})", owner)
        seen[value] = owner


def _is_host(address, network) -> bool:
    return address in network and address not in (network.network_address,
                                                   network.broadcast_address)


def move_vm(cluster: Cluster, vm_name: str, node: str) -> Cluster:
    """VM `vm_name` placed on `node` (after a migration), if the node has room for it."""
    cluster.node(node)
    if not any(vm.name == vm_name for vm in cluster.vms):
        raise NotFound(f"no VM named {vm_name!r}")
    return validated(dataclasses.replace(cluster, vms=tuple(
        dataclasses.replace(vm, node=node) if vm.name == vm_name else vm
        for vm in cluster.vms)))
