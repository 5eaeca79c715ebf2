"""Volume operations as the operator asks for them: golden add, snapshot for nodes or VMs,
export/unexport, grow, remove. Each checks everything it can against the database first, then
changes storage, then records the result in one database generation; if recording fails the
storage it made is removed again, so a fault leaves every volume as it was.

The database decides names: a snapshot is named after the node or VM it belongs to
(`node1-root`, `green-1-disk`), never after a device.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path

from virtualinux.vvcm import changes
from virtualinux.vvcm.db import Database
from virtualinux.vvcm.errors import VlxError
from virtualinux.vvcm.model import Cluster, Role, StorageBackend, Volume, VolumeKind

from . import tgt
from .backend import InUse, backend_class, backend_for
from .naming import (
    ISCSI_PORT,
    NODE_SUFFIX,
    VM_SUFFIX,
    ensure_credentials,
    format_size,
    parse_portal,
    snapshot_name,
    target_iqn,
    volume_name,
)

DEFAULT_POOL = "/var/lib/virtualinux/volumes"


def default_pool() -> str:
    return os.environ.get("VLX_POOL") or DEFAULT_POOL


def cluster_name(cluster: Cluster) -> str:
    if cluster.settings is None:
        raise VlxError("the cluster has no settings yet (its name makes the iSCSI names): "
                       "import an inventory first")
    return cluster.settings.name


def default_portal(cluster: Cluster) -> str:
    """The first storage node's address: where `--export` without `--portal` exports."""
    storage = cluster.nodes_with_role(Role.STORAGE)
    if not storage:
        raise VlxError("no node has the storage role: name the portal with --portal IP[:PORT]")
    return f"{storage[0].ip}:{ISCSI_PORT}"


def add_golden(db: Database, name: str, image: Path, backend: str, pool: str) -> Volume:
    volume_name(name)
    cluster = db.load()
    if any(volume.name == name for volume in cluster.volumes):
        raise VlxError(f"a volume named {name} exists already")
    store = backend_class(backend)(pool)
    path, size = store.add_golden(name, image)
    volume = Volume(name=name, kind=VolumeKind.GOLDEN, backend=StorageBackend(backend),
                    path=path, size=size)
    try:
        db.update("volume golden add", f"{name} from {image}",
                  lambda c: changes.put_volumes(_absent(c, [name]), [volume]))
    except BaseException:
        store.remove(volume)
        raise
    return volume


def owners_of(cluster: Cluster, spec: str | None) -> list[tuple[str, str]]:
    """(owner, "node"|"vm") pairs that `--for SPEC` names: "nodes" (also None), "vms",
    "vc:NAME", or names of nodes/VMs separated by commas."""
    node_names = [node.name for node in cluster.nodes]
    vm_names = [vm.name for vm in cluster.vms]
    if spec in (None, "nodes"):
        return [(name, "node") for name in node_names]
    if spec == "vms":
        return [(name, "vm") for name in vm_names]
    if spec.startswith("vc:"):
        return [(vm.name, "vm") for vm in cluster.vms_of(cluster.vc(spec[3:]).name)]
    candidates = []
    for name in (part.strip() for part in spec.split(",")):
        if name in node_names:
            candidates.append((name, "node"))
        elif name in vm_names:
            candidates.append((name, "vm"))
        else:
            raise VlxError(f"--for {spec}: {name!r} is neither a node nor a VM")
    return candidates


def removal_names(cluster: Cluster, names: Sequence[str], snapshots_of: str | None = None,
                  owners: str | None = None) -> list[str]:
    """The volumes `vlx volume remove NAME... [--snapshots-of GOLDEN] [--for WHO]` means:
    the named ones, every snapshot of GOLDEN, and every volume owned by whom `--for` names
    (`vc:NAME`: the VC's VM disks), each once."""
    chosen = list(dict.fromkeys(names))
    for name in chosen:
        cluster.volume(name)
    if snapshots_of:
        cluster.volume(snapshots_of)
        chosen += [v.name for v in cluster.volumes if v.origin == snapshots_of]
    if owners:
        whose = {owner for owner, _ in owners_of(cluster, owners)}
        chosen += [v.name for v in cluster.volumes if v.owner in whose]
    chosen = list(dict.fromkeys(chosen))
    if not chosen:
        if names or snapshots_of or owners:
            return []
        raise VlxError("name the volumes to remove (or --snapshots-of GOLDEN, --for WHO)")
    return chosen


