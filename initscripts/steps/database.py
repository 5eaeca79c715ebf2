"""30 database: where this node's services read the cluster database, and its etcd member.

With nodes of role `db` the database is the replicated store on them (`Cluster.store_url`):
every node's services serve from a local SQLite copy of it (the start-up itself made that copy
before the first step, `__main__`), and the nodes of role `db` run one etcd member each
(`virtualinux-etcd.service`, `vlx db serve`), all of them named in the initial cluster: the
db nodes of a new cluster form it together. A member keeps its data on the node's own root
(its snapshot), so it rejoins as itself after a reboot. A db node added to running members is
not joined here yet: `vlx db member add` and `vlx db serve --join` do it by hand.
Without db nodes the database is the file the start-up read, as on a single machine.
"""

from __future__ import annotations

import os

from virtualinux.vvcm.db import default_path
from virtualinux.vvcm.etcd_member import DATA_ROOT, PEER_PORT
from virtualinux.vvcm.model import Role

from ..files import plain, write_if_changed
from ..services import restart_if_changed
from ..startup import Boot, Step

ENV_FILE = "/etc/default/virtualinux"
ETCD_ENV_FILE = "/etc/default/virtualinux-etcd"


def environment(boot: Boot) -> str:
    """What every virtualinux unit reads: the store and the local copy, or the file."""
    lines = ["# Written at start-up from the cluster database "
             f"(gen {boot.cluster.generation}); changes here are lost at the next boot."]
    store = _store(boot)
    if store is not None:
        lines.append(f"VLX_STORE={plain(store, 'store URL')}")
        lines.append(f"VLX_DB={plain(os.environ.get('VLX_DB') or default_path(), 'path')}")
    elif os.environ.get("VLX_DB"):
        lines.append(f"VLX_DB={plain(os.environ['VLX_DB'], 'path')}")
    return "\n".join(lines) + "\n"


def member_environment(boot: Boot) -> str:
    members = boot.cluster.nodes_with_role(Role.DB)
    initial = ",".join(f"{plain(node.name, 'node name')}=http://{node.ip}:{PEER_PORT}"
                       for node in members)
    lines = ["# Written at start-up from the cluster database "
             f"(gen {boot.cluster.generation}); changes here are lost at the next boot.",
             f"VLX_ETCD_NAME={plain(boot.node.name, 'node name')}",
             f"VLX_ETCD_LISTEN={boot.node.ip}",
             f"VLX_ETCD_INITIAL_CLUSTER={initial}",
             f"VLX_ETCD_DATA_DIR={DATA_ROOT / boot.node.name}"]
    return "\n".join(lines) + "\n"


def run(boot: Boot) -> str:
    changed = write_if_changed(boot.path(ENV_FILE), environment(boot))
    store = _store(boot)
    if Role.DB not in boot.node.roles:
        return f"client of {store}, serving a local copy" if store else "database file"
    changed = write_if_changed(boot.path(ETCD_ENV_FILE), member_environment(boot)) or changed
    restart_if_changed(boot, "virtualinux-etcd.service", changed)
    members = len(boot.cluster.nodes_with_role(Role.DB))
    return f"etcd member {boot.node.name} of {members} on {boot.node.ip}, clients use {store}"


def _store(boot: Boot) -> str | None:
    """The store the start-up read (VLX_STORE, from `vlx.store=`), else the database's own."""
    found = os.environ.get("VLX_STORE")
    return found if found and found.startswith("etcd://") else boot.cluster.store_url()


STEP = Step(name="database", order=30, run=run, needs=("identity",),
            makes=f"{ENV_FILE}; on db nodes {ETCD_ENV_FILE} and virtualinux-etcd.service")
