"""Console sessions: an API key, checked once at sign-in, becomes a signed and expiring cookie.

The cookie holds the key's id, a fragment of the key's SHA-256 (so a key replaced under the same id ends
its sessions) and a per-session CSRF token, signed with `router.console.session_secret` (itsdangerous,
HMAC-SHA1 over a timestamped payload); it is httpOnly and SameSite=Strict. Writes must also send the CSRF
token in the `x-csrf-token` header, which a page of another origin cannot read or set.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from qvl.settings import ConsoleSettings
from router.auth import ApiKey, KeyRing, Role
from router.errors import PermissionDenied, Unauthenticated

COOKIE = "qvl_console"
CSRF_HEADER = b"x-csrf-token"
_DIGEST_CHARS = 16


@dataclass(frozen=True, slots=True)
class Session:
    """A signed-in console user: the key (as the KeyRing knows it now) and the session's CSRF token."""

    key: ApiKey
    csrf: str

    @property
    def role(self) -> Role:
        return self.key.role


class Sessions:
    """Signs sessions into cookie values and reads them back; the secret is per process unless configured."""

    def __init__(self, settings: ConsoleSettings, keys: KeyRing) -> None:
        secret = settings.session_secret.get_secret_value() or secrets.token_urlsafe(32)
        self._signer = URLSafeTimedSerializer(secret, salt="qvl-console-session")
        self._keys = keys
        self._ttl_s = settings.session_ttl_s
        self._secure = settings.secure_cookie

    def sign_in(self, key_text: str) -> tuple[Session, str]:
        """Check an API key as the chat endpoint would; returns the session and its cookie value.
        Raises Unauthenticated (missing_api_key, invalid_api_key)."""
        text = key_text.strip()
        # Auth off: every caller is the anonymous one, as on the API itself.
        key = self._keys.authenticate(b"Bearer " + text.encode() if text else None)
        session = Session(key, secrets.token_urlsafe(24))
        value = self._signer.dumps([key.id, key.digest[:_DIGEST_CHARS], session.csrf])
        return session, value

    def read(self, cookie_header: bytes | None) -> Session:
        """The session of a request's Cookie header. Raises Unauthenticated: console_session_missing,
        console_session_expired, or console_session_invalid (tampered, or its key is gone or replaced)."""
        value = _cookie(cookie_header, COOKIE)
        if not value:
            raise Unauthenticated("sign in to the console first", code="console_session_missing")
        try:
            key_id, digest, csrf = self._signer.loads(value, max_age=int(self._ttl_s))
        except SignatureExpired:
            raise Unauthenticated(
                "the console session expired: sign in again", code="console_session_expired"
            ) from None
        except (BadSignature, ValueError, TypeError):
            raise Unauthenticated(
                "the console session is not valid: sign in again", code="console_session_invalid"
            ) from None
        key = self._keys.by_id(str(key_id))
        if key is None or key.digest[:_DIGEST_CHARS] != digest:
            raise Unauthenticated(
                "the API key of this console session is no longer valid", code="console_session_invalid"
            )
        return Session(key, str(csrf))

    def check_write(self, session: Session, csrf_header: bytes | None) -> None:
        """Raises PermissionDenied (csrf_token_invalid) unless the header carries the session's token."""
        if csrf_header is None or not hmac.compare_digest(csrf_header, session.csrf.encode()):
            raise PermissionDenied(
                "a console write must carry the session's CSRF token in x-csrf-token", code="csrf_token_invalid"
            )

    def chat_key(self, headers: dict[bytes, bytes]) -> ApiKey:
        """The key a console page sends a chat request as: the session cookie's, with its CSRF token."""
        session = self.read(headers.get(b"cookie"))
        self.check_write(session, headers.get(CSRF_HEADER))
        return session.key

    @staticmethod
    def require(session: Session, role: Role) -> None:
        """Raises PermissionDenied (operator_only) when `role` is operator and the session's key is not."""
        if role == "operator" and session.role != "operator":
            raise PermissionDenied(
                "this part of the console is for operators: the key needs `role: operator` in the keys file",
                code="operator_only",
            )

    def set_cookie(self, value: str) -> str:
        """The Set-Cookie header value that starts a session."""
        return self._cookie_header(value, int(self._ttl_s))

    def clear_cookie(self) -> str:
        """The Set-Cookie header value that ends the session in the browser."""
        return self._cookie_header("", 0)

    def _cookie_header(self, value: str, max_age: int) -> str:
        # Path=/: the playground sends chat requests to /v1/chat/completions with this cookie.
        secure = "; Secure" if self._secure else ""
        return f"{COOKIE}={value}; Max-Age={max_age}; Path=/; HttpOnly; SameSite=Strict{secure}"


def _cookie(header: bytes | None, name: str) -> str:
    """The value of cookie `name` in a Cookie header ("" when absent)."""
    if not header:
        return ""
    prefix = name + "="
    for part in header.decode("latin-1").split(";"):
        part = part.strip()
        if part.startswith(prefix):
            return part[len(prefix) :]
    return ""