def choose_owners(cluster: Cluster, golden: str, count: int | None,
                  spec: str | None) -> list[tuple[str, str]]:
    """(owner, "node"|"vm") pairs to snapshot `golden` for.

    `spec`: "nodes", "vms", "vc:NAME", or names of nodes/VMs separated by commas (default:
    nodes). With `count`, the first `count` of those that have no snapshot of `golden` yet.
    """
    candidates = owners_of(cluster, spec)
    if count is None:
        if spec is None:
            raise VlxError("say how many snapshots (--count N) or for whom (--for ...)")
        return candidates
    if count < 1:
        raise VlxError(f"--count {count}: must be at least 1")
    have = {v.owner for v in cluster.volumes if v.origin == golden}
    free = [pair for pair in candidates if pair[0] not in have]
    if len(free) < count:
        raise VlxError(f"--count {count}: only {len(free)} of the {spec or 'nodes'} have no "
                       f"snapshot of {golden} yet")
    return free[:count]


def snapshot_volumes(db: Database, golden_name: str, count: int | None = None,
                     owners: str | None = None, suffix: str | None = None,
                     portal: str | None = None, export: bool = False) -> list[Volume]:
    """Snapshot `golden_name` once per chosen owner, all or none; export them if asked.

    Checks, clones and the record happen under the database's write lock (inside the
    update), so two concurrent commands cannot both take a name, and the cluster is read
    once, not twice (it matters at a thousand nodes).
    """
    store = None
    made: list[Volume] = []

    def change(cluster: Cluster) -> Cluster:
        nonlocal store, portal
        golden = cluster.volume(golden_name)
        if golden.kind != "golden":
            raise VlxError(f"{golden_name} is a snapshot: snapshots are made of golden volumes")
        chosen = choose_owners(cluster, golden_name, count, owners)
        names = [snapshot_name(owner, suffix or (NODE_SUFFIX if kind == "node" else VM_SUFFIX))
                 for owner, kind in chosen]
        _absent(cluster, names)
        store = backend_for(golden)
        clashing = [name for name in names if store.exists(name)]
        if clashing:
            raise VlxError(f"{store.path_for(clashing[0])} exists already in the pool but not "
                           "in the database: remove it or choose another --suffix")
        if golden.iqn:
            raise InUse(f"golden volume {golden_name} is exported read-write: unexport it "
                        "first")
        if store.open_for_writing(golden):
            how = "open for writing" if store.knows_open_mode else "open, and LVM cannot say how"
            raise InUse(f"golden volume {golden_name} is in use read-write ({golden.path} is "
                        f"{how}): snapshots of it would not be consistent")
        if export or portal:
            portal = parse_portal(portal) if portal else default_portal(cluster)
            tgt.running_daemon(portal)  # a dead tgtd fails here, before anything is made
            # The backend says whether tgt can serve its snapshots (qcow2 overlays: no).
            store.export_path(Volume(name=names[0], kind=VolumeKind.SNAPSHOT,
                                     backend=golden.backend, path=store.path_for(names[0]),
                                     size=golden.size, origin=golden.name))
        iqn_base = cluster_name(cluster) if portal else ""
        paths = store.snapshot(golden, names)
        made.extend(Volume(name=name, kind=VolumeKind.SNAPSHOT, backend=golden.backend, path=path,
                           size=golden.size, origin=golden.name, owner=owner,
                           iqn=target_iqn(iqn_base, name) if portal else None, portal=portal)
                    for name, path, (owner, _) in zip(names, paths, chosen, strict=True))
        cluster = changes.put_volumes(cluster, made)
        if portal:
            cluster = ensure_credentials(cluster, (owner for owner, _ in chosen))
        return assign_vm_volumes(cluster, made)

    detail = f"{golden_name} for {owners or 'nodes'}" + (f", {count}" if count else "")
    try:
        cluster = db.update("volume snapshot", detail, change)
    except BaseException:
        for volume in made:
            if store is not None:
                store.remove(volume)
        raise
    tgt.sync_if_served(cluster, made)
    return made


def export(db: Database, names: Sequence[str], portal: str | None = None) -> list[Volume]:
    cluster = db.load()
    portal = parse_portal(portal) if portal else default_portal(cluster)
    volumes = [cluster.volume(name) for name in names]
    for volume in volumes:
        if volume.kind == "golden":
            raise VlxError(f"{volume.name} is a golden volume: export its snapshots, not it "
                           "(nodes would write into every snapshot's origin)")
        if volume.owner is None:
            raise VlxError(f"volume {volume.name} has no owner to allow as initiator")
        if volume.portal and volume.portal != portal:
            raise VlxError(f"volume {volume.name} is exported on {volume.portal} already")
        backend_for(volume).export_path(volume)   # refuses what tgt cannot serve
    tgt.running_daemon(portal)
    exported = [dataclasses.replace(v, iqn=target_iqn(cluster_name(cluster), v.name),
                                    portal=portal) for v in volumes]
    cluster = db.update("volume export", f"{', '.join(names)} on {portal}", lambda c: (
        ensure_credentials(changes.put_volumes(c, exported),
                           (v.owner for v in exported if v.owner))))
    tgt.sync_if_served(cluster, exported)
    return exported


