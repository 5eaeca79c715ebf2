"""Storage names, sizes, credentials, tgtadm output parsing and LVM commands: pure, no root."""

from __future__ import annotations

import pytest
from virtualinux.storage import lvm_thin, naming, qcow2
from virtualinux.storage.backend import backend_class
from virtualinux.storage.tgt import default_control_port, parse_accounts, parse_targets
from virtualinux.vvcm.errors import VlxError
from virtualinux.vvcm.model import Cluster, Volume


def test_target_and_initiator_names_are_stable():
    assert naming.target_iqn("vlxlab", "node1-root") == \
        "iqn.2026-11.org.virtualinux:vlxlab.node1-root"
    assert naming.initiator_iqn("vlxlab", "node1") == "iqn.2026-11.org.virtualinux:vlxlab.node1"
    assert naming.target_iqn("a", "b") != naming.target_iqn("b", "b")


def test_netboot_hands_a_node_the_initiator_name_its_target_admits(db):
    from virtualinux.netboot.scripts import iscsi_initramfs
    from virtualinux.storage import tgt
    from virtualinux.vvcm import changes, inventory

    from .conftest import EXAMPLE

    cluster = db.update("db import", "test",
                        lambda c: inventory.apply(c, inventory.load(EXAMPLE), "test"))
    golden = Volume(name="node", kind="golden", backend="reflink", path="/p/node.img", size=1)
    volume = Volume(name="node1-root", kind="snapshot", backend="reflink", path="/p/x.img",
                    size=1, origin="node", owner="node1",
                    iqn=naming.target_iqn("vlxlab", "node1-root"), portal="198.18.0.11:3260")
    cluster = naming.ensure_credentials(changes.put_volumes(cluster, [golden, volume]),
                                        ["node1"])
    # What tgt binds the target to, and what the node's cpio tells it to log in as.
    admitted = tgt.wanted_exports(cluster, "198.18.0.11:3260")[volume.iqn].initiator
    handed = iscsi_initramfs(cluster, cluster.node("node1"))
    assert f"ISCSI_INITIATOR={admitted}\n" in handed
    assert admitted == "iqn.2026-11.org.virtualinux:vlxlab.node1"


def test_snapshot_names_follow_owner_and_refuse_overlong_ones():
    assert naming.snapshot_name("node1", "root") == "node1-root"
    with pytest.raises(VlxError, match="longer than 63"):
        naming.snapshot_name("n" * 60, "root")


@pytest.mark.parametrize("text, current, expected", [
    ("1073741824", 0, 1 << 30), ("2GiB", 0, 2 << 30), ("512M", 0, 512 << 20),
    ("+1G", 1 << 30, 2 << 30), ("64k", 0, 65536), ("1 TiB", 0, 1 << 40)])
def test_sizes_parse(text, current, expected):
    assert naming.parse_size(text, current) == expected


@pytest.mark.parametrize("text", ["", "big", "1.5G", "-1G", "2PB", "G"])
def test_bad_sizes_are_refused(text):
    with pytest.raises(VlxError, match="size"):
        naming.parse_size(text)


def test_portals_default_to_port_3260_and_bad_ones_are_refused():
    assert naming.parse_portal("198.18.0.11") == "198.18.0.11:3260"
    assert naming.parse_portal("198.18.0.11:3261") == "198.18.0.11:3261"
    for bad in ("198.18.0", "198.18.0.300", "host:3260", "198.18.0.11:0", "198.18.0.11:x"):
        with pytest.raises(VlxError, match="portal"):
            naming.parse_portal(bad)


def test_credentials_are_made_once_per_owner_with_random_secrets():
    cluster = Cluster(generation=1, settings=None)
    cluster = naming.ensure_credentials(cluster, ["node1", "node2", "node1"])
    assert [c.owner for c in cluster.credentials] == ["node1", "node2"]
    first = cluster.credential("node1")
    assert first.username == "node1" and len(first.secret) == naming.CHAP_SECRET_LENGTH
    assert first.secret != cluster.credential("node2").secret
    again = naming.ensure_credentials(cluster, ["node1", "node3"])
    assert again.credential("node1") == first
    assert naming.drop_credentials(again, ["node2"]).credential("node2") is None


def test_format_size():
    assert naming.format_size(1 << 30) == "1 GiB"
    assert naming.format_size(1536 << 20) == "1.5 GiB"
    assert naming.format_size(12) == "12 B"


