"""60 libvirtd: the hypervisor's daemon, with a host UUID that stays with the node.

Every node boots a snapshot of one golden image and gets a new machine id each boot, so
libvirt's default host UUID would change with every boot (and migration needs it stable and
distinct per host): it is derived from the cluster and node names instead.
"""

from __future__ import annotations

import uuid

from ..files import write_if_changed
from ..services import restart_if_changed
from ..startup import Boot, Step

CONFIG = "/etc/libvirt/libvirtd.conf"
# A fixed namespace for host UUIDs, so uuid5(cluster/node) is the same wherever it is computed.
HOST_UUID_NAMESPACE = uuid.UUID("6f0a7c1e-5b1e-4c55-9d8a-7a1e2c0b9a10")


def host_uuid(boot: Boot) -> uuid.UUID:
    cluster = boot.cluster.settings.name if boot.cluster.settings else ""
    return uuid.uuid5(HOST_UUID_NAMESPACE, f"{cluster}/{boot.node.name}")


def libvirtd_conf(boot: Boot) -> str:
    return ("# Written at start-up from the cluster database; changes here are lost at the "
            "next boot.\n"
            f'host_uuid = "{host_uuid(boot)}"\n')


def run(boot: Boot) -> str:
    changed = write_if_changed(boot.path(CONFIG), libvirtd_conf(boot))
    restart_if_changed(boot, "libvirtd.service", changed)
    return f"libvirtd host UUID {host_uuid(boot)}{'' if changed else ' (unchanged)'}"


STEP = Step(name="libvirtd", order=60, run=run, needs=("identity",), makes=CONFIG)
