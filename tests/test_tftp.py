"""TFTP without root: the wire format, option negotiation, and the windowed sender driven by a
client written here over a socketpair (loss, repeated ACKs, block-number rollover)."""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from virtualinux.bootsvc import tftp_window, tftp_wire
from virtualinux.bootsvc.tftp_window import Transfer, TransferEngine
from virtualinux.bootsvc.tftp_wire import MalformedPacket, Request

CORPUS = Path(__file__).parent / "corpus" / "tftp"


def rrq(name: bytes, mode: bytes = b"octet", **options: str) -> bytes:
    packet = struct.pack("!H", 1) + name + b"\0" + mode + b"\0"
    for key, value in options.items():
        packet += key.encode() + b"\0" + value.encode() + b"\0"
    return packet


def test_request_decodes_with_options_lowercased():
    request = tftp_wire.parse_request(rrq(b"boot.ipxe", b"OCTET", BLKSIZE="1468", tsize="0"))
    assert request == Request(False, "boot.ipxe", "octet", {"blksize": "1468", "tsize": "0"})
    assert tftp_wire.parse_request(struct.pack("!H", 2) + b"x\0octet\0").write


@pytest.mark.parametrize("packet", [
    b"", b"\x00", b"\x00\x01", b"\x00\x01boot.ipxe", b"\x00\x01boot.ipxe\0octet",
    b"\x00\x03\x00\x01data", b"\x00\x04\x00\x01", b"\x00\x09x\0octet\0",
    b"\x00\x01\0octet\0", b"\x00\x01a\0octet\0blksize\0", b"\x00\x01\xff\xfe\0octet\0",
    b"\x00\x01a\0octet\0" + b"x" * 2000 + b"\0",
])
def test_malformed_requests_raise_one_exception_type(packet):
    with pytest.raises(MalformedPacket):
        tftp_wire.parse_request(packet)


# What each file of tests/corpus/tftp must give: the start of the MalformedPacket message, or
# the request it parses to and what negotiation then agrees (a new file needs a line here).
CORPUS_OUTCOMES: dict[str, str | tuple[Request, tftp_wire.Negotiated]] = {
    "ack-on-request-port.bin": "opcode 4 on the request port",
    "empty-option-name.bin": "bad request: Invalid options",
    "non-ascii-name.bin": "bad request: 'ascii' codec can't decode",
    "nul-in-name.bin": "bad request: packet with odd number of option/value pairs",
    "only-opcode.bin": "request of 2 bytes",
    # A 40-digit blksize is no number we take: left out, the transfer uses 512 (no OACK).
    "huge-blksize.bin": (Request(False, "a", "octet", {"blksize": "9" * 40}),
                         tftp_wire.Negotiated()),
    # An option name with junk in it is an unknown option: left out of the (absent) OACK.
    "odd-options.bin": (Request(False, "a", "octet", {"blksize)2": "tsize"}),
                        tftp_wire.Negotiated()),
}


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.bin")), ids=lambda p: p.name)
def test_corpus_of_packets_that_once_broke_parsers_is_replayed(path):
    expected = CORPUS_OUTCOMES[path.name]
    if isinstance(expected, str):
        with pytest.raises(MalformedPacket) as raised:
            tftp_wire.parse_request(path.read_bytes())
        assert str(raised.value).startswith(expected)
    else:
        request = tftp_wire.parse_request(path.read_bytes())
        assert (request, tftp_wire.negotiate(request, size=1)) == expected


def test_every_corpus_file_has_an_outcome_and_every_outcome_a_file():
    assert sorted(p.name for p in CORPUS.glob("*.bin")) == sorted(CORPUS_OUTCOMES)


def test_negotiation_takes_supported_options_and_clamps():
    request = Request(False, "f", "octet", {"blksize": "99999", "tsize": "0", "timeout": "3",
                                            "windowsize": "1000", "multicast": ""})
    negotiated = tftp_wire.negotiate(request, size=12345, max_blksize=1468)
    assert (negotiated.blksize, negotiated.windowsize, negotiated.timeout) == (1468, 64, 3.0)
    assert negotiated.oack == (b"\x00\x06blksize\x001468\x00timeout\x003\x00tsize\x0012345\x00"
                               b"windowsize\x0064\x00")


