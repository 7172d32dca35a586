"""Dedup: exact duplicates, target decontamination, the content-addressed image store, auditable decisions."""
