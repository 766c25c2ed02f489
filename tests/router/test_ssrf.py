"""The SSRF rules of router/ssrf.py, as pure functions: forbidden addresses, numeric hosts as the address
they denote, URL checks, the allowlist. The fetch itself, against live servers, is in test_fetch.py."""

from __future__ import annotations

from ipaddress import ip_address

import pytest

from router.errors import InvalidRequest
from router.ssrf import check_addresses, check_url, forbidden_address, host_allowed, parse_ipv4

PUBLIC_IP = "45.33.32.156"


@pytest.mark.parametrize(
    ("address", "forbidden"),
    [
        ("45.33.32.156", False),
        ("8.8.8.8", False),
        ("2600:3c01::f03c:91ff:fe18:bb2f", False),
        ("2002:2d21:209c::1", False),  # 6to4 of a public address
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("10.1.2.3", True),
        ("172.16.0.1", True),
        ("192.168.1.1", True),
        ("169.254.169.254", True),
        ("169.254.1.1", True),
        ("100.64.0.1", True),
        ("100.100.100.200", True),
        ("0.0.0.0", True),
        ("224.0.0.1", True),
        ("240.0.0.1", True),
        ("255.255.255.255", True),
        ("192.0.2.1", True),
        ("::1", True),
        ("::", True),
        ("fe80::1", True),
        ("fc00::1", True),
        ("fd00:ec2::254", True),
        ("ff02::1", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:169.254.169.254", True),
        ("::127.0.0.1", True),
        ("2002:7f00:1::", True),  # 6to4 of 127.0.0.1
        ("2002:a9fe:a9fe::", True),  # 6to4 of 169.254.169.254
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", True),  # Teredo, client 127.0.0.1
        ("64:ff9b::7f00:1", True),  # NAT64 of 127.0.0.1
    ],
)
def test_forbidden_addresses(address: str, forbidden: bool) -> None:
    assert forbidden_address(ip_address(address)) is forbidden


@pytest.mark.parametrize(
    "host",
    [
        "2130706433",
        "0x7f000001",
        "0X7F000001",
        "017700000001",
        "127.1",
        "127.0.1",
        "0x7f.1",
        "0177.0.0.1",
        "127.0.0.1.",
    ],
)
def test_numeric_ipv4_forms_are_the_address_they_denote(host: str) -> None:
    assert parse_ipv4(host) == ip_address("127.0.0.1")


def test_numeric_ipv4_edges() -> None:
    assert parse_ipv4("example.com") is None
    assert parse_ipv4("1.2.3.example") is None
    assert parse_ipv4("0x1g") is None  # not a number, so a name (as in the URL standard)
    assert parse_ipv4("0") == ip_address("0.0.0.0")
    assert parse_ipv4("4294967295") == ip_address("255.255.255.255")
    for bad in ("4294967296", "1.2.3.4.5", "256.1.1.1", "1.2.65536", "foo.1", "08.1.1.1", "1.2.3.09"):
        with pytest.raises(ValueError):
            parse_ipv4(bad)


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://images.example.com/a.png",
        "gopher://images.example.com:70/_GET",
        "dict://images.example.com:11211/stat",
        "javascript:alert(1)",
        "ws://images.example.com/a.png",
        "images.example.com/a.png",
        "//images.example.com/a.png",
    ],
)
def test_other_schemes_are_refused(url: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_url(url, ["images.example.com"])
    assert info.value.code == "unsupported_image_url"
    assert info.value.status == 400 and info.value.param == "messages"


@pytest.mark.parametrize(
    "url",
    [
        "http://user:pw@images.example.com/a.png",
        "http://images.example.com@evil.example.net/a.png",
        "http://images.example.com\\@evil.example.net/",
        "http://images.example.com/a b.png",
        "http://images.example.com/a\r\nX-Injected: 1",
        "http://images.example.com:99999/",
        "http://images.example.com:0/",
        "http://images..example.com/",
        "http://[::1/",
        "http://[fe80::1%25eth0]/",
        "http://1.2.3.4.5/",
        "http://foo.0x1f/",
        "http://example.09/",
        "http://images.example.com%2f@x/",
        "http:///a.png",
        "http://" + "a" * 9000 + ".com/",
    ],
)
def test_malformed_urls_are_invalid(url: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_url(url, ["images.example.com", "evil.example.net"])
    assert info.value.code == "invalid_image_url"


def test_allowlist_matching() -> None:
    allowed = ["images.example.com", "*.cdn.example.net", "45.33.32.156", "[2600:3c01::1]"]
    assert host_allowed("images.example.com", None, allowed)
    assert not host_allowed("other.example.com", None, allowed)
    assert not host_allowed("images.example.com.evil.net", None, allowed)
    assert host_allowed("a.cdn.example.net", None, allowed)
    assert host_allowed("a.b.cdn.example.net", None, allowed)
    assert not host_allowed("cdn.example.net", None, allowed)
    assert not host_allowed("evilcdn.example.net", None, allowed)
    assert host_allowed("45.33.32.156", ip_address("45.33.32.156"), allowed)
    assert host_allowed("2600:3c01::1", ip_address("2600:3c01::1"), allowed)
    assert not host_allowed("45.33.32.157", ip_address("45.33.32.157"), allowed)
    assert not host_allowed("anything", None, [])
    # Names and trailing dots are case- and dot-insensitive; the URL's numeric forms are the IP they denote.
    target = check_url("HTTP://Images.Example.COM./a%20b.png?x=1&y=ü#frag", ["images.example.com"])
    assert (target.host, target.port, target.host_header) == ("images.example.com", 80, b"images.example.com")
    assert target.path == b"/a%20b.png?x=1&y=%C3%BC"
    assert check_url("http://0x2d.0x21.0x20.0x9c:8080/", ["45.33.32.156"]).host_header == b"45.33.32.156:8080"
    assert check_url("https://[2600:3c01::1]/", ["2600:3c01::1"]).host_header == b"[2600:3c01::1]"


@pytest.mark.parametrize(
    ("url", "allowed"),
    [
        ("http://images.example.com/a.png", []),
        ("http://other.example.com/a.png", ["images.example.com"]),
        ("http://45.33.32.156/a.png", ["images.example.com"]),
        ("http://images.example.com/a.png", ["45.33.32.156"]),
        ("http://example.com/a.png", ["*.example.com"]),
    ],
)
def test_hosts_outside_the_allowlist_are_refused(url: str, allowed: list[str]) -> None:
    with pytest.raises(InvalidRequest) as info:
        check_url(url, allowed)
    assert info.value.code == "image_host_not_allowed"


def test_a_host_with_any_forbidden_address_is_refused() -> None:
    check_addresses([ip_address(PUBLIC_IP)])
    for addresses in (["127.0.0.1"], [PUBLIC_IP, "10.0.0.1"], ["::ffff:169.254.169.254"]):
        with pytest.raises(InvalidRequest) as info:
            check_addresses([ip_address(a) for a in addresses], "messages[0].content[1]")
        assert info.value.code == "image_url_forbidden_address"
        assert not any(a in info.value.message for a in addresses)  # never the resolved address
