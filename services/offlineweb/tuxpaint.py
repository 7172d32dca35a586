"""Tux Paint stamps (Debian `tuxpaint-stamps-default`): real photos become targets, drawings distractors.

A stamp is an image file under usr/share/tuxpaint/stamps/<folders>/ with a caption <stem>.txt
(English on the first line, translations after), an optional <stem>.dat of flags, narrated .ogg files,
and optionally <stem>_mirror.<ext>, the image Tux Paint shows when the stamp is flipped.

Which stamps are real photos (the rule, applied in this order; the first that matches decides):
  1. `_mirror` images are skipped: a flipped copy of another stamp, not a new image.
  2. A PNG next to an SVG of the same stem is skipped: Tux Paint's raster fallback of the drawing.
  3. SVG -> drawing (vector art).
  4. Anywhere under a folder named `cartoon` -> drawing (Tux Paint's own convention).
  5. `.dat` flags `colorable`, `tintable` or `tinter=...` -> drawing (flat shapes meant to be recoloured).
  6. In AUDITED_DRAWINGS -> drawing: raster drawings outside cartoon folders (flags, road signs,
     chess pieces, holiday clip art), found by a visual audit of every PNG left by rules 1-5 in the
     package version 2022.06.04-1 (contact sheets of all 432, docs/offline-web.md).
  7. Flat colour: more than 90% of the interior pixels equal their neighbours (within 3 levels) ->
     drawing. A safety net for package versions the audit has not seen; no audited photo comes near it.
  8. Otherwise -> photo.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator

import numpy as np
from PIL import Image

from services.offlineweb.captions import clean_file_name, first_line

STAMPS_SUBDIR = Path("usr/share/tuxpaint/stamps")
IMAGE_SUFFIXES = (".png", ".svg")
MIRROR_SUFFIXES = ("_mirror", "-mirror")
RECOLOURABLE_FLAGS = ("colorable", "tintable", "tinter")
FLAT_FRACTION_LIMIT = 0.90
FLAT_LEVELS = 3  # neighbours within 3 of 255 levels count as the same colour
MIN_INTERIOR_PIXELS = 500  # below this (thin or translucent stamps) the statistic says nothing

# Raster drawings of tuxpaint-stamps-default 2022.06.04-1 outside `cartoon` folders (rule 6).
AUDITED_DRAWINGS = frozenset(
    {
        "animals/fish/shrimp.png",
        "animals/insects/fly.png",
        "animals/mammals/hedgehog.png",
        "clothes/button.png",
        "food/pizza.png",
        "medical/tooth.png",
        "people/body_parts/eye.png",
        "seasonal/christmas/Santa.png",
        "seasonal/christmas/santahat.png",
        "seasonal/christmas/stocking.png",
        "seasonal/christmas/tree.png",
        "seasonal/easter/bluebird.png",
        "seasonal/easter/bunny-egg.png",
        "seasonal/easter/bunny-head.png",
        "seasonal/easter/bunny.png",
        "seasonal/easter/butterfly.png",
        "seasonal/easter/chick-hatched.png",
        "seasonal/easter/chick-in-egg.png",
        "seasonal/easter/chick.png",
        "seasonal/easter/daffodil.png",
        "seasonal/easter/wrapped_chocolate_easter_egg.png",
        "seasonal/easter/wrapped_chocolate_easter_egg_2.png",
        "seasonal/halloween/bat_left.png",
        "seasonal/halloween/blackcat.png",
        "seasonal/halloween/skull.png",
        "seasonal/halloween/spider.png",
        "seasonal/newyears/party-hat.png",
        "space/planets/0_sun.png",
        "symbols/alphabets/german/outlined/lowercase/u_with_umlaut_outline.png",
        "symbols/chess/b_1_king.png",
        "symbols/chess/b_2_queen.png",
        "symbols/chess/b_3_bishop.png",
        "symbols/chess/b_4_knight.png",
        "symbols/chess/b_5_rook.png",
        "symbols/chess/b_6_pawn.png",
        "symbols/chess/w_1_king.png",
        "symbols/chess/w_2_queen.png",
        "symbols/chess/w_3_bishop.png",
        "symbols/chess/w_4_knight.png",
        "symbols/chess/w_5_rook.png",
        "symbols/chess/w_6_pawn.png",
        "symbols/clockface.png",
        "symbols/shapes/star.png",
        "town/flags/blue-and-yellowflag.png",
        "town/flags/checkeredflag.png",
        "town/flags/greenflag.png",
        "town/flags/redflag.png",
        "town/flags/whiteflag.png",
        "town/flags/yellowflag.png",
        "town/monuments/inukshuk-outline.png",
        "town/roadsigns/arrow.png",
        "town/roadsigns/crossroads.png",
        "town/roadsigns/dead_end_sign.png",
        "town/roadsigns/give_way_sign.png",
        "town/roadsigns/hospital.png",
        "town/roadsigns/no_entry_sign.png",
        "town/roadsigns/roundabout.png",
        "town/roadsigns/school_sign.png",
        "town/roadsigns/stop.png",
        "town/roadsigns/stoplight_01_red.png",
        "town/roadsigns/stoplight_02_yellow.png",
        "town/roadsigns/stoplight_03_green.png",
        "town/roadsigns/t-junction.png",
        "town/roadsigns/toilets.png",
        "town/roadsigns/xing_ped.png",
        "town/roadsigns/xing_school.png",
        "town/roadsigns/yield.png",
        "vehicles/7spoke256.png",
        "vehicles/emergency/sedan_police.png",
    }
)


@dataclass(frozen=True)
class Stamp:
    path: str  # relative to the stamps folder, POSIX: "food/fruit/apple_red.png"
    caption: str  # English caption, "" when the stamp has none
    kind: str  # "photo" | "drawing"
    reason: str  # which rule decided (see the module docstring)

    @property
    def folder(self) -> str:
        return str(PurePosixPath(self.path).parent)

    @property
    def stem(self) -> str:
        return PurePosixPath(self.path).stem

    @property
    def name_text(self) -> str:
        """The file name as a caption ("apple_granny_smith" -> "apple granny smith")."""
        return clean_file_name(self.stem)

    @property
    def folder_words(self) -> list[str]:
        """Folder names, deepest first, without Tux Paint's grouping folders ("cartoon", "00_symbols")."""
        parts = [re.sub(r"^\d+_", "", p) for p in PurePosixPath(self.path).parent.parts]
        return [p.replace("_", " ") for p in reversed(parts) if p and p != "cartoon"]

    def text(self) -> str:
        return self.caption or self.name_text


