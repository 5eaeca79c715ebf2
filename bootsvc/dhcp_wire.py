"""DHCPv4 on the wire (RFC 2131/2132): the packet layout, the encoder, the decoders and the
errors a malformed packet raises.

Two decoders live here: `parse_request` is the hot path of the server and reads only the few
fields an answer depends on; `decode` reads a whole message into a `Message` (tests, tools, and
the round trip with `encode`). Every malformed input raises a subclass of `MalformedPacket`, and
nothing else: the service loop catches exactly that. Imports nothing of the project.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import struct
from collections.abc import Iterable
from typing import NamedTuple

BOOTREQUEST = 1
BOOTREPLY = 2
HTYPE_ETHERNET = 1
MAGIC_COOKIE = b"\x63\x82\x53\x63"
HEADER_LEN = 236               # the fixed BOOTP part, before the magic cookie
OPTIONS_START = HEADER_LEN + 4
MIN_REPLY_LEN = 300            # old BOOTP relays and clients drop anything shorter
BROADCAST_FLAG = 0x8000
SERVER_PORT = 67
CLIENT_PORT = 68

# Header offsets (RFC 2131 figure 1) the server patches in precomputed answers.
XID = slice(4, 8)
FLAGS = slice(10, 12)
CIADDR = slice(12, 16)
YIADDR = slice(16, 20)
SIADDR = slice(20, 24)
GIADDR = slice(24, 28)
CHADDR = slice(28, 44)

# Message types (option 53).
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
MESSAGE_TYPE_NAMES = {DISCOVER: "DHCPDISCOVER", OFFER: "DHCPOFFER", REQUEST: "DHCPREQUEST",
                      DECLINE: "DHCPDECLINE", ACK: "DHCPACK", NAK: "DHCPNAK",
                      RELEASE: "DHCPRELEASE", INFORM: "DHCPINFORM"}

# Option codes (RFC 2132 unless noted).
OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_HOST_NAME = 12
OPT_DOMAIN_NAME = 15
OPT_BROADCAST = 28
OPT_NTP = 42
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAMS = 55
OPT_RENEWAL_TIME = 58
OPT_REBINDING_TIME = 59
OPT_VENDOR_CLASS = 60
OPT_CLIENT_ID = 61
OPT_TFTP_SERVER = 66
OPT_BOOTFILE = 67
OPT_USER_CLASS = 77            # RFC 3004
OPT_RELAY_AGENT = 82           # RFC 3046
OPT_CLIENT_ARCH = 93           # RFC 4578
OPT_IPXE_ENCAP = 175           # iPXE's own encapsulated options: only iPXE sends it
OPT_END = 255

# A real client sends a few dozen options at most; a packet with more is an attack or garbage,
# and walking it would cost the hot path for nothing.
MAX_OPTIONS = 128


class MalformedPacket(ValueError):
    """A packet that is not a DHCP message we can read; the server counts it by `reason`."""

    reason = "malformed"


class ShortPacket(MalformedPacket):
    reason = "short"


class BadCookie(MalformedPacket):
    reason = "bad_cookie"


class BadOpcode(MalformedPacket):
    reason = "bad_opcode"


class NotEthernet(MalformedPacket):
    reason = "not_ethernet"


class OptionOverrun(MalformedPacket):
    reason = "option_overrun"


class TooManyOptions(MalformedPacket):
    reason = "too_many_options"


class BadOption(MalformedPacket):
    reason = "bad_option"


class NoMessageType(MalformedPacket):
    """A BOOTP request without option 53: we serve DHCP clients only."""

    reason = "no_message_type"


class Request(NamedTuple):
    """The fields of a client message that an answer depends on (raw bytes where the server
    copies them into the answer unchanged)."""

    message_type: int
    xid: bytes
    flags: bytes
    ciaddr: bytes
    giaddr: bytes
    chaddr: bytes                  # all 16 bytes, copied into the answer as they came
    mac: bytes                     # the first 6 of them
    requested_ip: bytes | None     # option 50
    server_id: bytes | None        # option 54
    client_arch: int | None        # option 93 (the first architecture listed)
    is_ipxe: bool                  # option 175 present, or user class "iPXE"
    relay_agent: bytes | None      # option 82 as it came: code, length and value
    secs: int = 0                  # seconds since the client began trying
    client_id: bytes | None = None  # option 61

    def mac_text(self) -> str:
        return format_mac(self.mac)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


def parse_request(data: bytes) -> Request:
    """The hot path: check the frame, then walk the options once, keeping only what we use."""
    if len(data) < OPTIONS_START:
        raise ShortPacket(f"{len(data)} bytes, a DHCP message has at least {OPTIONS_START}")
    if data[0] != BOOTREQUEST:
        raise BadOpcode(f"op {data[0]} is not BOOTREQUEST")
    if data[1] != HTYPE_ETHERNET or data[2] != 6:
        raise NotEthernet(f"hardware type {data[1]} length {data[2]}")
    if data[HEADER_LEN:OPTIONS_START] != MAGIC_COOKIE:
        raise BadCookie(f"magic cookie {data[HEADER_LEN:OPTIONS_START].hex()}")
    message_type = requested_ip = server_id = client_arch = relay_agent = client_id = None
    is_ipxe = False
    end = len(data)
    i = OPTIONS_START
    count = 0
    while i < end:
        code = data[i]
        if code == OPT_END:
            break
        if code == OPT_PAD:
            i += 1
            continue
        count += 1
        if count > MAX_OPTIONS:
            raise TooManyOptions(f"more than {MAX_OPTIONS} options")
        if i + 1 >= end:
            raise OptionOverrun(f"option {code} has no length byte")
        length = data[i + 1]
        start = i + 2
        i = start + length
        if i > end:
            raise OptionOverrun(f"option {code} of length {length} runs past the end")
        if code == OPT_MESSAGE_TYPE:
            if length != 1 or not DISCOVER <= data[start] <= INFORM:
                raise BadOption(f"message type {data[start:i].hex()}")
            message_type = data[start]
        elif code == OPT_REQUESTED_IP:
            requested_ip = _address_option(code, data, start, length)
        elif code == OPT_SERVER_ID:
            server_id = _address_option(code, data, start, length)
        elif code == OPT_CLIENT_ARCH:
            if length < 2 or length % 2:
                raise BadOption(f"client architecture of length {length}")
            if client_arch is None:
                client_arch = (data[start] << 8) | data[start + 1]
        elif code == OPT_IPXE_ENCAP:
            is_ipxe = True
        elif code == OPT_USER_CLASS:
            # iPXE sends "iPXE" bare; RFC 3004 clients prefix each class with its length.
            value = data[start:i]
            is_ipxe = is_ipxe or value == b"iPXE" or value == b"\x04iPXE"
        elif code == OPT_RELAY_AGENT and relay_agent is None:
            relay_agent = data[i - length - 2:i]
        elif code == OPT_CLIENT_ID and client_id is None:
            client_id = data[start:i]
    if message_type is None:
        raise NoMessageType("no DHCP message type (option 53)")
    return Request(message_type, data[4:8], data[10:12], data[12:16], data[24:28],
                   data[28:44], data[28:34], requested_ip, server_id, client_arch, is_ipxe,
                   relay_agent, (data[8] << 8) | data[9], client_id)


def _address_option(code: int, data: bytes, start: int, length: int) -> bytes:
    if length != 4:
        raise BadOption(f"option {code} holds an IPv4 address, not {length} bytes")
    return data[start:start + 4]


@dataclasses.dataclass(frozen=True)
class Message:
    """A whole DHCP message, options in wire order (a code may appear once; long values are
    split and joined as RFC 3396 says)."""

    op: int
    xid: int
    chaddr: bytes
    options: tuple[tuple[int, bytes], ...]
    flags: int = 0
    ciaddr: ipaddress.IPv4Address = ipaddress.IPv4Address(0)
    yiaddr: ipaddress.IPv4Address = ipaddress.IPv4Address(0)
    siaddr: ipaddress.IPv4Address = ipaddress.IPv4Address(0)
    giaddr: ipaddress.IPv4Address = ipaddress.IPv4Address(0)
    hops: int = 0
    secs: int = 0
    sname: bytes = b""
    file: bytes = b""

    def option(self, code: int) -> bytes | None:
        for key, value in self.options:
            if key == code:
                return value
        return None

    @property
    def message_type(self) -> int | None:
        value = self.option(OPT_MESSAGE_TYPE)
        return value[0] if value else None


_HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128s")


def encode(message: Message, pad_to: int = MIN_REPLY_LEN) -> bytes:
    """The wire form of `message`, padded with zeros to `pad_to` bytes."""
    if len(message.sname) > 64 or len(message.file) > 128 or len(message.chaddr) > 16:
        raise ValueError("sname, file or chaddr too long for its field")
    header = _HEADER.pack(message.op, HTYPE_ETHERNET, 6, message.hops, message.xid,
                          message.secs, message.flags, message.ciaddr.packed,
                          message.yiaddr.packed, message.siaddr.packed, message.giaddr.packed,
                          message.chaddr.ljust(16, b"\0"), message.sname.ljust(64, b"\0"),
                          message.file.ljust(128, b"\0"))
    return (header + MAGIC_COOKIE + encode_options(message.options) + bytes([OPT_END])
            ).ljust(pad_to, b"\0")


def encode_options(options: tuple[tuple[int, bytes], ...] | list[tuple[int, bytes]]) -> bytes:
    return b"".join(encode_option(code, value) for code, value in options)


def encode_option(code: int, value: bytes) -> bytes:
    if not 0 < code < OPT_END:
        raise ValueError(f"option code {code} cannot carry a value")
    if len(value) <= 255:
        return bytes((code, len(value))) + value
    # RFC 3396: a value longer than 255 bytes goes in several options of the same code.
    return b"".join(bytes((code, len(chunk))) + chunk
                    for chunk in (value[i:i + 255] for i in range(0, len(value), 255)))


def decode(data: bytes) -> Message:
    """The whole message; raises `MalformedPacket` like `parse_request` (but takes replies)."""
    if len(data) < OPTIONS_START:
        raise ShortPacket(f"{len(data)} bytes, a DHCP message has at least {OPTIONS_START}")
    (op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname,
     file) = _HEADER.unpack_from(data)
    if op not in (BOOTREQUEST, BOOTREPLY):
        raise BadOpcode(f"op {op}")
    if htype != HTYPE_ETHERNET or hlen != 6:
        raise NotEthernet(f"hardware type {htype} length {hlen}")
    if data[HEADER_LEN:OPTIONS_START] != MAGIC_COOKIE:
        raise BadCookie(f"magic cookie {data[HEADER_LEN:OPTIONS_START].hex()}")
    options: dict[int, bytes] = {}
    i = OPTIONS_START
    while i < len(data) and data[i] != OPT_END:
        code = data[i]
        if code == OPT_PAD:
            i += 1
            continue
        if len(options) >= MAX_OPTIONS:
            raise TooManyOptions(f"more than {MAX_OPTIONS} options")
        if i + 1 >= len(data) or i + 2 + data[i + 1] > len(data):
            raise OptionOverrun(f"option {code} runs past the end")
        options[code] = options.get(code, b"") + data[i + 2:i + 2 + data[i + 1]]
        i += 2 + data[i + 1]
    return Message(op=op, xid=xid, chaddr=chaddr[:hlen], options=tuple(options.items()),
                   flags=flags, ciaddr=ipaddress.IPv4Address(ciaddr),
                   yiaddr=ipaddress.IPv4Address(yiaddr), siaddr=ipaddress.IPv4Address(siaddr),
                   giaddr=ipaddress.IPv4Address(giaddr), hops=hops, secs=secs,
                   sname=sname.rstrip(b"\0"), file=file.rstrip(b"\0"))


def addresses(values: Iterable[ipaddress.IPv4Address | str | int]) -> bytes:
    """An option value that is a list of IPv4 addresses."""
    # .packed of an address as is: IPv4Address(address) would parse its text again.
    return b"".join(v.packed if isinstance(v, ipaddress.IPv4Address)
                    else ipaddress.IPv4Address(v).packed for v in values)


def u32(value: int) -> bytes:
    return struct.pack("!I", value)