def test_invalid_option_values_are_left_out_of_the_oack():
    request = Request(False, "f", "octet", {"blksize": "4", "timeout": "0", "windowsize": "x"})
    assert tftp_wire.negotiate(request, size=1) == tftp_wire.Negotiated()


def test_the_header_tables_are_the_encoders_bytes_for_every_block():
    assert len(tftp_wire.DATA_HEADERS) == len(tftp_wire.ACKS) == 65536
    for block in (0, 1, 255, 256, 65535):
        assert tftp_wire.DATA_HEADERS[block] == tftp_wire.encode_data_header(block) == \
            b"\x00\x03" + block.to_bytes(2, "big")
        assert tftp_wire.ACKS[block] == tftp_wire.encode_ack(block) == \
            b"\x00\x04" + block.to_bytes(2, "big")


def test_error_packet_and_netascii():
    assert tftp_wire.encode_error(2, "no") == b"\x00\x05\x00\x02no\x00"
    assert tftp_wire.to_netascii(b"a\nb\rc") == b"a\r\nb\r\0c"


class Client:
    """A TFTP reader on one end of a socketpair, with a plan of blocks to 'lose'."""

    def __init__(self, sock: socket.socket, windowsize: int, lose: set[int],
                 ack_delay: float = 0.0):
        self.sock, self.windowsize, self.lose = sock, windowsize, set(lose)
        self.ack_delay = ack_delay      # seconds before each ACK: a client slower than a spin
        self.received = bytearray()
        self.expected = 1
        self.acks_sent = 0

    def ack(self, block: int) -> None:
        if self.ack_delay:
            time.sleep(self.ack_delay)
        self.sock.send(struct.pack("!HH", 4, block & 0xFFFF))
        self.acks_sent += 1

    def run(self, blksize: int, oack: bool) -> bytes:
        self.sock.settimeout(10)
        if oack:
            assert self.sock.recv(70000)[:2] == b"\x00\x06"
            self.ack(0)
            self.ack(0)         # a repeated ACK must not make the server send twice
        in_window = 0
        while True:
            packet = self.sock.recv(70000)
            opcode, number = struct.unpack("!HH", packet[:4])
            assert opcode == 3
            if number != self.expected & 0xFFFF:
                self.ack(self.expected - 1)     # a gap: ACK the last block in order (RFC 7440)
                in_window = 0
                continue
            if self.expected in self.lose:
                self.lose.discard(self.expected)
                continue
            self.received += packet[4:]
            self.expected += 1
            in_window += 1
            last = len(packet) - 4 < blksize
            if last or in_window == self.windowsize:
                self.ack(self.expected - 1)
                in_window = 0
            if last:
                return bytes(self.received)


