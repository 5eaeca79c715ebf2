"""A replica's local copy of a replicated store: the newest generation, as a SQLite file.

Every boot-service replica serves from a local SQLite file (`Database(path)`, polled by the
daemon), never from etcd directly, so a lost quorum never stops a boot: `ReplicaCopy` follows
the store in a thread (a watch on etcd's head key wakes it at once; a cheap read of the head
every `poll_interval` catches what a broken watch missed and tells whether the store answers)
and writes each newer generation into the file atomically (store_sqlite.write_copy: new file,
fsync, rename). It never writes an older generation than it holds.

At start (`prepare`) a local copy that does not open, or has another schema, is refused, said
so, and rebuilt from the store; with the store unreachable, a good local copy is served as is.
Imports only vvcm.
"""

from __future__ import annotations

import datetime
import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .cluster_ca import without_ca_key
from .db import Database
from .errors import VlxError
from .store_etcd import EtcdStore, StoreUnreachable
from .store_sqlite import write_copy

log = logging.getLogger(__name__)

POLL_INTERVAL = 1.0
KEEP_CHANGES = 200          # the newest change-log entries kept in the local copy


class ReplicaCopy:
    def __init__(self, store: Database, path: Path, poll_interval: float = POLL_INTERVAL):
        if not isinstance(store.backend, EtcdStore):
            raise VlxError(f"{store.name} is not a replicated store: serve a SQLite file "
                           "directly with --db")
        self.store: EtcdStore = store.backend
        self.path = path
        self.poll_interval = poll_interval
        self.generation = -1
        self.revision = 0
        self.copies_written = 0
        self.rebuilt_reason: str | None = None
        self.unreachable_since: str | None = None
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stop_watch: Callable[[], None] | None = None

    def prepare(self) -> int:
        """Make sure there is a local copy to serve; return its generation."""
        try:
            if self.path.exists():
                self.generation = Database(self.path).load().generation
            else:
                self.rebuilt_reason = "none yet"
        except (VlxError, sqlite3.DatabaseError, ValueError, KeyError) as err:
            reason = str(err) if isinstance(err, VlxError) else f"{type(err).__name__}: {err}"
            self.rebuilt_reason = reason
            log.warning("refusing the local copy %s (%s): rebuilding it from %s", self.path,
                        reason, self.store.name)
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

    def sync_once(self, force: bool = False) -> bool:
        """Copy the store's generation if it is newer than ours; True if a copy was written."""
        found = self.store.read_head()
        if found is None:
            raise VlxError(f"{self.store.name} holds no virtualinux database")
        head, revision = found
        generation = int(head["generation"])
        self.revision = revision
        self._reachable()
        if generation < self.generation:
            log.warning("the store is at gen %d, older than the local copy's gen %d: keeping "
                        "gen %d (a store restored from an old backup?)", generation,
                        self.generation, self.generation)
            return False
        if generation == self.generation and not force:
            return False
        cluster = self.store.load_head(head, revision)
        if cluster.generation < self.generation:
            return False
        # Every node's boot secrets stay (any replica boots any node); the root CA's key,
        # which only `vlx db tls` needs, stays in the store (cluster_ca.without_ca_key).
        write_copy(self.path, without_ca_key(cluster), self.store.changes(KEEP_CHANGES))
        self.generation = cluster.generation
        self.copies_written += 1
        log.info("local copy %s now at gen %d", self.path, self.generation)
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._follow, name="replica-copy", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=self.store.timeout * 3)
        self._unwatch()

    def status(self) -> dict[str, Any]:
        if self.unreachable_since:
            message = (f"store unreachable since {self.unreachable_since}, serving gen "
                       f"{self.generation}")
        else:
            message = f"following {self.store.name}, serving gen {self.generation}"
        return {"url": self.store.name, "local_copy": str(self.path),
                "generation": self.generation, "reachable": self.unreachable_since is None,
                "unreachable_since": self.unreachable_since, "last_error": self.last_error,
                "copies_written": self.copies_written, "rebuilt_because": self.rebuilt_reason,
                "message": message}

    def _follow(self) -> None:
        while not self._stop.is_set():
            woken = self._wake.is_set()
            self._wake.clear()
            try:
                if self.sync_once() and not woken:
                    self._unwatch()   # a change the watch did not report: it is gone
                if self._stop_watch is None:
                    self._stop_watch = self.store.watch_head(self._wake.set, self.revision)
            except VlxError as err:
                self._unreachable(err)
                self._unwatch()
            except (OSError, sqlite3.Error) as err:
                log.warning("cannot write the local copy %s: %s", self.path, err)
            self._wake.wait(self.poll_interval)

    def _unwatch(self) -> None:
        if self._stop_watch is not None:
            self._stop_watch()
            self._stop_watch = None

    def _reachable(self) -> None:
        if self.unreachable_since is not None:
            log.info("store %s reachable again (unreachable since %s)", self.store.name,
                     self.unreachable_since)
        self.unreachable_since = None

    def _unreachable(self, err: Exception) -> None:
        self.last_error = str(err)
        if self.unreachable_since is None:
            self.unreachable_since = datetime.datetime.now(datetime.UTC).isoformat(
                timespec="seconds")
            log.warning("store unreachable since %s, serving gen %d: %s",
                        self.unreachable_since, self.generation, err)
