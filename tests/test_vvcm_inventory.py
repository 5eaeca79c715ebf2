"""The inventory TOML: every error names the file, the line of the entry and the field."""

from __future__ import annotations

import json

import pytest
from virtualinux.vvcm import changes, fields, inventory
from virtualinux.vvcm.cli import main
from virtualinux.vvcm.errors import VlxError
from virtualinux.vvcm.model import Network, Role, StorageBackend, Volume, VolumeKind

from .conftest import EXAMPLE

HEADER = """\
[cluster]
domain = "cluster.lab"
cidr = "198.18.0.0/24"
gateway_vip = "198.18.0.254"
"""


def node(name: str, mac: str, ip: str, **extra: str) -> str:
    lines = [f'name = "{name}"', f'mac = "{mac}"', f'ip = "{ip}"', "cpus = 4",
             'memory = "2GiB"'] + [f"{k} = {v}" for k, v in extra.items()]
    return "\n[[node]]\n" + "\n".join(lines) + "\n"


def refused(text: str, tmp_path) -> str:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(VlxError) as error:
        cluster = inventory.apply(
            __import__("virtualinux.vvcm.model", fromlist=["Cluster"]).Cluster(0, None),
            inventory.load(path), str(path))
        del cluster
    return str(error.value)


def test_the_example_is_the_papers_cluster():
    parsed = inventory.load(EXAMPLE)
    assert [n.name for n in parsed.nodes] == ["node1", "node2", "node3", "node4"]
    assert all(n.cpus == 4 for n in parsed.nodes)
    assert [(vc.name, vc.vms, vc.vcpus) for vc, _ in parsed.vcs] == [
        ("green", 4, 1), ("tan", 2, 2), ("pink", 4, 4)]
    assert str(parsed.settings.gateway_vip) == "198.18.0.254"
    assert "gateway-primary" in parsed.nodes[0].roles
    assert "gateway-backup" in parsed.nodes[1].roles


def test_a_toml_syntax_error_names_file_and_line(tmp_path):
    message = refused(HEADER + "\n[[node]]\nname = \"node1\"\nmac = 52:54\n", tmp_path)
    assert "bad.toml" in message and "TOML syntax error" in message and "line 8" in message


def test_a_bad_field_names_file_line_entry_and_field(tmp_path):
    text = HEADER + node("node1", "52:54:00:00:00:11", "198.18.0.11") + node(
        "node2", "52:54:00:00:00:1G", "198.18.0.12")
    message = refused(text, tmp_path)
    assert "bad.toml:13: [[node]] #2 (node2)" in message
    assert "mac = '52:54:00:00:00:1G': not a MAC address" in message


@pytest.mark.parametrize("body, expected", [
    (node("node1", "52:54:00:00:00:11", "198.18.0.11")
     + node("node2", "52:54:00:00:00:11", "198.18.0.12"),
     "duplicate MAC 52:54:00:00:00:11 (node node1 and node node2)"),
    (node("node1", "52:54:00:00:00:11", "198.18.0.11")
     + node("node2", "52:54:00:00:00:12", "198.18.0.11"), "duplicate cluster IP 198.18.0.11"),
    (node("node1", "52:54:00:00:00:11", "198.18.7.11"), "outside the cluster network"),
    (node("node1", "52:54:00:00:00:11", "198.18.0.11", cpus2="1"), "unknown key 'cpus2'"),
    (node("node1", "52:54:00:00:00:11", "198.18.0.11", roles='["gateway"]'), "unknown 'gateway'"),
    (node("node1", "52:54:00:00:00:11", "198.18.0.11", uplink_address='"198.18.1.254"'),
     "not an address with its prefix like 198.18.1.254/24"),
    (node("node1", "52:54:00:00:00:11", "198.18.0.11", uplink_address='"198.18.1.0/24"'),
     "198.18.1.0 is not a host address of 198.18.1.0/24"),
    ('\n[[node]]\nname = "node1"\n', "missing required key 'mac'"),
    ("\n[nodes]\nx = 1\n", "unknown section 'nodes'"),
    ("\n[[vc]]\nname = 'x'\nvms = 1\nvcpus = 1\nmemory = 64\ncidr = '10.0.0.0/8'\n"
     "placement = { x-1 = 'node9' }\n", "unknown node 'node9'"),
])
def test_inventory_errors(tmp_path, body, expected):
    assert expected in refused(HEADER + body, tmp_path)


def test_a_cidr_with_host_bits_is_refused(tmp_path):
    message = refused(HEADER.replace("198.18.0.0/24", "198.18.0.1/24"), tmp_path)
    assert "bad.toml:1: [cluster]" in message and "host bits set" in message


