"""Each node's store certificate: derived from the node CA, the same bytes on every replica and
render, one per node, verified by openssl against the root CA as a client (and as a server for
a db node); a node's local copy holds the root CA without its key."""

from __future__ import annotations

import dataclasses
import subprocess

import pytest
from virtualinux.netboot import scripts
from virtualinux.vvcm import VlxError, cluster_ca, inventory
from virtualinux.vvcm.model import Cluster, Role

from .conftest import EXAMPLE, require


@pytest.fixture(scope="module")
def cluster() -> Cluster:
    plain = inventory.apply(Cluster(generation=0, settings=None), inventory.load(EXAMPLE), "t")
    nodes = tuple(dataclasses.replace(n, roles=(*n.roles, Role.DB)) if n.name == "node3" else n
                  for n in plain.nodes)
    return cluster_ca.with_ca(dataclasses.replace(plain, nodes=nodes))


def verify(tmp_path, cluster: Cluster, node: str, purpose: str) -> subprocess.CompletedProcess:
    require("openssl")
    pair = cluster_ca.node_pair(cluster, cluster.node(node))
    (tmp_path / "ca.crt").write_text(cluster_ca.ca_cert(cluster))
    (tmp_path / "chain.crt").write_text(pair.cert)
    return subprocess.run(["openssl", "verify", "-purpose", purpose, "-CAfile",
                           str(tmp_path / "ca.crt"), "-untrusted", str(tmp_path / "chain.crt"),
                           str(tmp_path / "chain.crt")], capture_output=True, text=True)


def test_a_node_certificate_is_the_same_on_every_replica_and_differs_per_node(cluster):
    node1 = cluster.node("node1")
    first = cluster_ca.node_pair(cluster, node1)
    cluster_ca._node_pair.cache_clear()          # as a replica that never made it would
    assert cluster_ca.node_pair(cluster, node1) == first
    assert scripts.node_files(cluster, node1) == scripts.node_files(cluster, node1)
    assert first.key != cluster_ca.node_pair(cluster, cluster.node("node2")).key


def test_the_chain_verifies_as_a_client_and_only_db_nodes_as_servers(cluster, tmp_path):
    assert verify(tmp_path, cluster, "node1", "sslclient").returncode == 0
    assert verify(tmp_path, cluster, "node1", "sslserver").returncode != 0
    assert verify(tmp_path, cluster, "node3", "sslserver").returncode == 0
    subject = subprocess.run(["openssl", "x509", "-noout", "-subject", "-ext",
                              "subjectAltName", "-in", str(tmp_path / "chain.crt")],
                             capture_output=True, text=True, check=True).stdout
    assert "CN = node node3" in subject and "IP Address:198.18.0.13" in subject


def test_a_certificate_of_another_cluster_does_not_verify(cluster, tmp_path):
    other = cluster_ca.with_ca(dataclasses.replace(cluster, credentials=()))
    (tmp_path / "ca.crt").write_text(cluster_ca.ca_cert(cluster))
    (tmp_path / "chain.crt").write_text(cluster_ca.node_pair(other, other.node("node1")).cert)
    failed = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "ca.crt"),
                             "-untrusted", str(tmp_path / "chain.crt"),
                             str(tmp_path / "chain.crt")], capture_output=True, text=True)
    assert failed.returncode != 0


def test_the_cpio_carries_the_store_files_and_db_nodes_their_member_files(cluster):
    node1 = scripts.node_files(cluster, cluster.node("node1"))
    assert {"store/ca.crt", "store/client.crt", "store/client.key", "store.env"} \
        <= set(node1) and "store/node1.crt" not in node1
    node3 = scripts.node_files(cluster, cluster.node("node3"))
    assert node3["store/node3.crt"] == node3["store/client.crt"]
    assert node3["store/node3.key"] == node3["store/client.key"]
    without = dataclasses.replace(cluster, credentials=())
    assert not any(name.startswith("store") for name in
                   scripts.node_files(without, without.node("node1")))


def test_a_local_copy_holds_the_ca_certificate_but_not_its_key(cluster):
    copy = cluster_ca.without_ca_key(cluster)
    assert cluster_ca.ca_cert(copy) == cluster_ca.ca_cert(cluster)
    assert "PRIVATE KEY" not in copy.credential("@store-ca").secret
    with pytest.raises(VlxError, match="local copy") as refused:
        cluster_ca.ca_of(copy)
    assert "\n" not in str(refused.value)
    # A replica from that copy still hands every node the same certificate.
    node = cluster.node("node2")
    assert scripts.node_files(copy, node) == scripts.node_files(cluster, node)
