"""The virtual lab: a virtualinux cluster of QEMU nodes that PXE-boot from our own replicas.

    STATE/lab.json            the record of everything made (state.py), written before making it
    STATE/cluster.db          the lab's own database, imported from the inventory
    STATE/netboot/current     the netboot tree the replicas serve (rendered by the caller)
    STATE/replicas/rN/        a replica's log and status (`vlx bootsvc run --state-dir`)
    STATE/nodes/NAME/         a node's serial.log, serial.sock, monitor.sock, qemu.log

Network (all in namespaces named PREFIX-*, addresses from the cluster network only, no route
out): PREFIX-net holds the bridge br0 and one tap per node; PREFIX-r1, PREFIX-r2, ... each hold
one replica on a veth into br0, at a free address of the cluster network.

`start(...)` makes all of it (and on any failure removes what it made, so nothing is left
half-made); `Lab.wait(...)` follows the nodes' progress; `down(state_dir)` removes everything the
record names, also after a crash of `start`; `status(state_dir)` reports on a running lab;
`power_on(state_dir, node)` starts a killed node's QEMU again.

Imports the model and the replicas' status format (bootsvc.status); the caller hands in how to
fill the database and render the tree (the command line, which may import the other areas, does
that).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from virtualinux.bootsvc.status import read_status, wait_running
from virtualinux.vvcm import Cluster, Database, VlxError
from virtualinux.vvcm.command import vlx_command

from . import qemu, uplink
from .netns import NETNS_DIR, Namespace, Netns, remove_namespace
from .plan import BRIDGE, REPLICA_INTERFACE, LabPlan, namespace_prefix
from .progress import PHASES, NodeProgress, Watcher, http_from, ping_from
from .state import LabRecord, StateError, process_start_time, same_process

REPLICA_SERVICES = ("dhcp", "tftp", "http", "ra")   # ra: ends iPXE's IPv6 wait (LAB.md)
# `vlx` of this very interpreter (a venv's or the system's), whatever is first on PATH.
VLX = vlx_command()
REPLICA_START_TIMEOUT = 30.0
STOP_GRACE = 5.0
# A unix socket path longer than this does not fit in sockaddr_un.
MAX_SOCKET_PATH = 107
REQUIRED_PROGRAMS = ("nsenter", "busybox")


@dataclasses.dataclass(frozen=True)
class Paths:
    state_dir: Path

    @property
    def database(self) -> Path:
        return self.state_dir / "cluster.db"

    @property
    def netboot(self) -> Path:
        return self.state_dir / "netboot"

    @property
    def netboot_root(self) -> Path:
        return self.netboot / "current"

    def replica_dir(self, name: str) -> Path:
        return self.state_dir / "replicas" / name

    def replica_log(self, name: str) -> Path:
        return self.replica_dir(name) / "log"

    def node_dir(self, name: str) -> Path:
        return self.state_dir / "nodes" / name


def preflight(lab: LabPlan) -> None:
    """Everything checked before anything is made: root, programs, the host, an old lab."""
    missing = [program for program in REQUIRED_PROGRAMS if shutil.which(program) is None]
    if missing:
        raise VlxError(f"missing programs: {', '.join(missing)} (make lab installs them)")
    qemu.check_host([plan.node for plan in lab.nodes], lab.firmware)
    paths = Paths(lab.state_dir)
    longest = max(len(str(paths.node_dir(plan.node.name) / "monitor.sock")) for plan in lab.nodes)
    if longest > MAX_SOCKET_PATH:
        raise VlxError(f"the state directory's path is too long for QEMU's unix sockets "
                       f"({longest} > {MAX_SOCKET_PATH} characters)", "--state-dir")
    check_not_running(lab.state_dir, lab.prefix)
    if os.geteuid() != 0:
        raise VlxError("the lab needs root (network namespaces, taps, QEMU)")


def check_not_running(state_dir: Path, prefix: str) -> None:
    try:
        record = LabRecord.load(state_dir)
    except StateError as err:
        raise VlxError(f"{err}: remove it by hand", "--state-dir") from None
    if record is not None:
        raise VlxError(f"a lab is up already in {state_dir} (since "
                       f"{time.strftime('%H:%M:%S', time.localtime(record.started))}): "
                       f"`vlx lab status` shows it, `vlx lab down` removes it", "--state-dir")
    stray = lab_namespaces(prefix)
    if stray:
        raise VlxError(f"namespaces of an earlier lab are still there ({', '.join(stray)}): "
                       "`vlx lab down` removes them", "--state-dir")
    if state_dir.exists() and any(state_dir.iterdir()):
        raise VlxError(f"{state_dir} holds files but no lab record: not a lab's state "
                       "directory, or one damaged by hand; choose another", "--state-dir")


def lab_namespaces(prefix: str) -> list[str]:
    if not NETNS_DIR.is_dir():
        return []
    return sorted(entry.name for entry in NETNS_DIR.iterdir()
                  if entry.name.startswith(prefix + "-"))


class Lab:
    """A lab being made or running, and its record."""

    def __init__(self, lab: LabPlan, record: LabRecord):
        self.plan = lab
        self.record = record
        self.paths = Paths(lab.state_dir)
        self.netns = Netns(prefix=lab.prefix, unique=False)
        self.power_on: dict[str, float] = {}

    # --- making it -------------------------------------------------------------------------

    def make_network(self) -> None:
        hub = self._namespace("net")
        self.netns.bridge(hub, BRIDGE)
        for replica in self.plan.replicas:
            ns = self._namespace(replica.name)
            self.netns.plug(hub, BRIDGE, ns, REPLICA_INTERFACE,
                            address=replica.interface_address, mac=replica.mac)

    def _namespace(self, role: str) -> Namespace:
        self.record.add_namespace(f"{self.plan.prefix}-{role}")
        return self.netns.namespace(role)

    def start_replicas(self, services: Sequence[str] = REPLICA_SERVICES) -> None:
        procs = {}
        for replica in self.plan.replicas:
            directory = self.paths.replica_dir(replica.name)
            directory.mkdir(parents=True, exist_ok=True)
            cmd = [*VLX, "--db",
                   str(self.paths.database), "bootsvc", "run",
                   "--interface", REPLICA_INTERFACE, "--address", str(replica.address),
                   "--services", ",".join(services), "--state-dir", str(directory),
                   "--netboot-root", str(self.paths.netboot_root)]
            procs[replica.name] = self.spawn(f"replica-{replica.name}", replica.namespace,
                                              cmd, self.paths.replica_log(replica.name))
        for replica in self.plan.replicas:
            self._await_replica(replica.name, procs[replica.name])

    def _await_replica(self, name: str, proc: subprocess.Popen) -> None:
        """Until the replica's services are bound (its status says running)."""
        try:
            wait_running(self.paths.replica_dir(name), proc.pid, REPLICA_START_TIMEOUT,
                         exited=lambda: proc.poll() is not None)
        except VlxError as err:
            raise VlxError(f"replica {name}: {err}:\n"
                           + tail(self.paths.replica_log(name))) from None

    def start_nodes(self) -> None:
        hub = Namespace(self.plan.hub)
        for node_plan in self.plan.nodes:
            node = node_plan.node
            self.netns.tap(hub, BRIDGE, node_plan.tap)
            if node_plan.uplink_tap:
                # The uplink segment's bridge is the world's (uplink.start_for_nodes).
                self.netns.tap(hub, uplink.UPLINK_BRIDGE, node_plan.uplink_tap)
                self.record.nodes[node.name].update(uplink_tap=node_plan.uplink_tap,
                                                    uplink_mac=node_plan.uplink_mac)
            machine = self.machine(node_plan.node.name)
            qemu.prepare(machine)
            self.spawn(f"qemu-{node.name}", self.plan.hub, qemu.command(machine),
                        machine.node_dir / "qemu.log")
            self.power_on[node.name] = time.monotonic()

    def machine(self, name: str) -> qemu.Machine:
        node_plan = next(p for p in self.plan.nodes if p.node.name == name)
        return qemu.Machine(node_plan.node, node_plan.tap, self.paths.node_dir(name),
                            self.plan.firmware, node_plan.uplink_tap, node_plan.uplink_mac)

    def spawn(self, role: str, netns: str, cmd: list[str], log: Path) -> subprocess.Popen:
        entry = self.record.add_process(role, netns)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as output:
            # Its own session: the lab outlives `vlx lab up`, and a ^C there does not reach it.
            proc = Namespace(netns).popen(cmd, stdin=subprocess.DEVNULL, stdout=output,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        entry.pid = proc.pid
        entry.start_time = process_start_time(proc.pid)
        self.record.save()
        return proc

    # --- following it ----------------------------------------------------------------------

    def watcher(self) -> Watcher:
        return make_watcher(self.record, self.paths)

    def wait(self, timeout: float, until: str = "ready",
             show: Callable[[NodeProgress, str, float], None] | None = None,
             interval: float = 0.2) -> Watcher:
        """Follow the nodes until all reach `until` or `timeout` seconds pass, reading their
        logs every `interval` seconds (a phase's time is known to within it)."""
        watcher = self.watcher()
        for name, when in self.power_on.items():
            watcher.power_on(name, when)
        start = min(self.power_on.values(), default=time.monotonic())
        deadline = time.monotonic() + timeout
        while True:
            for node, phase in watcher.poll():
                if show is not None:
                    show(node, phase, time.monotonic() - start)
            if watcher.all_at(until) or time.monotonic() > deadline:
                self.remember(watcher)
                return watcher
            time.sleep(interval)


    def remember(self, watcher: Watcher) -> None:
        """Keep when each node reached each phase (seconds after its power-on) in the record,
        for `status` later."""
        for name, progress in watcher.nodes.items():
            on = progress.seen.get("powered")
            if on is not None:
                self.record.nodes[name]["seen"] = {phase: round(when - on, 1) for phase, when
                                                   in progress.seen.items()}
        self.record.save()


def make_watcher(record: LabRecord, paths: Paths) -> Watcher:
    nodes = [NodeProgress(name, info["mac"], info["ip"],
                          phases=tuple(info.get("phases") or PHASES))
             for name, info in record.nodes.items()]
    serial = {name: paths.node_dir(name) / "serial.log" for name in record.nodes}
    replica_logs = [paths.replica_log(name) for name in record.replicas]
    first_replica = next(iter(record.replicas.values()), None)
    ping = serving = None
    if first_replica:
        where = str(NETNS_DIR / first_replica["namespace"])
        # The node image's nodes are followed until their own replica serves; the tiny
        # image's until they answer a ping.
        if record.image == "node":
            serving = http_from(where)
        else:
            ping = ping_from(where)
    watcher = Watcher(nodes, serial, replica_logs, ping=ping, serving=serving)
    for entry in record.processes:
        if entry.role.startswith("qemu-") and entry.pid is not None:
            watcher.power_on(entry.role.removeprefix("qemu-"))
    return watcher


def start(lab: LabPlan, fill_database: Callable[[Database], Cluster],
          render_tree: Callable[[Cluster, Path], None],
          services: Sequence[str] = REPLICA_SERVICES) -> Lab:
    """Make the whole lab. On any failure (or ^C) remove what was made, then re-raise."""
    preflight(lab)
    lab.state_dir.mkdir(parents=True, exist_ok=True)
    record = LabRecord(state_dir=lab.state_dir, prefix=lab.prefix, firmware=lab.firmware,
                       started=time.time(),
                       nodes={p.node.name: {"mac": p.node.mac, "ip": str(p.node.ip),
                                            "tap": p.tap} for p in lab.nodes},
                       replicas={r.name: {"namespace": r.namespace, "address": str(r.address),
                                          "mac": r.mac} for r in lab.replicas})
    record.save()
    running = Lab(lab, record)
    try:
        cluster = fill_database(Database.create(running.paths.database))
        render_tree(cluster, running.paths.netboot)
        running.make_network()
        running.start_replicas(services)
        uplink.start(running, cluster)
        running.start_nodes()
        record.phase = "up"
        record.save()
    except BaseException:
        down(lab.state_dir)
        raise
    return running


def down(state_dir: Path, prefix: str | None = None) -> list[str]:
    """Remove every process, namespace and file of the lab in `state_dir`; what was removed.

    Works from the record alone, so it also cleans up after a crash of `start`. With no record,
    it still removes namespaces named with the lab's prefix (a record deleted by hand)."""
    removed: list[str] = []
    try:
        record = LabRecord.load(state_dir)
    except StateError as err:
        raise VlxError(f"{err}: remove the lab's namespaces and that directory by hand") \
            from None
    prefix = record.prefix if record else (prefix or namespace_prefix(state_dir))
    if record is not None and record.san:
        from . import selfhost  # it imports this module
        # The nodes and the bootstrap first, then the SAN's tgtd (its targets deleted, the
        # dead nodes' sessions forced), then the pool it served from.
        removed += stop_processes(dataclasses.replace(
            record, processes=[p for p in record.processes if p.role != "tgtd"]))
        removed += selfhost.stop_san(record)
        # A tgtd that would not stop cleanly, then the pool it no longer holds.
        removed += stop_processes(dataclasses.replace(
            record, processes=[p for p in record.processes if p.role == "tgtd"]))
        removed += selfhost.unmount_pool(record)
    elif record is not None:
        removed += stop_processes(record)
    names = set(record.namespaces if record else ()) | set(lab_namespaces(prefix))
    for name in sorted(names):
        if (NETNS_DIR / name).exists():
            remove_namespace(name)
            removed.append(f"namespace {name}")
    if record is not None:
        shutil.rmtree(state_dir, ignore_errors=True)
        removed.append(f"directory {state_dir}")
    return removed


def power_on(state_dir: Path, name: str) -> int:
    """Start node `name`'s QEMU again after it was killed (its taps stay in the hub, its
    serial log grows on); its pid. Refused while that QEMU still runs."""
    try:
        record = LabRecord.load(state_dir)
    except StateError as err:
        raise VlxError(str(err), "--state-dir") from None
    if record is None or name not in record.nodes:
        raise VlxError(f"no node {name} in a lab at {state_dir}", "NODE")
    running = record.process(f"qemu-{name}")
    if running is not None and same_process(running) and _running(running.pid):
        raise VlxError(f"{name} is running (QEMU pid {running.pid})", "NODE")
    info = record.nodes[name]
    node = Database(Paths(state_dir).database).load().node(name)
    machine = qemu.Machine(node, info["tap"], Paths(state_dir).node_dir(name), record.firmware,
                           info.get("uplink_tap"), info.get("uplink_mac"))
    log = machine.node_dir / "qemu.log"
    # The same entry, so `status` and `down` follow the new QEMU.
    entry = running or record.add_process(f"qemu-{name}", f"{record.prefix}-net")
    with open(log, "ab") as output:
        proc = Namespace(entry.netns).popen(qemu.command(machine), stdin=subprocess.DEVNULL,
                                            stdout=output, stderr=subprocess.STDOUT,
                                            start_new_session=True)
    entry.pid, entry.start_time = proc.pid, process_start_time(proc.pid)
    record.save()
    return proc.pid


def stop_processes(record: LabRecord) -> list[str]:
    alive = [entry for entry in record.processes if same_process(entry)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for entry in alive:
            if entry.pid is None:       # same_process() is never true for one
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(entry.pid, sig)
        deadline = time.monotonic() + STOP_GRACE
        while time.monotonic() < deadline and any(_running(e.pid) for e in alive):
            time.sleep(0.05)
        if not any(_running(e.pid) for e in alive):
            break
    return [f"process {entry.role} (pid {entry.pid})" for entry in alive]


def _running(pid: int | None) -> bool:
    """Alive and not a zombie (the lab's processes are not our children after `up` exits)."""
    if pid is None:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def status(state_dir: Path) -> dict[str, Any]:
    """What runs in the lab at `state_dir`, and how far each node is."""
    try:
        record = LabRecord.load(state_dir)
    except StateError as err:
        raise VlxError(str(err), "--state-dir") from None
    if record is None:
        raise VlxError(f"no lab in {state_dir} (`vlx lab up` makes one)", "--state-dir")
    paths = Paths(state_dir)
    watcher = make_watcher(record, paths)
    watcher.poll()
    processes = {entry.role: entry for entry in record.processes}
    nodes = []
    for name, info in record.nodes.items():
        progress = watcher.nodes[name]
        entry = processes.get(f"qemu-{name}")
        running = entry is not None and same_process(entry) and _running(entry.pid)
        nodes.append({"name": name, "mac": info["mac"], "ip": info["ip"],
                      "phase": progress.describe() if running else "off",
                      "qemu_pid": entry.pid if running and entry else None,
                      "seen": info.get("seen", {}),
                      "serial_log": str(paths.node_dir(name) / "serial.log")})
    replicas = []
    for name, info in record.replicas.items():
        entry = processes.get(f"replica-{name}")
        running = entry is not None and same_process(entry) and _running(entry.pid)
        counters: dict[str, Any] = {}
        generation = None
        with contextlib.suppress(VlxError):
            report = read_status(paths.replica_dir(name))
            counters = {service: report.counters(service) for service in report.services}
            generation = report.generation
        replicas.append({"name": name, "namespace": info["namespace"],
                         "address": info["address"], "state": "running" if running else "dead",
                         "pid": entry.pid if running and entry else None,
                         "generation": generation, "counters": counters,
                         "log": str(paths.replica_log(name))})
    lab: dict[str, Any] = {"state_dir": str(state_dir), "phase": record.phase,
                           "firmware": record.firmware, "prefix": record.prefix,
                           "namespaces": record.namespaces, "nodes": nodes,
                           "replicas": replicas, "image": record.image}
    if record.image == "node":
        from . import selfhost  # it imports this module
        selfhost.store_status(record, lab)
    return lab


def tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return f"(no {path})"
    return "\n".join(text.splitlines()[-lines:])
