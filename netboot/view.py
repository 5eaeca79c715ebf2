"""What `vlx netboot show` shows: the rendered tree, or what one node is handed (its iPXE
script, kernel command line, root volume and the iSCSI login of its cpio, the secret left out
by construction: rendered with `show_secret=False`, never copied and then masked)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from virtualinux.vvcm import Cluster

from . import layout, render, scripts


@dataclasses.dataclass(frozen=True)
class TreeView:
    out: Path                       # where trees live (--out, $VLX_NETBOOT or the default)
    current: Path | None            # OUT/current resolved, None if nothing was rendered there
    tree_generation: int | None
    database_generation: int
    kernel_args: tuple[str, ...]
    files: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class NodeView:
    node: str
    mac: str
    tree: Path | None               # the tree whose kernel arguments were used
    script: str
    cpio: str | None
    root_volume: str | None
    cmdline: str
    iscsi_initramfs: str | None     # without the secret
    ipxe: str


def _manifest(out: Path) -> tuple[Path | None, render.Manifest | None]:
    tree = render.current_tree(out)
    if tree is None or not (tree / layout.MANIFEST).exists():
        return tree, None
    return tree, render.Manifest.load(tree)


def tree_view(cluster: Cluster, out: Path) -> TreeView:
    tree, manifest = _manifest(out)
    return TreeView(
        out=out, current=tree, tree_generation=manifest.generation if manifest else None,
        database_generation=cluster.generation,
        kernel_args=tuple(manifest.kernel_args) if manifest else (),
        files=tuple(sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file()))
        if tree else ())


def node_view(cluster: Cluster, name: str, out: Path) -> NodeView:
    node = cluster.node(name)
    tree, manifest = _manifest(out)
    kernel_args = manifest.kernel_args if manifest else ()
    volume = scripts.root_volume(cluster, node)
    return NodeView(
        node=node.name, mac=node.mac, tree=tree, script=layout.node_script_name(node.mac),
        cpio=layout.node_cpio_name(node.mac) if volume else None,
        root_volume=volume.name if volume else None,
        cmdline=scripts.kernel_cmdline(cluster, node, kernel_args),
        iscsi_initramfs=scripts.iscsi_initramfs(cluster, node, show_secret=False),
        ipxe=scripts.node_script(cluster, node, kernel_args))
