"""Cache-only forwarding: names outside the cluster's zones are asked of the cluster's
`upstream_dns` servers and the answers cached by their TTLs.

Safety (the Kaminsky-era rules): each upstream query gets a random ID and its own socket on a
random source port; an answer is taken only from the address and port asked, with the same ID
and question (`Message.is_response`), and anything else is counted and ignored while we keep
waiting. Of an accepted answer only records in the asked name's bailiwick are kept: answer
records for the name or its CNAME/DNAME chain, SOA/NS records of an ancestor in the authority
section; the additional section is dropped whole (stub clients do not need glue).

Caching: positive answers for their smallest TTL, NXDOMAIN and NODATA for min(SOA TTL, SOA
minimum) (RFC 2308; without an SOA they are not cached), capped by `max_ttl`. The cache is an
LRU bounded in entries and bytes. An entry keeps the encoded body (from `dns_wire`'s encoder)
with the offset of every TTL; a hit within the same second reuses the last rendering, otherwise
the body is copied once with every TTL lowered by the whole seconds since it was stored (so the
countdown costs one copy per entry per second, not per query). Identical misses in flight share
one upstream query. Imports `dns_wire` only.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import ipaddress
import logging
import secrets
import socket
import threading
import time
from collections import Counter, OrderedDict

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

from . import dns_wire as wire
from .dns_wire import Body, Record, RecordEncoder

log = logging.getLogger(__name__)

CNAME, DNAME, SOA, NS, ANY = (int(t) for t in (dns.rdatatype.CNAME, dns.rdatatype.DNAME,
                                               dns.rdatatype.SOA, dns.rdatatype.NS,
                                               dns.rdatatype.ANY))
NEGATIVE_TTL_CAP = 3 * 3600        # RFC 2308 section 5: at most a few hours
PORT_TRIES = 8                     # random source ports tried before letting the kernel pick
ENTRY_OVERHEAD = 200               # bytes an entry costs beyond its body (key, object, list)


class CacheEntry:
    __slots__ = ("flags", "answers", "authority", "data", "ttl_offsets", "ttls", "stored",
                 "expires", "size", "_second", "_body")

    def __init__(self, flags: int, answers: int, authority: int, data: bytes,
                 ttl_offsets: tuple[int, ...], ttls: tuple[int, ...], ttl: int, now: float):
        self.flags, self.answers, self.authority = flags, answers, authority
        self.data, self.ttl_offsets, self.ttls = data, ttl_offsets, ttls
        self.stored = now
        self.expires = now + ttl
        self.size = len(data) + ENTRY_OVERHEAD
        self._second = 0
        self._body = Body(flags, answers, authority, 0, data)

    def body(self, now: float) -> Body:
        second = int(now - self.stored)
        if second != self._second:
            data = bytearray(self.data)
            for offset, ttl in zip(self.ttl_offsets, self.ttls, strict=True):
                wire.TTL.pack_into(data, offset, max(ttl - second, 0))
            self._second = second
            self._body = Body(self.flags, self.answers, self.authority, 0, bytes(data))
        return self._body


class Cache:
    """An LRU of CacheEntry by (lower-cased wire name, type), bounded in entries and bytes.

    Read by the DNS service's UDP thread (`hit`) and written by its event loop (`put`): every
    method holds the cache's lock, so the LRU order, the byte count and an entry's rendering
    are never seen half-changed."""

    def __init__(self, max_entries: int, max_bytes: int, counters: Counter[str]):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.counters = counters
        self.bytes = 0
        self._entries: OrderedDict[tuple[bytes, int], CacheEntry] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple[bytes, int], now: float) -> Body | None:
        found = self.hit(key, now)
        return found[0] if found else None

    def hit(self, key: tuple[bytes, int], now: float) -> tuple[Body, float] | None:
        """The entry's body as of `now`, and until when that rendering stays right (its next
        whole second, when TTLs count down, or its expiry); None if not cached."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if now >= entry.expires:
                self._remove(key)
                return None
            self._entries.move_to_end(key)
            return entry.body(now), min(entry.expires,
                                        entry.stored + int(now - entry.stored) + 1)

    def same_until(self, key: tuple[bytes, int], now: float) -> float:
        """Until when the entry's rendering at `now` stays right (see `hit`); 0 if none."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return 0.0
            return min(entry.expires, entry.stored + int(now - entry.stored) + 1)

    def put(self, key: tuple[bytes, int], entry: CacheEntry) -> None:
        with self._lock:
            if key in self._entries:
                self._remove(key)
            if entry.size > self.max_bytes:
                return
            self._entries[key] = entry
            self.bytes += entry.size
            while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
                old, _ = next(iter(self._entries.items()))
                self._remove(old)
                self.counters["cache_evicted"] += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    def _remove(self, key: tuple[bytes, int]) -> None:
        self.bytes -= self._entries.pop(key).size


@dataclasses.dataclass(frozen=True)
class Upstream:
    address: ipaddress.IPv4Address
    port: int = 53

    def __str__(self) -> str:
        return f"{self.address}:{self.port}"


class UpstreamFailed(Exception):
    """No upstream gave a usable answer; the client gets SERVFAIL."""


class Forwarder:
    """Resolves names outside our zones through the upstreams, in order, into the cache."""

    def __init__(self, cache: Cache, counters: Counter[str], timeout: float, max_ttl: int):
        self.cache = cache
        self.counters = counters
        self.timeout = timeout
        self.max_ttl = max_ttl
        self.upstreams: tuple[Upstream, ...] = ()
        self._pending: dict[tuple[bytes, int], asyncio.Future[Body]] = {}

    async def resolve(self, qname: bytes, qtype: int) -> Body:
        """The body for a cache miss: shared with every identical miss in flight."""
        key = (qname, qtype)
        pending = self._pending.get(key)
        if pending is not None:
            self.counters["upstream_coalesced"] += 1
            return await asyncio.shield(pending)
        future: asyncio.Future[Body] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            body = await self._resolve(key)
        except UpstreamFailed:
            self.counters["upstream_failed"] += 1
            body = Body(wire.SERVFAIL, 0, 0, 0, b"")
        except Exception as err:       # a bug must cost one answer, not the waiters' forever
            self.counters["upstream_failed"] += 1
            self.counters["forward_error_" + type(err).__name__] += 1
            if self.counters["forward_error_" + type(err).__name__] == 1:
                log.exception("forwarding %s failed", dns.name.from_wire(qname, 0)[0])
            body = Body(wire.SERVFAIL, 0, 0, 0, b"")
        except BaseException:          # cancelled (the service stops): so are the waiters
            future.cancel()
            raise
        finally:
            del self._pending[key]
        future.set_result(body)
        return body

    async def _resolve(self, key: tuple[bytes, int]) -> Body:
        qname = dns.name.from_wire(key[0], 0)[0]
        for upstream in self.upstreams:
            try:
                response = await self._ask(upstream, qname, key[1])
            except TimeoutError:
                self.counters["upstream_timeout"] += 1
                continue
            except (OSError, dns.exception.DNSException) as err:
                self.counters["upstream_error"] += 1
                self.counters["upstream_error_" + type(err).__name__] += 1
                continue
            if response.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                self.counters["upstream_rcode_" + dns.rcode.to_text(response.rcode())] += 1
                continue
            self.counters["upstream_answers"] += 1
            entry, ttl = self.entry(qname, key[1], response, time.monotonic())
            if ttl > 0:
                self.cache.put(key, entry)
            return entry.body(entry.stored)
        raise UpstreamFailed(f"no upstream answered {qname}")

    async def _ask(self, upstream: Upstream, qname: dns.name.Name,
                   qtype: int) -> dns.message.Message:
        # make_query does this conversion itself; its annotation takes only the enum.
        rdtype = dns.rdatatype.RdataType.make(qtype)
        query = dns.message.make_query(qname, rdtype, use_edns=0, payload=wire.EDNS_PAYLOAD,
                                       id=secrets.randbelow(65536))
        server = (str(upstream.address), upstream.port)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        with _random_port_socket() as sock:
            await loop.sock_sendto(sock, query.to_wire(), server)
            response = await self._receive(sock, query, server, deadline)
        if response.flags & dns.flags.TC:
            self.counters["upstream_truncated"] += 1
            response = await dns.asyncquery.tcp(query, server[0], timeout=max(
                deadline - loop.time(), 0.1), port=upstream.port)
            self.counters["upstream_tcp"] += 1
        return response

    async def _receive(self, sock: socket.socket, query: dns.message.Message,
                       server: tuple[str, int], deadline: float) -> dns.message.Message:
        """The first datagram on `sock` from `server` that answers `query`, by `deadline`."""
        loop = asyncio.get_running_loop()
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError
            async with asyncio.timeout(remaining):
                data, source = await loop.sock_recvfrom(sock, 65535)
            if source[:2] != server:
                self.counters["upstream_wrong_source"] += 1
                continue
            try:
                response = dns.message.from_wire(data)
            except dns.exception.DNSException:
                self.counters["upstream_malformed"] += 1
                continue
            if not query.is_response(response):   # ID, QR, opcode and question
                self.counters["upstream_mismatch"] += 1
                continue
            return response

    def entry(self, qname: dns.name.Name, qtype: int, response: dns.message.Message,
              now: float) -> tuple[CacheEntry, int]:
        """The cache entry for an accepted answer (records outside the bailiwick dropped) and
        how long it may be cached (0: not at all)."""
        answers, owners = self._in_bailiwick_answers(qname, qtype, response.answer)
        authority = [rrset for rrset in response.authority
                     if rrset.rdtype in (SOA, NS)
                     and any(owner.is_subdomain(rrset.name) for owner in owners)]
        dropped = (sum(len(r) for r in response.answer) - sum(len(r) for r in answers)
                   + sum(len(r) for r in response.authority) - sum(len(r) for r in authority))
        if dropped:
            self.counters["dropped_out_of_bailiwick"] += dropped
        rcode = response.rcode()
        if answers and rcode == dns.rcode.NOERROR:
            ttl = min(rrset.ttl for rrset in answers)
        else:
            soas = [rrset for rrset in authority if rrset.rdtype == SOA]
            ttl = min(min(soas[0].ttl, soas[0][0].minimum), NEGATIVE_TTL_CAP) if soas else 0
        ttl = max(0, min(ttl, self.max_ttl))
        # No record is handed out for longer than we keep the entry: the SOA of a negative
        # answer shows the negative TTL (RFC 2308 section 3).
        records = self._records(answers, ttl), self._records(authority, ttl)
        encoder = RecordEncoder(wire.wire_bytes(qname), qtype)
        an = encoder.section(records[0])
        ns = encoder.section(records[1])
        ttls = tuple(record.ttl for record in (*records[0], *records[1]))
        return CacheEntry(int(rcode), an.record_count, ns.record_count, encoder.body(),
                          an.ttl_offsets + ns.ttl_offsets, ttls, ttl, now), ttl

    @staticmethod
    def _in_bailiwick_answers(qname: dns.name.Name, qtype: int,
                              rrsets: list[dns.rrset.RRset]) -> tuple[list, set]:
        """Answer RRsets for the name or its alias chain, in the upstream's order; the chain's
        names (for the authority check)."""
        owners, kept, changed = {qname}, set(), True
        while changed:
            changed = False
            for index, rrset in enumerate(rrsets):
                if index in kept:
                    continue
                if rrset.rdtype == DNAME and any(o.is_subdomain(rrset.name) for o in owners):
                    kept.add(index)
                    changed = True
                elif rrset.name in owners and rrset.rdtype in (qtype, CNAME) or (
                        rrset.name in owners and qtype == ANY):
                    kept.add(index)
                    if rrset.rdtype == CNAME:
                        owners.add(rrset[0].target)
                    changed = True
        return [rrset for index, rrset in enumerate(rrsets) if index in kept], owners

    @staticmethod
    def _records(rrsets: list[dns.rrset.RRset], ttl: int) -> list[Record]:
        return [Record(owner, min(rrset.ttl, ttl), rdata)
                for rrset in rrsets for owner in (wire.wire_bytes(rrset.name),) for rdata in rrset]


class _random_port_socket:
    """A UDP socket on a random source port (picked here from the OS's CSPRNG, not left to
    the kernel's allocator), closed on exit."""

    def __enter__(self) -> socket.socket:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        for _ in range(PORT_TRIES):
            try:
                self.sock.bind(("", 1024 + secrets.randbelow(65536 - 1024)))
                return self.sock
            except OSError as err:
                if err.errno != errno.EADDRINUSE:
                    self.sock.close()
                    raise
        self.sock.bind(("", 0))
        return self.sock

    def __exit__(self, *exc: object) -> None:
        self.sock.close()
