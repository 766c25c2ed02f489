"""Remote image URLs fetched SSRF-safe, against real servers.

Refusals are tested against live HTTP servers on 127.0.0.1 and [::1] that would answer with a valid
image, and that must never see a connection. The success path, which needs a public address in a
network namespace, is in test_fetch_public.py.
"""

from __future__ import annotations

import asyncio
import base64
import io
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
import pytest
from PIL import Image

from qvl.settings import FetchSettings, LimitSettings
from router.edge import parse_chat_request
from router.errors import InvalidRequest
from router.fetch import inline_remote_images
from router.ssrf import check_url, forbidden_address

PUBLIC_IP = "45.33.32.156"


def png(size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def chat(*urls: str) -> dict[str, Any]:
    parts: list[dict[str, Any]] = [{"type": "text", "text": "what is this?"}]
    parts += [{"type": "image_url", "image_url": {"url": url, "detail": "high"}} for url in urls]
    return {"model": "m", "messages": [{"role": "user", "content": parts}], "temperature": 0}


def fetching(*hosts: str, **extra: Any) -> FetchSettings:
    return FetchSettings(enabled=True, allowed_hosts=list(hosts), **extra)


def refusal(doc: dict[str, Any], settings: FetchSettings, limits: LimitSettings | None = None) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        asyncio.run(inline_remote_images(doc, settings, limits or LimitSettings()))
    assert info.value.status == 400 and info.value.param == "messages"
    return info.value


# The rules of router/ssrf.py (tested in test_ssrf.py) hold on the fetch path too.


@pytest.mark.parametrize(
    ("url", "allowed", "code"),
    [
        ("file:///etc/passwd", ["images.example.com"], "unsupported_image_url"),
        ("gopher://images.example.com:70/_GET", ["images.example.com"], "unsupported_image_url"),
        ("http://user:pw@images.example.com/a.png", ["images.example.com"], "invalid_image_url"),
        ("http://images.example.com/a.png", [], "image_host_not_allowed"),
        ("http://example.com/a.png", ["*.example.com"], "image_host_not_allowed"),
        ("http://45.33.32.156/a.png", ["images.example.com"], "image_host_not_allowed"),
    ],
)
def test_the_rules_refuse_before_anything_is_fetched(url: str, allowed: list[str], code: str) -> None:
    assert refusal(chat(url), fetching(*allowed)).code == code


# Live refusals: loopback servers that would answer with a real PNG never see a connection.


@dataclass
class Counter:
    connections: int = 0


async def _serve_png(host: str, counter: Counter) -> asyncio.Server:
    image = png()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counter.connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: %d\r\n\r\n" % len(image) + image)
        await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, host, 0)


def _loopback_refusals(host: str, urls_and_allowlists: list[tuple[str, list[str]]]) -> list[str]:
    """The error code of each fetch against a live PNG server on `host`; asserts it saw no connection."""

    async def run() -> list[str]:
        counter = Counter()
        server = await _serve_png(host, counter)
        port = server.sockets[0].getsockname()[1]
        results = []
        async with server:
            for url, allowed in urls_and_allowlists:
                try:
                    await inline_remote_images(chat(url.format(port=port)), fetching(*allowed), LimitSettings())
                    results.append("fetched")
                except InvalidRequest as exc:
                    assert "127.0.0.1" not in exc.message and "::1" not in exc.message
                    results.append(exc.code or "")
            await asyncio.sleep(0.05)
        assert counter.connections == 0
        return results

    return asyncio.run(run())


def test_loopback_is_refused_even_when_allowlisted(socket_calls: list[tuple[str, tuple[Any, ...]]]) -> None:
    cases = [
        ("http://127.0.0.1:{port}/a.png", ["127.0.0.1"]),
        ("http://localhost:{port}/a.png", ["localhost"]),
        ("http://LOCALHOST.:{port}/a.png", ["localhost"]),
        ("http://2130706433:{port}/a.png", ["127.0.0.1"]),
        ("http://0x7f000001:{port}/a.png", ["127.0.0.1"]),
        ("http://017700000001:{port}/a.png", ["127.0.0.1"]),
        ("http://127.1:{port}/a.png", ["127.0.0.1"]),
        ("http://0x7f.0.0.1:{port}/a.png", ["2130706433"]),
        ("http://127.0.0.1:{port}/a.png", ["0x7f000001"]),
        ("http://[::ffff:127.0.0.1]:{port}/a.png", ["::ffff:127.0.0.1"]),
    ]
    assert _loopback_refusals("127.0.0.1", cases) == ["image_url_forbidden_address"] * len(cases)
    assert not [args for event, args in socket_calls if event == "socket.connect"]


