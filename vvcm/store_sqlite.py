"""The SQLite backend: one file, written only in whole, validated transactions.

Every write loads the current `Cluster`, applies a pure change, validates the result, stores
the difference, bumps the generation by one and appends to the change log, all in one
`BEGIN IMMEDIATE` transaction: a failed change leaves the file as it was, and a second writer
waits for the first (up to `busy_timeout`) instead of interleaving with it.

`write_copy` writes a whole generation into a new file and renames it into place: how a
replica makes its local copy of an etcd store (replica_copy) and how `vlx db migrate` fills a
SQLite file. `advance_copy` then brings that copy from one generation to the next in place,
writing only what differs, in one transaction.
"""

from __future__ import annotations

import gc
import ipaddress
import json
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path

from .errors import DatabaseBusy, VlxError
from .fields import from_mapping, from_rows, to_mapping
from .model import VM, Change, Cluster, Credential, Node, Settings, VirtualCluster, Volume
from .store import SCHEMA_VERSION, next_generation, now, pause_point, user

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


class SqliteStore:
    def __init__(self, path: Path, busy_timeout: float):
        self.path = path
        self.name = str(path)
        self.busy_timeout = busy_timeout

    def exists(self) -> bool:
        return self.path.exists()

    def create(self, force: bool = False) -> None:
        if self.path.exists() and not force:
            raise VlxError(f"a database exists already at {self.path} (--force starts over)")
        write_copy(self.path, Cluster(0, None), [Change(0, now(), user(), "db init", "")])

    def restore(self, cluster: Cluster, changes: list[Change]) -> None:
        if self.path.exists() and self.generation() != 0:
            raise VlxError(f"{self.path} holds a database at generation {self.generation()}: "
                           "migrate into a new file or an empty one only")
        write_copy(self.path, cluster, changes)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        if not self.path.exists():
            raise VlxError(f"no database at {self.path}: run `vlx db init` first "
                           "(or name another with --db PATH, VLX_DB or --store URL)")
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
                new = next_generation(old, change)
                if new is None:
                    conn.execute("ROLLBACK")
                    return old
                _store(conn, old, new)
                conn.execute("UPDATE meta SET value = ? WHERE key = 'generation'",
                             (str(new.generation),))
                conn.execute("INSERT INTO changes VALUES (?, ?, ?, ?, ?)",
                             (new.generation, now(), user(), action, detail))
                conn.execute("COMMIT")
                return new
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def changes(self, limit: int | None = 20) -> list[Change]:
        with self._connect() as conn:
            rows = conn.execute("SELECT generation, time, user, action, detail FROM changes "
                                "ORDER BY generation DESC LIMIT ?",
                                (-1 if limit is None else limit,)).fetchall()
        return [Change(*row) for row in reversed(rows)]


def _generation(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])


def _load(conn: sqlite3.Connection) -> Cluster:
    with _no_cyclic_gc():
        return _decode(conn)


@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """The cyclic garbage collector paused while a generation is decoded.

    Why: decoding 10,000 nodes allocates some 100,000 objects, none in a cycle, and the
    allocations alone start full collections that walk the whole heap for nothing: a sixth of
    a `vlx node add` at 10,000 nodes (bench.scale). Reference counting still frees
    everything; the collector is switched back on only if it was on (threads overlapping
    here leave it on)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _decode(conn: sqlite3.Connection) -> Cluster:
    row = conn.execute("SELECT data FROM settings").fetchone()
    settings = from_mapping(Settings, json.loads(row[0]), "database settings") if row else None
    nodes = _items(conn, "nodes", Node)
    vcs = _items(conn, "vcs", VirtualCluster)
    vc_order = {vc.name: pos for pos, vc in enumerate(vcs)}
    vms = sorted((VM(name, vc, idx, node, mac, ipaddress.IPv4Address(ip), volume)
                  for name, vc, idx, node, mac, ip, volume in conn.execute(
                      "SELECT name, vc, idx, node, mac, ip, volume FROM vms")),
                 key=lambda vm: (vc_order[vm.vc], vm.index))
    volumes = _items(conn, "volumes", Volume)
    credentials = tuple(Credential(*row) for row in conn.execute(
        "SELECT owner, username, secret FROM credentials ORDER BY owner"))
    return Cluster(_generation(conn), settings, nodes, vcs, tuple(vms), volumes, credentials)


def _items(conn: sqlite3.Connection, table: str, cls: type) -> tuple:
    rows = conn.execute(f"SELECT name, data FROM {table} ORDER BY pos").fetchall()
    # One json.loads for the whole table, not one per row: a third of the cost at 10,000 rows.
    data = json.loads("[" + ",".join(row[1] for row in rows) + "]")
    return from_rows(cls, ((name, item) for (name, _), item in zip(rows, data, strict=True)),
                     f"database {table[:-1]}")


def write_copy(path: Path, cluster: Cluster, changes: Sequence[Change]) -> None:
    """`path` holding exactly `cluster` and `changes`, swapped in whole: a reader sees the old
    file or the new one, never a mix, and a crash leaves the old one (or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fresh = path.with_name(f".{path.name}.{os.getpid()}.new")
    fresh.unlink(missing_ok=True)
    try:
        with closing(sqlite3.connect(fresh, isolation_level=None)) as conn:
            # No journal and no syncs while the file is built: nobody sees it before the
            # rename, and it is fsynced once, whole, just before.
            conn.execute("PRAGMA journal_mode = OFF")
            conn.execute("PRAGMA synchronous = OFF")
            conn.executescript(SCHEMA)
            conn.execute("BEGIN")
            _store(conn, Cluster(0, None), cluster)
            conn.execute("UPDATE meta SET value = ? WHERE key = 'generation'",
                         (str(cluster.generation),))
            conn.executemany("INSERT INTO changes VALUES (?, ?, ?, ?, ?)",
                             [(c.generation, c.time, c.user, c.action, c.detail)
                              for c in changes])
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        os.chmod(fresh, 0o640)  # it holds CHAP secrets
        with open(fresh, "rb") as file:
            os.fsync(file.fileno())
        os.replace(fresh, path)
    except BaseException:
        fresh.unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)   # the rename itself survives a power cut
    finally:
        os.close(directory)


