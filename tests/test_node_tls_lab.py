"""Each node's own store certificate against a real etcd with TLS in lab namespaces: the files a
node's cpio carries (netboot.scripts.node_files) let that node read and write the store; a
certificate of another cluster's node CA is refused; a db node serves its etcd member with its
own member certificate, which other nodes' certificates reach."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from virtualinux.netboot import scripts
from virtualinux.vm_test.etcd import VLX
from virtualinux.vm_test.wait import wait_for
from virtualinux.vvcm.db import Database

from . import test_initscripts_lab
from .conftest import EXAMPLE

pytestmark = pytest.mark.lab
lab = test_initscripts_lab.lab       # the same fixture: etcd members in lab namespaces


def vlx_local(db: Path, *argv: str) -> None:
    subprocess.run([*VLX, "--db", str(db), *argv], check=True, capture_output=True)


def node_tls(db: Path, node: str, out: Path) -> Path:
    """The store files node's cpio carries, written as the initramfs leaves them in /run."""
    cluster = Database(db).load()
    for name, data in scripts.node_files(cluster, cluster.node(node)).items():
        path = out / name
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        path.write_bytes(data)
        path.chmod(0o600)
    env = (out / scripts.STORE_ENV).read_text()
    assert env == f"VLX_STORE_TLS={scripts.RUN_NODE_FILES}/{scripts.STORE_TLS_DIR}\n"
    return out / scripts.STORE_TLS_DIR


def with_tls(directory: Path) -> dict:
    return dict(os.environ, VLX_STORE_TLS=str(directory), VLX_STORE_TIMEOUT="5")


def test_a_node_uses_the_tls_store_with_its_own_certificate(lab, tmp_path):
    source, admin = tmp_path / "source.db", tmp_path / "admin"
    vlx_local(source, "db", "import", str(EXAMPLE))
    vlx_local(source, "db", "tls", "init")
    vlx_local(source, "db", "tls", "member", "e1", "--ip", "198.18.0.31", "--out", str(admin))
    vlx_local(source, "db", "tls", "client", "--out", str(admin))
    node1 = node_tls(source, "node1", tmp_path / "node1")
    node2 = node_tls(source, "node2", tmp_path / "node2")
    assert (node1 / "client.crt").read_bytes() != (node2 / "client.crt").read_bytes()
    assert not (node1 / "node1.crt").exists()            # not a db node: a client only
    url = lab.etcd(1, tls=admin)
    moved = lab.admin.run([*VLX, "--db", str(source), "db", "migrate", "--to", url],
                          env=with_tls(admin))
    assert "generation" in moved.stdout

    # node1 reads and writes with the certificate its cpio carried (a change on any node).
    shown = lab.vlx("db", "show", "--json", env=with_tls(node1))
    assert shown.returncode == 0, shown.stderr
    generation = json.loads(shown.stdout)["generation"]
    added = lab.vlx("node", "add", "node9", "--mac", "52:54:00:00:00:19", "--ip",
                    "198.18.0.19", "--cpus", "1", "--memory", "1GiB", env=with_tls(node1))
    assert added.returncode == 0, added.stderr
    again = lab.vlx("db", "show", "--json", env=with_tls(node2))
    assert json.loads(again.stdout)["generation"] == generation + 1

    # Without a certificate, or with a node certificate of another cluster: one line, exit 2.
    bare = lab.vlx("db", "show", env=dict(os.environ, VLX_STORE_TIMEOUT="3"))
    assert bare.returncode == 2 and bare.stderr.count("\n") == 1
    other = tmp_path / "other.db"
    vlx_local(other, "db", "import", str(EXAMPLE))
    vlx_local(other, "db", "tls", "init")
    stranger = node_tls(other, "node1", tmp_path / "stranger")
    (stranger / "ca.crt").write_bytes((admin / "ca.crt").read_bytes())   # trusts the server
    refused = lab.vlx("db", "show", env=with_tls(stranger))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "TLS refused" in refused.stderr


def test_a_db_node_serves_its_member_with_its_own_certificate(lab, tmp_path):
    source = tmp_path / "source.db"
    vlx_local(source, "db", "import", str(EXAMPLE))
    vlx_local(source, "node", "add", "db1", "--mac", "52:54:00:00:00:31", "--ip",
              "198.18.0.31", "--cpus", "1", "--memory", "1GiB", "--roles", "db")
    vlx_local(source, "db", "tls", "init")
    db1 = node_tls(source, "db1", tmp_path / "db1")
    assert (db1 / "db1.crt").read_bytes() == (db1 / "client.crt").read_bytes()
    node3 = node_tls(source, "node3", tmp_path / "node3")
    # The member e1 of the lab is db1 here: same address, its certificate from the cpio.
    member = lab.add("db1", "198.18.0.31")
    lab.tls = db1
    lab.start(member)
    lab.admin = lab.plug("admin", "198.18.0.30")
    wait_for(lambda: lab.healthy(lab.members), 60, "db1's member to be healthy", interval=0.5)
    moved = lab.admin.run([*VLX, "--db", str(source), "db", "migrate", "--to", lab.url],
                          env=with_tls(node3))
    assert "generation" in moved.stdout, moved.stderr
    shown = lab.vlx("db", "show", "--json", env=with_tls(node3))
    assert shown.returncode == 0 and json.loads(shown.stdout)["generation"] >= 3
