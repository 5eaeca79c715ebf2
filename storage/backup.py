"""Backup and restore of a whole virtual cluster: its volumes as sparse raw files, its database
rows (the VC, its VMs' placement and disks, their volumes and CHAP credentials) in
`vc.json`, and a checksum of every file, checked before a restore touches anything. Only the
data extents of a disk are read (SEEK_DATA/SEEK_HOLE), by the copy and by the checksum
(`backend.sparse_sha256`, format 2; format 1 backups carry a plain SHA-256 and still restore).

A restore makes each disk a fresh snapshot of the same golden volume and writes only the
chunks that differ from it, so unchanged data is shared with the golden again (qcow2 overlays
included, see `qcow2.Qcow2Backend.restore_snapshot`). It needs the golden volume to be there
already: a golden belongs to the whole cluster, not to one VC.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from virtualinux.vvcm import changes
from virtualinux.vvcm.db import Database
from virtualinux.vvcm.errors import VlxError
from virtualinux.vvcm.fields import from_mapping, to_mapping
from virtualinux.vvcm.host import sha256_file
from virtualinux.vvcm.model import Cluster, Credential, VirtualCluster, Volume

from . import tgt
from .backend import InUse, backend_for, sparse_sha256
from .naming import target_iqn
from .volumes import assign_vm_volumes, cluster_name

log = logging.getLogger(__name__)

MANIFEST = "vc.json"
FORMAT = 2
READABLE_FORMATS = (1, 2)
# volume name, bytes of data done, bytes of data in all (see backend.Progress)
VolumeProgress = Callable[[str, int, int], None]


def vc_volumes(cluster: Cluster, vc: str) -> list[Volume]:
    vm_names = {vm.name for vm in cluster.vms_of(vc)}
    return [v for v in cluster.volumes if v.owner in vm_names]


def backup_vc(db: Database, name: str, directory: Path,
              progress: VolumeProgress | None = None,
              warn: Callable[[str], None] = log.warning) -> dict:
    """Write VC `name` to `directory` (new or empty); returns the manifest. `progress` hears
    how far each volume's copy is; `warn` is told of what may make the copy inconsistent."""
    cluster = db.load()
    vc = cluster.vc(name)
    volumes = vc_volumes(cluster, name)
    if directory.exists() and any(directory.iterdir()):
        raise VlxError(f"backup directory {directory} is not empty")
    for volume in volumes:
        if backend_for(volume).open_for_writing(volume):
            raise InUse(f"volume {volume.name} is open for writing (is {volume.owner} "
                        "running?): stop the VC first, a backup of a disk being written is "
                        "not consistent")
        if volume.iqn:
            # tgtd holds an exported disk open for writing, always: the check above cannot
            # tell whether an initiator is writing to it now.
            warn(f"volume {volume.name} is exported on {volume.portal}: if {volume.owner} is "
                 "running, its copy may not be consistent (stop it, or unexport first)")
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        entries = []
        for volume in volumes:
            target = directory / f"{volume.name}.raw"
            report = (functools.partial(progress, volume.name) if progress else None)
            backend_for(volume).backup_to(volume, target, report)
            entries.append({**to_mapping(volume), "file": target.name,
                            "sparse_sha256": sparse_sha256(target)})
        owners = {vm.name for vm in cluster.vms_of(name)}
        manifest = {
            "format": FORMAT,
            "cluster": cluster_name(cluster),
            "generation": cluster.generation,
            "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "vc": to_mapping(vc),
            "vms": [{"name": vm.name, "node": vm.node, "volume": vm.volume}
                    for vm in cluster.vms_of(name)],
            "volumes": entries,
            "credentials": [dataclasses.asdict(c) for c in cluster.credentials
                            if c.owner in owners],
        }
        partial = directory / (MANIFEST + ".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # CHAP secrets
        with os.fdopen(fd, "w") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True)
            handle.write("\n")
        os.replace(partial, directory / MANIFEST)
    except BaseException:
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            for child in directory.iterdir():
                child.unlink()
        raise
    return manifest


