"""`vlx db|node|vc` as an administrator uses them: output, --json, --help and every bad input."""

from __future__ import annotations

import argparse
import json

import pytest
from virtualinux.vvcm.cli import build_parser, main

from .conftest import EXAMPLE, vlx


@pytest.fixture
def cluster_db(db_path, capsys):
    assert vlx(capsys, "db", "init")[0] == 0
    assert vlx(capsys, "db", "import", str(EXAMPLE))[0] == 0
    return db_path


def test_init_import_and_list_show_the_example_cluster(cluster_db, capsys):
    code, out, _ = vlx(capsys, "node", "list")
    assert code == 0
    assert [line.split()[0] for line in out.splitlines()[1:]] == [
        "node1", "node2", "node3", "node4"]
    assert "198.18.0.14" in out
    code, out, _ = vlx(capsys, "vc", "list")
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["green", "tan", "pink"]
    assert "green-1@node1" in out


def test_json_output_gives_what_scripts_need(cluster_db, capsys):
    node = json.loads(vlx(capsys, "node", "show", "node1", "--json")[1])
    assert {k: node[k] for k in ("name", "fqdn", "mac", "ip", "cpus", "memory_mib", "roles")} == {
        "name": "node1", "fqdn": "node1.cluster.lab", "mac": "52:54:00:00:00:11",
        "ip": "198.18.0.11", "cpus": 4, "memory_mib": 2048,
        "roles": ["gateway-primary", "storage"]}
    vcs = json.loads(vlx(capsys, "vc", "list", "--json")[1])
    assert [vc["name"] for vc in vcs] == ["green", "tan", "pink"]
    assert [len(vc["vms"]) for vc in vcs] == [4, 2, 4]
    assert vcs[0]["vms"][0]["fqdn"] == "green-1.cluster.lab"
    settings = json.loads(vlx(capsys, "db", "show", "--json")[1])
    assert settings["domain"] == "cluster.lab"
    assert settings["gateway_vip"] == "198.18.0.254"
    assert settings["generation"] == 1
    assert [net["name"] for net in settings["networks"]] == ["cluster", "green", "tan", "pink"]
    assert len(json.loads(vlx(capsys, "node", "list", "--json")[1])) == 4


def test_export_then_import_gives_the_same_database(cluster_db, tmp_path, capsys, monkeypatch):
    vlx(capsys, "node", "add", "node5", "--mac", "52:54:00:00:00:15", "--ip", "198.18.0.15",
        "--cpus", "8", "--memory", "4GiB", "--roles", "storage")
    vlx(capsys, "vc", "define", "blue", "--vms", "3", "--vcpus", "2", "--memory", "128MiB",
        "--cidr", "198.19.6.0/24")
    exported = tmp_path / "exported.toml"
    assert vlx(capsys, "db", "export", "-o", str(exported))[0] == 0
    original = {noun: vlx(capsys, noun, "list", "--json")[1] for noun in ("node", "vc")}

    monkeypatch.setenv("VLX_DB", str(tmp_path / "copy.db"))
    assert vlx(capsys, "db", "import", str(exported))[0] == 0
    copy = {noun: vlx(capsys, noun, "list", "--json")[1] for noun in ("node", "vc")}
    assert copy == original
    assert vlx(capsys, "db", "export")[1].split("\n", 1)[1] == \
        exported.read_text().split("\n", 1)[1]  # all but the generation line


def test_help_works_for_every_noun_and_verb(capsys):
    def walk(parser: argparse.ArgumentParser, path: list[str]):
        yield path
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, path + [name])

    paths = list(walk(build_parser(), []))
    assert ["node", "add"] in paths and ["vc", "define"] in paths and ["db", "import"] in paths
    for path in paths:
        with pytest.raises(SystemExit) as exit_:
            main(path + ["--help"])
        assert exit_.value.code == 0
        assert "usage: vlx" in capsys.readouterr().out


BAD_NODE_ADDS = [
    (["--mac", "52:54:00:00:00:11", "--ip", "198.18.0.15"], "duplicate MAC 52:54:00:00:00:11"),
    (["--mac", "52:54:00:00:00:15", "--ip", "198.18.0.11"], "duplicate cluster IP 198.18.0.11"),
    (["--mac", "52:54:00:00:00:15", "--ip", "198.18.0.254"], "duplicate cluster IP"),
    (["--mac", "52:54:00:00:00:15", "--ip", "198.18.1.15"], "outside the cluster network"),
    (["--mac", "52:54:00:00:00:1", "--ip", "198.18.0.15"], "not a MAC address"),
    (["--mac", "zz:54:00:00:00:15", "--ip", "198.18.0.15"], "not a MAC address"),
    (["--mac", "01:00:5e:00:00:15", "--ip", "198.18.0.15"], "multicast"),
    (["--mac", "52:54:00:00:00:15", "--ip", "198.18.0.300"], "not an IPv4 address"),
]


