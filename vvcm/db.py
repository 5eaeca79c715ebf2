"""The cluster database: one SQLite file, written only in whole, validated transactions.

Every write loads the current `Cluster`, applies a pure change from `changes`, validates the
result, stores the difference, bumps the generation by one and appends to the change log, all
in one `BEGIN IMMEDIATE` transaction: a failed change leaves the file as it was, and a second
writer waits for the first (up to `BUSY_TIMEOUT`) instead of interleaving with it.
"""

from __future__ import annotations

import dataclasses
import datetime
import getpass
import ipaddress
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

from .errors import DatabaseBusy, VlxError
from .fields import from_mapping, to_mapping
from .model import VM, Change, Cluster, Credential, Node, Settings, VirtualCluster, Volume

DEFAULT_PATH = Path("/var/lib/virtualinux/cluster.db")
SCHEMA_VERSION = 1
# How long a writer waits for another to finish before giving up cleanly.
BUSY_TIMEOUT = float(os.environ.get("VLX_DB_TIMEOUT", "30"))

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE settings (id INTEGER PRIMARY KEY CHECK (id = 1), data TEXT NOT NULL);
CREATE TABLE nodes (name TEXT PRIMARY KEY, pos INTEGER NOT NULL, data TEXT NOT NULL);
CREATE TABLE vcs (name TEXT PRIMARY KEY, pos INTEGER NOT NULL, data TEXT NOT NULL);
CREATE TABLE vms (name TEXT PRIMARY KEY, vc TEXT NOT NULL REFERENCES vcs(name),
                  idx INTEGER NOT NULL, node TEXT NOT NULL REFERENCES nodes(name),
                  mac TEXT NOT NULL UNIQUE, ip TEXT NOT NULL, volume TEXT);
CREATE TABLE volumes (name TEXT PRIMARY KEY, pos INTEGER NOT NULL, data TEXT NOT NULL);
CREATE TABLE credentials (owner TEXT PRIMARY KEY, username TEXT NOT NULL,
                          secret TEXT NOT NULL);
CREATE TABLE changes (generation INTEGER PRIMARY KEY, time TEXT NOT NULL, user TEXT NOT NULL,
                      action TEXT NOT NULL, detail TEXT NOT NULL);
