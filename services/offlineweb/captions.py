"""Caption text from what each source ships: file names, emoji names and tags, SVG metadata, stamp captions.

File names are the noisiest captions of the web ("apple_bitten_dan_gerhard_01.svg"): they are split
into words, numbers and size tokens are dropped, and trailing author names are removed when the
author is known (openclipart SVGs name their creator in their RDF metadata).
"""

from __future__ import annotations

import html
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

MAX_CAPTION_CHARS = 400  # well under the corpus limit; long texts only dilute a caption embedding

_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")
_LETTERS_DIGITS = re.compile(r"(?<=[A-Za-z])(?=\d)|(?<=\d)(?=[A-Za-z])")
_SEPARATORS = re.compile(r"[\s_\-.+,()\[\]{}]+")
# Tokens that carry no meaning in a file name: versions, sizes, copy markers, layout variants.
_NOISE = re.compile(r"^(?:\d+|\d*px|v\d+|\d+x\d+|[a-z]|copy|final|img|image|pic|svg|png|mirror|bw)$")


def split_words(name: str) -> list[str]:
    """'Cherry_Stella2' -> ['cherry', 'stella', '2']; camelCase, digits and separators split words."""
    name = _CAMEL.sub(" ", name)
    name = _LETTERS_DIGITS.sub(" ", name)
    return [w for w in _SEPARATORS.split(name.lower()) if w]


def clean_file_name(stem: str, authors: Iterable[str] = ()) -> str:
    """A caption from a file name: words without numbers, sizes, variants or trailing author names.

    Author names are removed only at the end of the name (where openclipart puts them), and a
    file-name word counts as an author word when it starts an author word: names are truncated to fit
    the 24-character stems ("dan_gerhard" for Dan Gerhards).
    """
    words = split_words(stem)
    author_words = {w for a in authors for w in split_words(a) if len(w) >= 2}
    while len(words) > 1 and (_NOISE.match(words[-1]) or _is_author_word(words[-1], author_words)):
        words.pop()
    kept = [w for w in words if not _NOISE.match(w)]
    return " ".join(kept or words)


def _is_author_word(word: str, author_words: set[str]) -> bool:
    return len(word) >= 2 and any(a.startswith(word) for a in author_words)


def emoji_name(name: str) -> str:
    """emoji.json names are upper case ("RED APPLE") or title case ("Germany Flag"): lower, spaced."""
    return " ".join(name.replace("_", " ").split()).lower()


def short_name_text(short_name: str) -> str:
    return short_name.replace("_", " ").replace("-", " ").strip().lower()


def tag_list(text: str) -> list[str]:
    """'cheerful, cheery, face' -> ['cheerful', 'cheery', 'face'] (openmoji's comma-separated tags)."""
    return [t.strip().lower() for t in text.split(",") if t.strip()]


def subcategory_words(subcategory: str) -> list[str]:
    """'food-fruit' -> ['food', 'fruit']; 'animal-bird' -> ['animal', 'bird']."""
    return [w for w in re.split(r"[-&\s]+", subcategory.lower()) if w]


def compose(title: str, aliases: Sequence[str] = (), keywords: Sequence[str] = (), suffix: str = "") -> str:
    """'red apple (apple). fruit, food. Emoji, twitter style': title first, each text once, bounded."""
    title = " ".join(title.split()).rstrip(".")
    seen = {title.lower()}
    unique_aliases = []
    for alias in aliases:
        alias = " ".join(alias.split())
        if alias and alias.lower() not in seen:
            seen.add(alias.lower())
            unique_aliases.append(alias)
    unique_keywords = []
    for keyword in keywords:
        keyword = " ".join(keyword.split())
        if keyword and keyword.lower() not in seen:
            seen.add(keyword.lower())
            unique_keywords.append(keyword)
    text = title
    if unique_aliases:
        text += f" ({', '.join(unique_aliases)})"
    if unique_keywords:
        text += f". {', '.join(unique_keywords)}"
    if suffix:
        text += f". {suffix}"
    if len(text) > MAX_CAPTION_CHARS:
        text = text[: MAX_CAPTION_CHARS - 1].rsplit(" ", 1)[0] + "\u2026"
    return text


