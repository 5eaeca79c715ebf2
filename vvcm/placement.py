"""Placement of VMs on physical nodes.

A VM goes to a node only while the node's VCPUs stay within `cpus * cpu_overcommit` and its VM
memory within `memory * memory_overcommit`. Among the nodes with room, a VM goes where its own
VC has the fewest VMs (VCs spread over nodes, so a node failure hurts every VC a little rather
than one VC a lot), then where the node is least loaded, then by name: deterministic.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from .errors import VlxError
from .model import VM, Node, Settings, VirtualCluster


def node_load(vms: Iterable[VM], vcs: Iterable[VirtualCluster]) -> tuple[Counter[str],
                                                                         Counter[str]]:
    """VCPUs and MiB of memory placed on each node."""
    shape = {vc.name: vc for vc in vcs}
    vcpus: Counter[str] = Counter()
    memory: Counter[str] = Counter()
    for vm in vms:
        vcpus[vm.node] += shape[vm.vc].vcpus
        memory[vm.node] += shape[vm.vc].memory
    return vcpus, memory


def place(vc: VirtualCluster, vm_names: Sequence[str], nodes: Sequence[Node],
          settings: Settings, placed: Iterable[VM], vcs: Iterable[VirtualCluster]) -> list[str]:
    """The node of each VM in `vm_names`, given what is already `placed`."""
    if not nodes:
        raise VlxError(f"VC {vc.name} cannot be placed: the cluster has no nodes")
    placed = list(placed)
    vcpus, memory = node_load(placed, vcs)
    own = Counter(vm.node for vm in placed if vm.vc == vc.name)
    result = []
    for name in vm_names:
        fitting = [node for node in nodes
                   if vcpus[node.name] + vc.vcpus <= node.cpus * settings.cpu_overcommit
                   and memory[node.name] + vc.memory <= node.memory * settings.memory_overcommit]
        if not fitting:
            cpu_room = sum(max(0, node.cpus * settings.cpu_overcommit - vcpus[node.name])
                           for node in nodes)
            raise VlxError(
                f"VC {vc.name} does not fit in the cluster: {name} needs {vc.vcpus} VCPUs and "
                f"{vc.memory} MiB, and no node has that room left (the VC needs "
                f"{vc.vms * vc.vcpus} VCPUs in all; {cpu_room:g} are free at cpu_overcommit "
                f"{settings.cpu_overcommit:g})")
        best = min(fitting, key=lambda node: (
            own[node.name], vcpus[node.name] / node.cpus, memory[node.name] / node.memory,
            node.name))
        result.append(best.name)
        vcpus[best.name] += vc.vcpus
        memory[best.name] += vc.memory
        own[best.name] += 1
    return result
