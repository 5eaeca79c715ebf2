"""The operator's way into a node-image lab: an admin SSH key, `vlx lab ssh`, `vlx lab power-on`.

    STATE/admin/id_ed25519(.pub)    the lab's admin key pair, made once by `vlx lab up`; its
                                    public half goes into the lab cluster's `admin_ssh_keys`,
                                    which every node's start-up makes root's authorized_keys
    STATE/admin/known_hosts.NODE    the node's host key as the store holds it, rewritten at
                                    each `vlx lab ssh`: ssh checks the node against it strictly

The store is read from inside the lab's bootstrap namespace (the lab's addresses are not
local in the host's namespace, and a connection to one would leave the machine): this module
runs itself there (`python -m virtualinux.vm_test.admin node URL NAME`). Like selfhost.py,
nothing imports this but the command line and the tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from virtualinux.vvcm import Database, VlxError, host_keys
from virtualinux.vvcm.fields import from_mapping, to_mapping
from virtualinux.vvcm.model import Node
from virtualinux.vvcm.store import parse_url

from . import lab as labs
from .admin_key import key_path
from .netns import Namespace
from .plan import LabPlan, NodePlan
from .progress import node_phases
from .selfhost import GOLDEN, san_dir, start_up_steps
from .state import LabRecord, StateError, same_process

SSH_OPTIONS = ("-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=yes",
               "-o", "GlobalKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
               "-o", "ConnectTimeout=20", "-o", "LogLevel=ERROR")


def _node_lab(state_dir: Path) -> tuple[LabRecord, Namespace, str]:
    """The lab's record, its bootstrap namespace (where the lab's addresses are reachable)
    and the store's URL."""
    try:
        record = LabRecord.load(state_dir)
    except StateError as err:
        raise VlxError(str(err), "--state-dir") from None
    if record is None or record.image != "node" or record.store is None:
        raise VlxError(f"no node-image lab in {state_dir} (`vlx lab up` makes one)",
                       "--state-dir")
    return record, Namespace(record.replicas["boot"]["namespace"]), record.store


def node_in_store(state_dir: Path, name: str) -> dict:
    """What the store says of node `name`: its row, its known_hosts lines, whether it has a
    root volume (read in the lab's namespace)."""
    _, ns, store = _node_lab(state_dir)
    done = ns.run([sys.executable, "-m", "virtualinux.vm_test.admin", "node", store, name],
                  check=False, timeout=120)
    if done.returncode != 0:
        raise VlxError((done.stderr or done.stdout).strip() or f"reading {name} failed", "NODE")
    return json.loads(done.stdout)


def ssh(state_dir: Path, name: str, command: Sequence[str]) -> int:
    """ssh root@NODE [COMMAND...] from the lab's namespace; ssh's exit code (the command's)."""
    _, ns, _ = _node_lab(state_dir)
    key = key_path(state_dir)
    if not key.exists():
        raise VlxError(f"this lab has no admin key ({key}): it was made before `vlx lab ssh` "
                       "existed", "--state-dir")
    node = node_in_store(state_dir, name)
    if not node["known_hosts"]:
        raise VlxError(f"the store holds no host key for {name} (`vlx node keys {name}`)",
                       "NODE")
    known = key.with_name(f"known_hosts.{name}")
    known.write_text("".join(line + "\n" for line in node["known_hosts"]))
    command = list(command)
    if command[:1] == ["--"]:
        command = command[1:]
    cmd = ["ssh", "-i", str(key), "-o", f"UserKnownHostsFile={known}", *SSH_OPTIONS,
           f"root@{node['row']['ip']}", *command]
    return subprocess.run(ns.prefix(cmd)).returncode


def power_on(state_dir: Path, name: str) -> str:
    """A QEMU machine with NODE's MAC on the lab bridge, recorded like the lab's own nodes (so
    `status`, `console` and `down` know it); a machine the lab already has is started again.
    A node with no root volume yet gets one first, as a SAN operator would make it: a snapshot
    of the golden exported on the lab SAN."""
    record, ns, store = _node_lab(state_dir)
    entry = record.process(f"qemu-{name}")
    if entry is not None and same_process(entry):
        raise VlxError(f"{name} is powered on already (pid {entry.pid})", "NODE")
    if name in record.nodes:        # one of the lab's machines, killed or reset: its QEMU again
        return f"powered on {name} again (QEMU pid {labs.power_on(state_dir, name)})"
    node = node_in_store(state_dir, name)
    said = []
    if not node["root_volume"]:
        made = ns.run([*labs.VLX, "--store", store, "volume", "snapshot", GOLDEN,
                       "--for", name, "--portal", record.san["portal"]], check=False,
                      timeout=300, env={**os.environ,
                                        "VLX_STORAGE_STATE": str(san_dir(state_dir))})
        if made.returncode != 0:
            raise VlxError(f"making {name}'s root volume on the lab SAN: "
                           f"{(made.stderr or made.stdout).strip()}")
        said.append(made.stdout.strip())
    row = from_mapping(Node, node["row"], "the store")
    taps = {info["tap"] for info in record.nodes.values()}
    tap = next(f"tap{index}" for index in range(len(taps) + 1) if f"tap{index}" not in taps)
    record.nodes[name] = {"mac": row.mac, "ip": str(row.ip), "tap": tap,
                          "phases": list(node_phases(start_up_steps()))}
    record.save()
    layout = LabPlan(state_dir=state_dir, prefix=record.prefix, hub=f"{record.prefix}-net",
                     nodes=(NodePlan(row, tap),), replicas=(), firmware=record.firmware,
                     image="node")
    labs.Lab(layout, record).start_nodes()
    said.append(f"powered on {name} ({row.mac}, {row.ip}) on {tap}")
    return "\n".join(said)


def _node(url: str, name: str) -> int:
    """In the lab's namespace: node `name` of the store, as JSON."""
    cluster = Database(store=parse_url(url)).load()
    node = cluster.node(name)
    print(json.dumps({"row": to_mapping(node),
                      "known_hosts": host_keys.known_hosts(cluster, [name]),
                      "root_volume": any(volume.kind == "snapshot"
                                         for volume in cluster.volumes_owned_by(name))}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 3 and argv[0] == "node":
        try:
            return _node(argv[1], argv[2])
        except VlxError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    print("usage: python -m virtualinux.vm_test.admin node etcd://... NAME", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
