"""The lab's record of everything it made, kept in its state directory.

`vlx lab up` writes an entry here *before* it makes the thing (a namespace, a process, a tap),
and fills in what it learns after (a pid and its start time), so `vlx lab down` can remove all
of it also when `up` crashed half-way. The record is one JSON file, `lab.json`, replaced
atomically (write, fsync, rename) on every change: a crash leaves the old or the new record,
never a torn one. Everything else the lab writes lives under the same directory, which `down`
removes last.

Imports nothing of the project.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

RECORD = "lab.json"
FORMAT = 1


class StateError(Exception):
    """The state directory holds something that is not a lab record we can read."""


@dataclasses.dataclass
class ProcessEntry:
    """A process the lab starts: its role (`replica-r1`, `qemu-node1`), the namespace it runs
    in, and, once started, its pid and the kernel's start time of that pid (so `down` never
    signals an unrelated process that got the same pid after a reboot or a long time)."""

    role: str
    netns: str
    pid: int | None = None
    start_time: int | None = None


@dataclasses.dataclass
class LabRecord:
    state_dir: Path
    prefix: str
    phase: str = "starting"          # starting -> up; down removes the record
    firmware: str = "bios"
    namespaces: list[str] = dataclasses.field(default_factory=list)
    processes: list[ProcessEntry] = dataclasses.field(default_factory=list)
    # What `status` needs without the database: node name -> {mac, ip, ...}, replicas likewise.
    nodes: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    replicas: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    started: float = 0.0
    image: str = "tiny"
    # The node image's lab: its SAN (portal, control port, pool and backing file), the
    # store's URL as the nodes use it, and the bootstrap's address.
    san: dict[str, Any] = dataclasses.field(default_factory=dict)
    store: str | None = None

    @property
    def path(self) -> Path:
        return self.state_dir / RECORD

    def save(self) -> None:
        data = {"format": FORMAT, "prefix": self.prefix, "phase": self.phase,
                "firmware": self.firmware, "started": self.started,
                "namespaces": self.namespaces,
                "processes": [dataclasses.asdict(p) for p in self.processes],
                "nodes": self.nodes, "replicas": self.replicas, "image": self.image,
                "san": self.san, "store": self.store}
        fresh = self.path.with_name(RECORD + ".new")
        with open(fresh, "w") as file:
            json.dump(data, file, indent=2)
            file.write("\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(fresh, self.path)

    @classmethod
    def load(cls, state_dir: Path) -> LabRecord | None:
        """The record in `state_dir`, or None when there is none."""
        path = state_dir / RECORD
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise StateError(f"cannot read {path}: {err}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise StateError(f"{path} is not a lab record of format {FORMAT}")
        try:
            return cls(state_dir=state_dir, prefix=str(data["prefix"]),
                       phase=str(data["phase"]), firmware=str(data.get("firmware", "bios")),
                       started=float(data.get("started", 0.0)),
                       namespaces=[str(n) for n in data["namespaces"]],
                       processes=[ProcessEntry(**p) for p in data["processes"]],
                       nodes=dict(data.get("nodes", {})),
                       replicas=dict(data.get("replicas", {})),
                       image=str(data.get("image", "tiny")), san=dict(data.get("san", {})),
                       store=data.get("store"))
        except (KeyError, TypeError, ValueError) as err:
            raise StateError(f"{path} is damaged: {err!r}") from None

    def add_namespace(self, name: str) -> None:
        self.namespaces.append(name)
        self.save()

    def add_process(self, role: str, netns: str) -> ProcessEntry:
        entry = ProcessEntry(role, netns)
        self.processes.append(entry)
        self.save()
        return entry

    def process(self, role: str) -> ProcessEntry | None:
        return next((p for p in self.processes if p.role == role), None)


def process_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot), or None if there is no such pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[19])


def same_process(entry: ProcessEntry) -> bool:
    """Whether entry's pid still names the process the lab started."""
    if entry.pid is None:
        return False
    now = process_start_time(entry.pid)
    return now is not None and (entry.start_time is None or now == entry.start_time)
