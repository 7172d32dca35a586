"""Hypothesis profiles for the fuzz suite.

`ci` (default) is bounded so the suite runs in about two minutes on two cores; `deep` is for a
longer local session: IEX_FUZZ_PROFILE=deep pytest tests/fuzz. Examples are derived from a fixed
seed in `ci`, so a failure in CI reproduces on a laptop; `deep` explores freely and keeps its
findings in .hypothesis/ (git-ignored) for the next run.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci",
    max_examples=120,
    deadline=3000,  # ms per example: a decoder that needs more than this on a tiny input is a finding
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "deep",
    max_examples=5000,
    deadline=5000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.load_profile(os.environ.get("IEX_FUZZ_PROFILE", "ci"))
