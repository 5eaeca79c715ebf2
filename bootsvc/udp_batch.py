"""Batched UDP receive and send for a service's hot path: many datagrams per system call with
recvmmsg(2) and sendmmsg(2), where Python's socket module offers one per call (`recvfrom`,
`sendto`).

Why it goes around the socket module: at high rates a UDP server written in Python spends
most of its time in the two system calls per datagram, not in its own code. py-spy on the DNS
service flooded (bench/dns.py, 1,000 nodes, cluster names) found `sendto` in 42% of the
samples and `recvfrom` in 22%, the rest of its loop in 17%. Through this module the same
server reads up to `count` queued datagrams in one `recvmmsg` and writes the replies in one
`sendmmsg`: flooded, side by side with the loop before it (bench/dns.py --baseline), it
answered 1.2-1.9x the queries for 0.5-0.8x the CPU each (README, DNS section). A batch of one
datagram, the usual one well below saturation, costs a little more than recvfrom + sendto (two
ctypes calls). The socket module has neither call, so they are reached through ctypes on
libc, with every structure allocated and wired once: an array of `mmsghdr`, one `iovec` and
one `sockaddr_in` slot per message, and one flat data buffer of `count * size` octets. Per
batch only the lengths (and, for sending, the iovecs) change; they are read and written through
memoryviews of those arrays, never through ctypes attribute access.

    batch = open_batch(sock, count=64, size=4096)   # a bound, blocking AF_INET UDP socket
    while serving:
        datagrams, peers = batch.receive()          # two lists; empty once shut down
        full, failed = batch.send([answer(d) for d in datagrams], peers)

`receive()` blocks until one datagram is queued, then takes what else is queued without
waiting (MSG_WAITFORONE), up to `count`. A datagram longer than `size` is dropped and counted
in `batch.truncated`. A peer is the sender's raw `sockaddr_in` (16 octets, hashable):
`peer[HOST]` is its 4-octet address (a cheap key for per-source state), `peer_address(peer)`
gives `(host, port)` for logs and `sendto`, and `peer_of((host, port))` makes one. `send()`
never blocks: it returns how many replies did not fit the socket's send buffer and how many
failed otherwise (an unreachable destination), and goes on with the others.

Where libc has no recvmmsg (not Linux), or the socket is not AF_INET, `open_batch` gives a
`PlainBatch` with the same interface over `recvmsg`/`sendto` (a blocking read, then
non-blocking ones). Imports nothing of the project, so any UDP service (DHCP too) can use it.
"""

from __future__ import annotations

import ctypes
import errno
import socket
import struct
from array import array
from collections.abc import MutableMapping, Sequence
from itertools import accumulate
from operator import add
from typing import Any

HOST = slice(4, 8)                      # the IPv4 address in a peer (sockaddr_in)
SOCKADDR_IN = 16
MSG_WAITFORONE = 0x10000                # Linux: MSG_DONTWAIT after the first datagram
_SIZE_T = "Q" if ctypes.sizeof(ctypes.c_size_t) == 8 else "I"   # iov_base, iov_len
_FULL = frozenset((errno.EAGAIN, errno.EWOULDBLOCK, errno.ENOBUFS))
_PORT = struct.Struct(">H")
_FAMILY = struct.Struct("=H").pack(socket.AF_INET)


def peer_of(address: tuple[str, int]) -> bytes:
    """The peer token (`sockaddr_in`) of an IPv4 (host, port)."""
    return _FAMILY + _PORT.pack(address[1]) + socket.inet_aton(address[0]) + bytes(8)


def peer_address(peer: bytes) -> tuple[str, int]:
    return socket.inet_ntoa(peer[HOST]), _PORT.unpack_from(peer, 2)[0]


def peer_host(peer: bytes) -> str:
    return socket.inet_ntoa(peer[HOST])


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.c_void_p), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


def _libc_calls() -> tuple[Any, Any] | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)    # CDLL calls release the GIL
        recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
    except (OSError, AttributeError):
        return None
    # No argtypes: converting declared arguments doubled the cost of a call (0.8 -> 1.6 us);
    # every argument passed is a Python int (int), None (NULL) or a ctypes array (pointer).
    return recvmmsg, sendmmsg


_CALLS = _libc_calls()


