"""One TFTP read transfer on its own socket: lock-step (RFC 1350) or windowed (RFC 7440).

The sender keeps absolute block numbers and puts them on the wire modulo 65536, so files
larger than 65535 blocks roll over to block 0, as iPXE, tftp-hpa and curl expect. A window of
`windowsize` blocks goes out; the client's ACK names the last block it has in order. An ACK
for the window's end opens the next window; an ACK inside the window (the client saw a gap)
restarts the window after it; a repeated ACK is ignored (Sorcerer's Apprentice, RFC 1123),
and silence is answered by resending the window after the timeout.

Transfers run on a `TransferEngine`: a thread with a plain epoll loop over the transfer
sockets, no per-packet task, callback object or timer, because per-packet overhead is
throughput. The service's asyncio loop only takes requests and hands transfers over. A
transfer alone on its engine (one node booting, or the last of a storm) has the thread to
itself: it blocks in read(2) on the transfer's socket and runs lock-step on locals, one system
call per ACK instead of two, until another transfer comes.

While transfers run, the thread polls for up to `spin` seconds (50 us by default) before it
sleeps in epoll, as the kernel's busy_read does for a socket. A lock-step block is a round
trip, and waking a thread that slept costs more than the round trip itself: on the lab's
machines (virtual CPUs), bench/tftp.py's one curl client at blksize 512 got 7.4 MB/s from a
sleeping thread and 21.8 MB/s with a 50 us spin, at less CPU per MB (42.9 ms against 57.2); 50
clients 120 -> 136 MB/s (dnsmasq 132), because the clients' CPU no longer wakes ours for each
ACK. A client slower than the spin (iPXE in a TCG guest) makes spins miss; after a miss the
thread skips spinning for 1, 2, 4 ... MAX_SPIN_BACKOFF waits, so it costs at most a spin per
that many blocks. A spin that finds a datagram halves the back-off. It used to reset it, and
iPXE in a TCG guest answers within the spin now and then: one bench/pxe.py boot over TFTP
(10,900 waits) spun 1,315 times, 997 of them in vain, 50 ms of CPU where dnsmasq spent 80 ms
on the whole boot; halved, 195 spins, 170 in vain (9 ms).
"""

from __future__ import annotations

import collections
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from socket import MSG_DONTWAIT
from typing import Any

from .tftp_wire import (
    ACKS,
    DATA_HEADERS,
    OP_ACK,
    OP_ERROR,
    MalformedPacket,
    Negotiated,
    parse_header,
)

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 1.0      # seconds before a silent client gets the window again
MAX_RETRIES = 6


