"""The README stays true: its opening gives the two commands, and it documents every setting."""

import re

from pydantic import BaseModel
from support import ROOT

from qvl.settings import Settings


def setting_paths(model: type[BaseModel], prefix: str = "") -> list[str]:
    paths = []
    for name, info in model.model_fields.items():
        sub = info.annotation
        if isinstance(sub, type) and issubclass(sub, BaseModel):
            paths += setting_paths(sub, f"{prefix}{name}.")
        else:
            paths.append(prefix + name)
    return paths


def test_readme_opens_with_the_two_commands() -> None:
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:10])
    assert "make demo" in head and "make test" in head


def settings_table(readme: str) -> list[str]:
    """The setting paths in the README's settings table, in order (rows `| `path` | default | meaning |`)."""
    lines = readme.splitlines()
    start = lines.index("| setting | default | meaning |")
    rows = [line for line in lines[start + 2 :] if line.startswith("| `")]
    end = next((i for i, line in enumerate(lines[start + 2 :]) if not line.startswith("| `")), len(rows))
    return [re.match(r"\| `([^`]+)` \|", row).group(1) for row in rows[:end]]  # type: ignore[union-attr]


def test_readme_documents_every_setting_in_tree_order() -> None:
    # Both ways: nothing undocumented, nothing documented that the tree no longer has (a renamed setting).
    assert settings_table((ROOT / "README.md").read_text()) == setting_paths(Settings)
