"""deploy/postgres/: the EHR schema and the Debezium setup, run on a real PostgreSQL started with the
server arguments of docker-compose.yml's postgres service."""

from __future__ import annotations

import dataclasses

import psycopg
import pytest

from schemas import codes
from tests.deploy.conftest import ADMIN, DEBEZIUM_PASSWORD
from wardwatch.deploy import PUBLICATION_NAME, connector_config

pytestmark = pytest.mark.usefixtures("clean_env")  # no WARDWATCH_* of the shell


def mapped_columns(mapping) -> set[str]:
    """Every column a CDC mapping reads (fields named *_column, the wide `columns`, `on_air`, and
    the columns of context facts)."""
    found = set()
    for f in dataclasses.fields(mapping):
        value = getattr(mapping, f.name)
        if f.name.endswith("_column") and isinstance(value, str):
            found.add(value)
        elif f.name == "columns" and isinstance(value, dict):
            found |= set(value)
        elif f.name == "on_air" and value:
            found |= set(value)
        elif isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0]):
            for item in value:
                found |= mapped_columns(item)
    return found


def table_columns(conn, table: str) -> set[str]:
    rows = conn.execute("SELECT column_name FROM information_schema.columns "
                        "WHERE table_schema = 'public' AND table_name = %s", [table]).fetchall()
    return {r[0] for r in rows}


def test_the_server_runs_with_logical_wal_as_compose_configures_it(postgres_server):
    with psycopg.connect(postgres_server.dsn()) as conn:
        assert conn.execute("SHOW wal_level").fetchone()[0] == "logical"


def test_every_column_the_cdc_mapping_reads_exists(postgres_server, ehr_database):
    with psycopg.connect(postgres_server.dsn(ehr_database)) as conn:
        for table, mapping in codes.CDC_TABLES.items():
            existing = table_columns(conn, table)
            assert existing, f"ehr-schema.sql has no table {table}"
            missing = mapped_columns(mapping) - existing
            assert not missing, f"{table}: schemas.codes maps columns the schema lacks: {sorted(missing)}"
            assert "patient_id" in existing  # the connector's message.key.columns


def test_updates_and_deletes_carry_the_whole_old_row(postgres_server, ehr_database):
    with psycopg.connect(postgres_server.dsn(ehr_database)) as conn:
        identities = dict(conn.execute(
            "SELECT relname, relreplident FROM pg_class WHERE relname = ANY(%s)", [list(codes.CDC_TABLES)]).fetchall())
    assert identities == {table: "f" for table in codes.CDC_TABLES}


def test_the_debezium_user_can_publish_and_stream_every_mapped_table(postgres_server, ehr_database):
    """What the connector does at start (filtered publication, pgoutput slot, snapshot reads),
    as the replication user debezium.sh created, then a change arrives through the slot."""
    slot = f"test_{ehr_database}"
    tables = connector_config(_settings()).get("config")["table.include.list"].split(",")
    debezium = psycopg.connect(postgres_server.dsn(ehr_database, "debezium", DEBEZIUM_PASSWORD), autocommit=True)
    try:
        with debezium:
            debezium.execute(f"CREATE PUBLICATION {PUBLICATION_NAME} FOR TABLE {', '.join(tables)}")
            debezium.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", [slot])
            for table in tables:
                debezium.execute(f"SELECT count(*) FROM {table}").fetchone()
            with psycopg.connect(postgres_server.dsn(ehr_database), autocommit=True) as admin:
                admin.execute("INSERT INTO patients (patient_id, sex) VALUES ('P-1', 'female')")
            changes = debezium.execute(
                "SELECT count(*) FROM pg_logical_slot_peek_binary_changes(%s, NULL, NULL, "
                "'proto_version', '1', 'publication_names', %s)", [slot, PUBLICATION_NAME]).fetchone()[0]
            assert changes >= 3  # begin, relation + insert, commit
    finally:
        with psycopg.connect(postgres_server.dsn(ehr_database), autocommit=True) as admin:
            admin.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s",
                          [slot])


def test_the_init_hook_refuses_to_run_without_a_password(postgres_server, tmp_path):
    import os
    import subprocess

    from tests.deploy.conftest import ROOT

    env = {"PATH": os.environ["PATH"], "POSTGRES_USER": ADMIN, "POSTGRES_DB": "x"}
    result = subprocess.run(["bash", str(ROOT / "deploy" / "postgres" / "debezium.sh")], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "DEBEZIUM_DB_PASSWORD" in result.stderr


def _settings():
    from wardwatch.settings import Settings

    return Settings()


@pytest.mark.timeout(180)
def test_a_free_port_taken_before_postgres_binds_it_is_replaced_by_another():
    # on a busy CI machine another process can take the picked port before the server binds it
    import socket

    from tests.deploy.conftest import _free_port, postgres_or_skip, running_postgres

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        picks = iter([taken])
        with running_postgres(postgres_or_skip(), pick_port=lambda: next(picks, None) or _free_port()) as server:
            assert server.port != taken
            with psycopg.connect(server.dsn()) as conn:
                assert conn.execute("SELECT current_setting('port')").fetchone()[0] == str(server.port)