def first_line(text: str) -> str:
    """The English caption of a Tux Paint stamp: the first line of its .txt (translations follow)."""
    for line in text.splitlines():
        if line.strip() and "=" not in line.split(" ", 1)[0]:
            return " ".join(line.split())
    return ""


@dataclass(frozen=True)
class SvgMetadata:
    title: str = ""
    description: str = ""
    subjects: tuple[str, ...] = ()
    creators: tuple[str, ...] = field(default_factory=tuple)


_WORK = re.compile(r"<cc:Work\b[^>]*>(.*?)</cc:Work>", re.S)
_AGENT = re.compile(r"<cc:Agent\b[^>]*>.*?</cc:Agent>", re.S)
_DC = re.compile(r"<dc:(title|description)\b[^>]*>(.*?)</dc:\1>", re.S)
_CREATOR = re.compile(r"<dc:creator\b[^>]*>(.*?)</dc:creator>", re.S)
_AGENT_TITLE = re.compile(r"<dc:title\b[^>]*>(.*?)</dc:title>", re.S)
_SUBJECT = re.compile(r"<dc:subject\b[^>]*>(.*?)</dc:subject>", re.S)
_LI = re.compile(r"<rdf:li\b[^>]*>(.*?)</rdf:li>", re.S)
_TAG = re.compile(r"<[^>]+>")
_CLIPART_BY = re.compile(r"^\s*clip\s*art\s+by\s+[^-:]+[-:]\s*", re.I)
# Keywords worth keeping: words, not hashes ("hash(0x8a0a39c)"), numbers or paths.
_USEFUL_SUBJECT = re.compile(r"^[^\W\d_][\w\s'&-]{0,40}$")
_JUNK_SUBJECTS = {"hash", "openclipart", "clipart", "clip art", "svg", "png", "image", "unsorted", "inkscape"}
_PLACEHOLDER_TITLES = {"", "untitled", "layer 1", "image", "drawing", "svg", "clipart", "clip art"}


def _text(fragment: str) -> str:
    return " ".join(html.unescape(_TAG.sub(" ", fragment)).split())


def svg_metadata(head: str) -> SvgMetadata:
    """Title, description, subjects and creators from the RDF block of an (Inkscape) SVG.

    A regular expression over the file's first bytes, not an XML parser: the metadata sits near the
    top, many files do not parse as strict XML, and nothing here is ever rendered or evaluated.
    """
    work = _WORK.search(head)
    if not work:
        return SvgMetadata()
    body = work.group(1)
    creators = tuple(t for t in (_text(m.group(1)) for c in _CREATOR.finditer(body) for m in _AGENT_TITLE.finditer(c.group(1))) if t)
    plain = _AGENT.sub(" ", body)  # agents' titles are names, not the work's title
    fields = {}
    for m in _DC.finditer(plain):
        fields.setdefault(m.group(1), _text(m.group(2)))
    subjects = tuple(t for s in _SUBJECT.finditer(plain) for t in (_text(li.group(1)) for li in _LI.finditer(s.group(1))) if t)
    return SvgMetadata(
        title=clean_title(fields.get("title", ""), creators),
        description=fields.get("description", ""),
        subjects=tuple(s for s in subjects if _USEFUL_SUBJECT.match(s) and s.lower() not in _JUNK_SUBJECTS),
        creators=creators,
    )


def clean_title(title: str, creators: Sequence[str] = ()) -> str:
    """A work's title as a caption: no 'Clipart by X - ' prefix, no placeholder, no author's name as
    title; a title that is a file name ('glace_03_bw') is cleaned like one."""
    title = _CLIPART_BY.sub("", title).strip()
    lowered = title.lower()
    if lowered in _PLACEHOLDER_TITLES or lowered.endswith((".svg", ".png")):
        return ""
    if any(lowered == c.lower() for c in creators):
        return ""
    if "_" in title and " " not in title:
        return clean_file_name(title, creators)
    return title
