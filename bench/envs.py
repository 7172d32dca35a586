"""The reference tools of the benchmarks, each in a virtualenv of its own: `python -m bench.envs`.

A reference whose pins conflict with the stack cannot share its environment: img2dataset needs
NumPy 2 (through opencv and albucore) where nvidia-pytriton, the local Triton, pins NumPy 1, and
installing both into one environment backtracks until pip builds an old scikit-learn from source.
So each benchmark runs its reference as a subprocess of an environment made for it:

- `.venv-bench-crawler`: img2dataset alone (bench/crawler/requirements-reference.txt);
- `.venv-bench-dedup`: imagededup over the stack's environment (bench/dedup/requirements-reference.txt).
  imagededup imports torch, which the stack already has (GBs); this environment sees the stack's
  packages underneath its own (a .pth line) and adds only what the stack lacks. Before installing,
  a dry run must show that nothing the stack has would be upgraded or replaced; otherwise it stops
  and says so (the stack's environment is never modified).

An environment is rebuilt when its requirements file, the Python version or the stack's environment
changes (a stamp file records them). Setup output goes to .iex/logs/bench-<name>.log.

    python -m bench.envs ensure crawler|dedup     build if needed, print its python
    python -m bench.envs check [NAME ...]         build if needed and import each reference (CI)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOG_DIR = ROOT / ".iex" / "logs"


@dataclass(frozen=True)
class Reference:
    name: str
    requirements: Path
    imports: tuple[str, ...]
    # True: the stack's site-packages lie under this environment's own (nothing of the stack reinstalled).
    over_stack: bool = False

    @property
    def venv(self) -> Path:
        return ROOT / f".venv-bench-{self.name}"

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    @property
    def log(self) -> Path:
        return LOG_DIR / f"bench-{self.name}.log"


REFERENCES: dict[str, Reference] = {
    "crawler": Reference("crawler", ROOT / "bench" / "crawler" / "requirements-reference.txt", ("img2dataset",)),
    "dedup": Reference("dedup", ROOT / "bench" / "dedup" / "requirements-reference.txt", ("imagededup.methods",), over_stack=True),
}


class EnvError(RuntimeError):
    pass


def _stack_site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"]).resolve()


def _stamp(ref: Reference) -> str:
    parts = [ref.requirements.read_text(), sys.version, str(sys.executable)]
    if ref.over_stack:
        parts.append(str(_stack_site_packages()))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _stamp_file(ref: Reference) -> Path:
    return ref.venv / ".iex-bench-stamp"


def is_current(ref: Reference) -> bool:
    stamp = _stamp_file(ref)
    return ref.python.exists() and stamp.is_file() and stamp.read_text().strip() == _stamp(ref)


def _run(argv: list[str], log, what: str) -> subprocess.CompletedProcess:
    log.write(f"\n== {what}: {' '.join(argv)}\n")
    log.flush()
    done = subprocess.run(argv, stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})  # noqa: S603
    if done.returncode != 0:
        raise EnvError(f"{what} failed (exit {done.returncode}); see {log.name}")
    return done


def _venv_site_packages(ref: Reference) -> Path:
    out = subprocess.run([str(ref.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


def _planned_installs(ref: Reference, log) -> list[dict]:
    report = ref.venv / "pip-report.json"
    _run([str(ref.python), "-m", "pip", "install", "--dry-run", "--quiet", "--report", str(report), "-r", str(ref.requirements)], log, "resolving")
    return json.loads(report.read_text()).get("install", [])


def ensure(ref: Reference, say=print) -> Path:
    """The reference's python, building its environment first when missing or out of date."""
    if is_current(ref):
        return ref.python
    ref.log.parent.mkdir(parents=True, exist_ok=True)
    say(f"building {ref.venv.name} for the {ref.name} benchmark's reference (once; log: {ref.log}) ...")
    with open(ref.log, "a", encoding="utf-8") as log:
        try:
            if ref.venv.exists():
                shutil.rmtree(ref.venv)
            _run([sys.executable, "-m", "venv", str(ref.venv)], log, "creating the virtualenv")
            if ref.over_stack:
                (_venv_site_packages(ref) / "_iex_stack.pth").write_text(f"{_stack_site_packages()}\n")
                # Nothing of the stack's environment may be upgraded or replaced (pip would uninstall it
                # there): what pip plans must be new, or replace only this environment's own copies.
                planned = _planned_installs(ref, log)
                where = _locations(ref, [i["metadata"]["name"] for i in planned])
                stack = str(_stack_site_packages())
                clashing = [f"{i['metadata']['name']} {i['metadata']['version']}" for i in planned if where.get(i["metadata"]["name"]) == stack]
                if clashing:
                    raise EnvError(
                        f"the {ref.name} reference would replace packages of the stack's environment ({', '.join(clashing)}); "
                        f"it cannot run over the stack any more: give it a standalone environment (over_stack=False in bench/envs.py)"
                    )
            else:
                _run([str(ref.python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"], log, "upgrading pip")
            _run([str(ref.python), "-m", "pip", "install", "--quiet", "-r", str(ref.requirements)], log, "installing the reference")
            check_imports(ref, log)
        except (EnvError, OSError, subprocess.CalledProcessError) as exc:
            say(f"{ref.venv.name}: {exc}; the end of {ref.log}:")
            say("\n".join(ref.log.read_text(errors="replace").splitlines()[-25:]))
            raise EnvError(str(exc)) from None
    _stamp_file(ref).write_text(_stamp(ref))
    return ref.python


def _locations(ref: Reference, names: list[str]) -> dict[str, str]:
    """Where the reference's environment finds each distribution now ('' when it has none)."""
    code = (
        "import importlib.metadata as m, json, sys\n"
        "out = {}\n"
        "for n in sys.argv[1:]:\n"
        "    try:\n"
        "        out[n] = str(m.distribution(n).locate_file('')).rstrip('/')\n"
        "    except m.PackageNotFoundError:\n"
        "        out[n] = ''\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([str(ref.python), "-c", code, *names], capture_output=True, text=True, check=True)  # noqa: S603
    return json.loads(done.stdout)


def check_imports(ref: Reference, log=None) -> str:
    """Imports every module of the reference in its environment; returns the reference's version line."""
    code = "import importlib, importlib.metadata as m, os; os.environ.setdefault('NO_ALBUMENTATIONS_UPDATE', '1')\n"
    code += "".join(f"importlib.import_module({module!r})\n" for module in ref.imports)
    code += f"print({ref.imports[0].split('.')[0]!r}, m.version({ref.imports[0].split('.')[0]!r}))\n"
    done = subprocess.run([str(ref.python), "-c", code], capture_output=True, text=True, env={**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"})  # noqa: S603
    if log is not None:
        log.write(done.stdout + done.stderr)
    if done.returncode != 0:
        raise EnvError(f"{ref.name} reference does not import in {ref.venv.name}: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
    return done.stdout.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.envs", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ensure_p = sub.add_parser("ensure")
    ensure_p.add_argument("name", choices=sorted(REFERENCES))
    check_p = sub.add_parser("check")
    check_p.add_argument("names", nargs="*", help=f"default: all ({', '.join(sorted(REFERENCES))})")
    args = parser.parse_args(argv)
    unknown = sorted(set(getattr(args, "names", [])) - set(REFERENCES))
    if unknown:
        parser.error(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(sorted(REFERENCES))}")
    try:
        if args.command == "ensure":
            print(ensure(REFERENCES[args.name], say=lambda line: print(line, file=sys.stderr, flush=True)))
            return 0
        failed = 0
        for name in args.names or sorted(REFERENCES):
            ref = REFERENCES[name]
            try:
                ensure(ref, say=lambda line: print(line, flush=True))
                print(f"{ref.venv.name}: resolves, {check_imports(ref)} imports", flush=True)
            except EnvError as exc:
                print(f"{ref.venv.name}: FAILED: {exc}", flush=True)
                failed += 1
        return 1 if failed else 0
    except EnvError as exc:
        print(f"bench.envs: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
