"""A replica's local copy of a replicated store: the newest generation, as a SQLite file.

Every boot-service replica serves from a local SQLite file (`Database(path)`, polled by the
daemon), never from etcd directly, so a lost quorum never stops a boot: `ReplicaCopy` follows
the store in a thread (a watch on etcd's head key wakes it at once; a cheap read of the head
every `poll_interval` catches what a broken watch missed and tells whether the store answers)
and brings the file to each newer generation. It never writes an older generation than it
holds.

A new generation costs a replica one etcd round trip and a small SQLite transaction: the watch
event carries head itself; one transaction reads the snapshot head names and only the
change-log entries newer than the copy's generation (all of them if it missed several); and
store_sqlite.advance_copy writes only the rows that differ and those entries, in place, in one
transaction (a crash leaves the old generation whole). The first copy, and any copy that is
damaged, of another schema or changed behind our back, is written whole instead
(store_sqlite.write_copy: new file, fsync, rename).

At start (`prepare`) a local copy that does not open, or has another schema, is refused, said
so, and rebuilt from the store; with the store unreachable, a good local copy is served as is.
A replica that has a good local copy may serve it at once (`open_local`) and leave the catching
up to the thread: the store's client (etcd3gw and the requests stack, ~0.7 s of imports on a
node's emulated CPU) is made on first use, so it is not imported before the first answer.
Imports only vvcm.
"""

from __future__ import annotations

import datetime
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from .db import Database, open_backend
from .errors import VlxError
from .model import STORE_CA_OWNER, Change, Cluster
from .store import StoreUnreachable, StoreUrl
from .store_sqlite import advance_copy, write_copy

if TYPE_CHECKING:
    from .store_etcd import EtcdStore

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0
KEEP_CHANGES = 200          # the newest change-log entries kept in the local copy


