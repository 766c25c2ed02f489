"""The replica HTTP client against tiny asyncio servers on real sockets."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from router.upstream import ConnectFailed, ConnectionLost, Origin, UpstreamClient

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def serve(handler: Handler) -> tuple[asyncio.Server, Origin, list[int]]:
    """A server counting its connections; `handler` answers each request on a connection."""
    connections: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, Origin(f"http://127.0.0.1:{port}"), connections


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head + await reader.readexactly(length)


def ok(body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n%s\r\n%s" % (
        len(body),
        extra,
        body,
    )


def test_keep_alive_reuses_one_connection_and_sends_body_and_headers() -> None:
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                seen.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                return
            writer.write(ok(b'{"ok":true}'))

    async def main() -> None:
        server, origin, conns = await serve(handler)
        client = UpstreamClient(connect_timeout_s=1)
        for i in range(3):
            resp = await client.request(
                origin,
                b"POST",
                b"/v1/chat/completions",
                body=b'{"n":%d}' % i,
                headers=[(b"x-request-id", b"r%d" % i)],
                deadline_s=5,
            )
            assert resp.status == 200
            assert resp.header(b"content-type") == b"application/json"
            assert await resp.read() == b'{"ok":true}'
            resp.release()
        assert len(conns) == 1
        assert seen[2].startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
        assert b"x-request-id: r2\r\n" in seen[2] and seen[2].endswith(b'{"n":2}')
        await client.close()
        server.close()

    asyncio.run(main())


def test_chunked_body_arrives_in_pieces() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        for part in (b"data: 1\n\n", b"data: 2\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await writer.drain()
            await asyncio.sleep(0.05)
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        server, origin, _ = await serve(handler)
        client = UpstreamClient(connect_timeout_s=1)
        resp = await client.request(origin, b"POST", b"/x", body=b"{}", deadline_s=5)
        pieces = []
        while chunk := await resp.read_chunk():
            pieces.append(chunk)
        assert pieces == [b"data: 1\n\n", b"data: 2\n\n"]
        resp.release()
        await client.close()
        server.close()

    asyncio.run(main())


def test_stale_idle_connection_is_retried_on_a_new_one() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(ok(b"1"))
        await writer.drain()
        # Then close the keep-alive connection while the client holds it idle.

    async def main() -> None:
        server, origin, conns = await serve(handler)
        client = UpstreamClient(connect_timeout_s=1)
        for _ in range(2):
            resp = await client.request(origin, b"GET", b"/health", deadline_s=5)
            assert await resp.read() == b"1"
            resp.release()
            await asyncio.sleep(0.1)
        assert len(conns) == 2
        await client.close()
        server.close()

    asyncio.run(main())


def test_connection_dropped_mid_body_raises_connection_lost() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial")
        await writer.drain()

    async def main() -> None:
        server, origin, _ = await serve(handler)
        client = UpstreamClient(connect_timeout_s=1)
        resp = await client.request(origin, b"POST", b"/x", body=b"{}", deadline_s=5)
        with pytest.raises(ConnectionLost):
            await resp.read()
        resp.close()
        await client.close()
        server.close()

    asyncio.run(main())


def test_invalid_http_raises_connection_lost() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"SSH-2.0-OpenSSH\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(1)

    async def main() -> None:
        server, origin, _ = await serve(handler)
        with pytest.raises(ConnectionLost, match="invalid HTTP"):
            await UpstreamClient(connect_timeout_s=1).request(origin, b"GET", b"/", deadline_s=5)
        server.close()

    asyncio.run(main())


def test_refused_connection_raises_connect_failed() -> None:
    async def main() -> None:
        server, origin, _ = await serve(read_request)  # type: ignore[arg-type]
        server.close()
        await server.wait_closed()
        with pytest.raises(ConnectFailed) as info:
            await UpstreamClient(connect_timeout_s=1).request(origin, b"GET", b"/", deadline_s=5)
        assert info.value.timeout is False

    asyncio.run(main())


def test_deadline_expires_and_drops_the_connection() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async def main() -> None:
        server, origin, _ = await serve(handler)
        client = UpstreamClient(connect_timeout_s=1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(TimeoutError):
            await client.request(origin, b"GET", b"/", deadline_s=0.2)
        assert loop.time() - started < 4
        await client.close()
        server.close()

    asyncio.run(main())


def test_origin_parsing() -> None:
    assert Origin("http://10.0.0.5:8001").host_header == b"10.0.0.5:8001"
    assert Origin("https://replica.internal").port == 443
    with pytest.raises(ValueError):
        Origin("ftp://x")
