"""Checks of exploration requests; every problem names the request field."""

from __future__ import annotations

import re
from dataclasses import dataclass

from iex.v1 import common_pb2, planner_pb2
from services.planner import gp, sampling
from services.planner.descriptors import LLM, SOURCES as DESCRIPTOR_SOURCES
from services.planner.vocabulary import CUSTOM, WORDNET

EXPLORATION_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")
# What the trainer can initialise from (services/trainer/initialisation.py): a named init or a checkpoint in S3.
KNOWN_INITS = ("random", "efficientnet-lite0")
S3_CHECKPOINT = re.compile(r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]/[^\x00-\x1f]{1,1000}[^/]$")
# Weights that only fit one architecture: a request naming that init gets its backbone by default.
INIT_BACKBONES = {"efficientnet-lite0": "tf_efficientnet_lite0"}


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
    # "wordnet", or "" when the planner has no default vocabulary (requests must bring concepts).
    vocabulary: str = WORDNET
    descriptors: str = "none"
    llm_configured: bool = False
    spread: float = sampling.PAPER_SPREAD
    tier_masses: tuple[float, ...] = sampling.PAPER_MASSES
    gp_length_scale: float = gp.PROJECT_LENGTH_SCALE
    gp_noise: float = 0.1
    gp_rank: int = 512
    gp_exact_max: int = 0


# The budgets of ExplorationSpec (optional fields): unset takes the planner's default; a value set
# must be at least 1, so `--iterations 0` is refused rather than read as "the default".
BUDGETS: tuple[tuple[str, int], ...] = (("iterations", 1000), ("queries_per_iteration", 100_000), ("images_per_query", 1000))


def _normalise_budget(out: planner_pb2.ExplorationSpec, name: str, default: int, high: int) -> None:
    field = f"spec.{name}"
    if not out.HasField(name):
        setattr(out, name, default)
        return
    value = getattr(out, name)
    if value < 1:
        raise InvalidField(field, f"must be at least 1, got {value} (leave it unset for the planner's default, {default})")
    _check_range(field, value, 1, high)


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
    if len(out.labels) > 10_000:
        raise InvalidField("spec.labels", "at most 10000 labels")
    if out.label_descriptions:
        if len(out.label_descriptions) != len(out.labels):
            raise InvalidField("spec.label_descriptions", f"must have one entry per label ({len(out.labels)}), got {len(out.label_descriptions)}")
        for i, value in enumerate(out.label_descriptions):
            if len(value) > 500 or any(ch in value for ch in "\n\r\t"):
                raise InvalidField(f"spec.label_descriptions[{i}]", "must be one line, at most 500 characters")
    _normalise_vocabulary(out, defaults)
    if not out.descriptors:
        out.descriptors = defaults.descriptors
    if out.descriptors not in DESCRIPTOR_SOURCES:
        raise InvalidField("spec.descriptors", f"must be one of {', '.join(DESCRIPTOR_SOURCES)}, got {out.descriptors[:50]!r}")
    if out.descriptors == LLM and not defaults.llm_configured:
        raise InvalidField("spec.descriptors", "no LLM endpoint is configured on the planner (IEX_PLANNER_LLM_URL)")
    for name, high in BUDGETS:
        _normalise_budget(out, name, getattr(defaults, name), high)
    if not out.search_backend:
        out.search_backend = defaults.search_backend
    if out.search_backend not in defaults.search_backends:
        raise InvalidField("spec.search_backend", f"unknown backend {out.search_backend!r}; known: {', '.join(defaults.search_backends)}")
    if not out.init:
        out.init = defaults.init
    if out.init not in KNOWN_INITS and not S3_CHECKPOINT.match(out.init):
        raise InvalidField("spec.init", f"must be one of {', '.join(KNOWN_INITS)} or s3://bucket/key of a checkpoint, got {out.init[:100]!r}")
    if not out.backbone and not out.init.startswith("s3://"):  # a checkpoint brings its own architecture
        out.backbone = INIT_BACKBONES.get(out.init, defaults.backbone)
    elif out.init in INIT_BACKBONES and out.backbone != INIT_BACKBONES[out.init]:
        raise InvalidField("spec.backbone", f"{out.init} weights are for {INIT_BACKBONES[out.init]}, not {out.backbone[:100]!r}")
    if out.backbone and not re.match(r"^[a-z0-9_.]{1,80}$", out.backbone):
        raise InvalidField("spec.backbone", f"not a timm model name: {out.backbone[:100]!r}")
    if out.image_size == 0:
        out.image_size = defaults.image_size
    _check_range("spec.image_size", out.image_size, 16, 1024)
    if out.iteration_deadline_seconds == 0:
        out.iteration_deadline_seconds = defaults.iteration_deadline_seconds
    _check_range("spec.iteration_deadline_seconds", out.iteration_deadline_seconds, 1, 7 * 86400)
    if out.seed < 0:
        raise InvalidField("spec.seed", "must be >= 0")
    if out.max_images < 0:
        raise InvalidField("spec.max_images", "must be >= 0 (0: no limit)")
    if not 0 <= out.max_wall_seconds <= 365 * 86400:
        raise InvalidField("spec.max_wall_seconds", f"must be between 0 (no limit) and {365 * 86400}, got {out.max_wall_seconds}")
    _normalise_sampling(out, defaults)
    _normalise_reward_model(out, defaults)
    return out


