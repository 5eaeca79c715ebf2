"""`vlx netboot`: render the netboot tree for the database's generation, and show what a node
is handed (its iPXE script, kernel command line, iSCSI login without the secret)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from virtualinux.netboot import render, view

from ..errors import VlxError
from .common import add_verb, database, print_json

OUT_HELP = ("where trees live; OUT/current is served (default: $VLX_NETBOOT or "
            f"{render.DEFAULT_OUT})")


def register(nouns: argparse._SubParsersAction) -> None:
    parser = nouns.add_parser("netboot", help="the netboot tree booting nodes are handed",
                              description="Render the netboot tree (iPXE binaries, scripts, "
                                          "kernel and initrd) and show what a node is handed.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    draw = add_verb(verbs, "render", cmd_render,
                    help="render the tree for the current generation", json=True)
    draw.add_argument("--image", required=True, type=Path, metavar="DIR",
                      help="boot image directory holding vmlinuz and initrd.img "
                           "(vlx image build tiny|node makes one)")
    draw.add_argument("--out", type=Path, metavar="DIR", help=OUT_HELP)
    draw.add_argument("--kernel-arg", action="append", default=[], metavar="ARG",
                      help="one more kernel argument for every node, e.g. console=ttyS0 "
                           "(default: the cluster setting kernel_args)")
    draw.add_argument("--ipxe-dir", type=Path, default=render.IPXE_DIR, metavar="DIR",
                      help="where Debian's ipxe package put its binaries")

    show = add_verb(verbs, "show", cmd_show,
                    help="what a node is handed (or the tree, without NODE)", json=True)
    show.add_argument("node", nargs="?", help="node name")
    show.add_argument("--out", type=Path, metavar="DIR", help=OUT_HELP)


def cmd_render(args: argparse.Namespace) -> int:
    cluster = database(args).load()
    if cluster.settings is None:
        raise VlxError("the database has no cluster yet (vlx db import FILE first)")
    out = args.out or render.default_out()
    # The database's kernel_args unless the command line names others: every node renders its
    # own tree with the database's, so the trees agree.
    kernel_args = args.kernel_arg or cluster.settings.kernel_args
    rendered = render.render(cluster, args.image, out, kernel_args, args.ipxe_dir)
    if args.json:
        print_json({"tree": str(rendered.root), "current": str(out / render.CURRENT),
                    "generation": rendered.generation, "changed": rendered.changed,
                    "files": list(rendered.files)})
        return 0
    state = "now current" if rendered.changed else "unchanged, already current"
    print(f"rendered {rendered.root} for generation {rendered.generation} "
          f"({len(rendered.files)} files, {state})")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    cluster = database(args).load()
    out = args.out or render.default_out()
    if args.node is None:
        tree = view.tree_view(cluster, out)
        if args.json:
            print_json(dataclasses.asdict(tree))
            return 0
        for key, value in dataclasses.asdict(tree).items():
            shown = "\n  ".join(value) if key == "files" else value
            print(f"{key}: {shown if shown not in (None, '', (), []) else '-'}")
        if tree.current is None:
            print(f"(nothing rendered in {out}: `vlx netboot render --out {out}` makes it)")
        return 0
    node = view.node_view(cluster, args.node, out)
    if args.json:
        print_json(dataclasses.asdict(node))
        return 0
    for key in ("node", "mac", "tree", "script", "cpio", "root_volume", "cmdline"):
        value = getattr(node, key)
        if key == "tree" and value is None:
            value = f"none in {out}: kernel arguments of a render are not included"
        print(f"{key + ':':<13}{value or '-'}")
    if node.iscsi_initramfs:
        print(f"\n# {node.cpio}: etc/iscsi.initramfs\n{node.iscsi_initramfs}", end="")
    print(f"\n# {node.script}\n{node.ipxe}", end="")
    return 0
