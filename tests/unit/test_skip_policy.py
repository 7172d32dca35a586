"""The skip policy of tests/conftest.py: under IEX_STRICT_SKIPS=1 only declared optional capabilities may skip."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SUITE = '''
import pytest

def test_runs():
    pass

def test_needs_a_gpu_it_lacks():
    pytest.skip("optional capability gpu: no CUDA device on this machine")

@pytest.mark.gpu
def test_marked_gpu():
    import torch
    assert torch.cuda.is_available()
'''

UNEXPECTED = '''
import pytest

def test_busy_ports():
    pytest.skip("ports [19092] are held by another stack on this machine")

def test_unknown_capability():
    pytest.skip("optional capability quantum-computer: none here")
'''


def _run(tmp_path: Path, files: dict[str, str], strict: bool) -> subprocess.CompletedProcess:
    shutil.copy(ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    gpu: needs a CUDA device\n")
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    env = {**os.environ, "IEX_STRICT_SKIPS": "1" if strict else "0", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)


def test_declared_optional_capabilities_may_skip_under_strict(tmp_path):
    done = _run(tmp_path, {"test_ok.py": SUITE}, strict=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "skips: 2 allowed, 0 unexpected" in done.stdout
    assert "allowed      2 x optional capability gpu: no CUDA device on this machine" in done.stdout


def test_any_other_skip_fails_a_strict_run_and_is_listed(tmp_path):
    done = _run(tmp_path, {"test_ok.py": SUITE, "test_bad.py": UNEXPECTED}, strict=True)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "UNEXPECTED   1 x ports [19092] are held by another stack on this machine" in done.stdout
    assert "UNEXPECTED   1 x optional capability quantum-computer: none here" in done.stdout
    assert "skips: 2 allowed, 2 unexpected; strict (IEX_STRICT_SKIPS=1): the run fails" in done.stdout
    relaxed = _run(tmp_path, {}, strict=False)  # same files, not strict: reported, not fatal
    assert relaxed.returncode == 0 and "2 unexpected" in relaxed.stdout


def test_a_module_level_skip_counts_too(tmp_path):
    done = _run(tmp_path, {"test_mod.py": "import pytest\npytest.importorskip('no_such_module_here')\n\ndef test_x():\n    pass\n"}, strict=True)
    assert done.returncode == 1 and "UNEXPECTED" in done.stdout and "no_such_module_here" in done.stdout


def test_the_reason_helper_refuses_undeclared_capabilities():
    import importlib.util

    # Loaded by path under its own name: in a whole-suite run `conftest` in sys.modules may be another folder's.
    spec = importlib.util.spec_from_file_location("iex_tests_root_conftest", ROOT / "tests" / "conftest.py")
    conftest = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conftest)
    assert conftest.optional_skip_reason("gpu", "none") == "optional capability gpu: none"
    with pytest.raises(ValueError):
        conftest.optional_skip_reason("network", "offline")
    assert conftest.skip_allowed("Skipped: optional capability compat-servers: no java")
    assert not conftest.skip_allowed("Debian package wordnet-base is not in ~/.cache/iex (run `make data` to fetch it)")