def unexport(db: Database, names: Sequence[str], force: bool = False) -> list[Volume]:
    cluster = db.load()
    volumes = [cluster.volume(name) for name in names]
    for volume in volumes:
        if not volume.iqn:
            raise VlxError(f"volume {volume.name} is not exported")
    for portal in {v.portal for v in volumes if v.portal}:
        daemon = tgt.running_daemon(portal)
        if daemon is None:
            continue
        live = daemon.admin.targets()
        busy = [v.name for v in volumes if v.iqn in live and live[v.iqn].sessions]
        if busy and not force:
            raise InUse(f"volume {busy[0]} has an iSCSI session on {portal}: log the node "
                        "out first, or --force")
    plain = [dataclasses.replace(v, iqn=None, portal=None) for v in volumes]
    cluster = db.update("volume unexport", ", ".join(names),
                        lambda c: changes.put_volumes(c, plain))
    tgt.sync_if_served(cluster, volumes, force=force)
    return plain


def remove(db: Database, names: Sequence[str]) -> list[Volume]:
    cluster = db.load()
    volumes = [cluster.volume(name) for name in names]
    exported = [v.name for v in volumes if v.iqn]
    if exported:
        raise InUse(f"volume {exported[0]} is still exported: `vlx volume unexport "
                    f"{exported[0]}` first")
    changes.remove_volumes(cluster, names)  # snapshots of a golden still present: refused
    for volume in volumes:
        if backend_for(volume).open_for_writing(volume):
            raise InUse(f"volume {volume.name} is in use ({volume.path} is open for writing)")
    gone = set(names)
    db.update("volume remove", ", ".join(names), lambda c: _clear_vm_volumes(
        changes.remove_volumes(c, names), gone))
    for volume in volumes:
        backend_for(volume).remove(volume)
    return volumes


def grow(db: Database, name: str, size: int) -> Volume:
    cluster = db.load()
    volume = cluster.volume(name)
    if size < volume.size:
        raise VlxError(f"volume {name} is {volume.size} bytes; shrinking to {size} would lose "
                       "data, and is refused")
    if size == volume.size:
        return volume
    if volume.iqn:
        raise InUse(f"volume {name} is exported (tgt would keep serving the old size): "
                    "unexport it, grow it, export it again")
    backend_for(volume).grow(volume, size)
    grown = dataclasses.replace(volume, size=size)
    db.update("volume grow", f"{name} to {size}", lambda c: changes.put_volumes(c, [grown]))
    return grown


def grow_warning(volume: Volume, size: int) -> str | None:
    """What to say when `volume` grown to `size` could outgrow its pool: the growth is thin
    (nothing is written yet), but filling it would need more than the pool has free."""
    backend = backend_for(volume)
    free = backend.free_bytes()
    if free is None or size <= volume.size:
        return None
    try:
        used = os.stat(volume.path).st_blocks * 512
    except OSError:
        used = 0
    if size - used <= free:
        return None
    return (f"{volume.name} grown to {format_size(size)} could hold "
            f"{format_size(size - used)} more than it stores now, and pool {backend.pool} has "
            f"{format_size(free)} free: writing it full would run out of space")


def _absent(cluster: Cluster, names: Sequence[str]) -> Cluster:
    taken = {volume.name for volume in cluster.volumes}
    seen: set[str] = set()
    for name in names:
        if name in taken:
            raise VlxError(f"a volume named {name} exists already")
        if name in seen:
            raise VlxError(f"volume name {name} would be made twice")
        seen.add(name)
    return cluster


def assign_vm_volumes(cluster: Cluster, volumes: Sequence[Volume]) -> Cluster:
    """A VM without a disk volume gets the snapshot made for it."""
    by_owner = {v.owner: v.name for v in volumes}
    if not any(vm.name in by_owner and vm.volume is None for vm in cluster.vms):
        return cluster
    return dataclasses.replace(cluster, vms=tuple(
        dataclasses.replace(vm, volume=by_owner[vm.name])
        if vm.name in by_owner and vm.volume is None else vm for vm in cluster.vms))


def _clear_vm_volumes(cluster: Cluster, gone: set[str]) -> Cluster:
    if not any(vm.volume in gone for vm in cluster.vms):
        return cluster
    return dataclasses.replace(cluster, vms=tuple(
        dataclasses.replace(vm, volume=None) if vm.volume in gone else vm
        for vm in cluster.vms))
