"""HTTP without root: request-head parsing and byte ranges."""

from __future__ import annotations

import pytest
from virtualinux.bootsvc.http import BadRequest, byte_range, parse_head


def test_request_head_parses_path_headers_and_keep_alive():
    request = parse_head(b"GET /nodes/52-54-00-00-00-11.ipxe?x=1 HTTP/1.1\r\n"
                         b"Host: 198.18.0.1\r\nRange: bytes=0-9")
    assert (request.method, request.path, request.headers["range"]) == \
        ("GET", "/nodes/52-54-00-00-00-11.ipxe", "bytes=0-9")
    assert request.keep_alive
    assert not parse_head(b"GET / HTTP/1.0").keep_alive
    assert not parse_head(b"GET / HTTP/1.1\r\nConnection: close").keep_alive
    assert not parse_head(b"GET / HTTP/1.1\r\nContent-Length: 5").keep_alive
    assert parse_head(b"GET http://h/a%20b HTTP/1.1").path == "/a b"


@pytest.mark.parametrize("head, status", [
    (b"GET /", 400), (b"GET / HTTP/2.0", 505), (b"G(T / HTTP/1.1", 400),
    (b"GET relative HTTP/1.1", 400), (b"GET /%ff HTTP/1.1", 400),
    (b"GET / HTTP/1.1\r\nno colon", 400), (b"GET  / HTTP/1.1", 400)])
def test_bad_heads_raise_bad_request_with_a_status(head, status):
    with pytest.raises(BadRequest) as caught:
        parse_head(head)
    assert caught.value.status == status


@pytest.mark.parametrize("header, expected", [
    (None, None), ("bytes=0-99", (0, 99)), ("bytes=100-", (100, 999)),
    ("bytes=-10", (990, 999)), ("bytes=-5000", (0, 999)), ("bytes=900-5000", (900, 999)),
    ("bytes=0-1,5-6", None), ("items=0-1", None), ("bytes=-", None)])
def test_byte_ranges(header, expected):
    assert byte_range(header, 1000) == expected


@pytest.mark.parametrize("header", ["bytes=1000-", "bytes=5-4", "bytes=-0"])
def test_unsatisfiable_ranges(header):
    with pytest.raises(ValueError):
        byte_range(header, 1000)


def test_a_body_is_sent_corked_and_the_socket_uncorked_after_it_also_on_error():
    """Head and file leave in full segments (TCP_CORK, nginx's tcp_nopush); the socket is
    uncorked after the body, also when sending failed, or a next small answer would wait."""
    import asyncio
    import socket

    from virtualinux.bootsvc.http import corked

    def cork(writer) -> int:
        return writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)

    seen: list[int] = []
    handled = asyncio.Event()

    async def handle(reader, writer):
        seen.append(cork(writer))
        with corked(writer):
            seen.append(cork(writer))
        seen.append(cork(writer))
        with pytest.raises(ConnectionError), corked(writer):
            raise ConnectionResetError
        seen.append(cork(writer))
        writer.close()
        handled.set()

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        await handled.wait()
        writer.close()
        server.close()
        await server.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 30))
    assert seen == [0, 1, 0, 0]
