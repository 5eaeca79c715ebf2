"""`vlx netboot render|show` as an administrator uses them, and their bad inputs."""

from __future__ import annotations

import json

import pytest

from .conftest import EXAMPLE, vlx


@pytest.fixture
def cluster_db(db_path, capsys):
    assert vlx(capsys, "db", "init")[0] == 0
    assert vlx(capsys, "db", "import", str(EXAMPLE))[0] == 0
    return db_path


@pytest.fixture
def image(tmp_path):
    image = tmp_path / "image"
    image.mkdir()
    (image / "vmlinuz").write_bytes(b"k" * 4096)
    (image / "initrd.img").write_bytes(b"i" * 4096)
    return image


def test_render_then_show_a_node(cluster_db, image, tmp_path, capsys):
    out = tmp_path / "netboot"
    code, text, _ = vlx(capsys, "netboot", "render", "--image", str(image), "--out", str(out),
                        "--kernel-arg", "console=ttyS0")
    assert code == 0 and "now current" in text
    code, text, _ = vlx(capsys, "netboot", "render", "--image", str(image), "--out", str(out),
                        "--kernel-arg", "console=ttyS0")
    assert "unchanged, already current" in text
    code, text, _ = vlx(capsys, "netboot", "show", "node2", "--out", str(out), "--json")
    shown = json.loads(text)
    assert shown["cmdline"] == ("initrd=initrd.img "
                                "ip=198.18.0.12::198.18.0.254:255.255.255.0:node2:eth0:off "
                                "vlx.node=node2 console=ttyS0")
    assert shown["script"] == "nodes/52-54-00-00-00-12.ipxe" and shown["cpio"] is None
    code, text, _ = vlx(capsys, "netboot", "show", "--out", str(out))
    assert code == 0 and "nodes/52-54-00-00-00-14.ipxe" in text and "tree_generation: 1" in text


@pytest.mark.parametrize("argv, message", [
    (["--image", "/nonexistent"], "vmlinuz is missing"),
    (["--kernel-arg", "a b"], "cannot go on a kernel command line"),
    (["--kernel-arg", "x=${evil}"], "cannot go on a kernel command line"),
])
def test_bad_render_input_exits_2_and_keeps_the_current_tree(cluster_db, image, tmp_path,
                                                             capsys, argv, message):
    out = tmp_path / "netboot"
    assert vlx(capsys, "netboot", "render", "--image", str(image), "--out", str(out))[0] == 0
    before = (out / "current").resolve()
    args = ["netboot", "render", "--out", str(out)]
    args += argv if "--image" in argv else ["--image", str(image), *argv]
    code, _, err = vlx(capsys, *args)
    assert code == 2 and message in err
    assert (out / "current").resolve() == before


def test_show_unknown_node_exits_2(cluster_db, capsys):
    code, _, err = vlx(capsys, "netboot", "show", "node9")
    assert code == 2 and "no node named 'node9'" in err


def test_vlx_netboot_names_the_trees_and_show_says_which_it_read(cluster_db, image, tmp_path,
                                                                 monkeypatch, capsys):
    elsewhere = tmp_path / "elsewhere"
    monkeypatch.setenv("VLX_NETBOOT", str(elsewhere))
    code, text, _ = vlx(capsys, "netboot", "render", "--image", str(image), "--kernel-arg",
                        "console=ttyS0")
    assert code == 0 and text.startswith(f"rendered {elsewhere}/gen-1-")
    tree = (elsewhere / "current").resolve()
    code, text, _ = vlx(capsys, "netboot", "show", "node2")
    assert code == 0 and f"tree:        {tree}\n" in text and "console=ttyS0" in text
    code, text, _ = vlx(capsys, "netboot", "show")
    assert f"out: {elsewhere}\n" in text and f"current: {tree}\n" in text
    # --out wins over VLX_NETBOOT; an empty place says so instead of showing defaults quietly.
    empty = tmp_path / "empty"
    code, text, _ = vlx(capsys, "netboot", "show", "node2", "--out", str(empty))
    assert code == 0 and f"none in {empty}" in text and "console=ttyS0" not in text


def test_show_leaves_the_chap_secret_out_by_construction(cluster_db, tmp_path, capsys):
    from virtualinux.netboot import scripts
    from virtualinux.storage.naming import ensure_credentials
    from virtualinux.vvcm import changes
    from virtualinux.vvcm.db import Database
    from virtualinux.vvcm.model import Volume

    db = Database(cluster_db)
    golden = Volume(name="node", kind="golden", backend="reflink",
                    path=str(tmp_path / "node.img"), size=1 << 20)
    root = Volume(name="node1-root", kind="snapshot", backend="reflink",
                  path=str(tmp_path / "node1-root.img"), size=1 << 20, origin="node",
                  owner="node1", iqn="iqn.2026-11.org.virtualinux:vlxlab.node1-root",
                  portal="198.18.0.11:3260")
    db.update("test", "root", lambda c: ensure_credentials(changes.put_volumes(c, [golden, root]),
                                                           ["node1"]))
    secret = db.load().credential("node1").secret
    for argv in (["netboot", "show", "node1"], ["netboot", "show", "node1", "--json"]):
        code, text, _ = vlx(capsys, *argv, "--out", str(tmp_path / "none"))
        assert code == 0 and secret not in text and scripts.HIDDEN_SECRET in text
        assert "ISCSI_TARGET_NAME=iqn.2026-11.org.virtualinux:vlxlab.node1-root" in text
    # The node's cpio itself carries the real secret.
    assert secret.encode() in scripts.node_cpio(db.load(), db.load().node("node1"))
