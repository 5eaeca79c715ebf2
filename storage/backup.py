"""Backup and restore of a whole virtual cluster: its volumes as sparse raw files, its database
rows (the VC, its VMs' placement and disks, their volumes and CHAP credentials) in
`vc.json`, and a checksum of every file, checked before a restore touches anything. Only the
data extents of a disk are read (SEEK_DATA/SEEK_HOLE), by the copy and by the checksum
(`backend.sparse_sha256`, format 2; format 1 backups carry a plain SHA-256 and still restore).

A restore makes each disk a fresh snapshot of the same golden volume and writes only the
chunks that differ from it, so unchanged data is shared with the golden again (qcow2 overlays
included, see `qcow2.Qcow2Backend.restore_snapshot`). It needs the golden volume to be there
already: a golden belongs to the whole cluster, not to one VC.

A *live* backup copies running VMs with libvirt backup jobs (`vvcm.virt.backup`): a qcow2 file
per disk, consistent at the moment its job began, and a checkpoint so that the next live
backup `since` this one holds only the blocks written in between (its file is an overlay of
the previous backup's, so it reads as the whole disk). A restore converts such a chain back to
one raw image first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from virtualinux.vvcm import changes
from virtualinux.vvcm.allocate import vm_name
from virtualinux.vvcm.db import Database
from virtualinux.vvcm.errors import VlxError
from virtualinux.vvcm.fields import from_mapping, parse_cidr, to_mapping
from virtualinux.vvcm.host import sha256_file
from virtualinux.vvcm.model import Cluster, Credential, VirtualCluster, Volume
from virtualinux.vvcm.virt import backup as virt_backup

from . import tgt
from .backend import InUse, backend_for, sparse_sha256
from .naming import target_iqn
from .qcow2 import run_qemu_img
from .volumes import assign_vm_volumes, cluster_name

log = logging.getLogger(__name__)

MANIFEST = "vc.json"
FORMAT = 2
READABLE_FORMATS = (1, 2)
# volume name, bytes of data done, bytes of data in all (see backend.Progress)
VolumeProgress = Callable[[str, int, int], None]
# What a manifest's volume entry holds beside the volume's own settings.
ENTRY_KEYS = ("file", "sha256", "sparse_sha256", "image", "backing", "checkpoint")


def vc_volumes(cluster: Cluster, vc: str) -> list[Volume]:
    vm_names = {vm.name for vm in cluster.vms_of(vc)}
    return [v for v in cluster.volumes if v.owner in vm_names]


def backup_vc(db: Database, name: str, directory: Path, live: bool = False,
              since: Path | None = None, progress: VolumeProgress | None = None,
              warn: Callable[[str], None] = log.warning) -> dict:
    """Write VC `name` to `directory` (new or empty); returns the manifest.

    Without `live` the VC must be stopped: its volumes are copied as raw files (their data
    extents only; `progress` hears how far each copy is). With `live`, every running VM's
    disk is copied by a libvirt backup job while it runs (a qcow2 file, plus a checkpoint for
    a qcow2 disk); stopped VMs are copied as before. `since` (a live backup of the same VC)
    makes the jobs incremental: each file holds only the blocks written since that backup,
    over it as its backing file. `warn` is told of what may make a copy inconsistent.
    """
    cluster = db.load()
    vc = cluster.vc(name)
    volumes = vc_volumes(cluster, name)
    previous = _previous_entries(since, name) if since is not None else {}
    live = live or since is not None
    if directory.exists() and any(directory.iterdir()):
        raise VlxError(f"backup directory {directory} is not empty")
    active = virt_backup.running(cluster, name) if live else set()
    for volume in volumes:
        if volume.owner not in active and backend_for(volume).open_for_writing(volume):
            raise InUse(f"volume {volume.name} is open for writing (is {volume.owner} "
                        "running?): stop the VC first, or back it up --live; a plain copy of "
                        "a disk being written is not consistent")
        if volume.iqn and volume.owner not in active:
            # tgtd holds an exported disk open for writing, always: the check above cannot
            # tell whether an initiator is writing to it now.
            warn(f"volume {volume.name} is exported on {volume.portal}: if {volume.owner} is "
                 "running, its copy may not be consistent (stop it, or unexport first)")
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    try:
        entries, jobs = [], []
        for volume in volumes:
            if volume.owner in active:
                target = directory / f"{volume.name}.qcow2"
                before = previous.get(volume.name)
                backing = since_checkpoint = None
                if before and before.get("checkpoint"):
                    since_checkpoint = before["checkpoint"]
                    backing = os.path.relpath(since / before["file"], directory)
                    run_qemu_img(["qemu-img", "create", "-q", "-f", "qcow2", "-b", backing,
                                  "-F", "qcow2", str(target), str(volume.size)])
                jobs.append(virt_backup.DiskJob(
                    vm=volume.owner, source=volume.path, target=str(target.resolve()),
                    since=since_checkpoint,
                    checkpoint=volume.backend == "qcow2"))
                entries.append({**to_mapping(volume), "file": target.name,
                                "image": "qcow2", "backing": backing})
            else:
                target = directory / f"{volume.name}.raw"
                report = (functools.partial(progress, volume.name) if progress else None)
                backend_for(volume).backup_to(volume, target, report)
                entries.append({**to_mapping(volume), "file": target.name, "image": "raw",
                                "sparse_sha256": sparse_sha256(target)})
        if jobs:
            point = virt_backup.checkpoint_name()
            started = virt_backup.run_jobs(cluster, jobs, point)
            virt_backup.drop_checkpoints(cluster, [job.vm for job in jobs], keep=point)
            for entry in entries:
                if entry["image"] == "qcow2":
                    entry["checkpoint"] = started.get(entry["owner"])
        for entry in entries:
            if entry["image"] == "qcow2":
                entry["sha256"] = sha256_file(directory / entry["file"])
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
            "since": os.path.relpath(since, directory) if since is not None else None,
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


def _previous_entries(since: Path, name: str) -> dict[str, dict]:
    manifest = read_manifest(since)
    if manifest.get("vc", {}).get("name") != name:
        raise VlxError(f"{since} is a backup of VC {manifest.get('vc', {}).get('name')!r}, "
                       f"not of {name}")
    verify(since, manifest)
    return {entry["name"]: entry for entry in manifest["volumes"]}


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
    if manifest.get("since"):
        # An incremental backup reads through the backup it was taken since.
        previous = directory / manifest["since"]
        verify(previous, read_manifest(previous))


def restore_vc(db: Database, directory: Path, new_name: str | None = None,
               cidr: str | None = None) -> VirtualCluster:
    """Recreate the VC backed up in `directory`: rows, volumes, credentials; all or none.

    `new_name` restores it beside the original: VMs and volumes renamed after it, placed
    afresh, a fresh VXLAN id (never the original's network), unexported, on `cidr` if
    given."""
    manifest = read_manifest(directory)
    where = f"{directory / MANIFEST}"
    try:
        vc = from_mapping(VirtualCluster, manifest["vc"], f"{where} vc")
        rows = [from_mapping(Volume, e, f"{where} volume", ignore=ENTRY_KEYS)
                for e in manifest["volumes"]]
        placement = {vm["name"]: vm["node"] for vm in manifest["vms"]}
        disks = {vm["name"]: vm["volume"] for vm in manifest["vms"] if vm.get("volume")}
        credentials = [Credential(**c) for c in manifest["credentials"]]
    except (KeyError, TypeError) as err:
        raise VlxError(f"{where} is damaged ({err})") from None
    if new_name is not None or cidr is not None:
        vc, rows, placement, disks = _renamed(vc, rows, placement, disks, new_name or vc.name,
                                              cidr)
        credentials = []
    verify(directory, manifest)
    cluster = db.load()
    name = cluster_name(cluster)
    known_nodes = {n.name for n in cluster.nodes}
    # From another cluster (a node it names is not here): place the VMs afresh.
    place = (placement if placement is not None
             and all(node in known_nodes for node in placement.values()) else None)
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
            with _raw_image(directory, entry, backend_for(golden).pool) as source:
                path = backend_for(golden).restore_snapshot(golden, volume.name, source,
                                                            volume.size)
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


@contextlib.contextmanager
def _raw_image(directory: Path, entry: dict, scratch: str) -> Iterator[Path]:
    """The backed-up disk as a raw file: the file itself, or a live backup's qcow2 (with the
    backups it was taken since) converted into a scratch file in the pool."""
    path = directory / Path(entry["file"]).name
    if entry.get("image") != "qcow2":
        yield path
        return
    with tempfile.TemporaryDirectory(dir=scratch, prefix=".restore-") as tmp:
        raw = Path(tmp) / "disk.raw"
        run_qemu_img(["qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", "-S", "4k",
                      str(path), str(raw)])
        yield raw


def _renamed(vc: VirtualCluster, rows: list[Volume], placement: dict[str, str],
             disks: dict[str, str], name: str, cidr: str | None):
    """The backup's VC as `name`: VMs NAME-1.., their volumes renamed after them, placed
    afresh."""
    vms = {old: vm_name(name, index) for index, old in enumerate(
        sorted(placement, key=lambda n: int(n.rsplit("-", 1)[1])), start=1)}

    def rename(volume_name: str, owner: str) -> str:
        return vms[owner] + volume_name[len(owner):]

    try:
        network = parse_cidr(cidr) if cidr else vc.cidr
    except ValueError as err:
        raise VlxError(f"--cidr {cidr}: {err}") from None
    fresh_vc = dataclasses.replace(vc, name=name, vxlan=None, vlan=None, cidr=network)
    fresh_rows = []
    for v in rows:
        if v.owner is None or v.owner not in vms:
            # Only a damaged manifest has one: the backup holds the disks of its VMs only.
            raise VlxError(f"the backup's volume {v.name} belongs to no VM of it (owner "
                           f"{v.owner!r}): the backup is damaged; nothing restored")
        fresh_rows.append(dataclasses.replace(v, name=rename(v.name, v.owner),
                                              owner=vms[v.owner], iqn=None, portal=None))
    fresh_disks = {vms[vm]: rename(volume, vm) for vm, volume in disks.items()}
    # Placed afresh: the original still holds its nodes' room.
    return fresh_vc, fresh_rows, None, fresh_disks
