"""The one small interface every database backend implements, and the store URLs naming them.

    sqlite:PATH                       one SQLite file on this machine (store_sqlite)
    etcd://HOST:PORT[,HOST:PORT...]   etcd's v3 API, replicated by Raft (store_etcd)

`Database` (db.py) picks a backend by URL and adds nothing to it; the change model is shared
here: a change is a pure function from one `Cluster` to the next, and `next_generation` is
what every backend does with one (no-op if nothing changed, else generation + 1).
"""

from __future__ import annotations

import dataclasses
import datetime
import getpass
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from .errors import VlxError
from .model import Change, Cluster

# The layout of what a backend stores; a store or local copy with another number is refused.
SCHEMA_VERSION = 1


class Backend(Protocol):
    name: str            # what messages call it: a path or a URL

    def exists(self) -> bool: ...

    def create(self, force: bool) -> None: ...

    def generation(self) -> int: ...

    def load(self) -> Cluster: ...

    def update(self, action: str, detail: str,
               change: Callable[[Cluster], Cluster]) -> Cluster: ...

    def changes(self, limit: int | None) -> list[Change]: ...

    def restore(self, cluster: Cluster, changes: list[Change]) -> None:
        """Fill an empty store with `cluster` and its change log (`vlx db migrate`)."""


class StoreUnreachable(VlxError):
    """No endpoint of the store answered (connection refused, timed out, no quorum)."""


@dataclasses.dataclass(frozen=True)
class StoreUrl:
    scheme: str                                  # "sqlite" or "etcd"
    path: Path | None = None                     # sqlite
    endpoints: tuple[tuple[str, int], ...] = ()  # etcd

    def __str__(self) -> str:
        if self.scheme == "sqlite":
            return f"sqlite:{self.path}"
        return "etcd://" + ",".join(f"{host}:{port}" for host, port in self.endpoints)


def parse_url(text: str, where: str = "--store") -> StoreUrl:
    """`sqlite:PATH` or `etcd://HOST:PORT[,HOST:PORT...]`; anything else is one clear error."""
    if text.startswith("sqlite:"):
        path = text[len("sqlite:"):]
        if path.startswith("//"):
            path = path[2:]
        if not path:
            raise VlxError(f"{text!r}: name the file, like sqlite:/var/lib/virtualinux/"
                           "cluster.db", where)
        return StoreUrl("sqlite", path=Path(path))
    if text.startswith("etcd://"):
        rest = text[len("etcd://"):].rstrip("/")
        endpoints = []
        for part in rest.split(","):
            host, sep, port = part.strip().rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                shown = repr(part.strip()) if part.strip() else "an empty endpoint"
                raise VlxError(f"{text!r}: {shown} is not HOST:PORT "
                               "(etcd://198.18.0.11:2379,198.18.0.12:2379)", where)
            endpoints.append((host.strip("[]"), int(port)))
        return StoreUrl("etcd", endpoints=tuple(endpoints))
    raise VlxError(f"{text!r} is not a store URL: use sqlite:PATH or "
                   "etcd://HOST:PORT[,HOST:PORT...]", where)


def next_generation(old: Cluster, change: Callable[[Cluster], Cluster]) -> Cluster | None:
    """The cluster after `change`, one generation on; None if the change changes nothing."""
    new = change(old)
    if dataclasses.replace(old, generation=0) == dataclasses.replace(new, generation=0):
        return None
    return dataclasses.replace(new, generation=old.generation + 1)


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def user() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


def pause_point(point: str) -> None:
    """Fault injection for the tests: stop this process at `point` of a write
    (VLX_STORE_PAUSE_AT=point), so a test can SIGKILL it exactly there."""
    if os.environ.get("VLX_STORE_PAUSE_AT") == point:
        print(f"vlx: paused at {point}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGSTOP)
