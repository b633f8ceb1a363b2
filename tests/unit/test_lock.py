"""The lock files agree with pyproject.toml.

Every install (`make install`, `make bench`, the Dockerfile) installs from a lock file in
requirements/ with `pip install --require-hashes`, then the project itself with `--no-deps`, so
what pyproject.toml asks for reaches an install only through `make lock`. These tests fail when
someone changed a dependency in pyproject.toml and did not run `make lock`: a requirement the
lock does not satisfy, or a package in the lock that nothing in pyproject.toml needs any more.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support import REPO_ROOT

PROJECT = "payment-service"
# Which extras each lock holds (besides the runtime dependencies), as the Makefile writes them.
LOCKS: dict[str, tuple[str, ...]] = {
    "requirements/runtime.txt": (),
    "requirements/dev.txt": ("embedded", "dev", "load"),
    "requirements/bench.txt": ("embedded", "dev", "load", "bench"),
}

_PIN = re.compile(r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>[^\s;\\]+)\s*(?P<rest>.*)$")


@dataclass
class Pin:
    name: str  # canonical
    version: str
    marker: str  # "" when the pin holds everywhere
    hashes: int = 0
    via: set[str] = field(default_factory=set)  # canonical names, or PROJECT


def parse_lock(text: str) -> list[Pin]:
    """The pins of a lock file as `make lock` writes it: `name==version ; marker \\`, its
    `--hash=` lines, then `# via` lines naming what needs it."""
    pins: list[Pin] = []
    in_via = False
    for raw in text.splitlines():
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            comment = line.lstrip("#").strip()
            if comment.startswith("via"):
                in_via = True
                comment = comment[len("via") :].strip()
            if in_via and pins and comment and not comment.startswith("-c "):
                pins[-1].via.add(
                    PROJECT if comment.startswith(PROJECT) else canonicalize_name(comment)
                )
            continue
        in_via = False
        if line.startswith("--hash="):
            assert pins, f"a hash before any pin: {raw!r}"
            pins[-1].hashes += 1
            continue
        match = _PIN.match(line)
        assert match, f"not a pinned requirement (name==version): {raw!r}"
        marker = match["rest"].rstrip("\\").strip().removeprefix(";").strip()
        pins.append(Pin(canonicalize_name(match["name"]), match["version"], marker))
    return pins


def requirements(project: dict[str, Any], extras: Iterable[str]) -> list[Requirement]:
    wanted = list(project["dependencies"])
    for extra in extras:
        wanted += project["optional-dependencies"][extra]
    return [Requirement(r) for r in wanted]


def disagreements(project: dict[str, Any], extras: Iterable[str], pins: list[Pin]) -> list[str]:
    """What makes a lock wrong for pyproject's `project` table and these extras (empty: right)."""
    problems = [f"{p.name}=={p.version} has no --hash" for p in pins if p.hashes == 0]
    wanted = requirements(project, extras)
    by_name: dict[str, list[Pin]] = {}
    for pin in pins:
        by_name.setdefault(pin.name, []).append(pin)
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        found = by_name.get(name, [])
        if not found:
            problems.append(f"{requirement} is not in the lock")
        for pin in found:
            if not requirement.specifier.contains(pin.version, prereleases=True):
                problems.append(f"{requirement} is not satisfied by {pin.name}=={pin.version}")
    # Everything pinned is needed: reachable from pyproject's requirements through the lock's
    # own record of who needs what (`# via`).
    needed: set[str] = {canonicalize_name(r.name) for r in wanted}
    grew = True
    while grew:
        grew = False
        for pin in pins:
            if pin.name not in needed and pin.via & needed:
                needed.add(pin.name)
                grew = True
    problems += [
        f"{p.name}=={p.version} is locked but nothing in pyproject.toml needs it"
        for p in pins
        if p.name not in needed
    ]
    return problems


def _project() -> dict[str, Any]:
    document = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    project: dict[str, Any] = document["project"]
    return project


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_the_lock_agrees_with_pyproject(lock: str) -> None:
    pins = parse_lock((REPO_ROOT / lock).read_text(encoding="utf-8"))

    problems = disagreements(_project(), LOCKS[lock], pins)

    assert problems == [], f"{lock} is out of date: run `make lock`:\n" + "\n".join(problems)


def test_every_extra_has_a_lock() -> None:
    """A new extra must be given to one of the locks (Makefile `lock`, and LOCKS here)."""
    extras = set(_project()["optional-dependencies"])
    assert extras == set(LOCKS["requirements/bench.txt"]), extras


# The compose gateway image's lock (deploy/gateway: localstripe alone), written by `make lock` too.
GATEWAY_LOCK = "deploy/gateway/requirements.txt"


