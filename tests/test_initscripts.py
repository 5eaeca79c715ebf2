"""A node's start-up steps, run against a directory standing for the node's root: what each
step writes, that running it twice changes nothing, and that one failing step skips only the
steps that need it."""

from __future__ import annotations

import dataclasses
import io
import ipaddress
import shutil
import threading
from pathlib import Path

import pytest
from virtualinux.initscripts import startup
from virtualinux.initscripts.__main__ import main as startup_main
from virtualinux.initscripts.files import plain
from virtualinux.initscripts.steps import bootsvc, chrony, database, identity, libvirtd, uplink
from virtualinux.netboot import layout, render, scripts
from virtualinux.vvcm import VlxError

from .conftest import EXAMPLE, vlx

INITIATOR = "iqn.2026-11.org.virtualinux:vlxlab.node2"


@pytest.fixture
def cluster(db, capsys):
    assert vlx(capsys, "db", "import", str(EXAMPLE))[0] == 0
    return db.load()


def node_root(tmp_path: Path, name: str = "root", cluster=None, node: str = "node2") -> Path:
    """A node's root as the golden image has it: one kernel and its initrd in /boot, Debian's
    iPXE binaries, and the root's iSCSI session in sysfs; with `cluster`, also the files the
    node's cpio hands it in /run (its SSH host key), as the initramfs leaves them."""
    root = tmp_path / name
    if cluster is not None:
        delivered = root / "run/virtualinux/node"
        delivered.mkdir(parents=True)
        for file_name, data in scripts.node_files(cluster, cluster.node(node)).items():
            (delivered / file_name).parent.mkdir(parents=True, exist_ok=True)
            (delivered / file_name).write_bytes(data)
    (root / "boot").mkdir(parents=True)
    (root / "boot" / "vmlinuz-6.1.0-test").write_bytes(b"kernel" * 100)
    (root / "boot" / "initrd.img-6.1.0-test").write_bytes(b"initrd" * 100)
    shutil.copytree(render.IPXE_DIR, root / "usr/lib/ipxe", symlinks=False)
    session = root / "sys/class/iscsi_session/session1"
    session.mkdir(parents=True)
    (session / "initiatorname").write_text(INITIATOR + "\n")
    return root


def boot_of(cluster, root: Path, node: str = "node2") -> startup.Boot:
    return startup.Boot(node=cluster.node(node), cluster=cluster, root=root,
                        cmdline=(f"vlx.node={node}", "vlx.root=iscsi:198.18.0.11:3260:iqn.x"))


def test_steps_are_found_by_where_they_live_and_run_in_order():
    names = [(step.order, step.name) for step in startup.discover()]
    assert names == [(10, "identity"), (12, "bootsvc"), (15, "sshkeys"), (16, "adminkeys"),
                     (20, "time"), (30, "database"), (40, "vcnet"), (45, "uplink"),
                     (60, "libvirtd")]


def test_a_failing_step_skips_only_the_steps_that_need_it(cluster, tmp_path):
    ran = []

    def fail(boot):
        raise startup.StepFailed("no iSCSI session")

    def work(name):
        def run(boot):
            ran.append(name)
            return f"{name} done"
        return run

    steps = [startup.Step("first", 10, "a", fail),
             startup.Step("second", 20, "b", work("second"), needs=("first",)),
             startup.Step("third", 30, "c", work("third")),
             startup.Step("fourth", 40, "d", work("fourth"), needs=("third",))]
    out = io.StringIO()
    outcomes = startup.run_steps(boot_of(cluster, tmp_path), steps, out)
    assert [o.state for o in outcomes] == ["failed", "skipped", "ok", "ok"]
    assert ran == ["third", "fourth"]
    assert out.getvalue().splitlines() == [
        "virtualinux: [10 first] FAILED: no iSCSI session",
        "virtualinux: [20 second] skipped: needs first, which did not succeed",
        "virtualinux: [30 third] ok: third done",
        "virtualinux: [40 fourth] ok: fourth done"]


