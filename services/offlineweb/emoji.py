"""Emoji in five styles, one concept each: names from emoji-datasource's emoji.json, pixels from each set.

The concepts are emoji.json's entries (skin-tone variants and the Component category left out: they
repeat a concept or are not one). Every style of one emoji shares its caption's name and its synset,
so a concept is findable in each style and the styles differ only in how they draw it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from services.offlineweb import captions
from services.offlineweb.items import RenderTask, WebItem, make_id
from services.offlineweb.sources import BY_NAME
from services.offlineweb.synsets import SynsetMapper

SKIPPED_CATEGORIES = ("Component",)
STYLE_WORDS = {
    "google": "Emoji, Google style",
    "twitter": "Emoji, Twitter style",
    "openmoji": "Emoji, OpenMoji style",
    "fluent3d": "Emoji, 3D style",
    "noto": "Emoji, Noto color font",
}
NOTO_FONT = Path("usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")


@dataclass(frozen=True)
class EmojiConcept:
    unified: str  # "1F34E" or "1F468-200D-1F373"
    name: str  # "red apple"
    short_names: tuple[str, ...]  # ("apple",)
    category: str  # "Food & Drink"
    subcategory: str  # "food-fruit"
    image: str  # emoji-datasource file name, "1f34e.png"
    available: frozenset[str]  # emoji-datasource styles that have an image

    @property
    def characters(self) -> str:
        return "".join(chr(int(part, 16)) for part in self.unified.split("-"))

    @property
    def key(self) -> str:
        return self.unified.lower()

    def context_words(self) -> list[str]:
        """Most specific first: 'food-fruit', 'Food & Drink' -> fruit, food, food, drink."""
        return [*reversed(captions.subcategory_words(self.subcategory)), self.category]


def load_concepts(emoji_json: Path) -> list[EmojiConcept]:
    entries = json.loads(emoji_json.read_text(encoding="utf-8"))
    concepts = []
    for entry in sorted(entries, key=lambda e: (e.get("sort_order", 0), e["unified"])):
        if entry.get("category") in SKIPPED_CATEGORIES:
            continue
        name = captions.emoji_name(entry.get("name") or entry.get("short_name") or entry["unified"])
        concepts.append(
            EmojiConcept(
                unified=entry["unified"],
                name=name,
                short_names=tuple(entry.get("short_names") or ()),
                category=entry.get("category", ""),
                subcategory=entry.get("subcategory", ""),
                image=entry.get("image") or f"{entry['unified'].lower()}.png",
                available=frozenset(style for style in ("google", "twitter") if entry.get(f"has_img_{style}")),
            )
        )
    return concepts


def openmoji_tags(openmoji_json: Path) -> dict[str, list[str]]:
    """hexcode -> tags (Unicode CLDR tags, then OpenMoji's own), skin-tone variants left out."""
    tags: dict[str, list[str]] = {}
    for entry in json.loads(openmoji_json.read_text(encoding="utf-8")):
        if entry.get("skintone"):
            continue
        tags[entry["hexcode"].upper()] = captions.tag_list(entry.get("tags", "")) + captions.tag_list(entry.get("openmoji_tags", ""))
    return tags


def _variants(unified: str) -> list[str]:
    """'2764-FE0F' -> ['2764-FE0F', '2764']: sets differ on whether they keep emoji presentation selectors."""
    stripped = "-".join(p for p in unified.split("-") if p != "FE0F")
    return [unified] if stripped == unified else [unified, stripped]


def style_task(style: str, concept: EmojiConcept, root: Path, openmoji_files: set[str] | None = None) -> RenderTask | None:
    """Where `style` draws `concept`, or None when that set has no image of it."""
    if style in ("google", "twitter"):
        if style not in concept.available:
            return None
        path = root / "img" / style / "64" / concept.image
        return RenderTask("raster", str(path)) if path.is_file() else None
    if style == "openmoji":
        for code in _variants(concept.unified):
            if openmoji_files is None or f"{code}.svg" in openmoji_files:
                path = root / "color" / "svg" / f"{code}.svg"
                if path.is_file():
                    return RenderTask("svg", str(path))
        return None
    if style == "fluent3d":
        for code in _variants(concept.unified):
            path = root / "assets" / f"{code.lower()}.webp"
            if path.is_file():
                return RenderTask("raster", str(path))
        return None
    if style == "noto":
        return RenderTask("glyph", str(root / NOTO_FONT), concept.characters)
    raise ValueError(f"unknown emoji style {style!r}")


def items(concepts: list[EmojiConcept], roots: dict[str, Path], mapper: SynsetMapper, tags: dict[str, list[str]] | None = None) -> Iterator[WebItem]:
    """Every (concept, style) that has an image, styles in the order of `roots`."""
    tags = tags or {}
    openmoji_files = {p.name for p in (roots["openmoji"] / "color" / "svg").glob("*.svg")} if "openmoji" in roots else None
    for concept in concepts:
        aliases = [captions.short_name_text(s) for s in concept.short_names]
        match = mapper.map_texts([concept.name, *aliases], mapper.context_roots(concept.context_words()))
        keywords = captions.subcategory_words(concept.subcategory)
        concept_tags = next((tags[code] for code in _variants(concept.unified) if code in tags), [])
        for style, root in roots.items():
            task = style_task(style, concept, root, openmoji_files)
            if task is None:
                continue
            style_keywords = keywords + (concept_tags if style == "openmoji" else [])
            yield WebItem(
                id=make_id(style, concept.key),
                source=style,
                caption=captions.compose(concept.name, aliases, style_keywords, STYLE_WORDS[style]),
                synset=match.wnid if match else "",
                concept=match.lemma if match else concept.name,
                license=BY_NAME[style].license,
                task=task,
                group=concept.key,
            )
