"""`iex` without servers: argument handling, the errors a person acts on, and the report's pure helpers."""

from __future__ import annotations

import json

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from iex.v1 import planner_pb2
from services.common import endpoints
from services.cli import main as cli
from services.cli.report import IterationData, _short, stage_seconds, top_concepts_over_time


def test_json_is_accepted_anywhere_and_the_subcommands_exist():
    parser = cli.build_parser()
    for argv in (["explore", "status", "x"], ["explore", "top-concepts", "x"], ["explore", "cancel", "x"], ["report", "x"], ["data", "fetch"], ["run", "--branch", "animals/birds"]):
        assert parser.parse_args(argv).func
    assert parser.parse_args(["run"]).branch == "animals"


def test_an_unreachable_planner_says_how_to_start_one(capsys):
    address = f"127.0.0.1:{endpoints.free_listen_port()}"
    code = cli.main(["--planner", address, "explore", "status", "abc", "--json"])
    err = capsys.readouterr().err
    assert code == 2
    assert f"planner not reachable at {address}" in err and "iex stack up" in err


def _ts(seconds: float) -> Timestamp:
    t = Timestamp()
    t.FromNanoseconds(int(seconds * 1e9))
    return t


def test_stage_seconds_split_the_iteration():
    s = planner_pb2.IterationSummary(started_at=_ts(100), collected_at=_ts(130), trained_at=_ts(190), finished_at=_ts(200), planning_seconds=2.5)
    assert stage_seconds(s) == {"planning": 2.5, "collecting": 30.0, "training": 60.0, "serving": 10.0}
    running = planner_pb2.IterationSummary(started_at=_ts(100))
    assert stage_seconds(running) == {"planning": 0.0, "collecting": None, "training": None, "serving": None}


def test_top_concepts_over_time_keeps_gaps():
    one = IterationData(1, planner_pb2.IterationSummary(iteration=1), concept_reward_by_concept={"apple.n07739125": [0.5], "cup.n03147509": [0.1]})
    two = IterationData(2, planner_pb2.IterationSummary(iteration=2), concept_reward_by_concept={"apple.n07739125": [0.6, 0.4], "pear.n07767847": [0.7]})
    chosen, series = top_concepts_over_time([one, two], limit=2)
    assert chosen == ["pear.n07767847", "apple.n07739125"]
    assert series["pear.n07767847"] == [None, 0.7] and series["apple.n07739125"] == [0.5, 0.5]
    assert _short("apple.n07739125") == "apple" and _short("red circle") == "red circle"


# ---- one module per job: the shared display code has no command above it -------------------------


def test_services_cli_has_no_import_cycle():
    """main imports the commands (mainjob, demo); they and display/defaults/report never import main,
    and display/defaults import no command module."""
    import ast
    from pathlib import Path

    root = Path(cli.__file__).parent
    imports: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("services.cli"):
                found.add(node.module.removeprefix("services.cli").lstrip(".") or "")
                if node.module == "services.cli":
                    found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name.removeprefix("services.cli.") for a in node.names if a.name.startswith("services.cli."))
        imports[path.stem] = found - {""}
    for module, used in imports.items():
        if module not in ("main", "__main__"):
            assert "main" not in used, f"services/cli/{module}.py imports main"
    for shared in ("display", "defaults", "client"):
        assert not imports[shared] & {"main", "mainjob", "demo", "report"}, f"{shared} imports a command: {imports[shared]}"

    def reaches(start: str, seen: set[str]) -> set[str]:
        for nxt in imports.get(start, ()):
            if nxt not in seen:
                seen.add(nxt)
                reaches(nxt, seen)
        return seen

    for module in imports:
        assert module not in reaches(module, set()), f"import cycle through services/cli/{module}.py"


# ---- one set of defaults for `iex run` and `iex explore create` ----------------------------------


def _spec_fields(spec) -> dict:
    return {f: getattr(spec, f) for f in ("mode", "iterations", "queries_per_iteration", "images_per_query", "init", "image_size", "seed", "descriptors")}


def test_run_and_explore_create_send_the_same_defaults():
    from services.cli import defaults

    parser = cli.build_parser()
    run = defaults.exploration_spec(parser.parse_args(["run"]))
    create = defaults.exploration_spec(parser.parse_args(["explore", "create", "--target", "s3://iex/t"]))
    assert _spec_fields(run) == _spec_fields(create)
    d = defaults.EXPLORATION
    assert (create.iterations, create.queries_per_iteration, create.images_per_query, create.init, create.image_size) == (
        d.iterations,
        d.queries_per_iteration,
        d.images_per_query,
        d.init,
        d.image_size,
    )
    # Every budget is sent set, so the planner never substitutes its own default for it.
    assert all(create.HasField(f) for f in ("iterations", "queries_per_iteration", "images_per_query"))
    zero = defaults.exploration_spec(parser.parse_args(["explore", "create", "--target", "s3://iex/t", "--iterations", "0"]))
    assert zero.HasField("iterations") and zero.iterations == 0


def test_docs_table_of_defaults_is_the_module():
    """docs/cli.md's "Defaults of an exploration" table says what services/cli/defaults.py holds."""
    import re
    from pathlib import Path

    from services.cli import defaults

    text = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    section = text.split("## Defaults of an exploration", 1)[1].split("\n## ", 1)[0]
    rows = dict(re.findall(r"^\| `--[a-z-]+` \| `([a-z_]+)` \| `([^`]+)` \|$", section, re.M))
    expected = {k: str(v) for k, v in defaults.EXPLORATION.as_dict().items() if k not in ("trainer_env", "descriptors")}
    assert rows == expected
    for key, value in defaults.EXPLORATION.trainer_env.items():
        assert f"`{key}={value}`" in section


