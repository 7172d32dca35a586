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
    contamination_max_hamming: int = setting(
        8,
        help=(
            "an image whose dHash and pHash are both within this many bits of one target evaluation image "
            "contaminates the target; -1: identical pixels only"
        ),
        minimum=-1,
        maximum=32,
    )
    target_refresh_s: float = setting(600.0, help="seconds before a target's evaluation listing is checked again for changes", minimum=1)
    target_hash_workers: int = setting(4, help="threads fetching and hashing target evaluation images", minimum=1, maximum=64)
    stats_persist_interval_s: float = setting(10.0, help="seconds between writes of this replica's decision counts to S3", minimum=0)
    replica_id: str = setting("", help="name of this replica's counts in S3 (dedup/stats/<id>.json); empty: the host name")
