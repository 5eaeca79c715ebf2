"""The boot-service daemon without sockets or root: who the replica is, generations (newer
reloads, older is refused), the status file, and every bad `vlx bootsvc` input."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import ipaddress
import json
from pathlib import Path

import pytest
from virtualinux.bootsvc import daemon, options
from virtualinux.bootsvc.dhcp import DhcpService
from virtualinux.bootsvc.http import HttpService
from virtualinux.bootsvc.status import STATUS_FILE, State, read_status
from virtualinux.bootsvc.tftp import TftpService
from virtualinux.vvcm import NotFound, VlxError, changes, inventory
from virtualinux.vvcm.cli import main

from .conftest import EXAMPLE
from .test_dhcp_wire import scapy_request

LOOPBACK = ipaddress.IPv4Address("127.0.0.1")


@pytest.fixture
def cluster(db):
    return db.update("db import", "test",
                     lambda c: inventory.apply(c, inventory.load(EXAMPLE), "test"))


def test_replica_beside_the_nodes_is_not_a_node(cluster, tmp_path):
    replica = daemon.resolve_replica(cluster, "lo", None, LOOPBACK, tmp_path, tmp_path,
                                     ("dhcp",))
    assert replica.node is None and replica.address == LOOPBACK
    assert replica.services == ("dhcp",)


@pytest.mark.parametrize(("interface", "node", "address", "error", "message"), [
    ("nosuch0", None, None, VlxError, "no network interface 'nosuch0'"),
    ("lo", "nosuch", None, NotFound, "no node named 'nosuch'"),
    ("lo", None, None, VlxError, "no node's address is on lo"),
    ("lo", None, ipaddress.IPv4Address("198.18.0.201"), VlxError,
     "198.18.0.201 is not an address of lo"),
    ("lo", "node1", None, VlxError, "198.18.0.11 is not an address of lo"),
])
def test_replica_that_cannot_be_is_a_clear_error(cluster, tmp_path, interface, node, address,
                                                 error, message):
    with pytest.raises(error, match=message):
        daemon.resolve_replica(cluster, interface, node, address, tmp_path, tmp_path, ())


def _daemon(db, cluster, tmp_path) -> daemon.Daemon:
    replica = daemon.resolve_replica(cluster, "lo", None, LOOPBACK, tmp_path, tmp_path / "st",
                                     ("dhcp",))
    runner = daemon.Daemon(db, replica, ("dhcp",))
    runner.services = [DhcpService(replica, cluster)]
    runner.generation = cluster.generation
    return runner


def test_newer_generation_reloads_every_service(db, cluster, tmp_path):
    runner = _daemon(db, cluster, tmp_path)
    newer = db.update("settings", "lease", lambda c: changes.set_settings(
        c, dataclasses.replace(c.settings, lease_time=120)))
    asyncio.run(runner.poll())
    assert runner.generation == newer.generation and runner.reloads == 1
    assert runner.services[0].responder.generation == newer.generation
    # Relayed: this replica's own address (loopback) is on no network it serves.
    reply = runner.services[0].responder.respond(
        scapy_request("discover", bytes.fromhex("525400000011"), giaddr="198.18.0.1"))
    assert (120).to_bytes(4, "big") in reply.data


def test_a_new_generation_is_frozen_out_of_the_collectors_passes(db, cluster, tmp_path):
    """A full GC pass over a big generation stalls the loop longer than a receive buffer lasts
    in a DHCP burst: once loaded, the generation is moved to the permanent generation."""
    runner = _daemon(db, cluster, tmp_path)
    db.update("settings", "lease", lambda c: changes.set_settings(
        c, dataclasses.replace(c.settings, lease_time=120)))
    try:
        asyncio.run(runner.poll())
        responder = runner.services[0].responder
        assert gc.get_freeze_count() > 0
        assert not any(tracked is responder for tracked in gc.get_objects())
    finally:
        gc.unfreeze()


def test_older_generation_is_refused_and_the_newer_kept(db, db_path, cluster, tmp_path):
    old_copy = tmp_path / "old.db"
    old_copy.write_bytes(db_path.read_bytes())
    db.update("settings", "lease", lambda c: changes.set_settings(
        c, dataclasses.replace(c.settings, lease_time=120)))
    runner = _daemon(db, db.load(), tmp_path)
    served = runner.generation
    old_copy.replace(db_path)
    asyncio.run(runner.poll())
    asyncio.run(runner.poll())
    assert runner.generation == served and runner.stale_generations == 2
    assert runner.services[0].responder.generation == served


def test_unreadable_database_keeps_the_served_generation(db, db_path, cluster, tmp_path):
    runner = _daemon(db, cluster, tmp_path)
    db.update("settings", "lease", lambda c: changes.set_settings(
        c, dataclasses.replace(c.settings, lease_time=120)))
    good = db_path.read_bytes()
    db_path.write_bytes(b"not a database at all")
    asyncio.run(runner.poll())
    # The poll looked, failed to read, said so, and kept serving what it had.
    assert runner.generation == cluster.generation and runner.reloads == 0
    assert runner.write_status(State.RUNNING).database_unreadable == 1
    assert runner.services[0].responder.generation == cluster.generation
    db_path.write_bytes(good)       # readable again: the newer generation is taken
    asyncio.run(runner.poll())
    assert runner.generation == cluster.generation + 1 and runner.reloads == 1


def test_status_file_holds_counters_and_status_reads_it(db, cluster, tmp_path, capsys):
    runner = _daemon(db, cluster, tmp_path)
    runner.services[0].handle(b"garbage", ("198.18.0.9", 68))
    runner.write_status(State.RUNNING)
    status = read_status(tmp_path / "st")
    assert status.generation == cluster.generation and status.address == "127.0.0.1"
    assert status.counters("dhcp") == {"dropped_short": 1}
    assert main(["bootsvc", "status", "--state-dir", str(tmp_path / "st")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("running: (not a node) on lo (127.0.0.1)")
    assert "dhcp     dropped_short  1" in out


def test_status_of_a_killed_daemon_says_dead(tmp_path, capsys):
    (tmp_path / STATUS_FILE).write_text(json.dumps({
        "state": "running", "pid": 2**22 + 12345, "node": None, "interface": "eth0",
        "address": "198.18.0.201", "generation": 3, "updated": "x", "reloads": 0,
        "stale_generations_refused": 0, "services": {}}))
    assert main(["bootsvc", "status", "--state-dir", str(tmp_path), "--json"]) == 1  # as text
    assert json.loads(capsys.readouterr().out)["state"] == "dead"
    assert main(["bootsvc", "status", "--state-dir", str(tmp_path)]) == 1


def test_status_with_an_etcd_store_has_no_file_to_compare(tmp_path, capsys):
    """The note "this replica serves FILE, not FILE" compares database files; an etcd store
    (whose replicas serve a local copy) has none, and status shows the replica all the same."""
    (tmp_path / STATUS_FILE).write_text(json.dumps({
        "state": "stopped", "pid": 1, "node": None, "interface": "eth0",
        "address": "198.18.0.201", "generation": 3, "updated": "x", "reloads": 0,
        "stale_generations_refused": 0, "services": {},
        "database": str(tmp_path / "copy.sqlite")}))
    assert main(["--store", "etcd://198.18.0.250:2379", "bootsvc", "status",
                 "--state-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("stopped: (not a node) on eth0 (198.18.0.201)")
    assert "note:" not in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--interface", "nosuch0"], "no network interface 'nosuch0'"),
    (["--interface", "lo", "--services", "dhcp,bogus"], "--services: unknown service 'bogus'"),
    (["--interface", "lo", "--address", "198.18.0.201"], "not an address of lo"),
    (["--interface", "lo", "--node", "nosuch"], "no node named 'nosuch'"),
    (["--interface", "lo", "--poll", "0"], "--poll: must be more than 0 seconds"),
    (["--interface", "lo", "--set", "tftp.workers=2"],
     "--set: 'tftp.workers=2': tftp is not run here (--services dhcp)"),
    (["--interface", "lo", "--set", "bogus.port=1"], "--set: unknown service 'bogus'"),
    (["--interface", "lo", "--services", "tftp", "--set", "tftp.threads=2"],
     "--set: 'tftp.threads=2': tftp has no option 'threads' (it has: max_blksize, port, "
     "spin_us, workers)"),
    (["--interface", "lo", "--services", "tftp", "--set", "tftp.workers=two"],
     "--set: 'tftp.workers=two': tftp.workers must be an integer, not 'two'"),
    (["--interface", "lo", "--services", "tftp", "--set", "tftp.workers=-1"],
     "--set: tftp: workers must be 0 (one per CPU, at most 4) or more"),
    (["--interface", "lo", "--services", "tftp", "--set", "tftp.spin_us=20000"],
     "--set: tftp: spin_us must be from 0 to 10000"),
    (["--interface", "lo", "--services", "tftp", "--set", "tftp.workers"],
     "--set: 'tftp.workers': write SERVICE.FIELD=VALUE"),
    (["--interface", "lo", "--port", "dhcp=70000"], "--port: dhcp: port must be from 0 to 65535"),
    (["--interface", "lo", "--port", "dhcp"], "--port: 'dhcp': write SERVICE=PORT"),
    (["--interface", "lo", "--port", "dhcp=6767", "--set", "dhcp.port=6868"],
     "--set: dhcp.port is set twice"),
])
def test_bad_run_arguments_exit_2_with_one_message(cluster, db_path, capsys, argv, message):
    assert main(["--db", str(db_path), "bootsvc", "run", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["--interface", "lo", "--services", "dhcp,dhcp"],
    ["--interface", "lo", "--address", "not-an-ip"],
    ["--interface", "lo", "--services", ","],
])
def test_malformed_run_arguments_are_usage_errors(db_path, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(["--db", str(db_path), "bootsvc", "run", *argv])
    assert exit_info.value.code == 2


def test_status_without_a_daemon_is_a_clear_error(tmp_path: Path, capsys):
    assert main(["bootsvc", "status", "--state-dir", str(tmp_path)]) == 2
    assert "is `vlx bootsvc run` running with this --state-dir?" in capsys.readouterr().err


def test_options_are_typed_dataclasses_built_from_the_flags():
    parsed = options.parse(("dhcp", "tftp", "http"),
                           ["tftp.workers=2", "tftp.max_blksize=1468"], ["http=8080"])
    assert parsed["tftp"] == TftpService.Options(port=69, max_blksize=1468, workers=2)
    assert parsed["http"] == HttpService.Options(port=8080)
    assert parsed["dhcp"] == DhcpService.Options()
    with pytest.raises(dataclasses.FrozenInstanceError):
        parsed["tftp"].workers = 3


def test_a_service_takes_its_options_or_its_defaults(cluster, tmp_path):
    replica = daemon.resolve_replica(cluster, "lo", None, LOOPBACK, tmp_path, tmp_path, ())
    assert TftpService(replica, cluster).options == TftpService.Options()
    chosen = TftpService.Options(workers=3)
    assert TftpService(replica, cluster, chosen).options is chosen


@pytest.mark.parametrize(("declared", "text", "value"), [
    (int, "69", 69), (float, "0.5", 0.5), (bool, "yes", True), (bool, "off", False),
    (str, "eth0", "eth0"), (Path, "/srv/tree", Path("/srv/tree")),
    (ipaddress.IPv4Address, "198.18.0.1", ipaddress.IPv4Address("198.18.0.1")),
    (int | None, "none", None), (int | None, "5", 5),
    (tuple[ipaddress.IPv4Address, ...], "198.18.0.1, 198.18.0.2",
     (ipaddress.IPv4Address("198.18.0.1"), ipaddress.IPv4Address("198.18.0.2"))),
])
def test_option_text_is_read_by_the_field_type(declared, text, value):
    convert, _ = options.converter(declared)
    assert convert(text) == value


@pytest.mark.parametrize(("declared", "text"), [
    (int, "x"), (bool, "maybe"), (ipaddress.IPv4Address, "198.18.0.300"), (int | None, "x"),
    (tuple[int, ...], "1,x")])
def test_option_text_of_the_wrong_type_is_a_value_error(declared, text):
    convert, _ = options.converter(declared)
    with pytest.raises(ValueError):
        convert(text)


def test_a_field_type_with_no_command_line_form_is_named():
    with pytest.raises(TypeError, match="no command-line form"):
        options.converter(dict[str, int])


def test_status_text_shows_every_services_details(tmp_path, capsys):
    (tmp_path / STATUS_FILE).write_text(json.dumps({
        "state": "stopped", "pid": 1, "node": None, "interface": "eth0",
        "address": "198.18.0.201", "generation": 3, "updated": "x", "reloads": 0,
        "stale_generations_refused": 0, "services": {
            "dns": {"port": 53, "counters": {"cache_hit": 3, "cache_miss": 1},
                    "details": {"cache_entries": 12, "cache_bytes": 3400, "hit_ratio": 0.75,
                                "upstream_failures": 2, "upstreams": ["198.18.1.53"],
                                "zones": []}},
            "dhcp": {"port": 67, "details": {"discovered": {"52:54:00:00:00:99": "x"}}},
            "heartbeat": {"details": {"state": "master", "master": None}}}}))
    assert main(["bootsvc", "status", "--state-dir", str(tmp_path)]) == 1
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    for expected in ("dns cache entries 12", "dns cache bytes 3400", "dns hit ratio 75.0%",
                     "dns upstream failures 2", "dns upstreams 198.18.1.53", "dns zones none",
                     "dhcp discovered 1 entry (--json lists them)", "heartbeat state master",
                     "heartbeat master -"):
        assert expected in lines


def test_systemd_is_told_when_the_replica_is_ready(tmp_path, monkeypatch):
    """Type=notify: the etcd member's unit is ordered after the replica's, and starts once the
    replica says READY=1 on $NOTIFY_SOCKET (a path, or an abstract name written with @)."""
    import socket
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert daemon.notify_systemd("READY=1") is False          # not under systemd
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind(str(tmp_path / "notify"))
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
        assert daemon.notify_systemd("READY=1") is True
        assert listener.recv(64) == b"READY=1"
    name = f"vlx-test-notify-{tmp_path.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as listener:
        listener.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert daemon.notify_systemd("STOPPING=1") is True
        assert listener.recv(64) == b"STOPPING=1"
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert daemon.notify_systemd("READY=1") is False          # said, not raised
