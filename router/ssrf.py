"""The rules against server-side request forgery for image URLs: which URLs, hosts and addresses the
router refuses to fetch (`fetch.allowed_hosts`). Pure functions: nothing here resolves or connects;
router/fetch.py does, and asks these rules first.

- only http and https, to a host in `fetch.allowed_hosts` (a name, `*.suffix`, or an IP listed as is);
  every other scheme (file, ftp, gopher, ...) is refused;
- an address is refused unless it is a global unicast one (private, loopback, link-local, shared,
  multicast, reserved, cloud metadata, or an IPv6 form that embeds such an IPv4 address are not);
  the fetcher checks every address a name resolves to, then connects to a checked one itself;
- numeric IPv4 forms (`2130706433`, `0x7f000001`, `017700000001`, `127.1`) are read as the WHATWG URL
  standard (and inet_aton) read them, so they are judged as the address they are.

Codes (all InvalidRequest, param `messages`); messages never carry a resolved address:
    unsupported_image_url        a scheme other than http, https or data
    invalid_image_url            a malformed URL: credentials, control characters, bad host or port
    image_host_not_allowed       the host is not in fetch.allowed_hosts (every host, when it is empty)
    image_url_forbidden_address  the host is, or resolves to, a non-public address
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

from router.errors import InvalidRequest, InvalidRequestCode

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_MAX_URL = 8192
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
        raise refused(where, "image_url.url must be a data URL or an http(s) URL", "unsupported_image_url")
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
        raise refused(where, "image URL host is not in fetch.allowed_hosts", "image_host_not_allowed")
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


def check_addresses(addresses: Iterable[IPAddress], where: str = "image") -> None:
    """Raise InvalidRequest (`image_url_forbidden_address`) if any of a host's addresses is forbidden."""
    if any(forbidden_address(address) for address in addresses):
        raise refused(where, "image URL host is not a public address", "image_url_forbidden_address")


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


def refused(where: str, message: str, code: InvalidRequestCode) -> InvalidRequest:
    """The refusal of the image at `where` (its place in the body), with `code`."""
    return InvalidRequest(f"{where}: {message}", code=code, param="messages")
