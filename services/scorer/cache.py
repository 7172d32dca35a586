"""Bounded, thread-safe LRU of image embeddings.

Keyed by (model name, version, image size, content key): an embedding is a pure function of
those, so entries never go stale; a new version simply stops hitting the old ones, which age out.
Duplicates (the same picture found by several queries) then cost a dictionary lookup.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Hashable, Sequence

import numpy as np


class EmbeddingCache:
    def __init__(self, max_entries: int) -> None:
        if max_entries < 0:
            raise ValueError(f"max_entries must be >= 0, got {max_entries}")
        self.max_entries = max_entries
        self._entries: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def get_many(self, keys: Sequence[Hashable]) -> list[np.ndarray | None]:
        out: list[np.ndarray | None] = []
        with self._lock:
            for key in keys:
                value = self._entries.get(key)
                if value is not None:
                    self._entries.move_to_end(key)
                out.append(value)
        return out

    def put_many(self, keys: Sequence[Hashable], values: np.ndarray) -> None:
        if self.max_entries == 0:
            return
        with self._lock:
            for key, value in zip(keys, values):
                row = np.array(value, dtype=np.float32)  # a copy: never pin the whole batch array
                row.setflags(write=False)
                self._entries[key] = row
                self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
