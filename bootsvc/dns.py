"""The DNS service: authoritative for the cluster's zones (`dns_zone`), cache-only forwarding
for everything else (`dns_cache`), on UDP and TCP at the replica's address, and at the service
address of every VC bridge on this node for its VMs (`dns_vc`).

UDP queries are read by a thread of their own (`_serve_udp`), in a blocking loop over batches
(`udp_batch`: one recvmmsg takes what is queued, one sendmmsg sends the replies); per datagram
the token bucket of the source, one dict lookup of the query's bytes after the ID (a local
answer or a cache hit kept whole), the ID glued on; an answer not yet kept costs
`dns_wire.parse_query`, a zone or cache lookup and `dns_wire.assemble` (header, the client's
question, the precomputed body) in the same thread (`respond`). No dnspython
object is built, and no event-loop round is paid per datagram (bench/dns.py: the asyncio
wake-up was the largest cost above the kernel's). Queries the strict parser does not take go
to dnspython's parser (`_slow_path`) and then the same tables. Only a cache miss reaches the
event loop, which owns the forwarder: a task that asks the upstreams and answers when it is
done (the cache has a lock of its own; each thread counts into its own Counter, `counters`).
Malformed queries get FORMERR when the header is readable and is not a response, otherwise
they are dropped (so is a UDP datagram over MAX_QUERY octets: `dropped_oversized`); all are
counted by reason, and logged once per source. Per-source rate limiting (token buckets in a
bounded table; one table for UDP, owned by its thread, one for TCP) runs on every datagram of
a batch before any parsing, so a flood from one address costs a dict lookup per datagram and
cannot starve the others.

Start one from a test or the daemon with

    service = DnsService(replica, cluster, DnsService.Options(port=5353))
    await service.start(); ...; service.reload(newer_cluster); ...; await service.stop()

Imports the model, `dns_wire`, `dns_zone`, `dns_cache`, `dns_vc` and `udp_batch`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Awaitable
from itertools import compress, repeat
from operator import add, itemgetter
from typing import cast

import dns.exception
import dns.message
import dns.opcode
import dns.rcode
from virtualinux.vvcm import Cluster

from . import dns_wire as wire
from .dns_cache import Cache, Forwarder, Upstream
from .dns_vc import VcListeners
from .dns_zone import ClusterZones
from .service import Replica, Service, set_receive_buffer
from .udp_batch import (
    HOST,
    MmsgBatch,
    PlainBatch,
    open_batch,
    peer_address,
    peer_host,
    send_counted,
)

log = logging.getLogger(__name__)

COUNTS_FOLD_S = 0.25             # how often the UDP thread's counts join `counters`
MAX_QUERY = 4096                 # a DNS query is a few dozen octets; longer ones are dropped
UDP_BATCH = 64                   # datagrams per recvmmsg/sendmmsg (udp_batch)
# The pieces of a UDP query and of a kept reply that the batch loop takes apart with map().
QUERY_ID, AFTER_ID = itemgetter(slice(0, 2)), itemgetter(slice(2, None))
SOURCE = itemgetter(HOST)            # a peer's address: the rate limiter's key
KEPT, UNTIL = itemgetter(0), itemgetter(1)   # a kept cache hit: (reply after the ID, until)
TCP_MAX = 65535
LOG_ONCE_LIMIT = 4096
REFUSED = wire.Body(wire.REFUSED, 0, 0, 0, b"")
SERVFAIL = wire.Body(wire.SERVFAIL, 0, 0, 0, b"")


class RateLimiter:
    """A token bucket per source address: `rate` queries a second, bursts of `burst`. The
    table holds at most `max_sources`; when full, buckets that have refilled (idle sources)
    go first, then the oldest half."""

    def __init__(self, rate: int, burst: int, max_sources: int):
        self.rate, self.burst, self.max_sources = float(rate), float(max(burst, 1)), max_sources
        self._buckets: dict[str, list[float]] = {}

    def __len__(self) -> int:
        return len(self._buckets)

    def allow(self, source: str, now: float) -> bool:
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self._prune(now)
            self._buckets[source] = [self.burst - 1, now]
            return True
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        bucket[1] = now
        if tokens < 1:
            bucket[0] = tokens
            return False
        bucket[0] = tokens - 1
        return True

    def _prune(self, now: float) -> None:
        refill = self.burst / self.rate
        self._buckets = {source: bucket for source, bucket in self._buckets.items()
                         if now - bucket[1] < refill}
        if len(self._buckets) >= self.max_sources:
            keep = list(self._buckets.items())[self.max_sources // 2:]
            self._buckets = dict(keep)


class DnsService(Service):
    name = "dns"
    _udp_ident: int | None = None       # the UDP thread's, once it runs

    @dataclasses.dataclass(frozen=True)
    class Options:
        port: int = 53
        rate_limit: int = 2000          # queries a second per source address; 0: no limit
        rate_burst: int = 4000
        rate_sources: int = 65536       # token buckets kept
        cache_entries: int = 100_000
        cache_bytes: int = 64 << 20
        max_ttl: int = 86400
        upstream_port: int = 53
        upstream_timeout_ms: int = 1500  # per upstream, then the next one is asked
        max_forwarding: int = 1024      # cache misses in flight; more are answered SERVFAIL
        tcp_clients: int = 256
        tcp_idle_s: int = 10
        memo_entries: int = 65536       # UDP local answers kept by query bytes (see _serve_udp)
        receive_buffer: int = 4 << 20   # UDP socket buffer for bursts; 0: the kernel's default
        vc_networks: bool = True        # answer VMs on the VC bridges here too

    def __init__(self, replica: Replica, cluster: Cluster, options: Options | None = None):
        super().__init__(replica, cluster, options)
        self.options: DnsService.Options
        self.port = self.options.port
        self.zones = ClusterZones(cluster)
        self.cache = Cache(self.options.cache_entries, self.options.cache_bytes, self.counters)
        self.forwarder = Forwarder(self.cache, self.counters,
                                   self.options.upstream_timeout_ms / 1000, self.options.max_ttl)
        self.forwarder.upstreams = self._upstreams(cluster)
        self.limiter = self._limiter()          # TCP, on the event loop
        self._udp_limiter = self._limiter()      # UDP, in its thread: no table shared
        self._udp: socket.socket | None = None
        self._udp_thread: threading.Thread | None = None
        # `counters` is the UDP thread's own Counter when that thread asks, else the loop's;
        # each is written by one thread only. The loop adds what the UDP thread counted since
        # the last time (COUNTS_FOLD_S, and on stop), so no count is lost and no lock is taken.
        self._udp_counts: Counter[str] = Counter()
        self._udp_folded: dict[str, int] = {}
        self._tcp: asyncio.Server | None = None
        self.vc_listeners = VcListeners(self)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()
        self._tcp_clients = 0
        self._logged: set[str] = set()
        # A local answer is a pure function of the query's bytes after the ID and of the
        # generation: the last `memo_entries` are kept whole, so a repeated query costs one
        # dict lookup (random names cannot grow it: it is cleared when full).
        self._memo: dict[bytes, bytes] = {}
        # The same for cache hits, each until its TTLs would change (at most a second).
        self._hit_memo: dict[bytes, tuple[bytes, float]] = {}
        # What the UDP thread answers from: zones and memos of ONE generation, swapped as one,
        # so an answer it computes from old zones never lands in the new generation's memos.
        self._local = (self.zones, self._memo, self._hit_memo)

    @property
    def counters(self) -> Counter[str]:
        if threading.get_ident() == self._udp_ident:
            return self._udp_counts
        return self._counters

    @counters.setter
    def counters(self, value: Counter[str]) -> None:
        self._counters = value

    def _limiter(self) -> RateLimiter | None:
        if self.options.rate_limit <= 0:
            return None
        return RateLimiter(self.options.rate_limit, self.options.rate_burst,
                           self.options.rate_sources)

    def _upstreams(self, cluster: Cluster) -> tuple[Upstream, ...]:
        servers = cluster.settings.upstream_dns if cluster.settings else ()
        return tuple(Upstream(address, self.options.upstream_port) for address in servers)

    # -- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        address = str(self.replica.address)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            set_receive_buffer(sock, self.options.receive_buffer)   # room for a burst
            sock.bind((address, self.port))
            self.port = sock.getsockname()[1]
        except OSError:
            sock.close()
            raise
        self._udp = sock
        self._loop = asyncio.get_running_loop()
        self._tcp = await asyncio.start_server(self._tcp_client, address, self.port,
                                               reuse_address=True)
        self._udp_thread = threading.Thread(target=self._serve_udp,
                                            args=(open_batch(sock, UDP_BATCH, MAX_QUERY),
                                                  self._loop),
                                            name="dns-udp", daemon=True)
        self._udp_thread.start()
        self._spawn(self._fold_periodically())
        if self.options.vc_networks:
            await self.vc_listeners.start()
        log.info("dns on %s:%d (udp, tcp): %d names in %d zones, upstreams %s (gen %d)",
                 address, self.port, len(self.zones.names), len(self.zones.zones),
                 ", ".join(map(str, self.forwarder.upstreams)) or "none", self.zones.generation)

    async def stop(self) -> None:
        await self.vc_listeners.stop()
        sock, self._udp = self._udp, None
        if sock is not None:
            try:   # wakes the thread's blocking recvmmsg (Linux, also for UDP)
                sock.shutdown(socket.SHUT_RD)
            except OSError:
                pass
            if self._udp_thread is not None:
                await asyncio.to_thread(self._udp_thread.join, 5)
            sock.close()
        self._fold()
        if self._tcp is not None:
            self._tcp.close()
            self._tcp = None
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()

    def reload(self, cluster: Cluster) -> None:
        zones = ClusterZones(cluster)       # built whole, then swapped: no query sees a mix
        self.zones = zones
        self._memo, self._hit_memo = {}, {}     # a forwarded name may be ours from now on
        self._local = (zones, self._memo, self._hit_memo)
        self.forwarder.upstreams = self._upstreams(cluster)
        super().reload(cluster)
        self.vc_listeners.reload(cluster)

    def details(self) -> dict[str, object]:
        hits, misses = self.counters["cache_hit"], self.counters["cache_miss"]
        return {"generation": self.zones.generation, "zones": [str(z) for z in self.zones.origins],
                "names": len(self.zones.names), "cache_entries": len(self.cache),
                "cache_bytes": self.cache.bytes,
                "hit_ratio": round(hits / (hits + misses), 4) if hits + misses else None,
                "upstreams": [str(u) for u in self.forwarder.upstreams],
                # queries no upstream answered, and single upstream queries that timed out
                "upstream_failures": self.counters["upstream_failed"],
                "upstream_timeouts": self.counters["upstream_timeout"],
                "rate_table_sources": len(self.limiter) if self.limiter else 0,
                "vc_addresses": self.vc_listeners.addresses}

    # -- answering -------------------------------------------------------------------------------

    def respond(self, data: bytes, source: str, udp: bool) -> bytes | None | Awaitable[bytes]:
        """The reply to one query (cut to the client's UDP size when `udp`), None to drop it,
        or an awaitable reply when upstreams must be asked."""
        self.counters["queries"] += 1
        try:
            query = wire.parse_query(data)
        except wire.Unusual:
            return self._slow_path(data, source, udp)
        except wire.MalformedQuery as err:
            return self._malformed(data, err.reason, source, str(err))
        return self._answer(query, udp, data[2:] if udp else None)

    def _answer(self, query: wire.Query, udp: bool, memo_key: bytes | None = None
                ) -> bytes | Awaitable[bytes]:
        size = wire.udp_limit(query) if udp else TCP_MAX
        if query.qclass != wire.CLASS_IN:
            self.counters["refused_class"] += 1
            return wire.assemble(query, REFUSED, size)
        zones, memo, hit_memo = self._local     # one generation's, whichever thread asks
        reply = self._local_reply(zones, memo, query, size, memo_key)
        if reply is not None:
            self.counters["answered_local"] += 1
            return reply
        reply = self._cached_reply(hit_memo, query, size, memo_key, time.monotonic())
        if reply is not None:
            self.counters["cache_hit"] += 1
            return reply
        self.counters["cache_miss"] += 1
        if not self.forwarder.upstreams or len(self._tasks) >= self.options.max_forwarding:
            self.counters["servfail_no_upstream" if not self.forwarder.upstreams
                          else "servfail_busy"] += 1
            return wire.assemble(query, SERVFAIL, size)
        return self._forward(query, size)

    def _local_reply(self, zones: ClusterZones, memo: dict, query: wire.Query, size: int,
                     memo_key: bytes | None) -> bytes | None:
        """The answer from our zones (kept in `memo` under `memo_key`), None if not ours."""
        body = zones.lookup(query.qname, query.qtype)
        if body is None:
            return None
        reply = wire.assemble(query, body, size)
        if memo_key is not None:
            self._keep(memo, memo_key, reply[2:])
        return reply

    def _cached_reply(self, hit_memo: dict, query: wire.Query, size: int,
                      memo_key: bytes | None, now: float) -> bytes | None:
        """The answer from the cache (kept in `hit_memo` until its TTLs would count down by
        one, or the entry expires), None on a miss."""
        found = self.cache.hit((query.qname, query.qtype), now)
        if found is None:
            return None
        reply = wire.assemble(query, found[0], size)
        if memo_key is not None:
            self._keep(hit_memo, memo_key, (reply[2:], found[1]))
        return reply

    def _keep(self, memo: dict, key: bytes, value: object) -> None:
        if len(memo) >= self.options.memo_entries:    # random names cannot grow it
            memo.clear()
        memo[key] = value

    async def _forward(self, query: wire.Query, size: int) -> bytes:
        body = await self.forwarder.resolve(query.qname, query.qtype)
        return wire.assemble(query, body, size)

    def _slow_path(self, data: bytes, source: str, udp: bool) -> bytes | None | Awaitable[bytes]:
        """dnspython's parser for what the fast one does not read; then the same tables."""
        self.counters["slow_path"] += 1
        try:
            message = dns.message.from_wire(data)
        except dns.exception.DNSException as err:
            return self._malformed(data, _snake(type(err).__name__), source, str(err))
        if message.opcode() != dns.opcode.QUERY:
            return self._rcode_reply(message, dns.rcode.NOTIMP, "notimp")
        if len(message.question) != 1:
            return self._malformed(data, "question_count", source,
                                   f"{len(message.question)} questions")
        if message.edns > 0:
            return self._rcode_reply(message, dns.rcode.BADVERS, "badvers")
        question = message.question[0]
        qname = wire.wire_bytes(question.name)
        query = wire.Query(message.id, message.flags, qname.lower(), question.rdtype,
                           question.rdclass, qname + struct.pack(">HH", question.rdtype,
                                                                     question.rdclass),
                           max(message.payload, wire.MAX_UDP_PLAIN) if message.edns == 0 else 0)
        return self._answer(query, udp)

    def _rcode_reply(self, message: dns.message.Message, rcode: dns.rcode.Rcode,
                     counter: str) -> bytes:
        self.counters[counter] += 1
        reply = dns.message.make_response(message)
        reply.set_rcode(rcode)
        return reply.to_wire()

    def _malformed(self, data: bytes, reason: str, source: str, detail: str) -> bytes | None:
        reply = wire.error_reply(data, wire.FORMERR)
        if reply is None:
            self.counters["dropped_" + reason] += 1
        else:
            self.counters["formerr"] += 1
            self.counters["formerr_" + reason] += 1
        if source not in self._logged and len(self._logged) < LOG_ONCE_LIMIT:
            self._logged.add(source)
            log.warning("malformed query from %s (%s): %s; %s (further ones from there are "
                        "only counted)", source, reason, detail,
                        "FORMERR" if reply else "dropped")
        return reply

    # -- UDP -------------------------------------------------------------------------------------

    def _serve_udp(self, batch: MmsgBatch | PlainBatch, loop: asyncio.AbstractEventLoop) -> None:
        """The UDP thread: answers every datagram itself but those that must wait for an
        upstream (their coroutine is handed to the event loop), and ends when stop() shuts the
        socket down. It never raises: a datagram that breaks something is counted, logged
        once, and dropped.

        Datagrams come and go in batches (`udp_batch`: one recvmmsg for what is queued, one
        sendmmsg for the replies). Per datagram the loop does the least it can: the token
        bucket of the source, one dict lookup of the query's bytes after the ID (a local
        answer or a cache hit kept whole), the ID glued on; when a whole batch is answered
        that way it runs as map() over the batch, with no Python line per datagram (on this
        machine one such line costs about what the batching saves). Counts are added per
        batch."""
        self._udp_ident = threading.get_ident()
        limiter, counts = self._udp_limiter, self._udp_counts
        truncated = 0
        while True:
            try:
                datagrams, peers = batch.receive()
            except OSError as err:
                if self._udp is None:
                    return
                counts["receive_errors"] += 1
                log.debug("dns receive error: %s", err)
                continue
            if self._udp is None:       # shut down
                return
            if not datagrams:
                continue
            now = time.monotonic()
            if limiter is not None:
                datagrams, peers = self._admit(limiter, datagrams, peers, now)
            _, memo, hit_memo = self._local
            # The hot path, as C-level maps over the batch: every query's bytes after the ID
            # looked up in the kept replies, and the IDs glued on when all were found.
            keys = list(map(AFTER_ID, datagrams))
            tails = list(map(memo.get, keys))
            if None not in tails:
                replies, reply_peers = list(map(add, map(QUERY_ID, datagrams), tails)), peers
                counts["queries"] += len(replies)
                counts["answered_local"] += len(replies)
            else:
                replies, reply_peers = self._answer_batch(datagrams, peers, keys, tails,
                                                          hit_memo, now, loop)
            if replies:
                send_counted(batch, replies, reply_peers, counts)
            if batch.truncated != truncated:
                counts["dropped_oversized"] += batch.truncated - truncated
                truncated = batch.truncated

    def _admit(self, limiter: RateLimiter, datagrams: list[bytes], peers: list[bytes],
               now: float) -> tuple[list[bytes], list[bytes]]:
        """The datagrams whose source's token bucket allows them (every one is asked)."""
        allowed = list(map(limiter.allow, map(SOURCE, peers), repeat(now)))
        if all(allowed):
            return datagrams, peers
        self._udp_counts["rate_limited"] += allowed.count(False)
        return list(compress(datagrams, allowed)), list(compress(peers, allowed))

    def _answer_batch(self, datagrams: list[bytes], peers: list[bytes], keys: list[bytes],
                      tails: list[bytes | None], hit_memo: dict[bytes, tuple[bytes, float]],
                      now: float,
                      loop: asyncio.AbstractEventLoop) -> tuple[list[bytes], list[bytes]]:
        """The replies to a batch not all answered from kept local replies: kept cache hits
        (all of them at once when they are all that), then one by one, `respond` for those
        kept nowhere."""
        counts = self._udp_counts
        if not any(tails):
            found = list(map(hit_memo.get, keys))
            if None not in found:
                hits = cast(list[tuple[bytes, float]], found)
                if min(map(UNTIL, hits)) > now:
                    counts["queries"] += len(hits)
                    counts["cache_hit"] += len(hits)
                    return list(map(add, map(QUERY_ID, datagrams), map(KEPT, hits))), peers
        replies: list[bytes] = []
        reply_peers: list[bytes] = []
        local = kept_hits = 0
        for data, peer, key, tail in zip(datagrams, peers, keys, tails, strict=True):
            if tail is not None:
                local += 1
            else:
                hit = hit_memo.get(key)
                if hit is None or now >= hit[1]:
                    reply = self._respond_udp(data, peer, loop)
                    if reply is not None:
                        replies.append(reply)
                        reply_peers.append(peer)
                    continue
                kept_hits += 1
                tail = hit[0]
            replies.append(data[:2] + tail)
            reply_peers.append(peer)
        counts["queries"] += local + kept_hits
        counts["answered_local"] += local
        counts["cache_hit"] += kept_hits
        return replies, reply_peers

    def _respond_udp(self, data: bytes, peer: bytes, loop: asyncio.AbstractEventLoop
                     ) -> bytes | None:
        """A query the UDP thread has kept no reply for: the reply to send now, or None (none,
        or it waits for an upstream on the event loop)."""
        source = peer_host(peer)
        try:
            reply = self.respond(data, source, True)
        except Exception:       # a bug, not the client's: keep serving the others
            self._udp_counts["internal_error"] += 1
            if source not in self._logged and len(self._logged) < LOG_ONCE_LIMIT:
                self._logged.add(source)
                log.exception("internal error answering %s", source)
            return None
        if reply is None or isinstance(reply, bytes):
            return reply
        try:
            loop.call_soon_threadsafe(self._spawn, self._send_later(reply, peer_address(peer)))
        except RuntimeError:                      # the loop is closing
            pass
        return None

    def _spawn(self, awaitable: Awaitable) -> None:
        task = asyncio.ensure_future(awaitable)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _fold_periodically(self) -> None:
        while True:
            await asyncio.sleep(COUNTS_FOLD_S)
            self._fold()

    def _fold(self) -> None:
        """Add to the loop's counters what the UDP thread counted since the last fold."""
        now = dict(self._udp_counts)     # one C-level copy: never a half-updated view
        self._counters.update({key: value - self._udp_folded.get(key, 0)
                               for key, value in now.items()})
        self._udp_folded = now

    async def _send_later(self, reply: Awaitable[bytes], source: tuple[str, int]) -> None:
        self._send(await reply, source)

    def _send(self, reply: bytes, destination: tuple[str, int]) -> None:
        if self._udp is not None:
            failed = self._sendto(self._udp, reply, destination)
            if failed is not None:
                self._counters[failed] += 1

    @staticmethod
    def _sendto(sock: socket.socket, reply: bytes, destination: tuple[str, int]) -> str | None:
        """One datagram, never blocking (the socket itself blocks, for the UDP thread's
        reads); the counter of a failure, None when sent."""
        try:
            sock.sendto(reply, socket.MSG_DONTWAIT, destination)
        except BlockingIOError:
            return "dropped_send_buffer_full"
        except OSError as err:
            log.debug("dns send to %s failed: %s", destination[0], err)
            return "send_errors"
        return None

    # -- TCP -------------------------------------------------------------------------------------

    async def _tcp_client(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        peer = (writer.get_extra_info("peername") or ("unknown",))[0]
        if self._tcp_clients >= self.options.tcp_clients:
            self.counters["dropped_tcp_busy"] += 1
            writer.close()
            return
        self._tcp_clients += 1
        self.counters["tcp_connections"] += 1
        try:
            while True:
                async with asyncio.timeout(self.options.tcp_idle_s):
                    length = int.from_bytes(await reader.readexactly(2), "big")
                    data = await reader.readexactly(length)
                if self.limiter is not None and not self.limiter.allow(peer, time.monotonic()):
                    self.counters["rate_limited"] += 1
                    continue
                reply = self.respond(data, peer, False)
                if reply is not None and not isinstance(reply, bytes):
                    reply = await reply
                if reply is None:
                    continue
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            self._tcp_clients -= 1
            writer.close()


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


SERVICE = DnsService
