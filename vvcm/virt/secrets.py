"""The CHAP secrets of VMs with iSCSI disks, as libvirt secrets on the nodes that run them.

A VM whose volume is exported over iSCSI logs in with its owner's CHAP login (the database's
credential): the domain XML names the user and a secret by usage (`domain.secret_usage`), and
the secret's value lives only in the node's libvirt (private: libvirt never hands it back),
defined before the domain starts, moved with a migration, removed with the VM. All of it
idempotent: `ensure` defines what is missing and sets every value again (a credential may
have changed), `remove` skips what is gone.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable

import libvirt

from ..errors import VlxError
from ..model import VM, Cluster
from .connect import error_text
from .domain import is_iscsi, secret_usage


def _owners(cluster: Cluster, vms: Iterable[VM]) -> list[str]:
    """The owners of the exported disks of `vms` (a VM owns its disk)."""
    owners = []
    for vm in vms:
        if vm.volume is None:
            continue
        volume = cluster.volume(vm.volume)
        if is_iscsi(volume) and volume.owner is not None:
            owners.append(volume.owner)
    return owners


def secret_xml(usage: str, description: str) -> str:
    secret = ET.Element("secret", ephemeral="no", private="yes")
    ET.SubElement(secret, "description").text = description
    ET.SubElement(ET.SubElement(secret, "usage", type="iscsi"), "target").text = usage
    return ET.tostring(secret, encoding="unicode")


def find(conn: libvirt.virConnect, usage: str) -> libvirt.virSecret | None:
    try:
        return conn.secretLookupByUsage(libvirt.VIR_SECRET_USAGE_TYPE_ISCSI, usage)
    except libvirt.libvirtError as err:
        if err.get_error_code() == libvirt.VIR_ERR_NO_SECRET:
            return None
        raise


def ensure(conn: libvirt.virConnect, cluster: Cluster, vms: Iterable[VM],
           node: str) -> list[str]:
    """Every exported disk's CHAP secret of `vms` on the node; returns the usages it
    defined (those already there only get their value set again)."""
    made = []
    for owner in _owners(cluster, vms):
        credential = cluster.credential(owner)
        if credential is None:
            raise VlxError(f"{owner}'s disk is exported over iSCSI but {owner} has no CHAP "
                           "login in the database")
        usage = secret_usage(cluster, owner)
        try:
            secret = find(conn, usage)
            if secret is None:
                secret = conn.secretDefineXML(secret_xml(usage, f"iSCSI CHAP of {owner}"))
                made.append(usage)
            secret.setValue(credential.secret.encode())
        except libvirt.libvirtError as err:
            raise VlxError(f"node {node}: cannot keep {owner}'s iSCSI CHAP secret in "
                           f"libvirt: {error_text(err)}") from None
    return made


def remove(conn: libvirt.virConnect, cluster: Cluster, vms: Iterable[VM],
           only: Iterable[str] | None = None) -> None:
    """Undefine the CHAP secrets of `vms` on the node (of those in `only` if given)."""
    chosen = None if only is None else set(only)
    for owner in _owners(cluster, vms):
        usage = secret_usage(cluster, owner)
        if chosen is not None and usage not in chosen:
            continue
        try:
            secret = find(conn, usage)
            if secret is not None:
                secret.undefine()
        except libvirt.libvirtError as err:
            raise VlxError(f"cannot remove {owner}'s iSCSI CHAP secret from libvirt: "
                           f"{error_text(err)}") from None
