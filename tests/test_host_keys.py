"""Per-node SSH host keys: made once by `vlx` (import, node add, `vlx node keys`), kept in the
secret part, handed to the node only in its own cpio, installed by the sshkeys start-up step so
the node keeps its key across reboots and re-created snapshots; ssh-keygen reads what we wrote."""

from __future__ import annotations

import dataclasses
import stat
import subprocess
from pathlib import Path

import pytest
from virtualinux.initscripts import startup
from virtualinux.initscripts.steps import sshkeys
from virtualinux.netboot import files, scripts
from virtualinux.storage.naming import ensure_credentials
from virtualinux.vvcm import Credential, VlxError, Volume, changes, host_keys
from virtualinux.vvcm.db import Database

from .conftest import EXAMPLE, require, vlx


@pytest.fixture
def cluster_db(db_path, capsys):
    assert vlx(capsys, "db", "import", str(EXAMPLE))[0] == 0
    return Database(db_path)


def with_root_volume(db: Database, node: str = "node1"):
    golden = Volume(name="golden", kind="golden", backend="reflink", path="/pool/golden",
                    size=1 << 30)
    volume = Volume(name=f"{node}-root", kind="snapshot", backend="reflink",
                    path=f"/pool/{node}", size=1 << 30, origin="golden", owner=node,
                    iqn=f"iqn.2026-11.lab.cluster:{node}-root", portal="198.18.0.254:3260")
    return db.update("test", "root", lambda c: ensure_credentials(
        changes.put_volumes(c, [golden, volume]), [node]))


def test_an_import_gives_every_node_its_own_key_and_a_reimport_keeps_them(cluster_db, capsys):
    cluster = cluster_db.load()
    seeds = {node.name: host_keys.seed_of(cluster, node.name) for node in cluster.nodes}
    assert all(seed is not None and len(seed) == 32 for seed in seeds.values())
    assert len(set(seeds.values())) == len(seeds)
    assert vlx(capsys, "db", "import", "--replace", str(EXAMPLE))[0] == 0
    again = cluster_db.load()
    assert {n.name: host_keys.seed_of(again, n.name) for n in again.nodes} == seeds


def test_node_add_makes_a_key_and_node_remove_drops_it(cluster_db, capsys):
    assert vlx(capsys, "node", "add", "node9", "--mac", "52:54:00:00:00:19",
               "--ip", "198.18.0.19", "--cpus", "2", "--memory", "2GiB")[0] == 0
    assert host_keys.seed_of(cluster_db.load(), "node9") is not None
    assert vlx(capsys, "node", "remove", "node9")[0] == 0
    assert cluster_db.load().credential(host_keys.owner("node9")) is None


def test_node_keys_prints_known_hosts_and_renews_only_what_it_is_told(cluster_db, capsys,
                                                                      tmp_path):
    require("ssh-keygen")
    before = cluster_db.load()
    code, out, _ = vlx(capsys, "node", "keys")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 4
    assert lines[0].startswith("node1,node1.cluster.lab,198.18.0.11 ssh-ed25519 AAAA")
    assert cluster_db.load().generation == before.generation      # nothing was missing
    known = tmp_path / "known_hosts"
    known.write_text(out)
    # ssh-keygen (a real peer) finds node2 under each of its names.
    for name in ("node2", "node2.cluster.lab", "198.18.0.12"):
        found = subprocess.run(["ssh-keygen", "-F", name, "-f", str(known)],
                               capture_output=True, text=True)
        assert found.returncode == 0 and lines[1].split()[2] in found.stdout
    code, out, _ = vlx(capsys, "node", "keys", "node2", "--renew")
    assert code == 0 and out.split()[2] != lines[1].split()[2]
    after = cluster_db.load()
    assert host_keys.seed_of(after, "node1") == host_keys.seed_of(before, "node1")
    assert host_keys.seed_of(after, "node2") != host_keys.seed_of(before, "node2")
    code, _, err = vlx(capsys, "node", "keys", "nosuch")
    assert code == 2 and "nosuch" in err
    assert vlx(capsys, "node", "keys", "--renew")[0] == 2


def test_the_key_travels_only_in_the_nodes_own_cpio(cluster_db):
    cluster = with_root_volume(cluster_db)
    node = cluster.node("node1")
    archive = scripts.node_cpio(cluster, node)
    assert archive == scripts.node_cpio(cluster, node)       # the same on every replica
    entries = cpio_entries(archive)
    key_file = f"{scripts.NODE_FILES_DIR}/{host_keys.NODE_FILE}"
    assert entries[key_file][1] == host_keys.node_file(host_keys.seed_of(cluster, "node1"))
    assert stat.S_IMODE(entries[key_file][0]) == 0o600
    assert stat.S_IMODE(entries[scripts.NODE_FILES_DIR][0]) == 0o700
    # Not in the node's iPXE script or command line, and not handed to another address.
    seed_text = host_keys.node_file(host_keys.seed_of(cluster, "node1")).split()[1].decode()
    assert seed_text not in scripts.node_script(cluster, node, ())
    boot_files = files.BootFiles(Path("/nonexistent"), cluster)
    with pytest.raises(files.RequestRefused):
        boot_files.lookup("nodes/52-54-00-00-00-11.cpio", client="198.18.0.12")
    assert boot_files.lookup("nodes/52-54-00-00-00-11.cpio", client="198.18.0.11").data \
        == archive


