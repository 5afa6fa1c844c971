import orjson
from typer.testing import CliRunner

from wardwatch.cli import app
from wardwatch.settings import Settings, describe_settings


def test_config_show_masks_secrets_and_says_where_each_value_came_from(monkeypatch):
    monkeypatch.setenv("WARDWATCH_RECEIVER_TOKEN", "s3cret-token")
    monkeypatch.setenv("WARDWATCH_PARTITIONS", "8")
    result = CliRunner().invoke(app, ["config", "show", "--json"])
    assert result.exit_code == 0, result.output
    shown = orjson.loads(result.stdout)
    assert shown["partitions"] == 8 and shown["receiver_token"] == "********"
    assert "s3cret-token" not in result.output

    table = CliRunner().invoke(app, ["config", "show"])
    assert table.exit_code == 0 and "s3cret-token" not in table.output and "********" in table.output

    rows = {r["name"]: r for r in describe_settings(Settings())}
    assert rows["partitions"]["source"] == "environment" and rows["partitions"]["variable"] == "WARDWATCH_PARTITIONS"
    assert rows["allowed_lateness_s"]["source"] == "default" and rows["allowed_lateness_s"]["description"]
