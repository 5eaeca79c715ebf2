"""VRRPv3 (RFC 5798) advertisements for IPv4: bytes in, a typed `Advertisement` out, and back.

Packets are built and parsed with scapy's `VRRPv3` layer; the checks RFC 5798 section 7.1
asks of a receiver are made here, each failure a `MalformedAdvert` subclass whose `reason`
names the counter the service bumps before it drops the packet:

    truncated, not_vrrp, bad_ttl, bad_version, bad_type, bad_checksum, address_count,
    bad_interval, wrong_vrid

`decode` takes what a raw IPv4 socket of protocol 112 hands over: the IP header and the VRRP
message. `encode` returns the VRRP message only (the kernel writes the IP header), with its
checksum over the IPv4 pseudo-header of the source and 224.0.0.18, as the RFC says.
Imports nothing of the project.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging

# scapy warns at import about routes and interfaces it cannot use: not ours to log.
logging.getLogger("scapy.runtime").setLevel(logging.ERROR)

from scapy.layers.inet import IP, in4_chksum  # noqa: E402
from scapy.layers.vrrp import VRRPv3  # noqa: E402

PROTOCOL = 112
GROUP = ipaddress.IPv4Address("224.0.0.18")
TTL = 255
VERSION = 3
TYPE_ADVERTISEMENT = 1
HEADER_LENGTH = 8
MAX_INTERVAL = 4095          # centiseconds: the field has 12 bits
PRIORITY_SHUTDOWN = 0        # "the master stops: take over now"
PRIORITY_OWNER = 255         # the router that owns the address


class MalformedAdvert(Exception):
    """A packet that is not a VRRPv3 advertisement we may act on; `reason` names the counter."""

    reason = "malformed"


class Truncated(MalformedAdvert):
    reason = "truncated"


class NotVrrp(MalformedAdvert):
    reason = "not_vrrp"


class BadTtl(MalformedAdvert):
    reason = "bad_ttl"


class BadVersion(MalformedAdvert):
    reason = "bad_version"


class BadType(MalformedAdvert):
    reason = "bad_type"


class BadChecksum(MalformedAdvert):
    reason = "bad_checksum"


class AddressCountMismatch(MalformedAdvert):
    reason = "address_count"


class BadInterval(MalformedAdvert):
    reason = "bad_interval"


class WrongVrid(MalformedAdvert):
    reason = "wrong_vrid"


@dataclasses.dataclass(frozen=True)
class Advertisement:
    vrid: int
    priority: int
    interval: int                         # Max_Adver_Int, centiseconds
    addresses: tuple[ipaddress.IPv4Address, ...]
    source: ipaddress.IPv4Address = ipaddress.IPv4Address(0)

    def __post_init__(self) -> None:
        if not 1 <= self.vrid <= 255:
            raise ValueError(f"VRID {self.vrid} is not between 1 and 255")
        if not 0 <= self.priority <= 255:
            raise ValueError(f"priority {self.priority} is not between 0 and 255")
        if not 1 <= self.interval <= MAX_INTERVAL:
            raise ValueError(f"interval {self.interval} cs is not between 1 and {MAX_INTERVAL}")
        if not 1 <= len(self.addresses) <= 255:
            raise ValueError("an advertisement carries 1 to 255 addresses")


def encode(advert: Advertisement, source: ipaddress.IPv4Address) -> bytes:
    """The VRRP message `source` sends to 224.0.0.18 (the checksum covers both addresses)."""
    packet = IP(src=str(source), dst=str(GROUP), ttl=TTL, proto=PROTOCOL) / VRRPv3(
        version=VERSION, type=TYPE_ADVERTISEMENT, vrid=advert.vrid, priority=advert.priority,
        adv=advert.interval, addrlist=[str(a) for a in advert.addresses])
    return bytes(packet)[20:]    # scapy's IP header has no options: 20 bytes


def encode_ip(advert: Advertisement, source: ipaddress.IPv4Address, ttl: int = TTL) -> bytes:
    """The whole IP packet, for tests and tools that send on a raw IP socket with IP_HDRINCL."""
    return bytes(IP(src=str(source), dst=str(GROUP), ttl=ttl, proto=PROTOCOL)
                 / encode(advert, source))


def decode(data: bytes, vrid: int | None = None) -> Advertisement:
    """The advertisement in an IP packet from a raw socket, or a `MalformedAdvert`.

    With `vrid`, an advertisement of another virtual router is refused too (RFC 5798 7.1:
    several routers may share the group on one link, each ignores the others')."""
    if len(data) < 20:
        raise Truncated(f"{len(data)} bytes, shorter than an IP header")
    header_length = (data[0] & 0x0F) * 4
    if data[0] >> 4 != 4 or header_length < 20 or data[9] != PROTOCOL:
        raise NotVrrp("not an IPv4 packet of protocol 112")
    total = int.from_bytes(data[2:4], "big")
    if total > len(data) or total < header_length:
        raise Truncated(f"IP total length {total}, {len(data)} bytes received")
    message = data[header_length:total]
    if len(message) < HEADER_LENGTH:
        raise Truncated(f"VRRP message of {len(message)} bytes, less than its 8-byte header")
    ip = IP(data[:total])
    # RFC 5798 7.1: a packet with any other TTL may have come from off the link.
    if ip.ttl != TTL:
        raise BadTtl(f"TTL {ip.ttl}, not {TTL}")
    version, kind = message[0] >> 4, message[0] & 0x0F
    if version != VERSION:
        raise BadVersion(f"version {version}, not {VERSION}")
    if kind != TYPE_ADVERTISEMENT:
        raise BadType(f"type {kind}, not {TYPE_ADVERTISEMENT} (advertisement)")
    # The sum over pseudo-header and message, checksum field included, is 0 when intact.
    if in4_chksum(PROTOCOL, ip, message) != 0:
        raise BadChecksum("checksum does not match (IPv4 pseudo-header and message)")
    count = message[3]
    if count == 0 or len(message) != HEADER_LENGTH + 4 * count:
        raise AddressCountMismatch(f"{count} addresses announced in "
                                   f"{len(message) - HEADER_LENGTH} bytes of address list")
    vrrp = VRRPv3(message, _underlayer=ip)
    if vrid is not None and vrrp.vrid != vrid:
        raise WrongVrid(f"VRID {vrrp.vrid}, not ours ({vrid})")
    if vrrp.adv == 0:
        # An interval of 0 would make the master-down timer fire at once, every time.
        raise BadInterval("advertisement interval 0")
    return Advertisement(vrid=vrrp.vrid, priority=vrrp.priority, interval=vrrp.adv,
                         addresses=tuple(ipaddress.IPv4Address(a) for a in vrrp.addrlist),
                         source=ipaddress.IPv4Address(ip.src))