def read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise VlxError(f"{directory} holds no VC backup (no {MANIFEST})") from None
    except (OSError, ValueError) as err:
        raise VlxError(f"{path} is unreadable: {err}") from None
    if not isinstance(manifest, dict) or manifest.get("format") not in READABLE_FORMATS:
        raise VlxError(f"{path}: not a VC backup of format "
                       f"{' or '.join(map(str, READABLE_FORMATS))}")
    return manifest


def verify(directory: Path, manifest: dict) -> None:
    """Every volume file is there and has its recorded checksum, or VlxError naming it."""
    for entry in manifest["volumes"]:
        path = directory / Path(entry["file"]).name
        if not path.is_file():
            raise VlxError(f"backup file {path} is missing; nothing restored")
        if "sparse_sha256" in entry:
            matches = sparse_sha256(path) == entry["sparse_sha256"]
        else:   # format 1
            matches = sha256_file(path) == entry["sha256"]
        if not matches:
            raise VlxError(f"backup file {path} does not match its SHA-256: the backup is "
                           "damaged; nothing restored")


def restore_vc(db: Database, directory: Path) -> VirtualCluster:
    """Recreate the VC backed up in `directory`: rows, volumes, credentials; all or none."""
    manifest = read_manifest(directory)
    where = f"{directory / MANIFEST}"
    try:
        vc = from_mapping(VirtualCluster, manifest["vc"], f"{where} vc")
        rows = [from_mapping(Volume, {k: v for k, v in e.items()
                                      if k not in ("file", "sha256", "sparse_sha256")},
                             f"{where} volume") for e in manifest["volumes"]]
        placement = {vm["name"]: vm["node"] for vm in manifest["vms"]}
        disks = {vm["name"]: vm["volume"] for vm in manifest["vms"] if vm.get("volume")}
        credentials = [Credential(**c) for c in manifest["credentials"]]
    except (KeyError, TypeError) as err:
        raise VlxError(f"{where} is damaged ({err})") from None
    verify(directory, manifest)
    cluster = db.load()
    name = cluster_name(cluster)
    known_nodes = {n.name for n in cluster.nodes}
    # From another cluster (a node it names is not here): place the VMs afresh.
    place = placement if all(node in known_nodes for node in placement.values()) else None
    for volume in rows:
        if any(v.name == volume.name for v in cluster.volumes):
            raise VlxError(f"a volume named {volume.name} exists already; nothing restored")
        origin = volume.origin and next((v for v in cluster.volumes if v.name == volume.origin),
                                        None)
        if not origin or origin.kind != "golden":
            raise VlxError(f"volume {volume.name} is a snapshot of {volume.origin!r}, which "
                           "this cluster has no golden volume of: add it first")
    portals = sorted({v.portal for v in rows if v.portal})
    for portal in portals:
        tgt.running_daemon(portal)
    trial = changes.define_vc(cluster, vc, place)  # refuses a VC that exists, before I/O
    del trial
    made: list[Volume] = []
    try:
        restored = []
        for volume, entry in zip(rows, manifest["volumes"], strict=True):
            golden = cluster.volume(volume.origin)
            path = backend_for(golden).restore_snapshot(
                golden, volume.name, directory / Path(entry["file"]).name, volume.size)
            fresh = dataclasses.replace(
                volume, backend=golden.backend, path=path,
                iqn=target_iqn(name, volume.name) if volume.portal else None)
            made.append(fresh)
            restored.append(fresh)

        def change(current: Cluster) -> Cluster:
            current = changes.define_vc(current, vc, place)
            current = changes.put_volumes(current, restored)
            have = {c.owner for c in current.credentials}
            current = dataclasses.replace(current, credentials=current.credentials + tuple(
                c for c in credentials if c.owner not in have))
            by_vm = [v for v in restored if disks.get(v.owner) == v.name]
            return assign_vm_volumes(current, by_vm)

        cluster = db.update("vc restore", f"{vc.name} from {directory}", change)
    except BaseException:
        for volume in made:
            backend_for(volume).remove(volume)
        raise
    tgt.sync_if_served(cluster, made)
    return cluster.vc(vc.name)