def sender_and_socket(data: bytes, blksize: int, windowsize: int, lose: bool, oack: bool
                      ) -> tuple[Transfer, socket.socket, threading.Event, list]:
    """A Transfer on one end of a socketpair, the client's end, and what it ends with."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    done = threading.Event()
    results: list = []
    options = tftp_wire.Negotiated(blksize, windowsize, 0.2 if lose else None,
                                   b"\x00\x06blksize\x00x\x00" if oack else None)

    def finished(transfer, error):
        results.append(error)
        done.set()

    return Transfer(ours, data, options, finished, "test"), theirs, done, results


def transfer(data: bytes, blksize: int, windowsize: int, lose: set[int] = frozenset(),
             oack: bool = True, ack_delay: float = 0.0,
             spin: float = tftp_window.DEFAULT_SPIN) -> tuple[bytes, Transfer, list]:
    sender, theirs, done, results = sender_and_socket(data, blksize, windowsize, bool(lose), oack)
    engine = TransferEngine("test", spin)
    engine.start()
    try:
        engine.submit(sender)
        received = Client(theirs, windowsize, lose, ack_delay).run(blksize, oack)
        assert done.wait(10)
    finally:
        engine.stop()
        theirs.close()
    return received, sender, results


@pytest.mark.parametrize("windowsize", [1, 4, 16])
def test_window_sends_the_file_and_recovers_lost_blocks(windowsize):
    data = os.urandom(100 * 512 + 17)
    received, sender, results = transfer(data, 512, windowsize, lose={1, 7, 50, 101})
    assert received == data and results == [None]
    # Lock-step, every lost block waits for a timeout. In a window the block after a lost one
    # shows the gap at once, so only the loss of the last block (101) must wait.
    assert sender.retransmits >= (4 if windowsize == 1 else 1)


def test_file_of_whole_blocks_ends_with_an_empty_block():
    data = os.urandom(8 * 512)
    received, sender, _ = transfer(data, 512, 4, oack=False)
    assert received == data and sender.last_block == 9


def test_block_numbers_roll_over_after_65535():
    data = os.urandom(70_000 * 8 + 3)
    received, sender, results = transfer(data, 8, 64, lose={65_535, 65_536, 65_537})
    assert received == data and results == [None]
    assert sender.acked == sender.last_block > 65_536


def test_spins_back_off_for_a_client_slower_than_the_spin():
    """A client that takes 3 ms per ACK (a slow guest's iPXE) makes every spin miss; after a
    miss the engine skips spinning for 1, 2, 4 ... 64 waits, so 100 blocks cost a handful of
    spins, not 100."""
    data = os.urandom(100 * 512)
    received, sender, results = transfer(data, 512, 1, oack=False, ack_delay=0.003)
    engine = sender.engine
    assert received == data and results == [None]
    assert engine.sleeps >= 100
    assert 1 <= engine.spin_misses + engine.spin_hits <= 15, vars(engine)


def spins_over(waits: int, found_in_spin) -> int:
    """How often the engine's loop spins over `waits` waits when `found_in_spin(i)` says
    whether the datagram of wait i would arrive within a spin."""
    spins = skip = backoff = 0
    for wait in range(waits):
        if skip:
            skip -= 1
            continue
        spins += 1
        found = found_in_spin(wait)
        backoff = tftp_window.backoff_after(backoff, found)
        if not found:
            skip = backoff
    return spins


def test_spin_back_off_doubles_on_a_miss_and_halves_on_a_hit():
    backoff, seen = 0, []
    for _ in range(8):
        backoff = tftp_window.backoff_after(backoff, found=False)
        seen.append(backoff)
    assert seen == [1, 2, 4, 8, 16, 32, 64, 64]
    assert tftp_window.backoff_after(64, found=True) == 32
    assert tftp_window.backoff_after(1, found=True) == 0


def test_a_client_rarely_within_the_spin_costs_few_spins():
    """iPXE in a TCG guest answers within the spin now and then (a quarter of the spins in a
    bench/pxe.py boot). A hit that reset the back-off made the thread spin on one wait in
    four, 50 us of CPU each time, mostly in vain; halved, a few in a hundred. A client always
    within the spin (curl, a host's tftp) is still spun for on every wait."""
    import random

    chance = random.Random(17)
    now_and_then = [chance.random() < 0.25 for _ in range(10_000)]
    assert spins_over(10_000, now_and_then.__getitem__) < 400
    assert spins_over(10_000, lambda wait: wait % 4 == 0) < 400
    assert spins_over(10_000, lambda wait: True) == 10_000
    assert spins_over(10_000, lambda wait: False) < 10_000 / 60


def test_no_spin_when_the_spin_is_zero():
    data = os.urandom(20 * 512)
    received, sender, _ = transfer(data, 512, 1, oack=False, spin=0.0)
    assert received == data
    assert (sender.engine.spin_hits, sender.engine.spin_misses) == (0, 0)
    assert sender.engine.sleeps >= 21


def test_a_lone_transfer_hands_the_thread_back_when_another_comes():
    """A transfer alone on its engine is served from a blocking read on its own socket; one
    submitted meanwhile ends that and is served beside it: a 60-block file finishes while a
    1000-block one whose client waits 1 ms per ACK is still going. Both arrive whole (with
    lost blocks resent), and the one left runs alone again."""
    engine = TransferEngine("test")
    engine.start()
    long, short = os.urandom(1000 * 512), os.urandom(60 * 512 + 7)
    clients: list[threading.Thread] = []
    got: dict[str, bytes] = {}
    try:
        first, first_theirs, first_done, first_results = sender_and_socket(
            long, 512, 1, lose=True, oack=True)
        client = Client(first_theirs, 1, {5, 900}, ack_delay=0.001)
        clients.append(threading.Thread(target=lambda: got.update(long=client.run(512, True))))
        clients[-1].start()
        engine.submit(first)
        deadline = time.monotonic() + 10
        while engine.lone_runs < 1 or first.acked < 20:
            assert time.monotonic() < deadline, vars(engine)
            time.sleep(0.005)
        second, second_theirs, second_done, second_results = sender_and_socket(
            short, 512, 1, lose=True, oack=False)
        engine.submit(second)
        got["short"] = Client(second_theirs, 1, {30}).run(512, False)
        assert second_done.wait(10)
        assert not first_done.is_set(), "the second transfer waited for the first"
        assert first_done.wait(20)
    finally:
        engine.stop()
        for thread in clients:
            thread.join(10)
    assert got == {"long": long, "short": short}
    assert first_results == second_results == [None]
    assert first.retransmits >= 2 and second.retransmits >= 1
    assert engine.lone_runs >= 2    # the first one alone, then whichever was left


def test_a_late_wake_up_does_not_keep_a_lone_transfer_spinning():
    """A wake-up byte can reach the pipe after its transfer was taken (submit appends, then
    writes). A lone transfer's spin sees the pipe readable; unless it drains it, every spin
    'finds' it and a client slower than the spin (3 ms per ACK) is spun for on every block."""
    engine = TransferEngine("test")
    engine.start()
    data = os.urandom(100 * 512)
    try:
        sender, theirs, done, results = sender_and_socket(data, 512, 1, lose=False, oack=False)
        engine.submit(sender)
        client = Client(theirs, 1, set(), ack_delay=0.003)
        deadline = time.monotonic() + 10
        while engine.lone_runs < 1:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        engine._wake()          # the late byte
        assert client.run(512, False) == data and done.wait(10)
    finally:
        engine.stop()
    assert results == [None] and engine.lone_runs == 1
    assert engine.spin_hits + engine.spin_misses <= 16, vars(engine)


def test_an_idle_engine_sleeps_until_a_transfer_comes():
    """No transfer, nothing to time out: the thread sleeps once, where it used to wake every
    TICK; a transfer submitted later still wakes it and is sent."""
    engine = TransferEngine("test")
    engine.start()
    try:
        time.sleep(4 * tftp_window.TICK)
        assert engine.sleeps <= 1, vars(engine)
        data = os.urandom(3 * 512)
        sender, theirs, done, results = sender_and_socket(data, 512, 1, lose=False, oack=False)
        engine.submit(sender)
        assert Client(theirs, 1, set()).run(512, False) == data and done.wait(10)
    finally:
        engine.stop()
    assert results == [None]


WORKERS_UNDER_AFFINITY = """
import os, sys
from virtualinux.bootsvc.tftp import default_workers
os.sched_setaffinity(0, {int(c) for c in sys.argv[1].split(",")})
print(default_workers())
"""


def test_transfer_threads_default_to_one_per_usable_cpu_at_most_four():
    """On one CPU more threads only hand the GIL to each other: a server pinned to one CPU (as
    bench/tftp.py pins every server) runs one transfer thread."""
    import subprocess
    import sys

    cpus = sorted(os.sched_getaffinity(0))

    def workers(allowed: list[int]) -> int:
        return int(subprocess.run([sys.executable, "-c", WORKERS_UNDER_AFFINITY,
                                   ",".join(map(str, allowed))], capture_output=True,
                                  text=True, check=True).stdout)

    assert workers(cpus[:1]) == 1
    assert workers(cpus) == min(4, len(cpus))
