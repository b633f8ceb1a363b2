"""deploy/failover/compose.yml, read as data (no Docker needed: part of every `make test`): the
override that adds a synchronous streaming standby keeps docker-compose.yml's promises (images
overridable, no default password, ports on 127.0.0.1) and points every process at both hosts.
The failover itself is proven by test_failover_demo.py, under COMPOSE_SMOKE=1."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
import yaml

from payment_service.config import load_settings
from tests.support import REPO_ROOT

FAILOVER = REPO_ROOT / "deploy" / "failover"
APP_SERVICES = ("migrate", "api", "relay", "notification-sink", "trip-sink")


@pytest.fixture(scope="module")
def override() -> dict[str, Any]:
    return yaml.safe_load((FAILOVER / "compose.yml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def base() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


def _options(command: list[str]) -> dict[str, str]:
    """`postgres -c name=value ...` → {name: value}."""
    assert command[0] == "postgres"
    pairs = command[1:]
    assert pairs[::2] == ["-c"] * (len(pairs) // 2), command
    return dict(option.split("=", 1) for option in pairs[1::2])


def test_every_process_reaches_the_database_through_both_hosts(override: dict[str, Any]) -> None:
    services = override["services"]
    assert set(APP_SERVICES) <= set(services)
    for name in APP_SERVICES:
        assert services[name]["environment"]["DB_HOST"] == "db,db-standby", name
    dsn = load_settings(
        database_url=None, db_host="db,db-standby", db_port=5432, db_pass="pw"
    ).dsn()
    assert dsn.startswith("postgresql://")
    assert "@db:5432,db-standby:5432/" in dsn and dsn.endswith("?target_session_attrs=read-write")
    # Migrations run only once the standby streams (from then on every commit waits for it).
    assert services["migrate"]["depends_on"]["db-standby"] == {"condition": "service_healthy"}


def test_the_standby_keeps_the_base_files_promises(
    override: dict[str, Any], base: dict[str, Any]
) -> None:
    standby = override["services"]["db-standby"]
    assert standby["image"] == base["services"]["db"]["image"]
    assert standby["environment"]["POSTGRES_PASSWORD"].startswith("${DB_PASS:?")
    assert standby["ports"] == [
        "${PUBLISH_HOST:-127.0.0.1}:${DB_STANDBY_PUBLISHED_PORT:-5434}:5432"
    ]
    assert "pgdata-standby" in override["volumes"]
    assert standby["depends_on"]["db"] == {"condition": "service_healthy"}


def test_synchronous_replication_between_the_two(override: dict[str, Any]) -> None:
    services = override["services"]
    primary, standby = services["db"], services["db-standby"]
    primary_options = _options(primary["command"])
    standby_options = _options(standby["command"])
    assert primary_options["synchronous_commit"] == "on"
    assert primary_options["wal_level"] == "replica"
    # standby.sh makes the primary wait for the standby by the name the standby reports.
    assert standby_options["cluster_name"] == standby["environment"]["STANDBY_NAME"]
    # Both use the same client authentication, which admits replication with a password.
    hba = "/etc/payment-failover/pg_hba.conf"
    assert primary_options["hba_file"] == standby_options["hba_file"] == hba
    mounts = {
        target.removesuffix(":ro"): REPO_ROOT / source.removeprefix("./")
        for service in (primary, standby)
        for source, target in (v.split(":", 1) for v in service["volumes"] if v.startswith("./"))
    }
    assert all(path.is_file() for path in mounts.values()), mounts
    rules = [
        line.split()
        for line in mounts[hba].read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ["host", "replication", "all", "all", "scram-sha-256"] in rules
    assert not [rule for rule in rules if rule[0] == "host" and rule[-1] == "trust"]
    assert standby["entrypoint"] == ["/bin/sh", "/etc/payment-failover/standby.sh"]
    assert mounts["/etc/payment-failover/standby.sh"] == FAILOVER / "standby.sh"


def test_the_standby_entrypoint_is_plain_sh() -> None:
    """It runs in Alpine's and Debian's images alike: POSIX sh, which `sh -n` parses."""
    result = subprocess.run(
        ["sh", "-n", str(FAILOVER / "standby.sh")], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert (FAILOVER / "standby.sh").read_text(encoding="utf-8").startswith("#!/bin/sh\n")