def cpio_entries(archive: bytes) -> dict[str, tuple[int, bytes]]:
    """name -> (mode, data) of a newc archive (read with the same layout the kernel reads)."""
    entries, offset = {}, 0
    while True:
        header = archive[offset:offset + 110]
        mode, size, namesize = (int(header[6 + 8 * i:14 + 8 * i], 16) for i in (1, 6, 11))
        name_start = offset + 110
        name = archive[name_start:name_start + namesize - 1].decode()
        data_start = name_start + namesize + (-(110 + namesize) % 4)
        if name == "TRAILER!!!":
            return entries
        entries[name] = (mode, archive[data_start:data_start + size])
        offset = data_start + size + (-size % 4)


def delivered_root(tmp_path: Path, cluster, node: str = "node1") -> Path:
    root = tmp_path / "root"
    (root / "run/virtualinux/node").mkdir(parents=True)
    for name, data in scripts.node_files(cluster, cluster.node(node)).items():
        (root / "run/virtualinux/node" / name).write_bytes(data)
    return root


def test_the_step_installs_the_key_for_sshd_and_keeps_it(cluster_db, tmp_path):
    require("ssh-keygen")
    cluster = cluster_db.load()
    root = delivered_root(tmp_path, cluster)
    boot = startup.Boot(node=cluster.node("node1"), cluster=cluster, root=root)
    fingerprint = host_keys.fingerprint(host_keys.seed_of(cluster, "node1"))
    assert sshkeys.run(boot) == f"ed25519 host key {fingerprint}"
    key = root / sshkeys.KEY.lstrip("/")
    info = key.stat()
    assert stat.S_IMODE(info.st_mode) == 0o600 and (info.st_uid, info.st_gid) == (0, 0)
    # OpenSSH reads the file we made and derives the public key the database gives out.
    derived = subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True,
                             text=True, check=True).stdout.split()[:2]
    known = host_keys.known_hosts(cluster, ["node1"])[0].split()[1:]
    assert derived == known
    listed = subprocess.run(["ssh-keygen", "-l", "-f", str(key)], capture_output=True,
                            text=True, check=True).stdout
    assert fingerprint in listed
    assert (root / "etc/ssh/ssh_host_ed25519_key.pub").read_text().split()[:2] == known
    assert (root / sshkeys.SSHD_DROP_IN.lstrip("/")).read_text().endswith(
        f"HostKey {sshkeys.KEY}\n")
    # A reboot (the step again): nothing changes, the file is not even rewritten.
    mtime = key.stat().st_mtime_ns
    assert sshkeys.run(boot).endswith("(unchanged)") and key.stat().st_mtime_ns == mtime
    # A re-created snapshot whose image made a key of its own: ours replaces it.
    key.unlink()
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)],
                   check=True, capture_output=True)
    assert not sshkeys.run(boot).endswith("(unchanged)")
    assert subprocess.run(["ssh-keygen", "-y", "-f", str(key)], capture_output=True,
                          text=True, check=True).stdout.split()[:2] == known


def test_the_step_without_a_delivered_key_fails_and_says_what_to_do(cluster_db, tmp_path):
    cluster = cluster_db.load()
    boot = startup.Boot(node=cluster.node("node1"), cluster=cluster, root=tmp_path)
    with pytest.raises(startup.StepFailed, match=r"vlx node keys node1"):
        sshkeys.run(boot)
    assert not (tmp_path / "etc/ssh").exists()


def test_a_db_export_without_secrets_carries_no_key(cluster_db, capsys, tmp_path):
    out = tmp_path / "cluster.toml"
    assert vlx(capsys, "db", "export", "-o", str(out))[0] == 0
    cluster = cluster_db.load()
    text = out.read_text()
    for node in cluster.nodes:
        credential = cluster.credential(host_keys.owner(node.name))
        assert credential.secret not in text
    assert "ssh-host-key" not in text and not (tmp_path / "cluster.secrets.toml").exists()


def test_a_mangled_key_in_the_database_is_one_clear_error(cluster_db):
    cluster = cluster_db.load()
    bad = dataclasses.replace(cluster, credentials=tuple(
        Credential(c.owner, c.username, "not base64!") if c.owner == host_keys.owner("node1")
        else c for c in cluster.credentials))
    with pytest.raises(VlxError, match="vlx node keys --renew node1"):
        host_keys.seed_of(bad, "node1")

