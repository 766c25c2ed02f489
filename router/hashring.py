"""A consistent-hash ring over replica names: pure functions and one small immutable class."""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable, Iterator


def key_point(key: str) -> int:
    """Position of an arbitrary key on the ring (64-bit)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")


def digest_point(hex_digest: str) -> int:
    """Position of a SHA-256 hex digest on the ring; the digest is already uniform, so no rehash."""
    return int(hex_digest[:16], 16)


class HashRing:
    """Each name owns `virtual_nodes` points; a key belongs to the first name clockwise from its point."""

    __slots__ = ("_names", "_owners", "_points")

    def __init__(self, names: Iterable[str], virtual_nodes: int) -> None:
        pairs = sorted((key_point(f"{name}#{i}"), name) for name in sorted(set(names)) for i in range(virtual_nodes))
        self._points = [p for p, _ in pairs]
        self._owners = [n for _, n in pairs]
        self._names = frozenset(self._owners)

    @property
    def names(self) -> frozenset[str]:
        return self._names

    def walk(self, point: int) -> Iterator[str]:
        """Distinct names in clockwise order from `point`: the owner first, then its successors."""
        if not self._points:
            return
        start = bisect.bisect_left(self._points, point)
        seen: set[str] = set()
        size = len(self._owners)
        for i in range(size):
            name = self._owners[(start + i) % size]
            if name not in seen:
                seen.add(name)
                yield name
                if len(seen) == len(self._names):
                    return
