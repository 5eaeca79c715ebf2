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
    head = {
        "schema": SCHEMA_VERSION,
        "generation": cluster.generation,
        "settings": to_mapping(cluster.settings) if cluster.settings else None,
    }
    vms = [[vm.name, vm.vc, vm.index, vm.node, vm.mac, str(vm.ip), vm.volume]
           for vm in cluster.vms]
    # The same text as one json.dumps of the whole, with each item's text reused while the
    # item is the same object: a change keeps the items it does not touch, so a single-node
    # change encodes one node, not every one (two thirds of a write's encoding otherwise).
    parts = [_json(head)[:-1],
             ',"nodes":[', ",".join(map(_item_json, cluster.nodes)),
             '],"vcs":[', ",".join(map(_item_json, cluster.vcs)),
             '],"vms":', _json(vms),
             ',"volumes":[', ",".join(map(_item_json, cluster.volumes)),
             '],"credentials":', _json([[c.owner, c.username, c.secret]
                                        for c in cluster.credentials]), "}"]
    _forget_all_but(cluster)
    return zlib.compress("".join(parts).encode(), 6)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


# id(item) -> (item, its JSON text); the item is held, so its id is not reused meanwhile.
_encoded: dict[int, tuple[Any, str]] = {}


def _item_json(item: Any) -> str:
    found = _encoded.get(id(item))
    if found is not None and found[0] is item:
        return found[1]
    text = _json(to_mapping(item))
    _encoded[id(item)] = (item, text)
    return text


def _forget_all_but(cluster: Cluster) -> None:
    """Keep the cache to about one cluster's items (those of the last one encoded)."""
    count = len(cluster.nodes) + len(cluster.vcs) + len(cluster.volumes)
    if len(_encoded) > 2 * count + 64:
        keep = {id(item) for items in (cluster.nodes, cluster.vcs, cluster.volumes)
                for item in items}
        for key in [key for key in _encoded if key not in keep]:
            del _encoded[key]


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