def test_a_waiting_step_holds_up_only_the_steps_that_need_it(cluster, tmp_path):
    """The database step's kind (`waits`): it runs in a thread, a later step that does not
    need it runs meanwhile (here it is what lets the waiting step end), a step that needs it
    runs after it, and the outcomes come back in the steps' order."""
    released = threading.Event()

    def wait_for_third(boot):
        if not released.wait(60):      # a safety net: without the thread, never set
            raise startup.StepFailed("the step after it did not run meanwhile")
        return "joined"

    def release(boot):
        released.set()
        return "released"

    steps = [startup.Step("first", 10, "a", lambda boot: "first done"),
             startup.Step("slow", 20, "b", wait_for_third, needs=("first",), waits=True),
             startup.Step("third", 30, "c", release, needs=("first",)),
             startup.Step("fourth", 40, "d", lambda boot: "after slow", needs=("slow",))]
    out = io.StringIO()
    outcomes = startup.run_steps(boot_of(cluster, tmp_path), steps, out)
    assert [(o.step.name, o.state) for o in outcomes] == [
        ("first", "ok"), ("slow", "ok"), ("third", "ok"), ("fourth", "ok")]
    assert out.getvalue().splitlines() == [
        "virtualinux: [10 first] ok: first done",
        "virtualinux: [30 third] ok: released",
        "virtualinux: [20 slow] ok: joined",
        "virtualinux: [40 fourth] ok: after slow"]


def test_identity_writes_name_hosts_and_the_session_initiator(cluster, tmp_path):
    root = node_root(tmp_path)
    said = identity.run(boot_of(cluster, root))
    assert said == f"node2 198.18.0.12, /etc/hosts 5 names, initiator {INITIATOR}"
    assert (root / "etc/hostname").read_text() == "node2\n"
    hosts = (root / "etc/hosts").read_text().splitlines()
    assert "198.18.0.12\tnode2.cluster.lab\tnode2" in hosts
    assert "198.18.0.254\tgateway.cluster.lab\tgateway" in hosts
    assert (root / "etc/iscsi/initiatorname.iscsi").read_text() == f"InitiatorName={INITIATOR}\n"


def test_identity_without_the_root_session_fails_and_names_it(cluster, tmp_path):
    root = node_root(tmp_path)
    shutil.rmtree(root / "sys")
    with pytest.raises(startup.StepFailed, match="no iSCSI session shows"):
        identity.run(boot_of(cluster, root))


def test_running_every_step_twice_changes_nothing_the_second_time(cluster, tmp_path):
    root = node_root(tmp_path, cluster=cluster)
    boot = boot_of(cluster, root)
    steps = startup.discover()
    first = startup.run_steps(boot, steps, io.StringIO())
    assert [o.state for o in first] == ["ok"] * len(steps) == ["ok"] * 9, \
        [o.message for o in first]
    written = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    second = startup.run_steps(boot, steps, io.StringIO())
    assert all(o.state == "ok" for o in second)
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == written
    by_name = {o.step.name: o.message for o in second}
    assert all("(unchanged)" in by_name[name] for name in ("sshkeys", "time", "bootsvc"))