def test_ipv6_loopback_is_refused_even_when_allowlisted() -> None:
    if not socket_has_ipv6_loopback():
        pytest.skip("no IPv6 loopback on this machine")
    cases = [("http://[::1]:{port}/a.png", ["::1"]), ("http://[0:0::1]:{port}/a.png", ["[::1]"])]
    assert _loopback_refusals("::1", cases) == ["image_url_forbidden_address"] * len(cases)


def socket_has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


class SocketCalls:
    """Every socket.connect and socket.getaddrinfo of this process while `recording`, seen by an audit hook.

    Audit hooks cannot be removed, so one is added per process and does nothing unless recording.
    """

    events: ClassVar[list[tuple[str, tuple[Any, ...]]]] = []
    recording: ClassVar[bool] = False
    installed: ClassVar[bool] = False

    @classmethod
    def hook(cls, event: str, args: tuple[Any, ...]) -> None:
        if cls.recording and event in ("socket.connect", "socket.getaddrinfo"):
            cls.events.append((event, args))


@pytest.fixture
def socket_calls() -> Iterator[list[tuple[str, tuple[Any, ...]]]]:
    if not SocketCalls.installed:
        sys.addaudithook(SocketCalls.hook)
        SocketCalls.installed = True
    SocketCalls.events.clear()
    SocketCalls.recording = True
    try:
        yield SocketCalls.events
    finally:
        SocketCalls.recording = False


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://100.100.100.200/latest/meta-data/",
        "http://0xa9fea9fe/latest/meta-data/",
        "http://[::ffff:a9fe:a9fe]/latest/meta-data/",
        "http://10.0.0.1/a.png",
        "http://0.0.0.0/a.png",
    ],
)
def test_metadata_and_private_addresses_are_refused_before_any_connection(
    url: str, socket_calls: list[tuple[str, tuple[Any, ...]]]
) -> None:
    target = check_url(
        url, ["169.254.169.254", "fd00:ec2::254", "100.100.100.200", "::ffff:a9fe:a9fe", "10.0.0.1", "0"]
    )
    assert target.ip is not None and forbidden_address(target.ip)
    started = time.perf_counter()
    error = refusal(chat(url), fetching(target.host, timeout_s=30))
    assert time.perf_counter() - started < 1
    assert error.code == "image_url_forbidden_address"
    assert target.host not in error.message
    assert socket_calls == []  # not resolved, not connected to


def test_a_name_is_resolved_but_never_connected_to(socket_calls: list[tuple[str, tuple[Any, ...]]]) -> None:
    error = refusal(chat("http://localhost:9/a.png"), fetching("localhost"))
    assert error.code == "image_url_forbidden_address"
    assert [event for event, _ in socket_calls] == ["socket.getaddrinfo"]


def test_nothing_is_fetched_when_fetching_is_off_or_there_is_nothing_remote() -> None:
    remote = chat("http://images.example.com/a.png")
    assert asyncio.run(inline_remote_images(remote, FetchSettings(), LimitSettings())) is None
    # parse_chat_request then refuses the URL, as it always did.
    with pytest.raises(InvalidRequest) as info:
        parse_chat_request(orjson.dumps(remote))
    assert info.value.code == "unsupported_image_url"
    local = chat("data:image/png;base64," + base64.b64encode(png()).decode())
    assert asyncio.run(inline_remote_images(local, fetching("images.example.com"), LimitSettings())) is None


def test_counts_and_every_url_are_checked_before_anything_is_fetched(
    socket_calls: list[tuple[str, tuple[Any, ...]]],
) -> None:
    two = chat("http://images.example.com/a.png", "http://images.example.com/b.png")
    assert refusal(two, fetching("images.example.com"), LimitSettings(max_images=1)).code == "too_many_images"
    bad_second = chat("http://images.example.com/a.png", "file:///etc/passwd")
    assert refusal(bad_second, fetching("images.example.com")).code == "unsupported_image_url"
    other_host = chat("http://images.example.com/a.png", "http://elsewhere.example.com/b.png")
    assert refusal(other_host, fetching("images.example.com")).code == "image_host_not_allowed"
    many = {"model": "m", "messages": [{"role": "user", "content": "x"}] * 3}
    assert refusal(many, fetching("images.example.com"), LimitSettings(max_messages=2)).code == "too_many_messages"
    assert socket_calls == []  # nothing resolved, nothing connected to
