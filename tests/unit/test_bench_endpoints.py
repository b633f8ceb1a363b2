"""`make bench` subscribes its endpoints through the integration guide's settings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtests.bench.endpoints import ENDPOINT_NAMES, endpoint_settings, parse_counts
from payment_service.config import Settings, load_settings
from payment_service.endpoints import seeds_from_settings


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)
    yield


def test_the_relays_settings_seed_one_endpoint_per_receiver(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    urls = [f"http://127.0.0.1:{port}" for port in (7001, 7002, 7003, 7004)]
    for name, value in endpoint_settings(urls).items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("DATABASE_URL", "postgresql://bench@127.0.0.1:1/bench")
    seeds = seeds_from_settings(load_settings())
    assert [(s.name, s.url, s.event_types) for s in seeds] == [
        (name, f"{url}/{name}", ("*",)) for name, url in zip(ENDPOINT_NAMES, urls, strict=True)
    ]


def test_endpoint_counts_always_include_the_one_endpoint_baseline() -> None:
    assert parse_counts("4") == [1, 4]
    assert parse_counts("4,1,2") == [1, 2, 4]
    with pytest.raises(SystemExit):
        parse_counts("5")