INSERT INTO meta VALUES ('generation', '0');
"""


def default_path() -> Path:
    return Path(os.environ.get("VLX_DB") or DEFAULT_PATH)


class Database:
    def __init__(self, path: Path | str | None = None, busy_timeout: float = BUSY_TIMEOUT):
        self.path = Path(path) if path else default_path()
        self.busy_timeout = busy_timeout

    @classmethod
    def create(cls, path: Path | str | None = None, force: bool = False) -> Database:
        db = cls(path)
        if db.path.exists() and not force:
            raise VlxError(f"a database exists already at {db.path} (--force starts over)")
        db.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = db.path.with_name(db.path.name + ".new")
        fresh.unlink(missing_ok=True)
        with closing(sqlite3.connect(fresh)) as conn:
            conn.executescript(SCHEMA)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("INSERT INTO changes VALUES (0, ?, ?, 'db init', '')",
                         (_now(), _user()))
            conn.commit()
        os.chmod(fresh, 0o640)  # it holds CHAP secrets
        os.replace(fresh, db.path)
        return db

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        if not self.path.exists():
            raise VlxError(f"no database at {self.path}: run `vlx db init` first "
                           "(or name another with --db PATH or VLX_DB)")
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout, isolation_level=None)
        try:
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
            except sqlite3.DatabaseError as err:
                raise VlxError(f"{self.path} is not a virtualinux database ({err})") from None
            if version != SCHEMA_VERSION:
                raise VlxError(f"{self.path} has schema version {version}; this vlx knows "
                               f"{SCHEMA_VERSION}")
            yield conn
        finally:
            conn.close()

    def generation(self) -> int:
        with self._connect() as conn:
            return _generation(conn)

    def load(self) -> Cluster:
        with self._connect() as conn:
            conn.execute("BEGIN")
            try:
                return _load(conn)
            finally:
                conn.execute("COMMIT")

    def update(self, action: str, detail: str,
               change: Callable[[Cluster], Cluster]) -> Cluster:
        """Apply `change` to the current cluster as one transaction and one generation."""
        with self._connect() as conn:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as err:
                raise DatabaseBusy(
                    f"{self.path} stayed locked by another writer for {self.busy_timeout:g} s "
                    f"({err}); nothing was changed") from None
            try:
                old = _load(conn)
                new = change(old)
                if _same_content(old, new):
                    conn.execute("ROLLBACK")
                    return old
                new = dataclasses.replace(new, generation=old.generation + 1)
                _store(conn, old, new)
                conn.execute("UPDATE meta SET value = ? WHERE key = 'generation'",
                             (str(new.generation),))
                conn.execute("INSERT INTO changes VALUES (?, ?, ?, ?, ?)",
                             (new.generation, _now(), _user(), action, detail))
                conn.execute("COMMIT")
                return new
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def changes(self, limit: int = 20) -> list[Change]:
        with self._connect() as conn:
            rows = conn.execute("SELECT generation, time, user, action, detail FROM changes "
                                "ORDER BY generation DESC LIMIT ?", (limit,)).fetchall()
        return [Change(*row) for row in reversed(rows)]


def _generation(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])


def _load(conn: sqlite3.Connection) -> Cluster:
    where = "database"
    row = conn.execute("SELECT data FROM settings").fetchone()
    settings = from_mapping(Settings, json.loads(row[0]), f"{where} settings") if row else None
    nodes = tuple(from_mapping(Node, json.loads(data), f"{where} node {name}")
                  for name, data in conn.execute("SELECT name, data FROM nodes ORDER BY pos"))
    vcs = tuple(from_mapping(VirtualCluster, json.loads(data), f"{where} vc {name}")
                for name, data in conn.execute("SELECT name, data FROM vcs ORDER BY pos"))
    vc_order = {vc.name: pos for pos, vc in enumerate(vcs)}
    vms = sorted((VM(name, vc, idx, node, mac, ipaddress.IPv4Address(ip), volume)
                  for name, vc, idx, node, mac, ip, volume in conn.execute(
                      "SELECT name, vc, idx, node, mac, ip, volume FROM vms")),
                 key=lambda vm: (vc_order[vm.vc], vm.index))
    volumes = tuple(from_mapping(Volume, json.loads(data), f"{where} volume {name}")
                    for name, data in conn.execute("SELECT name, data FROM volumes "
                                                   "ORDER BY pos"))
    credentials = tuple(Credential(*row) for row in conn.execute(
        "SELECT owner, username, secret FROM credentials ORDER BY owner"))
    return Cluster(_generation(conn), settings, nodes, vcs, tuple(vms), volumes, credentials)


def _store(conn: sqlite3.Connection, old: Cluster, new: Cluster) -> None:
    """Write what differs between `old` and `new`."""
    if new.settings != old.settings:
        conn.execute("DELETE FROM settings")
        if new.settings is not None:
            conn.execute("INSERT INTO settings VALUES (1, ?)", (_json(new.settings),))
    # Children before parents on delete, parents before children on insert.
    _store_rows(conn, "vms", old.vms, new.vms, lambda pos, vm: (
        vm.name, vm.vc, vm.index, vm.node, vm.mac, str(vm.ip), vm.volume), delete_only=True)
    for table, before, after in (("volumes", old.volumes, new.volumes),
                                 ("vcs", old.vcs, new.vcs), ("nodes", old.nodes, new.nodes)):
        _store_rows(conn, table, before, after,
                    lambda pos, item: (item.name, pos, _json(item)))
    _store_rows(conn, "vms", old.vms, new.vms, lambda pos, vm: (
        vm.name, vm.vc, vm.index, vm.node, vm.mac, str(vm.ip), vm.volume))
    if new.credentials != old.credentials:
        conn.execute("DELETE FROM credentials")
        conn.executemany("INSERT INTO credentials VALUES (?, ?, ?)",
                         [(c.owner, c.username, c.secret) for c in new.credentials])


def _store_rows(conn: sqlite3.Connection, table: str, before, after, row: Callable,
                delete_only: bool = False) -> None:
    old_rows = {item.name: row(pos, item) for pos, item in enumerate(before)}
    new_rows = {item.name: row(pos, item) for pos, item in enumerate(after)}
    gone = [name for name, values in old_rows.items() if new_rows.get(name) != values]
    conn.executemany(f"DELETE FROM {table} WHERE name = ?", [(name,) for name in gone])
    if delete_only:
        return
    placeholders = ", ".join("?" * len(next(iter(new_rows.values()), ())))
    fresh = [values for name, values in new_rows.items() if old_rows.get(name) != values]
    if fresh:
        conn.executemany(f"INSERT INTO {table} VALUES ({placeholders})", fresh)


def _same_content(a: Cluster, b: Cluster) -> bool:
    return dataclasses.replace(a, generation=0) == dataclasses.replace(b, generation=0)


def _json(item: object) -> str:
    return json.dumps(to_mapping(item), sort_keys=True)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _user() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()
