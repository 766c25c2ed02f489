"""Schemathesis against a live router's /openapi.json: requests generated from the schema, valid and
invalid, never get a 5xx, and every error is the OpenAI-style object. Once with auth off, once with a key.

A real `qvl sim` answers whatever gets past the edge. Cases come from `operation.as_strategy()` under a
plain `@given`: `schemathesis.pytest.from_fixture` (needed because the router is a fixture) reads the
private `Function._nodeid`, which pytest 9.2 removed. Half the generated chat bodies get the served
model's name, or nearly every valid request would stop at `model_not_found`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import httpx
import hypothesis
import hypothesis.strategies as st
import pytest
import schemathesis
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)
from support.chat import image_chat, png_data_url
from support.servers import Cluster, Proc

from router.openapi import CHAT_PATH

MODEL = "qwen3-vl-sim"
KEY = "sk-schemathesis-0123456789abcdef"
SEED = 20240611
CHAT_EXAMPLES = 150
"""Hypothesis examples for POST /v1/chat/completions; each GET endpoint gets OTHER_EXAMPLES."""
OTHER_EXAMPLES = 10
MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
CHAT_CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
"""router/openapi.py is written by hand: every chat answer must match what it documents. FastAPI's own routes
get only `not_a_server_error` (their generated entries say JSON where /metrics answers text)."""


@dataclass
class LiveRouter:
    proc: Proc
    auth: bool
    console_cookie: str = ""
    """The console's session cookie, signed in with the key: its /console/api/* operations need it."""

    @property
    def headers(self) -> dict[str, str]:
        cookie = {"Cookie": self.console_cookie} if self.console_cookie else {}
        return {"Authorization": f"Bearer {KEY}", **cookie} if self.auth else cookie


