"""The README stays true: its opening gives the two commands, and it documents every setting."""

from conftest import ROOT
from pydantic import BaseModel

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


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [p for p in setting_paths(Settings) if f"| `{p}` |" not in readme]
    assert missing == []