class Transfer:
    """Sends `data` (a buffer: bytes or an mmap) to the client `sock` is connected to."""

    def __init__(self, sock: socket.socket, data: Any, options: Negotiated,
                 on_done: Callable[[Transfer, str | None], None], description: str):
        self.engine: TransferEngine | None = None
        self.sock = sock
        self.fd = sock.fileno()
        self.view = memoryview(data)
        self.size = len(self.view)
        self.blksize = options.blksize
        self.windowsize = options.windowsize
        self.timeout = options.timeout or DEFAULT_TIMEOUT
        self.oack = options.oack
        self.on_done = on_done
        self.description = description
        # The last block always exists and is short (0 bytes when size is a multiple).
        self.last_block = self.size // self.blksize + 1
        self.acked = 0            # highest block the client has in order
        self.sent = 0             # highest block sent
        self.deadline = 0.0
        self.retries = 0
        self.retransmits = 0
        self.malformed = 0
        self.finished = False
        # Lock-step with one block in flight and more to come: the exact ACK that moves the
        # transfer on (see readable), else None. `progressed`: the short path moved it since
        # the last timeout check, which then re-arms the deadline (no clock read per block).
        self.expect: bytes | None = None
        self.progressed = False

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Called on the engine's thread once it watches the socket."""
        if self.oack is not None:
            self._send(self.oack)
            self._arm()
        else:
            self._send_window()

    def close(self, error: str | None = None) -> None:
        if self.finished:
            return
        self.finished = True
        if self.engine is not None:
            self.engine.forget(self)
        self.sock.close()
        self.view.release()
        self.on_done(self, error)

    def check_timeout(self, now: float) -> None:
        """Called by the engine every TICK: resend the window (or OACK) to a silent client."""
        if self.finished:
            return
        if self.progressed:
            self.progressed = False
            self.deadline = now + self.timeout
            return
        if now < self.deadline:
            return
        self.retries += 1
        if self.retries > MAX_RETRIES:
            self.close(f"client silent after {MAX_RETRIES} retries")
            return
        self.retransmits += 1
        if self.oack is not None:
            self._send(self.oack)
            self._arm()
        else:
            self.sent = self.acked
            self._send_window()

    # -- packets ---------------------------------------------------------------------------------

    def readable(self) -> None:
        """The socket has a datagram: take one. epoll is level-triggered, so a second queued
        one calls again, and we save the BlockingIOError a drain loop would raise each time."""
        try:
            packet = self.sock.recv(2048)
        except BlockingIOError:
            return
        except OSError as err:          # ICMP port unreachable: the client went away
            self.close(f"client unreachable: {err.strerror}")
            return
        self.take(packet)

    def take(self, packet: bytes) -> None:
        """A datagram from the client."""
        if packet == self.expect:
            # Lock-step, the ACK of the one block in flight, more to come: what nearly every
            # packet of a curl or iPXE transfer is. The next block goes out here, without
            # _on_ack/_send_window's general window logic: in lock-step the interpreter's work
            # per block is what we add to the kernel's, which is all dnsmasq costs
            # (bench/tftp.py shows the CPU per MB of both).
            self.acked = sent = self.sent
            self.retries = 0
            self.progressed = True
            offset = sent * self.blksize
            try:
                self.sock.send(DATA_HEADERS[(sent + 1) & 0xFFFF]
                               + self.view[offset:offset + self.blksize], MSG_DONTWAIT)
            except BlockingIOError:
                self.expect = None      # socket buffer full: the timeout resends it
                return
            except OSError as err:
                self.close(f"send failed: {err.strerror}")
                return
            self.sent = sent = sent + 1
            self.expect = ACKS[sent & 0xFFFF] if sent < self.last_block else None
        elif len(packet) >= 4 and packet[1] == OP_ACK and packet[0] == 0:
            self._on_ack(packet[2] << 8 | packet[3])
        else:
            self._other(packet)

    def moved_on(self, sent: int, expect: bytes | None) -> None:
        """The engine's lone-transfer loop (TransferEngine._run_alone) took the short path up
        to block `sent` on its own copies of `sent` and `expect`: take them back."""
        if sent != self.sent:
            self.acked, self.sent, self.expect = sent - 1, sent, expect
            self.retries = 0
            self.progressed = True

    def pending(self) -> bool:
        """Is a datagram waiting in the socket?"""
        return bool(select.select([self.sock], [], [], 0)[0])

    def _other(self, packet: bytes) -> None:
        try:
            opcode, number = parse_header(packet)
        except MalformedPacket:
            self.malformed += 1
            return
        if opcode == OP_ERROR:
            self.close(f"client sent error {number}: "
                       f"{packet[4:].rstrip(bytes(1)).decode('ascii', 'replace')[:80]}")
        else:
            self.malformed += 1

    def _on_ack(self, wire_block: int) -> None:
        if self.oack is not None:
            if wire_block == 0:         # the OACK is acknowledged: data may flow
                self.oack = None
                self._send_window()
            return
        ahead = (wire_block - self.acked) & 0xFFFF
        if ahead == 0 or ahead > self.sent - self.acked:
            return      # a repeated or stale ACK: the timeout handles real loss
        self.acked += ahead
        self.retries = 0
        if self.acked >= self.last_block:
            self.close(None)
        else:
            self._send_window()

    def _send_window(self) -> None:
        first = self.acked + 1
        last = min(self.acked + self.windowsize, self.last_block)
        blksize, view, send = self.blksize, self.view, self.sock.send
        try:
            for block in range(first, last + 1):
                offset = (block - 1) * blksize
                send(DATA_HEADERS[block & 0xFFFF] + view[offset:offset + blksize], MSG_DONTWAIT)
        except BlockingIOError:
            last = block - 1    # socket buffer full: the timeout resends the rest
        except OSError as err:
            self.close(f"send failed: {err.strerror}")
            return
        self.sent = max(self.sent, last)
        self.expect = (ACKS[last & 0xFFFF] if self.windowsize == 1 and last == first
                       and last == self.sent and last < self.last_block else None)
        self._arm()

    def _send(self, packet: bytes) -> None:
        try:
            self.sock.send(packet, MSG_DONTWAIT)
        except OSError:
            pass        # the client is gone or the buffer is full: the timeout copes

    def _arm(self) -> None:
        self.deadline = time.monotonic() + self.timeout


