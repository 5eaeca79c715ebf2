"""`vlx db`: create the database, import and export the inventory, show the cluster settings;
migrate it between stores; run and list the etcd members of a replicated store."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import os
import shutil
import sys
import urllib.parse
from pathlib import Path

from .. import etcd_member, inventory, secrets_file
from ..db import Database, default_path
from ..errors import VlxError
from ..fields import to_mapping
from ..model import Settings
from ..store import parse_url
from .common import add_json_flag, add_verb, database, plural, print_json, print_table


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
                     help="secrets (CHAP logins, SSH host keys) to restore (default: "
                          "FILE's NAME.secrets.toml beside it, if there is one; `db export "
                          "--with-secrets` writes it)")

    exp = verbs.add_parser(
        "export", help="write the inventory back as TOML",
        description="Write the cluster back as an inventory: settings, nodes, VCs with their "
                    "placement, volumes. Not in it: the secrets, CHAP logins and SSH host "
                    "keys (unless --with-secrets), the generation and the change log (an "
                    "import starts them afresh).")
    exp.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    exp.add_argument("--with-secrets", action="store_true",
                     help="also write the secrets (CHAP logins, SSH host keys) to OUTPUT's "
                          "NAME.secrets.toml (mode 0600), which `db import OUTPUT` restores")
    exp.set_defaults(handler=cmd_export)

    add_verb(verbs, "show", cmd_show, help="cluster settings, networks and generation", json=True)

    migrate = verbs.add_parser(
        "migrate", help="copy the database into an empty store, log and generation included",
        description="Copy this database (--db/--store) into the empty store URL names, with "
                    "its generation and whole change log: sqlite -> etcd, or back.")
    migrate.add_argument("--to", required=True, metavar="URL",
                         help="sqlite:PATH or etcd://HOST:PORT[,HOST:PORT...]")
    migrate.set_defaults(handler=cmd_migrate)

    serve = verbs.add_parser(
        "serve", help="run one etcd member of the replicated store (replaces this process)",
        description="Start one etcd member (Debian's etcd-server) for the replicated store. "
                    "Raft timing comes from the cluster settings store_heartbeat_ms and "
                    "store_election_ms (of the local copy --db, if there is one), unless "
                    "given here.")
    serve.add_argument("--name", required=True, help="member name (e.g. the node's name)")
    serve.add_argument("--listen", required=True, type=ipaddress.IPv4Address, metavar="IP",
                       help="this member's address (clients on :2379, peers on :2380)")
    serve.add_argument("--initial-cluster", metavar="NAME=URL,...", default="",
                       help="every member's peer URL, NAME=http://IP:2380,... (default: this "
                            "member alone)")
    serve.add_argument("--join", action="store_true",
                       help="join a running cluster (after `vlx db member add`)")
    serve.add_argument("--data-dir", type=Path, metavar="DIR",
                       help=f"etcd's data (default: {etcd_member.DATA_ROOT}/NAME)")
    serve.add_argument("--heartbeat-ms", type=int, metavar="MS")
    serve.add_argument("--election-ms", type=int, metavar="MS")
    serve.add_argument("--tls", type=Path, metavar="DIR",
                       help="ca.crt, NAME.crt, NAME.key from `vlx db tls member`: TLS for "
                            "clients and peers, certificates of the cluster CA required")
    serve.add_argument("--print", action="store_true", help="print the etcd command, do not run")
    serve.set_defaults(handler=cmd_serve)

    member = verbs.add_parser("member", help="members of the replicated store (etcd)")
    member_verbs = member.add_subparsers(dest="member_verb", metavar="VERB", required=True)
    listing = member_verbs.add_parser("list", help="the members and their URLs")
    add_json_flag(listing)
    listing.set_defaults(handler=cmd_member_list)
    adding = member_verbs.add_parser("add", help="announce a new member, then start it with "
                                                 "`vlx db serve ... --join`")
    adding.add_argument("name")
    adding.add_argument("--peer-url", required=True, metavar="URL",
                        help="its peer URL, http://IP:2380")
    adding.set_defaults(handler=cmd_member_add)
    removing = member_verbs.add_parser("remove", help="remove a member by name")
    removing.add_argument("name")
    removing.set_defaults(handler=cmd_member_remove)

    tls = verbs.add_parser("tls", help="the store's cluster CA and its certificates",
                           description="The cluster CA lives in the database's secret part; "
                                       "these make it and the certificates etcd members and "
                                       "clients use (TLS for all store traffic).")
    tls_verbs = tls.add_subparsers(dest="tls_verb", metavar="VERB", required=True)
    tls_init = tls_verbs.add_parser("init", help="make the cluster CA (once)")
    tls_init.set_defaults(handler=cmd_tls_init)
    tls_member = tls_verbs.add_parser("member", help="a member's certificate (server+client)")
    tls_member.add_argument("name")
    tls_member.add_argument("--ip", required=True, type=ipaddress.IPv4Address, action="append",
                            help="an address the member answers on (repeat for more)")
    tls_member.add_argument("--out", required=True, type=Path, metavar="DIR")
    tls_member.set_defaults(handler=cmd_tls_member)
    tls_client = tls_verbs.add_parser("client", help="a client certificate for vlx and the "
                                                     "replicas (VLX_STORE_TLS=DIR)")
    tls_client.add_argument("--out", required=True, type=Path, metavar="DIR")
    tls_client.set_defaults(handler=cmd_tls_client)

    log = add_verb(verbs, "log", cmd_log, help="the change log, newest last", json=True)
    log.add_argument("-n", type=int, default=20, help="how many changes (default: 20)")


def cmd_init(args: argparse.Namespace) -> int:
    db = database(args)
    db.backend.create(args.force)
    print(f"created {db.name} (generation 0)")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    parsed = inventory.load(args.file)  # parse fully before touching the database
    secrets = args.secrets or secrets_file.secrets_path(args.file)
    credentials = (secrets_file.read(secrets) if args.secrets or secrets.exists() else None)
    db = database(args)
    if not db.exists():
        db.backend.create(False)
    restored = 0

    def replace(cluster):
        nonlocal restored
        if (cluster.nodes or cluster.vcs) and not args.replace:
            raise VlxError(f"{db.name} holds a cluster already ({len(cluster.nodes)} nodes, "
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
        print(f"restored {plural(restored, 'secret')} from {secrets}")
    return 0


NOT_EXPORTED = "the generation and the change log"
SECRETS = "the secrets (CHAP logins, SSH host keys)"


def cmd_export(args: argparse.Namespace) -> int:
    cluster = database(args).load()
    text = inventory.dump(cluster)
    if args.with_secrets and not args.output:
        raise VlxError("--with-secrets writes a file beside the inventory: name it with "
                       "-o FILE (secrets are never printed)")
    if not args.output:
        sys.stdout.write(text)
        print(f"vlx: not exported: {SECRETS} (-o FILE --with-secrets), "
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
        print(f"wrote {secrets} (mode 0600): {plural(count, 'secret')}; not "
              f"exported: {NOT_EXPORTED}")
    else:
        print(f"not exported: {SECRETS} (--with-secrets), {NOT_EXPORTED}")
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


def cmd_migrate(args: argparse.Namespace) -> int:
    source = database(args)
    target = Database(store=parse_url(args.to, "--to"))
    if target.url == source.url:
        raise VlxError(f"{args.to} is the database being migrated", "--to")
    cluster = source.migrate_to(target)
    print(f"migrated {source.name} -> {target.name}: generation {cluster.generation}, "
          f"{len(target.changes(None))} change-log entries")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    settings = _local_settings(args)
    member = etcd_member.Member(
        name=args.name, address=args.listen,
        initial_cluster=(etcd_member.parse_initial_cluster(args.initial_cluster)
                         if args.initial_cluster else ()),
        join=args.join, data_dir=args.data_dir, tls_dir=args.tls,
        heartbeat_ms=args.heartbeat_ms or settings.store_heartbeat_ms,
        election_ms=args.election_ms or settings.store_election_ms)
    command = member.command(shutil.which("etcd") or "etcd")
    if args.print:
        print(" ".join(command))
        return 0
    if shutil.which("etcd") is None:
        raise VlxError("etcd is not installed (apt-get install etcd-server)")
    os.execv(command[0], command)


def _local_settings(args: argparse.Namespace) -> Settings:
    """The settings of the local copy, when there is one; else the defaults."""
    path = Path(args.db) if args.db else default_path()
    if path.exists():
        with contextlib.suppress(VlxError):
            cluster = Database(path).load()
            if cluster.settings is not None:
                return cluster.settings
    return Settings(domain="unset", cidr=ipaddress.IPv4Network("198.18.0.0/24"),
                    gateway_vip=ipaddress.IPv4Address("198.18.0.1"))


def _etcd(args: argparse.Namespace):
    db = database(args)
    if db.url.scheme != "etcd":
        raise VlxError(f"{db.name} is not an etcd store: name one with --store etcd://...")
    return db.backend


def cmd_member_list(args: argparse.Namespace) -> int:
    found = etcd_member.members(_etcd(args))
    if args.json:
        print_json(found)
        return 0
    print_table(["ID", "NAME", "PEER URLS", "CLIENT URLS"],
                [[f"{m['id']:x}", m["name"] or "(not started)", ",".join(m["peer_urls"]),
                  ",".join(m["client_urls"])] for m in found])
    return 0


def cmd_member_add(args: argparse.Namespace) -> int:
    store = _etcd(args)
    member_id = etcd_member.add_member(store, args.peer_url)
    cluster = ",".join(sorted(f"{m['name'] or args.name}={m['peer_urls'][0]}"
                              for m in etcd_member.members(store) if m["peer_urls"]))
    listen = urllib.parse.urlsplit(args.peer_url).hostname or "IP"
    print(f"added member {args.name} ({member_id:x}); start it with:\n"
          f"  vlx db serve --name {args.name} --listen {listen} --initial-cluster {cluster} "
          "--join")
    return 0


def cmd_member_remove(args: argparse.Namespace) -> int:
    member_id = etcd_member.remove_member(_etcd(args), args.name)
    print(f"removed member {args.name} ({member_id:x})")
    return 0


def cmd_tls_init(args: argparse.Namespace) -> int:
    from .. import cluster_ca
    cluster = database(args).update("db tls init", "store CA", cluster_ca.with_ca)
    print(f"the store CA is in the database (generation {cluster.generation})")
    return 0


def cmd_tls_member(args: argparse.Namespace) -> int:
    from .. import cluster_ca
    ca = cluster_ca.ca_of(database(args).load())
    pair = cluster_ca.issue(ca, args.name, args.ip, member=True)
    for path in cluster_ca.write(args.out, ca, args.name, pair):
        print(path)
    return 0


def cmd_tls_client(args: argparse.Namespace) -> int:
    from .. import cluster_ca
    ca = cluster_ca.ca_of(database(args).load())
    pair = cluster_ca.issue(ca, "client", (), member=False)
    for path in cluster_ca.write(args.out, ca, "client", pair):
        print(path)
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    changes = database(args).changes(args.n)
    if args.json:
        print_json([change.__dict__ for change in changes])
        return 0
    print_table(["GEN", "TIME", "USER", "ACTION", "DETAIL"],
                [[c.generation, c.time, c.user, c.action, c.detail] for c in changes])
    return 0
