"""The alert rules (deploy/prometheus/alerts.yml) are valid, and each alert fires, and only
fires, on the synthetic series of its unit tests (alerts_test.yml), with promtool."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.support.prometheus import ALERTS, ALERTS_TEST, DEPLOY, prometheus_binary


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [prometheus_binary("promtool"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_rules_are_valid() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_behaves_as_its_unit_tests_say() -> None:
    result = promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested_and_has_a_runbook_line() -> None:
    alerts = {rule["alert"] for group in yaml.safe_load(ALERTS.read_text())["groups"]
              for rule in group["rules"]}  # fmt: skip
    tested = {case["alertname"] for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
              for case in test["alert_rule_test"]}  # fmt: skip
    assert alerts == tested
    runbooks = (DEPLOY.parent / "docs" / "operations.md").read_text()
    for alert in alerts:
        # The anchor each alert's `runbook` annotation links to.
        assert f'<a id="{alert.lower()}"></a>`{alert}`' in runbooks, f"no runbook line: {alert}"


def test_the_compose_prometheus_config_is_valid(tmp_path: Path) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    # In the container the rules are at /etc/prometheus/alerts.yml (docker-compose.yml mounts them).
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    config["rule_files"] = [str(ALERTS)]
    here = tmp_path / "prometheus.yml"
    here.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(here))
    assert result.returncode == 0, result.stdout + result.stderr
    assert {job["job_name"] for job in config["scrape_configs"]} == {"payment-api", "payment-relay"}
