"""The replicated store against real etcd members in lab namespaces: quorum loss and healing,
two writers at once, writers killed mid-change, local copies refused and rebuilt, and a
replica answering udhcpc from its local copy. Each etcd is `vlx db serve` in its own namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from virtualinux.bench.scale import inventory as big_inventory
from virtualinux.vm_test.etcd import VLX, Lab
from virtualinux.vm_test.netns import Namespace
from virtualinux.vm_test.wait import wait_for
from virtualinux.vvcm.db import Database

from .conftest import EXAMPLE, require
from .test_dhcp_lab import events, recording_script, udhcpc

pytestmark = pytest.mark.lab

NODE3_MAC, NODE3_IP = "52:54:00:00:00:13", "198.18.0.13"
REPLICA = "198.18.0.201"


@pytest.fixture
def lab(netns, tmp_path):
    require("etcd", "etcdctl", "udhcpc")
    lab = Lab(netns, tmp_path)
    try:
        yield lab
    finally:
        lab.close()


def node_add(lab: Lab, index: int, ip: str | None = None, **kwargs) -> subprocess.CompletedProcess:
    return lab.vlx("node", "add", f"extra{index}", "--mac", f"52:54:00:ff:01:{index:02x}",
                   "--ip", ip or f"198.18.0.{100 + index}", "--cpus", "1", "--memory", "1GiB",
                   **kwargs)


def start_replica(lab: Lab, tmp: Path, ns: Namespace | None = None):
    ns = ns or lab.plug("replica", REPLICA)
    state = tmp / "replica-state"
    process = lab.popen(ns, [*VLX, "--store", lab.url, "--db", str(tmp / "copy.db"),
                             "bootsvc", "run", "--interface", "eth0", "--address", REPLICA,
                             "--state-dir", str(state), "--poll", "0.2"],
                        tmp / "replica.log")

    def status() -> dict:
        try:
            return json.loads((state / "status.json").read_text())
        except (OSError, ValueError):
            return {}

    wait_for(lambda: status().get("state") == "running" or process.poll() is not None, 30,
             "the replica to start")
    assert process.poll() is None, (tmp / "replica.log").read_text()
    return process, status


def dhcp_address(lab: Lab, tmp: Path, mac: str) -> str:
    client = lab.plug(f"c{mac[-2:]}", mac=mac)
    script, out = recording_script(tmp, f"udhcpc-{mac[-2:]}")
    result = client.run(udhcpc(client, script, "-q", "-n"), check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    return next(e for e in events(out) if e["EVENT"] == "bound")["ip"]


def test_import_through_etcd_then_a_replica_answers_udhcpc_from_its_local_copy(lab, tmp_path):
    lab.etcd(1)
    result = lab.vlx("db", "import", str(EXAMPLE))
    assert result.returncode == 0, result.stderr
    assert "(generation 1)" in result.stdout
    _, status = start_replica(lab, tmp_path)
    assert status()["store"]["generation"] == 1
    assert dhcp_address(lab, tmp_path, NODE3_MAC) == NODE3_IP
    # The copy is an ordinary SQLite database at the store's generation.
    copy = subprocess.run([*VLX, "--db", str(tmp_path / "copy.db"), "node", "show", "node3",
                           "--json"], capture_output=True, text=True, check=True)
    assert json.loads(copy.stdout)["ip"] == NODE3_IP


def test_a_replica_serves_its_older_local_copy_at_once_then_catches_up(lab, tmp_path):
    """A replica with a good local copy does not ask the store before it serves (a node's
    start-up has just written one): its thread, started once the services listen, brings the
    copy to the store's generation in place, and the new node is served."""
    lab.etcd(1)
    assert lab.vlx("db", "import", str(EXAMPLE)).returncode == 0
    ns = lab.plug("replica", REPLICA)
    first, status = start_replica(lab, tmp_path, ns)
    first.terminate()
    assert first.wait(timeout=30) == 0
    assert node_add(lab, 1).returncode == 0            # gen 2, while no replica runs
    second, status = start_replica(lab, tmp_path, ns)
    wait_for(lambda: status().get("generation") == 2, 30, "the replica to catch up")
    store = status()["store"]
    assert store["reachable"] and store["rebuilt_because"] is None
    assert (store["copies_written"], store["copies_whole"]) == (1, 0)   # advanced in place
    assert dhcp_address(lab, tmp_path, "52:54:00:ff:01:01") == "198.18.0.101"
    assert second.poll() is None


