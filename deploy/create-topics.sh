#!/usr/bin/env bash
# One-shot topic creation for docker-compose (`topics-init`): every wardwatch topic, created
# explicitly with its partition count, before any wardwatch service starts. The broker has
# auto-creation off, so a service that starts against a missing topic fails instead of silently
# getting a topic with the wrong partition count.
#
#   TOPICS              whitespace-separated topic names (docker-compose.yml lists them)
#   PARTITIONS          partition count of every topic
#   REPLICATION_FACTOR  default 1 (single broker)
#   BOOTSTRAP           default kafka:9092
set -euo pipefail

: "${TOPICS:?TOPICS must list the topics to create}"
: "${PARTITIONS:?PARTITIONS must be set}"
BOOTSTRAP="${BOOTSTRAP:-kafka:9092}"
REPLICATION_FACTOR="${REPLICATION_FACTOR:-1}"
KAFKA_TOPICS="${KAFKA_TOPICS:-/opt/kafka/bin/kafka-topics.sh}"  # overridable for tests

for topic in $TOPICS; do
  "$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists \
    --topic "$topic" --partitions "$PARTITIONS" --replication-factor "$REPLICATION_FACTOR"
done

# --if-not-exists keeps an existing topic as it is: fail loudly if one has another partition count,
# because per-patient ordering and the worker's state depend on it.
described="$("$KAFKA_TOPICS" --bootstrap-server "$BOOTSTRAP" --describe --exclude-internal)"
status=0
for topic in $TOPICS; do
  count="$(printf '%s\n' "$described" \
    | awk -v t="$topic" '$1 == "Topic:" && $2 == t { for (i = 1; i < NF; i++) if ($i == "PartitionCount:") print $(i + 1) }')"
  if [[ "$count" != "$PARTITIONS" ]]; then
    echo "topic $topic has ${count:-no} partitions, expected $PARTITIONS" >&2
    status=1
  fi
done
exit "$status"
