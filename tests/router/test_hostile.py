"""Hostile input against a live router: every case is refused with a 4xx OpenAI-style error and a stable
type, nothing reaches the replica, and the router is healthy afterwards."""

from __future__ import annotations

import base64
import io
import socket
import struct
import threading
import zlib
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image
from support.chat import image_chat, png_data_url
from support.metrics import metric_sum
from support.servers import Cluster, Proc

MODEL = "qwen3-vl-sim"


def data_url(raw: bytes, media: str = "image/png") -> str:
    return f"data:{media};base64," + base64.b64encode(raw).decode()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height, with one tiny IDAT: a decompression bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + struct.pack(">I", len(ihdr))
        + chunk
        + struct.pack(">I", zlib.crc32(chunk))
        + struct.pack(">I", len(idat))
        + b"IDAT"
        + idat
        + struct.pack(">I", zlib.crc32(b"IDAT" + idat))
    )


def real_image(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (10, 200, 10)).save(buf, format=fmt)
    return buf.getvalue()


def chat_with(url: str, **extra: object) -> dict:
    return image_chat(MODEL, url, **extra)


def nested(depth: int) -> bytes:
    return b'{"model": "m", "messages": ' + b"[" * depth + b"]" * depth + b"}"


CASES: list[tuple[str, object, int, str]] = [
    # (name, body: dict -> JSON, or bytes sent as is), expected status, expected code
    ("malformed JSON", b'{"model": "x", "messages": [', 400, "invalid_json"),
    ("not UTF-8", b'{"model": "\xff\xfe"}', 400, "invalid_json"),
    ("JSON array", b"[1, 2, 3]", 400, "invalid_json"),
    ("NaN literal", b'{"model": "m", "temperature": NaN, "messages": [{"role": "user", "content": "x"}]}', 400,
     "invalid_json"),
    ("deeply nested JSON", nested(100_000), 400, "invalid_json"),
    ("moderately nested JSON", nested(300), 400, "invalid_json"),
    ("missing model", {"messages": [{"role": "user", "content": "hi"}]}, 400, ""),
    ("model of the wrong type", {"model": 7, "messages": [{"role": "user", "content": "hi"}]}, 400, ""),
    ("empty messages", {"model": MODEL, "messages": []}, 400, ""),
    ("messages not a list", {"model": MODEL, "messages": "hi"}, 400, ""),
    ("bad role", {"model": MODEL, "messages": [{"role": "root", "content": "hi"}]}, 400, ""),
    ("role as a list (found by schemathesis)", {"model": MODEL, "messages": [{"role": [None], "content": None}]}, 400,
     ""),
    ("role as an object", {"model": MODEL, "messages": [{"role": {}, "content": "hi"}]}, 400, ""),
    ("text part not a string",
     {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, 400, ""),
    ("audio part", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, 400,
     "unsupported_content"),
    ("stream as a string", {**chat_with(png_data_url()), "stream": "yes"}, 400, ""),
    ("negative temperature", chat_with(png_data_url(), temperature=-1), 400, ""),
    ("temperature as a string", chat_with(png_data_url(), temperature="hot"), 400, ""),
    ("top_p over 1", chat_with(png_data_url(), top_p=2), 400, ""),
    ("negative max_tokens", chat_with(png_data_url(), max_tokens=-5), 400, ""),
    ("boolean max_tokens", chat_with(png_data_url(), max_tokens=True), 400, ""),
    ("huge max_tokens", chat_with(png_data_url(), max_tokens=10**9), 400, "max_tokens_too_large"),
    ("n of 1000", chat_with(png_data_url(), n=1000), 400, "n_too_large"),
    ("ten stop strings", chat_with(png_data_url(), stop=[str(i) for i in range(10)]), 400, "invalid_stop"),
    ("unknown model", image_chat("gpt-4o", png_data_url()), 404, "model_not_found"),
    ("control character as the pinned version (found by schemathesis)",
     {"model": "@\x1f", "messages": [{"role": "tool"}]}, 404, "model_not_found"),
    ("header injection as the pinned version", image_chat(f"{MODEL}@v1\r\nx-evil: 1", png_data_url()), 404,
     "model_not_found"),
    ("image part without url", {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
     400, ""),
    ("bad base64", chat_with("data:image/png;base64,!!!notbase64!!!"), 400, "invalid_image_url"),
    ("text/plain data URL", chat_with("data:text/plain;base64,aGVsbG8="), 400, "invalid_image_url"),
    ("SVG", chat_with(data_url(b'<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>',
                               "image/svg+xml")), 400, "unsupported_image_format"),
    ("SVG claiming to be PNG", chat_with(data_url(b"<svg xmlns='http://www.w3.org/2000/svg'/>")), 400,
     "unsupported_image_format"),
    ("GIF", chat_with(data_url(real_image("GIF"), "image/gif")), 400, "unsupported_image_format"),
    ("TIFF", chat_with(data_url(real_image("TIFF"), "image/tiff")), 400, "unsupported_image_format"),
    ("PNG bomb 50000x50000", chat_with(data_url(png_header_only(50_000, 50_000))), 400, "image_too_many_pixels"),
    ("PNG of 0x0", chat_with(data_url(png_header_only(0, 0))), 400, "invalid_image"),
    ("truncated JPEG", chat_with(data_url(real_image("JPEG")[:20], "image/jpeg")), 400, "invalid_image"),
    ("JPEG magic then garbage", chat_with(data_url(b"\xff\xd8\xff" + b"\x00" * 64, "image/jpeg")), 400,
     "invalid_image"),
    ("empty image", chat_with("data:image/png;base64,"), 400, "invalid_image_url"),
    ("200 images", {"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url()}} for _ in range(200)]}]}, 400, "too_many_images"),
    ("image over the byte limit", chat_with("data:image/png;base64," + "A" * (3 * 1024 * 1024)), 400,
     "image_too_large"),
    ("http URL with fetching off", chat_with("http://example.com/shoe.png"), 400, "unsupported_image_url"),
    ("file URL", chat_with("file:///etc/passwd"), 400, "unsupported_image_url"),
]  # fmt: skip

SSRF_CASES = [
    ("loopback", "http://127.0.0.1:{port}/a.png", "image_url_forbidden_address"),
    ("metadata service", "http://169.254.169.254/latest/meta-data/", "image_url_forbidden_address"),
    ("IPv6 loopback", "http://[::1]:{port}/a.png", "image_url_forbidden_address"),
    ("decimal-encoded loopback", "http://2130706433:{port}/a.png", "image_url_forbidden_address"),
    ("hex-encoded loopback", "http://0x7f000001:{port}/a.png", "image_url_forbidden_address"),
    ("short loopback", "http://127.1:{port}/a.png", "image_url_forbidden_address"),
    ("localhost by name", "http://localhost:{port}/a.png", "image_url_forbidden_address"),
    ("private network", "http://10.0.0.8/a.png", "image_url_forbidden_address"),
    ("host not allowlisted", "http://images.evil.test/a.png", "image_host_not_allowed"),
    ("file URL with fetching on", "file:///etc/passwd", "unsupported_image_url"),
    ("gopher URL", "gopher://127.0.0.1:{port}/_GET", "unsupported_image_url"),
]


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Proc, Proc]]:
    """A replica, a router with 1 MiB bodies and 2 MiB images, and one with URL fetching switched on
    (its allowlist names the very hosts the SSRF cases use: the address check alone must stop them)."""
    tmp = tmp_path_factory.mktemp("hostile")
    cluster = Cluster(tmp)
    try:
        sim = cluster.sim("--zero-delay")
        limits = tmp / "limits.yaml"
        limits.write_text("router: {max_request_bytes: 8388608, limits: {max_image_bytes: 2097152, max_images: 16}}\n")
        router = cluster.router(sim, flags=("--config", str(limits)))
        fetching = tmp / "fetch.yaml"
        fetching.write_text(
            "router:\n fetch:\n  enabled: true\n"
            "  allowed_hosts: ['127.0.0.1', '::1', '[::1]', '169.254.169.254', '2130706433',\n"
            "    '0x7f000001', '127.1', localhost, '10.0.0.8', '*.example']\n"
        )
        fetcher = cluster.router(sim, flags=("--config", str(fetching)))
        yield sim, router, fetcher
    finally:
        cluster.stop_all()


def check_refusal(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["type"], str) and error["type"]
    assert isinstance(error["message"], str) and error["message"]
    if code:
        assert error["code"] == code, error


@pytest.mark.parametrize(("name", "body", "status", "code"), CASES, ids=[c[0] for c in CASES])
def test_hostile_body_is_refused(
    hostile: tuple[Proc, Proc, Proc], name: str, body: object, status: int, code: str
) -> None:
    _, router, _ = hostile
    url = router.url + "/v1/chat/completions"
    response = httpx.post(url, content=body, timeout=30) if isinstance(body, bytes) else httpx.post(url, json=body)
    check_refusal(response, status, code)


@pytest.mark.parametrize(("name", "image_url", "code"), SSRF_CASES, ids=[c[0] for c in SSRF_CASES])
def test_ssrf_attempt_is_refused(hostile: tuple[Proc, Proc, Proc], name: str, image_url: str, code: str) -> None:
    sim, _, fetcher = hostile
    # The replica's own port: a fetch that got through would reach a live server on loopback.
    doc = chat_with(image_url.format(port=sim.port))
    check_refusal(httpx.post(fetcher.url + "/v1/chat/completions", json=doc, timeout=30), 400, code)


def raw_exchange(port: int, head: bytes, body_chunks: Iterator[bytes]) -> bytes:
    """Send a request over a plain socket from a thread, read the answer here; the sender stops as
    soon as the answer has come (or the router closes the connection)."""
    answered = threading.Event()
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head)

        def send() -> None:
            for chunk in body_chunks:
                if answered.is_set():
                    return
                try:
                    sock.sendall(chunk)
                except OSError:
                    return

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        answer = b""
        while b"\r\n0\r\n" not in answer:  # the end of the chunked error body
            more = sock.recv(65536)
            if not more:
                break
            answer += more
        answered.set()
        sock.shutdown(socket.SHUT_RDWR)
        sender.join(10)
        return answer


def test_a_declared_huge_body_is_refused_before_it_is_read(hostile: tuple[Proc, Proc, Proc]) -> None:
    _, router, _ = hostile
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 10000000000\r\n\r\n"
    )
    answer = raw_exchange(router.port, head, iter([b"{" + b" " * 1000]))
    assert answer.startswith(b"HTTP/1.1 413") and b'"request_too_large"' in answer


