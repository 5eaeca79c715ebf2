"""TFTP wire format and option negotiation: bytes in, typed values out, and back.

Requests (RRQ/WRQ) are decoded and OACKs encoded with tftpy's packet classes; DATA, ACK and
ERROR, which sit on the hot path, are packed here with `struct`. Option negotiation covers
blksize (RFC 2348), timeout and tsize (RFC 2349) and windowsize (RFC 7440, which tftpy lacks).
Anything malformed raises `MalformedPacket`; the service counts it and drops the packet.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import struct

from tftpy.TftpPacketFactory import TftpPacketFactory
from tftpy.TftpPacketTypes import TftpPacketOACK
from tftpy.TftpShared import TftpException

# tftpy logs every packet it decodes at DEBUG and every ERROR at ERROR: not ours to log.
logging.getLogger("tftpy").setLevel(logging.CRITICAL)

OP_RRQ, OP_WRQ, OP_DATA, OP_ACK, OP_ERROR, OP_OACK = 1, 2, 3, 4, 5, 6

ERR_UNDEFINED = 0
ERR_NOT_FOUND = 1
ERR_ACCESS = 2
ERR_ILLEGAL = 4
ERR_OPTIONS = 8

DEFAULT_BLKSIZE = 512
MIN_BLKSIZE, MAX_BLKSIZE = 8, 65464                  # RFC 2348
MIN_TIMEOUT, MAX_TIMEOUT = 1, 255                    # RFC 2349, seconds
MAX_WINDOWSIZE = 64     # RFC 7440 allows 65535; with no congestion control, more only loses more
MODES = ("octet", "netascii")
MAX_REQUEST = 1024      # an RRQ bigger than this is not a boot client's

_HEADER = struct.Struct("!HH")
_factory = TftpPacketFactory()


class MalformedPacket(Exception):
    """Bytes that are not a TFTP packet we can act on."""


@dataclasses.dataclass(frozen=True)
class Request:
    write: bool
    filename: str
    mode: str
    options: dict[str, str]     # names lowercased, as RFC 2347 says they compare


@dataclasses.dataclass(frozen=True)
class Negotiated:
    """The transfer parameters both sides agreed on, and the OACK that says so (None: none)."""

    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    timeout: float | None = None
    oack: bytes | None = None


def parse_request(data: bytes) -> Request:
    if len(data) < 4 or len(data) > MAX_REQUEST:
        raise MalformedPacket(f"request of {len(data)} bytes")
    opcode = _HEADER.unpack_from(data)[0]
    if opcode not in (OP_RRQ, OP_WRQ):
        raise MalformedPacket(f"opcode {opcode} on the request port")
    if not data.endswith(b"\0"):
        raise MalformedPacket("request does not end in NUL")
    try:
        packet = _factory.parse(data)
    except (TftpException, struct.error, UnicodeDecodeError, ValueError, AssertionError) as err:
        raise MalformedPacket(f"bad request: {err}") from None
    if not packet.filename:
        raise MalformedPacket("empty file name")
    options = {str(k).lower(): str(v) for k, v in packet.options.items()}
    return Request(opcode == OP_WRQ, packet.filename, packet.mode, options)


def negotiate(request: Request, size: int, max_blksize: int = MAX_BLKSIZE) -> Negotiated:
    """Accept what we support from the client's options; unknown or invalid ones are left out
    of the OACK, which tells the client they were not taken (RFC 2347)."""
    accepted: dict[str, str] = {}
    blksize, windowsize, timeout = DEFAULT_BLKSIZE, 1, None
    value = _integer(request.options.get("blksize"))
    if value is not None and value >= MIN_BLKSIZE:
        blksize = min(value, max_blksize, MAX_BLKSIZE)
        accepted["blksize"] = str(blksize)
    value = _integer(request.options.get("timeout"))
    if value is not None and MIN_TIMEOUT <= value <= MAX_TIMEOUT:
        timeout = float(value)
        accepted["timeout"] = str(value)
    if "tsize" in request.options:
        accepted["tsize"] = str(size)
    value = _integer(request.options.get("windowsize"))
    if value is not None and value >= 1:
        windowsize = min(value, MAX_WINDOWSIZE)
        accepted["windowsize"] = str(windowsize)
    return Negotiated(blksize, windowsize, timeout, encode_oack(accepted) if accepted else None)


def _integer(text: str | None) -> int | None:
    if text is None or not text.isdigit() or len(text) > 9:
        return None
    return int(text)


def encode_oack(options: dict[str, str]) -> bytes:
    packet = TftpPacketOACK()
    packet.options = options
    encoded: bytes = packet.encode().buffer     # tftpy is untyped
    return encoded


def encode_error(code: int, message: str) -> bytes:
    return _HEADER.pack(OP_ERROR, code) + message.encode("ascii", "replace")[:200] + b"\0"


def encode_data_header(block: int) -> bytes:
    return _HEADER.pack(OP_DATA, block & 0xFFFF)


def encode_ack(block: int) -> bytes:
    return _HEADER.pack(OP_ACK, block & 0xFFFF)


# The hot path sends a header per block, and in lock-step compares each datagram with the ACK
# it expects: all 65536 of each, made once with the encoders' own struct. Through map() rather
# than a call of the encoder per block: 8 ms instead of 42 ms at import here, which every
# replica pays at a node's boot, where the CPU is slower.
DATA_HEADERS = tuple(map(_HEADER.pack, itertools.repeat(OP_DATA, 65536), range(65536)))
ACKS = tuple(map(_HEADER.pack, itertools.repeat(OP_ACK, 65536), range(65536)))


def parse_header(data: bytes) -> tuple[int, int]:
    """(opcode, block or error code) of an ACK or ERROR from a client."""
    if len(data) < 4:
        raise MalformedPacket(f"packet of {len(data)} bytes")
    return _HEADER.unpack_from(data)


def to_netascii(data: bytes) -> bytes:
    """RFC 764 line ends: CR -> CR NUL, LF -> CR LF."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")
