"""DNS on the wire for the hot path: a small, strict query parser, the reply assembler, and the
record encoder that fills the precomputed answers (local zone and cache alike).

Why not dnspython on every query: `dns.message.from_wire` plus `make_response` plus `to_wire`
costs tens of microseconds per query in Python, several times the whole budget of a server
that answers from a table (bench/dns.py measures it). So `parse_query` reads only what an
answer depends on (ID, flags, one question, an optional EDNS0 OPT) and `assemble` glues a
12-byte header, the client's own question bytes and a precomputed body together. Everything
the body holds is encoded by dnspython's own `Name.to_wire` / `Rdata.to_wire`
(`RecordEncoder`), so the bytes are dnspython's; only the framing is ours.

Anything the fast parser does not take (opcodes other than QUERY, compression in the
question, TSIG, several OPTs, ...) raises `Unusual`, and the service hands that query to
dnspython's full parser; a query that is broken raises a `MalformedQuery` subclass naming the
reason. Imports nothing of the project.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import NamedTuple

import dns.name
import dns.rdata

HEADER = struct.Struct(">HHHHHH")
ID_FLAGS = struct.Struct(">HH")
COUNTS = struct.Struct(">HHHH")
RR_FIXED = struct.Struct(">HHIH")       # type, class, TTL, rdlength
TTL = struct.Struct(">I")

QR, AA, TC, RD, RA, CD = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080, 0x0010
OPCODE_MASK = 0x7800
CLASS_IN = 1
TYPE_OPT = 41
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5

MAX_LABEL = 63
MAX_NAME = 255                  # octets of the wire form, the root label included
MAX_UDP_PLAIN = 512             # a client without EDNS0 takes no more (RFC 1035)
# What we offer and honour over UDP: the DNS flag day 2020 value, which stays below the
# fragmentation limit of common paths.
EDNS_PAYLOAD = 1232
# Our OPT RR: root owner, type 41, class = our payload size, TTL 0 (rcode, version 0, no DO).
OPT_RR = b"\x00" + RR_FIXED.pack(TYPE_OPT, EDNS_PAYLOAD, 0, 0)


class MalformedQuery(ValueError):
    """A datagram that is no readable DNS query; the service counts it by `reason`."""

    reason = "malformed"


class ShortHeader(MalformedQuery):
    reason = "short_header"


class IsResponse(MalformedQuery):
    """The QR bit is set: never answer an answer (two servers would loop)."""

    reason = "is_response"


class Truncated(MalformedQuery):
    reason = "truncated"


class NameTooLong(MalformedQuery):
    reason = "name_too_long"


class BadLabelType(MalformedQuery):
    reason = "bad_label_type"


class TrailingJunk(MalformedQuery):
    reason = "trailing_junk"


class CountsTooLarge(MalformedQuery):
    """The header announces more records than the datagram could hold."""

    reason = "counts_too_large"


class Unusual(Exception):
    """A query the fast path does not read; dnspython's parser gets it. Not an error."""


class Query(NamedTuple):
    id: int
    flags: int
    qname: bytes          # wire form, lower-cased: the key of every table
    qtype: int
    qclass: int
    question: bytes       # the question section as the client sent it, echoed verbatim
    edns: int             # the client's UDP payload size, 0 without EDNS0


class Body(NamedTuple):
    """A precomputed reply after the question: flags (AA, rcode), section counts and bytes."""

    flags: int
    answers: int
    authority: int
    additional: int
    data: bytes


def parse_query(data: bytes) -> Query:
    """The fast path's parser. Raises MalformedQuery (broken) or Unusual (for dnspython)."""
    size = len(data)
    if size < 12:
        raise ShortHeader(f"{size} bytes, a header is 12")
    qid, flags, qdcount, ancount, nscount, arcount = HEADER.unpack_from(data)
    if flags & QR:
        raise IsResponse("QR is set")
    if flags & OPCODE_MASK or qdcount != 1 or ancount or nscount or arcount > 1:
        if 12 + qdcount * 5 + (ancount + nscount + arcount) * 11 > size:
            # Each question takes 5 octets at least, each record 11: refuse before walking.
            raise CountsTooLarge(f"{qdcount}/{ancount}/{nscount}/{arcount} records in "
                                 f"{size} octets")
        raise Unusual("not a plain one-question QUERY")
    position = 12
    while True:
        if position >= size:
            raise Truncated("the question name runs past the end")
        length = data[position]
        if length == 0:
            break
        if length > MAX_LABEL:
            if length & 0xC0 == 0xC0:
                raise Unusual("compression pointer in the question")
            # A length above 63 sets a label-type bit: 0x40 and 0x80 are not in use.
            raise BadLabelType(f"label type {length >> 6:#x} (a label of more than 63 octets)")
        position += length + 1
        if position > MAX_NAME + 11:
            raise NameTooLong("the question name is longer than 255 octets")
    question_end = position + 5
    if question_end > size:
        raise Truncated("no room for the question's type and class")
    qtype = (data[position + 1] << 8) | data[position + 2]
    qclass = (data[position + 3] << 8) | data[position + 4]
    edns = 0
    if arcount:
        edns = _parse_opt(data, question_end)
    elif question_end != size:
        raise TrailingJunk(f"{size - question_end} octets after the question")
    # Length octets are at most 63, below b"A": lower() changes only the labels' letters.
    return Query(qid, flags, data[12:position + 1].lower(), qtype, qclass,
                 data[12:question_end], edns)


