"""netboot: golden scripts and command lines, the per-node cpio, atomic rendering, path rules."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import subprocess
from pathlib import Path

import pytest
from virtualinux.netboot import files, layout, render, scripts
from virtualinux.vvcm import Credential, VlxError, Volume, inventory

from .conftest import EXAMPLE, require

NODE1_SCRIPT = """#!ipxe
# virtualinux: node1 (52:54:00:00:00:11, 198.18.0.11), cluster database generation 1
kernel http://${next-server}/images/vmlinuz initrd=initrd.img initrd=52-54-00-00-00-11.cpio \
ip=198.18.0.11::198.18.0.254:255.255.255.0:node1:eth0:off vlx.node=node1 \
vlx.root=iscsi:198.18.0.11:3260:iqn.2026-11.lab.cluster:vlxlab.node1-root root=LABEL=vroot rw \
console=ttyS0 || goto failed
initrd http://${next-server}/images/initrd.img || goto failed
initrd http://${next-server}/nodes/52-54-00-00-00-11.cpio || goto failed
boot || goto failed

:failed
echo virtualinux: booting node1 failed
exit 1
"""

NODE3_SCRIPT = """#!ipxe
# virtualinux: node3 (52:54:00:00:00:13, 198.18.0.13), cluster database generation 1
kernel http://${next-server}/images/vmlinuz initrd=initrd.img \
ip=198.18.0.13::198.18.0.254:255.255.255.0:node3:eth0:off vlx.node=node3 || goto failed
initrd http://${next-server}/images/initrd.img || goto failed
boot || goto failed

:failed
echo virtualinux: booting node3 failed
exit 1
"""

NODE1_ISCSI = """ISCSI_INITIATOR=iqn.2026-11.org.virtualinux:vlxlab.node1
ISCSI_TARGET_NAME=iqn.2026-11.lab.cluster:vlxlab.node1-root
ISCSI_TARGET_IP=198.18.0.11
ISCSI_TARGET_PORT=3260
ISCSI_USERNAME=node1-chap
ISCSI_PASSWORD='s3cr'"'"'et;$(reboot)'
"""


def root_volume(owner: str = "node1", iqn: str = "iqn.2026-11.lab.cluster:vlxlab.node1-root"):
    return Volume(name=f"{owner}-root", kind="snapshot", backend="reflink",
                  path=f"/pool/{owner}-root", size=1 << 30, origin="golden", owner=owner,
                  iqn=iqn, portal="198.18.0.11:3260")


@pytest.fixture
def cluster(db):
    loaded = db.update("db import", "test",
                       lambda c: inventory.apply(c, inventory.load(EXAMPLE), "test"))
    return dataclasses.replace(
        loaded, volumes=(root_volume(),),
        credentials=(Credential("node1", "node1-chap", "s3cr'et;$(reboot)"),))


@pytest.fixture
def image_dir(tmp_path) -> Path:
    image = tmp_path / "image"
    image.mkdir()
    (image / "vmlinuz").write_bytes(b"kernel " * 300)
    (image / "initrd.img").write_bytes(b"initrd " * 301)
    return image


def test_node_script_names_kernel_initrds_and_iscsi_root(cluster):
    assert scripts.node_script(cluster, cluster.node("node1"), ["console=ttyS0"]) == NODE1_SCRIPT


def test_node_without_root_volume_gets_no_cpio_and_no_root(cluster):
    assert scripts.node_script(cluster, cluster.node("node3"), []) == NODE3_SCRIPT
    assert scripts.node_cpio(cluster, cluster.node("node3")) is None


def test_chap_secret_is_quoted_for_the_shell_and_kept_off_the_command_line(cluster):
    node = cluster.node("node1")
    assert scripts.iscsi_initramfs(cluster, node) == NODE1_ISCSI
    assert "s3cr" not in scripts.kernel_cmdline(cluster, node, [])


BOOT_SCRIPT = """#!ipxe
# virtualinux: every iPXE client runs this first. It chains the script the cluster database
# has for this MAC; a machine the database does not know gets a menu.
:start
chain --autofree nodes/${mac:hexhyp}.ipxe || goto unknown