def test_one_pin_per_package_across_the_locks() -> None:
    """The image, `make install`, `make bench` and the compose gateway run the same version of
    every package."""
    every = {
        lock: parse_lock((REPO_ROOT / lock).read_text(encoding="utf-8"))
        for lock in (*LOCKS, GATEWAY_LOCK)
    }
    bench = {(p.name, p.version, p.marker) for p in every["requirements/bench.txt"]}
    versions = {(name, version) for name, version, _marker in bench}
    for lock, pins in every.items():
        # The gateway's lock needs some packages on fewer Pythons (a narrower marker).
        differing = [
            f"{p.name}=={p.version}"
            for p in pins
            if (p.name, p.version, p.marker) not in bench
            and (lock != GATEWAY_LOCK or (p.name, p.version) not in versions)
        ]
        assert differing == [], f"{lock} pins other versions than requirements/bench.txt"


def test_the_locks_name_no_index_or_host() -> None:
    """The machine's own pip configuration says where packages come from, never the repository."""
    for lock in (*LOCKS, GATEWAY_LOCK):
        text = (REPO_ROOT / lock).read_text(encoding="utf-8")
        assert not re.search(r"^\s*-", text, re.M) or all(
            line.strip().startswith("--hash=")
            for line in text.splitlines()
            if line.strip().startswith("-")
        ), f"{lock} carries pip options (an index, find-links)"
        assert "://" not in text, f"{lock} names a URL"


def test_every_install_uses_the_locks() -> None:
    makefile = (REPO_ROOT / "Makefile").read_text(encoding="utf-8")
    dockerfile = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8")
    for lock in ("$(LOCK_DEV)", "$(LOCK_BENCH)"):
        assert f"--require-hashes --requirement {lock}" in makefile, lock
    assert "--no-deps --editable ." in makefile
    assert "COPY requirements/runtime.txt ./requirements.txt" in dockerfile
    assert "pip install --require-hashes --requirement requirements.txt" in dockerfile
    assert "pip install --no-deps ." in dockerfile
    gateway = (REPO_ROOT / "deploy" / "gateway" / "Dockerfile").read_text(encoding="utf-8")
    assert "pip install --require-hashes --requirement /tmp/requirements.txt" in gateway


def test_the_gateway_lock_holds_the_embedded_extras_localstripe() -> None:
    embedded = _project()["optional-dependencies"]["embedded"]
    (wanted,) = [r for r in embedded if r.startswith("localstripe")]
    pins = {p.name: p for p in parse_lock((REPO_ROOT / GATEWAY_LOCK).read_text(encoding="utf-8"))}
    assert f"localstripe=={pins['localstripe'].version}" == wanted
    assert all(pin.hashes for pin in pins.values())


# -- the check itself: it finds each kind of disagreement ------------------------------------------
_PROJECT = {
    "dependencies": ["quart>=0.20", "uvloop>=0.21; sys_platform != 'win32'"],
    "optional-dependencies": {"dev": ["pytest>=8.3"]},
}
_LOCK = """\
# This file was autogenerated by uv via the following command:
#    make lock
quart==0.22.0 ; python_full_version < '3.13' \\
    --hash=sha256:aa
    # via payment-service (pyproject.toml)
quart==0.23.1 ; python_full_version >= '3.13' \\
    --hash=sha256:bb
    # via
    #   -c requirements/bench.txt
    #   payment-service (pyproject.toml)
werkzeug==3.1.9 \\
    --hash=sha256:cc
    # via quart
uvloop==0.23.0 ; sys_platform != 'win32' \\
    --hash=sha256:dd
    # via payment-service (pyproject.toml)
"""


def test_the_check_accepts_a_lock_that_agrees() -> None:
    assert disagreements(_PROJECT, (), parse_lock(_LOCK)) == []


def test_the_check_finds_a_requirement_missing_or_unsatisfied() -> None:
    project = {**_PROJECT, "dependencies": ["quart>=0.23", "uvloop", "stripe>=12"]}

    problems = disagreements(project, (), parse_lock(_LOCK))

    assert problems == [
        "quart>=0.23 is not satisfied by quart==0.22.0",
        "stripe>=12 is not in the lock",
    ]
    assert disagreements(_PROJECT, ("dev",), parse_lock(_LOCK)) == [
        "pytest>=8.3 is not in the lock"
    ]


def test_the_check_finds_what_nothing_needs_any_more() -> None:
    project = {**_PROJECT, "dependencies": ["uvloop>=0.21"]}

    problems = disagreements(project, (), parse_lock(_LOCK))

    assert problems == [
        "quart==0.22.0 is locked but nothing in pyproject.toml needs it",
        "quart==0.23.1 is locked but nothing in pyproject.toml needs it",
        "werkzeug==3.1.9 is locked but nothing in pyproject.toml needs it",
    ]


def test_the_check_finds_a_pin_without_hashes() -> None:
    lock = _LOCK.replace("    --hash=sha256:cc\n", "")

    assert disagreements(_PROJECT, (), parse_lock(lock)) == ["werkzeug==3.1.9 has no --hash"]
