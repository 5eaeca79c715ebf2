"""`vlx vc`: virtual clusters, their VMs and where the VMs are placed."""

from __future__ import annotations

import argparse
from pathlib import Path

from virtualinux.storage import backup as vc_backup
from virtualinux.storage import volumes

from .. import changes
from ..fields import add_arguments, from_arguments, to_mapping
from ..model import Cluster, VirtualCluster
from .common import (
    ProgressLine,
    add_verb,
    database,
    plural,
    print_json,
    print_table,
    warn,
)
from .volume import print_removed


def register(nouns: argparse._SubParsersAction) -> None:
    parser = nouns.add_parser("vc", help="virtual clusters",
                              description="Define, list, show and remove virtual clusters.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    define = verbs.add_parser("define", help="define a VC and place its VMs on nodes")
    add_arguments(define, VirtualCluster, positional="name")
    define.set_defaults(handler=cmd_define)

    add_verb(verbs, "list", cmd_list, help="list the VCs with their VMs", json=True)

    show = add_verb(verbs, "show", cmd_show, help="one VC and its VMs", json=True)
    show.add_argument("name")

    remove = add_verb(verbs, "remove", cmd_remove, help="remove a VC and its VMs")
    remove.add_argument("name")
    remove.add_argument("--volumes", action="store_true",
                        help="remove the VMs' volumes too (refused while one is exported); "
                             "without it a VC that has volumes is refused")

    backup = verbs.add_parser("backup", help="save a VC: its volumes (sparse, checksummed) "
                                             "and its database rows, to a new directory")
    backup.add_argument("name")
    backup.add_argument("directory", type=Path)
    backup.set_defaults(handler=cmd_backup)

    restore = verbs.add_parser("restore", help="recreate a VC from a backup directory "
                                               "(checksums verified first)")
    restore.add_argument("directory", type=Path)
    restore.set_defaults(handler=cmd_restore)


def vc_json(cluster: Cluster, vc: VirtualCluster) -> dict:
    # "vms" is the list here (scripts want the VMs); the count is "vm_count".
    return {**to_mapping(vc), "memory_mib": vc.memory, "vm_count": vc.vms,
            "vms": [{"name": vm.name, "node": vm.node, "mac": vm.mac, "ip": str(vm.ip),
                         "fqdn": cluster.fqdn(vm.name), "volume": vm.volume}
                        for vm in cluster.vms_of(vc.name)]}


def cmd_define(args: argparse.Namespace) -> int:
    vc = from_arguments(VirtualCluster, args)
    cluster = database(args).update("vc define", vc.name,
                                    lambda cluster: changes.define_vc(cluster, vc))
    placed = ", ".join(f"{vm.name}@{vm.node}" for vm in cluster.vms_of(vc.name))
    print(f"defined {vc.name}: {placed} (generation {cluster.generation})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    cluster = database(args).load()
    if args.json:
        print_json([vc_json(cluster, vc) for vc in cluster.vcs])
        return 0
    rows = []
    for vc in cluster.vcs:
        network = f"vlan {vc.vlan}" if vc.vlan is not None else f"vxlan {vc.vxlan}"
        placement = " ".join(f"{vm.name}@{vm.node}" for vm in cluster.vms_of(vc.name))
        rows.append([vc.name, f"{vc.vms} x {vc.vcpus} VCPU", to_mapping(vc)["memory"],
                     vc.cidr, network, placement])
    print_table(["VC", "VMS", "MEMORY", "NETWORK", "ID", "PLACEMENT"], rows)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    cluster = database(args).load()
    data = vc_json(cluster, cluster.vc(args.name))
    if args.json:
        print_json(data)
        return 0
    vms = data.pop("vms")
    for key, value in data.items():
        print(f"{key + ':':<12}{value}")
    print()
    print_table(["VM", "NODE", "MAC", "IP", "VOLUME"],
                [[vm["name"], vm["node"], vm["mac"], vm["ip"], vm["volume"] or "-"]
                 for vm in vms])
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    db = database(args)
    if args.volumes:
        names = volumes.removal_names(db.load(), (), owners=f"vc:{args.name}")
        if names:
            print_removed(volumes.remove(db, names))
    cluster = db.update("vc remove", args.name,
                        lambda cluster: changes.remove_vc(cluster, args.name))
    print(f"removed {args.name} (generation {cluster.generation})")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    manifest = vc_backup.backup_vc(database(args), args.name, args.directory,
                                   progress=ProgressLine(), warn=warn)
    print(f"backed up {args.name}: {plural(len(manifest['vms']), 'VM')}, "
          f"{plural(len(manifest['volumes']), 'volume')} to {args.directory}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    vc = vc_backup.restore_vc(database(args), args.directory)
    print(f"restored {vc.name} from {args.directory}")
    return 0
