"""The console over real HTTP, against `qvl sim` and `qvl router` processes: sign-in, the session cookie, roles,
CSRF, the chat endpoint through the cookie, the security headers, the rollout panel and its actions (without a
store, and with a real Redis), and switching the console off."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from contextlib import closing
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest
from support.chat import image_chat, png_data_url
from support.console import OPERATOR, VIEWER, console_keys, sign_in
from support.servers import Cluster, Proc, RedisServer

MODEL = "qwen3-vl-sim"
API = ("/console/api/session", "/console/api/playground", "/console/api/operations")


@pytest.fixture
def router(cluster: Cluster, tmp_path: Path) -> Proc:
    sim = cluster.sim()
    return cluster.router(sim, flags=("--keys-file", str(console_keys(tmp_path))), auth=True)


def error(answer: httpx.Response) -> tuple[int, str, str]:
    body = answer.json()["error"]
    return answer.status_code, body["type"], body["code"]


def test_without_a_session_pages_redirect_to_sign_in_and_json_answers_401(router: Proc) -> None:
    for path in ("/console/playground", "/console/operations", "/console"):
        answer = httpx.get(router.url + path, timeout=5)
        assert answer.status_code == 303
        assert answer.headers["location"] in ("/console/signin", "/console/playground")
    for path in API:
        assert error(httpx.get(router.url + path, timeout=5)) == (
            401,
            "authentication_error",
            "console_session_missing",
        )
    tampered = {"cookie": "qvl_console=WyJvcGVyYXRvciJd.forged.signature"}
    for path in API:
        answer = httpx.get(router.url + path, headers=tampered, timeout=5)
        assert error(answer) == (401, "authentication_error", "console_session_invalid")


def test_a_wrong_key_is_refused_with_the_reason_and_sets_no_cookie(router: Proc) -> None:
    answer = httpx.post(router.url + "/console/signin", data={"key": "sk-not-a-key-of-this-cluster"}, timeout=5)
    assert answer.status_code == 401
    assert "invalid API key" in answer.text
    assert "set-cookie" not in answer.headers
    empty = httpx.post(router.url + "/console/signin", data={"key": ""}, timeout=5)
    assert empty.status_code == 401 and "missing API key" in empty.text


def test_sign_in_sets_a_signed_httponly_strict_cookie_and_roles_are_enforced(router: Proc) -> None:
    answer = httpx.post(router.url + "/console/signin", data={"key": VIEWER}, timeout=5)
    assert answer.status_code == 303
    cookie = answer.headers["set-cookie"]
    assert cookie.startswith("qvl_console=")
    assert {"HttpOnly", "SameSite=Strict", "Path=/"} <= {part.strip() for part in cookie.split(";")}
    assert re.search(r"Max-Age=\d+", cookie)
    assert VIEWER not in cookie

    viewer, _ = sign_in(router.url, VIEWER)
    with closing(viewer):
        assert viewer.get("/console/api/session").json() == {"key_id": "viewer", "role": "viewer", "auth_enabled": True}
        assert viewer.get("/console/api/playground").json()["models"] == [MODEL]
        assert error(viewer.get("/console/api/operations")) == (403, "permission_denied", "operator_only")
        page = viewer.get("/console/operations")
        assert page.status_code == 403 and "role: operator" in page.text
        assert "/console/operations" not in viewer.get("/console/playground").text  # no link to it either
    operator, _ = sign_in(router.url, OPERATOR)
    with closing(operator):
        ops = operator.get("/console/api/operations").json()
        assert [r["name"] for r in ops["replicas"]] == [router_replica(router)]
        assert operator.get("/console/operations").status_code == 200


def router_replica(router: Proc) -> str:
    return httpx.get(router.url + "/v1/cluster", headers={"authorization": f"Bearer {OPERATOR}"}, timeout=5).json()[
        "replicas"
    ][0]["name"]


def test_chat_through_the_session_cookie_needs_its_csrf_token(router: Proc) -> None:
    body = image_chat(MODEL, png_data_url(), max_tokens=4)
    viewer, csrf = sign_in(router.url, VIEWER)
    with closing(viewer):
        assert error(viewer.post("/v1/chat/completions", json=body)) == (403, "permission_denied", "csrf_token_invalid")
        wrong = viewer.post("/v1/chat/completions", json=body, headers={"x-csrf-token": csrf[:-2] + "xx"})
        assert error(wrong) == (403, "permission_denied", "csrf_token_invalid")
        answer = viewer.post("/v1/chat/completions", json=body, headers={"x-csrf-token": csrf})
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-qvl-replica"]
        # The key is still the key: a bearer header wins over the cookie, and a bad one is refused.
        bad = viewer.post("/v1/chat/completions", json=body, headers={"authorization": "Bearer sk-wrong-key-123456"})
        assert error(bad) == (401, "authentication_error", "invalid_api_key")
        # Signing out needs the token too; afterwards the cookie is gone and chat needs a key again.
        assert viewer.post("/console/signout", data={"csrf": "nope"}).status_code == 403
        assert viewer.post("/console/signout", data={"csrf": csrf}).status_code == 303
        assert error(viewer.get("/console/api/session"))[2] == "console_session_missing"
    metrics = httpx.get(router.url + "/metrics", timeout=5).text
    assert 'qvl_key_requests_total{key_id="viewer",status="200"} 1.0' in metrics  # the key's own accounting


def test_sign_in_from_another_origin_is_refused(router: Proc) -> None:
    answer = httpx.post(
        router.url + "/console/signin", data={"key": VIEWER}, headers={"origin": "https://evil.example"}, timeout=5
    )
    assert answer.status_code == 403 and "set-cookie" not in answer.headers


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[dict[str, str | None]] = []
        self.inline: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        named = dict(attrs)
        if tag == "script":
            self.scripts.append(named)
        if tag == "style" or "style" in named or any(name.startswith("on") for name in named):
            self.inline.append(tag)


def test_pages_carry_a_strict_csp_and_no_inline_script_or_style(router: Proc) -> None:
    operator, _ = sign_in(router.url, OPERATOR)
    with closing(operator):
        for path in ("/console/signin", "/console/playground", "/console/operations"):
            answer = httpx.get(router.url + path, timeout=5) if path.endswith("signin") else operator.get(path)
            assert answer.status_code == 200, path
            csp = answer.headers["content-security-policy"]
            assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe" not in csp
            assert answer.headers["x-frame-options"] == "DENY"
            page = _Page()
            page.feed(answer.text)
            assert page.inline == [], path
            assert all(s.get("src", "").startswith("/console/static/") for s in page.scripts), path
            for script in page.scripts:
                static = operator.get(str(script["src"]))
                assert static.status_code == 200 and static.headers["content-type"].startswith("text/javascript")
                assert (
                    operator.get(str(script["src"]), headers={"if-none-match": static.headers["etag"]}).status_code
                    == 304
                )
            assert "http://" not in answer.text and "https://" not in answer.text  # nothing from elsewhere
        assert operator.get("/console/static/../app.py").status_code == 404


def test_the_console_can_be_switched_off(cluster: Cluster, tmp_path: Path) -> None:
    sim = cluster.sim()
    config = tmp_path / "off.yaml"
    config.write_text("router:\n  console:\n    enabled: false\n")
    router = cluster.router(sim, flags=("--keys-file", str(console_keys(tmp_path)), "--config", str(config)), auth=True)
    assert httpx.get(router.url + "/console/signin", timeout=5).status_code == 404
    assert httpx.post(router.url + "/console/signin", data={"key": VIEWER}, timeout=5).status_code == 404
    chat = httpx.post(
        router.url + "/v1/chat/completions", json=image_chat(MODEL, png_data_url()), headers={"cookie": "qvl_console=x"}
    )
    assert error(chat) == (401, "authentication_error", "missing_api_key")


def test_rollout_actions_are_for_operators_with_the_csrf_token(router: Proc) -> None:
    body = {"model": MODEL}
    viewer, csrf = sign_in(router.url, VIEWER)
    with closing(viewer):
        answer = viewer.post("/console/api/rollouts/pause", json=body, headers={"x-csrf-token": csrf})
        assert error(answer) == (403, "permission_denied", "operator_only")
    operator, csrf = sign_in(router.url, OPERATOR)
    with closing(operator):
        assert error(operator.post("/console/api/rollouts/pause", json=body)) == (
            403,
            "permission_denied",
            "csrf_token_invalid",
        )
        headers = {"x-csrf-token": csrf}
        assert error(operator.post("/console/api/rollouts/promote", json=body, headers=headers))[2] == "unknown_path"
        assert error(operator.post("/console/api/rollouts/abort", json={}, headers=headers))[2] == "invalid_rollout"
        answer = operator.post("/console/api/rollouts/abort", json=body, headers=headers)
        assert error(answer) == (404, "not_found", "rollout_not_found")
        panel = operator.get("/console/api/operations").json()["rollouts"]
        assert panel == {"data": [], "error": None}
        assert 'id="rollouts-note"' in operator.get("/console/operations").text


VERSIONED = "qwen3-vl-8b"


def _versioned_sim(cluster: Cluster, tmp: Path, version: str) -> Proc:
    config = tmp / f"sim-{version}.yaml"
    config.write_text(
        f'sim: {{model: {VERSIONED}, aliases: ["{VERSIONED}@{version}"], step_base_ms: 5, output_tokens: 4}}\n'
    )
    return cluster.start("sim", "--config", str(config))


def test_the_rollout_panel_shows_a_real_rollout_and_operators_pause_resume_and_abort_it(
    cluster: Cluster, tmp_path: Path, redis_server: RedisServer
) -> None:
    config = tmp_path / f"router-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text(
        f"""router:
  routes: {{{VERSIONED}: {{versions: {{v1: 100}}}}}}
  rollout: {{store: "{redis_server.url}", interval_s: 0.2, poll_interval_s: 0.1, min_samples: 20}}
  batch: {{enabled: false}}
