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
    result: list[str] = []
    for name in vm_names:
        fitting = [node for node in nodes
                   if vcpus[node.name] + vc.vcpus <= node.cpus * settings.cpu_overcommit
                   and memory[node.name] + vc.memory <= node.memory * settings.memory_overcommit]
        if not fitting:
            raise VlxError(f"VC {vc.name} does not fit in the cluster: {name} needs "
                           f"{_amount(vc.vcpus, 'VCPU')} and {vc.memory} MiB on one node "
                           f"(the VC needs {_amount(vc.vms * vc.vcpus, 'VCPU')} in all), and "
                           f"no node has both left; free{_after(vc, vm_names, result)} "
                           f"(cpu_overcommit "
                           f"{settings.cpu_overcommit:g}, memory_overcommit "
                           f"{settings.memory_overcommit:g}): "
                           + "; ".join(_room(node, vcpus[node.name], memory[node.name], vc,
                                             settings) for node in nodes))
        best = min(fitting, key=lambda node: (
            own[node.name], vcpus[node.name] / node.cpus, memory[node.name] / node.memory,
            node.name))
        result.append(best.name)
        vcpus[best.name] += vc.vcpus
        memory[best.name] += vc.memory
        own[best.name] += 1
    return result


def _amount(count: float, unit: str) -> str:
    return f"{count:g} {unit}" + ("" if count == 1 else "s")


def _room(node: Node, vcpus_used: float, memory_used: float, vc: VirtualCluster,
          settings: Settings) -> str:
    """'node2 1 VCPU, 256 MiB free (too few VCPUs)': why one VM of `vc` does not fit there."""
    cpu_free = max(0, node.cpus * settings.cpu_overcommit - vcpus_used)
    memory_free = max(0, node.memory * settings.memory_overcommit - memory_used)
    short = [what for what, lacking in (("too few VCPUs", cpu_free < vc.vcpus),
                                        ("too little memory", memory_free < vc.memory))
             if lacking]
    return f"{node.name} {_amount(cpu_free, 'VCPU')}, {memory_free:g} MiB ({' and '.join(short)})"


def _after(vc: VirtualCluster, vm_names: Sequence[str], nodes: Sequence[str]) -> str:
    placed = ", ".join(f"{vm}@{node}" for vm, node in zip(vm_names, nodes, strict=False))
    return f" once {placed} are placed" if placed else ""
