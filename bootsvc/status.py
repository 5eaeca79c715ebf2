"""What a running replica reports: one typed structure, written by the daemon as `STATUS_FILE`
in its state directory about once a second, and read by `vlx bootsvc status`, the lab, the
tests and the benches (`read_status`, `wait_running`).

    {"state": "running", "pid": 812, "generation": 7, ...,
     "services": {"dhcp": {"port": 67, "counters": {"ack": 3}, "details": {...}}, ...}}

It grows without breaking readers: a service adds counters and a `details()` dict of its own;
a new part of the daemon (the database store, say) adds a field with a default here, and
`from_json` fills what an older writer did not write with that default and ignores keys it does
not know. Imports nothing of the project but its errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import enum
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from virtualinux.vvcm import VlxError

STATUS_FILE = "status.json"


class State(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"      # every service bound its sockets
    STOPPED = "stopped"      # stopped cleanly; the counters are the final ones
    DEAD = "dead"            # said running, but its process is gone (killed)


@dataclasses.dataclass(frozen=True)
class ServiceStatus:
    port: int | None = None
    counters: dict[str, int] = dataclasses.field(default_factory=dict)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ServiceStatus:
        return cls(port=data.get("port"), counters=dict(data.get("counters", {})),
                   details=dict(data.get("details", {})))


@dataclasses.dataclass(frozen=True)
class Status:
    state: State
    pid: int
    interface: str
    address: str
    node: str | None = None
    database: str = ""
    generation: int = -1
    reloads: int = 0
    stale_generations_refused: int = 0
    database_unreadable: int = 0     # polls that found the database unreadable
    started: str = ""
    updated: str = ""
    services: dict[str, ServiceStatus] = dataclasses.field(default_factory=dict)
    # Where a replica of a replicated store gets its local copy (vvcm.replica_copy): reachable
    # or since when not, and the generation served; None for a plain database file.
    store: dict[str, Any] | None = None

    @property
    def ports(self) -> dict[str, int]:
        """The port each listening service bound, by service name."""
        return {name: service.port for name, service in self.services.items()
                if service.port is not None}

    def counters(self, service: str) -> dict[str, int]:
        """A service's counters; empty if it does not run here."""
        found = self.services.get(service)
        return dict(found.counters) if found else {}

    def details(self, service: str) -> dict[str, Any]:
        found = self.services.get(service)
        return dict(found.details) if found else {}

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Status:
        known = {field.name for field in dataclasses.fields(cls)}
        values = {key: value for key, value in data.items() if key in known}
        values["state"] = State(values["state"])
        values["services"] = {name: ServiceStatus.from_json(service)
                              for name, service in data.get("services", {}).items()}
        return cls(**values)

    def write(self, state_dir: Path) -> None:
        """Atomically: a reader sees the old file or the new one, never half of one."""
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / STATUS_FILE
        fresh = path.with_name(path.name + ".new")
        fresh.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(fresh, path)


def read_status(state_dir: Path) -> Status:
    """The replica's status; `State.DEAD` if it says running but its process is gone."""
    path = state_dir / STATUS_FILE
    try:
        data = json.loads(path.read_text())
        status = Status.from_json(data)
    except FileNotFoundError:
        raise VlxError(f"no status at {path}: is `vlx bootsvc run` running with this "
                       "--state-dir?") from None
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise VlxError(f"cannot read {path}: {err}") from None
    if status.state in (State.STARTING, State.RUNNING) and not pid_alive(status.pid):
        status = dataclasses.replace(status, state=State.DEAD)   # killed, no chance to say so
    return status


def wait_running(state_dir: Path, pid: int, timeout: float,
                 exited: Callable[[], bool] = lambda: False) -> Status:
    """Until the replica with process id `pid` says it runs (every service bound): its status.
    VlxError if `exited()` says the process ended first, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(VlxError):
            status = read_status(state_dir)
            if status.pid == pid and status.state == State.RUNNING:
                return status
        if exited():
            raise VlxError(f"the replica (pid {pid}) exited before it ran")
        if time.monotonic() > deadline:
            raise VlxError(f"the replica (pid {pid}) did not run within {timeout:g} s")
        time.sleep(0.05)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
