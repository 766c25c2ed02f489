"""Console sessions, directly: signing, expiry, tampering, a key replaced under the same id, CSRF, roles,
and the keys file's `role`."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from pydantic import SecretStr
from support.console import OPERATOR, VIEWER, console_keys

from qvl.settings import AuthSettings, ConsoleSettings, RouterSettings, Settings
from router.auth import AuthConfigError, KeyRing
from router.console.session import COOKIE, Sessions
from router.errors import PermissionDenied, Unauthenticated

SECRET = SecretStr("a-shared-console-secret")


def ring(keys_file: Path, enabled: bool = True) -> KeyRing:
    auth = AuthSettings(keys_file=str(keys_file), enabled=enabled)
    return KeyRing.from_settings(Settings(router=RouterSettings(auth=auth)))


def cookie(value: str) -> bytes:
    return f"other=1; {COOKIE}={value}; x=y".encode()


def test_a_session_round_trips_and_carries_the_role(tmp_path: Path) -> None:
    sessions = Sessions(ConsoleSettings(session_secret=SECRET), ring(console_keys(tmp_path)))
    session, value = sessions.sign_in(OPERATOR)
    again = sessions.read(cookie(value))
    assert (again.key.id, again.role, again.csrf) == ("operator", "operator", session.csrf)
    assert OPERATOR not in value
    sessions.require(again, "operator")
    viewer = sessions.read(cookie(sessions.sign_in(VIEWER)[1]))
    with pytest.raises(PermissionDenied) as denied:
        sessions.require(viewer, "operator")
    assert denied.value.code == "operator_only"


def test_tampered_foreign_and_expired_cookies_are_refused(tmp_path: Path) -> None:
    keys = ring(console_keys(tmp_path))
    sessions = Sessions(ConsoleSettings(session_secret=SECRET, session_ttl_s=1), keys)
    _, value = sessions.sign_in(VIEWER)
    for bad, code in [
        (b"", "console_session_missing"),
        (cookie(value[:-3] + "AAA"), "console_session_invalid"),
        (cookie(Sessions(ConsoleSettings(), keys).sign_in(VIEWER)[1]), "console_session_invalid"),  # another secret
    ]:
        with pytest.raises(Unauthenticated) as refused:
            sessions.read(bad)
        assert refused.value.code == code
    time.sleep(2.1)  # itsdangerous counts whole seconds: a 1 s session is over after 2
    with pytest.raises(Unauthenticated) as expired:
        sessions.read(cookie(value))
    assert expired.value.code == "console_session_expired"


def test_a_key_replaced_under_the_same_id_ends_its_sessions(tmp_path: Path) -> None:
    before = Sessions(ConsoleSettings(session_secret=SECRET), ring(console_keys(tmp_path)))
    _, value = before.sign_in(VIEWER)
    replaced = tmp_path / "replaced.yaml"
    replaced.write_text("keys:\n  - id: viewer\n    key: sk-a-brand-new-viewer-key-42\n")
    after = Sessions(ConsoleSettings(session_secret=SECRET), ring(replaced))
    with pytest.raises(Unauthenticated) as refused:
        after.read(cookie(value))
    assert refused.value.code == "console_session_invalid"


def test_csrf_and_sign_in_errors(tmp_path: Path) -> None:
    sessions = Sessions(ConsoleSettings(), ring(console_keys(tmp_path)))
    session, value = sessions.sign_in(VIEWER)
    headers = {b"cookie": cookie(value)}
    with pytest.raises(PermissionDenied) as no_token:
        sessions.chat_key(headers)
    assert no_token.value.code == "csrf_token_invalid"
    assert sessions.chat_key({**headers, b"x-csrf-token": session.csrf.encode()}).id == "viewer"
    for key, code in [("", "missing_api_key"), ("sk-nobody-at-all-here", "invalid_api_key")]:
        with pytest.raises(Unauthenticated) as refused:
            sessions.sign_in(key)
        assert refused.value.code == code


def test_with_auth_off_anyone_signs_in_as_the_anonymous_operator(tmp_path: Path) -> None:
    sessions = Sessions(ConsoleSettings(), ring(console_keys(tmp_path), enabled=False))
    session, value = sessions.sign_in("")
    assert (session.key.id, session.role) == ("", "operator")
    assert sessions.read(cookie(value)).role == "operator"


def test_the_keys_file_role_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - id: a\n    key: sk-0123456789abcdef\n    role: admin\n")
    with pytest.raises(AuthConfigError, match="role must be one of viewer, operator"):
        ring(path)


def test_a_short_session_secret_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 characters"):
        ConsoleSettings(session_secret=SecretStr("short"))
