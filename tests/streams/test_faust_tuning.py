import faust
import pytest
from pydantic import SecretStr

from streams.faust_tuning import broker_credentials
from wardwatch.settings import Settings


def test_plaintext_needs_no_credentials():
    assert broker_credentials(Settings()) is None


def test_sasl_ssl_gives_the_worker_the_same_identity_as_the_confluent_clients():
    s = Settings(kafka_security_protocol="SASL_SSL", kafka_sasl_mechanism="SCRAM-SHA-512",
                 kafka_sasl_username="wardwatch", kafka_sasl_password=SecretStr("pw"))
    creds = broker_credentials(s)
    assert isinstance(creds, faust.SASLCredentials)
    assert (creds.username, creds.password, str(creds.mechanism.value)) == ("wardwatch", "pw", "SCRAM-SHA-512")
    assert creds.ssl_context is not None  # SASL over TLS
    conf = s.kafka_client_config()
    assert (conf["sasl.username"], conf["sasl.mechanism"], conf["security.protocol"]) == \
        ("wardwatch", "SCRAM-SHA-512", "SASL_SSL")


def test_tls_only_and_bad_configurations():
    assert isinstance(broker_credentials(Settings(kafka_security_protocol="SSL")), faust.SSLCredentials)
    # refused by Settings, before any client is built (tests/wardwatch/test_cli_errors.py: the CLI's line)
    with pytest.raises(ValueError, match="MECHANISM"):
        Settings(kafka_security_protocol="SASL_PLAINTEXT")
    with pytest.raises(ValueError, match="'PLAINTEXT', 'SSL'"):
        Settings(kafka_security_protocol="KERBEROS")