def test_a_failed_import_leaves_the_database_unchanged(db_path, tmp_path, capsys):
    assert main(["db", "import", str(EXAMPLE)]) == 0
    before = db_path.read_bytes()
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace('vms = 4\nvcpus = 4', 'vms = 40\nvcpus = 4'))
    assert main(["db", "import", "--replace", str(bad)]) == 2
    assert "does not fit" in capsys.readouterr().err
    assert db_path.read_bytes() == before


def test_roles_kinds_and_backends_are_enums_that_read_and_write_as_names(db):
    db.update("db import", "test", lambda c: inventory.apply(c, inventory.load(EXAMPLE), "test"))
    db.update("volume", "test", lambda c: changes.put_volumes(c, [Volume(
        name="golden", kind=VolumeKind.GOLDEN, backend=StorageBackend.QCOW2, path="/p/g",
        size=1 << 30)]))
    loaded = db.load()
    roles = loaded.node("node1").roles
    assert roles and all(type(role) is Role for role in roles)
    assert Role.GATEWAY_PRIMARY in roles and "gateway-primary" in roles
    volume = loaded.volume("golden")
    assert type(volume.kind) is VolumeKind and volume.kind == "golden"
    assert type(volume.backend) is StorageBackend and volume.backend == "qcow2"
    dumped = inventory.dump(loaded)
    assert '"gateway-primary",' in dumped and 'backend = "qcow2"' in dumped
    assert "Role." not in dumped and "StorageBackend." not in dumped


def test_a_volume_of_an_unknown_backend_or_kind_is_refused():
    with pytest.raises(VlxError, match="kind = 'copy': choose from golden, snapshot"):
        fields.from_mapping(Volume, {"name": "v", "kind": "copy", "backend": "qcow2",
                                     "path": "/p", "size": 1}, "test")
    with pytest.raises(VlxError, match="backend = 'zfs': choose from reflink, lvm-thin, qcow2"):
        fields.from_mapping(Volume, {"name": "v", "kind": "golden", "backend": "zfs",
                                     "path": "/p", "size": 1}, "test")


def test_networks_are_typed_records(db):
    cluster = db.update("db import", "test",
                        lambda c: inventory.apply(c, inventory.load(EXAMPLE), "test"))
    first, *vcs = cluster.networks()
    assert first == Network(name="cluster", cidr=cluster.settings.cidr,
                            gateway=cluster.settings.gateway_vip)
    assert [(net.name, net.cidr, net.vxlan) for net in vcs] == [
        (vc.name, vc.cidr, vc.vxlan) for vc in cluster.vcs]
    assert first.to_json() == {"name": "cluster", "cidr": "198.18.0.0/24",
                               "gateway": "198.18.0.254"}


# A real Ed25519 public key (any 32 bytes are one) and an RSA one, as ssh-keygen writes them.
ADMIN_KEY = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDNUdKcNModuFZsiL6zsZ2QRr2wEjM69UjzL/LSqxjxw "
             "ops@desk")


def test_admin_ssh_keys_are_read_checked_and_written_back(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text(HEADER + f"admin_ssh_keys = ['{ADMIN_KEY}', '{ADMIN_KEY}']\n"
                    + node("node1", "52:54:00:00:00:11", "198.18.0.11"))
    cluster = inventory.apply(
        __import__("virtualinux.vvcm.model", fromlist=["Cluster"]).Cluster(0, None),
        inventory.load(path), str(path))
    assert cluster.settings.admin_ssh_keys == (ADMIN_KEY,)      # one line per key
    assert fields.to_mapping(cluster.settings)["admin_ssh_keys"] == [ADMIN_KEY]


@pytest.mark.parametrize("line, expected", [
    (f'command="/bin/sh" {ADMIN_KEY}', "is not an SSH public key line"),
    (f'from="198.18.0.0/24" {ADMIN_KEY}', "is not an SSH public key line"),
    (ADMIN_KEY.replace("ssh-ed25519", "ssh-rsa", 1), "names another key type"),
    ("ssh-ed25519 AAAA!!!!", "does not decode"),
    ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDNU", "not a valid public key"),
    (ADMIN_KEY + "\u00e9", "printable ASCII"),
    (ADMIN_KEY + "\x1b[2J", "no line breaks, tabs or control characters"),
    (ADMIN_KEY + "\nssh-ed25519 AAAA", "no line breaks, tabs or control characters"),
])
def test_a_malformed_admin_key_is_refused_in_one_line(tmp_path, line, expected):
    body = HEADER + f"admin_ssh_keys = [{json.dumps(line)}]\n"   # a TOML basic string
    message = refused(body + node("node1", "52:54:00:00:00:11", "198.18.0.11"), tmp_path)
    assert "admin_ssh_keys" in message and expected in message, message
    assert "\n" not in message
