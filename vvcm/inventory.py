"""The inventory: the TOML file a person writes, read into the database and written back.

Sections: `[cluster]` (the `Settings`), `[[node]]`, `[[vc]]` (with an optional `placement`
table VM -> node, which `vlx db export` writes so an import reproduces the database exactly)
and `[[volume]]`. The keys are the model's settings (`fields`), nothing else. Every error
names the file, the line of the entry's header and the field.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tomli_w

from . import changes, host_keys
from .errors import VlxError
from .fields import from_mapping, parse_name, to_mapping
from .model import Cluster, Node, Settings, VirtualCluster, Volume

SECTIONS = {"cluster": Settings, "node": Node, "vc": VirtualCluster, "volume": Volume}


@dataclasses.dataclass(frozen=True)
class Inventory:
    settings: Settings
    nodes: tuple[Node, ...]
    vcs: tuple[tuple[VirtualCluster, dict[str, str] | None], ...]
    volumes: tuple[Volume, ...]
    # "section name" -> "FILE:LINE: [[section]] #N (name)", to name the entry in later errors
    locations: dict[str, str] = dataclasses.field(default_factory=dict)


def load(path: Path | str) -> Inventory:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise VlxError(f"cannot read inventory: {err.strerror}", str(path)) from None
    except UnicodeDecodeError:
        raise VlxError("inventory is not UTF-8 text", str(path)) from None
    return parse(text, str(path))


def parse(text: str, source: str = "<inventory>") -> Inventory:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise VlxError(f"TOML syntax error: {err}", source) from None
    unknown = sorted(set(data) - set(SECTIONS))
    if unknown:
        raise VlxError(f"unknown section {unknown[0]!r} (known: "
                       f"{', '.join(sorted(SECTIONS))})", source)
    if "cluster" not in data:
        raise VlxError("missing the [cluster] section (domain, cidr, gateway_vip)", source)
    headers = _Headers(text)
    locations = {"cluster": headers.where(source, "cluster", None)}
    settings = from_mapping(Settings, data["cluster"], locations["cluster"])
    entries: dict[str, list[Any]] = {}
    for section in ("node", "vc", "volume"):
        items = data.get(section, [])
        if not isinstance(items, list):
            raise VlxError(f"{section} must be written [[{section}]], an array of tables",
                           source)
        entries[section] = []
        for number, item in enumerate(items):
            where = headers.where(source, section, number, item)
            ignore = ("placement",) if section == "vc" else ()
            value = from_mapping(SECTIONS[section], item, where, ignore=ignore)
            locations[f"{section} {value.name}"] = where
            placement = _placement(item.get("placement"), where) if section == "vc" else None
            entries[section].append((value, placement) if section == "vc" else value)
    return Inventory(settings, tuple(entries["node"]), tuple(entries["vc"]),
                     tuple(entries["volume"]), locations)


def apply(cluster: Cluster, inventory: Inventory, source: str) -> Cluster:
    """The cluster as the inventory describes it; credentials of owners it keeps stay.

    The nodes go in at once and are validated once (validating after each node made an import
    quadratic); a VC is placed against the nodes, so VCs still go one by one.
    """
    where = source
    try:
        fresh = changes.set_settings(Cluster(generation=cluster.generation, settings=None),
                                     inventory.settings)
        fresh = changes.add_nodes(fresh, inventory.nodes)
        for vc, placement in inventory.vcs:
            where = inventory.locations.get(f"vc {vc.name}", source)
            fresh = changes.define_vc(fresh, vc, placement)
        where = source
        fresh = changes.put_volumes(fresh, inventory.volumes)
    except VlxError as err:
        raise VlxError(err.message, _entry(inventory, err.where) or where) from None
    owners = fresh.secret_owners()
    fresh = dataclasses.replace(fresh, credentials=tuple(
        c for c in cluster.credentials if c.owner in owners))
    return host_keys.with_host_keys(fresh)


def _entry(inventory: Inventory, subject: str | None) -> str | None:
    """The file location of the entry a validation error names ("node node2", "VC green")."""
    if not subject:
        return None
    section, _, name = subject.partition(" ")
    return inventory.locations.get(f"{section.lower()} {name}")


def dump(cluster: Cluster) -> str:
    if cluster.settings is None:
        raise VlxError("the database holds no cluster yet: nothing to export")
    data: dict[str, Any] = {"cluster": to_mapping(cluster.settings)}
    data["node"] = [to_mapping(node) for node in cluster.nodes]
    data["vc"] = [{**to_mapping(vc),
                   "placement": {vm.name: vm.node for vm in cluster.vms_of(vc.name)}}
                  for vc in cluster.vcs]
    data["volume"] = [to_mapping(volume) for volume in cluster.volumes]
    header = (f"# virtualinux inventory, exported at generation {cluster.generation}.\n"
              "# `vlx db import` of this file gives the same cluster.\n\n")
    return header + tomli_w.dumps({k: v for k, v in data.items() if v})


def _placement(value: Any, where: str) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise VlxError("placement must be a table of VM = node", where)
    try:
        return {parse_name(vm): parse_name(node) for vm, node in value.items()}
    except ValueError as err:
        raise VlxError(f"placement: {err}", where) from None


class _Headers:
    """The line of every section header, found once per file, not once per entry."""

    def __init__(self, text: str):
        self.lines: dict[str, list[int]] = {}
        for number, line in enumerate(text.splitlines(), 1):
            match = _HEADER.match(line)
            if match:
                key = match.group(1) or f"[{match.group(2)}]"
                self.lines.setdefault(key, []).append(number)

    def where(self, source: str, section: str, number: int | None, item: Any = None) -> str:
        """`FILE:LINE: [[section]] #N (name)`: the line of the entry's header."""
        headers = self.lines.get(section if number is not None else f"[{section}]", [])
        index = number or 0
        line = f":{headers[index]}" if index < len(headers) else ""
        label = f"[{section}]" if number is None else f"[[{section}]] #{number + 1}"
        if isinstance(item, Mapping) and isinstance(item.get("name"), str):
            label += f" ({item['name']})"
        return f"{source}{line}: {label}"


_HEADER = re.compile(r"^\s*(?:\[\[\s*(\w+)\s*\]\]|\[\s*(\w+)\s*\])")
