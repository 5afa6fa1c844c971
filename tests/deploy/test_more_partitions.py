"""docs/operations.md, "More partitions": the settings it tells operators to change give a deployment
that topics-init accepts on the broker the old one still occupies, with its own CDC topics and its own
worker state."""

from __future__ import annotations

import re
from pathlib import Path

from wardwatch.deploy import connector_config, partition_mismatches, topic_specs
from wardwatch.settings import Settings
from wardwatch.worker_results import changelog_topic

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def documented_settings() -> dict[str, str]:
    """The `.env` lines of the section: {field name: value}."""
    section = OPERATIONS.read_text().split("### More partitions", 1)[1].split("\n### ", 1)[0]
    return {name.lower(): value for name, value in re.findall(r"^WARDWATCH_(\w+)=(\S+)", section, re.M)}


def test_the_documented_settings_pass_topics_init_next_to_the_old_deployment(clean_env):
    old, new = Settings(), Settings(**documented_settings())
    assert new.partitions > old.partitions

    # topics-init of the new deployment, with every old topic still on the broker
    existing = {spec.name: spec.partitions for spec in topic_specs(old)}
    assert partition_mismatches(topic_specs(new), existing) == []
    # Debezium writes the new CDC topics, and the worker does not recover the old partitions' state
    assert connector_config(new)["config"]["topic.prefix"] != connector_config(old)["config"]["topic.prefix"]
    assert changelog_topic(new) != changelog_topic(old)
