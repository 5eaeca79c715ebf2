"""30 database: where this node's services read the cluster database, and its etcd member.

With nodes of role `db` the database is the replicated store on them (`Cluster.store_url`):
every node's services serve from a local SQLite copy of it (the start-up itself made that copy
before the first step, `__main__`), and the nodes of role `db` run one etcd member each
(`virtualinux-etcd.service`: etcd with the command line `vlx db serve` would exec it with).
How a member starts depends on what it finds:

    its data directory exists     it restarts as itself (a reboot: the data is on the node's
                                  own root, its snapshot); etcd ignores the initial cluster
    members answer in the store   it joins them: etcd's MemberAdd through the store (unless
                                  its peer URL is a member already: a start-up that stopped
                                  between the add and the start), then etcd with
                                  --initial-cluster-state existing and every member named
    nothing answers               the db nodes of a new cluster form it together

etcd refuses a MemberAdd that would leave fewer started members than a quorum (its strict
reconfiguration check), so db nodes booting together join one after the other: the add is
retried until the member before has started, within JOIN_TIMEOUT. The Raft timing is the
cluster's (`store_heartbeat_ms`, `store_election_ms`), the same on every member.
Without db nodes the database is the file the start-up read, as on a single machine.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

from virtualinux.vvcm import Database, VlxError, etcd_member
from virtualinux.vvcm.db import default_path
from virtualinux.vvcm.etcd_member import DATA_ROOT, PEER_PORT
from virtualinux.vvcm.model import Role, Settings
from virtualinux.vvcm.store import parse_url

from ..files import SERVICE_FILE_HEADER, plain, write_if_changed
from ..services import restart_if_changed, wait_started
from ..startup import Boot, Step, StepFailed

if TYPE_CHECKING:     # the etcd client is imported only on db nodes that join
    from virtualinux.vvcm.store_etcd import EtcdStore

ENV_FILE = "/etc/default/virtualinux"
ETCD_ENV_FILE = "/etc/default/virtualinux-etcd"
# How long a joining member waits for the member added before it to start (a TCG guest's
# etcd takes tens of seconds on a loaded machine), and between two tries.
JOIN_TIMEOUT = 600.0
JOIN_RETRY = 2.0
# At most as long as systemd waits for the replica's READY=1 (its unit's TimeoutStartSec).
REPLICA_WAIT = 600.0
# Where the node's cpio leaves its store certificates (netboot.scripts.node_files): a db node
# of a cluster with a CA also finds its member's NAME.crt and NAME.key there.
STORE_TLS_DIR = "/run/virtualinux/node/store"


def store_variables(boot: Boot) -> dict[str, str]:
    """VLX_STORE and VLX_DB as every virtualinux unit gets them: the store and the local copy,
    or the file. The same on a first boot (only the kernel's `vlx.store=` is known) as on a
    reboot (start-up then reads ENV_FILE, which names VLX_DB too), so a reboot rewrites no
    unit's file and restarts nothing for it."""
    store = _store(boot)
    if store is not None:
        return {"VLX_STORE": plain(store, "store URL"),
                "VLX_DB": plain(os.environ.get("VLX_DB") or default_path(), "path")}
    if os.environ.get("VLX_DB"):
        return {"VLX_DB": plain(os.environ["VLX_DB"], "path")}
    return {}


def environment(boot: Boot) -> str:
    """What every virtualinux unit reads."""
    lines = [SERVICE_FILE_HEADER]
    lines += [f"{key}={value}" for key, value in store_variables(boot).items()]
    return "\n".join(lines) + "\n"


def member_environment(boot: Boot, initial: str, options: str,
                       arguments: Sequence[str]) -> str:
    lines = [SERVICE_FILE_HEADER,
             f"VLX_ETCD_NAME={plain(boot.node.name, 'node name')}",
             f"VLX_ETCD_LISTEN={boot.node.ip}",
             f"VLX_ETCD_INITIAL_CLUSTER={initial}",
             f"VLX_ETCD_DATA_DIR={data_dir(boot)}",
             # The same member as flags of `vlx db serve`, for an operator starting it by hand.
             f"VLX_ETCD_OPTIONS={options}",
             # What virtualinux-etcd.service runs: etcd itself with the command line `vlx db
             # serve` would exec (etcd_member.Member.command), so a node's boot starts no
             # second Python interpreter for it (one took 26 s of a TCG node's boot).
             "VLX_ETCD_ARGS=" + " ".join(arguments)]
    for word in arguments:      # systemd splits $VLX_ETCD_ARGS at spaces: none may hide in one
        plain(word.lstrip("-"), "etcd argument")
    return "\n".join(lines) + "\n"


def data_dir(boot: Boot) -> Path:
    return DATA_ROOT / boot.node.name


def member_tls(boot: Boot) -> str | None:
    """The directory of this member's certificates when the cluster's store uses TLS: then
    its peers and clients speak https, and only holders of the cluster's certificates get in."""
    found = (boot.path(STORE_TLS_DIR) / f"{boot.node.name}.crt").is_file()
    return STORE_TLS_DIR if found else None


def peer_scheme(boot: Boot) -> str:
    return "https" if member_tls(boot) else "http"


def peer_url(boot: Boot) -> str:
    return f"{peer_scheme(boot)}://{boot.node.ip}:{PEER_PORT}"


def timing(boot: Boot) -> str:
    settings = boot.cluster.settings or Settings
    return (f"--heartbeat-ms {int(settings.store_heartbeat_ms)} "
            f"--election-ms {int(settings.store_election_ms)}")


def new_cluster(boot: Boot) -> str:
    scheme = peer_scheme(boot)   # every db node of one cluster has a certificate, or none
    return ",".join(f"{plain(node.name, 'node name')}={scheme}://{node.ip}:{PEER_PORT}"
                    for node in boot.cluster.nodes_with_role(Role.DB))


def join(boot: Boot, store_url: str, clock: Callable[[], float] = time.monotonic) -> str | None:
    """Announce this node as a member of the running ones (idempotent); the initial cluster
    to start with, or None when no member answers (a new cluster)."""
    from virtualinux.vvcm.store_etcd import StoreUnreachable
    store = cast("EtcdStore", Database(store=parse_url(store_url, "vlx.store")).backend)
    mine = peer_url(boot)
    settings = boot.cluster.settings
    deadline = clock() + JOIN_TIMEOUT
    while True:
        try:
            members = etcd_member.members(store)
            ours = [m for m in members if mine in m["peer_urls"]]
            # A member of this name and URL that has started before owns data this node no
            # longer has (its snapshot was made anew): it goes, and this node joins afresh.
            stale = [m for m in ours if m["name"] == boot.node.name]
            for member in stale:
                etcd_member.remove_member(store, member["name"])
            if stale or not ours:
                etcd_member.add_member(store, mine)
            break
        except StoreUnreachable:
            # No member anywhere: the db nodes form a new cluster, unless a bootstrap member
            # is named (then the cluster exists, and this node waits for it).
            if not (settings and settings.store_bootstrap):
                return None
            if clock() > deadline:
                raise
        except VlxError as err:
            if clock() > deadline:
                raise StepFailed(f"could not join the etcd members at {store_url} within "
                                 f"{JOIN_TIMEOUT:g} s: {err}") from None
        time.sleep(JOIN_RETRY)
    members = etcd_member.members(store)
    named = [(m["name"] or boot.node.name, m["peer_urls"][0]) for m in members
             if m["peer_urls"] and (m["name"] or mine in m["peer_urls"])]
    return ",".join(f"{plain(name, 'member name')}={plain(url, 'peer URL')}"
                    for name, url in sorted(named))


def run(boot: Boot) -> str:
    changed = write_if_changed(boot.path(ENV_FILE), environment(boot))
    store = _store(boot)
    if Role.DB not in boot.node.roles:
        return f"client of {store}, serving a local copy" if store else "database file"
    # The member starts once this node's replica serves (its unit is ordered after the
    # replica's, so etcd's start does not take the CPU the replica's start needs): the add
    # waits for that too, or the members would count one that has not started, without a
    # quorum in between when they were one.
    wait_started(boot, "virtualinux-bootsvc.service", REPLICA_WAIT)
    if (boot.path(str(data_dir(boot))) / "member").is_dir():
        how = "restarts as itself"
        initial, joining = (last_start(boot)
                            or (f"{boot.node.name}={peer_url(boot)}", False))
    else:
        joined = join(boot, store) if store else None
        if joined is None:
            how, initial, joining = "forms a new cluster", new_cluster(boot), False
        else:
            how, initial, joining = "joins the running members", joined, True
    options = f"{'--join ' if joining else ''}{timing(boot)}"
    tls = member_tls(boot)
    if tls is not None:
        options += f" --tls {tls}"
    settings = boot.cluster.settings or Settings
    member = etcd_member.Member(
        name=boot.node.name, address=boot.node.ip,
        initial_cluster=etcd_member.parse_initial_cluster(initial), join=joining,
        data_dir=data_dir(boot), tls_dir=Path(tls) if tls else None,
        heartbeat_ms=int(settings.store_heartbeat_ms),
        election_ms=int(settings.store_election_ms))
    try:
        arguments = member.command(root=boot.root)[1:]
    except VlxError as err:
        raise StepFailed(f"etcd member {boot.node.name}: {err}") from None
    changed = write_if_changed(boot.path(ETCD_ENV_FILE),
                               member_environment(boot, initial, options, arguments)) or changed
    restart_if_changed(boot, "virtualinux-etcd.service", changed)
    members = len(initial.split(","))
    return (f"etcd member {boot.node.name} on {boot.node.ip} {how} ({members} in its initial "
            f"cluster), clients use {store}")


def last_start(boot: Boot) -> tuple[str, bool] | None:
    """The initial cluster and join flag this member was last started with, from its file.

    A member with data ignores both (it restarts as itself), so a reboot keeps what the file
    says rather than write "only itself": a rewritten file would restart the member the boot
    has just started, for nothing. None when the file is gone or names another member."""
    try:
        text = boot.path(ETCD_ENV_FILE).read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    values = dict(line.split("=", 1) for line in text.splitlines()
                  if "=" in line and not line.startswith("#"))
    initial = values.get("VLX_ETCD_INITIAL_CLUSTER", "")
    if (values.get("VLX_ETCD_NAME") != boot.node.name
            or values.get("VLX_ETCD_DATA_DIR") != str(data_dir(boot))
            or f"{boot.node.name}={peer_url(boot)}" not in initial.split(",")):
        return None
    return initial, "--join" in values.get("VLX_ETCD_OPTIONS", "").split()


def _store(boot: Boot) -> str | None:
    """The store the start-up read (VLX_STORE, from `vlx.store=`), else the database's own."""
    found = os.environ.get("VLX_STORE")
    return found if found and found.startswith("etcd://") else boot.cluster.store_url()


# waits: a joining member waits for the members before it (JOIN_TIMEOUT); the steps after
# it (the boot services above all) need nothing of it and go on meanwhile.
STEP = Step(name="database", order=30, run=run, needs=("identity",), waits=True,
            makes=f"{ENV_FILE}; on db nodes {ETCD_ENV_FILE} and virtualinux-etcd.service")
