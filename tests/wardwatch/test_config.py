import socket

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


def test_static_membership_is_off_by_default_and_takes_the_host_name_unless_given_an_id():
    assert Settings().group_instance_id() is None  # dynamic: several workers on one host never collide
    assert Settings(static_membership=True).group_instance_id() == socket.gethostname()  # a compose replica's own
    assert Settings(static_membership=True, instance_id="worker-2").group_instance_id() == "worker-2"
    assert Settings(instance_id="worker-2").group_instance_id() is None  # an id alone does not turn it on


def test_each_service_names_itself_to_the_broker_and_keeps_the_shared_security_settings():
    from streams.app import changelog_producer_config
    from streams.ingest import consumer_config, producer_config

    s = Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="PLAIN", kafka_sasl_username="u",
                 kafka_sasl_password="p")
    assert "client.id" not in s.kafka_client_config()  # librdkafka's default unless a service says who it is
    assert consumer_config(s)["client.id"] == producer_config(s)["client.id"] == "wardwatch-ingest"
    assert changelog_producer_config(s)["client.id"] == "wardwatch-worker-changelog"
    assert consumer_config(s)["sasl.password"] == "p" and consumer_config(s)["security.protocol"] == "SASL_SSL"


def test_the_cdc_time_zone_is_utc_by_default_and_a_name_that_is_no_iana_zone_stops_startup(monkeypatch):
    """A database keeping `timestamp` columns in local wall time needs its zone; a typo must not start an
    ingest that shifts every CDC time by hours (or silently reads them as UTC)."""
    assert Settings().cdc_timezone == "UTC"
    assert Settings(cdc_timezone="Europe/Berlin").cdc_timezone == "Europe/Berlin"
    monkeypatch.setenv("WARDWATCH_CDC_TIMEZONE", "Europe/Berlinn")
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 2
    assert "WARDWATCH_CDC_TIMEZONE='Europe/Berlinn'" in result.output and "IANA" in result.output
    for bad in ("", "+02:00", "../../etc/passwd"):
        monkeypatch.setenv("WARDWATCH_CDC_TIMEZONE", bad)
        assert CliRunner().invoke(app, ["config", "show"]).exit_code == 2, bad


def test_the_mrn_system_is_unset_by_default_and_refused_unless_a_uri(monkeypatch):
    """A blank or mistyped WARDWATCH_MRN_SYSTEM would match no subject identifier: every reading would be keyed by
    its Patient reference or dead-lettered. Refused at startup, saying what is wanted."""
    monkeypatch.delenv("WARDWATCH_MRN_SYSTEM", raising=False)
    assert Settings().mrn_system is None
    for good in ("urn:oid:2.16.840.1.113883.19.5", "http://hospital.example.org/identifiers/mrn"):
        monkeypatch.setenv("WARDWATCH_MRN_SYSTEM", good)
        assert Settings().mrn_system == good
    for bad in ("", "  ", "MRN", "http://hospital.example.org/ids mrn", " urn:oid:1.2"):
        monkeypatch.setenv("WARDWATCH_MRN_SYSTEM", bad)
        result = CliRunner().invoke(app, ["config", "show"])
        assert result.exit_code == 2 and "WARDWATCH_MRN_SYSTEM" in result.output, bad


def test_fhir_patient_ids_are_not_taken_for_mrns_unless_the_operator_says_so(monkeypatch):
    """A FHIR server's own Patient ids may equal other patients' MRNs: keying by them is opt-in."""
    monkeypatch.delenv("WARDWATCH_FHIR_PATIENT_IDS_ARE_MRNS", raising=False)
    assert Settings().fhir_patient_ids_are_mrns is False
    monkeypatch.setenv("WARDWATCH_FHIR_PATIENT_IDS_ARE_MRNS", "true")
    assert Settings().fhir_patient_ids_are_mrns is True
    assert "Patient.id" in Settings.model_fields["fhir_patient_ids_are_mrns"].description


def test_a_nightly_time_that_is_no_time_of_day_is_refused_with_its_variable(monkeypatch):
    # the scheduler used to crash-loop on WARDWATCH_NIGHTLY_AT=24:00 with "'24:00' is not a time of day"
    monkeypatch.setenv("WARDWATCH_NIGHTLY_AT", "24:00")
    result = CliRunner().invoke(app, ["config", "show"])

    assert result.exit_code == 2
    assert "WARDWATCH_NIGHTLY_AT='24:00'" in result.output and "00:00 to 23:59" in result.output
    assert Settings(nightly_at="23:59").nightly_at == "23:59"
