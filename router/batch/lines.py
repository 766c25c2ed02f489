"""A batch input file, line by line: its structure (JSON lines of `{custom_id, method, url, body}`) and each
line's body, checked by the edge's own checks (router/edge.py) and the owner's model permissions, as an
interactive request would be. Lines that fail go to the error file with their line number and reason; the
rest run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

import orjson

from qvl.settings import FetchSettings, LimitSettings
from router.auth import ApiKey, KeyRing
from router.edge import parse_chat_request, parse_json_object
from router.errors import InvalidRequest, RouterError
from router.fetch import inline_remote_images

ENDPOINT = "/v1/chat/completions"
MAX_CUSTOM_ID = 512
_CHUNK = 200
"""Lines checked between yields to the event loop: a big file never stalls the router's other requests."""


@dataclass(frozen=True, slots=True)
class Line:
    number: int
    """1-based line number in the input file."""
    custom_id: str
    body: bytes


@dataclass(frozen=True, slots=True)
class LineError:
    number: int
    custom_id: str
    code: str
    message: str


class FileError(Exception):
    """The file as a whole cannot be a batch (not JSON lines, too many lines): the batch fails."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


def read_lines(data: bytes, max_lines: int) -> Iterator[Line | LineError]:
    """Each non-empty line: a Line when its shape is right (its body still unchecked), else a LineError.
    Raises FileError when the file is not UTF-8, has too many lines or repeats a custom_id."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise FileError("the file is not UTF-8 text (JSON lines)") from None
    seen: set[str] = set()
    count = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        count += 1
        if count > max_lines:
            raise FileError(f"the file has more than {max_lines} lines (router.batch.max_lines)", number)
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError:
            yield LineError(number, "", "invalid_json", "the line is not a JSON object")
            continue
        custom_id = doc.get("custom_id") if isinstance(doc, dict) else None
        if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID:
            yield LineError(number, "", "invalid_custom_id", f"custom_id must be 1-{MAX_CUSTOM_ID} characters")
            continue
        if custom_id in seen:
            raise FileError(f"custom_id '{custom_id[:64]}' appears more than once", number)
        seen.add(custom_id)
        assert isinstance(doc, dict)
        if doc.get("method") != "POST" or doc.get("url") != ENDPOINT:
            yield LineError(number, custom_id, "invalid_url", f"each line must be a POST to {ENDPOINT}")
            continue
        body = doc.get("body")
        if not isinstance(body, dict):
            yield LineError(number, custom_id, "invalid_body", "body must be a JSON object")
            continue
        yield Line(number, custom_id, orjson.dumps(body))
    if count == 0:
        raise FileError("the file holds no lines")


async def check_line(line: Line, key: ApiKey, limits: LimitSettings, fetch: FetchSettings) -> LineError | None:
    """The edge's checks of the line's body, and whether its key may use the model; None when it passes.
    With `fetch` on, remote images are fetched (and checked) here, as the chat path will fetch them again."""
    try:
        body = line.body
        if fetch.enabled:
            inlined = await inline_remote_images(parse_json_object(body), fetch, limits)
            body = inlined if inlined is not None else body
        request = parse_chat_request(body, None, limits)
        if request.stream:
            raise InvalidRequest("batch lines cannot stream: leave out `stream`", param="stream")
        KeyRing.authorize(key, request.model)
    except RouterError as exc:
        return LineError(line.number, line.custom_id, exc.code or exc.type, exc.message)
    return None


async def validate(
    data: bytes, key: ApiKey, limits: LimitSettings, fetch: FetchSettings, max_lines: int
) -> tuple[list[Line], list[LineError]]:
    """Every line of an input file checked: (lines to run, lines refused). Raises FileError."""
    good: list[Line] = []
    bad: list[LineError] = []
    for i, item in enumerate(read_lines(data, max_lines)):
        if isinstance(item, LineError):
            bad.append(item)
        elif (error := await check_line(item, key, limits, fetch)) is not None:
            bad.append(error)
        else:
            good.append(item)
        if i % _CHUNK == _CHUNK - 1:
            await asyncio.sleep(0)
    return good, bad
