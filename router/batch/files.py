"""Files of the OpenAI files API, in one directory: `<id>.data` holds the bytes, `<id>.json` the file object
and its owner. Writes go to a temporary name first and are renamed into place, so a reader (another router
on the same volume) never sees half a file. A file belongs to the API key id that uploaded it (or, for
results, that created the batch); the API answers 404 to every other key.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

_ID = re.compile(r"^file-[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True, slots=True)
class StoredFile:
    id: str
    owner: str
    filename: str
    purpose: str
    bytes: int
    created_at: int

    def to_json(self) -> dict[str, object]:
        """The OpenAI file object."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }


def new_file_id() -> str:
    return "file-" + secrets.token_hex(12)


class FileStore:
    """Files in `folder`; blocking file I/O runs in a worker thread, never on the event loop."""

    def __init__(self, folder: Path) -> None:
        self._folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    async def put(
        self, data: bytes, *, owner: str, filename: str, purpose: str, file_id: str | None = None
    ) -> StoredFile:
        """Store `data` as a new file, or under `file_id`, replacing it (a job resumed by another router
        writes its result files again, under the same ids)."""
        stored = StoredFile(
            file_id or new_file_id(), owner, filename[:255] or "upload.jsonl", purpose, len(data), int(time.time())
        )
        await asyncio.to_thread(self._write, stored, data)
        return stored

    async def get(self, file_id: str, owner: str) -> StoredFile | None:
        """The file object when it exists and belongs to `owner`."""
        if not _ID.match(file_id):
            return None
        try:
            meta = await asyncio.to_thread((self._folder / f"{file_id}.json").read_bytes)
        except FileNotFoundError:
            return None
        stored = StoredFile(**orjson.loads(meta))
        return stored if stored.owner == owner else None

    async def content(self, stored: StoredFile) -> bytes:
        return await asyncio.to_thread((self._folder / f"{stored.id}.data").read_bytes)

    async def delete(self, stored: StoredFile) -> None:
        def remove() -> None:
            # The object first: once it is gone the file is gone for every reader, whatever happens next.
            (self._folder / f"{stored.id}.json").unlink(missing_ok=True)
            (self._folder / f"{stored.id}.data").unlink(missing_ok=True)

        await asyncio.to_thread(remove)

    def _write(self, stored: StoredFile, data: bytes) -> None:
        meta = orjson.dumps(
            {
                "id": stored.id,
                "owner": stored.owner,
                "filename": stored.filename,
                "purpose": stored.purpose,
                "bytes": stored.bytes,
                "created_at": stored.created_at,
            }
        )
        # Data before the object: a file is visible only once its bytes are complete.
        for suffix, body in ((".data", data), (".json", meta)):
            final = self._folder / f"{stored.id}{suffix}"
            tmp = final.with_name(f".{final.name}.{secrets.token_hex(4)}.tmp")
            with tmp.open("wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(final)
