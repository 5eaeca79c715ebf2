"""10 identity: host name, /etc/hosts and the iSCSI initiator name, from the database.

Nothing per node is baked into the golden image: the name comes from the node's database row
(the kernel command line's `vlx.node=` says which row), the hosts file lists every node and the
gateway from the same generation, and the initiator name is the one the initramfs logged in
with, read from the running iSCSI session (open-iscsi's iscsid needs it for the root's session
to be taken over and kept).
"""

from __future__ import annotations

import socket
from pathlib import Path

from ..files import plain, write_if_changed
from ..startup import Boot, Step, StepFailed

SESSIONS = "sys/class/iscsi_session"


def hosts_file(boot: Boot) -> str:
    cluster = boot.cluster
    lines = ["# Written at start-up from the cluster database "
             f"(gen {cluster.generation}); changes here are lost at the next boot.",
             "127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    for node in cluster.nodes:
        name = plain(node.name, "node name")
        lines.append(f"{plain(node.ip, 'node address')}\t"
                     f"{plain(cluster.fqdn(name), 'host name')}\t{name}")
    if cluster.settings is not None:
        lines.append(f"{plain(cluster.settings.gateway_vip, 'gateway address')}\t"
                     f"{plain(cluster.fqdn('gateway'), 'host name')}\tgateway")
    return "\n".join(lines) + "\n"


def session_initiator(root: Path) -> str | None:
    """The initiator name of the first running iSCSI session (the root's), if any."""
    sessions = sorted((root / SESSIONS).glob("session*/initiatorname"))
    for path in sessions:
        name = path.read_text().strip()
        if name and name != "(null)":
            return name
    return None


def run(boot: Boot) -> str:
    name = plain(boot.node.name, "node name")
    write_if_changed(boot.path("/etc/hostname"), name + "\n")
    write_if_changed(boot.path("/etc/hosts"), hosts_file(boot))
    if boot.live and socket.gethostname() != name:
        socket.sethostname(name)
    said = [f"{name} {boot.node.ip}", f"/etc/hosts {len(boot.cluster.nodes) + 1} names"]
    initiator = session_initiator(boot.root)
    if initiator is not None:
        write_if_changed(boot.path("/etc/iscsi/initiatorname.iscsi"),
                         f"InitiatorName={plain(initiator, 'initiator name')}\n")
        said.append(f"initiator {initiator}")
    elif boot.kernel_arg("vlx.root"):
        raise StepFailed(f"the root is on iSCSI ({boot.kernel_arg('vlx.root')}) but no iSCSI "
                         f"session shows in /{SESSIONS}: iscsid could not take it over")
    return ", ".join(said)


STEP = Step(name="identity", order=10, run=run,
            makes="/etc/hostname, /etc/hosts, /etc/iscsi/initiatorname.iscsi")
