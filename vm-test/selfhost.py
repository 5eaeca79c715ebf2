"""The lab that boots the real node image: a SAN, a bootstrap, and nodes that then boot each other.

    STATE/san/pool, pool.fs   the lab's pool: a sparse btrfs file loop-mounted on pool/
                              (storage.pool), holding the golden volume (the node image's
                              root.img) and one reflink snapshot per node
    STATE/san/                tgtd's record (storage.tgt), the SAN's tgtd log
    STATE/cluster.db          the database as the lab made it (inventory, volumes, CHAP
                              credentials), then migrated into the bootstrap's etcd
    STATE/bootstrap/          the bootstrap's etcd member (data, log)
    STATE/replicas/boot/      the bootstrap replica's log, status and local copy of the store
    STATE/admin/              the lab's admin SSH key (admin.py: `vlx lab ssh`)

Namespaces: PREFIX-net (bridge, taps), PREFIX-san (the SAN's tgtd: `nsenter --net`, so it sees
the pool mounted in the host's mount namespace), PREFIX-boot (the bootstrap: one replica and
the first etcd member, plain HTTP: the lab's traffic never leaves its namespaces),
PREFIX-world (uplink.start_for_nodes: the outside, on the gateway nodes' second NICs).

How the nodes find the store: netboot puts `vlx.store=` on every node's command line, rendered
from the database by whichever replica answers. The bootstrap's address is the setting
`store_bootstrap`, which `Cluster.store_url()` names first and the db nodes after it, so a node
booting before any db node has joined reaches the store through the bootstrap, and later ones
through the members that answer. `remove_bootstrap` clears the setting (the nodes' replicas
follow the change and hand out a URL of the db nodes only), removes the bootstrap's member
through the store, then stops its etcd and its replica.

Imports the model and the areas a lab needs to make (storage, netboot); like lab.py, nothing
imports this but the command line and the tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from virtualinux.netboot import render
from virtualinux.storage import pool as pools
from virtualinux.storage import tgt, volumes
from virtualinux.vvcm import Cluster, Database, VlxError
from virtualinux.vvcm.command import vlx_command
from virtualinux.vvcm.model import STORE_CLIENT_PORT
from virtualinux.vvcm.store import parse_url

from . import lab as labs
from . import uplink
from .admin_key import admin_public_key
from .netns import NETNS_DIR, Namespace
from .plan import BRIDGE, REPLICA_INTERFACE, LabPlan
from .progress import node_phases
from .state import LabRecord, StateError, process_start_time, same_process
from .wait import wait_for

VLX = vlx_command()
GOLDEN = "node-golden"
BOOT_SERVICES = ("dhcp", "tftp", "http", "ra")     # ra: ends iPXE's IPv6 wait (LAB.md)
BOOTSTRAP_MEMBER = "bootstrap"
ETCD_START_TIMEOUT = 120.0
ISCSI_PORT = 3260
GIB = 1 << 30


def san_dir(state_dir: Path) -> Path:
    return state_dir / "san"


def bootstrap_dir(state_dir: Path) -> Path:
    return state_dir / "bootstrap"


def control_port(state_dir: Path) -> int:
    """The SAN tgtd's control port: from the state directory, so two labs (and the other tests'
    tgtds, 5000-15000 and 20000-32000) are unlikely to share one. tgtd takes at most 32767."""
    return 15000 + zlib.crc32(str(state_dir).encode()) % 5000


def start(layout: LabPlan, cluster: Cluster, image_dir: Path, kernel_args: Sequence[str],
          say: Callable[[str], None] = print) -> labs.Lab:
    """Make the SAN and the bootstrap, then power on the nodes. On any failure (or ^C) remove
    what was made, then re-raise."""
    assert layout.image == "node" and layout.san is not None and cluster.settings is not None
    layout.state_dir.mkdir(parents=True, exist_ok=True)
    steps = start_up_steps()
    record = LabRecord(state_dir=layout.state_dir, prefix=layout.prefix,
                       firmware=layout.firmware, started=time.time(), image="node",
                       nodes={p.node.name: {"mac": p.node.mac, "ip": str(p.node.ip),
                                            "tap": p.tap, "phases": list(node_phases(steps))}
                              for p in layout.nodes},
                       replicas={r.name: {"namespace": r.namespace, "address": str(r.address),
                                          "mac": r.mac} for r in layout.replicas})
    record.save()
    running = labs.Lab(layout, record)
    try:
        settings = cluster.settings
        args = tuple(dict.fromkeys((*settings.kernel_args, *kernel_args)))
        # The lab's admin key may log in as root on every node (`vlx lab ssh`).
        admin_keys = (*settings.admin_ssh_keys, admin_public_key(layout.state_dir))
        cluster = dataclasses.replace(cluster, settings=dataclasses.replace(
            settings, kernel_args=args, store_bootstrap=(layout.bootstrap.address,),
            admin_ssh_keys=tuple(dict.fromkeys(admin_keys))))
        running.make_network()
        san = running._namespace("san")
        running.netns.plug(Namespace(layout.hub), BRIDGE, san, REPLICA_INTERFACE,
                           address=f"{layout.san}/{settings.cidr.prefixlen}")
        say(f"SAN: a btrfs pool, the golden volume and {len(cluster.nodes)} snapshots, "
            f"tgtd on {layout.san}:{ISCSI_PORT} ...")
        make_san(running, cluster, image_dir)
        say(f"bootstrap: etcd member and replica on {layout.bootstrap.address} ...")
        start_bootstrap(running, image_dir)
        uplink.start_for_nodes(running, cluster)
        running.start_nodes()
        record.phase = "up"
        record.save()
    except BaseException:
        labs.down(layout.state_dir)
        raise
    return running


def start_up_steps() -> list[str]:
    """The node's start-up steps, as the node image built from this checkout runs them."""
    from virtualinux.initscripts.startup import discover
    return [step.name for step in discover()]


