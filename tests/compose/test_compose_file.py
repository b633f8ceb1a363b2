"""docker-compose.yml keeps its promises, read as data (no Docker needed: part of every
`make test`): every setting of the service reaches its containers, ports are published on
127.0.0.1 by default, every image is overridable and the database password has no default."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from payment_service.config import Settings
from tests.support import REPO_ROOT

APP_SERVICES = ("migrate", "api", "relay", "notification-sink", "trip-sink")
# Fixed by the compose file for the containers: its own database and its own sinks.
FIXED_SETTINGS = {"DB_HOST", "DB_PORT", "NOTIFICATION_SERVICE_URL", "TRIP_SERVICE_URL"}
# Meaningless in the containers: the database is always `db`, never an embedded one.
UNUSED_SETTINGS = {"DATABASE_URL", "PAYMENT_SERVICE_DATA_DIR"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


@pytest.mark.parametrize("service", APP_SERVICES)
def test_every_setting_reaches_the_service_containers(
    compose: dict[str, Any], service: str
) -> None:
    environment = compose["services"][service]["environment"]
    settings = {name.upper() for name in Settings.model_fields}
    assert settings - UNUSED_SETTINGS - set(environment) == set()
    assert set(environment) & UNUSED_SETTINGS == set()
    assert environment["DB_HOST"] == "db"
    assert environment["NOTIFICATION_SERVICE_URL"] == "http://notification-sink:8085"
    # The second stand-in receiver is seeded as endpoint `trip`.
    assert environment["TRIP_SERVICE_URL"] == "http://trip-sink:8081"
    assert environment["TRIP_CALLBACK_PATH"] == "${TRIP_CALLBACK_PATH:-/trips/payment-events}"
    assert environment["TRIP_EVENT_TYPES"] == (
        "${TRIP_EVENT_TYPES:-payment.succeeded,payment.refunded}"
    )
    # The relay's metrics default to 127.0.0.1; its container opens them to the compose network.
    assert environment["RELAY_METRICS_HOST"] == "${RELAY_METRICS_HOST:-0.0.0.0}"


def test_ports_are_published_on_127_0_0_1_unless_told_otherwise(compose: dict[str, Any]) -> None:
    published = {
        name: service["ports"]
        for name, service in compose["services"].items()
        if "ports" in service
    }
    assert set(published) == {
        "db", "api", "notification-sink", "trip-sink", "prometheus", "grafana"
    }  # fmt: skip
    for ports in published.values():
        assert all(port.startswith("${PUBLISH_HOST:-127.0.0.1}:") for port in ports), ports


def test_images_are_overridable_and_the_password_has_no_default(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert services["db"]["image"] == "${POSTGRES_IMAGE:-postgres:16-alpine}"
    for name in APP_SERVICES:
        assert services[name]["image"] == "${PAYMENT_SERVICE_IMAGE:-payment-service:latest}"
        assert services[name]["build"]["args"] == {
            "PYTHON_IMAGE": "${PYTHON_IMAGE:-python:3.12-slim}"
        }
        assert services[name]["environment"]["DB_PASS"].startswith("${DB_PASS:?")
    assert services["db"]["environment"]["POSTGRES_PASSWORD"].startswith("${DB_PASS:?")


def test_the_app_charges_at_the_compose_gateway_with_its_webhook(compose: dict[str, Any]) -> None:
    """By default the API and the relay charge at the `gateway` service (localstripe, built from
    deploy/gateway), which sends its webhooks to the API signed with the API's secret; that
    secret has no default; a setting in .env points them at another gateway."""
    services = compose["services"]
    gateway = services["gateway"]
    assert gateway["image"] == "${GATEWAY_IMAGE:-payment-service-gateway:latest}"
    assert gateway["build"] == {
        "context": "./deploy/gateway",
        "args": {"PYTHON_IMAGE": "${PYTHON_IMAGE:-python:3.12-slim}"},
    }
    assert (REPO_ROOT / "deploy" / "gateway" / "Dockerfile").is_file()
    assert "ports" not in gateway, "inside the compose network only"
    secret = gateway["environment"]["STRIPE_WEBHOOK_SECRET"]
    assert secret.startswith("${STRIPE_WEBHOOK_SECRET:?")
    assert gateway["environment"]["GATEWAY_WEBHOOK_URL"] == (
        "http://api:${SERVICE_PORT:-8082}${API_PREFIX:-}/gateway/stripe/webhook"
    )
    for name in APP_SERVICES:
        environment = services[name]["environment"]
        assert environment["GATEWAY"] == "${GATEWAY:-stripe}"
        assert environment["STRIPE_API_BASE"] == "${STRIPE_API_BASE:-http://gateway:8420}"
        assert environment["STRIPE_API_FLAVOUR"] == "${STRIPE_API_FLAVOUR:-localstripe}"
        assert environment["STRIPE_SECRET_KEY"] == "${STRIPE_SECRET_KEY:-sk_test_embedded}"
        assert environment["STRIPE_WEBHOOK_SECRET"] == secret
    for name in ("api", "relay"):
        assert services[name]["depends_on"]["gateway"] == {"condition": "service_healthy"}


def test_everything_the_dockerfile_copies_is_in_the_build_context() -> None:
    """.dockerignore is an allow-list: a package the Dockerfile copies but the list leaves out
    fails only at `docker build`, which needs an engine; this finds it without one."""
    allowed = {
        line[1:].strip("/")
        for line in (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.startswith("!")
    }
    copied = [
        source.strip("./")
        for line in (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines()
        if line.startswith("COPY ") and "--from=" not in line
        for source in line.split()[1:-1]
    ]
    assert copied, "the Dockerfile copies nothing?"
    assert [source for source in copied if source not in allowed] == []
    # And every package the wheel is built from is copied.
    assert {"app", "outbox_relay", "payment_service", "payment_cli"} <= set(copied)


def test_the_observability_profile_runs_prometheus_and_grafana_provisioned(
    compose: dict[str, Any],
) -> None:
    """Validated here only: no image registry is reachable, so CI never starts this profile."""
    services = compose["services"]
    observability = {
        name for name, s in services.items() if "observability" in s.get("profiles", [])
    }
    assert observability == {"prometheus", "grafana"}
    assert all("profiles" not in services[name] for name in (*APP_SERVICES, "db"))
    assert services["prometheus"]["image"].startswith("${PROMETHEUS_IMAGE:-prom/prometheus:")
    assert services["grafana"]["image"].startswith("${GRAFANA_IMAGE:-grafana/grafana:")
    # Every mounted file or folder exists, and is what the container reads.
    mounts = {
        target.removesuffix(":ro"): REPO_ROOT / source
        for name in observability
        for source, target in (volume.split(":", 1) for volume in services[name]["volumes"])
    }
    assert all(path.exists() for path in mounts.values()), mounts
    config = yaml.safe_load(mounts["/etc/prometheus/prometheus.yml"].read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    assert mounts["/etc/prometheus/alerts.yml"] == REPO_ROOT / "deploy/prometheus/alerts.yml"
    # Prometheus scrapes the API on its port and the relay on its metrics port, by service name.
    targets = {
        job["job_name"]: job["static_configs"][0]["targets"] for job in config["scrape_configs"]
    }
    api_port = Settings.model_fields["service_port"].default
    relay_port = Settings.model_fields["relay_metrics_port"].default
    assert targets == {"payment-api": [f"api:{api_port}"], "payment-relay": [f"relay:{relay_port}"]}
    # Grafana: provisioning folders, and the dashboards folder the provider reads.
    provisioning = mounts["/etc/grafana/provisioning"]
    provider = yaml.safe_load((provisioning / "dashboards" / "payment-service.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert (mounts["/var/lib/grafana/dashboards"] / "payment-service.json").is_file()
    datasource = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    environment = services["grafana"]["environment"]
    assert environment["GF_SECURITY_DISABLE_INITIAL_ADMIN_CREATION"] == "true", "no admin password"