def test_a_reboot_after_a_change_restarts_no_service_whose_files_it_left_alone(
        db, tmp_path, capsys, monkeypatch):
    """A first boot knows only the kernel's `vlx.store=`; a reboot's start-up also reads the
    VLX_DB that /etc/default/virtualinux names, and the database has a newer generation. Neither
    may rewrite the file of a service the change does not concern: each rewrite restarts it."""
    inventory = tmp_path / "cluster.toml"
    inventory.write_text(EXAMPLE.read_text().replace(
        'roles = ["gateway-primary", "storage"]', 'roles = ["gateway-primary", "storage", "db"]'))
    assert vlx(capsys, "db", "import", str(inventory))[0] == 0
    cluster = db.load()
    inventory.write_text(inventory.read_text().replace("lease_time = 3600", "lease_time = 7200"))
    assert vlx(capsys, "db", "import", "--replace", str(inventory))[0] == 0
    newer = db.load()
    assert newer.generation > cluster.generation
    monkeypatch.delenv("VLX_DB")
    monkeypatch.setenv("VLX_STORE", cluster.store_url())
    root = node_root(tmp_path, cluster=cluster, node="node3")
    steps = startup.discover()
    first = startup.run_steps(boot_of(cluster, root, "node3"), steps, io.StringIO())
    assert all(o.state == "ok" for o in first), [o.message for o in first]
    service_files = [root / "etc/default/virtualinux", root / "etc/default/virtualinux-bootsvc",
                     root / chrony.CONFIG.lstrip("/"), root / libvirtd.CONFIG.lstrip("/")]
    written = {path: path.read_text() for path in service_files}
    assert "VLX_DB=/var/lib/virtualinux/cluster.db" in written[service_files[1]]
    for line in written[service_files[0]].splitlines()[1:]:      # what the unit now reads
        monkeypatch.setenv(*line.split("=", 1))
    second = startup.run_steps(boot_of(newer, root, "node3"), steps, io.StringIO())
    assert all(o.state == "ok" for o in second), [o.message for o in second]
    assert {path: path.read_text() for path in service_files} == written
    by_name = {o.step.name: o.message for o in second}
    assert "(unchanged)" in by_name["time"] and "(unchanged)" in by_name["libvirtd"]


def test_chrony_serves_the_cluster_peers_a_few_nodes_and_has_an_orphan_stratum(cluster):
    conf = chrony.chrony_conf(cluster, cluster.node("node2"))
    lines = conf.splitlines()
    assert lines[1:3] == ["server 198.18.1.123 iburst", lines[2]]
    peers = [line for line in lines if line.startswith("peer ")]
    assert len(peers) == 3 and "peer 198.18.0.12" not in peers   # every other node, not itself
    assert "allow 198.18.0.0/24" in lines and "local stratum 10 orphan" in lines
    # The peer choice is symmetric, so two nodes that pick each other agree.
    one, two = cluster.node("node1"), cluster.node("node3")
    assert chrony._affinity(one.name, two.name) == chrony._affinity(two.name, one.name)


def test_two_nodes_render_byte_identical_netboot_trees(cluster, tmp_path):
    trees = []
    for name, node in (("a", "node1"), ("b", "node3")):
        root = node_root(tmp_path, name)
        bootsvc.run(boot_of(cluster, root, node))
        current = (root / "var/lib/virtualinux/netboot/current").resolve()
        trees.append({p.relative_to(current): p.read_bytes()
                      for p in current.rglob("*") if p.is_file()})
        env = (root / "etc/default/virtualinux-bootsvc").read_text()
        assert f"VLX_NODE={node}" in env and "VLX_INTERFACE=eth0" in env
        assert "VLX_SERVICES=dhcp,tftp,http" in env
    assert trees[0] == trees[1]
    assert trees[0][Path(layout.KERNEL)] == b"kernel" * 100


def test_every_node_advertises_no_ipv6_router_unless_the_cluster_says_not_to(cluster,
                                                                              tmp_path):
    root = node_root(tmp_path)
    assert bootsvc.services_for(boot_of(cluster, root, "node3"))[-1] == "ra"
    quiet = dataclasses.replace(cluster, settings=dataclasses.replace(
        cluster.settings, router_advertisements=False))
    assert "ra" not in bootsvc.services_for(boot_of(quiet, root, "node3"))


def test_a_node_without_its_kernel_cannot_serve(cluster, tmp_path):
    root = node_root(tmp_path)
    (root / "boot" / "initrd.img-6.1.0-test").unlink()
    with pytest.raises(startup.StepFailed, match="initrd.img-6.1.0-test is missing"):
        bootsvc.run(boot_of(cluster, root))


