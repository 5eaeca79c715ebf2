"""`vlx netboot`: render the netboot tree for the database's generation, and show what a node
is handed (its iPXE script, kernel command line, iSCSI login without the secret)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import VlxError
from .common import add_json_flag, database, print_json

DEFAULT_OUT = Path("/var/lib/virtualinux/netboot")   # the daemon serves OUT/current


def register(nouns: argparse._SubParsersAction) -> None:
    parser = nouns.add_parser("netboot", help="the netboot tree booting nodes are handed",
                              description="Render the netboot tree (iPXE binaries, scripts, "
                                          "kernel and initrd) and show what a node is handed.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    render = verbs.add_parser("render", help="render the tree for the current generation")
    render.add_argument("--image", required=True, type=Path, metavar="DIR",
                        help="boot image directory holding vmlinuz and initrd.img "
                             "(vlx image build tiny|node makes one)")
    render.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                        help=f"where trees live; OUT/current is served (default {DEFAULT_OUT})")
    render.add_argument("--kernel-arg", action="append", default=[], metavar="ARG",
                        help="one more kernel argument for every node, e.g. console=ttyS0")
    render.add_argument("--ipxe-dir", type=Path, default=Path("/usr/lib/ipxe"), metavar="DIR",
                        help="where Debian's ipxe package put its binaries")
    add_json_flag(render)
    render.set_defaults(handler=cmd_render)

    show = verbs.add_parser("show", help="what a node is handed (or the tree, without NODE)")
    show.add_argument("node", nargs="?", help="node name")
    show.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="DIR",
                      help="the rendered trees, for their kernel arguments")
    add_json_flag(show)
    show.set_defaults(handler=cmd_show)


def cmd_render(args: argparse.Namespace) -> int:
    from virtualinux.netboot import render

    cluster = database(args).load()
    if cluster.settings is None:
        raise VlxError("the database has no cluster yet (vlx db import FILE first)")
    rendered = render.render(cluster, args.image, args.out, args.kernel_arg, args.ipxe_dir)
    if args.json:
        print_json({"tree": str(rendered.root), "current": str(args.out / render.CURRENT),
                    "generation": rendered.generation, "changed": rendered.changed,
                    "files": list(rendered.files)})
        return 0
    state = "now current" if rendered.changed else "unchanged, already current"
    print(f"rendered {rendered.root} for generation {rendered.generation} "
          f"({len(rendered.files)} files, {state})")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from virtualinux.netboot import layout, render, scripts

    cluster = database(args).load()
    tree = render.current_tree(args.out)
    manifest = render.Manifest.load(tree) if tree and (tree / layout.MANIFEST).exists() else None
    kernel_args = manifest.kernel_args if manifest else ()
    if args.node is None:
        data: dict[str, Any] = {"current": str(tree) if tree else None,
                "tree_generation": manifest.generation if manifest else None,
                "database_generation": cluster.generation,
                "kernel_args": list(kernel_args),
                "files": sorted(str(p.relative_to(tree)) for p in tree.rglob("*")
                                if p.is_file()) if tree else []}
        if args.json:
            print_json(data)
        else:
            for key, value in data.items():
                shown = "\n  ".join(value) if key == "files" else value
                print(f"{key}: {shown if shown not in (None, '', []) else '-'}")
        return 0
    node = cluster.node(args.node)
    volume = scripts.root_volume(cluster, node)
    login = scripts.iscsi_initramfs(cluster, node)
    if login:
        login = "".join("ISCSI_PASSWORD=(secret, not shown)\n"
                        if line.startswith("ISCSI_PASSWORD=") else line
                        for line in login.splitlines(True))
    data = {"node": node.name, "mac": node.mac,
            "script": layout.node_script_name(node.mac),
            "cmdline": scripts.kernel_cmdline(cluster, node, kernel_args),
            "root_volume": volume.name if volume else None,
            "cpio": layout.node_cpio_name(node.mac) if volume else None,
            "iscsi_initramfs": login,
            "ipxe": scripts.node_script(cluster, node, kernel_args)}
    if args.json:
        print_json(data)
        return 0
    for key in ("node", "mac", "script", "cpio", "root_volume", "cmdline"):
        print(f"{key + ':':<13}{data[key] or '-'}")
    if login:
        print(f"\n# {layout.node_cpio_name(node.mac)}: etc/iscsi.initramfs\n{login}", end="")
    print(f"\n# {data['script']}\n{data['ipxe']}", end="")
    return 0
