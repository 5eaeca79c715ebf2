"""The etcd backend: the database replicated by Raft, one compare-and-swap per change.

Keys (all under `virtualinux/`):

    head                      JSON {schema, generation, snapshot, chunks, sha256, bytes}: the
                              pointer to the current generation, and the key every CAS compares
    snap/GGGGGGGGGGGG-TOKEN/NNNN   the generation's whole cluster (snapshot.encode), in chunks
    log/GGGGGGGGGGGG          the change-log entry of generation G

A change reads `head` (and its mod revision), loads that snapshot, applies the pure change,
and commits with ONE transaction: "if head's mod revision is still R: put head, put the log
entry, put the snapshot (if it is one chunk), delete snapshots older than the previous one".
A snapshot of more than one chunk (a 10,000-node cluster compresses to ~0.4 MB, so this is for
much bigger ones) is written first under a fresh TOKEN, where nobody looks, and made visible by
the same one CAS on `head`. So each etcd request stays within etcd's defaults (128 operations
per transaction, 1.5 MiB per request: CHUNK_BYTES leaves room for base64 and the other
operations), no server limit needs raising, and a change is all or nothing however big: a
writer killed before the CAS leaves only unreferenced chunks, which a later change deletes.

Two writers at once: one CAS wins; the loser re-reads the new generation and re-applies its
change (which may now fail validation: one clear line), so no update is ever lost and the
generations stay dense. Readers read the chunks at head's revision, so a snapshot deleted just
after they read `head` is still there for them (until etcd compacts its history).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from collections.abc import Callable
from operator import methodcaller
from pathlib import Path
from typing import Any

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import (
    ConnectionFailedError,
    ConnectionTimeoutError,
    Etcd3Exception,
)
from etcd3gw.types import Event
from etcd3gw.watch import Watcher

from . import snapshot
from .errors import VlxError
from .model import Change, Cluster
from .store import (
    SCHEMA_VERSION,
    StoreUnreachable,
    StoreUrl,
    next_generation,
    now,
    pause_point,
    user,
)

PREFIX = "virtualinux/"
HEAD = PREFIX + "head"
SNAPSHOTS = PREFIX + "snap/"
LOG = PREFIX + "log/"
CHUNK_BYTES = int(os.environ.get("VLX_ETCD_CHUNK_BYTES", str(768 * 1024)))
TXN_OPS = 100                # below etcd's --max-txn-ops default of 128
TIMEOUT = float(os.environ.get("VLX_STORE_TIMEOUT", "5"))
MAX_ATTEMPTS = 1000          # CAS retries before a writer gives up (others kept winning)
SORT_ASCEND, SORT_DESCEND = 1, 2   # etcd's RangeRequest.SortOrder


class EtcdStore:
    def __init__(self, url: StoreUrl, timeout: float = TIMEOUT, tls: Path | None = None):
        self.url = url
        self.name = str(url)
        tls = tls or (Path(os.environ["VLX_STORE_TLS"]) if os.environ.get("VLX_STORE_TLS")
                      else None)
        files = {}
        if tls is not None:
            # The cluster CA and a client certificate it issued (`vlx db tls client`).
            files = {"protocol": "https", "ca_cert": str(tls / "ca.crt"),
                     "cert_cert": str(tls / "client.crt"), "cert_key": str(tls / "client.key")}
            missing = [path for key, path in files.items() if key != "protocol"
                       and not Path(path).is_file()]
            if missing:
                raise VlxError(f"VLX_STORE_TLS={tls}: missing {', '.join(missing)} "
                               "(`vlx db tls client --out DIR` writes them)")
        self.clients = [Etcd3Client(host=host, port=port, api_path="/v3/", timeout=timeout,
                                    protocol=files.get("protocol", "http"),
                                    session=_session(files))
                        for host, port in url.endpoints]
        self.timeout = timeout
        self._current = 0
        self._cached: tuple[str, Cluster] | None = None   # (snapshot id, its cluster)
        self._last_head: tuple[dict[str, Any], int] | None = None   # (head, mod revision)
        self.conflicts = 0           # CAS attempts lost to another writer (for the bench)

    # The Backend interface (store.py)

    def exists(self) -> bool:
        return self._head_or_none() is not None

    def create(self, force: bool = False) -> None:
        if self.exists():
            if not force:
                raise VlxError(f"{self.name} holds a database already (--force starts over)")
            self.call(lambda c: c.delete_prefix(PREFIX))
        self._install(Cluster(0, None), [Change(0, now(), user(), "db init", "")])

    def restore(self, cluster: Cluster, changes: list[Change]) -> None:
        if self.exists():
            if self.generation() != 0:
                raise VlxError(f"{self.name} holds a database at generation "
                               f"{self.generation()}: migrate into an empty store only")
            self.call(lambda c: c.delete_prefix(PREFIX))   # only `db init` is lost
        self._install(cluster, changes)

    def generation(self) -> int:
        head, _ = self._head()
        return int(head["generation"])

    def load(self) -> Cluster:
        head, revision = self._head()
        return self._cluster(head, revision)

    def update(self, action: str, detail: str,
               change: Callable[[Cluster], Cluster]) -> Cluster:
        # The head this process wrote or read last is tried first, without reading it again:
        # one round trip per change while nobody else writes. A CAS that loses hands back the
        # current head (the transaction's failure branch reads it), and a change refused on a
        # possibly stale head is judged again on a fresh one before it is refused for good.
        state, fresh = self._last_head, False
        for _ in range(MAX_ATTEMPTS):
            if state is None:
                state, fresh = self._head(), True
            head, revision = state
            old = self._cluster(head, revision)
            try:
                new = next_generation(old, change)   # VlxError here: nothing was written
            except VlxError:
                if fresh:
                    raise
                state = None
                continue
            if new is None:
                if fresh:
                    return old
                state = None
                continue
            state = self._commit(new, revision, head["snapshot"],
                                 Change(new.generation, now(), user(), action, detail))
            if state is None:
                return new
            fresh = True
            self.conflicts += 1
        raise VlxError(f"{self.name}: {MAX_ATTEMPTS} attempts lost to other writers; "
                       "nothing was changed")

    def changes(self, limit: int | None = 20) -> list[Change]:
        def read(client: Etcd3Client) -> list:
            return client.get(LOG, range_end=_range_end(LOG), sort_order="descend",
                              sort_target="key", limit=limit or 0)
        values = self.call(read)
        return [snapshot.decode_change(value, f"{self.name} change log")
                for value in reversed(values)]

    # Reading

    def read_head(self) -> tuple[dict[str, Any], int, int] | None:
        """(head, its mod revision, the store's revision at this read), or None without a
        database: one small read, what a replica polls. A watch started just after that store
        revision misses nothing (`watch_head`), and is never older than etcd's compaction,
        where head's own mod revision may be."""
        result = self.call(lambda c: c.post(c.get_url("/kv/range"), json={"key": _b64(HEAD)}))
        kvs = result.get("kvs") or []
        if not kvs:
            return None
        head, mod_revision = _parse_head(base64.b64decode(kvs[0]["value"]),
                                         kvs[0]["mod_revision"], self.name)
        return head, mod_revision, int(result["header"]["revision"])

    def fetch_generation(self, head: dict[str, Any], revision: int, after: int,
                         limit: int) -> tuple[Cluster, list[Change]] | None:
        """The generation `head` (of mod revision `revision`) names, and its change-log
        entries newer than generation `after` (the newest `limit` of them, oldest first): what
        a replica takes for a new generation, in ONE round trip (a transaction of two reads).

        Both are read at `revision`, so they match head exactly. If etcd compacted that
        revision away, they are read as they are now: the log entries are filtered to head's
        generation, and the snapshot is checked against head's hash; None if it is gone (two
        newer generations deleted it: read head again)."""
        snap_id = head["snapshot"]
        generation = int(head["generation"])
        cached = self._cached[1] if self._cached and self._cached[0] == snap_id else None
        prefix = f"{SNAPSHOTS}{snap_id}/"

        def reads(at: int | None) -> dict[str, Any]:
            pinned = {"revision": at} if at else {}
            ops = [{"request_range": {"key": _b64(f"{LOG}{after + 1:012d}" if after >= 0
                                                  else LOG),
                                      "range_end": _b64(_range_end(LOG)), "limit": limit,
                                      "sort_order": SORT_DESCEND, **pinned}}]
            if cached is None:
                ops.append({"request_range": {"key": _b64(prefix),
                                              "range_end": _b64(_range_end(prefix)),
                                              "sort_order": SORT_ASCEND, **pinned}})
            return {"success": ops}

        try:
            result = self.call(methodcaller("transaction", reads(revision)))
            compacted = False
        except VlxError as err:
            if "compacted" not in str(err):
                raise
            result = self.call(methodcaller("transaction", reads(None)))
            compacted = True
        ranges = [response["response_range"].get("kvs", []) for response in
                  result.get("responses", [])]
        where = f"{self.name} change log"
        entries = [snapshot.decode_change(base64.b64decode(kv["value"]), where)
                   for kv in reversed(ranges[0])]
        entries = [entry for entry in entries if after < entry.generation <= generation]
        if cached is not None:
            return cached, entries
        chunks = [base64.b64decode(kv["value"]) for kv in ranges[1]]
        if compacted and len(chunks) != head["chunks"]:
            return None
        return self._decode_chunks(head, chunks), entries

    def watch_head(self, callback: Callable[[tuple[dict[str, Any], int] | None], None],
                   after_revision: int) -> Callable[[], None] | None:
        """Call `callback` (from etcd3gw's watch thread) with each new (head, mod revision)
        after store revision `after_revision` (None when head was deleted or does not parse);
        returns the function that ends the watch, or None if the endpoint did not take it
        (the caller polls anyway). The event carries head itself: no read of it follows."""
        client = self.clients[self._current]

        def event(event: Event) -> None:
            kv: dict[str, Any] = dict(event.get("kv", {}))
            found = None
            if event.get("type") != "DELETE" and kv.get("value"):
                try:
                    found = _parse_head(kv["value"], kv.get("mod_revision"), self.name)
                except VlxError:
                    pass
            callback(found)

        try:
            watcher = Watcher(client, HEAD, event, start_revision=after_revision + 1)
        except (OSError, requests.RequestException):
            return None
        return watcher.stop

    def _head_or_none(self) -> tuple[dict[str, Any], int] | None:
        found = self.call(lambda c: c.get(HEAD, metadata=True))
        if not found:
            return None
        value, meta = found[0]
        return _parse_head(value, meta.get("mod_revision"), self.name)

    def _head(self) -> tuple[dict[str, Any], int]:
        found = self._head_or_none()
        if found is None:
            raise VlxError(f"{self.name} holds no virtualinux database (no key {HEAD}): "
                           f"`vlx --store {self.name} db init` makes one, `vlx db migrate "
                           f"--to {self.name}` copies one in")
        return found

    def _cluster(self, head: dict[str, Any], revision: int) -> Cluster:
        snap_id = head["snapshot"]
        if self._cached and self._cached[0] == snap_id:
            return self._cached[1]
        prefix = f"{SNAPSHOTS}{snap_id}/"
        chunks = self.call(lambda c: c.get(prefix, range_end=_range_end(prefix),
                                            sort_order="ascend", sort_target="key",
                                            revision=revision))
        return self._decode_chunks(head, chunks)

    def _decode_chunks(self, head: dict[str, Any], chunks: list[bytes]) -> Cluster:
        blob = b"".join(chunks)
        where = f"{self.name} generation {head['generation']}"
        if len(chunks) != head["chunks"] or hashlib.sha256(blob).hexdigest() != head["sha256"]:
            raise VlxError(f"snapshot {head['snapshot']} is incomplete or damaged "
                           f"({len(chunks)} of {head['chunks']} chunks)", where)
        cluster = snapshot.decode(blob, where)
        self._cached = (head["snapshot"], cluster)
        return cluster

    # Writing

    def _commit(self, new: Cluster, revision: int, previous: str | None,
                entry: Change) -> tuple[dict[str, Any], int] | None:
        """One CAS on head (mod revision still `revision`; 0: head must not exist). None when
        it won; else the head that beat it (from the same transaction), if there is one."""
        blob = snapshot.encode(new)
        snap_id = f"{new.generation:012d}-{secrets.token_hex(4)}"
        prefix = f"{SNAPSHOTS}{snap_id}/"
        chunks = [blob[i:i + CHUNK_BYTES] for i in range(0, len(blob), CHUNK_BYTES)] or [b""]
        head = {"schema": SCHEMA_VERSION, "generation": new.generation, "snapshot": snap_id,
                "chunks": len(chunks), "sha256": hashlib.sha256(blob).hexdigest(),
                "bytes": len(blob), "previous": previous}
        ops = []
        if len(chunks) > 1:
            pause_point("before-chunks")
            for number, chunk in enumerate(chunks):
                key = f"{prefix}{number:04d}"
                # methodcaller binds this chunk now (a lambda in a loop would need defaults).
                self.call(methodcaller("put", key, chunk))
            pause_point("chunks-written")
        else:
            ops.append(_put(f"{prefix}0000", chunks[0]))
        ops += [_put(HEAD, snapshot.as_json(head)),
                _put(f"{LOG}{new.generation:012d}", snapshot.encode_change(entry))]
        if new.generation >= 2:
            # Keep this generation's snapshot and the one before (a reader may be on it).
            older = f"{SNAPSHOTS}{new.generation - 1:012d}"
            ops.append({"request_delete_range": {"key": _b64(SNAPSHOTS),
                                                 "range_end": _b64(older)}})
        compare = ({"key": _b64(HEAD), "result": "EQUAL", "target": "MOD",
                    "mod_revision": str(revision)} if revision
                   else {"key": _b64(HEAD), "result": "EQUAL", "target": "VERSION",
                         "version": "0"})
        pause_point("before-commit")
        result = self.call(lambda c: c.transaction({
            "compare": [compare], "success": ops,
            "failure": [{"request_range": {"key": _b64(HEAD)}}]}), writing=True)
        if not result.get("succeeded"):
            if len(chunks) > 1:
                self.call(lambda c: c.delete_prefix(prefix))
            self._last_head = None
            return _head_from(result, self.name)
        self._cached = (snap_id, new)
        self._last_head = (head, int(result["header"]["revision"]))
        pause_point("committed")
        return None

    def _install(self, cluster: Cluster, changes: list[Change]) -> None:
        """A whole database into a store with no head: log first, then the head by CAS."""
        puts = [_put(f"{LOG}{c.generation:012d}", snapshot.encode_change(c)) for c in changes
                if c.generation < cluster.generation]
        for start in range(0, len(puts), TXN_OPS):
            batch = puts[start:start + TXN_OPS]
            self.call(methodcaller("transaction", {"success": batch}), writing=True)
        last = next((c for c in changes if c.generation == cluster.generation),
                    Change(cluster.generation, now(), user(), "db migrate", ""))
        if self._commit(cluster, 0, None, last) is not None:
            raise VlxError(f"{self.name}: another writer made a database here meanwhile")

    # Talking to etcd

    def call(self, request: Callable[[Etcd3Client], Any], writing: bool = False) -> Any:
        """`request` on the first endpoint that answers, starting from the last good one.

        A write that timed out is not sent to the next endpoint: it may still commit where it
        went, and a second copy would then lose its CAS and re-apply the change on top of
        itself. It fails instead, saying so; a refused connection is safe to retry elsewhere.
        """
        failures = []
        timed_out = False
        for _ in range(len(self.clients)):
            client = self.clients[self._current]
            try:
                return request(client)
            except (ConnectionFailedError, ConnectionTimeoutError) as err:
                failures.append(f"{client.host}:{client.port}: {_short(err)}")
                self._current = (self._current + 1) % len(self.clients)
                timed_out = _timed_out(err)
                if writing and timed_out:
                    break
            except Etcd3Exception as err:
                raise VlxError(f"{self.name}: etcd refused the request: {_short(err)}") from None
        note = (" (a change that timed out may still land, whole, once etcd has a quorum "
                "again: see `vlx db log`)" if writing and timed_out else "")
        raise StoreUnreachable(f"{self.name} is unreachable or has no quorum "
                               f"({'; '.join(failures)}){note}")


def _timed_out(err: Exception) -> bool:
    return isinstance(err, ConnectionTimeoutError) or "timed out" in _short(err)


def _session(files: dict[str, str]) -> requests.Session:
    """A session that takes nothing from the environment: no HTTP proxy between us and etcd,
    and no REQUESTS_CA_BUNDLE in place of the cluster CA."""
    session = requests.Session()
    session.trust_env = False
    if files:
        session.verify = files["ca_cert"]
        session.cert = (files["cert_cert"], files["cert_key"])
    return session


def _parse_head(value: bytes, mod_revision: Any, name: str) -> tuple[dict[str, Any], int]:
    try:
        head = json.loads(value)
        if head.get("schema") != SCHEMA_VERSION:
            raise VlxError(f"{name} holds schema {head.get('schema')!r}; this vlx knows "
                           f"{SCHEMA_VERSION}")
        int(head["generation"])
        return head, int(mod_revision)
    except (ValueError, KeyError, TypeError, AttributeError):
        raise VlxError(f"{name}: key {HEAD} is not a virtualinux head") from None


def _head_from(result: dict[str, Any], name: str) -> tuple[dict[str, Any], int] | None:
    """The head a failed CAS read in its failure branch (None if there is no head)."""
    try:
        kvs = result["responses"][0]["response_range"].get("kvs", [])
    except (KeyError, IndexError, AttributeError):
        return None
    if not kvs:
        return None
    return _parse_head(base64.b64decode(kvs[0]["value"]), kvs[0]["mod_revision"], name)


def _put(key: str, value: bytes) -> dict[str, Any]:
    return {"request_put": {"key": _b64(key), "value": base64.b64encode(value).decode()}}


def _b64(key: str) -> str:
    return base64.b64encode(key.encode()).decode()


def _range_end(prefix: str) -> str:
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def _short(err: Exception) -> str:
    raw = str(getattr(err, "detail_text", "") or err)
    if "SSL" in raw or "certificate" in raw or "HTTPS server" in raw:
        return ("TLS refused: the store wants a cluster client certificate (VLX_STORE_TLS=DIR "
                "with ca.crt, client.crt, client.key from `vlx db tls client`)")
    if "RemoteDisconnected" in raw:
        return "closed the connection unanswered (a TLS store? set VLX_STORE_TLS=DIR)"
    for known in ("Connection refused", "timed out", "No route to host", "Name or service not "
                  "known", "Network is unreachable"):
        if known in raw:
            return known.lower()
    text = raw.strip().splitlines()
    detail = text[0] if text else type(err).__name__
    try:
        detail = json.loads(detail).get("error", detail)
    except (ValueError, AttributeError):
        pass
    return detail[:200]
