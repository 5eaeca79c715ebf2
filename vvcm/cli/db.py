"""`vlx db`: create the database, import and export the inventory, show the cluster settings."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .. import inventory, secrets_file
from ..db import Database
from ..errors import VlxError
from ..fields import to_mapping
from .common import add_verb, database, plural, print_json, print_table


def register(nouns: argparse._SubParsersAction) -> None:
    parser = nouns.add_parser("db", help="the cluster database",
                              description="Create, import, export and show the cluster database.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    init = add_verb(verbs, "init", cmd_init, help="create an empty database")
    init.add_argument("--force", action="store_true", help="start over if one exists (loses it)")

    imp = add_verb(verbs, "import", cmd_import,
                   help="load a whole cluster from an inventory TOML file")
    imp.add_argument("file", type=Path, help="inventory file (see examples/cluster.toml)")
    imp.add_argument("--replace", action="store_true",
                     help="replace the nodes and VCs the database holds already")
    imp.add_argument("--secrets", type=Path, metavar="FILE",
                     help="CHAP credentials to restore (default: FILE's NAME.secrets.toml "
                          "beside it, if there is one; `db export --with-secrets` writes it)")

    exp = verbs.add_parser(
        "export", help="write the inventory back as TOML",
        description="Write the cluster back as an inventory: settings, nodes, VCs with their "
                    "placement, volumes. Not in it: the CHAP credentials (unless "
                    "--with-secrets), the generation and the change log (an import starts "
                    "them afresh).")
    exp.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    exp.add_argument("--with-secrets", action="store_true",
                     help="also write the CHAP credentials to OUTPUT's NAME.secrets.toml "
                          "(mode 0600), which `db import OUTPUT` restores")
    exp.set_defaults(handler=cmd_export)

    add_verb(verbs, "show", cmd_show, help="cluster settings, networks and generation", json=True)

    log = add_verb(verbs, "log", cmd_log, help="the change log, newest last", json=True)
    log.add_argument("-n", type=int, default=20, help="how many changes (default: 20)")


def cmd_init(args: argparse.Namespace) -> int:
    db = Database.create(args.db, force=args.force)
    print(f"created {db.path} (generation 0)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    parsed = inventory.load(args.file)  # parse fully before touching the database
    secrets = args.secrets or secrets_file.secrets_path(args.file)
    credentials = (secrets_file.read(secrets) if args.secrets or secrets.exists() else None)
    db = database(args)
    if not db.path.exists():
        Database.create(db.path)
    restored = 0

    def replace(cluster):
        nonlocal restored
        if (cluster.nodes or cluster.vcs) and not args.replace:
            raise VlxError(f"{db.path} holds a cluster already ({len(cluster.nodes)} nodes, "
                           f"{len(cluster.vcs)} VCs): --replace to replace it")
        fresh = inventory.apply(cluster, parsed, str(args.file))
        if credentials is not None:
            fresh, restored = secrets_file.restore(fresh, credentials)
        return fresh

    cluster = db.update("db import", str(args.file), replace)
    print(f"imported {args.file}: {plural(len(cluster.nodes), 'node')}, "
          f"{plural(len(cluster.vcs), 'VC')}, {plural(len(cluster.vms), 'VM')} "
          f"(generation {cluster.generation})")
    if credentials is not None:
        print(f"restored {plural(restored, 'CHAP credential')} from {secrets}")
    return 0


NOT_EXPORTED = "the generation and the change log"


def cmd_export(args: argparse.Namespace) -> int:
    cluster = database(args).load()
    text = inventory.dump(cluster)
    if args.with_secrets and not args.output:
        raise VlxError("--with-secrets writes a file beside the inventory: name it with "
                       "-o FILE (secrets are never printed)")
    if not args.output:
        sys.stdout.write(text)
        print(f"vlx: not exported: the CHAP credentials (-o FILE --with-secrets), "
              f"{NOT_EXPORTED}", file=sys.stderr)
        return 0
    tmp = args.output.with_name(args.output.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(args.output)
    print(f"wrote {args.output}: {plural(len(cluster.nodes), 'node')}, "
          f"{plural(len(cluster.vcs), 'VC')}, {plural(len(cluster.volumes), 'volume')} "
          f"(generation {cluster.generation})")
    if args.with_secrets:
        secrets = secrets_file.secrets_path(args.output)
        count = secrets_file.write(cluster, secrets)
        print(f"wrote {secrets} (mode 0600): {plural(count, 'CHAP credential')}; not "
              f"exported: {NOT_EXPORTED}")
    else:
        print(f"not exported: the CHAP credentials (--with-secrets), {NOT_EXPORTED}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    cluster = database(args).load()
    settings = to_mapping(cluster.settings) if cluster.settings else {}
    summary = {**settings, "generation": cluster.generation,
               "networks": list(cluster.networks()), "nodes": len(cluster.nodes),
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
                [[net["name"], net["cidr"],
                  net.get("gateway") or (f"vlan {net['vlan']}" if "vlan" in net
                                         else f"vxlan {net['vxlan']}")]
                 for net in summary["networks"]])
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    changes = database(args).changes(args.n)
    if args.json:
        print_json([change.__dict__ for change in changes])
        return 0
    print_table(["GEN", "TIME", "USER", "ACTION", "DETAIL"],
                [[c.generation, c.time, c.user, c.action, c.detail] for c in changes])
    return 0