class _Planner:
    """A planner that validates like the real one (normalise_spec) and keeps what it was sent."""

    def __init__(self) -> None:
        self.specs = []

    def CreateExploration(self, request, context):
        from services.planner.validation import InvalidField, SpecDefaults, normalise_spec

        self.specs.append(request.spec)
        planner_defaults = SpecDefaults(
            iterations=40, queries_per_iteration=256, images_per_query=100, search_backend="local", init="random",
            backbone="mobilenetv3_small_050", image_size=64, iteration_deadline_seconds=60, search_backends=("local",),
        )
        try:
            spec = normalise_spec(request.spec, planner_defaults)
        except InvalidField as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return planner_pb2.CreateExplorationResponse(exploration=planner_pb2.Exploration(exploration_id=request.exploration_id or "e1", spec=spec))

    def TopConcepts(self, request, context):
        return planner_pb2.TopConceptsResponse(
            concepts=[
                planner_pb2.ConceptScore(concept="apple", observed_reward=0.0, times_queried=1, predicted_reward=0.2, uncertainty=0.1, sampling_probability=0.5),
                planner_pb2.ConceptScore(concept="pear", times_queried=2, predicted_reward=0.1, uncertainty=0.3, sampling_probability=0.3),
                planner_pb2.ConceptScore(concept="quince", predicted_reward=0.1, uncertainty=0.9, sampling_probability=0.2),
            ]
        )


@pytest.fixture
def fake_planner(monkeypatch):
    from concurrent import futures

    from iex.v1 import planner_pb2_grpc

    for var in ("IEX_TLS_CA", "IEX_TLS_CERT", "IEX_TLS_KEY", "IEX_AUTH_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    servicer = _Planner()
    handler = planner_pb2_grpc.PlannerServiceServicer()
    handler.CreateExploration = servicer.CreateExploration
    handler.TopConcepts = servicer.TopConcepts
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    planner_pb2_grpc.add_PlannerServiceServicer_to_server(handler, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}", servicer
    server.stop(0)


def test_explore_create_sends_the_defaults_and_a_zero_budget_is_refused(fake_planner, capsys):
    address, servicer = fake_planner
    assert cli.main(["--planner", address, "explore", "create", "--target", "s3://iex/t", "--concepts", "a,b", "--json"]) == 0
    sent = servicer.specs[-1]
    assert (sent.iterations, sent.queries_per_iteration, sent.images_per_query, sent.init, sent.image_size) == (3, 24, 16, "efficientnet-lite0", 96)
    capsys.readouterr()
    for flag, field in (("--iterations", "iterations"), ("--queries", "queries_per_iteration"), ("--images-per-query", "images_per_query")):
        for value in ("0", "-3"):
            code = cli.main(["--planner", address, "explore", "create", "--target", "s3://iex/t", "--concepts", "a", flag, value])
            err = capsys.readouterr().err
            assert code == 1 and f"INVALID_ARGUMENT: spec.{field}: must be at least 1, got {value}" in err


def test_top_concepts_names_never_queried_concepts(fake_planner, capsys):
    address, _ = fake_planner
    assert cli.main(["--planner", address, "explore", "top-concepts", "e1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "observed 0.000, queried 1x" in lines[0]  # observed, and its reward was 0
    assert "not observed yet, queried 2x" in lines[1]
    assert lines[2].rstrip().endswith("never queried") and "observed=" not in lines[2]
    assert cli.main(["--planner", address, "explore", "top-concepts", "e1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["concepts"]
    assert "observed_reward" in rows[0] and "observed_reward" not in rows[2]


# ---- quiet output: the user reads progress; logs and warnings go to files -------------------------


def test_a_helpers_json_logs_and_warnings_go_to_its_log_and_progress_to_the_screen(tmp_path):
    import sys

    from services.cli.mainjob import run_quietly

    script = (
        "import json, sys, warnings\n"
        "print(json.dumps({'level': 'INFO', 'msg': 'loaded'}), file=sys.stderr, flush=True)\n"
        "warnings.warn('old API', DeprecationWarning, stacklevel=1)\n"
        "print('embedding 146,347 concepts: 50%', file=sys.stderr, flush=True)\n"
        "print(json.dumps({'digest': 'abc'}), flush=True)\n"
    )
    log = tmp_path / "helper.log"
    shown: list[str] = []
    code = run_quietly([sys.executable, "-W", "always", "-c", script], {}, log, say=shown.append)
    assert code == 0
    assert shown == ["embedding 146,347 concepts: 50%"]
    kept = log.read_text()
    assert '"msg": "loaded"' in kept and "DeprecationWarning: old API" in kept and '"digest": "abc"' in kept


def test_iex_runs_own_logging_and_warnings_go_to_a_file(tmp_path, monkeypatch, capsys):
    import logging
    import warnings

    from services.cli.mainjob import quiet_logging

    monkeypatch.setenv("IEX_STATE_DIR", str(tmp_path))
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    try:
        path = quiet_logging()
        logging.getLogger("services.search").info("index loaded")
        warnings.warn("a library warning", UserWarning, stacklevel=1)
        for handler in root.handlers:
            handler.flush()
    finally:
        logging.captureWarnings(False)
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    captured = capsys.readouterr()
    assert "index loaded" not in captured.err and "a library warning" not in captured.err
    text = path.read_text()
    assert path == tmp_path / "logs" / "iex-run.log"
    assert "index loaded" in text and "a library warning" in text
