"""The success path of remote image fetching, and the refusals that need a reachable server.

A public address is needed, so a network namespace (created by the `public_host` fixture; root and
`ip netns` needed) holds 45.33.32.156 on its loopback, a small HTTP(S) server on it (and one on the
namespace's own 127.0.0.1), and an /etc/hosts of test names; the fetches run in a process inside that
namespace (`_client_main`). The refusals that need no server are in test_ssrf.py and test_fetch.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import secrets
import shutil
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from support import ROOT
from test_fetch import PUBLIC_IP, chat, png

from qvl.procs import Child, spawn
from qvl.settings import FetchSettings, LimitSettings
from router.edge import parse_chat_request, parse_json_object
from router.errors import InvalidRequest
from router.fetch import inline_remote_images

# The success path and the refusals that need a reachable server: inside a network namespace.


def netns_python(namespace: str, function: str) -> list[str]:
    """A command running this module's `function` in a Python inside `namespace`."""
    return [
        "ip",
        "netns",
        "exec",
        namespace,
        sys.executable,
        "-c",
        f"import test_fetch_public; test_fetch_public.{function}()",
    ]


def python_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), str(Path(__file__).parent)])}


@dataclass
class PublicHost:
    namespace: str
    cafile: Path
    log: Path
    image: bytes

    def fetch(self, *cases: dict[str, Any]) -> list[dict[str, Any]]:
        """Run each case (urls, fetch settings, limits) through inline_remote_images inside the namespace."""
        request = json.dumps({"cafile": str(self.cafile), "cases": list(cases)})
        done = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                self.namespace,
                sys.executable,
                "-c",
                "import test_fetch_public; test_fetch_public._client_main()",
            ],
            input=request.encode(),
            capture_output=True,
            env={**python_env(), "SSL_CERT_FILE": str(self.cafile)},
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()
        return list(json.loads(done.stdout))

    def requests(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture(scope="module")
def public_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PublicHost]:
    if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("openssl"):
        pytest.skip("needs root, iproute2 (`ip netns`) and openssl to put a public address in a network namespace")
    tmp = tmp_path_factory.mktemp("public-host")
    namespace = f"qvl-fetch-{os.getpid()}-{secrets.token_hex(3)}"
    added = subprocess.run(["ip", "netns", "add", namespace], capture_output=True, check=False)
    if added.returncode != 0:
        pytest.skip(f"`ip netns add` is not permitted here: {added.stderr.decode().strip()}")
    etc = Path("/etc/netns") / namespace
    server: Child | None = None
    try:
        try:
            etc.mkdir(parents=True)
        except OSError as exc:
            pytest.skip(f"cannot write the namespace's hosts file under /etc/netns: {exc}")
        (etc / "hosts").write_text(
            f"127.0.0.1 localhost\n{PUBLIC_IP} images.example.test other.example.test wrong.example.test\n"
            f"{PUBLIC_IP} mixed.example.test\n127.0.0.1 mixed.example.test\n"
        )
        for command in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{PUBLIC_IP}/32", "dev", "lo"]):
            subprocess.run(["ip", "netns", "exec", namespace, *command], check=True, capture_output=True)
        cert, key = tmp / "cert.pem", tmp / "key.pem"
        subprocess.run(
            [
                *("openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
                *("-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=images.example.test"),
                *("-addext", f"subjectAltName=DNS:images.example.test,DNS:other.example.test,IP:{PUBLIC_IP}"),
            ],
            check=True,
            capture_output=True,
        )
        image, log = png((64, 48)), tmp / "requests.jsonl"
        (tmp / "image.png").write_bytes(image)
        server = spawn(
            "image server",
            [*netns_python(namespace, "_server_main"), str(tmp)],
            log=tmp / "server.log",
            env=python_env(),
        )
        server.wait_ready(60, check=lambda: "ready" in server.output().split(), interval_s=0.1)
        yield PublicHost(namespace, cert, log, image)
    finally:
        if server is not None:
            server.kill()
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
        shutil.rmtree(etc, ignore_errors=True)


def case(*urls: str, allowed: list[str], default_tls: bool = False, **fetch: Any) -> dict[str, Any]:
    """One request; `default_tls`: no TLS context is passed (the system store, here the test CA, is read)."""
    limits = fetch.pop("limits", {})
    return {
        "urls": list(urls),
        "fetch": {"enabled": True, "allowed_hosts": allowed, **fetch},
        "limits": limits,
        "default_tls": default_tls,
    }


def test_fetches_a_public_image_over_http_and_https(public_host: PublicHost) -> None:
    digest = hashlib.sha256(public_host.image).hexdigest()
    results = public_host.fetch(
        case(f"http://{PUBLIC_IP}/image.png", allowed=[PUBLIC_IP]),
        case("http://images.example.test/image.png?v=1", allowed=["images.example.test"]),
        case("https://images.example.test/image.png", allowed=["images.example.test"]),
        case("http://other.example.test/chunked.png", allowed=["*.example.test"]),
        case("http://images.example.test/close.png", allowed=["images.example.test"]),
        case(f"https://{PUBLIC_IP}:443/image.png", allowed=[PUBLIC_IP]),
        case("https://images.example.test/image.png", allowed=["images.example.test"], default_tls=True),
        case(
            "http://images.example.test/redirect?to=https://images.example.test/image.png",
            allowed=["images.example.test"],
            max_redirects=1,
            default_tls=True,
        ),
    )
    for result in results:
        assert result["ok"], result
        assert result["digests"] == [digest]
        assert result["media"] == ["data:image/png;base64"]
        assert result["detail"] == ["high"]
    seen = [(r["path"], r["host"], r["sni"]) for r in public_host.requests() if r["local"] == PUBLIC_IP]
    assert ("/image.png", PUBLIC_IP, None) in seen
    assert ("/image.png?v=1", "images.example.test", None) in seen
    assert ("/image.png", "images.example.test", "images.example.test") in seen
    assert ("/chunked.png", "other.example.test", None) in seen


def test_each_url_is_fetched_once_and_others_concurrently(public_host: PublicHost) -> None:
    before = len(public_host.requests())
    urls = [f"http://images.example.test/slowish.png?i={i}" for i in range(4)]
    (result,) = public_host.fetch(case(*urls, urls[0], urls[0], allowed=["images.example.test"]))
    assert result["ok"], result
    assert len(result["digests"]) == 6
    assert len(public_host.requests()) - before == 4
    # Each answer takes 0.3 s; four fetched one after the other would take 1.2 s.
    assert result["elapsed"] < 0.9


def test_redirects(public_host: PublicHost) -> None:
    host = ["images.example.test"]
    to_image = "http://images.example.test/redirect?to=/image.png"
    results = public_host.fetch(
        case(to_image, allowed=host),
        case(to_image, allowed=host, max_redirects=1),
        case("http://images.example.test/redirect?to=/redirect%3Fto%3D/image.png", allowed=host, max_redirects=1),
        case(
            "http://images.example.test/redirect?to=http://127.0.0.1/image.png",
            allowed=[*host, "127.0.0.1"],
            max_redirects=2,
        ),
        case(
            "http://images.example.test/redirect?to=http://localhost/image.png",
            allowed=[*host, "localhost"],
            max_redirects=2,
        ),
        case("http://images.example.test/redirect?to=http://evil.example.org/x.png", allowed=host, max_redirects=2),
        case("http://images.example.test/redirect?to=file:///etc/passwd", allowed=host, max_redirects=2),
    )
    assert [r.get("code") for r in results] == [
        "image_url_redirect",
        None,
        "image_url_redirect",
        "image_url_forbidden_address",
        "image_url_forbidden_address",
        "image_host_not_allowed",
        "unsupported_image_url",
    ]
    assert results[1]["ok"] and results[1]["digests"] == [hashlib.sha256(public_host.image).hexdigest()]
    assert not [r for r in public_host.requests() if r["local"] == "127.0.0.1"]


def test_size_status_format_and_time_limits(public_host: PublicHost) -> None:
    host = ["images.example.test"]
    results = public_host.fetch(
        case("http://images.example.test/big", allowed=host, max_bytes=100_000),
        case("http://images.example.test/big-chunked", allowed=host, max_bytes=100_000),
        case("http://images.example.test/big", allowed=host, limits={"max_image_bytes": 1024}),
        case("http://images.example.test/slow", allowed=host, timeout_s=0.5),
        case("http://images.example.test/missing.png", allowed=host),
        case("http://images.example.test/image.svg", allowed=host),
        case("http://images.example.test/bomb.png", allowed=host),
        case("http://images.example.test/truncated", allowed=host),
        case("http://images.example.test:81/image.png", allowed=host),
    )
    assert [r.get("code") for r in results] == [
        "image_too_large",
        "image_too_large",
        "image_too_large",
        "image_fetch_timeout",
        "image_fetch_failed",
        "unsupported_image_format",
        "image_too_many_pixels",
        "image_fetch_failed",
        "image_fetch_failed",
    ]
    assert 0.5 <= results[3]["elapsed"] < 1.5
    assert "404" in results[4]["message"]
    for result in results:
        assert PUBLIC_IP not in result["message"] and "127.0.0.1" not in result["message"]


def test_any_private_address_among_the_resolved_ones_refuses(public_host: PublicHost) -> None:
    (result,) = public_host.fetch(case("http://mixed.example.test/image.png", allowed=["mixed.example.test"]))
    assert result["code"] == "image_url_forbidden_address"
    assert not [r for r in public_host.requests() if r["host"] == "mixed.example.test"]


def test_tls_certificate_must_name_the_host(public_host: PublicHost) -> None:
    (result,) = public_host.fetch(case("https://wrong.example.test/image.png", allowed=["wrong.example.test"]))
    assert result["code"] == "image_fetch_failed"
    assert "certificate" in result["message"]


# Run inside the namespace (subprocesses started above).


def _client_main() -> None:
    request = json.loads(sys.stdin.read())
    tls = ssl.create_default_context(cafile=request["cafile"])

    async def one(spec: dict[str, Any]) -> dict[str, Any]:
        fetch, limits = FetchSettings(**spec["fetch"]), LimitSettings(**spec["limits"])
        doc = parse_json_object(orjson.dumps(chat(*spec["urls"])))
        started = time.perf_counter()
        try:
            inlined = await inline_remote_images(doc, fetch, limits, tls=None if spec["default_tls"] else tls)
        except InvalidRequest as exc:
            return {"ok": False, "code": exc.code, "message": exc.message, "elapsed": time.perf_counter() - started}
        elapsed = time.perf_counter() - started
        assert inlined is not None
        parsed = parse_chat_request(inlined, None, limits)
        parts = parsed.doc["messages"][0]["content"][1:]
        return {
            "ok": True,
            "elapsed": elapsed,
            "digests": list(parsed.image_digests),
            "media": [p["image_url"]["url"].split(",", 1)[0] for p in parts],
            "detail": [p["image_url"]["detail"] for p in parts],
        }

    async def run() -> list[dict[str, Any]]:
        return [await one(spec) for spec in request["cases"]]

    print(json.dumps(asyncio.run(run())))


def _server_main() -> None:
    """HTTP on 45.33.32.156:80, HTTPS on :443 and HTTP on the namespace's own 127.0.0.1:80; logs every request."""
    tmp = Path(sys.argv[1])
    image = (tmp / "image.png").read_bytes()
    ihdr = (50_000).to_bytes(4, "big") * 2 + b"\x08\x02\x00\x00\x00"
    bomb = b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR" + ihdr + b"\x00" * 4
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(tmp / "cert.pem", tmp / "key.pem")
    names: dict[int, str | None] = {}

    def remember_sni(sock: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        names[id(sock)] = name

    tls.sni_callback = remember_sni  # type: ignore[assignment]
    log = (tmp / "requests.jsonl").open("a", buffering=1)

    def answer(status: str, body: bytes, *headers: str) -> bytes:
        head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers, "", ""]
        return "\r\n".join(head).encode() + body

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        path = head[0].split(" ")[1]
        host = next((h.split(":", 1)[1].strip() for h in head[1:] if h.lower().startswith("host:")), None)
        ssl_object = writer.get_extra_info("ssl_object")
        sni = names.get(id(ssl_object)) if ssl_object is not None else None
        local = writer.get_extra_info("sockname")[0]
        log.write(json.dumps({"path": path, "host": host, "sni": sni, "local": local}) + "\n")
        route = path.split("?", 1)[0]
        if route in ("/image.png", "/slowish.png"):
            if route == "/slowish.png":
                await asyncio.sleep(0.3)
            writer.write(answer("200 OK", image, "Content-Type: image/png"))
        elif route == "/chunked.png":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for at in range(0, len(image), 40):
                piece = image[at : at + 40]
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            writer.write(b"0\r\n\r\n")
        elif route == "/close.png":
            writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + image)
        elif route == "/redirect":
            location = path.split("to=", 1)[1].replace("%3F", "?").replace("%3D", "=")
            writer.write(answer("302 Found", b"", f"Location: {location}"))
        elif route == "/big":
            writer.write(answer("200 OK", image + b"\0" * 2_000_000))
        elif route == "/big-chunked":
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            chunk = b"\0" * 65536
            try:
                for _ in range(64):
                    writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    await writer.drain()
            except ConnectionError:
                pass
        elif route == "/slow":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + image[:10])
            try:
                for _ in range(50):
                    await asyncio.sleep(0.1)
                    writer.write(b"\0")
                    await writer.drain()
            except ConnectionError:
                pass
        elif route == "/image.svg":
            writer.write(answer("200 OK", b'<svg xmlns="http://www.w3.org/2000/svg"/>', "Content-Type: image/png"))
        elif route == "/bomb.png":
            writer.write(answer("200 OK", bomb, "Content-Type: image/png"))
        elif route == "/truncated":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + image)
        else:
            writer.write(answer("404 Not Found", b"no such image"))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def serve() -> None:
        servers = [
            await asyncio.start_server(handle, PUBLIC_IP, 80),
            await asyncio.start_server(handle, PUBLIC_IP, 443, ssl=tls),
            await asyncio.start_server(handle, "127.0.0.1", 80),
        ]
        print("ready", flush=True)
        await asyncio.gather(*(server.serve_forever() for server in servers))

    asyncio.run(serve())