class ReplicaCopy:
    def __init__(self, store: StoreUrl, path: Path, poll_interval: float = POLL_INTERVAL):
        if store.scheme != "etcd":
            raise VlxError(f"{store} is not a replicated store: serve a SQLite file "
                           "directly with --db")
        self.url = store
        self.name = str(store)
        self._store: EtcdStore | None = None
        self._opened = False         # the local copy was read (open_local)
        self.path = path
        self.poll_interval = poll_interval
        self.generation = -1
        self.revision = 0            # the store's revision at our last read of head
        self._cluster: Cluster | None = None    # what the local copy holds
        self._pushed: tuple[dict[str, Any], int] | None = None   # head from the watch
        self.copies_written = 0
        self.copies_whole = 0        # of which written whole (first copy, or a rebuild)
        self.rebuilt_reason: str | None = None
        self.unreachable_since: str | None = None
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop_watch: Callable[[], None] | None = None

    @property
    def store(self) -> EtcdStore:
        """The store's client, made on first use (its imports are the cost)."""
        if self._store is None:
            self._store = cast("EtcdStore", open_backend(self.url))
        return self._store

    def open_local(self) -> bool:
        """Read the local copy without asking the store: True if it can be served."""
        self._opened = True
        try:
            if self.path.exists():
                self._cluster = Database(self.path).load()
                self.generation = self._cluster.generation
                self.rebuilt_reason = None
                return True
            self.rebuilt_reason = "none yet"
        except (VlxError, sqlite3.DatabaseError, ValueError, KeyError) as err:
            reason = str(err) if isinstance(err, VlxError) else f"{type(err).__name__}: {err}"
            self.rebuilt_reason = reason
            log.warning("refusing the local copy %s (%s): rebuilding it from %s", self.path,
                        reason, self.name)
        return False

    def prepare(self) -> int:
        """Make sure there is a local copy to serve, as new as the store's if it answers;
        return its generation."""
        if not self._opened:
            self.open_local()
        try:
            self.sync_once(force=self.rebuilt_reason is not None)
        except StoreUnreachable as err:
            if self.rebuilt_reason is not None:
                raise VlxError(f"no usable local copy at {self.path} ({self.rebuilt_reason}) "
                               f"and the store is unreachable: nothing to serve ({err})") from None
            self._unreachable(err)
            log.warning("store unreachable; serving the local copy %s at gen %d", self.path,
                        self.generation)
        return self.generation

    def sync_once(self, force: bool = False,
                  pushed: tuple[dict[str, Any], int] | None = None) -> bool:
        """Copy the store's generation if it is newer than ours; True if a copy was written.
        `pushed`: head as a watch event carried it (else head is read)."""
        for _ in range(3):
            if pushed is None:
                found = self.store.read_head()
                if found is None:
                    raise VlxError(f"{self.name} holds no virtualinux database")
                head, head_revision, self.revision = found
            else:
                head, head_revision = pushed
                pushed = None
            self._reachable()
            generation = int(head["generation"])
            if generation < self.generation:
                log.warning("the store is at gen %d, older than the local copy's gen %d: "
                            "keeping gen %d (a store restored from an old backup?)",
                            generation, self.generation, self.generation)
                return False
            if generation == self.generation and not force:
                return False
            whole = force or self._cluster is None
            fetched = self.store.fetch_generation(head, head_revision,
                                                  -1 if whole else self.generation,
                                                  KEEP_CHANGES)
            if fetched is not None:
                break
            # etcd compacted head's revision and a newer generation replaced the snapshot
        else:
            raise VlxError(f"{self.name}: the store kept changing under three reads")
        cluster, entries = fetched
        if cluster.generation < self.generation:
            return False
        # Every node's boot secrets stay (any replica boots any node); the root CA's key,
        # which only `vlx db tls` needs, stays in the store (cluster_ca.without_ca_key).
        if cluster.credential(STORE_CA_OWNER) is not None:
            # Imported only then: cluster_ca's x509 costs a TCG node ~1 s at every start.
            from .cluster_ca import without_ca_key
            cluster = without_ca_key(cluster)
        self._write(cluster, entries, whole)
        self.generation = cluster.generation
        self.copies_written += 1
        log.info("local copy %s now at gen %d", self.path, self.generation)
        return True

    def _write(self, cluster: Cluster, entries: list[Change], whole: bool) -> None:
        if not whole and self._cluster is not None:
            try:
                advance_copy(self.path, self._cluster, cluster, entries, KEEP_CHANGES,
                             busy_timeout=self.store.timeout * 2)
                self._cluster = cluster
                return
            except (VlxError, sqlite3.DatabaseError) as err:
                if isinstance(err, sqlite3.OperationalError) and "locked" in str(err):
                    raise   # a reader held it too long: try again at the next wake-up
                reason = str(err) if isinstance(err, VlxError) else \
                    f"{type(err).__name__}: {err}"
                self.rebuilt_reason = reason
                log.warning("refusing the local copy %s (%s): rebuilding it from %s",
                            self.path, reason, self.name)
            entries = self.store.changes(KEEP_CHANGES)
            entries = [entry for entry in entries if entry.generation <= cluster.generation]
        write_copy(self.path, cluster, entries)
        self._cluster = cluster
        self.copies_whole += 1

    def start(self) -> None:
        self._thread = threading.Thread(target=self._follow, name="replica-copy", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            # A thread still importing the client has no store timeout yet: 1 s.
            self._thread.join(timeout=(self._store.timeout if self._store else 1.0) * 3)
        self._unwatch()

    def status(self) -> dict[str, Any]:
        if self.unreachable_since:
            message = (f"store unreachable since {self.unreachable_since}, serving gen "
                       f"{self.generation}")
        else:
            message = f"following {self.name}, serving gen {self.generation}"
        return {"url": self.name, "local_copy": str(self.path),
                "generation": self.generation, "reachable": self.unreachable_since is None,
                "unreachable_since": self.unreachable_since, "last_error": self.last_error,
                "copies_written": self.copies_written, "copies_whole": self.copies_whole,
                "rebuilt_because": self.rebuilt_reason,
                "message": message}

    def _follow(self) -> None:
        while not self._stop.is_set():
            woken = self._wake.is_set()
            self._wake.clear()
            pushed, self._pushed = self._pushed, None
            try:
                if self.sync_once(pushed=pushed) and not woken:
                    self._unwatch()   # a change the watch did not report: it is gone
                if self._stop_watch is None:
                    if pushed is not None:
                        self.sync_once()   # a fresh store revision to watch from
                    self._stop_watch = self.store.watch_head(self._pushed_head,
                                                             self.revision)
            except VlxError as err:
                self._unreachable(err)
                self._unwatch()
            except (OSError, sqlite3.Error) as err:
                log.warning("cannot write the local copy %s: %s", self.path, err)
            self._wake.wait(self.poll_interval)

    def _pushed_head(self, head: tuple[dict[str, Any], int] | None) -> None:
        self._pushed = head
        self._wake.set()

    def _unwatch(self) -> None:
        if self._stop_watch is not None:
            self._stop_watch()
            self._stop_watch = None

    def _reachable(self) -> None:
        if self.unreachable_since is not None:
            log.info("store %s reachable again (unreachable since %s)", self.name,
                     self.unreachable_since)
        self.unreachable_since = None

    def _unreachable(self, err: Exception) -> None:
        self.last_error = str(err)
        if self.unreachable_since is None:
            self.unreachable_since = datetime.datetime.now(datetime.UTC).isoformat(
                timespec="seconds")
            log.warning("store unreachable since %s, serving gen %d: %s",
                        self.unreachable_since, self.generation, err)
