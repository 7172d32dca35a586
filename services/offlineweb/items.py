"""One image of the offline web before it is rendered: where its pixels come from, its caption, its synset."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from services.offlineweb import render

ID_MAX = 128
_UNSAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass(frozen=True)
class RenderTask:
    kind: str  # "raster" (PNG, WebP), "svg", or "glyph" (text drawn with a colour font)
    path: str  # the source file (the font for glyphs)
    text: str = ""  # the glyph's characters

    def run(self, max_side: int) -> bytes:
        from pathlib import Path

        if self.kind == "raster":
            return render.raster(Path(self.path), max_side)
        if self.kind == "svg":
            return render.svg(Path(self.path), max_side)
        if self.kind == "glyph":
            return render.emoji_glyph(Path(self.path), self.text, max_side)
        raise render.RenderError("unknown-kind", self.kind)


@dataclass(frozen=True)
class WebItem:
    id: str
    source: str  # a sources.SOURCES name: google, twitter, openmoji, fluent3d, noto, openclipart, tuxpaint
    caption: str
    synset: str  # wnid, "" when no WordNet noun matched
    concept: str  # the matched lemma, else the item's own name
    license: str
    task: RenderTask
    group: str = ""  # emoji: the unified code point sequence, shared by the five styles of one emoji

    @property
    def file(self) -> str:
        return f"images/{self.source}/{self.id}.png"


def make_id(source: str, name: str) -> str:
    """'openclipart' + 'food/fruit/apple_bitten_dan_gerhard_01' -> 'openclipart-food-fruit-apple_bitten_dan_gerhard_01'.

    IDs follow the corpus pattern and stay under 128 characters; a long name keeps its start and a
    hash of the whole, so two long names never collide.
    """
    slug = _UNSAFE_ID.sub("-", name).strip("-._") or "item"
    candidate = f"{source}-{slug}"
    if len(candidate) <= ID_MAX:
        return candidate
    digest = hashlib.sha256(name.encode()).hexdigest()[:12]
    return f"{candidate[: ID_MAX - 13].rstrip('-._')}-{digest}"