def test_a_huge_chunked_body_is_refused_while_reading(hostile: tuple[Proc, Proc, Proc]) -> None:
    _, router, _ = hostile
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    sent = 0

    def chunks() -> Iterator[bytes]:
        nonlocal sent
        piece = b" " * 65536
        for _ in range(16 * 1024):  # up to 1 GiB: far more than anyone should read
            sent += len(piece)
            yield b"%x\r\n" % len(piece) + piece + b"\r\n"

    answer = raw_exchange(router.port, head, chunks())
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 64 * 1024 * 1024  # answered long before the client got far (the limit is 8 MiB)


def test_after_all_that_the_router_is_healthy_and_no_replica_saw_a_thing(hostile: tuple[Proc, Proc, Proc]) -> None:
    sim, router, fetcher = hostile
    assert metric_sum(sim.url, "vllm:request_success_total") == 0  # nothing hostile reached the replica
    for proc in (router, fetcher):
        assert proc.popen.poll() is None
        assert httpx.get(proc.url + "/ready").status_code == 200
        assert httpx.post(proc.url + "/v1/chat/completions", json=chat_with(png_data_url())).status_code == 200
    assert metric_sum(router.url, "qvl_rejections_total") >= len(CASES)
    assert metric_sum(router.url, "qvl_requests_total", status="500") == 0
