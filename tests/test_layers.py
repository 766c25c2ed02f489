"""Imports point down the layers of ARCHITECTURE.md: a lower layer never imports a higher one.

1 base     qvl/ modules that know no other package (settings, data URLs, images, process helpers)
2 middle   cache/ and serving/, each on the base only (neither imports the other)
3 router   router/, on the base, cache/ and the registry client (serving.registry) only
4 top      the command line and launchers (qvl.cli, qvl.demo), loadtests/, tools/, autoscale/

Every import counts, also those inside functions and under TYPE_CHECKING: a lazy import is still a
dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from support import ROOT

PACKAGES = ("qvl", "cache", "serving", "router", "loadtests", "tools", "autoscale")
TOP_IN_QVL = ("qvl.cli", "qvl.demo", "qvl.__main__")
# What each part may import besides itself (module prefixes; "base" is every base module of qvl/).
MAY_USE = {
    "base": ("base",),
    "cache": ("base",),
    "serving": ("base",),
    "router": ("base", "cache", "serving.registry"),
    "top": ("base", "cache", "serving", "router", "top"),
}


def part(module: str) -> str:
    """The part of the system a first-party module belongs to: base, cache, serving, router or top."""
    package = module.split(".")[0]
    if package == "qvl":
        top = any(module == name or module.startswith(name + ".") for name in TOP_IN_QVL)
        return "top" if top else "base"
    return package if package in ("cache", "serving", "router") else "top"


def allowed(importer: str, imported: str) -> bool:
    """Whether module `importer` may import module `imported` (both first-party)."""
    source, target = part(importer), part(imported)
    if source == target:
        return True
    return any(use == target or imported == use or imported.startswith(use + ".") for use in MAY_USE[source])


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(source: str, importer: str) -> list[tuple[int, str]]:
    """(line, module) of every first-party import in `source`; relative imports resolved against `importer`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = importer.split(".")[: -node.level]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` may name a submodule: count the more specific name.
            names = [f"{base}.{alias.name}" for alias in node.names] if base in PACKAGES else [base]
        else:
            continue
        found += [(node.lineno, name) for name in names if name.split(".")[0] in PACKAGES]
    return found


def violations(source: str, importer: str) -> list[str]:
    return [
        f"{importer}:{line} imports {name} ({part(importer)} -> {part(name)})"
        for line, name in imports(source, importer)
        if not allowed(importer, name)
    ]


def runtime_modules() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py"))


def test_every_package_is_walked() -> None:
    walked = {module_name(p).split(".")[0] for p in runtime_modules()}
    assert walked == set(PACKAGES)
    assert len(runtime_modules()) > 40


def test_imports_point_down_the_layers() -> None:
    found = [v for path in runtime_modules() for v in violations(path.read_text(), module_name(path))]
    assert found == []


@pytest.mark.parametrize(
    ("importer", "source"),
    [
        ("cache.flight", "from router.edge import ChatRequest"),
        ("serving.sim.app", "import router.server"),
        ("serving.ray.cluster", "from cache import keys"),
        ("qvl.settings.router", "from serving.registry import Registry"),
        ("qvl.images", "def f():\n    from qvl.cli import up\n"),
        ("router.app", "from qvl.cli.up import run_up"),
        ("router.app", "from serving.sim.engine import SimEngine"),
    ],
)
def test_an_upward_import_is_found(importer: str, source: str) -> None:
    assert violations(source, importer) != []


@pytest.mark.parametrize(
    ("importer", "source"),
    [
        ("router.app", "from cache.flight import AnswerCache\nfrom serving.registry import Registry"),
        ("qvl.cli.up", "from router.server import uvicorn_config"),
        ("serving.sim.app", "from qvl.images import image_tokens\nfrom . import engine"),
        ("loadtests.traffic", "import router.edge"),
    ],
)
def test_a_downward_import_passes(importer: str, source: str) -> None:
    assert violations(source, importer) == []
