"""Every metric the Grafana dashboard (deploy/grafana) and the alert rules (deploy/prometheus)
query is one the service really exports: the names come from the API's and the relay's own
registries, built here as the processes build them."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
import yaml

from app.metrics import Metrics
from outbox_relay.metrics import EndpointGauges, RelayMetrics
from tests.support.prometheus import ALERTS, DEPLOY

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "payment-service.json"
# Prometheus's own series about each scrape.
SCRAPE_SERIES = {"up"}
_SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
             "unless", "offset", "bool", "inf", "nan"}  # fmt: skip


def exported_names() -> set[str]:
    """The sample names a scrape of the API and of a relay can show."""
    names = set(SCRAPE_SERIES)
    for registry in (Metrics().registry, RelayMetrics().registry):
        for family in registry.collect():
            names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


def metric_names(promql: str) -> set[str]:
    """The metric names in a PromQL expression: identifiers that are not functions, keywords,
    labels (in `{…}` or `by (…)`), strings, durations or Grafana variables."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", promql)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\w+", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?", text):
        name, call = match.group(1), match.group(2)
        if call is None and name.lower() not in _KEYWORDS:
            names.add(name)
    return names


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def alert_queries() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def test_the_name_extraction_reads_promql() -> None:
    expression = (
        'histogram_quantile(0.95, sum by (le, route) (rate(a_seconds_bucket{route=~"/p.*"}'
        '[$__rate_interval]))) / ignoring(x) b_total or absent(up{job="j"}) > bool 0.5'
    )
    assert metric_names(expression) == {"a_seconds_bucket", "b_total", "up"}


@pytest.mark.parametrize(
    ("source", "queries"), [("dashboard", dashboard_queries), ("alerts", alert_queries)]
)
def test_every_queried_metric_is_exported(source: str, queries: Any) -> None:
    expressions = queries()
    assert expressions, f"no queries in the {source}?"
    used = set().union(*(metric_names(expression) for expression in expressions))
    exported = exported_names()
    assert used - exported == set(), f"{source}: {used}"


def test_the_dashboard_shows_what_an_operator_needs() -> None:
    """Throughput, latency, outbox lag and breaker state per endpoint (issue 14)."""
    used = set().union(*(metric_names(expression) for expression in dashboard_queries()))
    assert {
        "payment_api_requests_total",
        "payment_api_request_duration_seconds_bucket",
        "outbox_endpoint_oldest_pending_age_seconds",
        "outbox_endpoint_breaker_state",
        "relay_endpoint_deliveries_total",
    } <= used
    provisioned = yaml.safe_load(
        (DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uids = {source["uid"] for source in provisioned["datasources"]}
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] in uids, panel["title"]
    assert len({panel["id"] for panel in dashboard["panels"]}) == len(dashboard["panels"])


def exported_states() -> set[str]:
    """The `state` label values of `outbox_endpoint_state`, as a relay exports them."""
    metrics = RelayMetrics()
    metrics.set_backlog([EndpointGauges("trip", 0, None, 0, "ACTIVE", "closed")])
    return {
        sample.labels["state"]
        for family in metrics.registry.collect()
        if family.name == "outbox_endpoint_state"
        for sample in family.samples
    }


def alert_test_series() -> list[str]:
    tests = yaml.safe_load((ALERTS.parent / "alerts_test.yml").read_text())["tests"]
    return [series["series"] for test in tests for series in test.get("input_series", [])]


def test_queries_name_endpoint_states_as_the_relay_exports_them() -> None:
    """`outbox_endpoint_state{state="…"}` matches only a state the relay writes (ACTIVE, PAUSED,
    DISABLED): a query for another spelling is silently empty, and its alert never fires."""
    states = exported_states()
    assert states == {"ACTIVE", "PAUSED", "DISABLED"}
    texts = dashboard_queries() + alert_queries() + alert_test_series()
    asked = {
        match
        for text in texts
        for selector in re.findall(r"outbox_endpoint_state\{([^}]*)\}", text)
        for match in re.findall(r'\bstate\s*=\s*"([^"]*)"', selector)
    }
    assert asked, "no query names an endpoint state?"
    assert asked <= states, f"states the relay never exports: {sorted(asked - states)}"