def test_libvirtd_host_uuid_is_stable_per_node_and_distinct(cluster, tmp_path):
    uuids = {libvirtd.host_uuid(boot_of(cluster, tmp_path, node.name)) for node in cluster.nodes}
    assert len(uuids) == len(cluster.nodes)
    assert libvirtd.host_uuid(boot_of(cluster, tmp_path)) == \
        libvirtd.host_uuid(boot_of(cluster, tmp_path))


@pytest.mark.parametrize("hostile", ["a b", "x;reboot", "$(id)", "a\nb", "'q'"])
def test_values_that_reach_configuration_files_are_checked(hostile):
    with pytest.raises(VlxError, match="cannot go into a configuration file"):
        plain(hostile, "value")


def test_start_up_command_runs_every_step_under_a_root(cluster, tmp_path, capsys):
    root = node_root(tmp_path, cluster=cluster)
    assert startup_main(["--node", "node2", "--root", str(root)]) == 0
    lines = capsys.readouterr().out.splitlines()
    # One line a step; the database step runs beside the ones after it (it `waits`), so its
    # line may come later than its place.
    assert sorted(line.split("]")[0] for line in lines) == [
        "virtualinux: [10 identity", "virtualinux: [12 bootsvc", "virtualinux: [15 sshkeys",
        "virtualinux: [16 adminkeys", "virtualinux: [20 time", "virtualinux: [30 database",
        "virtualinux: [40 vcnet", "virtualinux: [45 uplink", "virtualinux: [60 libvirtd"]
    assert all(" ok: " in line for line in lines), lines
    assert startup_main(["--node", "node2", "--root", str(root), "--only", "nosuch"]) == 2
    assert "no start-up step 'nosuch'" in capsys.readouterr().err


def test_nodes_render_with_the_kernel_arguments_of_the_database(db, tmp_path, capsys):
    inventory = tmp_path / "cluster.toml"
    inventory.write_text(EXAMPLE.read_text().replace(
        "lease_time = 3600", 'lease_time = 3600\nkernel_args = ["console=ttyS0", "panic=10"]'))
    assert vlx(capsys, "db", "import", str(inventory))[0] == 0
    cluster = db.load()
    assert cluster.settings.kernel_args == ("console=ttyS0", "panic=10")
    root = node_root(tmp_path)
    bootsvc.run(boot_of(cluster, root, "node1"))
    script = root / "var/lib/virtualinux/netboot/current" / layout.node_script_name(
        cluster.node("node3").mac)
    assert " vlx.node=node3 console=ttyS0 panic=10 " in script.read_text()
    inventory.write_text(EXAMPLE.read_text().replace(
        "lease_time = 3600", 'lease_time = 3600\nkernel_args = ["console=${x}"]'))
    code, _, err = vlx(capsys, "db", "import", "--replace", str(inventory))
    assert code == 2 and "kernel_args" in err and "cannot go on a kernel command line" in err


def with_db_nodes(db, tmp_path, capsys):
    """The example cluster with node1 and node2 of role db."""
    inventory = tmp_path / "cluster.toml"
    inventory.write_text(EXAMPLE.read_text().replace(
        'roles = ["gateway-primary", "storage"]', 'roles = ["gateway-primary", "storage", "db"]')
        .replace('roles = ["gateway-backup", "storage"]',
                 'roles = ["gateway-backup", "storage", "db"]'))
    assert vlx(capsys, "db", "import", str(inventory))[0] == 0
    return db.load()


