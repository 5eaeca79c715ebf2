"""VRRPv3 wire code: round trips, scapy's view of our bytes, every malformed case, a fuzzer,
and a corpus (a keepalived advertisement among them) replayed every run."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, in4_chksum
from scapy.layers.vrrp import VRRPv3
from virtualinux.bootsvc import vrrp_wire as wire

CORPUS = Path(__file__).parent / "corpus" / "vrrp"
SOURCE = ipaddress.IPv4Address("198.18.0.11")
VIP = ipaddress.IPv4Address("198.18.0.254")
ADVERT = wire.Advertisement(vrid=51, priority=200, interval=100, addresses=(VIP,),
                            source=SOURCE)


def packet(advert: wire.Advertisement = ADVERT, ttl: int = 255) -> bytearray:
    return bytearray(wire.encode_ip(advert, SOURCE, ttl=ttl))


def recompute_checksum(data: bytearray) -> bytearray:
    """Fix the VRRP checksum after a test edited the message, so only the edit is wrong."""
    message = bytearray(data[20:])
    message[6:8] = b"\0\0"
    message[6:8] = in4_chksum(112, IP(bytes(data)), bytes(message)).to_bytes(2, "big")
    return bytearray(data[:20]) + message


def test_round_trip_keeps_every_field():
    two = wire.Advertisement(vrid=7, priority=1, interval=4095, source=SOURCE,
                             addresses=(VIP, ipaddress.IPv4Address("198.18.0.253")))
    for advert in (ADVERT, two):
        assert wire.decode(bytes(packet(advert)), advert.vrid) == advert


def test_encoded_message_is_what_scapy_and_the_rfc_say():
    message = wire.encode(ADVERT, SOURCE)
    assert len(message) == 12
    assert message[0] == 0x31                 # version 3, type 1
    assert message[1:4] == bytes([51, 200, 1])
    assert int.from_bytes(message[4:6], "big") == 100   # reserved 0, 100 centiseconds
    assert message[8:] == VIP.packed
    parsed = IP(bytes(packet()))[VRRPv3]
    assert (parsed.vrid, parsed.priority, parsed.adv, parsed.addrlist) == (
        51, 200, 100, ["198.18.0.254"])


def test_whole_packets_are_the_bytes_scapy_builds_for_them():
    two = wire.Advertisement(vrid=255, priority=0, interval=4095, source=SOURCE,
                             addresses=(VIP, ipaddress.IPv4Address("198.18.0.253")))
    for advert, ttl in ((ADVERT, 255), (two, 255), (ADVERT, 1)):
        expected = IP(src=str(SOURCE), dst="224.0.0.18", ttl=ttl, proto=112) / VRRPv3(
            version=3, type=1, vrid=advert.vrid, priority=advert.priority, adv=advert.interval,
            addrlist=[str(a) for a in advert.addresses])
        assert wire.encode_ip(advert, SOURCE, ttl=ttl) == bytes(expected)


@given(st.binary(min_size=8, max_size=64), st.integers(0, 2**32 - 1))
@settings(max_examples=300)
def test_checksum_is_scapys_over_any_message(message, source):
    ip = IP(src=str(ipaddress.IPv4Address(source)), dst="224.0.0.18", proto=112)
    pseudo = (ipaddress.IPv4Address(source).packed + wire.GROUP.packed
              + bytes([0, 112]) + len(message).to_bytes(2, "big"))
    assert wire.checksum(pseudo + message) == in4_chksum(112, ip, message)


def test_reserved_interval_bits_are_ignored_as_scapy_ignores_them():
    data = packet()
    data[24] |= 0xF0
    assert IP(bytes(recompute_checksum(data)))[VRRPv3].adv == 100
    assert wire.decode(bytes(recompute_checksum(data))).interval == 100


def test_gratuitous_arp_is_the_frame_scapy_builds_for_it():
    from scapy.layers.l2 import ARP, Ether
    mac = "00:00:5e:00:01:33"
    expected = Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(
        op=1, hwsrc=mac, psrc=str(VIP), hwdst=mac, pdst=str(VIP))
    assert wire.gratuitous_arp(mac, VIP) == bytes(expected)
    with pytest.raises(ValueError):
        wire.gratuitous_arp("00:00:5e", VIP)


def test_checksum_covers_the_pseudo_header():
    # The same message from another source must fail: RFC 5798 5.2.8 includes the addresses.
    data = packet()
    data[12:16] = ipaddress.IPv4Address("198.18.0.12").packed
    data = bytearray(bytes(IP(bytes(data))))   # a correct IP header checksum again
    with pytest.raises(wire.BadChecksum):
        wire.decode(bytes(data), 51)


def test_bad_checksum_is_refused():
    data = packet()
    data[26] ^= 0xFF
    with pytest.raises(wire.BadChecksum):
        wire.decode(bytes(data))


@pytest.mark.parametrize("ttl", [1, 64, 254])
def test_ttl_other_than_255_is_refused(ttl):
    with pytest.raises(wire.BadTtl):
        wire.decode(bytes(packet(ttl=ttl)))


@pytest.mark.parametrize("version", [2, 4, 15])
def test_other_versions_are_refused(version):
    data = packet()
    data[20] = (version << 4) | 1
    with pytest.raises(wire.BadVersion):
        wire.decode(bytes(recompute_checksum(data)))


@pytest.mark.parametrize("kind", [0, 2, 15])
def test_other_types_are_refused(kind):
    data = packet()
    data[20] = 0x30 | kind
    with pytest.raises(wire.BadType):
        wire.decode(bytes(recompute_checksum(data)))


def test_wrong_vrid_is_refused_only_when_asked():
    data = bytes(packet())
    assert wire.decode(data).vrid == 51
    with pytest.raises(wire.WrongVrid):
        wire.decode(data, vrid=52)


@pytest.mark.parametrize("count", [0, 2, 255])
def test_address_count_must_match_the_length(count):
    data = packet()
    data[23] = count
    with pytest.raises(wire.AddressCountMismatch):
        wire.decode(bytes(recompute_checksum(data)))


def test_trailing_bytes_are_an_address_count_mismatch():
    data = packet() + b"\0\0"
    data[2:4] = len(data).to_bytes(2, "big")
    with pytest.raises(wire.AddressCountMismatch):
        wire.decode(bytes(recompute_checksum(data)))


@pytest.mark.parametrize("length", [0, 10, 19, 20, 27])
def test_truncated_packets_are_refused(length):
    data = packet()[:length]
    with pytest.raises((wire.Truncated, wire.NotVrrp)):
        wire.decode(bytes(data))


def test_ip_length_longer_than_what_arrived_is_truncated():
    data = packet()[:-2]    # the header still says 32 bytes
    with pytest.raises(wire.Truncated):
        wire.decode(bytes(data))


def test_interval_zero_is_refused():
    data = packet()
    data[24:26] = b"\0\0"
    with pytest.raises(wire.BadInterval):
        wire.decode(bytes(recompute_checksum(data)))


def test_not_protocol_112_is_refused():
    data = packet()
    data[9] = 17
    with pytest.raises(wire.NotVrrp):
        wire.decode(bytes(data))


def test_every_refusal_has_a_counter_name():
    reasons = {cls.reason for cls in wire.MalformedAdvert.__subclasses__()}
    assert reasons == {"truncated", "not_vrrp", "bad_ttl", "bad_version", "bad_type",
                       "bad_checksum", "address_count", "bad_interval", "wrong_vrid"}


@pytest.mark.parametrize("field, value", [("vrid", 0), ("priority", 256), ("interval", 0),
                                          ("interval", 4096), ("addresses", ())])
def test_advertisement_values_are_checked(field, value):
    with pytest.raises(ValueError):
        wire.Advertisement(**{**ADVERT.__dict__, field: value})


def outcome(data: bytes) -> str:
    try:
        wire.decode(data, 51)
    except wire.MalformedAdvert as err:
        return err.reason
    return "ok"


@given(st.binary(max_size=120))
@settings(max_examples=500)
def test_fuzz_random_bytes_only_ever_raise_malformed_advert(data):
    outcome(data)


@given(st.data())
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_mutated_adverts_only_ever_raise_malformed_advert(data):
    two = wire.Advertisement(vrid=51, priority=100, interval=10, source=SOURCE,
                             addresses=(VIP, ipaddress.IPv4Address("198.18.0.253")))
    buffer = packet(two)
    for _ in range(data.draw(st.integers(1, 6))):
        buffer[data.draw(st.integers(0, len(buffer) - 1))] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(buffer)))
    outcome(bytes(buffer[:cut]))


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.bin"))


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_corpus_input_gets_the_outcome_its_name_records(path):
    """Files are named OUTCOME--WHAT.bin (whole IP packets); OUTCOME is the reason or `ok`."""
    assert outcome(path.read_bytes()) == path.name.split("--", 1)[0]


def test_corpus_is_not_empty():
    assert len(corpus_files()) >= 8


def test_keepalived_adverts_decode_and_ours_are_the_same_bytes():
    """Captured from keepalived 2.2.7 (`vrrp_version 3`, VRID 51, priority 150) on 198.18.0.11:
    we read what it sends, and send byte for byte what it sends for the same values."""
    captured = (CORPUS / "ok--keepalived-2.2.7-advert-1s.bin").read_bytes()
    advert = wire.decode(captured, 51)
    assert advert == wire.Advertisement(vrid=51, priority=150, interval=100,
                                        addresses=(VIP,), source=SOURCE)
    assert wire.encode(advert, SOURCE) == captured[20:]
    two = wire.decode((CORPUS / "ok--keepalived-2.2.7-two-addresses-0.1s.bin").read_bytes())
    assert two.interval == 10 and two.addresses == (VIP, ipaddress.IPv4Address("198.18.0.253"))
    goodbye = wire.decode((CORPUS / "ok--keepalived-2.2.7-priority-0-on-sigterm.bin").read_bytes())
    assert goodbye.priority == wire.PRIORITY_SHUTDOWN
