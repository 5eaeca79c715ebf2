"""Which DHCP replicas answer a client: RFC 3074 load balancing, generalized to N replicas.

RFC 3074 hashes the client into one of 256 buckets split between a failover pair. With every
node a replica, a pair is not enough, so the bucket becomes a rendezvous hash (highest random
weight): each (client, replica) pair gets a score, and the k replicas with the highest scores
answer the client. A replica joining or leaving moves only the clients it was (or becomes)
chosen for, and every replica holding the same generation computes the same k.

The replica set is the nodes whose role says they serve DHCP: the nodes with role `dhcp`, or
every node when no node has it (`replica_names`). k is `Settings.dhcp_answering` (0: every
replica answers every client), and `Settings.dhcp_fallback_secs` is how long a client may have
been trying (its `secs` field) before every replica answers it anyway. The repeat rule answers
sooner, and covers clients that leave `secs` at 0: the same transaction (xid and MAC) seen
again `REPEAT_DELAY` seconds or more after its first copy was left to the others is a
retransmission, so the chosen ones did not answer it, and every replica answers. (udhcpc of
busybox 1.35 keeps its xid and counts secs 0, 1, 2, ... on a one-second retry; dhclient and
iPXE count secs too.)

The client is identified by its client identifier (option 61) when it sends one, else by its
MAC; an identifier that is just hardware type 1 and the MAC (what udhcpc and iPXE send) is the
MAC, so the decision for every node of the database is precomputed per generation. Scores use a
64-bit hash of the client and of the replica name, mixed per pair by the SplitMix64 finalizer:
`hashlib` per pair measured ~1.3x slower. A reload stops scoring a client at the k-th replica
above this one (`Balancer._compute`); bench/storm.py reports its cost per client.
Imports the model only.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from collections.abc import Iterable

from virtualinux.vvcm import Cluster
from virtualinux.vvcm.model import Role

ROLE = Role.DHCP
MASK = (1 << 64) - 1
# A retransmission comes a second or more after the first copy (iPXE: 1 s, then 2, 4, 8;
# udhcpc: -T, 3 s by default; RFC 2131: 4 s); a duplicate of one packet comes at once.
REPEAT_DELAY = 0.5
# Transactions remembered for the repeat rule; the oldest go first. A boot storm of 10,000
# clients fits; a flood of made-up ones only pushes out old entries.
MAX_TRANSACTIONS = 16384
# Clients not in the database (discovery pool, or an unknown client identifier) get their
# decision computed on first sight and kept up to this many.
MAX_COMPUTED = 4096

# What `decide` says. Any true value means answer.
LEAVE, CHOSEN, FALLBACK = 0, 1, 2


def replica_names(cluster: Cluster) -> tuple[str, ...]:
    """The nodes that serve DHCP, sorted: those with role `dhcp`, or all of them."""
    nodes = cluster.nodes_with_role(ROLE) or cluster.nodes
    return tuple(sorted(node.name for node in nodes))


def _hash64(data: bytes, person: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, person=person).digest(), "big")


def replica_hash(name: str) -> int:
    return _hash64(name.encode(), b"vlx-dhcp-replica")


def client_hash(key: bytes) -> int:
    return _hash64(key, b"vlx-dhcp-client")


def client_key(mac: bytes, client_id: bytes | None) -> bytes:
    """What a client is hashed by: its client identifier, unless that is just its MAC."""
    if client_id is None or (len(client_id) == 7 and client_id[0] == 1
                             and client_id[1:] == mac):
        return mac
    return b"id" + client_id   # never equal to a 6-byte MAC


def mix(z: int) -> int:
    """SplitMix64's finalizer: a client's score for a replica is mix(client ^ replica)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def scores(client: int, replicas: Iterable[int]) -> list[int]:
    """The score of each replica for one client."""
    return [mix(client ^ replica) for replica in replicas]


def choose(key: bytes, names: tuple[str, ...], k: int) -> tuple[str, ...]:
    """The k replicas (of `names`) that answer the client `key`, highest score first."""
    ranked = sorted(zip(scores(client_hash(key), map(replica_hash, names)), names, strict=True),
                    reverse=True)
    return tuple(name for _, name in ranked[:k])