:unknown
menu virtualinux: MAC ${mac} has no node in the cluster database, or its boot failed
item --key d discover Metamaster discovery (boot the shared image with DHCP)
item --key l local    Local boot (leave iPXE)
item --key r retry    Retry (the database may know this machine now)
choose --timeout 30000 --default retry target || goto retry
goto ${target}

:discover
chain --autofree discover.ipxe || goto unknown

:local
exit

:retry
# Ask DHCP again: the replica that handed out this script may be the one that failed, and
# ${filename} then names boot.ipxe on a replica that answers.
dhcp || goto retry
chain --autofree ${filename} || goto unknown
"""

DISCOVER_SCRIPT = """#!ipxe
# virtualinux: metamaster discovery for a machine the cluster database does not know yet.
kernel http://${next-server}/images/vmlinuz initrd=initrd.img ip=dhcp vlx.mode=discover \
console=ttyS0 || goto failed
initrd http://${next-server}/images/initrd.img || goto failed
boot || goto failed

:failed
echo virtualinux: discovery boot failed
exit 1
"""


def test_boot_script_chains_the_mac_script_and_offers_a_menu():
    assert scripts.boot_script() == BOOT_SCRIPT


def test_discover_script_boots_the_shared_image_with_dhcp():
    assert scripts.discover_script(["console=ttyS0"]) == DISCOVER_SCRIPT


def test_unsafe_database_values_are_refused(cluster):
    bad = dataclasses.replace(cluster, volumes=(root_volume(iqn="iqn.x:a ${evil} b"),))
    with pytest.raises(VlxError, match="iqn of volume node1-root"):
        scripts.node_script(bad, bad.node("node1"), [])
    with pytest.raises(VlxError, match="kernel argument"):
        scripts.node_script(cluster, cluster.node("node3"), ["a b"])


def test_cpio_unpacks_with_gnu_cpio(cluster, tmp_path):
    require("cpio")
    archive = scripts.node_cpio(cluster, cluster.node("node1"))
    assert len(archive) % 512 == 0
    subprocess.run(["cpio", "-idm", "--quiet"], input=archive, cwd=tmp_path, check=True)
    unpacked = tmp_path / "etc" / "iscsi.initramfs"
    assert unpacked.read_text() == NODE1_ISCSI
    assert unpacked.stat().st_mode & 0o777 == 0o600


def test_render_is_deterministic_and_swaps_atomically(cluster, image_dir, tmp_path):
    out = tmp_path / "netboot"
    first = render.render(cluster, image_dir, out, ["console=ttyS0"])
    assert first.changed and render.current_tree(out) == first.root
    for name in (*layout.IPXE_BINARIES, layout.IPXE_SCRIPT, layout.KERNEL, layout.INITRD,
                 layout.node_script_name("52:54:00:00:00:14"), layout.MANIFEST):
        assert name in first.files
    assert (first.root / "undionly.kpxe").read_bytes() == \
        Path("/usr/lib/ipxe/undionly.kpxe").read_bytes()
    assert (first.root / layout.node_script_name("52:54:00:00:00:11")).read_text() == NODE1_SCRIPT
    initrd = (first.root / layout.INITRD).read_bytes()
    assert len(initrd) % 512 == 0
    assert initrd.rstrip(b"\0") == (image_dir / "initrd.img").read_bytes()

    again = render.render(cluster, image_dir, out, ["console=ttyS0"])
    assert again.root == first.root and not again.changed

    newer = dataclasses.replace(cluster, generation=2)
    second = render.render(newer, image_dir, out, ["console=ttyS0"])
    third = render.render(dataclasses.replace(cluster, generation=3), image_dir, out,
                          ["console=ttyS0"])
    assert render.current_tree(out) == third.root
    assert second.root.exists() and not first.root.exists()     # one old tree is kept
    assert not [p for p in out.iterdir()
                if p.name.startswith(".") and p.name != render.SOURCES_MEMO]


def test_an_unchanged_render_copies_nothing_and_a_changed_kernel_is_seen(
        cluster, image_dir, tmp_path, monkeypatch):
    out = tmp_path / "netboot"
    first = render.render(cluster, image_dir, out, ["console=ttyS0"])
    copies = []
    real_copy = render._copy
    monkeypatch.setattr(render, "_copy", lambda *args: copies.append(args[0]) or
                        real_copy(*args))
    again = render.render(cluster, image_dir, out, ["console=ttyS0"])
    assert (again.root, again.changed, copies) == (first.root, False, [])
    assert again.files == first.files
    # The same size, new bytes: a new tree, the new kernel in it (its ctime moved).
    kernel = image_dir / "vmlinuz"
    kernel.write_bytes(kernel.read_bytes().replace(b"kernel", b"KERNEL"))
    changed = render.render(cluster, image_dir, out, ["console=ttyS0"])
    assert changed.changed and changed.root != first.root
    assert (changed.root / layout.KERNEL).read_bytes() == kernel.read_bytes()
    assert render.Manifest.load(changed.root).kernel_sha256 == \
        hashlib.sha256(kernel.read_bytes()).hexdigest()
    # A memo that is not ours is ignored: everything is hashed again, to the same tree.
    (out / render.SOURCES_MEMO).write_text("[1, 2")
    copies.clear()
    assert render.render(cluster, image_dir, out, ["console=ttyS0"]).root == changed.root
    assert sorted(copies) == sorted([*render.ipxe_binaries().values(), kernel,
                                     image_dir / "initrd.img"])


def test_render_refuses_an_image_dir_without_initrd(cluster, image_dir, tmp_path):
    (image_dir / "initrd.img").unlink()
    with pytest.raises(VlxError, match="initrd.img is missing"):
        render.render(cluster, image_dir, tmp_path / "netboot")
    assert not (tmp_path / "netboot").exists()


@pytest.fixture
def boot_files(cluster, image_dir, tmp_path):
    out = tmp_path / "netboot"
    render.render(cluster, image_dir, out, ["console=ttyS0"])
    (tmp_path / "secret").write_text("outside")
    os.symlink(tmp_path / "secret", out / render.CURRENT / "escape")
    return files.BootFiles(out / render.CURRENT, cluster)


@pytest.mark.parametrize("request_path", [
    "../secret", "images/../../secret", "..\\secret", "escape", "a\0b", "x" * 300, "/", ""])
def test_paths_outside_the_tree_are_refused(boot_files, request_path):
    with pytest.raises(files.RequestRefused):
        boot_files.lookup(request_path)


def test_absolute_paths_are_relative_to_the_tree(boot_files):
    with pytest.raises(files.FileMissing):
        boot_files.lookup("/etc/passwd")
    assert boot_files.lookup("/boot.ipxe").size == len(scripts.boot_script())
    with pytest.raises(files.FileMissing):
        boot_files.lookup("images")          # a directory is not a file


def test_node_files_are_made_from_the_services_generation(boot_files, cluster):
    made = boot_files.lookup("nodes/52-54-00-00-00-11.ipxe")
    assert made == files.MemoryFile(NODE1_SCRIPT.encode())
    assert boot_files.lookup("nodes/52-54-00-00-00-11.cpio", "198.18.0.11").data == \
        scripts.node_cpio(cluster, cluster.node("node1"))
    with pytest.raises(files.RequestRefused, match="goes to 198.18.0.11 only"):
        boot_files.lookup("nodes/52-54-00-00-00-11.cpio", "198.18.0.200")
    with pytest.raises(files.FileMissing):
        boot_files.lookup("nodes/52-54-00-00-00-99.ipxe")
    with pytest.raises(files.FileMissing):
        boot_files.lookup("nodes/52-54-00-00-00-13.cpio")    # no root volume, no cpio
    boot_files.reload(dataclasses.replace(cluster, generation=9))
    assert b"generation 9" in boot_files.lookup("nodes/52-54-00-00-00-11.ipxe").data