def test_three_members_lose_one_then_quorum_then_heal(lab, tmp_path):
    lab.etcd(3)
    assert lab.vlx("db", "import", str(EXAMPLE)).returncode == 0
    replica, status = start_replica(lab, tmp_path)
    e1, e2, e3 = lab.members

    lab.kill(e1)
    assert node_add(lab, 1).returncode == 0          # two of three: writes go on
    wait_for(lambda: status().get("generation") == 2, 30, "the replica to serve gen 2")

    lab.kill(e2)
    env = dict(os.environ, VLX_STORE_TIMEOUT="3")
    refused = node_add(lab, 2, env=env)
    assert refused.returncode == 2
    assert "unreachable or has no quorum" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    store = wait_for(lambda: (s := status().get("store")) and not s["reachable"] and s, 60,
                     "the replica to notice the lost quorum")
    assert store["message"].startswith("store unreachable since ")
    assert store["message"].endswith("serving gen 2")
    # No quorum, and a node still boots: the replica answers from its local copy.
    assert dhcp_address(lab, tmp_path, NODE3_MAC) == NODE3_IP
    assert replica.poll() is None

    lab.start(e1)
    lab.start(e2)
    wait_for(lambda: lab.healthy(lab.members), 90, "the members to heal", interval=0.5)
    assert node_add(lab, 3).returncode == 0
    wait_for(lambda: status().get("generation") == 3, 30, "the replica to catch up")
    assert status()["store"]["reachable"]
    # Every member holds the same head: read each one alone, serializably (its own copy).
    for member in lab.members:
        head = lab.admin.run(["etcdctl", "--endpoints", f"http://{member.endpoint}",
                              "get", "--consistency=s", "--print-value-only",
                              "virtualinux/head"]).stdout
        assert json.loads(head)["generation"] == 3, member.name


WRITER = """
import ipaddress, sys
from virtualinux.vvcm import Node, changes
from virtualinux.vvcm.db import Database
url, tag, count, base = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
db = Database(store=url)
for i in range(count):
    node = Node(name=f"{tag}{i}", mac=f"52:54:00:{base:02x}:{i // 256:02x}:{i % 256:02x}",
                ip=ipaddress.IPv4Address("198.18.0.0") + base * 256 + i, cpus=1, memory=1024)
    db.update("node add", node.name, lambda c, node=node: changes.add_node(c, node))
print("conflicts", db.backend.conflicts)
"""

CHANGES_PER_WRITER = 200


def test_two_writers_at_once_lose_nothing_and_generations_stay_dense(lab, tmp_path):
    lab.etcd(1)
    cluster = tmp_path / "wide.toml"
    cluster.write_text(EXAMPLE.read_text().replace('cidr = "198.18.0.0/24"',
                                                   'cidr = "198.18.0.0/16"'))
    assert lab.vlx("db", "import", str(cluster)).returncode == 0
    writers = []
    for tag, base in (("a", 10), ("b", 20)):
        ns = lab.plug(f"w{tag}", f"198.18.0.{40 + base}")
        writers.append(lab.popen(ns, [sys.executable, "-c", WRITER, lab.url, tag,
                                      str(CHANGES_PER_WRITER), str(base)],
                                 tmp_path / f"writer-{tag}.log"))
    for writer in writers:
        assert writer.wait(600) == 0
    logs = "".join((tmp_path / f"writer-{t}.log").read_text() for t in "ab")
    log = json.loads(lab.vlx("db", "log", "-n", "1000", "--json").stdout)
    assert [c["generation"] for c in log] == list(range(2 * CHANGES_PER_WRITER + 2))
    nodes = {n["name"] for n in json.loads(lab.vlx("node", "list", "--json").stdout)}
    for tag in "ab":
        assert {f"{tag}{i}" for i in range(CHANGES_PER_WRITER)} <= nodes, logs
    # Both really raced: at least one CAS was lost and re-applied.
    assert sum(int(line.split()[1]) for line in logs.splitlines()
               if line.startswith("conflicts")) > 0, logs


