"""One generation of the database as one compressed blob: how etcd holds it (store_etcd).

The blob is zlib-compressed JSON: the schema version, the generation and every item, each
written with the model's own `to_mapping` (the same keys as the inventory and `--json`) and
read back with `from_mapping`, so a blob is checked field by field like any other input.
Compression matters: a 10,000-node cluster is ~3.5 MB of JSON but ~0.4 MB compressed, which
keeps it to one etcd request (see store_etcd for the limits).
"""

from __future__ import annotations

import ipaddress
import json
import zlib
from typing import Any

from .errors import VlxError
from .fields import from_mapping, from_rows, to_mapping
from .model import VM, Change, Cluster, Credential, Node, Settings, VirtualCluster, Volume
from .store import SCHEMA_VERSION


def encode(cluster: Cluster) -> bytes:
    data = {
        "schema": SCHEMA_VERSION,
        "generation": cluster.generation,
        "settings": to_mapping(cluster.settings) if cluster.settings else None,
        "nodes": [to_mapping(node) for node in cluster.nodes],
        "vcs": [to_mapping(vc) for vc in cluster.vcs],
        "vms": [[vm.name, vm.vc, vm.index, vm.node, vm.mac, str(vm.ip), vm.volume]
                for vm in cluster.vms],
        "volumes": [to_mapping(volume) for volume in cluster.volumes],
        "credentials": [[c.owner, c.username, c.secret] for c in cluster.credentials],
    }
    return zlib.compress(json.dumps(data, separators=(",", ":")).encode(), 6)


def decode(blob: bytes, where: str) -> Cluster:
    try:
        data = json.loads(zlib.decompress(blob))
    except (zlib.error, ValueError) as err:
        raise VlxError(f"a snapshot that does not decode ({err})", where) from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA_VERSION:
        schema = data.get("schema") if isinstance(data, dict) else None
        raise VlxError(f"snapshot schema {schema!r}; this vlx knows {SCHEMA_VERSION}", where)
    try:
        settings = (from_mapping(Settings, data["settings"], f"{where} settings")
                    if data["settings"] is not None else None)
        return Cluster(
            generation=int(data["generation"]),
            settings=settings,
            nodes=from_rows(Node, _named(data["nodes"]), f"{where} node"),
            vcs=from_rows(VirtualCluster, _named(data["vcs"]), f"{where} vc"),
            vms=tuple(VM(name, vc, int(index), node, mac, ipaddress.IPv4Address(ip), volume)
                      for name, vc, index, node, mac, ip, volume in data["vms"]),
            volumes=from_rows(Volume, _named(data["volumes"]), f"{where} volume"),
            credentials=tuple(Credential(*row) for row in data["credentials"]))
    except (KeyError, TypeError, ValueError) as err:
        raise VlxError(f"a snapshot with a broken field ({err!r})", where) from None


def _named(items: list) -> list[tuple[str, Any]]:
    """(name, item) pairs for from_rows, which names the entry in an error."""
    return [(str(item.get("name", "?")) if isinstance(item, dict) else "?", item)
            for item in items]


def encode_change(change: Change) -> bytes:
    return json.dumps([change.generation, change.time, change.user, change.action,
                       change.detail]).encode()


def decode_change(blob: bytes, where: str) -> Change:
    try:
        generation, time, user, action, detail = json.loads(blob)
        return Change(int(generation), str(time), str(user), str(action), str(detail))
    except (ValueError, TypeError) as err:
        raise VlxError(f"a change-log entry that does not decode ({err})", where) from None


def as_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
