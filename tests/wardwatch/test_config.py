import orjson
from typer.testing import CliRunner

from wardwatch.cli import app


def test_config_show_masks_secrets_and_says_where_each_value_came_from(monkeypatch):
    monkeypatch.setenv("WARDWATCH_RECEIVER_TOKEN", "s3cret-token")
    monkeypatch.setenv("WARDWATCH_PARTITIONS", "8")
    result = CliRunner().invoke(app, ["config", "show", "--json"])
    assert result.exit_code == 0, result.output
    shown = orjson.loads(result.stdout)
    assert shown["partitions"] == 8 and shown["receiver_token"] == "********"
    assert "s3cret-token" not in result.output

    table = CliRunner().invoke(app, ["config", "show"], env={"COLUMNS": "200"})
    assert table.exit_code == 0 and "s3cret-token" not in table.output
    line = next(l for l in table.output.splitlines() if "WARDWATCH_PARTITIONS" in l)
    assert "8" in line and "environment" in line
    assert any("WARDWATCH_ALLOWED_LATENESS_S" in l and "default" in l for l in table.output.splitlines())
