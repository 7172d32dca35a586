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


def test_local_ports_stay_below_the_kernels_ephemeral_range_for_every_offset_the_suites_use():
    """A listener inside 32768-60999 fails to bind whenever some client connection holds that port."""
    import subprocess
    import sys

    from services.common import endpoints

    for offset in (0, 1000, 2000, 3000, 4000, 8000, 9000):
        listed = subprocess.run(
            [sys.executable, "-c", "from services.stack import servers as s; print(*[p for n in s.ALL_NAMES for p in s.ports(n)])"],
            env={**__import__("os").environ, "IEX_PORT_OFFSET": str(offset)},
            capture_output=True, text=True, check=True,
        ).stdout.split()
        ports = [int(p) for p in listed]
        assert len(ports) >= 16 and len(set(ports)) == len(ports), (offset, ports)
        inside = [p for p in ports if p in endpoints.LINUX_EPHEMERAL_PORTS]
        assert not inside, f"IEX_PORT_OFFSET={offset}: {inside} inside the ephemeral range"
        spare = [p for p in ports if p in endpoints.SPARE_PORTS]
        assert not spare, f"IEX_PORT_OFFSET={offset}: {spare} among the tests' spare ports"


def test_a_spare_port_is_free_outside_the_ephemeral_range_and_not_the_compat_stacks():
    import socket

    from services.common import endpoints
    from services.stack import compat

    assert not set(endpoints.SPARE_PORTS) & set(endpoints.LINUX_EPHEMERAL_PORTS)
    assert not {compat.KAFKA_PORT, compat.KAFKA_CONTROLLER_PORT, compat.MINIO_PORT, compat.MINIO_CONSOLE_PORT} & set(endpoints.SPARE_PORTS)
    ports = {endpoints.free_listen_port() for _ in range(20)}
    assert ports <= set(endpoints.SPARE_PORTS)
    for port in ports:
        with socket.socket() as sock:
            sock.bind((endpoints.LOOPBACK, port))  # free when handed out


def test_the_planners_length_scale_and_tier_masses_are_settings_and_wrong_masses_name_the_variable():
    from services.planner.service import PlannerSettings

    project = settings.load_service_settings(PlannerSettings, "planner", environ={})
    assert project.planner_tier_masses == (0.8, 0.1, 0.1) and project.planner_gp_length_scale == 0.6
    other = settings.load_service_settings(PlannerSettings, "planner", environ={"IEX_PLANNER_TIER_MASSES": "0.95, 0.03,0.02", "IEX_PLANNER_GP_LENGTH_SCALE": "1"})
    assert other.planner_tier_masses == (0.95, 0.03, 0.02) and other.planner_gp_length_scale == 1.0
    for wrong in ("0.8,0.1", "0.8,0.1,0.2", "0.8,x,0.1", "1.2,-0.1,-0.1"):
        with pytest.raises(SettingsError) as info:
            settings.load_service_settings(PlannerSettings, "planner", environ={"IEX_PLANNER_TIER_MASSES": wrong})
        assert "IEX_PLANNER_TIER_MASSES" in str(info.value)
