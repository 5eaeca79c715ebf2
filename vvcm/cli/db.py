"""`vlx db`: create the database, import and export the inventory, show the cluster settings."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import inventory
from ..db import Database
from ..errors import VlxError
from ..fields import to_mapping
from .common import add_json_flag, database, print_json, print_table


def register(nouns: argparse._SubParsersAction) -> None:
    parser = nouns.add_parser("db", help="the cluster database",
                              description="Create, import, export and show the cluster database.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    init = verbs.add_parser("init", help="create an empty database")
    init.add_argument("--force", action="store_true", help="start over if one exists (loses it)")
    init.set_defaults(handler=cmd_init)

    imp = verbs.add_parser("import", help="load a whole cluster from an inventory TOML file")
    imp.add_argument("file", type=Path, help="inventory file (see examples/cluster.toml)")
    imp.add_argument("--replace", action="store_true",
                     help="replace the nodes and VCs the database holds already")
    imp.set_defaults(handler=cmd_import)

    exp = verbs.add_parser("export", help="write the inventory back as TOML")
    exp.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    exp.set_defaults(handler=cmd_export)

    show = verbs.add_parser("show", help="cluster settings, networks and generation")
    add_json_flag(show)
    show.set_defaults(handler=cmd_show)

    log = verbs.add_parser("log", help="the change log, newest last")
    log.add_argument("-n", type=int, default=20, help="how many changes (default: 20)")
    add_json_flag(log)
    log.set_defaults(handler=cmd_log)


def cmd_init(args: argparse.Namespace) -> int:
    db = Database.create(args.db, force=args.force)
    print(f"created {db.path} (generation 0)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    parsed = inventory.load(args.file)  # parse fully before touching the database
    db = database(args)
    if not db.path.exists():
        Database.create(db.path)

    def replace(cluster):
        if (cluster.nodes or cluster.vcs) and not args.replace:
            raise VlxError(f"{db.path} holds a cluster already ({len(cluster.nodes)} nodes, "
                           f"{len(cluster.vcs)} VCs): --replace to replace it")
        return inventory.apply(cluster, parsed, str(args.file))

    cluster = db.update("db import", str(args.file), replace)
    print(f"imported {args.file}: {len(cluster.nodes)} nodes, {len(cluster.vcs)} VCs, "
          f"{len(cluster.vms)} VMs (generation {cluster.generation})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    text = inventory.dump(database(args).load())
    if args.output:
        tmp = args.output.with_name(args.output.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(args.output)
    else:
        sys.stdout.write(text)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    cluster = database(args).load()
    settings = to_mapping(cluster.settings) if cluster.settings else {}
    summary = {**settings, "generation": cluster.generation,
               "networks": [net.to_json() for net in cluster.networks()],
               "nodes": len(cluster.nodes),
               "vcs": len(cluster.vcs), "vms": len(cluster.vms),
               "volumes": len(cluster.volumes)}
    if args.json:
        print_json(summary)
        return 0
    for key, value in summary.items():
        if key == "networks":
            continue
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        print(f"{key + ':':<19}{shown}")
    print()
    print_table(["NETWORK", "CIDR", "GATEWAY/ID"],
                [[net.name, net.cidr,
                  net.gateway or (f"vlan {net.vlan}" if net.vlan is not None
                                  else f"vxlan {net.vxlan}")]
                 for net in cluster.networks()])
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    changes = database(args).changes(args.n)
    if args.json:
        print_json([change.__dict__ for change in changes])
        return 0
    print_table(["GEN", "TIME", "USER", "ACTION", "DETAIL"],
                [[c.generation, c.time, c.user, c.action, c.detail] for c in changes])
    return 0