def test_db_nodes_run_members_and_every_node_boots_with_the_store(db, tmp_path, capsys,
                                                                  monkeypatch):
    cluster = with_db_nodes(db, tmp_path, capsys)
    store = "etcd://198.18.0.11:2379,198.18.0.12:2379"
    assert cluster.store_url() == store
    assert scripts.kernel_cmdline(cluster, cluster.node("node3"), ()).endswith(
        f" vlx.node=node3 vlx.store={store}")
    monkeypatch.delenv("VLX_DB")
    member, client = node_root(tmp_path, "n2"), node_root(tmp_path, "n3")
    asked = []
    monkeypatch.setattr(database, "join", lambda boot, url: asked.append(url))  # none answers
    said = database.run(boot_of(cluster, member, "node2"))
    assert asked == [store]
    assert said == (f"etcd member node2 on 198.18.0.12 forms a new cluster (2 in its initial "
                    f"cluster), clients use {store}")
    env = (member / "etc/default/virtualinux-etcd").read_text().splitlines()
    assert env[1:-1] == ["VLX_ETCD_NAME=node2", "VLX_ETCD_LISTEN=198.18.0.12",
                         "VLX_ETCD_INITIAL_CLUSTER=node1=http://198.18.0.11:2380,"
                         "node2=http://198.18.0.12:2380",
                         "VLX_ETCD_DATA_DIR=/var/lib/virtualinux/etcd/node2",
                         "VLX_ETCD_OPTIONS=--heartbeat-ms 100 --election-ms 1000"]
    # The unit runs etcd with VLX_ETCD_ARGS: the command line `vlx db serve` execs for the
    # same member.
    assert env[-1] == "VLX_ETCD_ARGS=" + served_etcd(capsys, env)
    # A reboot: the member's data is on the node's root, so it restarts as itself and asks
    # the store nothing; etcd ignores the initial cluster then, and the file stays as it was
    # (a rewritten one would restart the member for nothing).
    (member / "var/lib/virtualinux/etcd/node2/member").mkdir(parents=True)
    etcd_env = member / "etc/default/virtualinux-etcd"
    written = etcd_env.read_text()
    said = database.run(boot_of(cluster, member, "node2"))
    assert asked == [store]
    assert said.startswith("etcd member node2 on 198.18.0.12 restarts as itself")
    assert etcd_env.read_text() == written
    # Without the file of its last start (or with another member's), only itself.
    etcd_env.write_text(written.replace("VLX_ETCD_NAME=node2", "VLX_ETCD_NAME=node1"))
    database.run(boot_of(cluster, member, "node2"))
    assert "VLX_ETCD_INITIAL_CLUSTER=node2=http://198.18.0.12:2380\n" in etcd_env.read_text()
    assert database.run(boot_of(cluster, client, "node3")) == \
        f"client of {store}, serving a local copy"
    assert not (client / "etc/default/virtualinux-etcd").exists()
    assert (client / "etc/default/virtualinux").read_text().splitlines()[1:] == [
        f"VLX_STORE={store}", "VLX_DB=/var/lib/virtualinux/cluster.db"]


@pytest.mark.parametrize("replica", ["ready", "not ready in time"])
def test_a_db_node_adds_and_starts_its_member_once_its_replica_serves(db, tmp_path, capsys,
                                                                      monkeypatch, replica):
    """Added before its member starts, a member counts against the quorum: the step waits for
    the replica's start (its READY=1) first, so the members never wait for one that is held
    behind the replica; a replica that is not ready in time does not hold the member back."""
    import subprocess

    from virtualinux.initscripts import services
    cluster = with_db_nodes(db, tmp_path, capsys)
    monkeypatch.setenv("VLX_STORE", "etcd://198.18.0.11:2379")
    calls: list[tuple] = []

    def systemctl(argv, **options):
        calls.append((*argv, options.get("timeout")))
        if argv[:2] == ["systemctl", "start"] and replica != "ready":
            raise subprocess.TimeoutExpired(argv, options["timeout"])
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(services.subprocess, "run", systemctl)
    monkeypatch.setattr(database, "join", lambda boot, url: calls.append(("join", url))
                        or "node1=http://198.18.0.11:2380,node2=http://198.18.0.12:2380")
    boot = dataclasses.replace(boot_of(cluster, node_root(tmp_path), "node2"), live=True)
    assert "joins the running members" in database.run(boot)
    assert calls == [
        ("systemctl", "start", "virtualinux-bootsvc.service", database.REPLICA_WAIT),
        ("join", "etcd://198.18.0.11:2379"),
        ("systemctl", "restart", "--no-block", "virtualinux-etcd.service", None)]


