"""Open Clip Art Library drawings (Debian `openclipart-svg`): object drawings with noisy captions.

Categories that are not drawings of things are left out: UI icons and buttons, stars and other
geometric shapes, gradient and pattern swatches, logos, and national flags (a flag captioned with a
country would map to the country, not to anything drawn).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

from services.offlineweb import captions
from services.offlineweb.items import RenderTask, WebItem, make_id
from services.offlineweb.sources import BY_NAME
from services.offlineweb.synsets import SynsetMapper

SVG_SUBDIR = Path("usr/share/openclipart/svg")
EXCLUDED_FOLDERS = (
    "computer/icons",
    "computer/buttons",
    "buttons",
    "shapes",
    "special",
    "logos",
    "signs_and_symbols/flags",
)
METADATA_BYTES = 65536  # the RDF block sits in the first few KB of an SVG
SUFFIX = "Clip art"


@dataclass(frozen=True)
class Drawing:
    path: str  # relative to the svg folder: "food/fruit/apple_bitten_dan_gerhard_01.svg"
    title: str
    description: str
    subjects: tuple[str, ...]
    name_text: str  # the cleaned file name

    @property
    def folder_words(self) -> list[str]:
        """Category folders, deepest first, as words: 'food/meats_and_eggs' -> ['meats and eggs', 'food']."""
        return [p.replace("_", " ") for p in reversed(PurePosixPath(self.path).parent.parts)]


def excluded(relative: str) -> bool:
    return any(relative == f or relative.startswith(f + "/") for f in EXCLUDED_FOLDERS)


def scan(package_root: Path) -> Iterator[Drawing]:
    root = package_root / SVG_SUBDIR
    for path in sorted(root.rglob("*.svg")):
        relative = path.relative_to(root).as_posix()
        if excluded(relative):
            continue
        with open(path, "rb") as handle:
            head = handle.read(METADATA_BYTES).decode("utf-8", errors="replace")
        meta = captions.svg_metadata(head)
        yield Drawing(
            path=relative,
            title=meta.title,
            description=meta.description,
            subjects=meta.subjects,
            name_text=captions.clean_file_name(path.stem, meta.creators),
        )


def items(package_root: Path, mapper: SynsetMapper) -> Iterator[WebItem]:
    root = package_root / SVG_SUBDIR
    for drawing in scan(package_root):
        title = drawing.title or drawing.name_text
        match = mapper.map_texts([drawing.title, drawing.name_text], mapper.context_roots(drawing.folder_words))
        keywords = [*drawing.subjects, *drawing.folder_words]
        yield WebItem(
            id=make_id("openclipart", str(PurePosixPath(drawing.path).with_suffix(""))),
            source="openclipart",
            caption=captions.compose(title, [drawing.name_text], keywords, SUFFIX),
            synset=match.wnid if match else "",
            concept=match.lemma if match else title.lower(),
            license=BY_NAME["openclipart"].license,
            task=RenderTask("svg", str(root / drawing.path)),
        )