@pytest.mark.parametrize("flags, message", BAD_NODE_ADDS)
def test_a_bad_node_is_refused_with_exit_2_and_nothing_changes(cluster_db, capsys, flags,
                                                               message):
    before = cluster_db.read_bytes()
    code, _, err = vlx(capsys, "node", "add", "node5", "--cpus", "2", "--memory", "1G", *flags)
    assert code == 2
    assert message in err
    assert err.startswith("vlx: error: ") and err.count("\n") == 1
    assert cluster_db.read_bytes() == before


@pytest.mark.parametrize("flags, message", [
    (["--cidr", "198.19.6.1/24"], "host bits set"),
    (["--cidr", "198.19.6.0/33"], "not a CIDR network"),
    (["--cidr", "198.19.3.0/25"], "overlaps VC green"),
    (["--cidr", "198.18.0.0/16"], "overlaps"),
    (["--cidr", "198.19.6.0/24", "--vxlan", "103"], "duplicate VXLAN id 103"),
    (["--cidr", "198.19.6.0/24", "--vxlan", "7", "--vlan", "7"], "not both"),
])
def test_a_bad_vc_is_refused_with_exit_2_and_nothing_changes(cluster_db, capsys, flags,
                                                             message):
    before = cluster_db.read_bytes()
    code, _, err = vlx(capsys, "vc", "define", "blue", "--vms", "2", "--vcpus", "1",
                       "--memory", "128MiB", *flags)
    assert (code, message in err) == (2, True), err
    assert cluster_db.read_bytes() == before


def test_a_vc_that_does_not_fit_names_what_it_needs(cluster_db, capsys):
    code, _, err = vlx(capsys, "vc", "define", "big", "--vms", "10", "--vcpus", "4",
                       "--memory", "128MiB", "--cidr", "198.19.9.0/24")
    assert code == 2
    assert "does not fit" in err and "40 VCPUs" in err


@pytest.mark.parametrize("argv, message", [
    (["node", "show", "nodeX"], "no node named 'nodeX'"),
    (["node", "remove", "nodeX"], "no node named 'nodeX'"),
    (["node", "remove", "node1"], "hosts 3 VMs"),
    (["vc", "show", "nope"], "no virtual cluster named 'nope'"),
    (["vc", "remove", "nope"], "no virtual cluster named 'nope'"),
    (["db", "import", str(EXAMPLE)], "--replace"),
    (["db", "init"], "exists already"),
])
def test_unknown_names_and_refused_commands_exit_2(cluster_db, capsys, argv, message):
    before = cluster_db.read_bytes()
    code, _, err = vlx(capsys, *argv)
    assert (code, message in err) == (2, True), err
    assert cluster_db.read_bytes() == before


def test_removing_a_vc_frees_its_nodes(cluster_db, capsys):
    for vc in ("green", "tan", "pink"):
        assert vlx(capsys, "vc", "remove", vc)[0] == 0
    assert vlx(capsys, "node", "remove", "node1")[0] == 0
    assert json.loads(vlx(capsys, "db", "show", "--json")[1])["generation"] == 5


def test_commands_without_a_database_say_how_to_make_one(db_path, capsys):
    code, _, err = vlx(capsys, "node", "list")
    assert code == 2 and "vlx db init" in err
    assert not db_path.exists()


@pytest.mark.parametrize("pool, message", [
    ("198.18.0.100-198.18.0.149", None),
    ("198.18.0.149-198.18.0.100", "runs backwards"),
    ("198.18.0.250-198.18.1.10", "not inside 198.18.0.0/24"),
    ("198.18.0.10-198.18.0.20", "holds 198.18.0.11 of node node1"),
    ("198.18.0.100", "FIRST-LAST"),
])
def test_the_discovery_pool_must_be_free_addresses_of_the_cluster_network(
        db_path, tmp_path, capsys, pool, message):
    text = EXAMPLE.read_text().replace("lease_time = 3600",
                                       f'lease_time = 3600\ndiscovery_pool = "{pool}"')
    inventory_file = tmp_path / "pool.toml"
    inventory_file.write_text(text)
    code, _, err = vlx(capsys, "db", "import", str(inventory_file))
    if message is None:
        assert code == 0
        assert json.loads(vlx(capsys, "db", "show", "--json")[1])["discovery_pool"] == pool
    else:
        assert (code, message in err) == (2, True), err
