"""The console's test setup: a keys file with a viewer and an operator, and signing in over plain HTTP."""

from __future__ import annotations

from pathlib import Path

import httpx

VIEWER = "sk-console-viewer-0123456789"
OPERATOR = "sk-console-operator-987654321"


def console_keys(tmp_path: Path) -> Path:
    """A keys file with `viewer` (the default role) and `operator`."""
    path = tmp_path / "console-keys.yaml"
    path.write_text(
        f"""keys:
  - id: viewer
    key: {VIEWER}
  - id: operator
    key: {OPERATOR}
    role: operator
"""
    )
    return path


def sign_in(url: str, key: str) -> tuple[httpx.Client, str]:
    """A client holding the console session cookie of `key`, and the session's CSRF token (read from the
    playground page, as its script reads it)."""
    client = httpx.Client(base_url=url, timeout=10)
    answer = client.post("/console/signin", data={"key": key})
    assert answer.status_code == 303, answer.text
    page = client.get("/console/playground")
    assert page.status_code == 200
    marker = 'name="qvl-csrf" content="'
    start = page.text.index(marker) + len(marker)
    return client, page.text[start : page.text.index('"', start)]