@pytest.mark.parametrize("point", ["before-chunks", "chunks-written", "before-commit",
                                   "committed"])
def test_a_writer_killed_mid_change_leaves_no_half_change(lab, tmp_path, point):
    lab.etcd(1)
    assert lab.vlx("db", "import", str(EXAMPLE)).returncode == 0
    big = tmp_path / "big.toml"
    big.write_text(big_inventory(400))
    env = dict(os.environ, VLX_ETCD_CHUNK_BYTES="1024", VLX_STORE_PAUSE_AT=point)
    writer = lab.admin.popen([*VLX, "--store", lab.url, "db", "import", "--replace", str(big)],
                             stderr=subprocess.PIPE, env=env)
    try:
        assert writer.stderr.readline().decode().strip() == f"vlx: paused at {point}"
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(10)
    show = json.loads(lab.vlx("db", "show", "--json").stdout)
    expected = (2, 400) if point == "committed" else (1, 4)
    assert (show["generation"], show["nodes"]) == expected
    assert [c["generation"] for c in json.loads(lab.vlx("db", "log", "--json").stdout)] == \
        list(range(expected[0] + 1))
    # The next writer goes on from there; once the killed writer's generation is two behind,
    # its unreferenced chunks are gone too: only the current snapshot and the one before stay.
    for index in (1, 2, 3):
        ip = f"198.18.2.{index}" if point == "committed" else None   # free in either cluster
        assert node_add(lab, index, ip).returncode == 0
    snapshots = {key.split("/")[2] for key in lab.etcdctl(
        "get", "--prefix", "--keys-only", "virtualinux/snap/").split()}
    current = expected[0] + 3
    assert sorted(int(snap.split("-")[0]) for snap in snapshots) == [current - 1, current]


COPY = """
import json, sys
from pathlib import Path
from virtualinux.vvcm.errors import VlxError
from virtualinux.vvcm.replica_copy import ReplicaCopy
from virtualinux.vvcm.store import parse_url
copy = ReplicaCopy(parse_url(sys.argv[1]), Path(sys.argv[2]))
try:
    copy.prepare()
except VlxError as err:
    print(json.dumps({"error": str(err)}))
    sys.exit(0)
print(json.dumps(copy.status()))
"""


def prepare_copy(lab: Lab, path: Path) -> dict:
    """A replica's start-up (ReplicaCopy.prepare) in its own process: its status, or error."""
    result = lab.admin.run([sys.executable, "-c", COPY, lab.url, str(path)], timeout=60)
    return json.loads(result.stdout)


def test_a_bad_local_copy_is_refused_and_rebuilt_and_a_good_one_served_without_store(
        lab, tmp_path):
    lab.etcd(1)
    assert lab.vlx("db", "import", str(EXAMPLE)).returncode == 0
    path = tmp_path / "copy.db"

    path.write_bytes(b"not a database at all" * 100)
    status = prepare_copy(lab, path)
    assert "not a virtualinux database" in status["rebuilt_because"]
    assert status["generation"] == 1 and status["reachable"]

    subprocess.run(["sqlite3", str(path), "PRAGMA user_version = 99"], check=True)
    status = prepare_copy(lab, path)
    assert "schema version 99" in status["rebuilt_because"]
    assert status["generation"] == 1

    lab.kill(lab.members[0])
    status = prepare_copy(lab, path)   # a good copy and no store: served as it is
    assert status["rebuilt_because"] is None and status["generation"] == 1
    assert status["message"].startswith("store unreachable since ")
    path.write_bytes(b"garbage")       # a bad copy and no store: nothing to serve
    assert "nothing to serve" in prepare_copy(lab, path)["error"]