class _Ring:
    """`count` message slots wired once: headers, one iovec and one `sockaddr_in` per slot,
    and a data buffer, plus integer views of the fields that change per batch (uint32
    `msg_len` and `msg_namelen` of slot i at `*_at + i * stride`; size_t iovec words)."""

    def __init__(self, count: int, slot: int):
        self.count, self.slot = count, slot
        self.headers = (_Mmsghdr * count)()
        self.iovecs = (_Iovec * count)()
        # Any: a slice of a c_char array is bytes, which typeshed does not know.
        self.names: Any = (ctypes.c_char * (SOCKADDR_IN * count))()
        self.data: Any = (ctypes.c_char * (slot * count))()
        self.data_at = ctypes.addressof(self.data)
        names_at, iovecs_at = ctypes.addressof(self.names), ctypes.addressof(self.iovecs)
        for i in range(count):
            self.iovecs[i].iov_base = self.data_at + i * slot
            self.iovecs[i].iov_len = slot
            header = self.headers[i].msg_hdr
            header.msg_name = names_at + i * SOCKADDR_IN
            header.msg_namelen = SOCKADDR_IN
            header.msg_iov = iovecs_at + i * ctypes.sizeof(_Iovec)
            header.msg_iovlen = 1
        self.uint32 = memoryview(self.headers).cast("B").cast("I")
        self.stride = ctypes.sizeof(_Mmsghdr) // 4
        self.len_at = _Mmsghdr.msg_len.offset // 4
        self.namelen_at = (_Mmsghdr.msg_hdr.offset + _Msghdr.msg_namelen.offset) // 4
        iovecs = memoryview(self.iovecs).cast("B")                 # base, len, base, ...
        self.iov_words = iovecs.cast("Q") if _SIZE_T == "Q" else iovecs.cast("I")
        self.name_view = memoryview(self.names).cast("B")
        self.data_view = memoryview(self.data).cast("B")
        self.starts = list(range(0, slot * count, slot))
        self.name_slices = [slice(i, i + SOCKADDR_IN)
                            for i in range(0, SOCKADDR_IN * count, SOCKADDR_IN)]

    def lengths(self, got: int) -> list[int]:
        return self.uint32[self.len_at:self.len_at + got * self.stride:self.stride].tolist()


class MmsgBatch:
    """recvmmsg/sendmmsg on an AF_INET UDP socket (see the module's docstring).

    Per batch the work is a fixed number of C-level operations (map, join, strided memoryview
    copies), not Python bytecode per datagram: on this machine's CPU one line of Python per
    datagram costs about as much as the system call the batch saves."""

    mmsg = True

    def __init__(self, sock: socket.socket, count: int = 64, size: int = 4096):
        if _CALLS is None:
            raise OSError(errno.ENOSYS, "libc has no recvmmsg/sendmmsg")
        self.sock, self.count, self.size = sock, count, size
        self.truncated = 0          # datagrams longer than `size`, dropped
        self._recvmmsg, self._sendmmsg = _CALLS
        # One octet more than `size` per receive slot: a datagram that fills it is too long
        # (the kernel cuts it to the slot), so `msg_len` alone tells, without its flags.
        self._in = _Ring(count, size + 1)
        self._out = _Ring(count, size)
        sock.setblocking(True)      # recvmmsg waits in the kernel, not on a timeout
        self._fd = sock.fileno()

    def receive(self) -> tuple[list[bytes], list[bytes]]:
        """(datagrams, peers): what is queued, at most `count`, waiting for the first one;
        two empty lists once the socket is shut down for reading (or a signal came)."""
        ring = self._in
        got = self._recvmmsg(self._fd, ring.headers, self.count, MSG_WAITFORONE, None)
        if got <= 0:
            code = ctypes.get_errno()
            if got == 0 or code in (errno.EINTR, errno.EAGAIN):
                return [], []
            raise OSError(code, f"recvmmsg: {errno.errorcode.get(code, code)}")
        if got == 1:                # the usual batch below saturation: the fewest steps
            length = ring.uint32[ring.len_at]
            if 0 < length <= self.size:
                return [ring.data[:length]], [ring.names[:SOCKADDR_IN]]
            return self._sift(1, [length])
        lengths = ring.lengths(got)
        if max(lengths) > self.size or not min(lengths):
            return self._sift(got, lengths)
        # Slicing a ctypes char array gives bytes at once (a memoryview slice costs 2-3x).
        datagrams = list(map(ring.data.__getitem__,
                             map(slice, ring.starts, map(add, ring.starts, lengths))))
        names = ring.names[:got * SOCKADDR_IN]
        return datagrams, list(map(names.__getitem__, ring.name_slices[:got]))

    def _sift(self, got: int, lengths: list[int]) -> tuple[list[bytes], list[bytes]]:
        """The rare batch with a datagram too long (dropped, counted) or empty: an empty one
        without a sender is the end of file that shutdown(SHUT_RD) makes (dropped, and its
        slot's address length set back)."""
        ring = self._in
        datagrams, peers = [], []
        for i, length in enumerate(lengths):
            namelen = ring.namelen_at + i * ring.stride
            if length > self.size:
                self.truncated += 1
            elif length or ring.uint32[namelen]:
                start = ring.starts[i]
                datagrams.append(ring.data[start:start + length])
                peers.append(ring.names[ring.name_slices[i]])
            ring.uint32[namelen] = SOCKADDR_IN
        return datagrams, peers

    def send(self, replies: Sequence[bytes], peers: Sequence[bytes]) -> tuple[int, int]:
        """Send replies[i] to peers[i], without blocking: (how many did not fit the send
        buffer, how many failed otherwise)."""
        if len(replies) == 1:       # slot 0's iovec always starts at the data buffer
            ring, reply = self._out, replies[0]
            if len(reply) <= len(ring.data_view) and len(peers[0]) == SOCKADDR_IN:
                ring.data_view[:len(reply)] = reply
                ring.iov_words[1] = len(reply)
                ring.name_view[:SOCKADDR_IN] = peers[0]
                return self._flush(1)
        full = failed = 0
        for first in range(0, len(replies), self.count):
            a, b = self._send_some(replies[first:first + self.count],
                                   peers[first:first + self.count])
            full, failed = full + a, failed + b
        return full, failed

    def _send_some(self, replies: Sequence[bytes], peers: Sequence[bytes]) -> tuple[int, int]:
        ring, slots = self._out, len(replies)
        joined = b"".join(replies)
        if len(joined) > len(ring.data_view):     # only with a tiny `count * size`
            return _send_each(self.sock, replies, peers)
        addresses = b"".join(peers)
        if len(addresses) != SOCKADDR_IN * slots:
            raise ValueError("a peer is not a sockaddr_in (use peer_of)")
        # The replies lie back to back in the data buffer; each iovec points at its own.
        lengths = list(map(len, replies))
        ring.data_view[:len(joined)] = joined
        ring.iov_words[0:2 * slots:2] = array(_SIZE_T, accumulate(lengths[:-1],
                                                                  initial=ring.data_at))
        ring.iov_words[1:2 * slots:2] = array(_SIZE_T, lengths)
        ring.name_view[:len(addresses)] = addresses
        return self._flush(slots)

    def _flush(self, slots: int) -> tuple[int, int]:
        full = failed = done = 0
        headers, each = self._out.headers, ctypes.sizeof(_Mmsghdr)
        while done < slots:
            sent = self._sendmmsg(self._fd, ctypes.byref(headers, done * each) if done
                                  else headers, slots - done, socket.MSG_DONTWAIT)
            if sent >= 0:
                done += sent
                continue
            code = ctypes.get_errno()
            if code == errno.EINTR:
                continue
            if code in _FULL:           # the rest would not fit either
                return full + slots - done, failed
            failed += 1                 # this destination only: go on with the next one
            done += 1
        return full, failed


