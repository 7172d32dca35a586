"""Data that Debian ships (WordNet, Tux Paint stamps, clip art), fetched by package name and cached.

`apt-get download` fetches the .deb without installing it (no root needed for the cache itself,
though `apt-get update` may be), and `dpkg-deb -x` unpacks it under ~/.cache/iex/deb/<name>/.
Nothing fetched here is ever committed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path


class PackageUnavailable(RuntimeError):
    pass


def cache_root() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "iex" / "deb"


def fetch(package: str, *, update_if_missing: bool = True) -> Path:
    """Unpacked root of `package` (e.g. <root>/usr/share/wordnet); downloads it once."""
    root = cache_root() / package
    marker = root / ".complete"
    if marker.exists():
        return root
    for tool in ("apt-get", "dpkg-deb"):
        if shutil.which(tool) is None:
            raise PackageUnavailable(f"{tool} not found: fetching Debian package {package!r} needs a Debian-based machine")
    with tempfile.TemporaryDirectory() as tmp:
        result = _download(package, tmp)
        if result.returncode != 0 and update_if_missing:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True, check=False)
            result = _download(package, tmp)
        if result.returncode != 0:
            raise PackageUnavailable(f"apt-get download {package} failed: {result.stderr.strip()[-500:]}")
        debs = sorted(Path(tmp).glob("*.deb"))
        if not debs:
            raise PackageUnavailable(f"apt-get download {package} produced no .deb")
        staging = root.with_name(root.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for deb in debs:
            subprocess.run(["dpkg-deb", "-x", str(deb), str(staging)], check=True, capture_output=True)
        (staging / ".deb").write_text("\n".join(d.name for d in debs) + "\n")
        shutil.rmtree(root, ignore_errors=True)
        staging.rename(root)
        marker.write_text("ok\n")
    return root


def _download(package: str, directory: str) -> subprocess.CompletedProcess:
    # -o APT::Sandbox::User=root: the download dir is ours, not _apt's.
    return subprocess.run(
        ["apt-get", "download", "-o", "APT::Sandbox::User=root", package],
        cwd=directory,
        capture_output=True,
        text=True,
        check=False,
    )
