"""The runtime dependencies in pyproject.toml are the ones the service's code imports: a package
only the tests use belongs to the `dev` extra, not in every production image."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import tomllib

from tests.support import REPO_ROOT

RUNTIME_PACKAGES = ("app", "outbox_relay", "payment_service")


def _requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return match[0].lower().replace("-", "_").replace(".", "_")


def _imported_top_level_modules() -> set[str]:
    modules: set[str] = set()
    for package in RUNTIME_PACKAGES:
        for path in (REPO_ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Import):
                    modules.update(alias.name.split(".")[0] for alias in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    modules.add(node.module.split(".")[0])
    return modules


def _distributions_imported() -> set[str]:
    """The distributions (normalised as _requirement_name does) whose modules the service imports:
    a distribution's name is not always its module's (swagger-ui-bundle-v2 is swagger_ui_bundle)."""
    owners = importlib.metadata.packages_distributions()
    imported = _imported_top_level_modules()
    return imported | {
        _requirement_name(dist) for module in imported for dist in owners.get(module, [])
    }


def test_every_runtime_dependency_is_imported_by_the_service() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    runtime = {_requirement_name(r) for r in project["project"]["dependencies"]}

    unused = runtime - _distributions_imported()

    assert unused == set(), f"move to the dev extra (or drop): {sorted(unused)}"
    dev = {_requirement_name(r) for r in project["project"]["optional-dependencies"]["dev"]}
    assert "httpx" in dev, "the tests' HTTP client"
