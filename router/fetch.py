"""Fetching http(s) image URLs at the edge, so that replicas never fetch anything (`fetch.*` settings).

Every remote image URL is fetched once, by the router, and replaced in the body by a data URL; the
body then goes through parse_chat_request like any other. The fetch is built against server-side
request forgery:

- only http and https, to a host in `fetch.allowed_hosts` (a name, `*.suffix`, or an IP listed as is);
  every other scheme (file, ftp, gopher, ...) is refused;
- host names are resolved here, and the fetch is refused if ANY address is not a global unicast one
  (private, loopback, link-local, shared, multicast, reserved, cloud metadata, or an IPv6 form that
  embeds such an IPv4 address); the connection then goes to a checked address itself, so a second
  resolution cannot return another one (DNS rebinding). The Host header and TLS SNI name the host,
  and the certificate is checked against it;
- numeric IPv4 forms (`2130706433`, `0x7f000001`, `017700000001`, `127.1`) are read as the WHATWG URL
  standard (and inet_aton) read them, so they are judged as the address they are;
- redirects only up to `fetch.max_redirects`, each target checked like the first URL; at most
  `fetch.max_bytes` are read, and the whole fetch (resolution to last byte) takes at most
  `fetch.timeout_s`.

Codes (all InvalidRequest, param `messages`); messages never carry a resolved address:
    unsupported_image_url        a scheme other than http, https or data
    invalid_image_url            a malformed URL: credentials, control characters, bad host or port
    image_host_not_allowed       the host is not in fetch.allowed_hosts (every host, when it is empty)
    image_url_forbidden_address  the host is, or resolves to, a non-public address
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
import re
import socket
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urljoin, urlsplit

import httptools
import orjson

from qvl.settings import FetchSettings, LimitSettings
from router.edge import ImagePart, image_parts
from router.errors import InvalidRequest, InvalidRequestCode
from router.images import inspect_image

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

CONCURRENCY = 4
"""Images of one request fetched at once."""
_MAX_URL = 8192
_MAX_HEAD = 64 * 1024
_READ_SIZE = 64 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_BAD_URL_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
# The WHATWG "ends in a number" test: such a host is an IPv4 address or no host at all.
_NUMERIC = re.compile(r"[0-9]+|0x[0-9a-f]*")
_IPV4_PART = {16: re.compile(r"[0-9a-f]*"), 8: re.compile(r"[0-7]+"), 10: re.compile(r"[0-9]+")}
_PATH_SAFE = "!$&'()*+,-./:;=?@_~%[]"
_METADATA = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "fd00:ec2::23")
)
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))


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
                        raise _refused(
                            where, "image URL redirects, and redirects are not followed", "image_url_redirect"
                        )
                    if hop == settings.max_redirects:
                        raise _refused(
                            where,
                            f"image URL redirected more than {settings.max_redirects} times",
                            "image_url_redirect",
                        )
                    if not location:
                        raise _refused(where, f"image host answered {status} without a Location", "image_fetch_failed")
                    url = urljoin(url, location)
                    continue
                if status != 200:
                    raise _refused(where, f"image host answered with status {status}", "image_fetch_failed")
                return body
    except TimeoutError:
        raise _refused(where, f"image fetch took longer than {settings.timeout_s:g} s", "image_fetch_timeout") from None
    raise AssertionError("unreachable: the loop returns or raises")


@dataclass(frozen=True, slots=True)
class Target:
    """A checked http(s) URL: where to connect and what to send."""

    https: bool
    host: str
    """Lower-case ASCII name without a trailing dot, or the address for an IP literal."""
    port: int
    ip: IPAddress | None
    """The address when the URL names one; None for a host name."""
    host_header: bytes
    path: bytes


def check_url(url: str, allowed_hosts: list[str], where: str = "image") -> Target:
    """Parse `url` and check its scheme, syntax and host against `allowed_hosts`; raises InvalidRequest.

    Resolves nothing: addresses are checked when the host is resolved, just before connecting.
    """
    scheme = url.partition(":")[0].lower() if ":" in url else ""
    if scheme not in ("http", "https"):
        raise _refused(where, "image_url.url must be a data URL or an http(s) URL", "unsupported_image_url")
    if len(url) > _MAX_URL or _BAD_URL_CHARS.search(url):
        raise _invalid(where, "holds spaces, control characters or backslashes, or is too long")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise _invalid(where, "cannot be parsed") from None
    netloc = parts.netloc
    if "@" in netloc:
        raise _invalid(where, "must not carry credentials")
    https = parts.scheme == "https"
    host = parts.hostname or ""
    if port is None:
        port = 443 if https else 80
    elif port == 0:
        raise _invalid(where, "names port 0")
    if netloc.startswith("["):
        try:
            ip: IPAddress | None = ipaddress.IPv6Address(host)
        except ValueError:
            raise _invalid(where, "has a malformed IPv6 address") from None
        if "%" in host:
            raise _invalid(where, "must not name an IPv6 zone")
    else:
        host = _host_name(host, where)
        try:
            ip = parse_ipv4(host)
        except ValueError:
            raise _invalid(where, "has a malformed IPv4 address") from None
    if ip is not None:
        host = str(ip)
    if not host_allowed(host, ip, allowed_hosts):
        raise _refused(where, "image URL host is not in fetch.allowed_hosts", "image_host_not_allowed")
    name = f"[{host}]" if isinstance(ip, ipaddress.IPv6Address) else host
    default = 443 if https else 80
    host_header = name if port == default else f"{name}:{port}"
    path = quote(parts.path or "/", safe=_PATH_SAFE)
    if parts.query:
        path += "?" + quote(parts.query, safe=_PATH_SAFE)
    return Target(https, host, port, ip, host_header.encode("ascii"), path.encode("ascii"))


def parse_ipv4(host: str) -> ipaddress.IPv4Address | None:
    """The IPv4 address a URL host denotes, as the WHATWG URL standard reads it; None for a name.

    Accepts 1 to 4 dot-separated parts in decimal, octal (leading 0) or hex (0x), the last filling the
    remaining bytes: `127.1`, `2130706433`, `0x7f000001` and `017700000001` are all 127.0.0.1. A host
    whose last label is numeric but that is no valid address raises ValueError.
    """
    labels = host.lower().split(".")
    if len(labels) > 1 and labels[-1] == "":
        labels.pop()
    if not _NUMERIC.fullmatch(labels[-1]):
        return None
    if len(labels) > 4:
        raise ValueError("too many parts")
    numbers = [_ipv4_number(label) for label in labels]
    if any(n > 255 for n in numbers[:-1]) or numbers[-1] >= 256 ** (5 - len(numbers)):
        raise ValueError("part out of range")
    value = numbers[-1]
    for i, n in enumerate(numbers[:-1]):
        value += n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def host_allowed(host: str, ip: IPAddress | None, allowed_hosts: list[str]) -> bool:
    """Whether `host` (or the IP literal `ip`) matches an entry: the same name, `*.suffix`, or the same IP."""
    for entry in allowed_hosts:
        entry = entry.strip().lower().rstrip(".")
        if entry.startswith("[") and entry.endswith("]"):
            entry = entry[1:-1]
        entry_ip = _entry_ip(entry)
        if ip is not None:
            if entry_ip == ip:
                return True
        elif entry_ip is None and entry:
            if entry.startswith("*."):
                if host.endswith(entry[1:]) and len(host) > len(entry) - 1:
                    return True
            elif host == entry:
                return True
    return False


def forbidden_address(ip: IPAddress) -> bool:
    """Whether the router must not connect to `ip`: anything but a global unicast address.

    Private, loopback, link-local, shared (100.64/10), multicast, unspecified and reserved ranges,
    cloud metadata addresses, and IPv6 addresses that carry such an IPv4 address (IPv4-mapped,
    6to4, Teredo, NAT64).
    """
    if ip in _METADATA:
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id:
            return True
        embedded: list[ipaddress.IPv4Address | None] = [ip.ipv4_mapped, ip.sixtofour, *(ip.teredo or ())]
        if any(ip in net for net in _NAT64):
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if any(v4 is not None and forbidden_address(v4) for v4 in embedded):
            return True
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_unspecified
        or ip.is_reserved
        or not ip.is_global
    )


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
            raise _refused(where, "cannot resolve the image URL host", "image_fetch_failed") from None
        addresses = []
        for info in infos:
            address = ipaddress.ip_address(info[4][0])
            if address not in addresses:
                addresses.append(address)
    if not addresses:
        raise _refused(where, "cannot resolve the image URL host", "image_fetch_failed")
    if any(forbidden_address(address) for address in addresses):
        raise _refused(where, "image URL host is not a public address", "image_url_forbidden_address")
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
        raise _refused(where, "connection to the image host broke", "image_fetch_failed") from None
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
            raise _refused(where, "image host's TLS certificate is not valid for it", "image_fetch_failed") from None
        except ssl.SSLError:
            raise _refused(where, "TLS handshake with the image host failed", "image_fetch_failed") from None
        except OSError:
            continue
    raise _refused(where, "cannot connect to the image host", "image_fetch_failed")


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
                raise _refused(where, "image host did not answer valid HTTP", "image_fetch_failed") from None
        if not response.headers_done:
            head += len(data)
            if not data or head > _MAX_HEAD:
                raise _refused(where, "image host did not answer valid HTTP", "image_fetch_failed")
            continue
        status = parser.get_status_code()
        if status != 200:
            return status, response.location, b""
        if response.too_large or (response.length is not None and response.length > max_bytes):
            raise _refused(where, f"image is larger than {max_bytes} bytes", "image_too_large")
        if response.done:
            return status, None, bytes(response.body)
        if not data:
            # A body without length or chunking ends when the connection does; any other must be complete.
            if response.length is None and not response.chunked:
                return status, None, bytes(response.body)
            raise _refused(where, "image host closed the connection before the image ended", "image_fetch_failed")


async def _default_tls() -> ssl.SSLContext:
    # Reading the system trust store takes tens of milliseconds: not on the event loop's thread.
    return await asyncio.to_thread(ssl.create_default_context)


def _host_name(host: str, where: str) -> str:
    try:
        name = host.encode("idna").decode("ascii") if not host.isascii() else host
    except UnicodeError:
        raise _invalid(where, "has a malformed host name") from None
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise _invalid(where, "has a malformed host name")
    return name


def _ipv4_number(part: str) -> int:
    if part.startswith("0x"):
        base, digits = 16, part[2:]
    elif len(part) > 1 and part.startswith("0"):
        base, digits = 8, part[1:]
    else:
        base, digits = 10, part
    if not _IPV4_PART[base].fullmatch(digits):
        raise ValueError(f"not a number: {part!r}")
    return int(digits or "0", base)


def _entry_ip(entry: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(entry)
    except ValueError:
        pass
    try:
        return parse_ipv4(entry)
    except ValueError:
        return None


def _invalid(where: str, what: str) -> InvalidRequest:
    return InvalidRequest(f"{where}: image URL {what}", code="invalid_image_url", param="messages")


def _refused(where: str, message: str, code: InvalidRequestCode) -> InvalidRequest:
    return InvalidRequest(f"{where}: {message}", code=code, param="messages")
