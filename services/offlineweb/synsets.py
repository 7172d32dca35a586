"""Text to WordNet noun synset, deterministically: the concept an image caption names.

WordNet's `index.noun` lists the senses of each lemma in frequency order (the order of the
sense-tagged counts that `wordnet-sense-index` also carries), and `noun.exc` the irregular plurals.
A caption is reduced to its head noun phrase ("A pair of cherries." -> "cherries" -> "cherry"), the
longest WordNet lemma ending at the head is looked up, and one of its senses is chosen:

  1. the first sense below one of the item's context roots (its source category: an emoji from
     "Food & Drink" prefers food and plant parts, a Tux Paint stamp under animals/ prefers animals);
  2. else the first physical sense that is not a named instance (images show things: "crane" is
     not the poet Hart Crane nor the constellation); then a named instance that is not a person
     ("madrid"), then a named person; else the first sense.

Nothing here depends on a target: the same text and context always give the same synset.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

from services.common.wordnet import WordNet, database_dir

ENTITY = 1740  # n00001740 entity
PHYSICAL_ENTITY = 1930  # n00001930 physical entity

# Context roots by topic word. Offsets are WordNet 3.0 (the wnid is "n" + the zero-padded offset).
ANIMAL = 15388  # animal, animate being, beast
FOOD = 21265  # food, nutrient
PLANT = 17222  # plant, flora, plant life
PLANT_PART = 13086908  # plant part, plant structure
NATURAL_OBJECT = 19128  # natural object
ARTIFACT = 21939  # artifact, artefact
CONVEYANCE = 3100490  # conveyance, transport
CELESTIAL_BODY = 9239740  # celestial body, heavenly body
CLOTHING = 3051540  # clothing, article of clothing
PERSON = 7846  # person, individual
BODY_PART = 5220461  # body part
STRUCTURE = 4341686  # structure, construction
MUSICAL_INSTRUMENT = 3800933  # musical instrument
CONTAINER = 3094503  # container
DEVICE = 3183080  # device
TOOL = 4451818  # tool
SPORTS_EQUIPMENT = 4285146  # sports equipment
GEOLOGICAL_FORMATION = 9287968  # geological formation
COIN = 13388245  # coin
MONETARY_UNIT = 13604718  # monetary unit
ATMOSPHERIC_PHENOMENON = 11425580  # atmospheric phenomenon

CONTEXT_ROOTS: dict[str, tuple[int, ...]] = {
    "animal": (ANIMAL,),
    "animals": (ANIMAL,),
    "food": (FOOD, PLANT_PART),
    "drink": (FOOD,),
    "plant": (PLANT, PLANT_PART),
    "plants": (PLANT, PLANT_PART),
    "nature": (ANIMAL, PLANT, PLANT_PART, NATURAL_OBJECT),
    "vehicle": (CONVEYANCE,),
    "vehicles": (CONVEYANCE,),
    "transportation": (CONVEYANCE,),
    "travel": (CONVEYANCE, STRUCTURE, GEOLOGICAL_FORMATION),
    "places": (STRUCTURE, GEOLOGICAL_FORMATION),
    "buildings": (STRUCTURE,),
    "town": (STRUCTURE, ARTIFACT),
    "space": (CELESTIAL_BODY, CONVEYANCE),
    "sky": (CELESTIAL_BODY, ATMOSPHERIC_PHENOMENON),
    "weather": (ATMOSPHERIC_PHENOMENON, CELESTIAL_BODY),
    "clothes": (CLOTHING,),
    "clothing": (CLOTHING,),
    "people": (PERSON, BODY_PART, CLOTHING),
    "body": (BODY_PART, PERSON),
    "music": (MUSICAL_INSTRUMENT,),
    "hobbies": (MUSICAL_INSTRUMENT, ARTIFACT),
    "recreation": (ARTIFACT,),
    "activities": (SPORTS_EQUIPMENT, ARTIFACT),
    "sports": (SPORTS_EQUIPMENT, ARTIFACT),
    "tools": (TOOL, DEVICE, ARTIFACT),
    "household": (CONTAINER, DEVICE, TOOL, ARTIFACT),
    "objects": (ARTIFACT,),
    "office": (ARTIFACT,),
    "electronics": (DEVICE,),
    "containers": (CONTAINER,),
    "military": (CONVEYANCE, ARTIFACT),
    "money": (COIN, MONETARY_UNIT),
    "medical": (ARTIFACT, BODY_PART),
}

# Words that end a noun phrase: the head noun comes before them ("face with tears of joy" -> face).
_PHRASE_BREAKS = frozenset(
    "with without of on in at for from and or but called like that which who whose to by under over into onto "
    "near behind beside between holding wearing is are was were has".split()
)
# "a bunch of grapes": the thing shown is what follows "of".
_PARTITIVES = frozenset(
    "bunch pair head piece slice group set pile stack handful couple plant sprig clove cluster bouquet bundle "
    "kind type sort quarter half portion string baby ball ear".split()
)
# Never nouns in a caption, though WordNet has some of them ("a" is also vitamin A and the ampere).
_STOPWORDS = frozenset(
    "a an the it it's its this these those they them their there here he she his her him you your we our us me my "
    "i very too also just so not no yes oh wow yum let's lets as".split()
)
_LEADING_NOISE = frozenset(
    "a an the this that these those some another one two three four five six seven eight nine ten many several "
    "few pair".split()
)
_TOKEN = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")
_CLAUSE_END = re.compile(r"[!?;:,(\u2013\u2014]|(?<=[A-Za-z]{3})\.(?=\s|$)| - ")
# Noun detachment rules of WordNet's morphy (suffix, replacement).
_NOUN_SUFFIXES = (("s", ""), ("ses", "s"), ("xes", "x"), ("zes", "z"), ("ches", "ch"), ("shes", "sh"), ("men", "man"), ("ies", "y"))
_MAX_LEMMA_WORDS = 4


def wnid(offset: int) -> str:
    return f"n{offset:08d}"


def offset_of(wnid_text: str) -> int:
    if not re.fullmatch(r"n\d{8}", wnid_text):
        raise ValueError(f"not a WordNet noun id: {wnid_text!r} (expected n + 8 digits)")
    return int(wnid_text[1:])


@dataclass(frozen=True)
class SynsetMatch:
    offset: int
    lemma: str  # the WordNet lemma that matched, e.g. "great blue heron"
    rule: str  # which sense rule chose it: context | physical | physical-instance | physical-person | first

    @property
    def wnid(self) -> str:
        return wnid(self.offset)


class SenseIndex:
    """Noun lemmas -> synset offsets in WordNet's sense order, plus noun.exc irregular forms."""

    def __init__(self, senses: dict[str, tuple[int, ...]], exceptions: dict[str, tuple[str, ...]] | None = None) -> None:
        self.senses = senses
        self.exceptions = exceptions or {}

    @classmethod
    def load(cls, directory: Path | None = None) -> "SenseIndex":
        directory = directory or database_dir()
        senses: dict[str, tuple[int, ...]] = {}
        with open(directory / "index.noun", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith(" "):
                    continue  # licence header
                fields = line.split()
                synset_count, pointer_count = int(fields[2]), int(fields[3])
                offsets_start = 4 + pointer_count + 2  # after the pointer symbols, sense_cnt and tagsense_cnt
                senses[fields[0].replace("_", " ")] = tuple(int(x) for x in fields[offsets_start : offsets_start + synset_count])
        # "ice-cream cone" is also found as "ice cream cone" (captions and file names drop hyphens).
        for lemma in [k for k in senses if "-" in k]:
            senses.setdefault(lemma.replace("-", " "), senses[lemma])
        exceptions: dict[str, tuple[str, ...]] = {}
        exc = directory / "noun.exc"
        if exc.exists():
            with open(exc, encoding="utf-8") as handle:
                for line in handle:
                    fields = line.split()
                    if len(fields) >= 2:
                        exceptions[fields[0].replace("_", " ")] = tuple(f.replace("_", " ") for f in fields[1:])
        return cls(senses, exceptions)

    def base_forms(self, phrase: str) -> list[str]:
        """WordNet lemmas for `phrase`: itself, its irregular base, or its last word de-pluralised."""
        phrase = phrase.lower()
        found: list[str] = []
        if phrase in self.senses:
            found.append(phrase)
        for base in self.exceptions.get(phrase, ()):
            if base in self.senses and base not in found:
                found.append(base)
        head, _, last = phrase.rpartition(" ")
        for suffix, replacement in _NOUN_SUFFIXES:
            if last.endswith(suffix) and len(last) > len(suffix) + 1:
                candidate = (f"{head} " if head else "") + last[: -len(suffix)] + replacement
                if candidate in self.senses and candidate not in found:
                    found.append(candidate)
        if not found and " " not in phrase and len(phrase) >= 6:
            # Run-together compounds of file names: "mountaingoat" -> "mountain goat".
            for cut in range(3, len(phrase) - 2):
                spaced = f"{phrase[:cut]} {phrase[cut:]}"
                if spaced in self.senses:
                    return [spaced]
        return found


class Taxonomy:
    """Hypernym closure and subtrees over a loaded WordNet, cached (the builder asks thousands of times)."""

    def __init__(self, wordnet: WordNet, instances: Iterable[int] = ()) -> None:
        self.wordnet = wordnet
        self.instances = frozenset(instances)
        children: dict[int, list[int]] = {}
        for synset in wordnet.synsets.values():
            for parent in synset.hypernyms:
                children.setdefault(parent, []).append(synset.offset)
        self.children = {k: tuple(sorted(v)) for k, v in children.items()}
        self._ancestors = lru_cache(maxsize=None)(self._compute_ancestors)
        self._subtree = lru_cache(maxsize=4096)(self._compute_subtree)

    def _compute_ancestors(self, offset: int) -> frozenset[int]:
        return frozenset(self.wordnet.ancestors(offset))

    def _compute_subtree(self, root: int) -> frozenset[int]:
        out: set[int] = set()
        stack = [root]
        while stack:
            current = stack.pop()
            if current not in out:
                out.add(current)
                stack.extend(self.children.get(current, ()))
        return frozenset(out)

    def ancestors(self, offset: int) -> frozenset[int]:
        return self._ancestors(offset)

    def subtree(self, root: int) -> frozenset[int]:
        return self._subtree(root)

    def is_under(self, offset: int, root: int) -> bool:
        return offset == root or root in self.ancestors(offset)

    def depth(self, offset: int) -> int:
        """Fewest hypernym steps up to a synset with no hypernym (entity has depth 0)."""
        level, frontier, seen = 0, {offset}, {offset}
        while frontier:
            if any(not self.wordnet.synsets[o].hypernyms for o in frontier if o in self.wordnet.synsets):
                return level
            frontier = {h for o in frontier for h in self.wordnet.synsets[o].hypernyms if h not in seen}
            seen |= frontier
            level += 1
        return level

    def lemma(self, offset: int) -> str:
        return self.wordnet.synsets[offset].lemmas[0]


def load_instances(directory: Path | None = None) -> set[int]:
    """Synsets that are named instances (an `@i` pointer in data.noun: Hart Crane, Mercury the planet)."""
    instances: set[int] = set()
    with open((directory or database_dir()) / "data.noun", encoding="utf-8") as handle:
        for line in handle:
            if not line.startswith(" ") and " @i " in line:
                instances.add(int(line[:8]))
    return instances


def tokens_of(text: str) -> list[str]:
    text = text.lower().replace("\u2019", "'").replace("\u2018", "'")
    return _TOKEN.findall(text)


def first_clause(text: str) -> str:
    """Text up to the first clause break: ! ? ; : ( dashes, or a full stop after a word of 3+ letters
    (so "St. Lucia Flag" stays whole while "A red apple. Yum!" ends at "apple")."""
    match = _CLAUSE_END.search(text)
    return text[: match.start()] if match else text


def noun_phrase(text: str) -> list[str]:
    """The tokens of the head noun phrase: the first phrase, partitives unwrapped, determiners dropped."""
    words = [w.strip("'") for w in tokens_of(first_clause(text))]
    words = [w for w in words if w and w not in _STOPWORDS and (len(w) > 1 or w.isdigit())]
    phrase: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word in _PHRASE_BREAKS:
            if word == "of" and phrase and phrase[-1] in _PARTITIVES:
                phrase = []  # "bunch of grapes": start over with what follows
                i += 1
                continue
            if phrase:
                break
            i += 1
            continue
        phrase.append(word)
        i += 1
    while phrase and (phrase[0] in _LEADING_NOISE or phrase[0].isdigit()):
        phrase = phrase[1:]
    return phrase


def before_participle(words: list[str]) -> list[str]:
    """'woman raising hand' -> 'woman': a participle after the first word starts a clause (the whole
    phrase is looked up as a lemma first, so 'office building' is never cut)."""
    for position in range(1, len(words)):
        if words[position].endswith("ing") and len(words[position]) > 4:
            return words[:position]
    return words


class SynsetMapper:
    def __init__(self, index: SenseIndex, taxonomy: Taxonomy) -> None:
        self.index = index
        self.taxonomy = taxonomy

    @classmethod
    def load(cls, directory: Path | None = None) -> "SynsetMapper":
        directory = directory or database_dir()
        return cls(SenseIndex.load(directory), Taxonomy(WordNet.load(directory), load_instances(directory)))

    def context_roots(self, words: Iterable[str]) -> tuple[int, ...]:
        """Preferred roots for an item, from the words of its category, most specific word first.

        A topic word of CONTEXT_ROOTS gives its roots ("Food & Drink" -> food, plant part); any other
        noun gives its own physical senses, so a stamp in animals/birds prefers birds, then animals.
        Person senses never count as a category (folder names such as "japanese" are adjectives, and
        "hand" should not prefer hired hands), and a word whose most frequent physical sense is a
        person ("person", "family") contributes only its topic roots.
        """
        roots: list[int] = []
        for word in words:
            for token in tokens_of(word):
                physical = [s for base in self.index.base_forms(token) for s in self.index.senses[base] if self.taxonomy.is_under(s, PHYSICAL_ENTITY)]
                own: list[int] = []
                if physical and not self.taxonomy.is_under(physical[0], PERSON):
                    own = [s for s in physical if not self.taxonomy.is_under(s, PERSON)]
                for root in (*own, *CONTEXT_ROOTS.get(token, ())):
                    if root not in roots:
                        roots.append(root)
        return tuple(roots)

    def choose_sense(self, lemma: str, context_roots: Sequence[int] = (), strict: bool = False) -> SynsetMatch | None:
        """One sense of `lemma` by the rules of the module docstring; with `strict`, only a sense
        below a context root (None when there is none)."""
        senses = [s for s in self.index.senses.get(lemma, ()) if s in self.taxonomy.wordnet.synsets]
        if not senses:
            return None
        for root in context_roots:
            for sense in senses:
                if self.taxonomy.is_under(sense, root):
                    return SynsetMatch(sense, lemma, "context")
        if strict:
            return None
        physical = [s for s in senses if self.taxonomy.is_under(s, PHYSICAL_ENTITY)]
        for sense in physical:
            if sense not in self.taxonomy.instances:
                return SynsetMatch(sense, lemma, "physical")
        for sense in physical:
            if not self._named_person(sense):
                return SynsetMatch(sense, lemma, "physical-instance")
        if physical:
            return SynsetMatch(physical[0], lemma, "physical-person")
        return SynsetMatch(senses[0], lemma, "first")

    def _named_person(self, offset: int) -> bool:
        """Hart Crane, Stephen Crane: named people are the last resort (named places and stars,
        Madrid or the Sun, come before them)."""
        return offset in self.taxonomy.instances and self.taxonomy.is_under(offset, PERSON)

    def lookup(self, phrase: str, context_roots: Sequence[int] = (), strict: bool = False) -> SynsetMatch | None:
        """`phrase` as one lemma (or its base form), no head-noun extraction: names such as 'hot dog'."""
        for base in self.index.base_forms(" ".join(tokens_of(phrase))):
            match = self.choose_sense(base, context_roots, strict)
            if match:
                return match
        return None

    def head_noun(self, text: str, context_roots: Sequence[int] = (), strict: bool = False) -> SynsetMatch | None:
        """The synset of the head noun of `text`: the longest lemma ending nearest the end of its noun phrase."""
        words = before_participle(noun_phrase(text))
        for end in range(len(words), 0, -1):
            for start in range(max(0, end - _MAX_LEMMA_WORDS), end):
                if end - start == 1 and len(words[start]) <= 2:
                    continue  # 'pa', 'hz', 'as' inside a phrase are abbreviations and foreign words; a whole 'ox' is looked up as is
                match = self.lookup(" ".join(words[start:end]), context_roots, strict)
                if match is not None:
                    return self._more_specific_modifier(words, start, match, context_roots)
        return None

    def _more_specific_modifier(self, words: list[str], start: int, head: SynsetMatch, context_roots: Sequence[int]) -> SynsetMatch:
        """'cherimoya fruit' -> cherimoya: a modifier that is itself a kind of the head is the better concept."""
        for begin in range(max(0, start - _MAX_LEMMA_WORDS), start):
            modifier = self.lookup(" ".join(words[begin:start]), (head.offset, *context_roots))
            if modifier and modifier.offset != head.offset and self.taxonomy.is_under(modifier.offset, head.offset):
                return modifier
        return head

    def map_texts(self, texts: Iterable[str], context_roots: Sequence[int] = ()) -> SynsetMatch | None:
        """The synset an item's texts name (most trusted text first), or None when no noun matches.

        Whole noun phrases that are lemmas come before head nouns ("hoverfly" from the file name beats
        "drone" from "A hoverfly resembles a honeybee drone"), and with context roots every text is
        first searched for a sense inside the context, then for any sense.
        """
        phrases = [" ".join(noun_phrase(t)) for t in texts if t and t.strip()]
        phrases = [p for p in phrases if p]
        for strict in (True, False) if context_roots else (False,):
            for phrase in phrases:
                match = self.lookup(phrase, context_roots, strict)
                if match:
                    return match
            for phrase in phrases:
                match = self.head_noun(phrase, context_roots, strict)
                if match:
                    return match
        return None
