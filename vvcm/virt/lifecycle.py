"""The life cycle of a VC on libvirt: create, start, stop, destroy, status.

Every step is idempotent and checks before it makes: `create` first reaches every hosting
node's libvirt and network (so a missing hypervisor fails with nothing made), then makes what
is missing (disks, networks, domains) and, if any part fails, removes exactly what this run
made, so a VC is never left half-made; running it again completes what an earlier run left.
`start` and `stop` act on all nodes at once, one thread and one connection per node.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections.abc import Callable, Sequence

import libvirt

from ..db import Database
from ..errors import VlxError
from ..model import VM, Cluster, Node, VirtualCluster
from . import network, secrets
from .connect import each, error_text, hypervisor_of, per_node
from .domain import Initiator, console_log, domain_xml

STOP_TIMEOUT = 60.0
STATE_NAMES = {libvirt.VIR_DOMAIN_NOSTATE: "no state", libvirt.VIR_DOMAIN_RUNNING: "running",
               libvirt.VIR_DOMAIN_BLOCKED: "blocked", libvirt.VIR_DOMAIN_PAUSED: "paused",
               libvirt.VIR_DOMAIN_SHUTDOWN: "shutting down",
               libvirt.VIR_DOMAIN_SHUTOFF: "shut off", libvirt.VIR_DOMAIN_CRASHED: "crashed",
               libvirt.VIR_DOMAIN_PMSUSPENDED: "suspended"}
UNDEFINE_FLAGS = (libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                  | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
                  | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)


@dataclasses.dataclass(frozen=True)
class Disks:
    """What the life cycle needs of storage, handed in by the command line (storage is
    downstream of vvcm, so vvcm cannot import it).

    `make(vc, vm_names)` makes one snapshot disk per VM, all or none, records them in the
    database and returns the volume names; `remove(names)` removes volumes;
    `initiator(cluster_name, owner)` is the iSCSI initiator name a VM logs in to its exported
    disk with.
    """

    make: Callable[[VirtualCluster, list[str]], list[str]]
    remove: Callable[[list[str]], object]
    initiator: Initiator | None = None


@dataclasses.dataclass(frozen=True)
class VMStatus:
    vm: str
    vc: str
    node: str
    state: str
    ip: str
    mac: str
    cpu_seconds: float | None
    memory_mib: int


def find_domain(conn: libvirt.virConnect, name: str) -> libvirt.virDomain | None:
    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def undefine(domain: libvirt.virDomain) -> None:
    """Undefine with everything libvirt keeps beside a domain (snapshots, checkpoints, saved
    state, NVRAM); a driver that knows fewer of those flags (the test driver) gets those it
    knows."""
    try:
        domain.undefineFlags(UNDEFINE_FLAGS)
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_INVALID_ARG:
            raise
        domain.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
                             | libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE)


def _vms_by_node(cluster: Cluster, vc: str) -> dict[str, list[VM]]:
    by_node: dict[str, list[VM]] = {}
    for vm in cluster.vms_of(vc):
        by_node.setdefault(vm.node, []).append(vm)
    return by_node


def create(db: Database, name: str, disks: Disks) -> Cluster:
    cluster = db.load()
    vc = cluster.vc(name)
    by_node = _vms_by_node(cluster, name)
    hypervisors = per_node(cluster, by_node, lambda node, conn: hypervisor_of(cluster, conn))
    plans = network.node_plans(cluster, name, by_node)
    network.check_reachable(plans)
    made_volumes: list[str] = []
    made_devices: dict[str, list[str]] = {}
    defined: list[tuple[str, str]] = []  # (node, domain) new in this run
    made_secrets: dict[str, list[str]] = {}  # node -> secret usages new in this run
    lock = threading.Lock()
    try:
        missing = [vm.name for vm in cluster.vms_of(name) if vm.volume is None]
        if missing:
            made_volumes = list(disks.make(vc, missing))
            cluster = db.load()  # the VMs now name their disks
            by_node = _vms_by_node(cluster, name)
        for plan in plans:
            made_devices[plan.node] = network.ensure(plan)
        if cluster.settings:
            os.makedirs(cluster.settings.vm_log_dir, exist_ok=True)

        def define(node: Node, conn: libvirt.virConnect) -> None:
            made = secrets.ensure(conn, cluster, by_node[node.name], node.name)
            with lock:
                made_secrets[node.name] = made
            for vm in by_node[node.name]:
                fresh = find_domain(conn, vm.name) is None
                conn.defineXML(domain_xml(cluster, vm, hypervisors[node.name],
                                          disks.initiator))
                if fresh:
                    with lock:
                        defined.append((node.name, vm.name))

        per_node(cluster, by_node, define)
    except BaseException:
        _roll_back(cluster, defined, made_secrets, plans, made_devices, made_volumes, disks)
        raise
    return cluster


def _roll_back(cluster: Cluster, defined: list[tuple[str, str]],
               made_secrets: dict[str, list[str]], plans: Sequence[network.NodePlan],
               made_devices: dict[str, list[str]], made_volumes: list[str],
               disks: Disks) -> None:
    """Undo what one failed create made, and nothing else."""
    nodes = {node for node, _ in defined} | {node for node, made in made_secrets.items()
                                             if made}
    vms = cluster.vms

    def forget(node: Node, conn: libvirt.virConnect) -> None:
        for where, vm in defined:
            if where == node.name and (domain := find_domain(conn, vm)) is not None:
                undefine(domain)
        if made_secrets.get(node.name):
            secrets.remove(conn, cluster, vms, only=made_secrets[node.name])

    if nodes:
        per_node(cluster, nodes, forget)
    for plan in plans:
        if made_devices.get(plan.node):
            network.remove(plan)
    if made_volumes:
        disks.remove(made_volumes)


def start(db: Database, name: str) -> list[str]:
    """Start every VM of the VC that is not running; returns the names started."""
    cluster = db.load()
    by_node = _vms_by_node(cluster, name)
    plans = {plan.node: plan for plan in network.node_plans(cluster, name, by_node)}
    started: list[str] = []
    lock = threading.Lock()

    def boot(node: Node, conn: libvirt.virConnect) -> None:
        domains = [(vm, _domain_or_fail(conn, vm, node)) for vm in by_node[node.name]]
        network.ensure(plans[node.name])  # a node rebooted since create has lost its bridge
        secrets.ensure(conn, cluster, by_node[node.name], node.name)

        # Started paused, then all resumed: guests that already run (TCG eats a core each)
        # would otherwise slow down the QEMU start-ups still to come on the same node.
        fresh = [(vm, domain) for vm, domain in domains if not domain.isActive()]
        each([domain for _, domain in fresh], _start_paused)
        each([domain for _, domain in fresh
              if domain.state()[0] == libvirt.VIR_DOMAIN_PAUSED], lambda d: d.resume())
        with lock:
            started.extend(vm.name for vm, _ in fresh)

    per_node(cluster, by_node, boot)
    return sorted(started)


def stop(db: Database, name: str, force: bool = False,
         timeout: float = STOP_TIMEOUT) -> list[str]:
    """Shut every running VM down (ACPI), pulling the plug on those still running after
    `timeout` seconds; `force` pulls it at once. Returns the names stopped."""
    cluster = db.load()
    by_node = _vms_by_node(cluster, name)
    stopped: list[str] = []
    lock = threading.Lock()

    def halt(node: Node, conn: libvirt.virConnect) -> None:
        running = [(vm, d) for vm in by_node[node.name]
                   if (d := find_domain(conn, vm.name)) is not None and d.isActive()]
        each([d for _, d in running], lambda d: d.destroy() if force else d.shutdown())
        deadline = time.monotonic() + timeout
        for _, domain in running:
            while domain.isActive() and time.monotonic() < deadline:
                time.sleep(0.2)
            if domain.isActive():
                domain.destroy()
        with lock:
            stopped.extend(vm.name for vm, _ in running)

    per_node(cluster, by_node, halt)
    return sorted(stopped)


def destroy(db: Database, name: str, disks: Disks, keep_volumes: bool = False) -> Cluster:
    """Remove the VC's domains (stopping them), its network on every node, and its volumes
    unless `keep_volumes`. What is gone already is skipped, so a second run finishes a first."""
    cluster = db.load()
    cluster.vc(name)
    by_node = _vms_by_node(cluster, name)

    def remove_domains(node: Node, conn: libvirt.virConnect) -> None:
        def remove_one(vm: VM) -> None:
            domain = find_domain(conn, vm.name)
            if domain is None:
                return
            if domain.isActive():
                domain.destroy()
            undefine(domain)

        each(by_node[node.name], remove_one)
        secrets.remove(conn, cluster, by_node[node.name])

    per_node(cluster, by_node, remove_domains)
    for plan in network.node_plans(cluster, name, by_node):
        network.remove(plan)
    if not keep_volumes:
        volumes = [vm.volume for vm in cluster.vms_of(name) if vm.volume]
        if volumes:
            disks.remove(volumes)
    return db.load()


def status(cluster: Cluster, names: Sequence[str]) -> list[VMStatus]:
    """A row per VM of the named VCs; a node that cannot be reached shows as `unreachable`."""
    vms = [vm for name in names for vm in cluster.vms_of(cluster.vc(name).name)]
    nodes = list(dict.fromkeys(vm.node for vm in vms))

    def look(node: Node, conn: libvirt.virConnect) -> dict[str, tuple[str, float | None]]:
        seen: dict[str, tuple[str, float | None]] = {}
        for vm in vms:
            if vm.node != node.name:
                continue
            domain = find_domain(conn, vm.name)
            if domain is None:
                seen[vm.name] = ("not created", None)
                continue
            state, _max, _mem, _vcpus, cpu_ns = domain.info()
            seen[vm.name] = (STATE_NAMES.get(state, f"state {state}"), cpu_ns / 1e9)
        return seen

    found = per_node(cluster, nodes, look, keep_going=True)
    rows = []
    for vm in vms:
        result = found[vm.node]
        if isinstance(result, Exception):
            state, cpu = "unreachable", None
        else:
            state, cpu = result[vm.name]
        vc = cluster.vc(vm.vc)
        rows.append(VMStatus(vm=vm.name, vc=vm.vc, node=vm.node, state=state, ip=str(vm.ip),
                             mac=vm.mac, cpu_seconds=cpu, memory_mib=vc.memory))
    return rows


def console_path(cluster: Cluster, vm_name: str) -> str:
    for vm in cluster.vms:
        if vm.name == vm_name:
            return console_log(cluster, vm)
    raise VlxError(f"no VM named {vm_name!r}")


def _start_paused(domain: libvirt.virDomain) -> None:
    """Start paused where the driver can (QEMU, Xen); a driver that cannot (the test driver)
    just starts it."""
    try:
        domain.createWithFlags(libvirt.VIR_DOMAIN_START_PAUSED)
    except libvirt.libvirtError as err:
        if err.get_error_code() != libvirt.VIR_ERR_INVALID_ARG:
            raise
        domain.create()


def _domain_or_fail(conn: libvirt.virConnect, vm: VM, node: Node) -> libvirt.virDomain:
    domain = find_domain(conn, vm.name)
    if domain is None:
        raise VlxError(f"VM {vm.name} has no domain on {node.name}: run `vlx vc create "
                       f"{vm.vc}` first")
    return domain


__all__ = ["Disks", "VMStatus", "create", "destroy", "error_text", "start", "status", "stop"]
