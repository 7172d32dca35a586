import pytest

from services.common import settings
from services.common.endpoints import SERVICE_PORTS
from services.common.settings import ServiceSettings, SettingsError


def test_defaults_and_service_ports():
    s = settings.load_service_settings(ServiceSettings, "planner", environ={})
    assert (s.grpc_port, s.metrics_port) == (SERVICE_PORTS["planner"].grpc, SERVICE_PORTS["planner"].metrics)
    assert s.grpc_host == "127.0.0.1"


def test_values_are_parsed_from_the_environment():
    s = settings.load_service_settings(ServiceSettings, "dedup", environ={"IEX_GRPC_PORT": "6000", "IEX_S3_SECURE": "true"})
    assert s.grpc_port == 6000 and s.s3_secure is True


@pytest.mark.parametrize(
    "env, var",
    [
        ({"IEX_GRPC_PORT": "abc"}, "IEX_GRPC_PORT"),
        ({"IEX_GRPC_PORT": "70000"}, "IEX_GRPC_PORT"),
        ({"IEX_S3_SECURE": "maybe"}, "IEX_S3_SECURE"),
        ({"IEX_LOG_LEVEL": "LOUD"}, "IEX_LOG_LEVEL"),
    ],
)
def test_wrong_values_name_the_variable(env, var):
    with pytest.raises(SettingsError) as info:
        settings.load_service_settings(ServiceSettings, "planner", environ=env)
    assert var in str(info.value)


def test_every_problem_is_reported_at_once():
    with pytest.raises(SettingsError) as info:
        settings.load_service_settings(ServiceSettings, "planner", environ={"IEX_GRPC_PORT": "x", "IEX_METRICS_PORT": "y"})
    assert "IEX_GRPC_PORT" in str(info.value) and "IEX_METRICS_PORT" in str(info.value)


def test_secrets_are_redacted():
    s = settings.load_service_settings(ServiceSettings, "planner", environ={"IEX_S3_SECRET_KEY": "hunter2-secret"})
    assert "hunter2-secret" not in str(settings.redacted(s))
