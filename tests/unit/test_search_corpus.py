"""Corpus format and the synthetic generator (no model needed)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from services.search import synthetic
from services.search.corpus import CORPUS_FILE, CorpusError, load_corpus


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_generator_is_deterministic_and_concepts_are_independent(tmp_path):
    concepts = ["red circle", "blue star", "green triangle"]
    synthetic.make_corpus(tmp_path / "a", per_concept=3, concepts=concepts, seed=7)
    synthetic.make_corpus(tmp_path / "b", per_concept=3, concepts=concepts, seed=7)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")

    synthetic.make_corpus(tmp_path / "other-seed", per_concept=3, concepts=concepts, seed=8)
    a_images = {k: v for k, v in _files(tmp_path / "a").items() if k.startswith("images/")}
    other = _files(tmp_path / "other-seed")
    assert all(other[name] != data for name, data in a_images.items())

    # A concept's images do not depend on which other concepts are generated with it.
    synthetic.make_corpus(tmp_path / "alone", per_concept=3, concepts=["blue star"], seed=7)
    assert (tmp_path / "alone/images/blue-star-0002.png").read_bytes() == (tmp_path / "a/images/blue-star-0002.png").read_bytes()

    # Images within a concept differ from each other.
    assert len({v for v in a_images.values()}) == len(a_images) == 9


def test_generated_corpus_loads_with_checksums_and_captions(tmp_path):
    records = synthetic.make_corpus(tmp_path, per_concept=2, concepts=["orange square", "purple circle"])
    corpus = load_corpus(tmp_path)
    assert [r.id for r in corpus.records] == [r.id for r in records] == ["orange-square-0000", "orange-square-0001", "purple-circle-0000", "purple-circle-0001"]
    for record in corpus.records:
        assert hashlib.sha256(corpus.path_of(record).read_bytes()).hexdigest() == record.sha256
        assert record.concept in record.caption
        assert record.content_type == "image/png"
        assert record.license == "CC0-1.0"
    assert corpus.checksum == hashlib.sha256((tmp_path / CORPUS_FILE).read_bytes()).hexdigest()


def test_target_is_labelled_and_never_repeats_corpus_images(tmp_path):
    concepts = ["red circle", "orange circle"]
    synthetic.make_corpus(tmp_path / "corpus", per_concept=4, concepts=concepts, seed=0)
    summary = synthetic.make_target(tmp_path / "target", concepts, n_train=3, n_eval=2, seed=0)
    assert summary["train"] == 6 and summary["eval"] == {"red_circle": 2, "orange_circle": 2}
    assert len(list((tmp_path / "target/train").glob("*.png"))) == 6
    assert sorted(p.name for p in (tmp_path / "target/eval").iterdir()) == ["orange_circle", "red_circle"]
    assert len(list((tmp_path / "target/eval/red_circle").glob("*.png"))) == 2
    corpus_bytes = {p.read_bytes() for p in (tmp_path / "corpus/images").glob("*.png")}
    target_bytes = [p.read_bytes() for p in (tmp_path / "target").rglob("*.png")]
    assert len(target_bytes) == 10 and not corpus_bytes.intersection(target_bytes)
    assert json.loads((tmp_path / "target/target.json").read_text())["concepts"] == concepts
    # The train split's labels, for the trainer's evaluation only: every train image, no eval image.
    labels = json.loads((tmp_path / "target" / synthetic.TRAIN_LABELS_FILE).read_text())
    assert labels["format"] == 1 and labels["label_by"] == "concept"
    assert labels["labels"] == {f"train/{label}-{i:04d}.png": label for label in ("red_circle", "orange_circle") for i in range(3)}
    assert all((tmp_path / "target" / key).is_file() for key in labels["labels"])


def test_unknown_concept_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown concept"):
        synthetic.make_target(tmp_path, ["pink elephant"], 1, 1)


def test_cli_writes_corpus_and_target(tmp_path, capsys):
    assert synthetic.main(["corpus", str(tmp_path / "c"), "--per-concept", "1", "--concepts", "red circle,blue square"]) == 0
    assert len(load_corpus(tmp_path / "c")) == 2
    assert synthetic.main(["target", str(tmp_path / "t"), "--concepts", "red circle", "--train-per-concept", "2", "--eval-per-concept", "1"]) == 0
    assert len(list((tmp_path / "t/train").glob("*.png"))) == 2
    assert synthetic.main(["target", str(tmp_path / "t"), "--concepts", "red elephant"]) == 2
    assert "unknown concept" in capsys.readouterr().err


def _write_listing(root: Path, lines: list[object]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / CORPUS_FILE).write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))


def test_corpus_validation_names_lines_and_fields(tmp_path):
    root = tmp_path / "corpus"
    (root / "img").mkdir(parents=True)
    (root / "img/a.png").write_bytes(b"png")
    (tmp_path / "secret.png").write_bytes(b"outside")
    os.symlink(tmp_path / "secret.png", root / "img/link.png")
    _write_listing(
        root,
        [
            {"id": "a", "file": "img/a.png", "caption": "a red circle"},
            {"id": "a", "file": "img/a.png", "caption": "dup"},
            {"id": "b", "file": "../secret.png", "caption": "escape"},
            {"id": "c", "file": "/etc/passwd.png", "caption": "absolute"},
            {"id": "d", "file": "img/missing.png", "caption": "missing"},
            {"id": "../e", "file": "img/a.png", "caption": "bad id"},
            {"id": "f", "file": "img/a.svg", "caption": "svg"},
            {"id": "g", "file": "img/link.png", "caption": "symlink out"},
            {"id": "h", "file": "img/a.png", "caption": "  "},
            {"id": "i", "file": "img/a.png"},
            "not json",
            {"id": "j", "file": "img/a.png", "caption": "x", "sha256": "XYZ"},
        ],
    )
    with pytest.raises(CorpusError) as failure:
        load_corpus(root)
    message = str(failure.value)
    for expected in (
        ":2: id: 'a' duplicates line 1",
        ":3: file: must be relative",
        ":4: file: must be relative",
        ":5: file: 'img/missing.png' does not exist",
        ":6: id:",
        ":7: file: unsupported image type '.svg'",
        ":8: file: 'img/link.png' resolves outside the corpus",
        ":9: caption: must not be empty",
        ":10: caption: required string",
        ":11: not JSON",
        ":12: sha256:",
    ):
        assert expected in message, expected
    assert ":1:" not in message


def test_missing_or_empty_corpus_is_an_error(tmp_path):
    with pytest.raises(CorpusError, match="no corpus.jsonl"):
        load_corpus(tmp_path)
    _write_listing(tmp_path, [])
    with pytest.raises(CorpusError, match="no records"):
        load_corpus(tmp_path)
