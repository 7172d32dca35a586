"""Settings of the dedup service (IEX_* variables on top of the shared ones)."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.endpoints import LOOPBACK, SERVICE_PORTS
from services.common.settings import ServiceSettings, setting
from services.dedup.hashing import DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class DedupSettings(ServiceSettings):
    planner_address: str = setting(
        f"{LOOPBACK}:{SERVICE_PORTS['planner'].grpc}",
        help="planner gRPC host:port, asked for the target of an exploration whose creation event dedup has not seen yet; empty: never ask",
    )
    max_image_bytes: int = setting(32 * 1024 * 1024, help="staged images larger than this are decided INVALID (too_large)", minimum=1024)
    max_image_pixels: int = setting(
        DEFAULT_MAX_PIXELS, help="decompression-bomb guard: images with more pixels are INVALID (checked before decoding)", minimum=1
    )
    min_image_side: int = setting(16, help="images with a side shorter than this (tracking pixels, icons) are INVALID (too_small)", minimum=1)
    near_duplicate_max_distance: int = setting(
        20,
        help=(
            "an image whose pHash + dHash Hamming distance (0-128) to a stored image is at most this is a near-duplicate "
            "of it and is not stored; -1: exact duplicates only (bench/dedup measures precision and recall per threshold)"
        ),
        minimum=-1,
        maximum=64,
    )
    contamination_max_distance: int = setting(
        22,
        help=(
            "an image whose pHash + dHash Hamming distance to one target evaluation image is at most this contaminates "
            "the target and is never stored; -1: identical pixels only"
        ),
        minimum=-1,
        maximum=64,
    )
    near_index_refresh_s: float = setting(
        5.0, help="seconds between listings of the shared near-duplicate index in S3 (what other replicas stored)", minimum=0.1
    )
    near_index_flush_s: float = setting(
        2.0, help="seconds between writes of this replica's new index entries as one segment (how soon other replicas see them)", minimum=0.1
    )
    near_index_wal_grace_s: float = setting(
        20.0,
        help="another replica's write-ahead index entry still listed after this many seconds is loaded (its writer should have flushed it)",
        minimum=0,
    )
    near_index_orphan_after_s: float = setting(
        120.0, help="another replica's write-ahead index entry still listed after this many seconds is folded into a segment here", minimum=1
    )
    near_index_max_segments: int = setting(
        24, help="more index segments than this in S3 are merged (smallest first), bounding what a starting replica reads", minimum=2
    )
    target_refresh_s: float = setting(600.0, help="seconds before a target's evaluation listing is checked again for changes", minimum=1)
    dedup_inline_max_bytes: int = setting(
        256 * 1024,
        help="new objects up to this size also travel in their ImageDecision, so the scorer skips reading them from S3 (0: never; keep under half of IEX_KAFKA_MAX_MESSAGE_BYTES)",
        minimum=0,
    )
    dedup_decision_threads: int = setting(
        8, help="fetched images of one poll decided at once (their S3 round trips overlap; new-object claims take turns)", minimum=1, maximum=64
    )
    target_hash_workers: int = setting(4, help="threads fetching and hashing target evaluation images", minimum=1, maximum=64)
    stats_persist_interval_s: float = setting(10.0, help="seconds between writes of this replica's decision counts to S3", minimum=0)
    replica_id: str = setting(
        "", help="name of this replica's counts in S3 (dedup/stats/<id>.json) and of its index segments; empty: the host name"
    )