TICK = 0.1      # seconds between timeout checks
DEFAULT_SPIN = 50e-6    # seconds of polling before the thread sleeps, while transfers run
MAX_SPIN_BACKOFF = 64   # waits without a spin after spins that found nothing, at most
# The longest a lone transfer's blocking read waits: a transfer submitted meanwhile waits at
# most this long for the engine, when the lone one's client is silent.
ALONE_WAIT = 0.01
ALONE_WAIT_TIMEVAL = struct.pack("@ll", 0, round(ALONE_WAIT * 1e6))


def backoff_after(backoff: int, found: bool) -> int:
    """The back-off after a spin: halved by one that found a datagram, else doubled (1 at
    least, MAX_SPIN_BACKOFF at most); after a miss the thread skips that many spins."""
    return backoff // 2 if found else min(2 * backoff or 1, MAX_SPIN_BACKOFF)


class TransferEngine:
    """A thread that runs transfers: epoll over their sockets, timeouts checked every TICK,
    a bounded spin before each sleep while transfers run (`spin` seconds; 0: never)."""

    def __init__(self, name: str, spin: float = DEFAULT_SPIN):
        self.name = name
        self.spin = spin
        self.transfers: dict[int, Transfer] = {}
        # Waits a spin ended with a datagram, spins that ran out, and waits that slept: the
        # first two tell whether spinning pays for these clients (the status file shows them).
        self.spin_hits = 0
        self.spin_misses = 0
        self.sleeps = 0
        self.lone_runs = 0      # times one transfer had the thread to itself (_run_alone)
        self._incoming: collections.deque[Transfer] = collections.deque()
        self._epoll = select.epoll()
        self._wake_read, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._epoll.register(self._wake_read, select.EPOLLIN)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, transfer: Transfer) -> None:
        """Thread-safe: the engine starts the transfer on its own thread."""
        self._incoming.append(transfer)
        self._wake()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        self._wake()
        self._thread.join(timeout)

    def forget(self, transfer: Transfer) -> None:
        if self.transfers.pop(transfer.fd, None) is not None:
            self._epoll.unregister(transfer.fd)

    def _wake(self) -> None:
        try:
            os.write(self._wake_write, b"!")
        except BlockingIOError:
            pass        # the pipe is full of wake-ups already

    def _run(self) -> None:
        monotonic = time.monotonic
        next_tick = monotonic() + TICK
        wait = TICK
        transfers = self.transfers
        poll = self._epoll.poll
        spin = self.spin
        skip = backoff = 0      # waits left without a spin; the next miss's back-off
        try:
            while not self._stopping:
                if len(transfers) == 1 and not self._incoming:
                    next_tick = self._run_alone(next(iter(transfers.values())), next_tick)
                    wait = max(0.0, next_tick - monotonic())
                    continue
                events = None
                if spin and transfers:
                    if skip:
                        skip -= 1
                    else:
                        events, skip, backoff = self._spin(backoff)
                if not events:
                    self.sleeps += 1
                    # Idle, nothing can time out: sleep until a transfer comes, as an idle
                    # replica on every node should cost nothing (it woke 10 times a second).
                    events = poll(wait if transfers else -1)
                for fd, _ in events:
                    transfer = transfers.get(fd)
                    if transfer is not None:
                        transfer.readable()
                    elif fd == self._wake_read:
                        self._take_incoming()
                now = monotonic()
                wait = next_tick - now
                if wait <= 0:
                    next_tick, wait = now + TICK, TICK
                    for transfer in list(transfers.values()):
                        transfer.check_timeout(now)
        finally:
            for transfer in list(transfers.values()):
                # ACKs already queued still count: a client whose last ACK is in our socket
                # has its whole file.
                while not transfer.finished and transfer.pending():
                    transfer.readable()
                transfer.close("service stopping")
            while self._incoming:
                self._incoming.popleft().close("service stopping")
            self._epoll.close()
            os.close(self._wake_read)
            os.close(self._wake_write)

    def _run_alone(self, transfer: Transfer, next_tick: float) -> float:
        """The engine's only transfer, until it ends or another one comes. The thread blocks in
        read(2) on the transfer's socket and the lock-step short path runs on locals: one
        system call from an ACK to the next block where epoll takes two, and no method call or
        attribute store. With a slow client every block is a wake-up whose CPU is on the round
        trip: in bench/pxe.py's all-TFTP boot (iPXE in a TCG guest, 10,900 blocks) the
        transfer thread used 87-94 ms against 111-119 through epoll (dnsmasq: 78-85 ms), and
        the node reached /init in 8.4-8.5 s against 8.5-8.7 (six boots each). SO_RCVTIMEO
        ends a silent wait after ALONE_WAIT, for the timeouts and for a transfer submitted
        meanwhile (the next ACK also ends it). Returns the next tick."""
        self.lone_runs += 1
        sock, fd = transfer.sock, transfer.fd
        try:
            sock.setblocking(True)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, ALONE_WAIT_TIMEVAL)
        except OSError as err:
            transfer.close(f"socket failed: {err.strerror}")
            return next_tick
        read, write, monotonic = os.read, os.write, time.monotonic
        view, blksize, last_block = transfer.view, transfer.blksize, transfer.last_block
        headers, acks, incoming, spin = DATA_HEADERS, ACKS, self._incoming, self.spin
        sent, expect = transfer.sent, transfer.expect
        skip = backoff = sleeps = 0
        while not (incoming or self._stopping):
            if spin:        # as in _run; the epoll set also holds the wake-up pipe
                if skip:
                    skip -= 1
                else:
                    events, skip, backoff = self._spin(backoff)
                    if events and (incoming or self._stopping):
                        continue
                    if len(events) > 1 or events and events[0][0] == self._wake_read:
                        self._drain_wake()  # a late wake-up for a transfer taken already
            sleeps += 1
            packet: bytes | None
            try:
                packet = read(fd, 2048)
            except BlockingIOError:
                packet = None           # ALONE_WAIT passed in silence
            except OSError as err:      # ICMP port unreachable: the client went away
                transfer.close(f"client unreachable: {err.strerror}")
                break
            if packet is not None and packet == expect:     # Transfer.take's short path
                offset = sent * blksize
                sent += 1
                try:
                    write(fd, headers[sent & 0xFFFF] + view[offset:offset + blksize])
                except OSError as err:
                    transfer.close(f"send failed: {err.strerror}")
                    break
                expect = acks[sent & 0xFFFF] if sent < last_block else None
                now = monotonic()
                if now < next_tick:
                    continue
            else:
                now = monotonic()
            transfer.moved_on(sent, expect)
            if packet is not None:
                transfer.take(packet)
            if now >= next_tick:
                next_tick = now + TICK
                self.sleeps += sleeps
                sleeps = 0
                transfer.check_timeout(now)
            if transfer.finished:
                break
            sent, expect = transfer.sent, transfer.expect
        else:
            transfer.moved_on(sent, expect)
        self.sleeps += sleeps
        if not transfer.finished:
            sock.setblocking(False)
        return next_tick

    def _spin(self, backoff: int) -> tuple[list[tuple[int, int]], int, int]:
        """Poll for up to `spin` seconds: what was found (nothing: []), the waits to skip
        spinning for after it, and the back-off after it."""
        poll, monotonic = self._epoll.poll, time.monotonic
        events = poll(0)
        if not events:
            until = monotonic() + self.spin
            while not events and monotonic() < until:
                events = poll(0)
        if events:
            self.spin_hits += 1
        else:
            self.spin_misses += 1
        backoff = backoff_after(backoff, found=bool(events))
        return events, 0 if events else backoff, backoff

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_read, 4096):
                pass
        except BlockingIOError:
            pass

    def _take_incoming(self) -> None:
        self._drain_wake()
        while self._incoming:
            transfer = self._incoming.popleft()
            transfer.engine = self
            self.transfers[transfer.fd] = transfer
            self._epoll.register(transfer.fd, select.EPOLLIN)
            transfer.start()
