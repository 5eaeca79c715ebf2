"""Reaching each node's libvirt: its URI, one connection per node, work on many nodes at once.

A node's URI is its own `libvirt_uri` if it has one (the lab's unix sockets), else the
cluster's template (`{driver}+tcp://{ip}/system` by default) filled in for it; the template
is also how the nodes' libvirtds reach each other (`peer_uri`). `per_node()`
runs one function per node in threads, each with a connection of its own: libvirt-python
drops the GIL while it waits on the daemon, so N nodes take about as long as the slowest one.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Literal, TypeVar, overload

import libvirt

from ..errors import VlxError
from ..model import Cluster, Node
from .domain import driver_of

T = TypeVar("T")
_quiet = threading.Lock()
_silenced = False


class Unreachable(VlxError):
    """A node's libvirt cannot be reached (or its hypervisor is not there)."""


def silence_libvirt() -> None:
    """libvirt prints every error to stderr by default; we raise them as one line instead."""
    global _silenced
    with _quiet:
        if not _silenced:
            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            _silenced = True


def configured_driver(cluster: Cluster) -> str:
    hypervisor = cluster.settings.hypervisor if cluster.settings else "auto"
    return driver_of(hypervisor)


def node_uri(cluster: Cluster, node: Node) -> str:
    template = node.libvirt_uri or (cluster.settings.libvirt_uri if cluster.settings
                                    else "{driver}+tcp://{ip}/system")
    return template.format(driver=configured_driver(cluster), ip=node.ip, name=node.name)


def peer_uri(cluster: Cluster, node: Node) -> str:
    """How another node's libvirtd reaches this one (a peer-to-peer migration's destination):
    the cluster's template over the cluster network. A node's own `libvirt_uri` is how vlx
    reaches it, which in the lab is a unix socket the other daemons could not use."""
    template = cluster.settings.libvirt_uri if cluster.settings else "{driver}+tcp://{ip}/system"
    return template.format(driver=configured_driver(cluster), ip=node.ip, name=node.name)


def error_text(err: libvirt.libvirtError) -> str:
    return (err.get_error_message() or str(err)).strip().splitlines()[0]


@contextlib.contextmanager
def connection(cluster: Cluster, node: Node) -> Iterator[libvirt.virConnect]:
    silence_libvirt()
    uri = node_uri(cluster, node)
    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError as err:
        raise Unreachable(f"node {node.name}: cannot reach its hypervisor at {uri}: "
                          f"{error_text(err)}") from None
    try:
        yield conn
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            conn.close()


def hypervisor_of(cluster: Cluster, conn: libvirt.virConnect) -> str:
    """The concrete hypervisor for VMs on this connection: the setting, or for `auto` KVM
    when the node's capabilities offer it, else QEMU's TCG."""
    setting = cluster.settings.hypervisor if cluster.settings else "auto"
    if setting != "auto":
        return setting
    capabilities = conn.getCapabilities()
    return "kvm" if re.search(r"<domain type=['\"]kvm['\"]", capabilities) else "qemu"


@overload
def per_node(cluster: Cluster, nodes: Iterable[str],
             work: Callable[[Node, libvirt.virConnect], T],
             keep_going: Literal[False] = False) -> dict[str, T]: ...


@overload
def per_node(cluster: Cluster, nodes: Iterable[str],
             work: Callable[[Node, libvirt.virConnect], T],
             keep_going: Literal[True]) -> dict[str, T | Exception]: ...


def per_node(cluster: Cluster, nodes: Iterable[str],
             work: Callable[[Node, libvirt.virConnect], T],
             keep_going: bool = False) -> dict[str, T] | dict[str, T | Exception]:
    """`work(node, connection)` on every node at once; every node is tried, then the first
    error (in node order) is raised, or with `keep_going` returned as that node's result."""
    chosen = [cluster.node(name) for name in dict.fromkeys(nodes)]

    def one(node: Node) -> T:
        with connection(cluster, node) as conn:
            return work(node, conn)

    results: dict[str, T | Exception] = {}
    errors: list[Exception] = []
    with ThreadPoolExecutor(max_workers=max(1, min(32, len(chosen)))) as pool:
        futures = [(node, pool.submit(one, node)) for node in chosen]
        for node, future in futures:
            try:
                results[node.name] = future.result()
            except libvirt.libvirtError as err:
                errors.append(VlxError(f"node {node.name}: {error_text(err)}"))
                results[node.name] = errors[-1]
            except Exception as err:
                errors.append(err)
                results[node.name] = err
    if errors and not keep_going:
        raise errors[0]
    return results


def each(items: Sequence[T], work: Callable[[T], object], width: int = 16) -> None:
    """`work(item)` for every item at once, in threads sharing the node's one connection:
    libvirtd serves concurrent calls on one connection with its worker threads, so N VMs of
    a node start in about the time of one. Every item is tried, then the first error raised."""
    if len(items) <= 1:
        for item in items:
            work(item)
        return
    with ThreadPoolExecutor(max_workers=min(width, len(items))) as pool:
        futures = [pool.submit(work, item) for item in items]
    errors = [error for f in futures if (error := f.exception()) is not None]
    if errors:
        raise errors[0]
