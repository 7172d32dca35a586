"""Bounded load test: the normal query rate and ten times it, side by side (python -m bench.load)."""
