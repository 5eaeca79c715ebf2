"""A node's start-up against a real etcd store in a lab namespace: it boots from a local copy
of the store, and boots again from that copy while the store is down."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from virtualinux.vm_test.etcd import Lab
from virtualinux.vvcm import Database

from .conftest import EXAMPLE, require
from .test_initscripts import node_root

pytestmark = pytest.mark.lab


@pytest.fixture
def lab(netns, tmp_path):
    require("etcd", "etcdctl")
    lab = Lab(netns, tmp_path)
    try:
        yield lab
    finally:
        lab.close()


def start_up(lab: Lab, root, copy) -> subprocess.CompletedProcess:
    env = {**os.environ, "VLX_STORE": lab.url, "VLX_DB": str(copy)}
    return lab.admin.run([sys.executable, "-m", "virtualinux.initscripts", "--node", "node3",
                          "--root", str(root)], check=False, timeout=120, env=env)


def test_a_node_starts_from_a_local_copy_of_the_store_and_again_with_the_store_down(
        lab, tmp_path):
    lab.etcd(1)
    assert lab.vlx("db", "import", str(EXAMPLE)).returncode == 0
    root, copy = node_root(tmp_path), tmp_path / "copy.db"
    first = start_up(lab, root, copy)
    assert first.returncode == 0, first.stdout + first.stderr
    assert Database(copy).load().node("node3").ip.exploded == "198.18.0.13"
    assert f"[30 database] ok: client of {lab.url}, serving a local copy" in first.stdout
    env = (root / "etc/default/virtualinux-bootsvc").read_text()
    assert f"VLX_STORE={lab.url}" in env and f"VLX_DB={copy}" in env

    lab.kill(lab.members[0])            # the store is gone: the node still starts
    again = start_up(lab, root, copy)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "[10 identity] ok: node3 198.18.0.13" in again.stdout