def _normalise_vocabulary(out: planner_pb2.ExplorationSpec, defaults: SpecDefaults) -> None:
    if out.vocabulary not in ("", WORDNET, CUSTOM):
        raise InvalidField("spec.vocabulary", f"must be {WORDNET!r} or {CUSTOM!r}, got {out.vocabulary[:50]!r}")
    if out.concepts:
        if out.vocabulary == WORDNET:
            raise InvalidField("spec.concepts", "must be empty when spec.vocabulary is 'wordnet'")
        out.vocabulary = CUSTOM
        return
    if out.vocabulary == CUSTOM:
        raise InvalidField("spec.concepts", "required when spec.vocabulary is 'custom'")
    if out.mode == common_pb2.EXPLORATION_MODE_LABELS_ONLY and not out.vocabulary:
        return  # queries only the labels: no vocabulary involved
    if defaults.concepts:
        out.concepts.extend(defaults.concepts)
        out.vocabulary = CUSTOM
    elif out.vocabulary == WORDNET or defaults.vocabulary == WORDNET:
        out.vocabulary = WORDNET
    else:
        raise InvalidField("spec.concepts", "empty, and the planner has no default vocabulary configured")


def _normalise_sampling(out: planner_pb2.ExplorationSpec, defaults: SpecDefaults) -> None:
    s = out.sampling
    if s.spread == 0:
        s.spread = defaults.spread
    if not 0 < s.spread <= 100:
        raise InvalidField("spec.sampling.spread", f"must be in (0, 100], got {s.spread}")
    if not s.tier_sizes and not s.tier_masses:
        s.tier_sizes.extend(sampling.PAPER_TIERS)
        s.tier_masses.extend(defaults.tier_masses)
    elif not s.tier_sizes:
        if len(s.tier_masses) != len(sampling.PAPER_TIERS) + 1:
            raise InvalidField("spec.sampling.tier_masses", f"without tier_sizes, needs {len(sampling.PAPER_TIERS) + 1} entries (tiers {list(sampling.PAPER_TIERS)})")
        s.tier_sizes.extend(sampling.PAPER_TIERS)
    elif not s.tier_masses:
        raise InvalidField("spec.sampling.tier_masses", "required with spec.sampling.tier_sizes (one entry more)")
    if len(s.tier_sizes) > 16:
        raise InvalidField("spec.sampling.tier_sizes", "at most 16 tiers")
    for i, size in enumerate(s.tier_sizes):
        if not 1 <= size <= 10_000_000:
            raise InvalidField(f"spec.sampling.tier_sizes[{i}]", f"must be between 1 and 10000000, got {size}")
    if len(s.tier_masses) != len(s.tier_sizes) + 1:
        raise InvalidField("spec.sampling.tier_masses", f"needs one entry more than tier_sizes ({len(s.tier_sizes) + 1}), got {len(s.tier_masses)}")
    for i, mass in enumerate(s.tier_masses):
        if not 0 <= mass <= 1:
            raise InvalidField(f"spec.sampling.tier_masses[{i}]", f"must be between 0 and 1, got {mass}")
    if abs(sum(s.tier_masses) - 1.0) > 1e-6:
        raise InvalidField("spec.sampling.tier_masses", f"must sum to 1, got {sum(s.tier_masses):.6f}")
    if not s.HasField("label_fraction"):
        s.label_fraction = 0.5
    if not 0 <= s.label_fraction <= 1:
        raise InvalidField("spec.sampling.label_fraction", f"must be between 0 and 1, got {s.label_fraction}")
    if s.prune_fraction == 0:
        s.prune_fraction = 0.1
    if not 0 < s.prune_fraction <= 1:
        raise InvalidField("spec.sampling.prune_fraction", f"must be in (0, 1], got {s.prune_fraction}")
    if s.prune_neighbours < 0 or (out.labels and s.prune_neighbours > len(out.labels)):
        raise InvalidField("spec.sampling.prune_neighbours", f"must be between 0 (a third of the labels) and the number of labels, got {s.prune_neighbours}")


def _normalise_reward_model(out: planner_pb2.ExplorationSpec, defaults: SpecDefaults) -> None:
    r = out.reward_model
    if r.length_scale == 0:
        r.length_scale = defaults.gp_length_scale
    if not 0.01 <= r.length_scale <= 100:
        raise InvalidField("spec.reward_model.length_scale", f"must be between 0.01 and 100, got {r.length_scale}")
    if r.noise == 0:
        r.noise = defaults.gp_noise
    if not 1e-6 <= r.noise <= 100:
        raise InvalidField("spec.reward_model.noise", f"must be between 1e-6 and 100, got {r.noise}")
    if r.rank == 0:
        r.rank = defaults.gp_rank
    if not 16 <= r.rank <= 8192:
        raise InvalidField("spec.reward_model.rank", f"must be between 16 and 8192, got {r.rank}")
    if r.exact_max == 0:
        r.exact_max = defaults.gp_exact_max
    if not 0 <= r.exact_max <= 200_000:
        raise InvalidField("spec.reward_model.exact_max", f"must be between 0 (automatic) and 200000, got {r.exact_max}")
