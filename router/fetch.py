"""Fetching http(s) image URLs at the edge, so that replicas never fetch anything (`fetch.*` settings).

Every remote image URL is fetched once, by the router, and replaced in the body by a data URL; the
body then goes through parse_chat_request like any other. Each URL, and every address its host
resolves to, is first checked by the SSRF rules of router/ssrf.py; then:

- host names are resolved here, once, and the connection goes to a checked address itself, so a
  second resolution cannot return another one (DNS rebinding). The Host header and TLS SNI name the
  host, and the certificate is checked against it;
- redirects only up to `fetch.max_redirects`, each target checked like the first URL; at most
  `fetch.max_bytes` are read, and the whole fetch (resolution to last byte) takes at most
  `fetch.timeout_s`.

Codes (all InvalidRequest, param `messages`), besides those of router/ssrf.py; messages never carry a
resolved address:
    image_url_redirect           a redirect, when none are followed, or more than max_redirects
    image_too_large              the body is over fetch.max_bytes (or limits.max_image_bytes)
    image_fetch_timeout          the fetch took longer than fetch.timeout_s
    image_fetch_failed           cannot resolve or connect, TLS failed, not HTTP, or a status other than 200
and those of router/images.py for the fetched bytes.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import ssl
from typing import Any
from urllib.parse import urljoin

import httptools
import orjson

from qvl.settings import FetchSettings, LimitSettings
from router.edge import ImagePart, image_parts
from router.errors import InvalidRequest
from router.images import inspect_image
from router.ssrf import IPAddress, Target, check_addresses, check_url, refused

CONCURRENCY = 4
"""Images of one request fetched at once."""
_MAX_HEAD = 64 * 1024
_READ_SIZE = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})


async def inline_remote_images(
    doc: dict[str, Any], settings: FetchSettings, limits: LimitSettings, *, tls: ssl.SSLContext | None = None
) -> bytes | None:
    """The body with every http(s) image URL replaced by a data URL of the fetched image; None if none.

    `doc` is the parsed body (edge.parse_json_object); it is not modified. None also when fetching is
    off: parse_chat_request then refuses remote URLs as before. Counts and shapes are checked, and
    every URL is checked, before anything is fetched; each distinct URL is fetched once, CONCURRENCY
    at a time. Raises InvalidRequest. `tls` is the context for https: pass one made at start-up
    (`ssl.create_default_context()`); None builds one per request that needs it (tens of ms, in a thread).
    """
    if not settings.enabled:
        return None
    messages = doc.get("messages")
    remote = [part for part in image_parts(messages, limits) if not part.url.startswith("data:")]
    if not remote:
        return None
    firsts: dict[str, ImagePart] = {}
    for part in remote:
        if part.url not in firsts:
            check_url(part.url, settings.allowed_hosts, part.where)
            firsts[part.url] = part
    if tls is None and any(url[:6].lower() == "https:" for url in firsts):
        tls = await _default_tls()  # one per request, shared by its fetches
    data_urls = await _fetch_all(list(firsts.values()), settings, limits, tls)

    assert isinstance(messages, list)  # image_parts checked it
    new_messages = list(messages)
    for part in remote:
        message = new_messages[part.message] = dict(new_messages[part.message])
        content = message["content"] = list(message["content"])
        item = content[part.part] = dict(content[part.part])
        item["image_url"] = {**item["image_url"], "url": data_urls[part.url]}
    try:
        return orjson.dumps({**doc, "messages": new_messages})
    except orjson.JSONEncodeError:
        raise InvalidRequest("request body cannot be re-encoded as JSON", code="invalid_json") from None


async def _fetch_one(
    url: str, settings: FetchSettings, limits: LimitSettings, tls: ssl.SSLContext | None, where: str
) -> bytes:
    """The body at `url`, following allowed redirects; raises InvalidRequest."""
    max_bytes = min(settings.max_bytes, limits.max_image_bytes)
    try:
        async with asyncio.timeout(settings.timeout_s):
            for hop in range(settings.max_redirects + 1):
                target = check_url(url, settings.allowed_hosts, where)
                addresses = await _resolve(target, where)
                status, location, body = await _get(target, addresses, max_bytes, tls, where)
                if status in _REDIRECTS:
                    if settings.max_redirects == 0:
                        raise refused(
                            where, "image URL redirects, and redirects are not followed", "image_url_redirect"
                        )
                    if hop == settings.max_redirects:
                        raise refused(
                            where,
                            f"image URL redirected more than {settings.max_redirects} times",
                            "image_url_redirect",
                        )
                    if not location:
                        raise refused(where, f"image host answered {status} without a Location", "image_fetch_failed")
                    url = urljoin(url, location)
                    continue
                if status != 200:
                    raise refused(where, f"image host answered with status {status}", "image_fetch_failed")
                return body
    except TimeoutError:
        raise refused(where, f"image fetch took longer than {settings.timeout_s:g} s", "image_fetch_timeout") from None
    raise AssertionError("unreachable: the loop returns or raises")


async def _fetch_all(
    parts: list[ImagePart], settings: FetchSettings, limits: LimitSettings, tls: ssl.SSLContext | None
) -> dict[str, str]:
    """Data URL of each part's URL; the first failure cancels the other fetches and is raised."""
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(part: ImagePart) -> str:
        async with slots:
            raw = await _fetch_one(part.url, settings, limits, tls, part.where)
        info = inspect_image(raw, limits, part.where)
        return f"data:image/{info.format};base64,{base64.b64encode(raw).decode('ascii')}"

    tasks = [asyncio.ensure_future(one(part)) for part in parts]
    try:
        results = await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return {part.url: result for part, result in zip(parts, results, strict=True)}