def stamps_root(package_root: Path) -> Path:
    return package_root / STAMPS_SUBDIR


def flat_fraction(image: Image.Image) -> float | None:
    """Share of opaque interior pixels whose 4 neighbours are within FLAT_LEVELS of them; None when
    the stamp has too few interior pixels to say (thin outlines, translucent glass)."""
    rgba = image.convert("RGBA")
    if max(rgba.size) > 256:
        rgba.thumbnail((256, 256), Image.Resampling.LANCZOS)
    a = np.asarray(rgba).astype(np.int16)
    opaque = a[..., 3] >= 250
    interior = opaque.copy()
    interior[1:, :] &= opaque[:-1, :]
    interior[:-1, :] &= opaque[1:, :]
    interior[:, 1:] &= opaque[:, :-1]
    interior[:, :-1] &= opaque[:, 1:]
    interior[0, :] = interior[-1, :] = False
    interior[:, 0] = interior[:, -1] = False
    if int(interior.sum()) < MIN_INTERIOR_PIXELS:
        return None
    rgb = a[..., :3]
    centre = rgb[1:-1, 1:-1]
    diff = np.maximum.reduce(
        [
            np.abs(centre - rgb[:-2, 1:-1]).max(-1),
            np.abs(centre - rgb[2:, 1:-1]).max(-1),
            np.abs(centre - rgb[1:-1, :-2]).max(-1),
            np.abs(centre - rgb[1:-1, 2:]).max(-1),
        ]
    )
    return float((diff[interior[1:-1, 1:-1]] <= FLAT_LEVELS).mean())


def _flags(dat: Path) -> set[str]:
    if not dat.exists():
        return set()
    words = dat.read_text(encoding="utf-8", errors="replace").split()
    return {w.split("=")[0].lower() for w in words}


def classify(root: Path, relative: str) -> tuple[str, str] | None:
    """(kind, reason) for the image at stamps/<relative>, or None when it is not a stamp of its own."""
    path = root / relative
    stem, suffix = path.stem, path.suffix.lower()
    if stem.endswith(MIRROR_SUFFIXES):
        return None
    if suffix == ".png" and path.with_suffix(".svg").exists():
        return None
    if suffix == ".svg":
        return "drawing", "vector"
    if "cartoon" in PurePosixPath(relative).parts[:-1]:
        return "drawing", "cartoon-folder"
    if _flags(path.with_suffix(".dat")) & set(RECOLOURABLE_FLAGS):
        return "drawing", "recolourable"
    if relative in AUDITED_DRAWINGS:
        return "drawing", "audited"
    with Image.open(path) as image:
        fraction = flat_fraction(image)
    if fraction is not None and fraction > FLAT_FRACTION_LIMIT:
        return "drawing", "flat-colour"
    return "photo", "photo"


def scan(package_root: Path) -> Iterator[Stamp]:
    """Every stamp of the package in path order, classified."""
    root = stamps_root(package_root)
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        relative = path.relative_to(root).as_posix()
        decided = classify(root, relative)
        if decided is None:
            continue
        caption_file = path.with_suffix(".txt")
        caption = first_line(caption_file.read_text(encoding="utf-8", errors="replace")) if caption_file.exists() else ""
        yield Stamp(path=relative, caption=caption, kind=decided[0], reason=decided[1])
