#!/usr/bin/env bash
# /docker-entrypoint-initdb.d hook of the postgres image (runs once, on an empty data directory,
# after 01-ehr-schema.sql): create the Debezium replication user from the container's environment.
#   DEBEZIUM_DB_USER (default debezium), DEBEZIUM_DB_PASSWORD (required)
set -euo pipefail
: "${DEBEZIUM_DB_PASSWORD:?set DEBEZIUM_DB_PASSWORD for the postgres service}"
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -v debezium_user="${DEBEZIUM_DB_USER:-debezium}" -v debezium_password="$DEBEZIUM_DB_PASSWORD" \
  -v admin_user="$POSTGRES_USER" -v database="$POSTGRES_DB" \
  -f "${DEBEZIUM_SQL:-/opt/ehr/debezium.sql}"