TGT_SHOW = """\
Target 1: iqn.2026-11.org.virtualinux:vlxlab.node1-root
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
        I_T nexus: 3
            Initiator: iqn.2026-11.org.virtualinux:vlxlab.node1 alias: none
            Connection: 0
                IP Address: 198.18.0.200
    LUN information:
        LUN: 0
            Type: controller
            Backing store type: null
            Backing store path: None
        LUN: 1
            Type: disk
            Size: 67 MB, Block size: 512
            Backing store type: rdwr
            Backing store path: /pool/node1-root.img
            Backing store flags:
    Account information:
        node1
    ACL information:
        iqn.2026-11.org.virtualinux:vlxlab.node1
Target 7: iqn.2026-11.org.virtualinux:vlxlab.node2-root
    System information:
        Driver: iscsi
        State: ready
    I_T nexus information:
    LUN information:
        LUN: 0
            Type: controller
            Backing store path: None
    Account information:
    ACL information:
"""


def test_tgtadm_target_listing_is_parsed():
    targets = parse_targets(TGT_SHOW)
    one = targets["iqn.2026-11.org.virtualinux:vlxlab.node1-root"]
    assert (one.tid, one.backing, one.sessions) == (1, "/pool/node1-root.img", 1)
    assert one.accounts == ("node1",)
    assert one.acls == ("iqn.2026-11.org.virtualinux:vlxlab.node1",)
    two = targets["iqn.2026-11.org.virtualinux:vlxlab.node2-root"]
    assert (two.tid, two.backing, two.sessions, two.acls) == (7, None, 0, ())
    assert parse_targets("") == {}
    assert parse_accounts("Account list:\n    node1\n    node2\n") == {"node1", "node2"}


def test_control_port_is_derived_from_the_portal_and_not_tgtds_default():
    port = default_control_port("198.18.0.11:3260")
    assert port == default_control_port("198.18.0.11:3260") and 20000 <= port <= 32767
    assert port != default_control_port("198.18.0.12:3260")


def test_lvm_thin_commands():
    assert lvm_thin.split_pool("san/thin") == ("san", "thin")
    for bad in ("san", "san/", "/thin", "a/b/c"):
        with pytest.raises(VlxError, match="VG/THINPOOL"):
            lvm_thin.split_pool(bad)
    assert lvm_thin.create_thin_command("san", "thin", "node", 1 << 30) == [
        "lvcreate", "--yes", "--type", "thin", "--virtualsize", "1073741824b",
        "--thinpool", "thin", "--name", "node", "san"]
    assert lvm_thin.snapshot_command("san", "node", "node1-root") == [
        "lvcreate", "--yes", "--snapshot", "--setactivationskip", "n", "--activate", "y",
        "--permission", "rw", "--name", "node1-root", "san/node"]
    assert lvm_thin.readonly_command("san", "node") == [
        "lvchange", "--permission", "r", "san/node"]
    assert lvm_thin.remove_command("san", "node1-root") == [
        "lvremove", "--yes", "san/node1-root"]
    assert lvm_thin.grow_command("san", "node1-root", 2 << 30) == [
        "lvextend", "--size", "2147483648b", "san/node1-root"]
    assert lvm_thin.report_command("san", "thin", ["data_percent", "metadata_percent"]) == [
        "lvs", "--noheadings", "--nosuffix", "--units", "b", "--separator", "|",
        "-o", "data_percent,metadata_percent", "san/thin"]
    backend = lvm_thin.LvmThinBackend("san/thin")
    assert backend.path_for("node1-root") == "/dev/san/node1-root"


def test_qcow2_overlay_command_names_the_golden_absolutely():
    cmd = qcow2.overlay_command("pool/node.img", "/pool/.t.qcow2")
    assert cmd[:5] == ["qemu-img", "create", "-q", "-f", "qcow2"]
    assert cmd[5] == "-b" and cmd[6].startswith("/") and cmd[6].endswith("pool/node.img")
    assert cmd[7:] == ["-F", "raw", "/pool/.t.qcow2"]


def test_backends_are_chosen_by_name():
    assert backend_class("reflink").name == "reflink"
    assert backend_class("lvm-thin").name == "lvm-thin"
    assert backend_class("qcow2").name == "qcow2"
    with pytest.raises(VlxError, match="unknown storage backend"):
        backend_class("zfs")
