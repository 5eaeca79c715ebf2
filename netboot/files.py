"""What a TFTP or HTTP request path names: a file of the rendered tree, or a per-node file made
on the fly from the database. One set of path rules for both services.

Path rules (a request that breaks one is refused, never served):
- at most MAX_PATH_LENGTH bytes, no NUL, no control characters;
- one leading "/" means the tree's root (as tftp-hpa -s and dnsmasq do); "\\" counts as "/";
- no ".." component at all, and after resolving symlinks the file must still be inside the
  tree: "/etc/passwd" names the tree's etc/passwd, which does not exist;
- regular files only.
`nodes/MAC.ipxe` and `nodes/MAC.cpio` come from the service's own database generation (so a
node added since the last render boots at once); an unknown MAC is simply not found. A node's
cpio (its CHAP secret) is refused to any address but the node's own.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import stat
from pathlib import Path

from virtualinux.vvcm import Cluster, Node, VlxError

from . import layout, scripts
from .render import Manifest

log = logging.getLogger(__name__)

MAX_PATH_LENGTH = 255
_NODE_FILE = re.compile(rf"{layout.NODE_SCRIPT_DIR}/([0-9a-f]{{2}}(?:-[0-9a-f]{{2}}){{5}})"
                        r"\.(ipxe|cpio)")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class RequestRefused(Exception):
    """The path breaks a rule (traversal, NUL, too long, outside the tree): access violation."""


class FileMissing(Exception):
    """Nothing by that name: file not found."""


@dataclasses.dataclass(frozen=True)
class DiskFile:
    path: str       # resolved, inside the tree
    size: int


@dataclasses.dataclass(frozen=True)
class MemoryFile:
    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)


BootFile = DiskFile | MemoryFile


def clean_path(request: str) -> str:
    """The request as a relative path inside the tree, or RequestRefused."""
    if len(request.encode("utf-8", "surrogateescape")) > MAX_PATH_LENGTH:
        raise RequestRefused("name too long")
    if _CONTROL.search(request):
        raise RequestRefused("control character or NUL in name")
    path = request.replace("\\", "/")
    if path.startswith("/"):
        path = path[1:]
    parts = [part for part in path.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise RequestRefused("'..' in name")
    if path.startswith("/") or not parts:
        raise RequestRefused("not a file name")
    return "/".join(parts)


class BootFiles:
    """Looks request paths up in the tree at `root` (a symlink that render() swaps)."""

    def __init__(self, root: Path, cluster: Cluster):
        self.root = Path(root)
        self.cluster = cluster
        # Per-node files made for (this generation, this tree); known MACs only, so a flood of
        # made-up MACs cannot grow it.
        self._made: dict[str, bytes | None] = {}
        self._made_for_tree = ""

    def reload(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self._made = {}

    def lookup(self, request: str, client: str | None = None) -> BootFile:
        """The file `request` names, for the client at address `client` (None: no check)."""
        relative = clean_path(request)
        tree = os.path.realpath(self.root)
        match = _NODE_FILE.fullmatch(relative)
        if match:
            return self._node_file(tree, match.group(1).replace("-", ":"), match.group(2),
                                   client)
        candidate = os.path.realpath(os.path.join(tree, relative))
        if not candidate.startswith(tree + os.sep):
            raise RequestRefused("resolves outside the netboot tree")
        try:
            info = os.stat(candidate)
        except OSError:
            raise FileMissing(relative) from None
        if not stat.S_ISREG(info.st_mode):
            raise FileMissing(relative)
        return DiskFile(candidate, info.st_size)

    def _node_file(self, tree: str, mac: str, kind: str, client: str | None) -> BootFile:
        node = self.cluster.nodes_by_mac.get(mac)
        if node is None:
            raise FileMissing(f"no node with MAC {mac}")
        if kind == "cpio" and client is not None and client != str(node.ip):
            # The cpio holds the node's CHAP secret: only the address DHCP gives that node
            # may fetch it (the database fixes both, so every replica decides the same).
            raise RequestRefused(f"{node.name}'s iSCSI login goes to {node.ip} only")
        if tree != self._made_for_tree:
            self._made, self._made_for_tree = {}, tree
        key = f"{mac}.{kind}"
        if key not in self._made:
            self._made[key] = self._make(tree, node, kind)
        data = self._made[key]
        if data is None:
            raise FileMissing(f"nothing to hand {node.name} as {kind}")
        return MemoryFile(data)

    def _make(self, tree: str, node: Node, kind: str) -> bytes | None:
        try:
            if kind == "cpio":
                return scripts.node_cpio(self.cluster, node)
            return scripts.node_script(self.cluster, node, Manifest.load(Path(tree)).kernel_args
                                       ).encode()
        except (OSError, ValueError, KeyError) as err:
            log.warning("no netboot tree at %s to make %s's script from: %s", tree, node.name,
                        err)
        except VlxError as err:
            log.warning("cannot make %s's boot files: %s", node.name, err)
        return None
