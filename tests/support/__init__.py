"""Helpers that tests import as a normal package (`from support.polling import wait_for`): pyproject's
pytest settings put tests/ on the import path. Fixtures stay in conftest.py; nothing is imported from it."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
"""The repository root (where pyproject.toml is)."""