"""
    )
    sims = [_versioned_sim(cluster, tmp_path, v) for v in ("v1", "v2")]
    router = cluster.router(
        *sims, flags=("--keys-file", str(console_keys(tmp_path)), "--config", str(config)), auth=True
    )
    start = {"model": VERSIONED, "to": "v2", "steps": [25, 100], "min_requests": 10**6, "min_duration_s": 3600}
    bearer = {"authorization": f"Bearer {OPERATOR}"}
    started = httpx.post(router.url + "/v1/rollouts/start", json=start, headers=bearer, timeout=10)
    assert started.status_code == 200, started.text
    operator, csrf = sign_in(router.url, OPERATOR)
    with closing(operator):

        def row(until: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
            """The panel's one row once `until` holds of it (or after 10 s, for the asserts to say why)."""
            deadline = time.monotonic() + 10
            while True:
                panel = operator.get("/console/api/operations").json()["rollouts"]
                assert panel["error"] is None
                (found,) = panel["data"]
                if until(found) or time.monotonic() > deadline:
                    return found
                time.sleep(0.1)

        running = row(lambda r: r["analysis"] is not None and r["applied_here"] == r["route"])
        assert (running["model"], running["baseline"], running["target"]) == (VERSIONED, "v1", "v2")
        assert (running["status"], running["step_percent"], running["steps"]) == ("running", 25.0, [25.0, 100.0])
        assert running["applied_here"] == [{"version": "v2", "percent": 25.0}, {"version": "v1", "percent": 75.0}]
        assert running["analysis"]["decision"] == "hold" and running["reason"]
        assert running["actions"] == ["pause", "abort"]

        headers = {"x-csrf-token": csrf}
        for action, status in (("pause", "paused"), ("resume", "running"), ("abort", "aborted")):
            answer = operator.post(f"/console/api/rollouts/{action}", json={"model": VERSIONED}, headers=headers)
            assert answer.status_code == 200, answer.text
            assert answer.json()["status"] == status and "by operator" in answer.json()["reason"]
        ended = row(lambda r: r["applied_here"] == r["route"])
        assert ended["status"] == "aborted" and ended["actions"] == []
        assert ended["applied_here"] == [{"version": "v2", "percent": 0.0}, {"version": "v1", "percent": 100.0}]
        again = operator.post("/console/api/rollouts/pause", json={"model": VERSIONED}, headers=headers)
        assert error(again) == (409, "conflict", "rollout_ended")
    metrics = httpx.get(router.url + "/metrics", timeout=5).text
    for decision in ("pause", "resume", "abort"):
        labels = f'by="operator",cause="operator",decision="{decision}",model="{VERSIONED}"'
        assert f"qvl_rollout_decisions_total{{{labels}}} 1.0" in metrics
