"""Backups of running VMs with libvirt backup jobs: consistent per disk, the guest keeps running.

A job copies one VM's disk as it was when the job began into a qcow2 file (push mode: QEMU
writes the file itself), and, for a qcow2 disk, starts a checkpoint (a dirty bitmap) so the
next backup can be *incremental*: only the blocks written since. An incremental target is made
beforehand as an overlay of the previous backup (`REUSE_EXTERNAL`), so every backup file reads
as the whole disk through its chain. storage/backup.py decides the files and writes the
manifest; this module only talks to libvirt, one thread and connection per node.
"""

from __future__ import annotations

import dataclasses
import datetime
import threading
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence

import libvirt

from ..errors import VlxError
from ..model import Cluster, Node
from .connect import error_text, per_node
from .lifecycle import find_domain

JOB_TIMEOUT = 3600.0


@dataclasses.dataclass(frozen=True)
class DiskJob:
    vm: str
    source: str            # the disk's path on the node, as in the domain XML
    target: str            # the backup file (made by libvirt, or beforehand if `since`)
    since: str | None      # checkpoint of the previous backup: incremental
    checkpoint: bool       # start a checkpoint (qcow2 disks only: it is a bitmap in them)


def checkpoint_name(now: datetime.datetime | None = None) -> str:
    moment = now or datetime.datetime.now(datetime.UTC)
    return "vlx-" + moment.strftime("%Y%m%dT%H%M%S%fZ")


def running(cluster: Cluster, vc: str) -> set[str]:
    """The VMs of `vc` whose domains are running now."""
    vms = cluster.vms_of(vc)
    active: set[str] = set()
    lock = threading.Lock()

    def look(node: Node, conn: libvirt.virConnect) -> None:
        for vm in vms:
            if vm.node == node.name and (d := find_domain(conn, vm.name)) and d.isActive():
                with lock:
                    active.add(vm.name)

    per_node(cluster, {vm.node for vm in vms}, look)
    return active


def disk_target_name(domain: libvirt.virDomain, source: str) -> str:
    """The `<target dev>` of the domain's disk whose source is `source` (vda, xvda...)."""
    root = ET.fromstring(domain.XMLDesc())
    for disk in root.iter("disk"):
        element = disk.find("source")
        if element is not None and source in (element.get("file"), element.get("dev")):
            target = disk.find("target")
            dev = target.get("dev") if target is not None else None
            if dev is None:
                raise VlxError(f"domain {domain.name()}: disk {source} has no target device")
            return dev
    raise VlxError(f"domain {domain.name()} has no disk {source}")


def backup_xml(disk: str, job: DiskJob) -> str:
    root = ET.Element("domainbackup", mode="push")
    if job.since:
        ET.SubElement(root, "incremental").text = job.since
    disks = ET.SubElement(root, "disks")
    entry = ET.SubElement(disks, "disk", name=disk, backup="yes", type="file")
    ET.SubElement(entry, "driver", type="qcow2")
    ET.SubElement(entry, "target", file=job.target)
    return ET.tostring(root, encoding="unicode")


def checkpoint_xml(name: str, disk: str) -> str:
    root = ET.Element("domaincheckpoint")
    ET.SubElement(root, "name").text = name
    disks = ET.SubElement(root, "disks")
    ET.SubElement(disks, "disk", name=disk, checkpoint="bitmap")
    return ET.tostring(root, encoding="unicode")


def run_jobs(cluster: Cluster, jobs: Sequence[DiskJob], checkpoint: str,
             timeout: float = JOB_TIMEOUT) -> dict[str, str | None]:
    """Run every job (VMs of one node one after another, nodes at once); returns the
    checkpoint each VM's backup started (None where none could be)."""
    by_vm = {vm.name: vm for vm in cluster.vms}
    nodes = {by_vm[job.vm].node for job in jobs}
    started: dict[str, str | None] = {}
    lock = threading.Lock()

    def back_up(node: Node, conn: libvirt.virConnect) -> None:
        for job in jobs:
            if by_vm[job.vm].node != node.name:
                continue
            domain = find_domain(conn, job.vm)
            if domain is None or not domain.isActive():
                raise VlxError(f"{job.vm} is not running on {node.name}: nothing to back up "
                               "with a libvirt job")
            disk = disk_target_name(domain, job.source)
            flags = libvirt.VIR_DOMAIN_BACKUP_BEGIN_REUSE_EXTERNAL if job.since else 0
            point = checkpoint_xml(checkpoint, disk) if job.checkpoint else None
            try:
                domain.backupBegin(backup_xml(disk, job), point, flags)
            except libvirt.libvirtError as err:
                raise VlxError(f"backup of {job.vm} on {node.name} did not start: "
                               f"{error_text(err)}") from None
            _wait(domain, job.vm, timeout)
            with lock:
                started[job.vm] = checkpoint if job.checkpoint else None

    per_node(cluster, nodes, back_up)
    return started


def _wait(domain: libvirt.virDomain, vm: str, timeout: float) -> None:
    """Until the backup job ends; then its completed statistics say how it ended."""
    deadline = time.monotonic() + timeout
    while domain.jobStats().get("type", libvirt.VIR_DOMAIN_JOB_NONE) != \
            libvirt.VIR_DOMAIN_JOB_NONE:
        if time.monotonic() > deadline:
            domain.abortJob()
            raise VlxError(f"backup of {vm} took longer than {timeout:g} s; aborted")
        time.sleep(0.1)
    stats = domain.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    if stats.get("type") != libvirt.VIR_DOMAIN_JOB_COMPLETED:
        raise VlxError(f"backup of {vm} failed: {stats.get('errmsg', 'job did not complete')}")


def drop_checkpoints(cluster: Cluster, vms: Sequence[str], keep: str | None) -> None:
    """Delete our checkpoints of these VMs except `keep` (a bitmap per checkpoint costs
    writes in the guest's disk, and only the newest is needed for the next backup)."""
    by_vm = {vm.name: vm for vm in cluster.vms}

    def prune(node: Node, conn: libvirt.virConnect) -> None:
        for name in vms:
            if by_vm[name].node != node.name or (d := find_domain(conn, name)) is None:
                continue
            for point in d.listAllCheckpoints():
                if point.getName().startswith("vlx-") and point.getName() != keep:
                    point.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
                                 if not d.isActive() else 0)

    per_node(cluster, {by_vm[name].node for name in vms}, prune)
