"""Data that npm packages ship (emoji image sets), fetched by package name and cached.

`npm pack <name>@<version>` downloads the registry tarball (through npm's own cache, so a second
fetch costs nothing) without installing anything; it is unpacked with tarfile's `data` filter (no
absolute paths, no links out, no devices) under ~/.cache/iex/npm/<name>/package/. Never into the
repository, never a node_modules. `.complete` is written last and records what was fetched (version,
tarball size, sha256 and npm's integrity string), so a half-finished fetch is never mistaken for one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path


class PackageUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class NpmPackage:
    name: str
    version: str
    root: Path  # the unpacked package: <cache>/<name>/package
    tarball: str  # file name of the tarball npm produced
    tarball_bytes: int
    tarball_sha256: str
    integrity: str  # npm's sha512 subresource-integrity string, as the registry publishes it


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "iex" / "npm"


def _directory(name: str) -> Path:
    # "@lobehub/fluent-emoji-3d" -> "@lobehub+fluent-emoji-3d": one folder per package.
    return cache_root() / name.replace("/", "+")


def _read_marker(directory: Path) -> NpmPackage | None:
    marker = directory / ".complete"
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
        return NpmPackage(**{**data, "root": directory / "package"})
    except (ValueError, TypeError):
        return None


def cached(name: str, version: str | None = None) -> NpmPackage | None:
    """The cached package when it is there (and of `version`, if given); never downloads."""
    found = _read_marker(_directory(name))
    if found is None or (version and found.version != version):
        return None
    return found


def fetch(name: str, version: str | None = None, timeout_s: float = 600.0) -> NpmPackage:
    """The unpacked package `name` (at `version`, else the registry's latest); downloads it once."""
    found = cached(name, version)
    if found is not None:
        return found
    if shutil.which("npm") is None:
        raise PackageUnavailable(f"npm not found: fetching npm package {name!r} needs Node.js's npm on PATH")
    spec = f"{name}@{version}" if version else name
    directory = _directory(name)
    directory.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".npm-pack-", dir=directory.parent) as tmp:
        try:
            result = subprocess.run(
                ["npm", "pack", spec, "--json", "--pack-destination", tmp, "--ignore-scripts"],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise PackageUnavailable(f"npm pack {spec} timed out after {timeout_s:.0f} s") from exc
        if result.returncode != 0:
            raise PackageUnavailable(f"npm pack {spec} failed: {result.stderr.strip()[-500:]}")
        try:
            info = json.loads(result.stdout)[0]
        except (ValueError, IndexError, KeyError) as exc:
            raise PackageUnavailable(f"npm pack {spec}: unexpected output {result.stdout[:200]!r}") from exc
        tarball = Path(tmp) / info["filename"]
        if not tarball.is_file():
            raise PackageUnavailable(f"npm pack {spec} produced no {info['filename']}")
        digest = hashlib.sha256()
        with open(tarball, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        staging = Path(tmp) / "unpacked"
        staging.mkdir()
        with tarfile.open(tarball, "r:gz") as archive:
            archive.extractall(staging, filter="data")
        if not (staging / "package").is_dir():
            raise PackageUnavailable(f"npm pack {spec}: the tarball has no package/ folder")
        package = NpmPackage(
            name=info["name"],
            version=info["version"],
            root=directory / "package",
            tarball=info["filename"],
            tarball_bytes=tarball.stat().st_size,
            tarball_sha256=digest.hexdigest(),
            integrity=info.get("integrity", ""),
        )
        marker = {k: v for k, v in asdict(package).items() if k != "root"}
        (staging / ".complete.tmp").write_text(json.dumps(marker, sort_keys=True, indent=1) + "\n")
        shutil.rmtree(directory, ignore_errors=True)
        staging.rename(directory)
    # The marker goes in last: an interrupted fetch leaves no .complete and is redone.
    (directory / ".complete.tmp").rename(directory / ".complete")
    return package
