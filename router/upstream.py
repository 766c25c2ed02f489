"""The router's HTTP/1.1 client for replicas: keep-alive pools, responses parsed by httptools.

Why not aiohttp: on the hot path its client cost more CPU per proxied request than everything else in
the router together. Replicas are known HTTP/1.1 servers (vLLM, `qvl sim`) answering JSON or SSE of a
few kilobytes, so this client does only that: no redirects, cookies, proxies or decompression, and
no read back-pressure (an answer is small; the body is buffered as it arrives).

Errors (never shown to clients; the proxy maps them):
    ConnectFailed      the connection could not be opened (refused, unreachable, connect timeout)
    ConnectionLost     the connection broke, or the answer was not valid HTTP, before it ended
    TimeoutError       the whole exchange took longer than its deadline
"""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from collections.abc import Iterable
from typing import cast
from urllib.parse import urlsplit

import httptools


class ConnectFailed(Exception):
    """The connection to the replica could not be opened."""

    def __init__(self, detail: str, *, timeout: bool = False) -> None:
        super().__init__(detail)
        self.timeout = timeout


class ConnectionLost(Exception):
    """The connection broke (or the peer spoke invalid HTTP) before the answer ended."""


class Origin:
    """Where a replica listens, with the pieces every request needs precomputed."""

    __slots__ = ("host", "host_header", "port", "ssl")

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl = parts.scheme == "https"
        self.host_header = f"{self.host}:{self.port}".encode()


class Response:
    """One answer. Read it with `read()` or `read_chunk()`; then `release()` it, or `close()` to drop it."""

    __slots__ = ("_conn", "headers", "status")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self.status = conn.status
        self.headers = conn.headers

    def header(self, name: bytes, default: bytes = b"") -> bytes:
        """A header's value (name in lower case)."""
        for key, value in self.headers:
            if key == name:
                return value
        return default

    async def read_chunk(self) -> bytes:
        """Body bytes that have arrived (waiting for some if none have); b"" once the body has ended."""
        return await self._conn.next_body()

    async def read(self) -> bytes:
        """The rest of the body."""
        parts = []
        while chunk := await self._conn.next_body():
            parts.append(chunk)
        return b"".join(parts)

    def release(self) -> None:
        """Done with a fully read answer: its connection goes back to the pool when it can be reused."""
        self._conn.finish(reuse=True)

    def close(self) -> None:
        """Drop the connection (the replica sees a disconnect and aborts the request)."""
        self._conn.finish(reuse=False)