def served_etcd(capsys, env: list[str]) -> str:
    """etcd's arguments as `vlx db serve --print` makes them from an etcd environment file
    (what virtualinux-etcd.service ran before it ran etcd itself)."""
    values = dict(line.split("=", 1) for line in env[1:])
    code, out, err = vlx(capsys, "db", "serve", "--name", values["VLX_ETCD_NAME"],
                         "--listen", values["VLX_ETCD_LISTEN"],
                         "--initial-cluster", values["VLX_ETCD_INITIAL_CLUSTER"],
                         "--data-dir", values["VLX_ETCD_DATA_DIR"],
                         *values["VLX_ETCD_OPTIONS"].split(), "--print")
    assert code == 0, err
    return out.split(" ", 1)[1].strip()


def test_a_db_node_of_a_cluster_with_a_ca_runs_its_member_over_tls(db, tmp_path, capsys,
                                                                    monkeypatch):
    inventory = tmp_path / "cluster.toml"
    inventory.write_text(EXAMPLE.read_text().replace(
        'roles = ["gateway-backup", "storage"]', 'roles = ["gateway-backup", "storage", "db"]'))
    assert vlx(capsys, "db", "import", str(inventory))[0] == 0
    assert vlx(capsys, "db", "tls", "init")[0] == 0
    cluster = db.load()
    member = node_root(tmp_path, "n2", cluster=cluster, node="node2")
    assert (member / "run/virtualinux/node/store/node2.crt").is_file()   # from its cpio
    monkeypatch.setattr(database, "join", lambda boot, url: None)   # no member answers yet
    database.run(boot_of(cluster, member, "node2"))
    env = dict(line.split("=", 1) for line in
               (member / "etc/default/virtualinux-etcd").read_text().splitlines()[1:])
    assert env["VLX_ETCD_INITIAL_CLUSTER"] == "node2=https://198.18.0.12:2380"
    assert env["VLX_ETCD_OPTIONS"].endswith(" --tls /run/virtualinux/node/store")
    # etcd runs with the certificates where the node has them (found under the test's root).
    assert " --cert-file /run/virtualinux/node/store/node2.crt " in env["VLX_ETCD_ARGS"]
    assert " --listen-peer-urls https://198.18.0.12:2380 " in env["VLX_ETCD_ARGS"]
    assert env["VLX_ETCD_ARGS"].endswith(" --peer-client-cert-auth")
    # A node whose cpio brought no member certificate (no CA): plain peers, no --tls.
    plain_root = node_root(tmp_path, "n2-plain")
    database.run(boot_of(cluster, plain_root, "node2"))
    text = (plain_root / "etc/default/virtualinux-etcd").read_text()
    assert "node2=http://198.18.0.12:2380" in text and "--tls" not in text


def test_a_cluster_without_db_nodes_keeps_its_database_file(cluster, tmp_path):
    assert cluster.store_url() is None
    assert " vlx.store=" not in scripts.kernel_cmdline(cluster, cluster.node("node3"), ())
    root = node_root(tmp_path)
    assert database.run(boot_of(cluster, root)) == "database file"


