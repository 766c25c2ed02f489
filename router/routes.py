"""Routes: which version of a public model answers a request.

A route lists versions with weights, in order; a request's sticky key (its session, its conversation or
its API key) hashes to a point in [0, 1) and takes the version whose share of the line holds the point.
A rollout puts the new version first, so when its weight grows the clients it already had stay on it,
and when it is aborted every client goes back to the baseline. A name `MODEL@VERSION` pins a version
and skips the route. Routes come from the settings (router.routes, else each pooled model's first
pool) and are replaced by what Redis holds while a rollout runs (router/rollout/store.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qvl.settings import PoolSettings, RouteSettings, is_version, versioned

_SCALE = float(1 << 64)


@dataclass(frozen=True, slots=True)
class Route:
    """One public model's split. `versions` and `shadow` keep their order; `rollout` names the rollout
    that owns the route ("" when none does)."""

    model: str
    versions: tuple[tuple[str, float], ...]
    sticky: str = "session"
    shadow: tuple[tuple[str, float], ...] = ()
    rollout: str = ""
    total: float = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total", sum(w for _, w in self.versions))

    def weight_of(self, version: str) -> float:
        """The version's share of the route in percent."""
        return 100.0 * dict(self.versions).get(version, 0.0) / self.total if self.total else 0.0

    def to_doc(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "versions": [[v, w] for v, w in self.versions],
            "sticky": self.sticky,
            "shadow": [[v, s] for v, s in self.shadow],
            "rollout": self.rollout,
        }

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Route:
        return cls(
            model=str(doc["model"]),
            versions=tuple((str(v), float(w)) for v, w in doc["versions"]),
            sticky=str(doc.get("sticky", "session")),
            shadow=tuple((str(v), float(s)) for v, s in doc.get("shadow", ())),
            rollout=str(doc.get("rollout", "")),
        )


def point(model: str, sticky_key: bytes, salt: bytes = b"") -> float:
    """Where `sticky_key` falls on [0, 1) for `model`: a pure function, the same in every router."""
    digest = hashlib.blake2b(sticky_key, digest_size=8, key=(model.encode() + salt)[:64]).digest()
    return int.from_bytes(digest, "big") / _SCALE


def assign(route: Route, sticky_key: bytes) -> str:
    """The version of `route` that `sticky_key` goes to."""
    if len(route.versions) == 1:
        return route.versions[0][0]
    at = point(route.model, sticky_key) * route.total
    reached = 0.0
    chosen = route.versions[-1][0]
    for version, weight in route.versions:
        reached += weight
        if weight > 0 and at < reached:
            return version
        if weight > 0:
            chosen = version
    return chosen


def shadow_of(route: Route, version: str, sticky_key: bytes) -> str | None:
    """The version to mirror this request to (never the one answering), or None."""
    for target, share in route.shadow:
        if target != version and share > 0 and point(route.model, sticky_key, b"shadow") < share:
            return target
    return None


def conversation_key(doc: Mapping[str, Any], image_digests: Sequence[str]) -> bytes:
    """What a conversation keeps across its turns: its first message (text and first image), as bytes."""
    messages = doc.get("messages")
    first = messages[0] if isinstance(messages, list) and messages else None
    if not isinstance(first, Mapping):
        return b""
    content = first.get("content")
    parts: list[str] = [str(first.get("role", ""))]
    if isinstance(content, str):
        parts.append(content)
    elif isinstance(content, list):
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text":
                parts.append(str(part.get("text", "")))
            elif isinstance(part, Mapping) and part.get("type") == "image_url" and image_digests:
                parts.append(image_digests[0])
    return "\x1f".join(parts).encode()


def sticky_key(route: Route, session: str | None, key_id: str, conversation: bytes) -> bytes:
    """The bytes a request is assigned by: see RouteSettings.sticky."""
    if route.sticky == "key" and key_id:
        return b"k\x1f" + key_id.encode()
    if session:
        return b"s\x1f" + session.encode()
    if conversation:
        return b"c\x1f" + key_id.encode() + b"\x1f" + conversation
    return b"k\x1f" + key_id.encode()


def settings_routes(routes: Mapping[str, RouteSettings], pools: Sequence[PoolSettings]) -> dict[str, Route]:
    """The routes the settings give: router.routes, and for a pooled model without one, its first pool's
    version alone."""
    found = {
        model: Route(model, tuple(route.versions.items()), route.sticky, tuple(route.shadow.items()))
        for model, route in routes.items()
    }
    for pool in pools:
        if pool.model not in found:
            found[pool.model] = Route(pool.model, ((pool.version, 100.0),))
    return found


@dataclass(frozen=True, slots=True)
class Choice:
    """Where a request goes: the version (empty: any replica of the model) and the served name to pick
    replicas by, plus a version to mirror it to."""

    version: str
    target: str
    shadow: str | None = None
    route: Route | None = None
    key: bytes = b""
    """The sticky key the version was assigned by."""


class RouteTable:
    """The routes a router applies now: the settings' routes, each replaced by Redis' while it holds one."""

    def __init__(self, configured: dict[str, Route]) -> None:
        self._configured = configured
        self.routes: dict[str, Route] = dict(configured)
        self.revision = ""

    def apply(self, stored: Mapping[str, Route], revision: str) -> list[str]:
        """Make `stored` (what Redis holds) override the configured routes; returns the models whose
        route changed."""
        merged = {**self._configured, **stored}
        changed = sorted(m for m in merged.keys() | self.routes.keys() if merged.get(m) != self.routes.get(m))
        self.routes = merged
        self.revision = revision
        return changed

    def current_versions(self) -> dict[str, str]:
        """Model -> the version taking the most of its route now (what a batch job is pinned to)."""
        return {m: max(r.versions, key=lambda vw: vw[1])[0] for m, r in self.routes.items()}

    def choose(
        self, model: str, session: str | None, key_id: str, doc: Mapping[str, Any], digests: Sequence[str]
    ) -> Choice:
        """The version for this request: pinned by `MODEL@VERSION`, else by the model's route, else none.
        A label no version could have (`@` followed by a control character, say) pins nothing: no replica
        serves that name, and the label must never reach the x-qvl-model-version header."""
        public, at, pinned = model.partition("@")
        if at:
            return Choice(pinned, model) if is_version(pinned) else Choice("", model)
        route = self.routes.get(model)
        if route is None:
            return Choice("", model)
        key = sticky_key(route, session, key_id, conversation_key(doc, digests) if not session else b"")
        version = assign(route, key)
        shadow = shadow_of(route, version, key) if route.shadow else None
        return Choice(version, versioned(public, version), shadow, route, key)
