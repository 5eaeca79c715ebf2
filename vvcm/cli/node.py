"""`vlx node`: the physical nodes of the cluster network."""

from __future__ import annotations

import argparse

from .. import changes, host_keys
from ..errors import VlxError
from ..fields import add_arguments, from_arguments, to_mapping
from ..model import Cluster, Node
from ..virt import migrate
from .common import add_verb, database, print_json, print_table


def register(nouns: argparse._SubParsersAction) -> None:
    parser = nouns.add_parser("node", help="physical nodes",
                              description="Add, list, show, drain and remove physical nodes.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    add = verbs.add_parser("add", help="add a node")
    add_arguments(add, Node, positional="name")
    add.set_defaults(handler=cmd_add)

    add_verb(verbs, "list", cmd_list, help="list the nodes", json=True)

    show = add_verb(verbs, "show", cmd_show, help="one node, with the VMs placed on it", json=True)
    show.add_argument("name")

    remove = add_verb(verbs, "remove", cmd_remove, help="remove a node that hosts no VMs")
    remove.add_argument("name")

    keys = add_verb(verbs, "keys", cmd_keys, help="the nodes' SSH host keys, as known_hosts",
                    description="Print a known_hosts line for each node (all, or the NAMEs), "
                                "making the host keys of nodes that have none. Each node gets "
                                "its key from its own boot files and keeps it across reboots "
                                "and re-created snapshots.")
    keys.add_argument("names", nargs="*", metavar="NAME")
    keys.add_argument("--renew", action="store_true",
                      help="replace the keys of the NAMEs (each node takes its new key at its "
                           "next boot)")

    drain = verbs.add_parser("drain", help="live-migrate every VM off a node",
                             description="Move every VM placed on NODE to the node placement "
                                         "chooses for it now, one after another; the "
                                         "database follows each move.")
    drain.add_argument("name")
    drain.set_defaults(handler=cmd_drain)


def node_json(cluster: Cluster, node: Node) -> dict:
    return {**to_mapping(node), "memory_mib": node.memory, "fqdn": cluster.fqdn(node.name),
            "vms": [vm.name for vm in cluster.vms_on(node.name)]}


def cmd_add(args: argparse.Namespace) -> int:
    node = from_arguments(Node, args)
    # Its SSH host key is made with it (host_keys): the node has it from its first boot.
    cluster = database(args).update(
        "node add", node.name,
        lambda cluster: host_keys.with_host_keys(changes.add_node(cluster, node)))
    print(f"added {node.name} {node.mac} {node.ip} (generation {cluster.generation})")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    cluster = database(args).load()
    if args.json:
        print_json([node_json(cluster, node) for node in cluster.nodes])
        return 0
    print_table(["NAME", "MAC", "IP", "CPUS", "MEMORY", "VMS", "ROLES"],
                [[node.name, node.mac, node.ip, node.cpus, to_mapping(node)["memory"],
                  len(cluster.vms_on(node.name)), ",".join(node.roles) or "-"]
                 for node in cluster.nodes])
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    cluster = database(args).load()
    data = node_json(cluster, cluster.node(args.name))
    if args.json:
        print_json(data)
        return 0
    for key, value in data.items():
        shown = ", ".join(map(str, value)) if isinstance(value, list) else value
        print(f"{key + ':':<12}{shown or '-'}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    db = database(args)
    cluster = db.load()
    names = list(dict.fromkeys(args.names)) or [node.name for node in cluster.nodes]
    for name in names:
        cluster.node(name)
    if args.renew and not args.names:
        raise VlxError("--renew needs the NAMEs of the nodes whose keys to replace")
    renew = names if args.renew else ()
    if renew or any(host_keys.seed_of(cluster, node.name) is None for node in cluster.nodes):
        cluster = db.update("node keys", ",".join(renew) or "missing",
                            lambda c: host_keys.with_host_keys(c, renew))
    for line in host_keys.known_hosts(cluster, names):
        print(line)
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    cluster = database(args).update("node remove", args.name,
                                    lambda cluster: changes.remove_node(cluster, args.name))
    print(f"removed {args.name} (generation {cluster.generation})")
    return 0


def cmd_drain(args: argparse.Namespace) -> int:
    moved = migrate.drain(database(args), args.name)
    for move in moved:
        print(f"migrated {move.vm} from {move.source} to {move.target} in {move.seconds:.1f} s")
    print(f"drained {args.name}: {len(moved)} VMs moved")
    return 0
