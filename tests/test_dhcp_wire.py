"""DHCP wire format: round trips with scapy, every malformed shape raising its own error, a
hypothesis fuzzer, and the corpus of inputs that once broke the parser (replayed every run)."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp import BOOTP, DHCP
from scapy.packet import raw
from virtualinux.bootsvc import dhcp_wire as wire

CORPUS = Path(__file__).parent / "corpus" / "dhcp"
MAC = bytes.fromhex("525400000011")

macs = st.binary(min_size=6, max_size=6)
xids = st.integers(0, 2**32 - 1)
ipv4 = st.integers(0, 2**32 - 1).map(ipaddress.IPv4Address)


def scapy_request(message_type="discover", mac=MAC, xid=0x1234, flags=0, ciaddr="0.0.0.0",
                  giaddr="0.0.0.0", extra=(), op=1) -> bytes:
    options = [("message-type", message_type), *extra, "end"]
    return raw(BOOTP(op=op, chaddr=mac, xid=xid, flags=flags, ciaddr=ciaddr, giaddr=giaddr)
               / DHCP(options=options))


@given(mac=macs, xid=xids, flags=st.sampled_from([0, 0x8000]), ciaddr=ipv4, giaddr=ipv4,
       kind=st.sampled_from(["discover", "request", "decline", "release", "inform"]),
       requested=st.none() | ipv4, server=st.none() | ipv4,
       arch=st.none() | st.integers(0, 0xFFFF), ipxe=st.booleans(),
       relay=st.none() | st.binary(min_size=1, max_size=40))
def test_parse_request_reads_what_scapy_wrote(mac, xid, flags, ciaddr, giaddr, kind, requested,
                                              server, arch, ipxe, relay):
    extra = []
    if requested is not None:
        extra.append(("requested_addr", str(requested)))
    if server is not None:
        extra.append(("server_id", str(server)))
    if arch is not None:
        extra.append(("pxe_client_architecture", arch.to_bytes(2, "big")))
    if ipxe:
        extra.append((wire.OPT_IPXE_ENCAP, b"\x13\x01\x01"))
    if relay is not None:
        extra.append(("relay_agent_information", relay))
    data = scapy_request(kind, mac, xid, flags, str(ciaddr), str(giaddr), extra)
    request = wire.parse_request(data)
    assert request.message_type == {"discover": 1, "request": 3, "decline": 4, "release": 7,
                                    "inform": 8}[kind]
    assert request.mac == mac and request.chaddr[:6] == mac
    assert int.from_bytes(request.xid, "big") == xid
    assert int.from_bytes(request.flags, "big") == flags
    assert request.ciaddr == ciaddr.packed and request.giaddr == giaddr.packed
    assert request.requested_ip == (requested.packed if requested is not None else None)
    assert request.server_id == (server.packed if server is not None else None)
    assert request.client_arch == arch
    assert request.is_ipxe == ipxe
    if relay is None:
        assert request.relay_agent is None
    else:
        assert request.relay_agent == bytes([82, len(relay)]) + relay


options_strategy = st.lists(
    st.tuples(st.integers(1, 254).filter(lambda c: c != wire.OPT_MESSAGE_TYPE),
              st.binary(max_size=300)),
    max_size=6, unique_by=lambda option: option[0])


@given(xid=xids, mac=macs, yiaddr=ipv4, siaddr=ipv4, giaddr=ipv4, flags=st.integers(0, 0xFFFF),
       options=options_strategy, file=st.binary(max_size=128).map(lambda b: b.rstrip(b"\0")))
def test_encode_then_decode_gives_the_message_back(xid, mac, yiaddr, siaddr, giaddr, flags,
                                                   options, file):
    message = wire.Message(op=wire.BOOTREPLY, xid=xid, chaddr=mac,
                           options=((wire.OPT_MESSAGE_TYPE, b"\x05"), *options), flags=flags,
                           yiaddr=yiaddr, siaddr=siaddr, giaddr=giaddr, file=file)
    assert wire.decode(wire.encode(message)) == message


def test_scapy_reads_what_encode_wrote():
    message = wire.Message(
        op=wire.BOOTREPLY, xid=0xCAFEF00D, chaddr=MAC, flags=0x8000,
        yiaddr=ipaddress.IPv4Address("198.18.0.11"),
        siaddr=ipaddress.IPv4Address("198.18.0.201"), file=b"undionly.kpxe",
        options=((wire.OPT_MESSAGE_TYPE, bytes([wire.ACK])),
                 (wire.OPT_SERVER_ID, ipaddress.IPv4Address("198.18.0.201").packed),
                 (wire.OPT_LEASE_TIME, wire.u32(3600)),
                 (wire.OPT_DNS, wire.addresses(["198.18.0.12", "198.18.0.13"])),
                 (wire.OPT_HOST_NAME, b"node1")))
    data = wire.encode(message)
    assert len(data) == wire.MIN_REPLY_LEN
    parsed = BOOTP(data)
    assert parsed.op == 2 and parsed.xid == 0xCAFEF00D and parsed.flags == 0x8000
    assert parsed.yiaddr == "198.18.0.11" and parsed.siaddr == "198.18.0.201"
    assert parsed.chaddr[:6] == MAC and parsed.file.rstrip(b"\0") == b"undionly.kpxe"
    # scapy gives (name, value, value, ...) for a list of addresses
    options = {o[0]: o[1:] if len(o) > 2 else o[1]
               for o in parsed[DHCP].options if isinstance(o, tuple)}
    assert options["message-type"] == 5
    assert options["server_id"] == "198.18.0.201"
    assert options["lease_time"] == 3600
    assert options["name_server"] == ("198.18.0.12", "198.18.0.13")
    assert options["hostname"] == b"node1"


def test_long_option_is_split_and_joined_as_rfc_3396_says():
    value = bytes(range(256)) * 2
    encoded = wire.encode_options([(43, value)])
    assert encoded[:2] == bytes([43, 255]) and encoded.count(bytes([43])) >= 3
    message = wire.Message(op=2, xid=1, chaddr=MAC, options=((43, value),))
    assert wire.decode(wire.encode(message)).option(43) == value


VALID = scapy_request()


@pytest.mark.parametrize(("data", "error"), [
    (VALID[:100], wire.ShortPacket),
    (VALID[:wire.OPTIONS_START - 1], wire.ShortPacket),
    (b"", wire.ShortPacket),
    (VALID[:236] + b"\x63\x82\x53\x64" + VALID[240:], wire.BadCookie),
    (scapy_request(op=2), wire.BadOpcode),
    (bytes([7]) + VALID[1:], wire.BadOpcode),
    (VALID[:1] + bytes([6]) + VALID[2:], wire.NotEthernet),
    (VALID[:2] + bytes([16]) + VALID[3:], wire.NotEthernet),
    (VALID[:240] + bytes([53, 1, 1, 12, 200, 65, 66]), wire.OptionOverrun),
    (VALID[:240] + bytes([53, 1, 1, 12]), wire.OptionOverrun),
    (VALID[:240] + bytes([53, 1, 1]) + bytes([12, 1, 65]) * 200 + b"\xff",
     wire.TooManyOptions),
    (VALID[:240] + bytes([12, 1, 65, 255]), wire.NoMessageType),
    (VALID[:240] + bytes([53, 1, 9, 255]), wire.BadOption),
    (VALID[:240] + bytes([53, 2, 1, 1, 255]), wire.BadOption),
    (VALID[:240] + bytes([53, 1, 3, 50, 3, 1, 2, 3, 255]), wire.BadOption),
    (VALID[:240] + bytes([53, 1, 3, 54, 5, 1, 2, 3, 4, 5, 255]), wire.BadOption),
    (VALID[:240] + bytes([53, 1, 1, 93, 3, 0, 0, 7, 255]), wire.BadOption),
])
def test_malformed_packet_raises_its_own_error(data, error):
    with pytest.raises(error):
        wire.parse_request(data)


def test_options_after_end_and_padding_are_ignored():
    data = VALID[:240] + bytes([0, 0, 53, 1, 1, 0, 255, 53, 7, 1])
    assert wire.parse_request(data).message_type == wire.DISCOVER


def test_ipxe_is_recognised_by_its_user_class_in_both_encodings():
    bare = scapy_request(extra=[(wire.OPT_USER_CLASS, b"iPXE")])
    rfc3004 = scapy_request(extra=[(wire.OPT_USER_CLASS, b"\x04iPXE")])
    other = scapy_request(extra=[(wire.OPT_USER_CLASS, b"\x04gPXE")])
    assert wire.parse_request(bare).is_ipxe and wire.parse_request(rfc3004).is_ipxe
    assert not wire.parse_request(other).is_ipxe


def _outcome(data: bytes) -> str:
    try:
        wire.parse_request(data)
    except wire.MalformedPacket as err:
        return err.reason
    return "ok"


@given(st.binary(max_size=600))
@settings(max_examples=500)
def test_fuzz_random_bytes_only_ever_raise_malformed_packet(data):
    _outcome(data)


@given(st.data())
@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_mutated_valid_packets_only_ever_raise_malformed_packet(data):
    packet = bytearray(scapy_request(
        "request", extra=[("requested_addr", "198.18.0.11"), ("server_id", "198.18.0.201"),
                          ("pxe_client_architecture", b"\x00\x07"),
                          ("relay_agent_information", b"\x01\x04abcd")]))
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(packet) - 1))
        packet[position] = data.draw(st.integers(0, 255))
    cut = bytes(packet[:data.draw(st.integers(0, len(packet)))])
    if _outcome(cut) == "ok":
        # What the hot path accepts, the full decoder reads too.
        wire.decode(cut)


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.bin"))


@pytest.mark.parametrize("path", corpus_files(), ids=lambda p: p.name)
def test_corpus_input_gets_the_outcome_its_name_records(path):
    """Files are named OUTCOME--WHAT.bin; OUTCOME is the error's reason, or `ok`."""
    expected = path.name.split("--", 1)[0]
    assert _outcome(path.read_bytes()) == expected


def test_corpus_is_not_empty():
    assert len(corpus_files()) >= 8