@pytest.fixture(params=[False, True], ids=["auth-off", "auth-on"])
def live_router(request: pytest.FixtureRequest, cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> LiveRouter:
    auth: bool = request.param
    sim = cluster.sim("--zero-delay", "--output-tokens", "8", model=MODEL)
    if auth:
        monkeypatch.setenv("QVL_API_KEYS", KEY)
    proc = cluster.router(sim, auth=auth)
    signed_in = httpx.post(proc.url + "/console/signin", data={"key": KEY if auth else ""}, timeout=10)
    assert signed_in.status_code == 303, signed_in.text
    return LiveRouter(proc, auth, signed_in.headers["set-cookie"].split(";", 1)[0])


@pytest.fixture
def router_api(live_router: LiveRouter) -> schemathesis.BaseSchema:
    """The schema as the router publishes it, fetched without a key."""
    # Unsanitized: a failure's curl command must show `max_tokens` and the key, not "[Filtered]".
    config = schemathesis.Config.from_dict({"seed": SEED, "output": {"sanitization": {"enabled": False}}})
    return schemathesis.openapi.from_url(live_router.proc.url + "/openapi.json", config=config, timeout=10)


def test_generated_requests_get_no_5xx_and_openai_errors(
    router_api: schemathesis.BaseSchema, live_router: LiveRouter
) -> None:
    """Schemathesis' coverage cases (each constraint's boundaries and violations, deterministic), then
    Hypothesis-generated cases, positive and negative, for every operation."""
    statuses: Counter[tuple[str, int]] = Counter()
    operations = [result.ok() for result in router_api.get_all_operations()]
    assert {op.label for op in operations} >= {f"POST {CHAT_PATH}", "GET /v1/models", "GET /v1/cluster"}
    for operation in operations:
        for case in router_api.iter_coverage_cases(
            operation,
            generation_modes=list(MODES),
            generation_config=router_api.config.generation_for(operation=operation, phase="coverage"),
        ):
            statuses[exercise(case, live_router)] += 1

        @hypothesis.seed(SEED)
        @hypothesis.settings(
            max_examples=CHAT_EXAMPLES if operation.path == CHAT_PATH else OTHER_EXAMPLES,
            database=None,
            deadline=None,
            suppress_health_check=[hypothesis.HealthCheck.too_slow, hypothesis.HealthCheck.data_too_large],
        )
        @hypothesis.given(case=st.one_of([operation.as_strategy(mode) for mode in MODES]), real_model=st.booleans())
        def fuzz(case: schemathesis.Case, real_model: bool) -> None:
            if real_model and case.operation.path == CHAT_PATH and isinstance(case.body, dict):
                case.body = {**case.body, "model": MODEL}
            statuses[exercise(case, live_router)] += 1

        fuzz()
    # The chat operation both refused bad requests and answered good ones.
    assert statuses[(f"POST {CHAT_PATH}", 200)] > 0 and statuses[(f"POST {CHAT_PATH}", 400)] > 0, statuses


def exercise(case: schemathesis.Case, live_router: LiveRouter) -> tuple[str, int]:
    """Send `case` (with the key when auth is on) and check the answer; returns (method and path, status)."""
    response = case.call(headers=live_router.headers, timeout=15)
    if response.status_code >= 500:
        raise AssertionError(
            f"{response.status_code} {response.text[:500]}\nrequest: {case.as_curl_command(live_router.headers)}\n"
            f"router log (tail):\n{live_router.proc.output()[-6000:]}"
        )
    documented = case.operation.path == CHAT_PATH and case.method.upper() == "POST"
    case.validate_response(response, checks=CHAT_CHECKS if documented else [not_a_server_error])
    if response.status_code >= 400:
        assert_openai_error(response)
    # The key goes with every case: a 401 would mean it was lost and nothing got past auth.
    assert not (live_router.auth and response.status_code == 401), response.text
    return f"{case.method} {case.path}", response.status_code


def test_valid_images_are_answered(router_api: schemathesis.BaseSchema, live_router: LiveRouter) -> None:
    """The happy path the generator rarely finds: real PNG data URLs, JSON and streamed, sent as cases of
    the schema's own operation (so the request is what the schema describes)."""
    operation = router_api[CHAT_PATH]["POST"]
    bodies: list[dict[str, object]] = [
        image_chat(MODEL, png_data_url()),
        image_chat(MODEL, png_data_url((10, 200, 30), (32, 32)), max_tokens=4, temperature=0.5, seed=7),
        image_chat(MODEL, png_data_url((10, 20, 230)), stream=True, stream_options={"include_usage": True}),
        image_chat(MODEL, png_data_url(), "and now?", n=2, top_p=0.9, stop=["\n"], user="u-1"),
    ]
    for body in bodies:
        case = operation.Case(body=body, media_type="application/json", headers=live_router.headers)
        response = case.call(timeout=15)
        case.validate_response(response, checks=CHAT_CHECKS)
        assert response.status_code == 200, response.text
        if body.get("stream"):
            assert response.headers["content-type"][0].startswith("text/event-stream")
            assert response.text.endswith("data: [DONE]\n\n")
        else:
            assert response.json()["object"] == "chat.completion"


def test_openapi_is_public_and_describes_chat(live_router: LiveRouter) -> None:
    response = httpx.get(live_router.proc.url + "/openapi.json", timeout=10)
    assert response.status_code == 200
    doc = response.json()
    assert set(doc["paths"]) >= {"/health", "/ready", "/metrics", "/v1/models", "/v1/cluster", CHAT_PATH}
    responses = doc["paths"][CHAT_PATH]["post"]["responses"]
    assert set(responses) == {"200", "400", "401", "403", "404", "413", "429", "502", "503", "504"}
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"


def assert_openai_error(response: schemathesis.Response) -> None:
    assert response.headers["content-type"][0].startswith("application/json"), response.headers
    body = response.json()
    assert isinstance(body, dict) and isinstance(body.get("error"), dict), body
    assert isinstance(body["error"].get("type"), str) and isinstance(body["error"].get("message"), str), body
