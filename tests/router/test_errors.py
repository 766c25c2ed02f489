"""The one error path: every error answer of the router has the OpenAI shape and its status, with
Retry-After where it applies; the codes are one closed set, and the README's table and the OpenAPI
document agree with it both ways.

The router is `create_app(settings)` behind httpx's ASGITransport, its lifespan run by hand; its one
replica listens nowhere, so no replica is ever healthy.
"""

from __future__ import annotations

import ast
import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, get_args

import httpx
import orjson
import pytest
from fastapi import FastAPI
from support import ROOT

from qvl.procs import free_port
from qvl.settings import Settings
from router.app import create_app
from router.errors import (
    CODES,
    ErrorCode,
    InvalidRequest,
    RouterError,
    StreamInterrupted,
    error_answer,
    error_code,
    sse_error_event,
)
from router.openapi import _MEANING

KEY = "sk-errors-0123456789abcdef"
INTERVAL_S = 2.5
"""router.health.interval_s: what /ready's Retry-After says (rounded up)."""


def settings(**router: Any) -> Settings:
    return Settings.model_validate(
        {
            "api_keys": KEY,
            "router": {
                "replicas": [f"http://127.0.0.1:{free_port()}"],
                "health": {"interval_s": INTERVAL_S, "timeout_s": 0.2},
                **router,
            },
        }
    )


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://router") as client:
            yield client


def run(app: FastAPI, calls: Callable[[httpx.AsyncClient], Awaitable[list[httpx.Response]]]) -> list[httpx.Response]:
    async def main() -> list[httpx.Response]:
        async with serving(app) as client:
            return await calls(client)

    return asyncio.run(main())


