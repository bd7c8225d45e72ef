"""The installed packages are the exact versions constraints.txt pins (what CI tested), and it pins every dependency
pyproject.toml declares."""
from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin (name==version)"
            pins[_norm(name)] = version
    return pins


def test_every_pinned_package_is_installed_at_its_version():
    wrong = {}
    for name, version in _pins().items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed != version:
            wrong[name] = (version, installed)
    assert not wrong, f"installed versions differ from constraints.txt (pinned, installed): {wrong}; run make"


def test_every_declared_dependency_is_pinned():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"]) + [d for extra in project["optional-dependencies"].values()
                                                for d in extra]
    names = {_norm(re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0]) for dep in declared}
    missing = sorted(names - set(_pins()))
    assert not missing, f"declared in pyproject.toml but not pinned in constraints.txt: {missing}; run make lock"
