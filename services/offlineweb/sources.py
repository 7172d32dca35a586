"""The packages the offline web is built from, and fetching them (cached, with sizes and checksums).

npm versions are pinned: the same pins give the same corpus. Debian packages come in the version the
machine's apt sources carry; that version and its .deb checksum are recorded in the manifest, so two
builds can be compared. Apple's and Facebook's emoji sets are not licensed for reuse and are never
fetched (emoji-datasource ships them as separate packages; only -google and -twitter are used).
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from services.common import debpkg, npmpkg


@dataclass(frozen=True)
class Source:
    name: str  # short id used in corpus ids, manifests and --sources
    kind: str  # "npm" | "deb"
    package: str
    version: str  # pinned npm version; "" for Debian (whatever apt carries)
    license: str  # SPDX-style identifier of the images
    role: str  # "web" (corpus) | "targets" (photos + distractor drawings) | "vocabulary"
    description: str


SOURCES: tuple[Source, ...] = (
    Source("google", "npm", "emoji-datasource-google", "16.0.0", "Apache-2.0", "web", "Noto emoji as 64 px PNGs, emoji.json names, categories"),
    Source("twitter", "npm", "emoji-datasource-twitter", "16.0.0", "CC-BY-4.0", "web", "Twemoji as 64 px PNGs"),
    Source("openmoji", "npm", "openmoji", "17.0.0", "CC-BY-SA-4.0", "web", "OpenMoji SVGs and openmoji.json tags, rendered with cairosvg"),
    Source("fluent3d", "npm", "@lobehub/fluent-emoji-3d", "1.1.0", "MIT", "web", "Microsoft Fluent Emoji, 3D style, 256 px WebP"),
    Source("noto", "deb", "fonts-noto-color-emoji", "", "OFL-1.1", "web", "Noto Color Emoji font, glyphs drawn at size 109"),
    Source("openclipart", "deb", "openclipart-svg", "", "public-domain", "web", "Open Clip Art Library drawings (SVG with RDF metadata)"),
    Source("tuxpaint", "deb", "tuxpaint-stamps-default", "", "GPL-2.0-or-later", "targets", "Tux Paint stamps: real photos (targets) and drawings (distractors)"),
    Source("wordnet", "deb", "wordnet-base", "", "WordNet-3.0", "vocabulary", "WordNet 3.0 database: synsets, sense order, irregular plurals"),
)
BY_NAME = {s.name: s for s in SOURCES}
EMOJI_STYLES = ("google", "twitter", "openmoji", "fluent3d", "noto")
# The PNG edition of openclipart is 131 MB against 25 MB for the SVGs it was rendered from, and only the
# SVGs carry titles, keywords and authors; the SVGs are rendered here like OpenMoji's.


@dataclass(frozen=True)
class Fetched:
    source: Source
    root: Path  # unpacked package root (npm: the package/ folder; Debian: the filesystem root)
    version: str
    archive: str  # tarball or .deb file name
    archive_bytes: int  # download size (0 when unknown)
    archive_sha256: str  # "" when unknown
    unpacked_bytes: int
    seconds: float  # time this fetch took (about 0 when cached)


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


_DEB_NAME = re.compile(r"^(?P<name>[^_]+)_(?P<version>[^_]+)_(?P<arch>[^_.]+)\.deb$")


def _apt_fields(package: str, version: str) -> dict[str, str]:
    """Size and SHA256 of a .deb from apt's package lists (no download)."""
    try:
        result = subprocess.run(["apt-cache", "show", f"{package}={version}"], capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    fields: dict[str, str] = {}
    for line in result.stdout.splitlines():
        if not line.strip():
            break  # first stanza only
        key, _, value = line.partition(": ")
        if key in ("Size", "SHA256", "Version"):
            fields[key] = value.strip()
    return fields


def fetch(source: Source) -> Fetched:
    started = time.monotonic()
    if source.kind == "npm":
        package = npmpkg.fetch(source.package, source.version or None)
        return Fetched(
            source=source,
            root=package.root,
            version=package.version,
            archive=package.tarball,
            archive_bytes=package.tarball_bytes,
            archive_sha256=package.tarball_sha256,
            unpacked_bytes=tree_bytes(package.root),
            seconds=time.monotonic() - started,
        )
    root = debpkg.fetch(source.package)
    debs = [line.strip() for line in (root / ".deb").read_text().splitlines() if line.strip()] if (root / ".deb").exists() else []
    match = _DEB_NAME.match(debs[0].replace("%3a", ":")) if debs else None
    version = match.group("version") if match else ""
    apt = _apt_fields(source.package, version) if version else {}
    return Fetched(
        source=source,
        root=root,
        version=version,
        archive=debs[0] if debs else "",
        archive_bytes=int(apt.get("Size", 0) or 0),
        archive_sha256=apt.get("SHA256", ""),
        unpacked_bytes=tree_bytes(root),
        seconds=time.monotonic() - started,
    )


def fetch_all(names: Iterable[str], progress: Callable[[str], None] | None = None) -> dict[str, Fetched]:
    out: dict[str, Fetched] = {}
    for name in names:
        if progress:
            progress(f"fetching {name} ({BY_NAME[name].package})")
        out[name] = fetch(BY_NAME[name])
    return out


def select(names: Iterable[str] | None) -> list[str]:
    """Validated source names in registry order; None or empty means all."""
    wanted = [n.strip() for n in (names or []) if n.strip()]
    unknown = [n for n in wanted if n not in BY_NAME]
    if unknown:
        raise ValueError(f"sources: unknown {', '.join(unknown)} (known: {', '.join(BY_NAME)})")
    chosen = set(wanted) if wanted else set(BY_NAME)
    chosen.add("wordnet")  # synsets need it whatever else is built
    return [s.name for s in SOURCES if s.name in chosen]