def error_of(response: httpx.Response, status: int, type_: str, code: str | None) -> dict[str, Any]:
    """The error object of `response`, after checking its status, content type and OpenAI shape."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    doc = response.json()
    assert list(doc) == ["error"]
    error: dict[str, Any] = doc["error"]
    assert list(error) == ["message", "type", "param", "code"]
    assert isinstance(error["message"], str) and error["message"]
    assert (error["type"], error["code"]) == (type_, code)
    return error


# Live answers.


def test_unknown_paths_wrong_methods_and_an_unready_router_answer_in_the_openai_shape() -> None:
    app = create_app(settings())
    auth = {"Authorization": f"Bearer {KEY}"}

    async def calls(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [
            await client.get("/v1/nothing-here"),
            await client.delete("/health"),
            await client.get("/v1/chat/completions"),
            await client.get("/ready"),
            await client.get("/v1/models"),
            await client.post("/v1/chat/completions", content=b"{not json", headers=auth),
            await client.post("/v1/chat/completions", json={"model": "m", "messages": []}),
        ]

    unknown, wrong_method, chat_get, ready, models, bad_json, no_key = run(app, calls)
    error_of(unknown, 404, "not_found", "unknown_path")
    error_of(wrong_method, 405, "method_not_allowed", "method_not_allowed")
    assert wrong_method.headers["allow"] == "GET"
    error_of(chat_get, 405, "method_not_allowed", "method_not_allowed")
    assert chat_get.headers["allow"] == "POST"
    error_of(ready, 503, "no_healthy_replica", "no_healthy_replica")
    assert ready.headers["retry-after"] == "3"
    error_of(models, 401, "authentication_error", "missing_api_key")
    assert error_of(bad_json, 400, "invalid_request_error", "invalid_json")["param"] is None
    assert bad_json.headers["x-request-id"]
    error_of(no_key, 401, "authentication_error", "missing_api_key")
    for response in (unknown, wrong_method, chat_get, models, bad_json, no_key):
        assert "retry-after" not in response.headers


def test_parameters_that_do_not_validate_get_400_not_fastapis_422() -> None:
    app = create_app(settings())

    @app.get("/probe")
    async def probe(n: int) -> dict[str, int]:
        return {"n": n}

    async def calls(client: httpx.AsyncClient) -> list[httpx.Response]:
        return [await client.get("/probe", params={"n": "many"}), await client.get("/probe")]

    not_a_number, missing = run(app, calls)
    assert error_of(not_a_number, 400, "invalid_request_error", "invalid_parameters")["param"] == "n"
    assert error_of(missing, 400, "invalid_request_error", "invalid_parameters")["param"] == "n"
    responses = app.openapi()["paths"]["/probe"]["get"]["responses"]
    assert "422" not in responses
    assert responses["400"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorResponse"}
    assert "HTTPValidationError" not in app.openapi()["components"]["schemas"]


def test_a_bug_is_a_500_in_the_same_shape_on_a_route_and_on_the_chat_path() -> None:
    app = create_app(settings(auth={"enabled": False}))

    @app.get("/broken")
    async def broken() -> None:
        raise RuntimeError("secret internal detail")

    class BrokenKeys:
        def authenticate(self, header: bytes | None) -> None:
            raise RuntimeError("secret internal detail")

    async def calls(client: httpx.AsyncClient) -> list[httpx.Response]:
        route = await client.get("/broken")
        app.state.qvl.keys = BrokenKeys()
        chat = await client.post("/v1/chat/completions", json={"model": "m", "messages": []})
        return [route, chat]

    for response in run(app, calls):
        error = error_of(response, 500, "internal_error", "internal_error")
        assert "secret" not in error["message"]


def test_answers_carry_retry_after_in_whole_seconds_when_set() -> None:
    answer = error_answer(RouterError("x", retry_after_s=0.2))
    assert (b"retry-after", b"1") in answer.headers and answer.status == 500
    assert dict(error_answer(InvalidRequest("x")).headers) == {b"content-type": b"application/json"}


def test_a_stream_ends_with_one_error_event_then_done() -> None:
    event = sse_error_event(StreamInterrupted("replica failed mid-stream", code="stream_interrupted"))
    first, done, rest = event.split(b"\n\n")
    assert first.startswith(b"data: ") and done == b"data: [DONE]" and rest == b""
    error = orjson.loads(first[6:])["error"]
    assert (error["type"], error["code"], error["param"]) == ("stream_interrupted", "stream_interrupted", None)


# The closed set of codes, and the documents that list them.


def test_every_code_belongs_to_exactly_one_class_and_every_class_is_described() -> None:
    assert list(CODES) == list(get_args(ErrorCode))
    assert set(_MEANING) == set(CODES.values())
    assert error_code("queue_full") == "queue_full"
    with pytest.raises(ValueError):
        error_code("no_such_code")


def raised_codes() -> list[tuple[str, str, str]]:
    """(where, class name, code) of every `SomeError(..., code="literal")` in router/."""
    found = []
    for path in sorted((ROOT / "router").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                for keyword in node.keywords:
                    if keyword.arg == "code" and isinstance(keyword.value, ast.Constant):
                        found.append((f"{path.name}:{node.lineno}", node.func.id, str(keyword.value.value)))
    return found


def test_each_code_is_raised_by_its_own_class() -> None:
    found = raised_codes()
    assert len(found) > 30
    classes = {cls.__name__: cls for cls in CODES.values()}
    wrong = [
        (where, name, code)
        for where, name, code in found
        if name in classes and CODES[error_code(code)] is not classes[name]
    ]
    assert wrong == []


def readme_table() -> list[tuple[int, str, list[str]]]:
    """(status, type, codes) of each row of the README's errors table."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Errors\n") :]
    section = section[: section.index("\n## ")]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        if not line.startswith("|") or not cells[0][:3].isdigit():
            continue
        rows.append((int(cells[0][:3]), cells[1].strip("`"), re.findall(r"`([a-z_]+)`", cells[2])))
    return rows


def test_the_readme_errors_table_lists_every_code_and_no_other() -> None:
    rows = readme_table()
    listed = [code for _, _, codes in rows for code in codes]
    assert sorted(listed) == sorted(CODES), "README.md's errors table and router/errors.py's ErrorCode differ"
    for status, type_, codes in rows:
        for code in codes:
            cls = CODES[error_code(code)]
            assert (cls.status, cls.type) == (status, type_), f"README row of {code}"


def test_the_openapi_document_describes_every_code_and_no_other() -> None:
    document = create_app(settings()).openapi()
    described: dict[str, set[str]] = {}
    for item in document["paths"].values():
        for operation in item.values():
            for status, response in operation.get("responses", {}).items():
                for codes in re.findall(r"\(`code`: ([a-z_, ]+)\)", response.get("description", "")):
                    for code in codes.split(", "):
                        described.setdefault(code, set()).add(status)
                        if status in ("429", "503"):
                            assert "Retry-After" in response["headers"]
    # Unknown paths and methods and bugs belong to no single operation; `invalid_parameters` replaces the 422
    # of the routes that take parameters (GET /v1/batches' `limit`).
    assert set(described) == set(CODES) - {"unknown_path", "method_not_allowed", "internal_error"}
    for code, statuses in described.items():
        assert statuses == {str(CODES[error_code(code)].status)}, code
