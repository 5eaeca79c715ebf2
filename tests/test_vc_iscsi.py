"""VM disks as iSCSI LUNs of the storage node: the domain names the target, the VM's initiator
name and its CHAP user, the secret's value is a libvirt secret on the node, made before the
domain and removed with it.

- libvirt's test driver keeps no secrets: `vc create` says so in one line and leaves nothing;
- in the lab: a reflink pool, tgtd in a storage namespace exporting the VMs' disks with CHAP
  (`vlx vc create --portal`), two nodes with a libvirtd each; a VM boots the tiny image with
  its disk over iSCSI and writes to it, and the bytes land in its volume on the storage node;
  it migrates live (its secret moves with it) and writes again; destroy leaves no domain, no
  secret, no export and no volume.
"""

from __future__ import annotations

import os
from pathlib import Path

import libvirt
import pytest
from virtualinux.image.tiny import build_tiny
from virtualinux.storage import tgt
from virtualinux.storage.naming import ensure_credentials
from virtualinux.storage.volumes import assign_vm_volumes
from virtualinux.vm_test.libvirtd import lab_nodes
from virtualinux.vvcm import changes
from virtualinux.vvcm.model import Volume
from virtualinux.vvcm.virt import network
from virtualinux.vvcm.virt.connect import silence_libvirt
from virtualinux.vvcm.virt.domain import secret_usage
from virtualinux.vvcm.virt.lifecycle import find_domain

from .conftest import require, vlx
from .test_storage_lab import loop_filesystem
from .test_vc_lab import boot_services, inventory, type_into, wait_for
from .test_vc_testdriver import cluster, plans, test_driver  # noqa: F401 - fixtures

pytestmark = pytest.mark.lab
MIB = 1 << 20
SAN = "198.18.0.13"
PORTAL = f"{SAN}:3260"


def exported(db, vc: str, portal: str) -> None:
    """Record the VMs of `vc` as having exported disks (no tgtd: the test driver never
    reaches them)."""
    def change(current):
        made = [Volume(name=f"{vm.name}-disk", kind="snapshot", backend="qcow2",
                       path=f"/pool/{vm.name}-disk", size=MIB, origin="guest", owner=vm.name,
                       iqn=f"iqn.2026-11.org.virtualinux:vctest.{vm.name}-disk", portal=portal)
                for vm in current.vms_of(vc)]
        current = changes.put_volumes(current, made)
        current = ensure_credentials(current, (vm.name for vm in current.vms_of(vc)))
        return assign_vm_volumes(current, made)

    db.update("test", "exported disks", change)


def test_a_node_whose_libvirt_keeps_no_secrets_is_one_line_and_nothing_is_left(
        cluster, db, capsys):  # noqa: F811 - the fixture
    exported(db, "blue", PORTAL)
    code, out, err = vlx(capsys, "vc", "create", "blue")
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "cannot keep blue-1's iSCSI CHAP secret in libvirt" in err \
        or "cannot keep blue-2's iSCSI CHAP secret in libvirt" in err
    assert all(find_domain(cluster["conn"], vm.name) is None for vm in db.load().vms)
    for plan in plans(db):
        assert network.devices_present(plan) == []


@pytest.fixture
def iscsi_lab(netns, tmp_path, db, db_path, capsys, monkeypatch):
    """A reflink pool with golden `guest` (the tiny image boots by kernel, the disk is data),
    tgtd in namespace `san` (198.18.0.13) on the nodes' segment, nodes node1 and node2 with
    a libvirtd and boot services each, VC `blue` of 2 VMs."""
    require("libvirtd", "virtlogd", "qemu-system-x86_64", "tgtd", "tgtadm")
    silence_libvirt()
    image = build_tiny()
    state = tmp_path / "storage-state"
    monkeypatch.setenv("VLX_STORAGE_STATE", str(state))
    with loop_filesystem(tmp_path / "pool.fs", 256 * MIB, tmp_path / "pool") as pool:
        monkeypatch.setenv("VLX_POOL", str(pool))
        daemons = lab_nodes(netns, tmp_path)
        replicas = []
        try:
            hub = netns.namespaces[0]
            san = netns.namespace("san")
            netns.plug(hub, "br0", san, address=f"{SAN}/24")
            logs = tmp_path / "logs"
            (tmp_path / "cluster.toml").write_text(inventory(
                [("node1", daemons[0]), ("node2", daemons[1])], logs))
            assert vlx(capsys, "db", "import", str(tmp_path / "cluster.toml"))[0] == 0
            golden = tmp_path / "guest.raw"
            golden.write_bytes(b"Z" * (16 * MIB))
            assert vlx(capsys, "volume", "golden", "add", "guest", "--from", str(golden))[0] == 0
            code, _, err = vlx(capsys, "vc", "define", "blue", "--vms", "2", "--vcpus", "1",
                               "--memory", "160MiB", "--cidr", "198.19.6.0/24",
                               "--kernel", str(image / "vmlinuz"),
                               "--initrd", str(image / "initrd.img"))
            assert code == 0, err
            port = str(32700 + os.getpid() % 60)
            code, _, err = vlx(capsys, "storage", "serve", "--portal", PORTAL,
                               "--control-port", port, "--netns", san.name)
            assert code == 0, err
            for index, daemon in enumerate(daemons, start=1):
                replicas.append(boot_services(daemon, f"node{index}", db_path, tmp_path))
            yield {"daemons": daemons, "logs": logs, "pool": pool}
        finally:
            for replica in replicas:
                replica.stop()
            for daemon in daemons:
                daemon.stop()      # QEMU's iSCSI sessions end before tgtd goes
            if state.exists():
                for daemon in tgt.recorded_daemons(state):
                    tgt.stop(daemon, state)


