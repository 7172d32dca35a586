"""A small reader of the WordNet 3.0 database files (Debian `wordnet-base`), nouns only.

Simpler and faster than NLTK's loader, and offline: `data.noun` holds one synset a line
(offset, lemmas, pointers, gloss). Synset offsets equal ImageNet's wnids (n + 8-digit offset).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterable, Iterator

from services.common import debpkg

HYPERNYM_POINTERS = ("@", "@i")  # hypernym, instance hypernym


@dataclass(frozen=True)
class Synset:
    offset: int
    lemmas: tuple[str, ...]
    hypernyms: tuple[int, ...]
    gloss: str

    @property
    def wnid(self) -> str:
        return f"n{self.offset:08d}"

    @property
    def definition(self) -> str:
        """The gloss without its examples (which follow the first `; "`)."""
        return self.gloss.split('; "')[0].strip()


@dataclass(frozen=True)
class Concept:
    """One (lemma, synset) pair: the paper's vocabulary unit."""

    lemma: str
    synset: int
    text: str


def database_dir() -> Path:
    """$IEX_WORDNET_DIR, else the cached Debian wordnet-base package (fetched on first use)."""
    configured = os.environ.get("IEX_WORDNET_DIR")
    if configured:
        return Path(configured)
    return debpkg.fetch("wordnet-base") / "usr" / "share" / "wordnet"


def _lemma_text(raw: str) -> str:
    return raw.replace("_", " ")


def parse_data_line(line: str) -> Synset | None:
    if not line or line.startswith("  "):
        return None  # licence header
    head, _, gloss = line.partition(" | ")
    fields = head.split()
    offset = int(fields[0])
    word_count = int(fields[3], 16)
    lemmas = tuple(_lemma_text(fields[4 + 2 * i]) for i in range(word_count))
    pos = 4 + 2 * word_count
    pointer_count = int(fields[pos])
    pos += 1
    hypernyms = []
    for _ in range(pointer_count):
        symbol, target, target_pos = fields[pos], int(fields[pos + 1]), fields[pos + 2]
        if symbol in HYPERNYM_POINTERS and target_pos == "n":
            hypernyms.append(target)
        pos += 4
    return Synset(offset=offset, lemmas=lemmas, hypernyms=tuple(hypernyms), gloss=gloss.strip())


class WordNet:
    def __init__(self, synsets: Iterable[Synset]) -> None:
        self.synsets: dict[int, Synset] = {s.offset: s for s in synsets}

    @classmethod
    def load(cls, directory: Path | None = None) -> "WordNet":
        path = (directory or database_dir()) / "data.noun"
        with open(path, encoding="utf-8") as handle:
            return cls(s for s in map(parse_data_line, handle) if s is not None)

    @cached_property
    def by_lemma(self) -> dict[str, list[int]]:
        index: dict[str, list[int]] = {}
        for synset in self.synsets.values():
            for lemma in synset.lemmas:
                index.setdefault(lemma.lower(), []).append(synset.offset)
        return index

    def concept_text(self, lemma: str, synset: Synset) -> str:
        """The paper's text for embedding a concept: "{lemma} ({hypernym}): {definition}."."""
        hypernym = self.synsets[synset.hypernyms[0]].lemmas[0] if synset.hypernyms and synset.hypernyms[0] in self.synsets else "entity"
        return f"{lemma} ({hypernym}): {synset.definition}."

    def concepts(self) -> Iterator[Concept]:
        """Every (lemma, synset) pair of the nouns, in offset order (146,347 in WordNet 3.0, the paper's vocabulary)."""
        for offset in sorted(self.synsets):
            synset = self.synsets[offset]
            for lemma in synset.lemmas:
                yield Concept(lemma=lemma, synset=offset, text=self.concept_text(lemma, synset))

    def ancestors(self, offset: int) -> set[int]:
        seen: set[int] = set()
        stack = list(self.synsets[offset].hypernyms) if offset in self.synsets else []
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(self.synsets[current].hypernyms if current in self.synsets else ())
        return seen

    def in_subtree(self, offset: int, root: int) -> bool:
        return offset == root or root in self.ancestors(offset)

    def subtree(self, root: int) -> set[int]:
        """`root` and every synset below it (hyponyms and instances, transitively)."""
        children: dict[int, list[int]] = {}
        for synset in self.synsets.values():
            for parent in synset.hypernyms:
                children.setdefault(parent, []).append(synset.offset)
        out, stack = set(), [root]
        while stack:
            current = stack.pop()
            if current not in out:
                out.add(current)
                stack.extend(children.get(current, ()))
        return out
