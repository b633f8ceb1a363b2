"""`make bench` measures what compose and the Dockerfile ship: its `SHIPPED` is the
server, workers and LOG_LEVEL that `payment-service serve` runs with in both."""

from __future__ import annotations

import json
import re
import tomllib
from typing import Any

import yaml

from loadtests.bench.contenders import SHIPPED
from payment_cli.cli import build_parser
from payment_service.config import Settings
from tests.support import REPO_ROOT


def _compose_api() -> dict[str, Any]:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    api: dict[str, Any] = compose["services"]["api"]
    return api


def _dockerfile() -> str:
    return (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8")


def test_compose_and_the_image_run_serve_as_the_benchmark_measures_it() -> None:
    cmd = re.search(r"^CMD (\[.*\])$", _dockerfile(), re.MULTILINE)
    assert cmd, "the image's default command"
    for command in (_compose_api()["command"], json.loads(cmd[1])):
        assert command[:2] == ["payment-service", "serve"], command
        args = build_parser().parse_args(command[1:])
        assert (args.server, args.workers) == (SHIPPED.server, SHIPPED.workers), command


def test_the_shipped_log_level_is_the_settings_default() -> None:
    # compose passes LOG_LEVEL through only when set: unset, the service's default applies.
    assert _compose_api()["environment"]["LOG_LEVEL"] is None
    assert Settings.model_fields["log_level"].default == SHIPPED.log_level
    assert SHIPPED.log_level == "INFO", "the access log on"


def test_the_image_installs_the_shipped_server() -> None:
    # The image installs the runtime lock, and the shipped server is a runtime dependency in it.
    assert "COPY requirements/runtime.txt " in _dockerfile()
    runtime = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert any(d.split("[")[0].split(">")[0] == SHIPPED.server for d in runtime)
    locked = (REPO_ROOT / "requirements" / "runtime.txt").read_text()
    assert re.search(rf"^{SHIPPED.server}==", locked, re.M), "the image installs it, pinned"
