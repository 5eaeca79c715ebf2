"""`vlx volume`: golden volumes, copy-on-write snapshots of them for nodes and VMs, and their
iSCSI exports. The work is done by `virtualinux.storage.volumes`; this module parses and prints.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from virtualinux.storage import tgt, volumes
from virtualinux.storage.backend import BACKENDS
from virtualinux.storage.naming import format_size, initiator_iqn, parse_size

from ..fields import to_mapping
from ..model import Cluster, Volume
from .common import (
    add_verb,
    database,
    name_range,
    plural,
    print_json,
    print_table,
    warn,
)


def register(nouns: argparse._SubParsersAction) -> None:
    parser = nouns.add_parser(
        "volume", help="golden and snapshot volumes",
        description="Golden volumes, copy-on-write snapshots of them named after the nodes "
                    "or VMs they belong to, and their iSCSI exports.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    golden = verbs.add_parser("golden", help="golden volumes").add_subparsers(
        dest="golden_verb", metavar="VERB", required=True)
    add = golden.add_parser("add", help="store a raw disk image as a golden volume")
    add.add_argument("name")
    add.add_argument("--from", dest="image", required=True, type=Path, metavar="IMAGE",
                     help="raw disk image")
    add.add_argument("--backend", choices=BACKENDS, default="reflink",
                     help="storage backend (default: reflink)")
    add.add_argument("--pool", help="directory (reflink, qcow2) or VG/THINPOOL (lvm-thin); "
                                    "default: $VLX_POOL or " + volumes.DEFAULT_POOL)
    add.set_defaults(handler=cmd_golden_add)

    snap = verbs.add_parser(
        "snapshot", help="copy-on-write snapshots of a golden volume, one per node or VM",
        description="Snapshot GOLDEN once per node or VM, named OWNER-root (nodes) or "
                    "OWNER-disk (VMs). All are made or none.")
    snap.add_argument("golden")
    snap.add_argument("--count", type=int, metavar="N",
                      help="the first N owners (nodes unless --for) without a snapshot of it")
    snap.add_argument("--for", dest="owners", metavar="WHO",
                      help="nodes, vms, vc:NAME, or NAME,NAME,... of nodes or VMs")
    snap.add_argument("--suffix", help="name suffix (default: root for nodes, disk for VMs)")
    _export_flags(snap)
    snap.set_defaults(handler=cmd_snapshot)

    add_verb(verbs, "list", cmd_list, help="list the volumes", json=True)

    show = add_verb(verbs, "show", cmd_show, help="one volume with its export", json=True)
    show.add_argument("name")

    remove = add_verb(verbs, "remove", cmd_remove, help="remove volumes that are not exported")
    remove.add_argument("names", nargs="*", metavar="NAME")
    remove.add_argument("--snapshots-of", metavar="GOLDEN",
                        help="also every snapshot of GOLDEN")
    remove.add_argument("--for", dest="owners", metavar="WHO",
                        help="also every volume of these owners: nodes, vms, vc:NAME, or "
                             "NAME,NAME,... of nodes or VMs")

    grow = add_verb(verbs, "grow", cmd_grow, help="make a volume bigger")
    grow.add_argument("name")
    grow.add_argument("size", help="new size (2GiB) or growth (+512MiB)")

    export = add_verb(verbs, "export", cmd_export, help="export volumes over iSCSI")
    export.add_argument("names", nargs="+", metavar="NAME")
    export.add_argument("--portal", metavar="IP[:PORT]",
                        help="iSCSI portal (default: the first storage node, port 3260)")

    unexport = add_verb(verbs, "unexport", cmd_unexport, help="stop exporting volumes")
    unexport.add_argument("names", nargs="+", metavar="NAME")
    unexport.add_argument("--force", action="store_true",
                          help="even if an initiator is logged in (it loses its disk)")


def _export_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--export", action="store_true",
                        help="export them over iSCSI (to the first storage node)")
    parser.add_argument("--portal", metavar="IP[:PORT]",
                        help="export them on this iSCSI portal (implies --export)")


def volume_json(cluster: Cluster, volume: Volume) -> dict:
    data = to_mapping(volume)
    if volume.iqn and volume.owner and cluster.settings:
        credential = cluster.credential(volume.owner)
        data["initiator"] = initiator_iqn(cluster.settings.name, volume.owner)
        data["chap_user"] = credential.username if credential else None
    data["snapshots"] = sum(1 for v in cluster.volumes if v.origin == volume.name)
    return data


def cmd_golden_add(args: argparse.Namespace) -> int:
    volume = volumes.add_golden(database(args), args.name, args.image, args.backend,
                                args.pool or volumes.default_pool())
    print(f"added golden volume {volume.name}: {format_size(volume.size)} at {volume.path}")
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    made = volumes.snapshot_volumes(database(args), args.golden, args.count, args.owners,
                                    args.suffix, args.portal, args.export)
    where = f", exported on {made[0].portal}" if made[0].portal else ""
    print(f"made {plural(len(made), 'snapshot')} of {args.golden}: "
          f"{name_range([v.name for v in made])}{where}")
    _say_if_unserved(made)
    return 0


def _say_if_unserved(changed: list[Volume]) -> None:
    """An export change on a portal no tgtd serves is only recorded: say so, and what serves it."""
    for portal in sorted({v.portal for v in changed if v.portal}):
        if tgt.recorded_daemon(portal) is None:
            print(f"no tgtd serves {portal} yet: the export is recorded; `vlx storage serve "
                  f"--portal {portal}` serves it")


def cmd_list(args: argparse.Namespace) -> int:
    cluster = database(args).load()
    if args.json:
        print_json([volume_json(cluster, volume) for volume in cluster.volumes])
        return 0
    print_table(["NAME", "KIND", "BACKEND", "SIZE", "ORIGIN", "OWNER", "EXPORT"],
                [[v.name, v.kind, v.backend, format_size(v.size), v.origin or "-",
                  v.owner or "-", v.portal or "-"] for v in cluster.volumes])
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    cluster = database(args).load()
    data = volume_json(cluster, cluster.volume(args.name))
    if args.json:
        print_json(data)
        return 0
    data["size"] = format_size(data["size"])   # as `list` shows it; --json keeps bytes
    for key, value in data.items():
        print(f"{key + ':':<12}{value if value is not None else '-'}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    db = database(args)
    names = volumes.removal_names(db.load(), args.names, args.snapshots_of, args.owners)
    if not names:
        print("no volume matches: nothing to remove")
        return 0
    print_removed(volumes.remove(db, names))
    return 0


def print_removed(gone: list[Volume]) -> None:
    print(f"removed {plural(len(gone), 'volume')}: {', '.join(v.name for v in gone[:10])}"
          f"{' ...' if len(gone) > 10 else ''}")


def cmd_grow(args: argparse.Namespace) -> int:
    db = database(args)
    current = db.load().volume(args.name)
    size = parse_size(args.size, current.size)
    caution = volumes.grow_warning(current, size)
    grown = volumes.grow(db, args.name, size)
    if caution:
        warn(caution)
    print(f"{grown.name} is {format_size(grown.size)}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    done = volumes.export(database(args), args.names, args.portal)
    for volume in done:
        print(f"exported {volume.name} as {volume.iqn} on {volume.portal}")
    _say_if_unserved(done)
    return 0


def cmd_unexport(args: argparse.Namespace) -> int:
    done = volumes.unexport(database(args), args.names, args.force)
    print(f"unexported {', '.join(v.name for v in done)}")
    return 0
