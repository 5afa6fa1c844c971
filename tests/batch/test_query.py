"""`wardwatch query`: what an analyst reads is what the file holds."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from wardwatch.cli import app

ALERT_ID = "57fa2f1f-4f2e-53a1-9e60-4970c9a583c2"
SCORING_MS = 1718419982461


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A DuckDB file where `wardwatch query` looks for it, with one wide row (as alert_outcomes is)."""
    with duckdb.connect(str(tmp_path / "wardwatch.duckdb")) as con:
        con.execute("CREATE TABLE alerts AS SELECT ? AS alert_id, 'ENC-C0-0002-101063443821' AS encounter_id, "
                    "? AS scoring_ms, 'missing effective[x]' AS detail, 'a :smile: b' AS note, '[/]' AS odd, "
                    + ", ".join(f"'value {i}' AS column_{i}" for i in range(12)),
                    [ALERT_ID, SCORING_MS])
    return {"WARDWATCH_DATA_DIR": str(tmp_path)}


def test_the_table_shows_every_value_whole_however_wide_the_result(env):
    """Printed to a file or a pipe (here: CliRunner), a table wider than 80 columns was squeezed into 80:
    every cell cut to an ellipsis, an alert id or a time in ms unreadable ('17184…')."""
    result = CliRunner().invoke(app, ["query", "SELECT * FROM alerts"], env=env)
    assert result.exit_code == 0, result.output
    assert ALERT_ID in result.output and str(SCORING_MS) in result.output
    assert "…" not in result.output
    assert "column_11" in result.output and "value 11" in result.output


def test_the_table_prints_values_literally_not_as_markup(env):
    """rich read cell text as markup: `effective[x]` lost its `[x]`, `:smile:` became an emoji, and a value
    `[/]` stopped the command with a traceback."""
    result = CliRunner().invoke(app, ["query", "SELECT detail, note, odd FROM alerts"], env=env)
    assert result.exit_code == 0, result.output
    assert "missing effective[x]" in result.output
    assert "a :smile: b" in result.output
    assert "[/]" in result.output


@pytest.mark.parametrize("sql", ["", "   ", "/* nothing yet */"])
def test_sql_without_a_statement_is_no_traceback(env, sql):
    """DuckDB returns no cursor for text without a statement; query crashed on it (AttributeError)."""
    result = CliRunner().invoke(app, ["query", sql], env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    if sql.strip():
        assert result.exit_code == 0 and result.output == ""
    else:
        assert result.exit_code == 2 and "no SQL given" in result.output
