"""`vlx vc`: virtual clusters, their VMs and where the VMs are placed, and running them on
libvirt (create, start, stop, destroy, status, migrate). The work is done by
`virtualinux.vvcm.virt` and `virtualinux.storage`; this module parses and prints."""

from __future__ import annotations

import argparse
from pathlib import Path

from virtualinux.storage import backup as vc_backup
from virtualinux.storage import naming, volumes

from .. import changes
from ..db import Database
from ..errors import VlxError
from ..fields import add_arguments, from_arguments, to_mapping
from ..model import Cluster, VirtualCluster
from ..virt import lifecycle, migrate
from .common import (
    ProgressLine,
    add_json_flag,
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

    create = verbs.add_parser("create", help="make the VC's disks, network and domains",
                              description="One snapshot disk per VM, the VC's network on "
                                          "every node that hosts one of its VMs, a libvirt "
                                          "domain per VM on its node. Idempotent: a second "
                                          "run completes a first; a failed run undoes itself.")
    create.add_argument("name")
    create.add_argument("--export", action="store_true",
                        help="export the new disks over iSCSI (from the first storage node "
                             "unless --portal): the VMs log in to them with CHAP")
    create.add_argument("--portal", metavar="IP[:PORT]",
                        help="the iSCSI portal to export the new disks from (implies --export)")
    create.set_defaults(handler=cmd_create)

    start = verbs.add_parser("start", help="start every VM of the VC (all nodes at once)")
    start.add_argument("name")
    start.set_defaults(handler=cmd_start)

    stop = verbs.add_parser("stop", help="shut every VM of the VC down (all nodes at once)")
    stop.add_argument("name")
    stop.add_argument("--force", action="store_true", help="pull the plug, no ACPI shutdown")
    stop.add_argument("--timeout", type=float, default=lifecycle.STOP_TIMEOUT, metavar="S",
                      help="seconds to wait for a shutdown before pulling the plug "
                           "(default: %(default)g)")
    stop.set_defaults(handler=cmd_stop)

    destroy = verbs.add_parser("destroy", help="remove the VC's domains, network and disks "
                                               "(the VC stays defined)")
    destroy.add_argument("name")
    destroy.add_argument("--keep-volumes", action="store_true", help="keep the VMs' disks")
    destroy.set_defaults(handler=cmd_destroy)

    status = verbs.add_parser("status", help="VMs of one or every VC: node, state, address, "
                                             "CPU time")
    status.add_argument("name", nargs="?")
    add_json_flag(status)
    status.set_defaults(handler=cmd_status)

    move = verbs.add_parser("migrate", help="live-migrate a VM to another node")
    move.add_argument("name")
    move.add_argument("vm")
    move.add_argument("--to", required=True, metavar="NODE", help="the node to move it to")
    move.set_defaults(handler=cmd_migrate)

    backup = verbs.add_parser("backup", help="save a VC: its volumes (sparse, checksummed) "
                                             "and its database rows, to a new directory")
    backup.add_argument("name")
    backup.add_argument("directory", type=Path)
    backup.add_argument("--live", action="store_true",
                        help="back up running VMs with libvirt backup jobs while they run")
    backup.add_argument("--since", type=Path, metavar="DIR",
                        help="incremental: only what changed since the live backup in DIR "
                             "(implies --live)")
    backup.set_defaults(handler=cmd_backup)

    restore = verbs.add_parser("restore", help="recreate a VC from a backup directory "
                                               "(checksums verified first)")
    restore.add_argument("directory", type=Path)
    restore.add_argument("--as", dest="new_name", metavar="NAME",
                         help="restore beside the original under another name (fresh VXLAN "
                              "id, VMs and volumes renamed)")
    restore.add_argument("--cidr", metavar="CIDR",
                         help="with --as: the new VC's network (the original's overlaps it "
                              "while both exist)")
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


def storage_disks(db: Database, export: bool = False,
                  portal: str | None = None) -> lifecycle.Disks:
    """What the VC life cycle needs of storage, bound to this database: making disks (exported
    over iSCSI if asked), removing them, and the initiator name a VM logs in with."""
    def make(vc: VirtualCluster, vm_names: list[str]) -> list[str]:
        made = volumes.snapshot_volumes(db, vc.image, owners=",".join(vm_names),
                                        export=export, portal=portal)
        return [volume.name for volume in made]

    def remove(names: list[str]) -> object:
        cluster = db.load()
        exported = [name for name in names if cluster.volume(name).iqn]
        if exported:
            # Called once the VMs' domains are gone (destroy, a failed create): a session
            # still on the target is a killed QEMU's, stale, so it may go.
            volumes.unexport(db, exported, force=True)
        return volumes.remove(db, names)

    return lifecycle.Disks(make=make, remove=remove, initiator=naming.initiator_iqn)


def cmd_create(args: argparse.Namespace) -> int:
    db = database(args)
    cluster = lifecycle.create(db, args.name, storage_disks(db, args.export, args.portal))
    placed = ", ".join(f"{vm.name}@{vm.node}" for vm in cluster.vms_of(args.name))
    print(f"created {args.name}: {placed}")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    started = lifecycle.start(database(args), args.name)
    print(f"started {len(started)} VMs of {args.name}" +
          (f": {', '.join(started)}" if started else " (all were running)"))
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    stopped = lifecycle.stop(database(args), args.name, args.force, args.timeout)
    print(f"stopped {len(stopped)} VMs of {args.name}" +
          (f": {', '.join(stopped)}" if stopped else " (none was running)"))
    return 0


def cmd_destroy(args: argparse.Namespace) -> int:
    db = database(args)
    lifecycle.destroy(db, args.name, storage_disks(db), args.keep_volumes)
    kept = " (volumes kept)" if args.keep_volumes else ""
    print(f"destroyed {args.name}: domains, network{'' if kept else ' and volumes'} removed"
          f"{kept}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cluster = database(args).load()
    names = [args.name] if args.name else [vc.name for vc in cluster.vcs]
    rows = lifecycle.status(cluster, names)
    if args.json:
        print_json([vars(row) for row in rows])
        return 0
    print_table(["VM", "VC", "NODE", "STATE", "ADDRESS", "CPU"],
                [[r.vm, r.vc, r.node, r.state, r.ip,
                  "-" if r.cpu_seconds is None else f"{r.cpu_seconds:.1f}s"] for r in rows])
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    result = migrate.migrate(database(args), args.name, args.vm, args.to)
    downtime = f", downtime {result.downtime_ms} ms" if result.downtime_ms is not None else ""
    print(f"migrated {result.vm} from {result.source} to {result.target} in "
          f"{result.seconds:.1f} s{downtime}")
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    manifest = vc_backup.backup_vc(database(args), args.name, args.directory, args.live,
                                   args.since, progress=ProgressLine(), warn=warn)
    live = sum(1 for entry in manifest["volumes"] if entry["image"] == "qcow2")
    how = f" ({live} live{', incremental' if args.since else ''})" if live else ""
    print(f"backed up {args.name}: {plural(len(manifest['vms']), 'VM')}, "
          f"{plural(len(manifest['volumes']), 'volume')}{how} to {args.directory}")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    if args.cidr and not args.new_name:
        raise VlxError("--cidr goes with --as NAME (a restore under its own name keeps its "
                       "network)")
    vc = vc_backup.restore_vc(database(args), args.directory, args.new_name, args.cidr)
    print(f"restored {vc.name} from {args.directory}")
    return 0
