"""The benchmarks' reference environments (bench/envs.py): what they hold, when they are rebuilt."""

from __future__ import annotations

import tomllib
from pathlib import Path

from bench import envs

ROOT = Path(__file__).resolve().parents[2]


def test_every_reference_has_a_pinned_requirements_file_outside_the_stack():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    stack_requirements = " ".join(" ".join(v) for v in extras.values()).lower()
    for ref in envs.REFERENCES.values():
        lines = [line for line in ref.requirements.read_text().splitlines() if line.strip() and not line.startswith("#")]
        assert lines and all("==" in line for line in lines), f"{ref.requirements} pins its reference"
        for line in lines:
            assert line.split("==")[0].lower() not in stack_requirements, f"{line} is also a stack extra: it would conflict again"
        assert ref.venv.name == f".venv-bench-{ref.name}"
    assert set(envs.REFERENCES) == {"crawler", "dedup"}


def test_an_environment_is_rebuilt_when_its_requirements_change(tmp_path, monkeypatch):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("tool==1.0\n")
    ref = envs.Reference("toy", requirements, ("tool",))
    monkeypatch.setattr(envs, "ROOT", tmp_path)
    assert ref.venv == tmp_path / ".venv-bench-toy"
    assert not envs.is_current(ref)  # nothing built
    (ref.venv / "bin").mkdir(parents=True)
    ref.python.write_text("")
    envs._stamp_file(ref).write_text(envs._stamp(ref))
    assert envs.is_current(ref)
    requirements.write_text("tool==2.0\n")
    assert not envs.is_current(ref)


def test_the_reference_scripts_import_nothing_of_the_stack():
    import ast

    for script in (ROOT / "bench" / "crawler" / "reference.py", ROOT / "bench" / "dedup" / "reference.py"):
        for node in ast.walk(ast.parse(script.read_text())):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for module in modules:
                assert not module.startswith(("services", "bench", "iex", "numpy", "torch")), f"{script.name} imports {module}"
