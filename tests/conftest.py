"""Shared fixtures: one real embedded broker per test session; a fresh topic prefix and consumer
group per test so tests never see each other's data."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from wardwatch.broker import EmbeddedBroker
from wardwatch.settings import Settings


@pytest.fixture(scope="session")
def broker(tmp_path_factory):
    log = tmp_path_factory.mktemp("broker") / "tansu.log"
    b = EmbeddedBroker.start(log_path=log)
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture(autouse=True)
def _readiness_of_the_test_process():
    """A service command run in-process (CliRunner: `wardwatch receiver`, ...) tells /readyz how to answer
    for the whole process (observability.set_readiness): put back the default after each test."""
    from wardwatch import observability

    before = observability._readiness
    yield
    observability._readiness = before  # as it was (set_readiness would wrap it once more per test)


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture
def settings(broker, unique, tmp_path: Path) -> Settings:
    return Settings(
        bootstrap_servers=broker.bootstrap,
        topic_prefix=f"t{unique}",
        cdc_topic_prefix=f"t{unique}.ehr.public",
        group_prefix=f"g{unique}",
        data_dir=tmp_path / "data",
        model_dir=tmp_path / "models",
    )


@pytest.fixture
def clean_env(monkeypatch):
    """No WARDWATCH_* variable of the shell running the tests reaches the code under test."""
    for name in [k for k in os.environ if k.startswith("WARDWATCH_")]:
        monkeypatch.delenv(name)
    return monkeypatch


@pytest.fixture(scope="session")
def cohort_cache() -> Path:
    """Where generated clinosim cohorts are cached across runs (the repo's data/cache, git-ignored,
    as the demo uses): clinosim runs once per machine for each cohort size and seed."""
    path = Path(__file__).resolve().parents[1] / "data" / "cache"
    path.mkdir(parents=True, exist_ok=True)
    return path
