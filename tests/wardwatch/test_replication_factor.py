"""WARDWATCH_REPLICATION_FACTOR: every topic wardwatch creates gets it, so one broker lost on a
production cluster loses no partition. The admin client is a stand-in (the embedded broker has one
node, so it cannot hold a replica count above 1)."""

from __future__ import annotations

from concurrent.futures import Future
from types import SimpleNamespace

import pytest

from streams.topics import ensure_topics, topics_for
from wardwatch.deploy import connector_config, create_topics
from wardwatch.settings import Settings


@pytest.fixture
def created(monkeypatch) -> list:
    """The NewTopic requests sent to an empty broker."""
    requests: list = []

    class EmptyBroker:
        def __init__(self, config):
            pass

        def list_topics(self, timeout=None):
            return SimpleNamespace(topics={})

        def create_topics(self, new_topics, operation_timeout=None):
            requests.extend(new_topics)
            done = {}
            for topic in new_topics:
                done[topic.topic] = Future()
                done[topic.topic].set_result(None)
            return done

    monkeypatch.setattr("confluent_kafka.admin.AdminClient", EmptyBroker)
    return requests


@pytest.fixture
def three() -> Settings:
    return Settings(replication_factor=3)


def test_deploy_topics_creates_every_topic_with_the_replication_factor(three, created):
    create_topics(three)
    assert sorted(t.topic for t in created) == sorted(topics_for(three).all)
    assert {t.replication_factor for t in created} == {3}


def test_topics_a_service_creates_for_itself_get_the_replication_factor(three, created):
    ensure_topics(three, topics_for(three))
    assert created and {t.replication_factor for t in created} == {3}


def test_the_workers_changelog_and_the_connectors_heartbeat_topic_get_it_too(settings, three, tmp_path):
    from streams.app import create_app

    app = create_app(settings.model_copy(update={"replication_factor": 3, "data_dir": tmp_path}))
    assert app.conf.topic_replication_factor == 3  # faust declares the changelog with it
    assert connector_config(three)["config"]["topic.creation.default.replication.factor"] == "3"


def test_the_default_suits_a_single_broker(monkeypatch):
    monkeypatch.delenv("WARDWATCH_REPLICATION_FACTOR", raising=False)
    assert Settings().replication_factor == 1
    with pytest.raises(ValueError):
        Settings(replication_factor=0)
