"""Descriptors: the adjective put in front of a concept to make a query ("baby duck"; the paper's "Ours++").

Pluggable sources, chosen per exploration (`spec.descriptors`):

- `none`: the query is the concept alone.
- `curated`: a fixed list of visual qualities (colour, size, age, material, state, pattern).
- `wordnet`: offline, from WordNet 3.0: adjectives of the concept's own definition ("apple: fruit
  with red or yellow or green skin and sweet to tart crisp whitish flesh" gives red, yellow, green,
  sweet, tart, crisp, whitish) and adjectives linked to its synset or hypernyms by WordNet's attribute
  relation; falls back to `curated` when a concept has none.
- `llm`: any OpenAI-compatible completions endpoint with the paper's prompt (temperature 0.9, cut at
  the first , . _ or newline). A failing endpoint falls back to `wordnet` for that batch; the source
  actually used is recorded with each query.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

log = logging.getLogger(__name__)

NONE, CURATED, WORDNET, LLM = "none", "curated", "wordnet", "llm"
SOURCES = (NONE, CURATED, WORDNET, LLM)

PAPER_PROMPT = (
    "What are some words that describe the quality of '{c}'? "
    "The {c} is frail. The {c} is red. The {c} is humongous. The {c} is tall. The {c} is"
)
PAPER_TEMPERATURE = 0.9
STOP_CHARACTERS = (",", ".", "_", "\n")

# Qualities a photograph can show; the paper's prompt examples first.
CURATED_ADJECTIVES = (
    "frail", "red", "humongous", "tall",
    "small", "large", "tiny", "giant", "long", "short", "wide", "narrow", "round", "square", "flat", "thick", "thin",
    "young", "old", "baby", "adult", "ancient", "modern", "new", "vintage",
    "white", "black", "grey", "brown", "yellow", "orange", "green", "blue", "purple", "pink", "golden", "silver", "colorful", "pale", "dark", "bright",
    "wooden", "metal", "plastic", "glass", "stone", "furry", "feathered", "hairy", "smooth", "rough", "shiny", "soft", "hard", "wet", "dry",
    "striped", "spotted", "patterned", "plain",
    "wild", "domestic", "fresh", "ripe", "cooked", "raw", "frozen", "broken", "clean", "dirty", "empty", "full",
    "cute", "beautiful", "ugly", "strange", "common", "rare", "fast", "heavy", "light", "hot", "cold",
)

# Adjectives of a gloss that describe nothing about how the thing looks.
GLOSS_STOPWORDS = frozenset(
    """a an the other such many much more most few several same certain own used usually especially
    particular various different similar whole own main chief major minor entire specific general
    even only very all any each every no not some well over best better good first second third last next
    former latter known called having being able like related similar capable characteristic typical
    usual relating belonging consisting resembling made found native given based genus family order
    class member members one two three four five""".split()
)

WORD = re.compile(r"[A-Za-z][a-z-]+")


def _tagged_usage(path: Path) -> dict[str, int]:
    """lemma -> tagsense_cnt of a WordNet index file (how often the sense-tagged corpus used it)."""
    usage: dict[str, int] = {}
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.startswith(" "):
                continue
            fields = line.split()
            usage[fields[0]] = int(fields[3 + int(fields[3]) + 2])
    return usage


@dataclass(frozen=True)
class ConceptRef:
    """What a descriptor source needs to know of a concept."""

    name: str
    synset: int = 0  # WordNet noun synset offset; 0 when not a WordNet concept
    definition: str = ""


@dataclass(frozen=True)
class Descriptor:
    text: str
    source: str


class DescriptorSource(Protocol):
    name: str

    def describe(self, concepts: Sequence[ConceptRef], rng: np.random.Generator) -> list[Descriptor]: ...


class NoDescriptors:
    name = NONE

    def describe(self, concepts: Sequence[ConceptRef], rng: np.random.Generator) -> list[Descriptor]:
        return [Descriptor("", NONE) for _ in concepts]


class CuratedDescriptors:
    name = CURATED

    def __init__(self, adjectives: Sequence[str] = CURATED_ADJECTIVES) -> None:
        self.adjectives = tuple(adjectives)

    def describe(self, concepts: Sequence[ConceptRef], rng: np.random.Generator) -> list[Descriptor]:
        picks = rng.integers(len(self.adjectives), size=len(concepts))
        return [Descriptor(self.adjectives[i], CURATED) for i in picks]


class WordNetAdjectives:
    """The adjective lemmas of WordNet and the attribute links of noun synsets, read once from the database files."""

    def __init__(self, directory: Path) -> None:
        # An adjective lemma counts when WordNet's sense-tagged corpus uses it at least as often as an
        # adjective as as a noun or a verb ("red" stays, "world" and "top" go).
        usage = {kind: _tagged_usage(directory / f"index.{kind}") for kind in ("adj", "noun", "verb")}
        self.lemmas: set[str] = {
            w for w, n in usage["adj"].items() if n >= usage["noun"].get(w, 0) and n >= usage["verb"].get(w, 0)
        }
        adjective_words: dict[int, tuple[str, ...]] = {}
        with open(directory / "data.adj", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(" "):
                    continue
                fields = line.split(" | ", 1)[0].split()
                count = int(fields[3], 16)
                # Adjective lemmas may carry a syntactic marker: "big(a)".
                words = tuple(re.sub(r"\(.*\)$", "", fields[4 + 2 * i]).replace("_", " ") for i in range(count))
                adjective_words[int(fields[0])] = words
        self.attributes: dict[int, tuple[str, ...]] = {}
        self.hypernyms: dict[int, tuple[int, ...]] = {}
        self.definitions: dict[int, str] = {}
        with open(directory / "data.noun", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(" "):
                    continue
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                offset = int(fields[0])
                pos = 4 + 2 * int(fields[3], 16)
                linked: list[str] = []
                parents: list[int] = []
                for _ in range(int(fields[pos])):
                    symbol, target, target_pos = fields[pos + 1], int(fields[pos + 2]), fields[pos + 3]
                    if symbol == "=" and target_pos in ("a", "s"):
                        linked.extend(adjective_words.get(target, ()))
                    elif symbol in ("@", "@i") and target_pos == "n":
                        parents.append(target)
                    pos += 4
                if linked:
                    self.attributes[offset] = tuple(dict.fromkeys(linked))
                self.hypernyms[offset] = tuple(parents)
                self.definitions[offset] = gloss.split('; "')[0].strip()

    def from_definition(self, definition: str, exclude: str = "") -> list[str]:
        skip = set(exclude.lower().split())
        found = []
        for word in WORD.findall(definition):
            lower = word.lower()
            if lower in self.lemmas and lower not in GLOSS_STOPWORDS and lower not in skip and len(lower) > 2:
                found.append(word)
        return list(dict.fromkeys(found))

    def linked(self, synset: int, depth: int = 3) -> list[str]:
        """Attribute adjectives of the synset, else of its nearest hypernyms."""
        frontier = [synset]
        for _ in range(depth + 1):
            found = [a for s in frontier for a in self.attributes.get(s, ())]
            if found:
                return list(dict.fromkeys(found))
            frontier = [p for s in frontier for p in self.hypernyms.get(s, ())]
        return []


_adjectives: WordNetAdjectives | None = None
_adjectives_lock = threading.Lock()


def wordnet_adjectives(directory: Path | None = None) -> WordNetAdjectives:
    global _adjectives
    with _adjectives_lock:
        if _adjectives is None or directory is not None:
            from services.common.wordnet import database_dir

            loaded = WordNetAdjectives(directory or database_dir())
            if directory is not None:
                return loaded
            _adjectives = loaded
        return _adjectives


class WordNetDescriptors:
    name = WORDNET

    def __init__(self, adjectives: WordNetAdjectives | None = None, fallback: CuratedDescriptors | None = None) -> None:
        self._adjectives = adjectives
        self.fallback = fallback or CuratedDescriptors()

    @property
    def adjectives(self) -> WordNetAdjectives:
        if self._adjectives is None:
            self._adjectives = wordnet_adjectives()
        return self._adjectives

    def candidates(self, concept: ConceptRef) -> list[str]:
        definition = concept.definition or (self.adjectives.definitions.get(concept.synset, "") if concept.synset else "")
        found = self.adjectives.from_definition(definition, exclude=concept.name)
        if concept.synset:
            found += [a for a in self.adjectives.linked(concept.synset) if a not in found]
        return found

    def describe(self, concepts: Sequence[ConceptRef], rng: np.random.Generator) -> list[Descriptor]:
        out = []
        for concept in concepts:
            options = self.candidates(concept)
            if options:
                out.append(Descriptor(options[int(rng.integers(len(options)))], WORDNET))
            else:
                out.extend(self.fallback.describe([concept], rng))
        return out


class LLMDescriptors:
    """An OpenAI-compatible `/completions` endpoint (vLLM, llama.cpp server, TGI, OpenAI) with the paper's prompt."""

    name = LLM

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str = "",
        timeout_s: float = 10.0,
        batch: int = 32,
        max_tokens: int = 8,
        fallback: DescriptorSource | None = None,
    ) -> None:
        self.endpoint = url.rstrip("/") + ("" if url.rstrip("/").endswith("/completions") else "/completions")
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.batch = batch
        self.max_tokens = max_tokens
        self.fallback = fallback or WordNetDescriptors()
        self.failures = 0

    @staticmethod
    def prompt(name: str) -> str:
        return PAPER_PROMPT.format(c=name)

    @staticmethod
    def clean(completion: str) -> str:
        """The paper's cut: everything before the first , . _ or newline, at most three words."""
        text = completion
        for stop in STOP_CHARACTERS:
            text = text.split(stop, 1)[0]
        words = text.strip().strip("'\"").split()
        return " ".join(words[:3])[:40]

    def _complete(self, prompts: list[str], seed: int) -> list[str]:
        body = {
            "model": self.model,
            "prompt": prompts,
            "temperature": PAPER_TEMPERATURE,
            "max_tokens": self.max_tokens,
            "stop": list(STOP_CHARACTERS),
            "seed": seed,
        }
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.endpoint, data=json.dumps(body).encode(), headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:  # noqa: S310 - operator-configured endpoint
            payload = json.load(response)
        texts = [""] * len(prompts)
        for position, choice in enumerate(payload.get("choices", [])):
            index = choice.get("index", position)
            if isinstance(index, int) and 0 <= index < len(prompts):
                texts[index] = str(choice.get("text", ""))
        return texts

    def describe(self, concepts: Sequence[ConceptRef], rng: np.random.Generator) -> list[Descriptor]:
        out: list[Descriptor] = []
        for start in range(0, len(concepts), self.batch):
            part = list(concepts[start : start + self.batch])
            try:
                completions = self._complete([self.prompt(c.name) for c in part], seed=int(rng.integers(2**31)))
            except (urllib.error.URLError, OSError, ValueError, TimeoutError) as exc:
                self.failures += 1
                log.warning("descriptor endpoint failed; using the offline source", extra={"endpoint": self.endpoint, "error": str(exc)[:200]})
                out.extend(self.fallback.describe(part, rng))
                continue
            for concept, completion in zip(part, completions):
                text = self.clean(completion)
                out.append(Descriptor(text, LLM) if text else self.fallback.describe([concept], rng)[0])
        return out


def query_text(descriptor: str, name: str) -> str:
    """descriptor + concept, as the paper writes its queries ("baby duck")."""
    return f"{descriptor} {name}".strip()
