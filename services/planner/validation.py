"""Checks of exploration requests; every problem names the request field."""

from __future__ import annotations

import re
from dataclasses import dataclass

from iex.v1 import common_pb2, planner_pb2

EXPLORATION_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
# What the trainer can initialise from today; pretrained and s3:// checkpoints arrive with the trainer issue.
KNOWN_INITS = ("random",)


class InvalidField(ValueError):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


@dataclass(frozen=True)
class SpecDefaults:
    iterations: int
    queries_per_iteration: int
    images_per_query: int
    search_backend: str
    init: str
    backbone: str
    image_size: int
    iteration_deadline_seconds: int
    search_backends: tuple[str, ...]
    concepts: tuple[str, ...] = ()


def _check_range(field: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise InvalidField(field, f"must be between {low} and {high}, got {value}")


def check_exploration_id(value: str, field: str = "exploration_id") -> str:
    if not EXPLORATION_ID.match(value or ""):
        raise InvalidField(field, "must be 1-40 lowercase letters, digits or '-', starting with a letter or digit")
    return value


def normalise_spec(spec: planner_pb2.ExplorationSpec, defaults: SpecDefaults) -> planner_pb2.ExplorationSpec:
    """Returns a copy with defaults filled in; raises InvalidField on the first bad field."""
    out = planner_pb2.ExplorationSpec()
    out.CopyFrom(spec)
    if len(out.display_name) > 200:
        raise InvalidField("spec.display_name", "at most 200 characters")
    if not out.target_uri:
        raise InvalidField("spec.target_uri", "required (s3://bucket/prefix holding train/ images)")
    if not re.match(r"^s3://[a-z0-9][a-z0-9.\-]{1,62}(/[^\s]*)?$", out.target_uri):
        raise InvalidField("spec.target_uri", f"must look like s3://bucket/prefix, got {out.target_uri[:100]!r}")
    if out.mode == common_pb2.EXPLORATION_MODE_UNSPECIFIED:
        out.mode = common_pb2.EXPLORATION_MODE_IE
    if out.mode not in common_pb2.ExplorationMode.values():
        raise InvalidField("spec.mode", f"unknown mode {out.mode}")
    if out.mode in (common_pb2.EXPLORATION_MODE_LABELS, common_pb2.EXPLORATION_MODE_LABELS_ONLY) and not out.labels:
        raise InvalidField("spec.labels", "required by the label-guided modes")
    for field, values in (("spec.concepts", out.concepts), ("spec.labels", out.labels)):
        if len(values) > 500_000:
            raise InvalidField(field, "at most 500000 entries")
        for i, value in enumerate(values):
            if not value.strip() or len(value) > 200 or any(ch in value for ch in "\n\r\t"):
                raise InvalidField(f"{field}[{i}]", "must be non-empty, one line, at most 200 characters")
    if not out.concepts:
        if not defaults.concepts and out.mode != common_pb2.EXPLORATION_MODE_LABELS_ONLY:
            raise InvalidField("spec.concepts", "empty, and the planner has no default vocabulary configured")
        out.concepts.extend(defaults.concepts)
    if out.iterations == 0:
        out.iterations = defaults.iterations
    _check_range("spec.iterations", out.iterations, 1, 1000)
    if out.queries_per_iteration == 0:
        out.queries_per_iteration = defaults.queries_per_iteration
    _check_range("spec.queries_per_iteration", out.queries_per_iteration, 1, 100_000)
    if out.images_per_query == 0:
        out.images_per_query = defaults.images_per_query
    _check_range("spec.images_per_query", out.images_per_query, 1, 1000)
    if not out.search_backend:
        out.search_backend = defaults.search_backend
    if out.search_backend not in defaults.search_backends:
        raise InvalidField("spec.search_backend", f"unknown backend {out.search_backend!r}; known: {', '.join(defaults.search_backends)}")
    if not out.init:
        out.init = defaults.init
    if out.init not in KNOWN_INITS:
        raise InvalidField("spec.init", f"must be one of {', '.join(KNOWN_INITS)}, got {out.init[:100]!r}")
    if not out.backbone:
        out.backbone = defaults.backbone
    if not re.match(r"^[a-z0-9_.]{1,80}$", out.backbone):
        raise InvalidField("spec.backbone", f"not a timm model name: {out.backbone[:100]!r}")
    if out.image_size == 0:
        out.image_size = defaults.image_size
    _check_range("spec.image_size", out.image_size, 16, 1024)
    if out.iteration_deadline_seconds == 0:
        out.iteration_deadline_seconds = defaults.iteration_deadline_seconds
    _check_range("spec.iteration_deadline_seconds", out.iteration_deadline_seconds, 1, 7 * 86400)
    if out.seed < 0:
        raise InvalidField("spec.seed", "must be >= 0")
    return out