class _Connection(asyncio.Protocol):
    """One keep-alive connection; carries one exchange at a time."""

    def __init__(self, client: UpstreamClient, origin: Origin) -> None:
        self._client = client
        self._origin = origin
        self._transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._body: deque[bytes] = deque()
        self._error: BaseException | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.headers_done = False
        self.message_done = False
        self.keep_alive = False
        self.received = False
        self.closed = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but provide its interface.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(ConnectionLost(f"invalid HTTP from replica: {exc}"))
            self._abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.message_done:
            self._fail(ConnectionLost("connection closed by replica" if exc is None else f"connection lost: {exc}"))

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._wake()

    def on_message_complete(self) -> None:
        self.message_done = True
        # httptools answers should_keep_alive() only inside this callback; afterwards it says False.
        self.keep_alive = self._parser.should_keep_alive()
        self._wake()

    # the exchange
    def send(self, head: bytes, body: bytes, deadline_s: float) -> None:
        assert self._transport is not None
        self.status, self.headers, self.headers_done, self.message_done, self.received = 0, [], False, False, False
        self.keep_alive = False
        self._body.clear()
        self._error = None
        self._timer = asyncio.get_running_loop().call_later(deadline_s, self._expire)
        self._transport.writelines((head, body))

    async def wait_headers(self) -> None:
        while not self.headers_done:
            await self._wait()

    async def next_body(self) -> bytes:
        while not self._body:
            if self.message_done:
                return b""
            await self._wait()
        if len(self._body) == 1:
            return self._body.popleft()
        data = b"".join(self._body)
        self._body.clear()
        return data

    def finish(self, *, reuse: bool) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        keep = reuse and self.message_done and self.keep_alive and not self.closed
        if keep:
            self._client._checkin(self._origin, self)
        else:
            self._abort()

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._error is not None and not (self._body or self.message_done):
            raise self._error

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._wake()

    def _expire(self) -> None:
        self._fail(TimeoutError("replica answer took longer than the deadline"))
        self._abort()

    def _abort(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()


class UpstreamClient:
    """Keep-alive connection pools keyed by origin. All methods run on the event loop's thread."""

    def __init__(self, connect_timeout_s: float, max_idle_per_origin: int = 256) -> None:
        self._connect_timeout_s = connect_timeout_s
        self._max_idle = max_idle_per_origin
        self._idle: dict[tuple[str, int], list[_Connection]] = {}
        self._ssl: ssl.SSLContext | None = None

    async def request(
        self,
        origin: Origin,
        method: bytes,
        path: bytes,
        *,
        body: bytes = b"",
        headers: Iterable[tuple[bytes, bytes]] = (),
        deadline_s: float,
    ) -> Response:
        """Send one request and return once the answer's status and headers are in.

        A reused keep-alive connection that the replica closed while idle is retried once on a new
        one, so a stale socket never counts against a healthy replica.
        """
        head = _head(method, path, origin, body, headers)
        conn = self._checkout(origin)
        if conn is not None:
            try:
                return await self._exchange(conn, head, body, deadline_s)
            except ConnectionLost:
                if conn.received:
                    raise
        conn = await self._connect(origin)
        return await self._exchange(conn, head, body, deadline_s)

    async def get(self, origin: Origin, path: bytes, *, deadline_s: float) -> tuple[int, bytes]:
        """GET `path` and read the whole answer: (status, body). For small pages (health, metrics)."""
        response = await self.request(origin, b"GET", path, deadline_s=deadline_s)
        try:
            body = await response.read()
        except BaseException:
            response.close()
            raise
        response.release()
        return response.status, body

    async def close(self) -> None:
        """Close every idle connection."""
        for conns in self._idle.values():
            for conn in conns:
                conn.finish(reuse=False)
        self._idle.clear()

    async def _exchange(self, conn: _Connection, head: bytes, body: bytes, deadline_s: float) -> Response:
        conn.send(head, body, deadline_s)
        try:
            await conn.wait_headers()
        except BaseException:
            conn.finish(reuse=False)
            raise
        return Response(conn)

    def _checkout(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get((origin.host, origin.port))
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def _checkin(self, origin: Origin, conn: _Connection) -> None:
        idle = self._idle.setdefault((origin.host, origin.port), [])
        if len(idle) < self._max_idle:
            idle.append(conn)
        else:
            conn.finish(reuse=False)

    async def _connect(self, origin: Origin) -> _Connection:
        loop = asyncio.get_running_loop()
        if origin.ssl and self._ssl is None:
            self._ssl = ssl.create_default_context()
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, origin),
                    origin.host,
                    origin.port,
                    ssl=self._ssl if origin.ssl else None,
                )
        except TimeoutError:
            raise ConnectFailed(f"connect to {origin.host}:{origin.port} timed out", timeout=True) from None
        except OSError as exc:
            raise ConnectFailed(f"cannot connect to {origin.host}:{origin.port}: {exc.strerror or exc}") from None
        return conn


def _head(method: bytes, path: bytes, origin: Origin, body: bytes, headers: Iterable[tuple[bytes, bytes]]) -> bytes:
    lines = [method, b" ", path, b" HTTP/1.1\r\nhost: ", origin.host_header, b"\r\n"]
    if body or method == b"POST":
        lines += [b"content-length: ", str(len(body)).encode(), b"\r\n"]
    for name, value in headers:
        lines += [name, b": ", value, b"\r\n"]
    lines.append(b"\r\n")
    return b"".join(lines)
