"""`iex` without servers: argument handling, the errors a person acts on, and the report's pure helpers."""

from __future__ import annotations

import socket

from google.protobuf.timestamp_pb2 import Timestamp

from iex.v1 import planner_pb2
from services.cli import main as cli
from services.cli.report import IterationData, _short, stage_seconds, top_concepts_over_time


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_json_is_accepted_anywhere_and_the_subcommands_exist():
    parser = cli.build_parser()
    for argv in (["explore", "status", "x"], ["explore", "top-concepts", "x"], ["explore", "cancel", "x"], ["report", "x"], ["data", "fetch"], ["run", "--branch", "animals/birds"]):
        assert parser.parse_args(argv).func
    assert parser.parse_args(["run"]).branch == "food/fruit"


def test_an_unreachable_planner_says_how_to_start_one(capsys):
    address = f"127.0.0.1:{_free_port()}"
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