class Transactions:
    """When each transaction (xid + MAC) left to others was first seen, oldest first; kept
    across generations by the service, so a retransmission just after a reload still counts."""

    def __init__(self, limit: int = MAX_TRANSACTIONS, clock=time.monotonic):
        self.limit = limit
        self.clock = clock
        self.first_seen: dict[bytes, float] = {}

    def repeated(self, transaction: bytes) -> bool:
        """True when `transaction` was first seen at least REPEAT_DELAY ago."""
        now = self.clock()
        first = self.first_seen.get(transaction)
        if first is None:
            if len(self.first_seen) >= self.limit:
                del self.first_seen[next(iter(self.first_seen))]
            self.first_seen[transaction] = now
            return False
        return now - first >= REPEAT_DELAY


class Balancer:
    """One generation's decision for one replica: answer a client, or leave it to others.

    `me` is this replica's node name; a name not in `names` (a node without role `dhcp` when
    others have it) is chosen for nobody and answers only on the fallback rules.
    """

    def __init__(self, names: tuple[str, ...], me: str, k: int, fallback_secs: int,
                 known: Iterable[bytes] = (), previous: Balancer | None = None,
                 transactions: Transactions | None = None):
        self.names = names
        self.me = me
        self.k = k
        self.fallback_secs = fallback_secs
        self.transactions = transactions if transactions is not None else Transactions()
        self._hashes = tuple(map(replica_hash, names))
        self._mine_index = names.index(me) if me in names else None
        # Decisions depend on (names, me, k) only: a generation that changed something else
        # (a setting, a VM, a new node's MAC) reuses the previous one's and computes the rest.
        carried: dict[bytes, bool] = {}
        if previous is not None and (previous.names, previous.me, previous.k) == (names, me, k):
            carried = previous._decided
        self._decided: dict[bytes, bool] = {key: carried[key] if key in carried
                                            else self._compute(key) for key in known}
        self._extra: dict[bytes, bool] = {}

    def _compute(self, key: bytes) -> bool:
        me = self._mine_index
        if me is None:
            return False
        if self.k >= len(self.names):
            return True
        client = client_hash(key)
        mine = mix(client ^ self._hashes[me])
        # Stop at the k-th replica above this one: for a replica that is not chosen that comes
        # after ~k ln N of the N, so a reload is ~N k ln N mixes, not N^2. Ties (a 2^-64
        # chance) go to the replica whose name sorts last, as in `choose`.
        higher = 0
        for index, replica in enumerate(self._hashes):
            score = mix(client ^ replica)
            if score > mine or (score == mine and index > me):
                higher += 1
                if higher >= self.k:
                    return False
        return True

    def chosen(self, key: bytes) -> bool:
        decided = self._decided.get(key)
        return self._decide_extra(key) if decided is None else decided

    def _decide_extra(self, key: bytes) -> bool:
        decided = self._extra.get(key)
        if decided is None:
            if len(self._extra) >= MAX_COMPUTED:
                self._extra.clear()
            decided = self._extra[key] = self._compute(key)
        return decided

    def decide(self, key: bytes, secs: int, xid: bytes, mac: bytes,
               counters: Counter[str]) -> int:
        """CHOSEN, FALLBACK or LEAVE for one broadcast request, counted in `counters`."""
        # The hot path: one dict lookup for every client of the database.
        decided = self._decided.get(key)
        if decided or (decided is None and self._decide_extra(key)):
            counters["answered_chosen"] += 1
            return CHOSEN
        if secs >= self.fallback_secs:
            counters["answered_fallback"] += 1
            return FALLBACK
        if self.transactions.repeated(xid + mac):
            counters["answered_fallback"] += 1
            counters["fallback_repeated_transaction"] += 1
            return FALLBACK
        counters["left_to_others"] += 1
        return LEAVE


def for_replica(cluster: Cluster, node: str | None, known: Iterable[bytes],
                previous: Balancer | None = None,
                transactions: Transactions | None = None) -> Balancer | None:
    """This replica's balancer for `cluster`, or None when it answers every client: when
    balancing is off (k = 0), and for a replica that is not a node (the lab runs replicas
    beside the nodes; no other replica counts on them, so they answer as before)."""
    settings = cluster.settings
    if node is None or settings is None or settings.dhcp_answering == 0:
        return None
    return Balancer(replica_names(cluster), node, settings.dhcp_answering,
                    settings.dhcp_fallback_secs, known, previous, transactions)