class PlainBatch:
    """The same interface over recvmsg/sendto, where recvmmsg is not there."""

    mmsg = False

    def __init__(self, sock: socket.socket, count: int = 64, size: int = 4096):
        self.sock, self.count, self.size = sock, count, size
        self.truncated = 0
        sock.setblocking(True)

    def receive(self) -> tuple[list[bytes], list[bytes]]:
        datagrams: list[bytes] = []
        peers: list[bytes] = []
        flags = 0
        while len(datagrams) < self.count:
            try:
                data, _, message_flags, source = self.sock.recvmsg(self.size, 0, flags)
            except (BlockingIOError, InterruptedError):
                break
            if source is None:          # shut down for reading
                break
            flags = socket.MSG_DONTWAIT
            if message_flags & socket.MSG_TRUNC:
                self.truncated += 1
                continue
            datagrams.append(data)
            peers.append(peer_of(source))
        return datagrams, peers

    def send(self, replies: Sequence[bytes], peers: Sequence[bytes]) -> tuple[int, int]:
        return _send_each(self.sock, replies, peers)


def _send_each(sock: socket.socket, replies: Sequence[bytes], peers: Sequence[bytes]
               ) -> tuple[int, int]:
    full = failed = 0
    for reply, peer in zip(replies, peers, strict=True):
        try:
            sock.sendto(reply, socket.MSG_DONTWAIT, peer_address(peer))
        except OSError as err:
            if err.errno in _FULL:
                full += 1
            else:
                failed += 1
    return full, failed


def send_counted(batch: MmsgBatch | PlainBatch, replies: Sequence[bytes],
                 peers: Sequence[bytes], counters: MutableMapping[str, int]) -> None:
    """`batch.send`, counting into a service's counters what did not fit the send buffer
    (`dropped_send_buffer_full`) and what failed otherwise (`send_errors`)."""
    full, failed = batch.send(replies, peers)
    if full:
        counters["dropped_send_buffer_full"] += full
    if failed:
        counters["send_errors"] += failed


def open_batch(sock: socket.socket, count: int = 64, size: int = 4096
               ) -> MmsgBatch | PlainBatch:
    """The batched reader/writer for `sock`: recvmmsg/sendmmsg where libc has them and the
    socket is IPv4, else recvmsg/sendto behind the same interface."""
    if _CALLS is not None and sock.family == socket.AF_INET:
        return MmsgBatch(sock, count, size)
    return PlainBatch(sock, count, size)
