"""The install extras in pyproject.toml: `flexwrangle[engine]` pulls no orchestration, validation or web
server, and every package imports only what its extras install."""
from __future__ import annotations

import ast
import sys
from importlib import metadata
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parent.parent
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
NAME = PROJECT["name"]
NOT_IN_ENGINE = {"prefect", "great-expectations", "fastapi", "uvicorn"}
IMPORT_NAMES = {"great-expectations": "great_expectations"}     # where a module is not named as its distribution


def _name(requirement: str) -> str:
    """The distribution a requirement string names, normalised: 'sqlalchemy[asyncio]>=2' -> 'sqlalchemy'."""
    for stop in "[<>=!~; ":
        requirement = requirement.split(stop)[0]
    return requirement.strip().lower().replace("_", "-")


def _extras(requirement: str) -> list[str]:
    """The extras of a requirement on this project itself: 'flexwrangle[engine,flows]' -> ['engine', 'flows']."""
    inside = requirement.partition("[")[2].partition("]")[0]
    return [e.strip() for e in inside.split(",") if e.strip()]


def distributions(*extras: str) -> set[str]:
    """The distributions the base dependencies and these extras name, this project's own extras expanded."""
    out, todo, seen = set(), list(extras), set()
    for req in PROJECT["dependencies"]:
        out.add(_name(req))
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for req in PROJECT["optional-dependencies"][extra]:
            if _name(req) == NAME:
                todo += _extras(req)
            else:
                out.add(_name(req))
    return out


def third_party_imports(package: str) -> set[str]:
    """Top-level modules imported anywhere in `package` (lazy imports too), minus the standard library,
    relative imports and the project's own packages."""
    own = {"engine", "wrangling_tasks", "flows", "benchmarks"}
    mods = set()
    for path in (REPO / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                mods |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                mods.add(node.module.split(".")[0])
    return {m for m in mods if m not in sys.stdlib_module_names and m not in own}


def _modules(dists: set[str]) -> set[str]:
    return {IMPORT_NAMES.get(d, d.replace("-", "_")) for d in dists}


def test_the_engine_extra_names_no_orchestration_validation_or_web_server():
    assert not distributions("engine") & NOT_IN_ENGINE


def test_the_engine_extra_pulls_none_of_them_through_its_dependencies_either():
    """Walks the installed distributions' own requirements (markers evaluated, no extras)."""
    requirements = pytest.importorskip("packaging.requirements")
    seen, todo = set(), sorted(distributions("engine"))
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in reqs:
            req = requirements.Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name.lower().replace("_", "-"))
    assert not seen & NOT_IN_ENGINE, sorted(seen & NOT_IN_ENGINE)


def test_the_engine_imports_only_what_the_engine_extra_installs():
    assert third_party_imports("engine") <= _modules(distributions("engine"))


@pytest.mark.parametrize("package", ["wrangling_tasks", "flows"])
def test_wrangling_and_flows_import_only_what_the_flows_extra_installs(package):
    assert third_party_imports(package) <= _modules(distributions("flows"))


def test_the_benchmarks_import_only_what_all_installs():
    """llama_cpp is never a dependency: its runs use a python of their own (benchmarks/README.md)."""
    assert third_party_imports("benchmarks") - {"llama_cpp"} <= _modules(distributions("all"))


def test_all_is_every_other_extra_but_test():
    others = set(PROJECT["optional-dependencies"]) - {"all", "test"}
    assert distributions("all") == distributions(*others)
