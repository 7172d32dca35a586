"""The local stack's server definitions: no secret in process arguments, the default corpus made."""

from __future__ import annotations

import stat

from services.stack import servers


def test_the_s3_secret_is_not_in_the_arguments_of_seaweedfs(tmp_path, monkeypatch):
    monkeypatch.setenv("IEX_STATE_DIR", str(tmp_path))
    secret = "a-secret-nobody-may-see-in-ps-1234"
    environ = {"IEX_S3_ACCESS_KEY": "someone", "IEX_S3_SECRET_KEY": secret}
    process = servers.s3_process(environ)
    argv = " ".join(process.argv)
    assert secret not in argv
    assert "password" not in argv  # the admin server's own password is not there either
    # The S3 keys are in the identities file only, readable by the owner only.
    identities = tmp_path / "s3" / "identities.json"
    assert secret in identities.read_text()
    assert stat.S_IMODE(identities.stat().st_mode) == 0o600
    # The admin server's password comes from weed's options file: random, private, stable.
    [options_flag] = [a for a in process.argv if a.startswith("-options=")]
    options = tmp_path / "s3" / "weed.options"
    assert options_flag == f"-options={options}"
    content = options.read_text()
    assert content.startswith("admin.password=") and len(content.strip()) > len("admin.password=") + 20
    assert secret not in content
    assert stat.S_IMODE(options.stat().st_mode) == 0o600
    servers.s3_process(environ)
    assert options.read_text() == content


def test_service_start_generates_the_default_corpus_when_stack_env_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("IEX_STATE_DIR", str(tmp_path))
    monkeypatch.delenv("IEX_SEARCH_CORPUS_DIR", raising=False)
    made = []
    from services.search import synthetic

    monkeypatch.setattr(synthetic, "make_corpus", lambda path, per_concept: made.append(path))
    env = servers.stack_env()
    assert env["IEX_SEARCH_CORPUS_DIR"] == str(tmp_path / "corpus" / "synthetic")
    servers.service_process("search", env)
    assert made == [tmp_path / "corpus" / "synthetic"]


def test_a_corpus_of_the_user_is_never_generated(tmp_path, monkeypatch):
    monkeypatch.setenv("IEX_STATE_DIR", str(tmp_path))
    made = []
    from services.search import synthetic

    monkeypatch.setattr(synthetic, "make_corpus", lambda path, per_concept: made.append(path))
    mine = tmp_path / "my-photos"
    servers.service_process("search", {**servers.stack_env(), "IEX_SEARCH_CORPUS_DIR": str(mine)})
    assert made == []


# ---- status: real readiness, not "-" -------------------------------------------------------------


def test_status_probes_running_processes_and_reports_their_start_time(tmp_path, monkeypatch):
    import subprocess
    import sys

    from services.stack import __main__ as stack_cli

    monkeypatch.setenv("IEX_STATE_DIR", str(tmp_path))
    for var in ("IEX_KAFKA_BOOTSTRAP", "IEX_S3_ENDPOINT", "IEX_TRITON_GRPC_URL", "IEX_TRITON_HTTP_URL", "IEX_PROMETHEUS_URL"):
        monkeypatch.delenv(var, raising=False)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    try:
        kafka, planner = servers.handle("kafka"), servers.handle("planner")
        for proc in (kafka, planner):
            proc.pid_file.parent.mkdir(parents=True, exist_ok=True)
            proc.pid_file.write_text(str(sleeper.pid))
        kafka.record_ready(sleeper.pid, 1.234)
        planner.record_ready(sleeper.pid + 1, 9.0)  # a record of an earlier process: not this one's
        probed = []

        def fake_probe(name, timeout_s=1.0):
            probed.append(name)
            return (True, "") if name == "kafka" else (False, "not serving")

        monkeypatch.setattr(servers, "probe", fake_probe)
        rows = {row.name: row for row in servers.status()}
        assert sorted(probed) == ["kafka", "planner"]  # only running processes are probed
        assert rows["kafka"].ready is True and rows["kafka"].ready_s == 1.23
        assert rows["planner"].ready is False and rows["planner"].detail == "not serving" and rows["planner"].ready_s is None
        assert rows["s3"].state == "stopped" and rows["s3"].ready is None
        assert rows["kafka"].as_dict()["ready"] is True
        table = stack_cli._table(list(rows.values())).splitlines()
        assert table[0].split()[:5] == ["NAME", "STATE", "PID", "READY", "STARTED"]
        kafka_line = next(line for line in table if line.startswith("kafka"))
        assert " yes " in kafka_line and "1.2s" in kafka_line
        assert "no (not serving)" in next(line for line in table if line.startswith("planner"))
        kafka.stop()  # stopping forgets the record
        assert not kafka.ready_file.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_stack_scrapes_the_broker_and_the_s3_server(tmp_path, monkeypatch):
    from services.common import endpoints

    monkeypatch.setenv("IEX_STATE_DIR", str(tmp_path))
    text = servers.prometheus_config()
    for job, port in (("kafka", endpoints.KAFKA_METRICS_PORT), ("s3", endpoints.S3_METRICS_PORT), ("triton", endpoints.TRITON_METRICS_PORT)):
        assert f"job_name: {job}\n    static_configs:\n      - targets: [\"127.0.0.1:{port}\"]" in text
    assert "job_name: kafka" not in servers.prometheus_config(scrape_kafka=False)
    argv = servers.s3_process().argv
    assert f"-metricsPort={endpoints.S3_METRICS_PORT}" in argv and "-metricsIp=127.0.0.1" in argv
    kafka = servers.kafka_process("memory")
    assert kafka.argv[1:4] == ["-m", "services.stack.otlp_bridge", "--listen"]
    assert kafka.argv[-2:] == ["--otlp-endpoint-url", f"http://127.0.0.1:{endpoints.KAFKA_METRICS_PORT}/"]
    assert endpoints.KAFKA_METRICS_PORT in servers.ports("kafka") and endpoints.S3_METRICS_PORT in servers.ports("s3")