class CopyMismatch(VlxError):
    """The local copy is not the generation its owner thinks (changed behind its back)."""


def advance_copy(path: Path, old: Cluster, new: Cluster, changes: Sequence[Change],
                 keep: int, busy_timeout: float) -> None:
    """The copy at `path`, which holds `old`, brought to `new` in place: the rows that differ,
    the change-log entries `changes` (those newer than `old`), and the log cut to its newest
    `keep` entries, in ONE transaction of SQLite's rollback journal. A crash at any point
    leaves `old` whole (the next opener rolls the journal back), and readers see `old` or
    `new`, never a mix. Raises CopyMismatch if the file is not at `old`'s generation, VlxError
    if it is not a copy of our schema, sqlite3.Error if it is damaged: rebuild it then."""
    with SqliteStore(path, busy_timeout)._connect() as conn:
        conn.execute("BEGIN IMMEDIATE")
        try:
            if _generation(conn) != old.generation:
                raise CopyMismatch(f"{path} is at gen {_generation(conn)}, not at gen "
                                   f"{old.generation} as last written")
            _store(conn, old, new)
            conn.execute("UPDATE meta SET value = ? WHERE key = 'generation'",
                         (str(new.generation),))
            conn.executemany("INSERT OR REPLACE INTO changes VALUES (?, ?, ?, ?, ?)",
                             [(c.generation, c.time, c.user, c.action, c.detail)
                              for c in changes])
            conn.execute("DELETE FROM changes WHERE generation NOT IN (SELECT generation FROM "
                         "changes ORDER BY generation DESC LIMIT ?)", (keep,))
            pause_point("copy-before-commit")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise


def _store(conn: sqlite3.Connection, old: Cluster, new: Cluster) -> None:
    """Write what differs between `old` and `new`."""
    if new.settings != old.settings:
        conn.execute("DELETE FROM settings")
        if new.settings is not None:
            conn.execute("INSERT INTO settings VALUES (1, ?)", (_json(new.settings),))
    # Children before parents on delete, parents before children on insert.
    _store_rows(conn, "vms", old.vms, new.vms, _vm_row, delete_only=True)
    for table, before, after in (("volumes", old.volumes, new.volumes),
                                 ("vcs", old.vcs, new.vcs), ("nodes", old.nodes, new.nodes)):
        _store_rows(conn, table, before, after,
                    lambda pos, item: (item.name, pos, _json(item)))
    _store_rows(conn, "vms", old.vms, new.vms, _vm_row)
    if new.credentials != old.credentials:
        conn.execute("DELETE FROM credentials")
        conn.executemany("INSERT INTO credentials VALUES (?, ?, ?)",
                         [(c.owner, c.username, c.secret) for c in new.credentials])


def _vm_row(pos: int, vm: VM) -> tuple:
    return (vm.name, vm.vc, vm.index, vm.node, vm.mac, str(vm.ip), vm.volume)


def _store_rows(conn: sqlite3.Connection, table: str, before, after, row: Callable,
                delete_only: bool = False) -> None:
    # Items are compared as values (position included), and only the rows that differ are
    # encoded: a one-node change to a 10,000-node cluster encodes one row, not 20,000.
    old_items = {item.name: (pos, item) for pos, item in enumerate(before)}
    new_items = {item.name: (pos, item) for pos, item in enumerate(after)}
    gone = [name for name, value in old_items.items() if _differs(new_items.get(name), value)]
    conn.executemany(f"DELETE FROM {table} WHERE name = ?", [(name,) for name in gone])
    if delete_only:
        return
    fresh = [row(*value) for name, value in new_items.items()
             if _differs(old_items.get(name), value)]
    if fresh:
        placeholders = ", ".join("?" * len(fresh[0]))
        conn.executemany(f"INSERT INTO {table} VALUES ({placeholders})", fresh)


def _differs(a: tuple | None, b: tuple) -> bool:
    """(position, item) pairs compared as values; a change keeps the items it does not touch
    as the same objects, so identity answers for nearly all of them without comparing
    every field."""
    return a is None or a[0] != b[0] or (a[1] is not b[1] and a[1] != b[1])


def _json(item: object) -> str:
    return json.dumps(to_mapping(item), sort_keys=True)
