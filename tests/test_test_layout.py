"""How the tests are laid out: helpers come from tests/support (never from conftest.py, which holds only
fixtures), and GPU-only tests live in tests/gpu behind the `gpu` marker."""

from __future__ import annotations

import ast
from pathlib import Path

from support import ROOT

TESTS = ROOT / "tests"


def python_files() -> list[Path]:
    return sorted(TESTS.rglob("*.py"))


def imports_conftest(tree: ast.Module) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "conftest":
            return True
        if isinstance(node, ast.Import) and any(alias.name == "conftest" for alias in node.names):
            return True
    return False


def marks_gpu(text: str) -> bool:
    return "pytest.mark.gpu" in text


def test_no_test_imports_from_conftest() -> None:
    offenders = [p.relative_to(ROOT) for p in python_files() if imports_conftest(ast.parse(p.read_text()))]
    assert not offenders, f"import helpers from tests/support, not conftest: {offenders}"


def test_gpu_tests_live_in_tests_gpu_and_are_marked() -> None:
    gpu_dir = TESTS / "gpu"
    gpu_files = [p for p in python_files() if p.name.startswith("test_") and gpu_dir in p.parents]
    assert gpu_files, "tests/gpu holds no tests"
    unmarked = [p.relative_to(ROOT) for p in gpu_files if not marks_gpu(p.read_text())]
    assert not unmarked, f"tests in tests/gpu need the gpu marker: {unmarked}"
    this_file = Path(__file__).resolve()
    elsewhere = [
        p.relative_to(ROOT)
        for p in python_files()
        if marks_gpu(p.read_text()) and gpu_dir not in p.parents and p != this_file
    ]
    assert not elsewhere, f"gpu-marked tests belong in tests/gpu: {elsewhere}"