async def _resolve(target: Target, where: str) -> list[IPAddress]:
    if target.ip is not None:
        addresses = [target.ip]
    else:
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except OSError:
            raise refused(where, "cannot resolve the image URL host", "image_fetch_failed") from None
        addresses = []
        for info in infos:
            address = ipaddress.ip_address(info[4][0])
            if address not in addresses:
                addresses.append(address)
    if not addresses:
        raise refused(where, "cannot resolve the image URL host", "image_fetch_failed")
    check_addresses(addresses, where)
    return addresses


async def _get(
    target: Target, addresses: list[IPAddress], max_bytes: int, tls: ssl.SSLContext | None, where: str
) -> tuple[int, str | None, bytes]:
    """(status, Location, body) of GET `target` at the first of `addresses` that accepts; the body only for 200."""
    reader, writer = await _connect(target, addresses, tls, where)
    try:
        writer.write(
            b"GET " + target.path + b" HTTP/1.1\r\nHost: " + target.host_header + b"\r\n"
            b"User-Agent: qvl-router\r\nAccept: image/*\r\nAccept-Encoding: identity\r\nConnection: close\r\n\r\n"
        )
        return await _read_response(reader, max_bytes, where)
    except OSError:  # reset, broken pipe, TLS alert: the connection broke mid-answer
        raise refused(where, "connection to the image host broke", "image_fetch_failed") from None
    finally:
        writer.transport.abort()


async def _connect(
    target: Target, addresses: list[IPAddress], tls: ssl.SSLContext | None, where: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if target.https and tls is None:
        tls = await _default_tls()  # an http URL that redirected to https
    for address in addresses:
        try:
            # The checked address itself: no second resolution. SNI and the certificate check use the host.
            return await asyncio.open_connection(
                str(address),
                target.port,
                ssl=tls if target.https else None,
                server_hostname=target.host if target.https else None,
                limit=_READ_SIZE,
            )
        except ssl.SSLCertVerificationError:
            raise refused(where, "image host's TLS certificate is not valid for it", "image_fetch_failed") from None
        except ssl.SSLError:
            raise refused(where, "TLS handshake with the image host failed", "image_fetch_failed") from None
        except OSError:
            continue
    raise refused(where, "cannot connect to the image host", "image_fetch_failed")


class _Response:
    """httptools callbacks: status and Location, and the body up to `max_bytes`."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.location: str | None = None
        self.length: int | None = None
        self.chunked = False
        self.headers_done = False
        self.done = False
        self.too_large = False
        self.body = bytearray()

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"location":
            self.location = value.decode("latin-1")
        elif name == b"content-length" and value.strip().isdigit():
            self.length = int(value)
        elif name == b"transfer-encoding":
            self.chunked = True

    def on_headers_complete(self) -> None:
        self.headers_done = True

    def on_body(self, body: bytes) -> None:
        if len(self.body) + len(body) > self.max_bytes:
            self.too_large = True
        elif not self.too_large:
            self.body += body

    def on_message_complete(self) -> None:
        self.done = True


async def _read_response(reader: asyncio.StreamReader, max_bytes: int, where: str) -> tuple[int, str | None, bytes]:
    response = _Response(max_bytes)
    parser = httptools.HttpResponseParser(response)
    head = 0
    while True:
        data = await reader.read(_READ_SIZE)
        if data:
            try:
                parser.feed_data(data)
            except httptools.HttpParserError:
                raise refused(where, "image host did not answer valid HTTP", "image_fetch_failed") from None
        if not response.headers_done:
            head += len(data)
            if not data or head > _MAX_HEAD:
                raise refused(where, "image host did not answer valid HTTP", "image_fetch_failed")
            continue
        status = parser.get_status_code()
        if status != 200:
            return status, response.location, b""
        if response.too_large or (response.length is not None and response.length > max_bytes):
            raise refused(where, f"image is larger than {max_bytes} bytes", "image_too_large")
        if response.done:
            return status, None, bytes(response.body)
        if not data:
            # A body without length or chunking ends when the connection does; any other must be complete.
            if response.length is None and not response.chunked:
                return status, None, bytes(response.body)
            raise refused(where, "image host closed the connection before the image ended", "image_fetch_failed")


async def _default_tls() -> ssl.SSLContext:
    # Reading the system trust store takes tens of milliseconds: not on the event loop's thread.
    return await asyncio.to_thread(ssl.create_default_context)
