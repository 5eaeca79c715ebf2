"""The cluster database: one `Cluster` per generation, changed only by whole, validated changes.

`Database` is what the rest of virtualinux calls (load, generation, update, changes, create).
It holds one backend chosen by store URL (store.py): a SQLite file (store_sqlite, the default,
today's one-machine database) or etcd (store_etcd, replicated by Raft). Which one is chosen:

    Database(path)                a SQLite file at `path` (a replica's local copy, the tests)
    Database(store="URL")         that store
    Database()                    $VLX_STORE if set, else the SQLite file $VLX_DB or DEFAULT_PATH
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from .errors import VlxError
from .model import Change, Cluster
from .store import Backend, StoreUrl, parse_url

DEFAULT_PATH = Path("/var/lib/virtualinux/cluster.db")
# How long a writer waits for another to finish before giving up cleanly (SQLite).
BUSY_TIMEOUT = float(os.environ.get("VLX_DB_TIMEOUT", "30"))


def default_path() -> Path:
    return Path(os.environ.get("VLX_DB") or DEFAULT_PATH)


def default_url() -> StoreUrl:
    if os.environ.get("VLX_STORE"):
        return parse_url(os.environ["VLX_STORE"], "VLX_STORE")
    return StoreUrl("sqlite", path=default_path())


def open_backend(url: StoreUrl, busy_timeout: float = BUSY_TIMEOUT) -> Backend:
    if url.scheme == "sqlite":
        from .store_sqlite import SqliteStore
        assert url.path is not None
        return SqliteStore(url.path, busy_timeout)
    from .store_etcd import EtcdStore  # imports etcd3gw: only when etcd is named
    return EtcdStore(url)


class Database:
    def __init__(self, path: Path | str | None = None, busy_timeout: float = BUSY_TIMEOUT,
                 store: str | StoreUrl | None = None):
        if path is not None and store is not None:
            raise VlxError("name the database with --db PATH or --store URL, not both")
        if path is not None:
            self.url = StoreUrl("sqlite", path=Path(path))
        elif store is not None:
            self.url = parse_url(store) if isinstance(store, str) else store
        else:
            self.url = default_url()
        self.backend = open_backend(self.url, busy_timeout)
        # The file of a SQLite store (None for etcd): the boot services' local copy, the lab.
        self.path: Path | None = self.url.path

    @property
    def name(self) -> str:
        return self.backend.name

    @classmethod
    def create(cls, path: Path | str | None = None, force: bool = False,
               store: str | StoreUrl | None = None) -> Database:
        db = cls(path, store=store)
        db.backend.create(force)
        return db

    def exists(self) -> bool:
        return self.backend.exists()

    def generation(self) -> int:
        return self.backend.generation()

    def load(self) -> Cluster:
        return self.backend.load()

    def update(self, action: str, detail: str,
               change: Callable[[Cluster], Cluster]) -> Cluster:
        """Apply `change` to the current cluster as one transaction and one generation."""
        return self.backend.update(action, detail, change)

    def changes(self, limit: int | None = 20) -> list[Change]:
        return self.backend.changes(limit)

    def migrate_to(self, target: Database) -> Cluster:
        """Copy this database, generation and change log included, into an empty `target`."""
        cluster = self.load()
        history = [c for c in self.changes(None) if c.generation <= cluster.generation]
        target.backend.restore(cluster, history)
        return cluster