def test_a_copy_that_missed_generations_takes_only_them_even_after_a_compaction(
        lab, tmp_path):
    lab.etcd(1)
    assert lab.vlx("db", "import", str(EXAMPLE)).returncode == 0
    path = tmp_path / "copy.db"

    assert prepare_copy(lab, path)["copies_whole"] == 1     # the first copy is whole: gen 1
    for index in range(3):
        assert node_add(lab, index).returncode == 0        # gens 2-4, missed by the copy
    # etcd forgets the history up to a revision past head's: head's own revision is gone.
    lab.etcdctl("put", "unrelated", "x")
    revision = json.loads(lab.etcdctl("get", "unrelated", "-w", "json"))["header"]["revision"]
    lab.etcdctl("compact", str(revision))
    gone = lab.admin.run([*lab.etcdctl_args(lab.members), "get", "virtualinux/head",
                          f"--rev={revision - 1}"], check=False)
    assert "compacted" in gone.stderr

    status = prepare_copy(lab, path)
    assert status["generation"] == 4 and status["rebuilt_because"] is None
    assert status["copies_written"] == 1 and status["copies_whole"] == 0   # in place
    copy = Database(path)
    assert [c.generation for c in copy.changes(None)] == [0, 1, 2, 3, 4]
    assert [n.name for n in copy.load().nodes][-3:] == ["extra0", "extra1", "extra2"]


SPOILED_THEN_ADVANCED = """
import json, sqlite3, subprocess, sys
from pathlib import Path
from virtualinux.vvcm.replica_copy import ReplicaCopy
from virtualinux.vvcm.store import parse_url
copy = ReplicaCopy(parse_url(sys.argv[1]), Path(sys.argv[2]))
copy.prepare()
with sqlite3.connect(sys.argv[2]) as conn:       # changed behind the replica's back
    conn.execute("PRAGMA user_version = 99")
subprocess.run(json.loads(sys.argv[3]), check=True, capture_output=True)
copy.sync_once()
print(json.dumps(copy.status()))
"""


def test_a_copy_spoiled_while_followed_is_rebuilt_whole_at_the_next_generation(lab, tmp_path):
    lab.etcd(1)
    assert lab.vlx("db", "import", str(EXAMPLE)).returncode == 0
    path = tmp_path / "copy.db"
    add = [*VLX, "--store", lab.url, "node", "add", "extra9", "--mac", "52:54:00:ff:01:09",
           "--ip", "198.18.0.109", "--cpus", "1", "--memory", "1GiB"]
    result = lab.admin.run([sys.executable, "-c", SPOILED_THEN_ADVANCED, lab.url, str(path),
                            json.dumps(add)], timeout=120)
    status = json.loads(result.stdout)
    assert "schema version 99" in status["rebuilt_because"]
    assert status["generation"] == 2 and status["copies_whole"] == 2   # first, and rebuilt
    assert Database(path).load().nodes[-1].name == "extra9"


def test_a_store_without_our_data_or_unreachable_is_one_line_and_exit_2(lab):
    lab.etcd(1)
    empty = lab.vlx("db", "show")
    assert empty.returncode == 2
    assert empty.stderr.count("\n") == 1
    assert "holds no virtualinux database" in empty.stderr
    nobody = lab.admin.run([*VLX, "--store", "etcd://198.18.0.99:2379", "db", "show"],
                           check=False, timeout=60, env=dict(os.environ, VLX_STORE_TIMEOUT="2"))
    assert nobody.returncode == 2 and nobody.stderr.count("\n") == 1
    assert "etcd://198.18.0.99:2379 is unreachable" in nobody.stderr


def test_migrate_sqlite_to_etcd_and_back_keeps_generation_and_log(lab, tmp_path):
    lab.etcd(1)
    source = tmp_path / "source.db"
    for argv in (["db", "import", str(EXAMPLE)],
                 ["node", "add", "x1", "--mac", "52:54:00:00:01:01", "--ip", "198.18.0.101",
                  "--cpus", "1", "--memory", "1GiB"]):
        subprocess.run([*VLX, "--db", str(source), *argv], check=True, capture_output=True)
    moved = lab.admin.run([*VLX, "--db", str(source), "db", "migrate", "--to", lab.url])
    assert "generation 2, 3 change-log entries" in moved.stdout
    back = tmp_path / "back.db"
    lab.vlx("db", "migrate", "--to", f"sqlite:{back}")
    exports = [subprocess.run([*VLX, "--db", str(db), "db", "export"], capture_output=True,
                              text=True, check=True).stdout for db in (source, back)]
    assert exports[0] == exports[1]
    logs = [subprocess.run([*VLX, "--db", str(db), "db", "log", "--json"], capture_output=True,
                           text=True, check=True).stdout for db in (source, back)]
    assert logs[0] == logs[1]
    again = lab.admin.run([*VLX, "--db", str(source), "db", "migrate", "--to", lab.url],
                          check=False)
    assert again.returncode == 2 and "migrate into an empty store only" in again.stderr