def test_vm_boots_with_its_disk_over_iscsi_with_chap_and_its_writes_reach_the_san(
        iscsi_lab, db, capsys):
    code, out, err = vlx(capsys, "vc", "create", "blue", "--portal", PORTAL)
    assert code == 0, err
    loaded = db.load()
    vm = next(v for v in loaded.vms if v.name == "blue-1")
    volume = loaded.volume(vm.volume)
    assert volume.portal == PORTAL and volume.iqn
    daemon = dict(zip(("node1", "node2"), iscsi_lab["daemons"], strict=True))[vm.node]
    conn = libvirt.open(daemon.uri)
    try:
        xml = conn.lookupByName("blue-1").XMLDesc()
        assert f'<source protocol="iscsi" name="{volume.iqn}/1">' in xml.replace("'", '"')
        # The login's secret is a private libvirt secret of the node, not in the XML; tgt
        # admits blue-1's initiator with it only (tests/test_storage_lab.py: wrong CHAP and
        # other initiators refused), so the boot below proves it.
        assert conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_ISCSI,
                                        secret_usage(loaded, "blue-1")) is not None
        assert loaded.credential("blue-1").secret not in xml
    finally:
        conn.close()
    assert vlx(capsys, "vc", "start", "blue")[0] == 0
    up = wait_for(iscsi_lab, "blue-1", r"virtualinux: node blue-1 up ")
    wait_for(iscsi_lab, "blue-1", r"^/ # ", start=up.end())
    type_into(iscsi_lab, daemon, "blue-1",
              "echo over-iscsi | dd of=/dev/vda bs=512 seek=100 conv=fsync 2>/dev/null && "
              "echo wr$((1+1))ote", r"^wr2ote")
    with open(Path(volume.path), "rb") as handle:     # the file tgtd serves the LUN from
        handle.seek(100 * 512)
        assert handle.read(10) == b"over-iscsi"

    # Live migration: the secret goes with the VM, the disk logs in again from the target.
    other = "node2" if vm.node == "node1" else "node1"
    code, out, err = vlx(capsys, "vc", "migrate", "blue", "blue-1", "--to", other)
    assert code == 0, err
    target = dict(zip(("node1", "node2"), iscsi_lab["daemons"], strict=True))[other]
    for where, present in ((daemon, False), (target, True)):
        conn = libvirt.open(where.uri)
        try:
            usages = [s.usageID() for s in conn.listAllSecrets()]
        finally:
            conn.close()
        assert (secret_usage(loaded, "blue-1") in usages) == present, (where.address, usages)
    type_into(iscsi_lab, target, "blue-1",
              "echo after-move | dd of=/dev/vda bs=512 seek=200 conv=fsync 2>/dev/null && "
              "echo mo$((1+1))ved", r"^mo2ved")
    with open(Path(volume.path), "rb") as handle:
        handle.seek(200 * 512)
        assert handle.read(10) == b"after-move"
    daemon = target

    # Destroy: domains and secrets gone, disks unexported (QEMU's session was cut) and removed.
    assert vlx(capsys, "vc", "destroy", "blue")[0] == 0
    conn = libvirt.open(daemon.uri)
    try:
        assert conn.listAllDomains() == []
        assert [s.usageID() for s in conn.listAllSecrets()] == []
    finally:
        conn.close()
    assert [v.name for v in db.load().volumes] == ["guest"]