def make_san(running: labs.Lab, cluster: Cluster, image_dir: Path) -> None:
    """The pool, the lab's database with the golden and one exported snapshot per node, and
    the SAN's tgtd serving them with each node's CHAP credential."""
    record, layout = running.record, running.plan
    directory = san_dir(layout.state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    # tgt's records (which tgtd serves which portal) stay in the lab, not in the host's /run.
    os.environ["VLX_STORAGE_STATE"] = str(directory)
    portal = f"{layout.san}:{ISCSI_PORT}"
    pool_dir, backing = directory / "pool", directory / "pool.fs"
    record.san = {"portal": portal, "control_port": control_port(layout.state_dir),
                  "pool": str(pool_dir), "backing": str(backing),
                  "netns": f"{layout.prefix}-san"}
    record.save()
    root_image = image_dir / "root.img"
    # Sparse: the golden's blocks once, then what each node writes into its own snapshot.
    size = 2 * root_image.stat().st_size + len(cluster.nodes) * GIB
    pools.create_loop_pool(pool_dir, size, "btrfs", backing)
    db = Database.create(running.paths.database)
    db.update("lab up", "the inventory, with the lab's bootstrap",
              lambda old: dataclasses.replace(cluster, generation=old.generation))
    volumes.add_golden(db, GOLDEN, root_image, "reflink", str(pool_dir))
    volumes.snapshot_volumes(db, GOLDEN, owners="nodes", portal=portal)
    entry = record.add_process("tgtd", record.san["netns"])
    daemon, _, _ = tgt.serve(db.load(), portal, record.san["control_port"],
                             netns=record.san["netns"], directory=directory)
    entry.pid, entry.start_time = daemon.pid, process_start_time(daemon.pid)
    record.save()


def start_bootstrap(running: labs.Lab, image_dir: Path) -> None:
    """The first etcd member, the database migrated into it, the netboot tree rendered from
    it, and the bootstrap replica serving from a local copy of the store."""
    record, layout, paths = running.record, running.plan, running.paths
    boot = layout.bootstrap
    ns = Namespace(boot.namespace)
    url = f"etcd://{boot.address}:{STORE_CLIENT_PORT}"
    cluster = Database(paths.database).load()
    settings = cluster.required_settings()
    data = bootstrap_dir(layout.state_dir)
    data.mkdir(parents=True, exist_ok=True)
    etcd = running.spawn("etcd-bootstrap", boot.namespace,
                         [*VLX, "db", "serve", "--name", BOOTSTRAP_MEMBER,
                          "--listen", str(boot.address), "--data-dir", str(data / "etcd"),
                          "--heartbeat-ms", str(settings.store_heartbeat_ms),
                          "--election-ms", str(settings.store_election_ms)],
                         data / "etcd.log")
    wait_for(lambda: etcd.poll() is not None or healthy(ns, url), ETCD_START_TIMEOUT,
             "the bootstrap's etcd member to answer", interval=0.5)
    if etcd.poll() is not None:
        raise VlxError(f"the bootstrap's etcd member exited:\n{labs.tail(data / 'etcd.log')}")
    migrated = ns.run([*VLX, "--db", str(paths.database), "db", "migrate", "--to", url],
                      check=False, timeout=120)
    if migrated.returncode != 0:
        raise VlxError(f"migrating the lab's database into {url}: "
                       f"{(migrated.stderr or migrated.stdout).strip()}")
    record.store = url
    record.save()
    render.render(cluster, image_dir, paths.netboot, settings.kernel_args)
    directory = paths.replica_dir(boot.name)
    directory.mkdir(parents=True, exist_ok=True)
    replica = running.spawn(
        f"replica-{boot.name}", boot.namespace,
        [*VLX, "--store", url, "--db", str(directory / "copy.db"), "bootsvc", "run",
         "--interface", REPLICA_INTERFACE, "--address", str(boot.address),
         "--services", ",".join(BOOT_SERVICES), "--state-dir", str(directory),
         "--netboot-root", str(paths.netboot_root)],
        paths.replica_log(boot.name))
    running._await_replica(boot.name, replica)


# --- the store, seen from the bootstrap's namespace ---------------------------------------

def _endpoints(url: str) -> str:
    return ",".join(f"http://{host}:{port}" for host, port in parse_url(url).endpoints)


def healthy(ns: Namespace, url: str) -> bool:
    done = ns.run(["etcdctl", "--endpoints", _endpoints(url), "--command-timeout=3s",
                   "endpoint", "health"], check=False, timeout=30)
    return done.returncode == 0


def members(ns: Namespace, url: str) -> list[dict[str, Any]]:
    """Every member etcd lists (name, peer and client URL) and whether it answers."""
    listed = ns.run(["etcdctl", "--endpoints", _endpoints(url), "--command-timeout=3s",
                     "member", "list", "-w", "json"], check=False, timeout=30)
    if listed.returncode != 0:
        raise VlxError(f"no etcd member at {url} answers: {listed.stderr.strip()}")
    found = json.loads(listed.stdout).get("members", [])
    health = ns.run(["etcdctl", "--endpoints", _endpoints(url), "--command-timeout=3s",
                     "endpoint", "health", "--cluster", "-w", "json"], check=False, timeout=60)
    answers: dict[str, bool] = {}
    with contextlib.suppress(json.JSONDecodeError):
        for item in json.loads(health.stdout or "[]"):
            answers[item.get("endpoint", "")] = bool(item.get("health"))
    return [{"name": m.get("name", ""), "peer_url": (m.get("peerURLs") or [""])[0],
             "client_url": (m.get("clientURLs") or [""])[0],
             "healthy": answers.get((m.get("clientURLs") or [""])[0], False)} for m in found]


# --- status, bootstrap removal, down ---------------------------------------------------------

def store_status(record: LabRecord, report: dict[str, Any]) -> None:
    """Which replicas answer (the bootstrap's and every node's) and the database's members."""
    from .progress import http_from
    boot = record.replicas.get("boot")
    if boot is None or not (NETNS_DIR / boot["namespace"]).exists():
        return
    answers = http_from(str(NETNS_DIR / boot["namespace"]))
    for replica in report["replicas"]:
        replica["answers"] = "yes" if answers(replica["address"]) else "no"
    for node in report["nodes"]:
        said = "yes" if answers(node["ip"]) else "no"
        report["replicas"].append({"name": node["name"], "namespace": None,
                                   "address": node["ip"], "answers": said,
                                   "state": "node" if node["qemu_pid"] else "off",
                                   "pid": None, "generation": None, "counters": {},
                                   "log": None})
    try:
        report["members"] = members(Namespace(boot["namespace"]), record.store) \
            if record.store else []
    except VlxError:
        report["members"] = []
    report["store"] = record.store


def remove_bootstrap(state_dir: Path) -> list[str]:
    """Hand the cluster to its nodes: clear `store_bootstrap`, remove the bootstrap's etcd
    member, stop its etcd and its replica. Refused while no node's member has joined."""
    try:
        record = LabRecord.load(state_dir)
    except StateError as err:
        raise VlxError(str(err), "--state-dir") from None
    if record is None or record.image != "node":
        raise VlxError(f"no node-image lab in {state_dir} (`vlx lab up` makes one)",
                       "--state-dir")
    etcd, replica = record.process("etcd-bootstrap"), record.process("replica-boot")
    if etcd is None or not same_process(etcd) or record.store is None:
        raise VlxError("the bootstrap is gone already")
    ns = Namespace(record.replicas["boot"]["namespace"])
    found = members(ns, record.store)
    others = [m for m in found if m["name"] != BOOTSTRAP_MEMBER and m["healthy"]]
    if not others:
        raise VlxError("no node's etcd member has joined yet: without the bootstrap the "
                       "database would be lost (`vlx lab status` shows the members)")
    nodes_url = "etcd://" + ",".join(m["client_url"].removeprefix("http://") for m in others)
    forget = ns.run([sys.executable, "-m", "virtualinux.vm_test.selfhost", "forget-bootstrap",
                     nodes_url], check=False, timeout=120)
    if forget.returncode != 0:
        raise VlxError(f"clearing store_bootstrap: {(forget.stderr or forget.stdout).strip()}")
    said = [forget.stdout.strip()]
    removed = ns.run([*VLX, "--store", nodes_url, "db", "member", "remove", BOOTSTRAP_MEMBER],
                     check=False, timeout=120)
    if removed.returncode != 0:
        raise VlxError(f"removing the bootstrap's member: {removed.stderr.strip()}")
    said.append(removed.stdout.strip())
    stopped = labs.stop_processes(dataclasses.replace(
        record, processes=[p for p in (etcd, replica) if p is not None]))
    said += [f"stopped {item}" for item in stopped]
    record.store = nodes_url
    record.save()
    said.append(f"the nodes serve each other; the store is {nodes_url}")
    return said


def forget_bootstrap(url: str) -> int:
    """In the lab's namespace: clear `store_bootstrap` (one change, a new generation)."""
    db = Database(store=parse_url(url))

    def change(cluster: Cluster) -> Cluster:
        assert cluster.settings is not None
        return dataclasses.replace(cluster, settings=dataclasses.replace(
            cluster.settings, store_bootstrap=()))

    cluster = db.update("lab bootstrap remove", "store_bootstrap cleared", change)
    print(f"store_bootstrap cleared (generation {cluster.generation})")
    return 0


def stop_san(record: LabRecord) -> list[str]:
    """The SAN's tgtd (its targets deleted, sessions forced) and the pool's loop mount."""
    removed: list[str] = []
    if not record.san:
        return removed
    directory = san_dir(record.state_dir)
    with contextlib.suppress(VlxError):
        daemon = tgt.recorded_daemon(record.san["portal"], directory)
        if daemon is not None:
            tgt.stop(daemon, directory)
            removed.append(f"tgtd of {record.san['portal']} (pid {daemon.pid})")
    return removed


def unmount_pool(record: LabRecord) -> list[str]:
    pool = Path(record.san.get("pool", "")) if record.san else None
    if pool is None or not os.path.ismount(pool):
        return []
    pools.remove_loop_pool(pool, Path(record.san["backing"]))
    return [f"pool {pool}"]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 2 and argv[0] == "forget-bootstrap":
        try:
            return forget_bootstrap(argv[1])
        except VlxError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    print("usage: python -m virtualinux.vm_test.selfhost forget-bootstrap etcd://...",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())