def test_a_first_boot_waits_for_the_store_until_it_answers(cluster, monkeypatch, capsys):
    """No local copy yet and the store without quorum (a member added before this node is
    still starting): start-up says so once and tries again until the store answers."""
    from virtualinux.initscripts import __main__ as start_up

    tries = []

    class Copy:      # stands for ReplicaCopy: unreachable twice, then the copy is there
        def __init__(self, store, path):
            self.rebuilt_reason = "none yet"

        def prepare(self) -> int:
            tries.append(1)
            if len(tries) < 3:
                raise VlxError("no usable local copy (none yet) and the store is unreachable")
            return cluster.generation

    monkeypatch.setattr(start_up, "ReplicaCopy", Copy)
    monkeypatch.setenv("VLX_STORE", "")
    slept = []
    loaded = start_up.load_cluster(("vlx.store=etcd://198.18.0.11:2379",),
                                   clock=lambda: 0.0, sleep=slept.append)
    assert loaded.node("node2").name == "node2"
    assert len(tries) == 3 and slept == [start_up.FIRST_COPY_RETRY] * 2
    assert capsys.readouterr().out.count("virtualinux: waiting for the store:") == 1
    # Past the limit it gives up with the store's error.
    tries.clear()
    with pytest.raises(VlxError, match="unreachable"):
        start_up.load_cluster(("vlx.store=etcd://198.18.0.11:2379",),
                              clock=iter([0.0, 1e9]).__next__, sleep=slept.append)


def test_a_gateway_node_holds_its_uplink_address_and_other_nodes_none(cluster, tmp_path):
    settings = dataclasses.replace(cluster.required_settings(), gateway_uplink="eth1")
    node1 = dataclasses.replace(cluster.node("node1"),
                                uplink_address=ipaddress.IPv4Interface("198.18.1.254/24"))
    with_uplink = dataclasses.replace(cluster, settings=settings, nodes=(
        node1, *(n for n in cluster.nodes if n.name != "node1")))
    said = uplink.run(startup.Boot(node=node1, cluster=with_uplink, root=tmp_path))
    assert said == "would hold 198.18.1.254/24 on eth1 (not live: nothing made)"
    assert uplink.run(boot_of(with_uplink, tmp_path, "node3")) == \
        "not a gateway node (no uplink)"
    assert "names no gateway_uplink" in uplink.run(boot_of(cluster, tmp_path, "node1"))
    # node2 is of the pair, but the database gives it no address on the uplink.
    with pytest.raises(startup.StepFailed, match="node2 is a gateway node but has no "
                                                 "uplink_address for eth1"):
        uplink.run(boot_of(with_uplink, tmp_path, "node2"))


def test_adminkeys_writes_the_settings_keys_for_root_and_leaves_out_a_forged_line(cluster,
                                                                                 tmp_path):
    from virtualinux.initscripts.steps import adminkeys
    key = ("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDNUdKcNModuFZsiL6zsZ2QRr2wEjM69UjzL/LSqxjxw "
           "ops@desk")
    # Rows written past the model's checks (a forged database): an options field that would
    # give a forced command, a second line smuggled into one value, and a blob that is not one.
    forged = (f'command="/bin/sh" {key}', f"{key}\nssh-ed25519 AAAAforged", "ssh-ed25519 !!")
    cluster = dataclasses.replace(cluster, settings=dataclasses.replace(
        cluster.settings, admin_ssh_keys=(key, *forged)))
    root = tmp_path / "root"
    boot = boot_of(cluster, root)
    said = adminkeys.run(boot)
    assert said == "1 admin key for root, 3 malformed lines left out"
    written = root / "root/.ssh/authorized_keys"
    lines = [line for line in written.read_text().splitlines() if not line.startswith("#")]
    assert lines == [key]
    assert written.stat().st_mode & 0o777 == 0o600
    assert written.parent.stat().st_mode & 0o777 == 0o700
    assert adminkeys.run(boot).endswith("(unchanged)")
    # A key removed from the setting is gone from the node at its next start-up.
    cluster = dataclasses.replace(cluster, settings=dataclasses.replace(
        cluster.settings, admin_ssh_keys=()))
    assert adminkeys.run(boot_of(cluster, root)) == "0 admin keys for root"
    assert not [line for line in written.read_text().splitlines() if not line.startswith("#")]
