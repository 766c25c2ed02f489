"""API keys: who may call the router and which models each key may use.

Keys come from `auth.keys_file` (YAML) and from `QVL_API_KEYS` (comma-separated, every model). Only
their SHA-256 is kept in memory; a key file may hold the SHA-256 instead of the key itself, so the
key never has to be on disk either. A key is known to logs, metrics and the audit log by its id only.

    keys:
      - id: storefront                      # shown in logs, metrics and the audit log
        sha256: 9f86d081884c7d65...         # or `key: sk-...`
        models: [Qwen/Qwen3-VL-8B-Instruct] # optional: every model when left out (or ["*"])
        requests_per_minute: 600            # optional: quota.requests_per_minute when left out
        image_tokens_per_minute: 400000     # optional: quota.image_tokens_per_minute when left out
        role: operator                      # optional: viewer (the default) or operator (see below)

`role` is the key's standing in the web console (router/console/): a viewer signs in to the playground
only; an operator also sees the operations page. Keys from QVL_API_KEYS are viewers.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from qvl.settings import Settings
from router.errors import PermissionDenied, Unauthenticated

_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_BEARER = b"bearer "
Role = Literal["viewer", "operator"]
ROLES: tuple[Role, ...] = ("viewer", "operator")


class AuthConfigError(ValueError):
    """The keys file or QVL_API_KEYS cannot be used; the message says where and why (never the key)."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    id: str
    models: frozenset[str] | None
    """None: every model."""
    requests_per_minute: float | None = None
    image_tokens_per_minute: float | None = None
    role: Role = "viewer"
    digest: str = ""
    """SHA-256 hex of the key ("" for ANONYMOUS): ties a console session to this very key."""


ANONYMOUS = ApiKey(id="", models=None, role="operator")
"""The caller when auth is off: no id, every model, the default quotas; the console lets it see everything,
as the router's other endpoints do."""


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyRing:
    """The known keys by SHA-256. `enabled` False: every request is ANONYMOUS."""

    def __init__(self, keys: dict[str, ApiKey], enabled: bool) -> None:
        self._keys = keys
        self._by_id = {key.id: key for key in keys.values()}
        self.enabled = enabled

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing:
        """Read the keys file and QVL_API_KEYS; raises AuthConfigError when auth is on and no key exists."""
        keys: dict[str, ApiKey] = {}
        if settings.router.auth.keys_file:
            keys.update(_read_keys_file(Path(settings.router.auth.keys_file)))
        for key in (k.strip() for k in settings.api_keys.get_secret_value().split(",")):
            if key:
                digest = key_hash(key)
                keys.setdefault(digest, ApiKey(id=f"env-{digest[:8]}", models=None, digest=digest))
        if settings.router.auth.enabled and not keys:
            raise AuthConfigError(
                "auth is on but no API key is configured: set QVL_API_KEYS or auth.keys_file, "
                "or turn auth off explicitly with --no-auth (auth.enabled: false)"
            )
        return cls(keys, settings.router.auth.enabled)

    def __len__(self) -> int:
        return len(self._keys)

    def authenticate(self, authorization: bytes | None) -> ApiKey:
        """The key of an `Authorization: Bearer <key>` header; raises Unauthenticated."""
        if not self.enabled:
            return ANONYMOUS
        if not authorization:
            raise Unauthenticated("missing API key: send it as 'Authorization: Bearer <key>'", code="missing_api_key")
        if authorization[:7].lower() != _BEARER:
            raise Unauthenticated("the Authorization header must be 'Bearer <key>'", code="invalid_api_key")
        found = self._keys.get(hashlib.sha256(authorization[7:].strip()).hexdigest())
        if found is None:
            raise Unauthenticated("invalid API key", code="invalid_api_key")
        return found

    def by_id(self, key_id: str) -> ApiKey | None:
        """The key with this id (ANONYMOUS for "" while auth is off), or None."""
        if not self.enabled:
            return ANONYMOUS if key_id == "" else None
        return self._by_id.get(key_id)

    @staticmethod
    def authorize(key: ApiKey, model: str) -> None:
        """Raises PermissionDenied when `key` may not use `model`."""
        if key.models is not None and model not in key.models:
            raise PermissionDenied(f"this API key may not use model '{model}'", code="model_not_allowed", param="model")


def _read_keys_file(path: Path) -> dict[str, ApiKey]:
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise AuthConfigError(f"cannot read keys file {path}: {exc.strerror}") from None
    except yaml.YAMLError:
        raise AuthConfigError(f"keys file {path} is not valid YAML") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise AuthConfigError(f"keys file {path} must hold a mapping with a list under 'keys'")
    keys: dict[str, ApiKey] = {}
    ids: set[str] = set()
    for i, entry in enumerate(entries):
        where = f"keys file {path}, keys[{i}]"
        if not isinstance(entry, dict):
            raise AuthConfigError(f"{where} must be a mapping")
        unknown = set(entry) - {
            "id",
            "key",
            "sha256",
            "models",
            "requests_per_minute",
            "image_tokens_per_minute",
            "role",
        }
        if unknown:
            raise AuthConfigError(f"{where} has unknown fields {sorted(unknown)}")
        key_id = entry.get("id")
        if not isinstance(key_id, str) or not _ID.match(key_id):
            raise AuthConfigError(f"{where}: id must be 1-64 characters of A-Z a-z 0-9 . _ : -")
        if key_id in ids:
            raise AuthConfigError(f"{where}: id '{key_id}' appears twice")
        ids.add(key_id)
        digest = _digest(entry, where)
        if digest in keys:
            raise AuthConfigError(f"{where}: the same key is listed twice (ids '{keys[digest].id}', '{key_id}')")
        keys[digest] = ApiKey(
            id=key_id,
            models=_models(entry.get("models"), where),
            requests_per_minute=_rate(entry.get("requests_per_minute"), f"{where}: requests_per_minute"),
            image_tokens_per_minute=_rate(entry.get("image_tokens_per_minute"), f"{where}: image_tokens_per_minute"),
            role=_role(entry.get("role", "viewer"), where),
            digest=digest,
        )
    return keys


def _digest(entry: dict[str, Any], where: str) -> str:
    key, sha = entry.get("key"), entry.get("sha256")
    if (key is None) == (sha is None):
        raise AuthConfigError(f"{where}: give exactly one of key or sha256")
    if key is not None:
        if not isinstance(key, str) or len(key) < 16:
            raise AuthConfigError(f"{where}: key must be a string of at least 16 characters")
        return key_hash(key)
    if not isinstance(sha, str) or not _SHA256.match(sha.lower()):
        raise AuthConfigError(f"{where}: sha256 must be 64 hex digits")
    return sha.lower()


def _models(value: object, where: str) -> frozenset[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or not all(isinstance(m, str) and m for m in value):
        raise AuthConfigError(f"{where}: models must be a list of model names")
    return None if "*" in value else frozenset(value)


def _role(value: object, where: str) -> Role:
    for role in ROLES:
        if value == role:
            return role
    raise AuthConfigError(f"{where}: role must be one of {', '.join(ROLES)}")


def _rate(value: object, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise AuthConfigError(f"{where} must be a number >= 0 (0: unlimited)")
    return float(value)
