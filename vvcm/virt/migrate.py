"""Moving VMs between nodes: `migrate` one VM live (libvirt peer-to-peer: the source libvirtd
talks to the destination's itself), `drain` every VM off a node.

Order of a migration: check the target has room (the database would refuse it), make the VC's
network on the target and peer every node with it, migrate, then record the new placement and
drop the source's network if no VM of the VC is left there. A failed migration leaves the VM
running where it was, and the target's network as it was before.
"""

from __future__ import annotations

import dataclasses
import time

import libvirt

from .. import changes
from ..db import Database
from ..errors import VlxError
from ..model import VM, Cluster
from ..placement import place
from . import network, secrets
from .connect import connection, error_text, peer_uri
from .lifecycle import find_domain

LIVE_FLAGS = (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_PEER2PEER
              | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
              | libvirt.VIR_MIGRATE_ABORT_ON_ERROR)
OFFLINE_FLAGS = (libvirt.VIR_MIGRATE_OFFLINE | libvirt.VIR_MIGRATE_PEER2PEER
                 | libvirt.VIR_MIGRATE_PERSIST_DEST | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)


@dataclasses.dataclass(frozen=True)
class Migration:
    vm: str
    source: str
    target: str
    seconds: float
    live: bool
    downtime_ms: int | None


def _vm(cluster: Cluster, vc: str, name: str) -> VM:
    cluster.vc(vc)
    for vm in cluster.vms_of(vc):
        if vm.name == name:
            return vm
    raise VlxError(f"VC {vc} has no VM named {name!r}")


def migrate(db: Database, vc_name: str, vm_name: str, target: str) -> Migration:
    cluster = db.load()
    vm = _vm(cluster, vc_name, vm_name)
    target_node = cluster.node(target)
    if vm.node == target:
        raise VlxError(f"{vm.name} is on {target} already")
    changes.move_vm(cluster, vm.name, target)  # no room there: refused before anything moves
    before = network.hosting_nodes(cluster, vc_name)
    during = network.node_plans(cluster, vc_name, before + [target])
    made: dict[str, list[str]] = {}
    try:
        for plan in during:
            made[plan.node] = network.ensure(plan)
    except BaseException:
        _undo_networks(cluster, vc_name, before, during, made)
        raise
    target_secrets: list[str] = []
    started = time.monotonic()
    try:
        with connection(cluster, target_node) as destination:
            # An iSCSI disk logs in again from the target: its CHAP secret must be there.
            target_secrets = secrets.ensure(destination, cluster, [vm], target)
        with connection(cluster, cluster.node(vm.node)) as source:
            domain = find_domain(source, vm.name)
            if domain is None:
                raise VlxError(f"{vm.name} has no domain on {vm.node}: nothing to migrate")
            live = bool(domain.isActive())
            flags = LIVE_FLAGS if live else OFFLINE_FLAGS
            if cluster.settings and cluster.settings.storage_shared_unseen:
                flags |= libvirt.VIR_MIGRATE_UNSAFE
            try:
                domain.migrateToURI3(peer_uri(cluster, target_node), {}, flags)
            except libvirt.libvirtError as err:
                raise VlxError(f"migration of {vm.name} to {target} failed, it stays on "
                               f"{vm.node}: {error_text(err)}") from None
    except BaseException:
        if target_secrets:
            with connection(cluster, target_node) as destination:
                secrets.remove(destination, cluster, [vm], only=target_secrets)
        _undo_networks(cluster, vc_name, before, during, made)
        raise
    seconds = time.monotonic() - started
    with connection(cluster, cluster.node(vm.node)) as source:
        secrets.remove(source, cluster, [vm])
    downtime = _downtime(cluster, target, vm.name) if live else None
    cluster = db.update("vc migrate", f"{vm.name} {vm.node} -> {target}",
                        lambda c: changes.move_vm(c, vm.name, target))
    after = network.hosting_nodes(cluster, vc_name)
    for plan in network.node_plans(cluster, vc_name, after):
        network.ensure(plan)
    if vm.node not in after:
        for plan in during:
            if plan.node == vm.node:
                network.remove(plan)
    return Migration(vm.name, vm.node, target, seconds, live, downtime)


def _undo_networks(cluster: Cluster, vc_name: str, before: list[str],
                   during: list[network.NodePlan], made: dict[str, list[str]]) -> None:
    """The VC's networks as they were before a migration that did not happen."""
    for plan in network.node_plans(cluster, vc_name, before):
        network.ensure(plan)  # peers as they were
    for plan in during:
        if plan.node not in before and made.get(plan.node):
            network.remove(plan)


def _downtime(cluster: Cluster, node: str, name: str) -> int | None:
    """The downtime the destination measured (ms), when its libvirt keeps the statistics."""
    try:
        with connection(cluster, cluster.node(node)) as conn:
            domain = find_domain(conn, name)
            if domain is None:
                return None
            stats = domain.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED
                                    | libvirt.VIR_DOMAIN_JOB_STATS_KEEP_COMPLETED)
    except (libvirt.libvirtError, VlxError):
        return None
    value = stats.get("downtime")
    return int(value) if value is not None else None


def drain(db: Database, node: str) -> list[Migration]:
    """Migrate every VM off `node`, each to where placement would put it now; stops at the
    first failure (the VMs moved so far stay moved, and the database says so)."""
    cluster = db.load()
    cluster.node(node)
    moved = []
    for vm in cluster.vms_on(node):
        cluster = db.load()
        others = [n for n in cluster.nodes if n.name != node]
        placed = [v for v in cluster.vms if v.name != vm.name]
        vc = cluster.vc(vm.vc)
        target = place(vc, [vm.name], others, cluster.required_settings(), placed, cluster.vcs)[0]
        moved.append(migrate(db, vm.vc, vm.name, target))
    return moved