def test_with_tls_only_holders_of_a_cluster_certificate_get_in(lab, tmp_path):
    source, tls = tmp_path / "source.db", tmp_path / "tls"
    for argv in (["db", "import", str(EXAMPLE)], ["db", "tls", "init"],
                 ["db", "tls", "member", "e1", "--ip", "198.18.0.31", "--out", str(tls)],
                 ["db", "tls", "client", "--out", str(tls)]):
        subprocess.run([*VLX, "--db", str(source), *argv], check=True, capture_output=True)
    url = lab.etcd(1, tls=tls)
    with_cert = dict(os.environ, VLX_STORE_TLS=str(tls))
    moved = lab.admin.run([*VLX, "--db", str(source), "db", "migrate", "--to", url],
                          env=with_cert)
    assert "generation 2" in moved.stdout
    shown = lab.vlx("db", "show", "--json", env=with_cert)
    assert json.loads(shown.stdout)["generation"] == 2

    plain = lab.vlx("db", "show", env=dict(os.environ, VLX_STORE_TIMEOUT="3"))
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1
    assert "set VLX_STORE_TLS" in plain.stderr
    # A certificate of another CA (another database's) is refused by etcd.
    other, stranger = tmp_path / "other.db", tmp_path / "stranger"
    for argv in (["db", "init"], ["db", "tls", "init"], ["db", "tls", "client", "--out",
                                                          str(stranger)]):
        subprocess.run([*VLX, "--db", str(other), *argv], check=True, capture_output=True)
    (stranger / "ca.crt").write_bytes((tls / "ca.crt").read_bytes())   # trusts the server
    refused = lab.vlx("db", "show", env=dict(os.environ, VLX_STORE_TLS=str(stranger)))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert "TLS refused" in refused.stderr


def test_a_member_joins_and_leaves_with_db_member_add_and_remove(lab):
    lab.etcd(1)
    assert lab.vlx("db", "init").returncode == 0
    added = lab.vlx("db", "member", "add", "e2", "--peer-url", "http://198.18.0.32:2380")
    assert added.returncode == 0, added.stderr
    assert "--initial-cluster e1=http://198.18.0.31:2380,e2=http://198.18.0.32:2380 --join" \
        in added.stdout
    e2 = lab.add("e2", "198.18.0.32")
    lab.start(e2, join=True)
    wait_for(lambda: lab.healthy([e2]), 60, "the new member to be healthy", interval=0.5)
    listed = json.loads(lab.vlx("db", "member", "list", "--json").stdout)
    assert sorted(m["name"] for m in listed) == ["e1", "e2"]
    # The new member serves the store: read through it alone.
    alone = lab.admin.run([*VLX, "--store", e2.endpoint.join(["etcd://", ""]), "db", "show",
                           "--json"])
    assert json.loads(alone.stdout)["generation"] == 0
    # etcd refuses to remove a member until it has been connected for 5 s ("unhealthy
    # cluster"): that refusal is one clear line, and a retry then goes through.
    wait_for(lambda: lab.vlx("db", "member", "remove", "e2").returncode == 0, 60,
             "etcd to let the new member go", interval=1)
    lab.kill(e2)
    listed = json.loads(lab.vlx("db", "member", "list", "--json").stdout)
    assert [m["name"] for m in listed] == ["e1"]
    missing = lab.vlx("db", "member", "remove", "e9")
    assert missing.returncode == 2 and "no member named 'e9'" in missing.stderr
