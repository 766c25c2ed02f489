"""The batch API's components, built once in the router's lifespan and kept on the router's state."""

from __future__ import annotations

from dataclasses import dataclass

from router.batch.files import FileStore
from router.batch.jobs import JobStore
from router.batch.runner import Runner


@dataclass(slots=True)
class Batches:
    files: FileStore
    jobs: JobStore
    runner: Runner