def _parse_opt(data: bytes, position: int) -> int:
    """The one additional record must be an OPT with the root owner and version 0."""
    if position + 11 > len(data):
        raise Truncated("the additional record runs past the end")
    if data[position] != 0:
        raise Unusual("an additional record other than OPT")
    rtype, payload, ttl, rdlength = RR_FIXED.unpack_from(data, position + 1)
    if rtype != TYPE_OPT or (ttl >> 16) & 0xFF:
        raise Unusual("not an OPT of version 0")     # BADVERS is dnspython's to answer
    end = position + 11 + rdlength
    if end != len(data):
        raise Truncated("the OPT record's length does not match") if end > len(data) \
            else TrailingJunk("octets after the OPT record")
    return max(payload, MAX_UDP_PLAIN)


def assemble(query: Query, body: Body, limit: int) -> bytes:
    """The reply to `query`: its ID, RD and CD echoed, its question bytes, then `body`; our OPT
    if it sent one. Over `limit` octets (UDP), only the header with TC and the question."""
    flags = QR | RA | body.flags | (query.flags & (RD | CD))
    opt = 1 if query.edns else 0
    reply = b"".join((ID_FLAGS.pack(query.id, flags),
                      COUNTS.pack(1, body.answers, body.authority, body.additional + opt),
                      query.question, body.data, OPT_RR if opt else b""))
    if len(reply) <= limit:
        return reply
    return b"".join((ID_FLAGS.pack(query.id, flags | TC), COUNTS.pack(1, 0, 0, opt),
                     query.question, OPT_RR if opt else b""))


def udp_limit(query: Query) -> int:
    return min(query.edns, EDNS_PAYLOAD) if query.edns else MAX_UDP_PLAIN


def error_reply(data: bytes, rcode: int) -> bytes | None:
    """FORMERR (or another rcode) with no sections, for a query whose header is readable and
    that is not itself a response; None otherwise (then it is dropped)."""
    if len(data) < 12 or data[2] & 0x80:
        return None
    qid, flags = ID_FLAGS.unpack_from(data)
    return ID_FLAGS.pack(qid, QR | (flags & (OPCODE_MASK | RD | CD)) | rcode) + bytes(8)


def wire_bytes(value: dns.name.Name | dns.rdata.Rdata) -> bytes:
    """`value.to_wire()`: without a file dnspython returns the bytes, but annotates the method
    for both forms (`bytes | None`); None here would be a dnspython bug, so it is one."""
    data = value.to_wire()
    if data is None:
        raise TypeError(f"{type(value).__name__}.to_wire() returned None")
    return data


class Record(NamedTuple):
    owner: bytes          # wire form (any case)
    ttl: int
    rdata: dns.rdata.Rdata


class Encoded(NamedTuple):
    data: bytes
    record_count: int    # not `count`, which would hide tuple.count
    ttl_offsets: tuple[int, ...]    # where each record's TTL sits in the body


class RecordEncoder:
    """Encodes resource records the way they follow a question for `qname` (wire form):
    dnspython writes each record's rdata (`Rdata.to_wire`, uncompressed); we write the owner
    names, compressed against the question and earlier owners, and the fixed fields, so we
    know where every TTL is and can count it down later. (Our own compression table is keyed
    by wire bytes: dnspython's is keyed by Name objects, whose hashing cost more than all the
    rest of a 10,000-node reload.)"""

    def __init__(self, qname: bytes | None, qtype: int):
        """With qname None, nothing is compressed: the bytes then follow any question."""
        self._out = bytearray()
        self._suffixes: dict[bytes, int] | None = None
        if qname is not None:
            self._out += bytes(12)
            self._suffixes = {}
            self._name(qname)
            self._out += struct.pack(">HH", qtype, CLASS_IN)
        self._start = len(self._out)

    def _name(self, wire: bytes) -> None:
        out, suffixes = self._out, self._suffixes
        if suffixes is None:
            out += wire
            return
        lower, position = wire.lower(), 0
        while wire[position]:
            offset = suffixes.get(lower[position:])
            if offset is not None:
                out += struct.pack(">H", 0xC000 | offset)
                return
            if len(out) < 0x3FFF:          # a pointer holds 14 bits
                suffixes[lower[position:]] = len(out)
            end = position + wire[position] + 1
            out += wire[position:end]
            position = end
        out.append(0)

    def section(self, records: Iterable[Record]) -> Encoded:
        out, begin, offsets = self._out, len(self._out), []
        for record in records:
            self._name(record.owner)
            rdata = wire_bytes(record.rdata)
            offsets.append(len(out) + 4 - self._start)
            out += RR_FIXED.pack(record.rdata.rdtype, record.rdata.rdclass, record.ttl,
                                 len(rdata))
            out += rdata
        return Encoded(bytes(out[begin:]), len(offsets), tuple(offsets))

    def body(self) -> bytes:
        return bytes(self._out[self._start:])
