"""services.offlineweb on small fake packages built here: no network, no real package.

A fake WordNet (real offsets, a handful of synsets), a fake emoji-datasource / OpenMoji / Fluent
package, a fake openclipart tree and a fake Tux Paint stamp tree with photos (noise textures) and
drawings (flat colour, cartoon folder, recolourable, SVG).
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from services.offlineweb import build as build_mod
from services.offlineweb import captions, render, sources, synsets, targets, tuxpaint
from services.offlineweb.items import make_id
from services.offlineweb.upload import upload_target
from services.search.corpus import load_corpus

# ---- a fake WordNet: (offset, lemmas, hypernyms, instance hypernyms) ----------------------------
SYNSETS = [
    (1740, ["entity"], [], []),
    (1930, ["physical_entity"], [1740], []),
    (2137, ["abstraction"], [1740], []),
    (7846, ["person", "individual"], [1930], []),
    (15388, ["animal", "beast"], [1930], []),
    (21939, ["artifact"], [1930], []),
    (21265, ["food", "nutrient"], [1930], []),
    (13086908, ["plant_part"], [1930], []),
    (13134947, ["fruit"], [13086908], []),
    (7705931, ["edible_fruit"], [21265, 13134947], []),
    (7739125, ["apple"], [7705931], []),
    (12633994, ["apple", "orchard_apple_tree"], [1930], []),
    (7758680, ["grape"], [7705931], []),
    (7761141, ["cherimoya"], [7705931], []),
    (7707451, ["vegetable", "veggie"], [21265], []),
    (7730207, ["carrot"], [7707451], []),
    (1503061, ["bird"], [15388], []),
    (1806143, ["peafowl", "peacock"], [1503061], []),
    (2279257, ["peacock", "peacock_butterfly"], [15388], []),
    (2012849, ["crane"], [1503061], []),
    (1855672, ["goose"], [1503061], []),
    (3126707, ["crane"], [21939], []),
    (10914447, ["Crane", "Hart_Crane"], [], [7846]),
    (2415829, ["mountain_goat"], [15388], []),
    (7581346, ["ice-cream_cone"], [21265], []),
    (4451818, ["tool"], [21939], []),
    (3481172, ["hammer"], [4451818], []),
    (7486922, ["hankering", "yen"], [2137], []),
    (13709700, ["yen"], [2137], []),
]
# Sense order (index.noun) where a lemma has several senses; otherwise offset order.
SENSE_ORDER = {
    "apple": [7739125, 12633994],
    "peacock": [2279257, 1806143],
    "crane": [10914447, 3126707, 2012849],
    "yen": [7486922, 13709700],
}


def write_wordnet(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    lines = ["  1 This is a fake WordNet for tests"]
    lemmas: dict[str, list[int]] = {}
    for offset, words, hypernyms, instances in SYNSETS:
        pointers = [f"@ {h:08d} n 0000" for h in hypernyms] + [f"@i {h:08d} n 0000" for h in instances]
        word_fields = " ".join(f"{w} 0" for w in words)
        lines.append(f"{offset:08d} 03 n {len(words):02x} {word_fields} {len(pointers):03d} {' '.join(pointers)} | gloss of {words[0]}  ")
        for w in words:
            lemmas.setdefault(w.lower(), []).append(offset)
    (directory / "data.noun").write_text("\n".join(lines) + "\n")
    index = ["  1 fake index"]
    for lemma in sorted(lemmas):
        offsets = SENSE_ORDER.get(lemma, sorted(lemmas[lemma]))
        index.append(f"{lemma} n {len(offsets)} 1 @ {len(offsets)} 0 {' '.join(f'{o:08d}' for o in offsets)}  ")
    (directory / "index.noun").write_text("\n".join(index) + "\n")
    (directory / "noun.exc").write_text("geese goose\n")
    return directory


@pytest.fixture(scope="module")
def mapper(tmp_path_factory) -> synsets.SynsetMapper:
    return synsets.SynsetMapper.load(write_wordnet(tmp_path_factory.mktemp("wordnet")))


# ---- synset mapping -----------------------------------------------------------------------------
def test_first_sense_in_wordnet_order_and_physical_preference(mapper):
    assert mapper.lookup("apple").wnid == "n07739125"  # sense 1, not the apple tree
    # Sense 1 of crane is Hart Crane, a named instance: skipped for the crane machine.
    crane = mapper.lookup("crane")
    assert crane.wnid == "n03126707" and crane.rule == "physical"
    # Yen has no physical sense: the first sense is kept.
    assert mapper.lookup("yen").wnid == "n07486922" and mapper.lookup("yen").rule == "first"


def test_context_roots_choose_the_sense(mapper):
    assert mapper.lookup("peacock").wnid == "n02279257"  # sense 1 is the butterfly
    birds = mapper.context_roots(["birds", "animals"])
    assert birds[0] == 1503061  # the folder's own noun comes first
    assert mapper.map_texts(["A peacock."], birds).wnid == "n01806143"
    assert mapper.map_texts(["A crowned crane."], birds).wnid == "n02012849"
    assert mapper.map_texts(["A crane."], mapper.context_roots(["tools"])).wnid == "n03126707"


def test_head_noun_extraction(mapper):
    assert mapper.map_texts(["A bunch of grapes."]).wnid == "n07758680"  # partitive + plural
    assert mapper.map_texts(["Two geese!"]).wnid == "n01855672"  # noun.exc
    assert mapper.map_texts(["A red apple. Yum!"]).wnid == "n07739125"
    assert mapper.map_texts(["Apple bitten"]).wnid == "n07739125"  # no noun after the head
    assert mapper.map_texts(["A cherimoya fruit."]).wnid == "n07761141"  # the modifier is a kind of the head
    assert mapper.map_texts(["mountaingoat"]).wnid == "n02415829"  # run-together file name
    assert mapper.map_texts(["ice cream cone (1 scoop)"]).wnid == "n07581346"  # WordNet spells it ice-cream cone
    assert mapper.map_texts(["Boom!!!", "explosion"]) is None


def test_whole_lemmas_beat_head_nouns_across_texts(mapper):
    # The caption's head noun would be 'carrot'; the file name is a whole lemma and wins.
    match = mapper.map_texts(["A hammer resembles a carrot", "hammer"])
    assert match.wnid == "n03481172"


# ---- captions -----------------------------------------------------------------------------------
def test_file_names_become_captions():
    assert captions.clean_file_name("apple_bitten_dan_gerhard_01", ["Dan Gerhards"]) == "apple bitten"
    assert captions.clean_file_name("la_prugna_architetto_fra_01", ["Architetto Francesco Rollandin"]) == "la prugna"
    assert captions.clean_file_name("005nickel") == "nickel"
    assert captions.clean_file_name("Cherry_Stella2") == "cherry stella"
    assert captions.clean_file_name("b_6_pawn") == "pawn"
    assert captions.clean_file_name("heron_greatBlue-256px") == "heron great blue"
    assert captions.clean_file_name("01") == "01"  # nothing better: keep it rather than an empty caption


def test_svg_metadata_and_titles():
    head = """<svg><metadata><rdf:RDF><cc:Work rdf:about="">
      <dc:title>Clipart by Nicu Buculei - pear</dc:title>
      <dc:description>A pear &amp; a leaf</dc:description>
      <dc:subject><rdf:Bag><rdf:li>food</rdf:li><rdf:li>hash(0x8a0a39c)</rdf:li><rdf:li>hash</rdf:li><rdf:li>fruit</rdf:li></rdf:Bag></dc:subject>
      <dc:creator><cc:Agent><dc:title>Nicu Buculei</dc:title></cc:Agent></dc:creator>
    </cc:Work></rdf:RDF></metadata></svg>"""
    meta = captions.svg_metadata(head)
    assert meta.title == "pear"
    assert meta.description == "A pear & a leaf"
    assert meta.subjects == ("food", "fruit")
    assert meta.creators == ("Nicu Buculei",)
    assert captions.clean_title("Mirjam Meijer", ["Mirjam Meijer"]) == ""
    assert captions.clean_title("glace_03_bw") == "glace"


def test_compose_and_first_line():
    text = captions.compose("red apple", ["apple", "Red Apple"], ["food", "fruit", "apple"], "Emoji, Google style")
    assert text == "red apple (apple). food, fruit. Emoji, Google style"
    long_caption = captions.compose("x" * 10, [], [f"k{i}" * 20 for i in range(50)])
    assert len(long_caption) <= captions.MAX_CAPTION_CHARS and long_caption.endswith("\u2026")
    assert captions.first_line("\nA bunch of grapes.\nfr.utf8=Une grappe de raisin.\n") == "A bunch of grapes."
    assert make_id("openclipart", "food/fruit/apple bitten") == "openclipart-food-fruit-apple-bitten"
    long_a, long_b = make_id("x", "a" * 200 + "1"), make_id("x", "a" * 200 + "2")
    assert len(long_a) <= 128 and long_a != long_b


# ---- fake packages ------------------------------------------------------------------------------
def photo_png(path: Path, seed: int, size: int = 80) -> None:
    """A 'photo': textured noise in an opaque disc on a transparent background."""
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    alpha = (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < (size / 2.2) ** 2).astype(np.uint8) * 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)


def flat_png(path: Path, colour=(200, 30, 30), size: int = 64) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    image.paste(Image.new("RGBA", (size - 16, size - 16), (*colour, 255)), (8, 8))
    image.save(path)


SVG = (
    '<svg xmlns="http://www.w3.org/2000/svg" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
    'xmlns:cc="http://web.resource.org/cc/" xmlns:dc="http://purl.org/dc/elements/1.1/" width="{w}" height="{h}">'
    '<rect x="2" y="2" width="{rw}" height="{rh}" fill="#2a7"/>{meta}</svg>'
)


def svg_file(path: Path, w=40, h=40, meta="") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(SVG.format(w=w, h=h, rw=w - 4, rh=h - 4, meta=meta))


def stamp(root: Path, relative: str, caption: str | None, maker, *args, dat: str | None = None) -> None:
    path = root / relative
    maker(path, *args)
    if caption is not None:
        path.with_suffix(".txt").write_text(f"{caption}\nfr.utf8=traduction\n")
    if dat is not None:
        path.with_suffix(".dat").write_text(dat)


@pytest.fixture(scope="module")
def packages(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("packages")
    roots = {name: base / name for name in ("google", "twitter", "openmoji", "fluent3d", "openclipart", "tuxpaint")}
    emoji_json = [
        {"name": "RED APPLE", "unified": "1F34E", "image": "1f34e.png", "short_names": ["apple"], "category": "Food & Drink", "subcategory": "food-fruit", "sort_order": 2, "has_img_google": True, "has_img_twitter": True},
        {"name": "BIRD", "unified": "1F426", "image": "1f426.png", "short_names": ["bird"], "category": "Animals & Nature", "subcategory": "animal-bird", "sort_order": 1, "has_img_google": True, "has_img_twitter": False},
        {"name": "EMOJI MODIFIER FITZPATRICK TYPE-1-2", "unified": "1F3FB", "image": "1f3fb.png", "short_names": ["skin-tone-2"], "category": "Component", "subcategory": "skin-tone", "sort_order": 3, "has_img_google": True, "has_img_twitter": True},
    ]
    for style, seed in (("google", 1), ("twitter", 2)):
        (roots[style]).mkdir(parents=True)
        (roots[style] / "emoji.json").write_text(json.dumps(emoji_json))
        for entry in emoji_json:
            if entry[f"has_img_{style}"]:
                photo_png(roots[style] / "img" / style / "64" / entry["image"], seed, 64)
                seed += 10
    svg_file(roots["openmoji"] / "color" / "svg" / "1F34E.svg", 72, 72)
    (roots["openmoji"] / "data").mkdir(parents=True)
    (roots["openmoji"] / "data" / "openmoji.json").write_text(json.dumps([{"hexcode": "1F34E", "tags": "fruit, red", "openmoji_tags": "", "skintone": ""}]))
    (roots["fluent3d"] / "assets").mkdir(parents=True)
    photo_png(roots["fluent3d"] / "assets" / "1f426.webp", 5, 256)
    meta = """<metadata><rdf:RDF><cc:Work><dc:title>Apple Bitten</dc:title><dc:subject><rdf:Bag><rdf:li>fruit</rdf:li></rdf:Bag></dc:subject>
      <dc:creator><cc:Agent><dc:title>Dan Gerhards</dc:title></cc:Agent></dc:creator></cc:Work></rdf:RDF></metadata>"""
    clip = roots["openclipart"] / "usr/share/openclipart/svg"
    svg_file(clip / "food" / "fruit" / "apple_bitten_dan_gerhard_01.svg", 60, 30, meta)
    svg_file(clip / "computer" / "icons" / "save_icon.svg")  # excluded folder
    stamps_root = roots["tuxpaint"] / tuxpaint.STAMPS_SUBDIR
    stamp(stamps_root, "food/fruit/apple_red.png", "A red apple.", photo_png, 11)
    stamp(stamps_root, "food/fruit/apple_green.png", "A green apple.", photo_png, 12)
    stamp(stamps_root, "food/fruit/grapes.png", "A bunch of grapes.", photo_png, 13)
    stamp(stamps_root, "food/fruit/cherimoya.png", "A cherimoya fruit.", photo_png, 14)
    stamp(stamps_root, "food/fruit/apple_red_mirror.png", None, photo_png, 15)  # flipped copy: skipped
    stamp(stamps_root, "food/fruit/cartoon/apple.png", "A cartoon apple.", flat_png)
    stamp(stamps_root, "food/fruit/pear.svg", "A pear.", svg_file)
    stamp(stamps_root, "food/fruit/pear.png", "A pear.", flat_png)  # raster fallback of pear.svg: skipped
    stamp(stamps_root, "food/fruit/plastic_apple.png", "A plastic apple.", flat_png)  # flat colour
    stamp(stamps_root, "food/vegetables/carrot.png", "A carrot.", photo_png, 16)
    stamp(stamps_root, "food/vegetables/carrot2.png", "Another carrot.", photo_png, 17)
    stamp(stamps_root, "animals/birds/peacock.png", "A peacock.", photo_png, 18)
    stamp(stamps_root, "animals/birds/crane.png", "A crowned crane.", photo_png, 19)
    stamp(stamps_root, "animals/birds/geese.png", "Two geese.", photo_png, 20)
    stamp(stamps_root, "symbols/star.png", "A star.", photo_png, 21, dat="colorable\n")
    return roots


def fake_fetched(packages: dict[str, Path], wordnet_root: Path) -> dict[str, sources.Fetched]:
    out = {}
    for name, root in {**packages, "wordnet": wordnet_root}.items():
        out[name] = sources.Fetched(
            source=sources.BY_NAME[name], root=root, version="1.0-test", archive=f"{name}.tgz",
            archive_bytes=1000, archive_sha256=f"{len(name):064x}", unpacked_bytes=2000, seconds=0.0,
        )
    return out


@pytest.fixture
def fake_sources(monkeypatch, packages, tmp_path_factory):
    wordnet_root = tmp_path_factory.mktemp("wordnet-pkg")
    write_wordnet(wordnet_root / build_mod.WORDNET_SUBDIR)
    fetched = fake_fetched(packages, wordnet_root)

    def fetch_all(names, progress=None):
        return {n: fetched[n] for n in names if n in fetched}

    monkeypatch.setattr(sources, "fetch_all", fetch_all)
    return fetched


SOURCES_UNDER_TEST = ("google", "twitter", "openmoji", "fluent3d", "openclipart", "tuxpaint")


# ---- the photo rule -----------------------------------------------------------------------------
def test_photo_rule(packages):
    found = {s.path: (s.kind, s.reason) for s in tuxpaint.scan(packages["tuxpaint"])}
    assert found["food/fruit/apple_red.png"] == ("photo", "photo")
    assert "food/fruit/apple_red_mirror.png" not in found
    assert "food/fruit/pear.png" not in found
    assert found["food/fruit/pear.svg"] == ("drawing", "vector")
    assert found["food/fruit/cartoon/apple.png"] == ("drawing", "cartoon-folder")
    assert found["symbols/star.png"] == ("drawing", "recolourable")
    assert found["food/fruit/plastic_apple.png"] == ("drawing", "flat-colour")
    assert sum(1 for kind, _ in found.values() if kind == "photo") == 9


def test_rendering_is_white_rgb_bounded_and_deterministic(tmp_path):
    source = tmp_path / "big.png"
    photo_png(source, 3, 600)
    data = render.raster(source, 256)
    image = Image.open(io.BytesIO(data))
    assert image.mode == "RGB" and max(image.size) == 256
    assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent corner composited on white
    assert render.raster(source, 256) == data
    tall = tmp_path / "tall.svg"
    svg_file(tall, 20, 80)
    assert Image.open(io.BytesIO(render.svg(tall, 128))).size == (32, 128)
    blank = tmp_path / "blank.png"
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(blank)
    with pytest.raises(render.RenderError) as failure:
        render.raster(blank)
    assert failure.value.code == "blank"


SVGS = {
    "tall.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="30" height="91"><rect x="3" y="5" width="20" height="70" fill="#c33"/><circle cx="15" cy="80" r="9" fill="#3a3"/></svg>',
    "wide.svg": b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 400 130"><ellipse cx="200" cy="65" rx="190" ry="50" fill="#36c" stroke="#000" stroke-width="3"/></svg>',
    "square-percent.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="100%" height="100%" viewBox="0 0 64 64"><path d="M4 60 L32 4 L60 60 Z" fill="orange"/></svg>',
    "zero-size.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="0" height="10"><rect width="5" height="5"/></svg>',
    "not-xml.svg": b"<svg <<",
    "blank.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="40" height="90"></svg>',
    "tall-text.svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="30" height="90"><rect width="30" height="90" fill="#eee"/><text x="2" y="40" font-size="9">12:00</text></svg>',
}


def _svg_as_before(path: Path, max_side: int) -> bytes | str:
    """render.svg as it was: svg2png bounded by the width, then again by the height when that came out taller."""
    import cairosvg

    try:
        first = cairosvg.svg2png(bytestring=path.read_bytes(), output_width=max_side, unsafe=False)
        image = Image.open(io.BytesIO(first))
        if image.height > max_side:
            image = Image.open(io.BytesIO(cairosvg.svg2png(bytestring=path.read_bytes(), output_height=max_side, unsafe=False)))
        flat = render.flatten(image, max_side)
    except Exception:  # noqa: BLE001
        return "svg-error"
    return "blank" if render.is_blank(flat) else render.png_bytes(flat)


@pytest.mark.parametrize("name", sorted(SVGS))
def test_svg_is_drawn_once_with_the_bytes_and_failures_of_before(tmp_path, monkeypatch, name):
    path = tmp_path / name
    path.write_bytes(SVGS[name])
    for max_side in (64, 256):
        expected = _svg_as_before(path, max_side)
        try:
            got: bytes | str = render.svg(path, max_side)
        except render.RenderError as exc:
            got = exc.code
        assert got == expected
    if isinstance(expected, bytes) and b"<text" not in SVGS[name]:  # drawings with text keep the two passes
        import cairosvg

        # Drawn once, from the probed tree: svg2png (another parse and drawing) is never called.
        monkeypatch.setattr(cairosvg, "svg2png", lambda **_: pytest.fail("drawn through svg2png"))
        assert render.svg(path, 256) == expected


def test_internal_entities_are_inlined_and_nothing_else():
    svg = b'<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY ns_svg "http://www.w3.org/2000/svg"><!ENTITY bad SYSTEM "file:///etc/passwd">]><svg xmlns="&ns_svg;">&bad;</svg>'
    out = render.expand_internal_entities(svg)
    assert b"<!DOCTYPE" not in out and b'xmlns="http://www.w3.org/2000/svg"' in out
    assert b"&bad;" in out  # external entities are never resolved (the XML parser then refuses the file)


# ---- the build ----------------------------------------------------------------------------------
def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and p.name != build_mod.STATS_FILE}


def test_build_writes_a_valid_corpus_manifest_and_targets(fake_sources, tmp_path):
    out = tmp_path / "web"
    manifest = build_mod.build(build_mod.BuildOptions(out=out, sources=SOURCES_UNDER_TEST, workers=1))
    corpus = load_corpus(out)  # the search service's own validation
    by_id = {r.id: r for r in corpus.records}
    assert set(by_id) == {
        "google-1f34e", "google-1f426", "twitter-1f34e", "openmoji-1f34e", "fluent3d-1f426",
        "openclipart-food-fruit-apple_bitten_dan_gerhard_01",
        "tuxpaint-food-fruit-cartoon-apple", "tuxpaint-food-fruit-pear", "tuxpaint-food-fruit-plastic_apple", "tuxpaint-symbols-star",
    }  # no photo (they are the targets), no skin tone, no excluded clip art, no mirror or raster fallback
    apple = by_id["twitter-1f34e"]
    assert apple.synset == "n07739125" and apple.concept == "apple" and apple.license == "CC-BY-4.0"
    assert apple.caption == "red apple (apple). food, fruit. Emoji, Twitter style"
    assert by_id["openmoji-1f34e"].caption.startswith("red apple (apple). food, fruit, red. ")
    assert by_id["google-1f426"].synset == "n01503061"
    clip = by_id["openclipart-food-fruit-apple_bitten_dan_gerhard_01"]
    assert clip.caption == "Apple Bitten. fruit, food. Clip art" and clip.synset == "n07739125"  # author and number gone
    for record in corpus.records:
        image = Image.open(corpus.path_of(record))
        assert image.mode == "RGB" and max(image.size) <= 256
    counts = manifest["corpus"]["by_source"]
    assert counts["google"]["images"] == 2 and counts["twitter"]["images"] == 1 and counts["fluent3d"]["images"] == 1
    assert counts["openclipart"]["with_synset_pct"] == 100.0
    assert manifest["corpus"]["emoji_concepts"] == 2
    assert manifest["licenses"]["openmoji"] == "CC-BY-SA-4.0"
    assert manifest["sources"]["tuxpaint"]["archive_sha256"] == fake_sources["tuxpaint"].archive_sha256
    assert manifest["targets"]["photos"] == 9 and manifest["targets"]["photo_rule"]["photo"] == 9
    branches = json.loads((out / "targets" / build_mod.BRANCHES_FILE).read_text())
    assert set(branches) == {"animals", "animals/birds", "food", "food/fruit", "food/vegetables"}
    assert branches["food"]["photos"] == 6 and branches["food/fruit"]["label_by"] == "folder"
    # fruit (2 + 2) and vegetables (1 + 1) fall short of 3 photos in each split and merge into the
    # branch's own class: food, 3 + 3, a single class, so not measurable. Alone, food/fruit (2 + 2)
    # has no class at all: every photo trains.
    assert (branches["food"]["train"], branches["food"]["eval"], branches["food"]["labels"], branches["food"]["measurable"]) == (3, 3, 1, False)
    assert (branches["food/fruit"]["train"], branches["food/fruit"]["eval"], branches["food/fruit"]["train_labelled"]) == (4, 0, 0)
    assert set(json.loads((out / "targets" / "food" / targets.TRAIN_LABELS_FILE).read_text())["labels"].values()) == {"food"}
    assert json.loads((out / "targets" / "food" / "fruit" / targets.TRAIN_LABELS_FILE).read_text())["labels"] == {}
    # Relevant web images of food/fruit: the apple emoji (google, twitter, openmoji), the bitten apple
    # clip art, the cartoon and plastic apples of Tux Paint; not the bird, not the pear (no 'pear' in
    # the fake WordNet, so no synset).
    fruit = targets.Target.load(out / "targets" / "food" / "fruit")
    relevant_ids = {r.id for r in corpus.records if targets.relevant(r.synset, fruit)}
    assert relevant_ids == {
        "google-1f34e", "twitter-1f34e", "openmoji-1f34e", "openclipart-food-fruit-apple_bitten_dan_gerhard_01",
        "tuxpaint-food-fruit-cartoon-apple", "tuxpaint-food-fruit-plastic_apple",
    }
    assert by_id["tuxpaint-food-fruit-pear"].synset == ""
    assert branches["food/fruit"]["relevant_web_images"] == len(relevant_ids)
    stats = json.loads((out / build_mod.STATS_FILE).read_text())
    assert stats["download_bytes"] == 1000 * len(fake_sources) - 1000 * (len(fake_sources) - len(SOURCES_UNDER_TEST) - 1)


def test_build_is_reproducible_and_skips_when_up_to_date(fake_sources, tmp_path):
    options = dict(sources=SOURCES_UNDER_TEST, workers=1)
    build_mod.build(build_mod.BuildOptions(out=tmp_path / "a", **options))
    build_mod.build(build_mod.BuildOptions(out=tmp_path / "b", workers=2, sources=SOURCES_UNDER_TEST))
    first, second = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert first.keys() == second.keys() and first == second  # same bytes, whatever the worker count
    messages = []
    build_mod.build(build_mod.BuildOptions(out=tmp_path / "a", **options), progress=messages.append)
    assert any(m.startswith("up to date") for m in messages)
    # Another split seed changes the targets, not the pixels: every image is reused, none rendered.
    build_mod.build(build_mod.BuildOptions(out=tmp_path / "a", split_seed="other", **options))
    stats = json.loads((tmp_path / "a" / build_mod.STATS_FILE).read_text())
    assert stats["images_rendered"] == 0 and stats["images_reused"] == len(load_corpus(tmp_path / "a"))
    # A changed parameter is a changed input: rebuilt, and the images shrink.
    build_mod.build(build_mod.BuildOptions(out=tmp_path / "a", max_side=32, **options))
    assert max(Image.open(p).size[0] for p in (tmp_path / "a" / "images").rglob("*.png")) <= 32
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["inputs"]["parameters"]["max_side"] == 32


# ---- targets ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def catalog(packages, mapper) -> targets.Catalog:
    root = packages["tuxpaint"]
    return targets.Catalog.from_stamps(tuxpaint.scan(root), tuxpaint.stamps_root(root), mapper)


def test_branch_roots_by_folder_name_and_majority(catalog):
    assert [r.lemma for r in catalog.roots("food/fruit")] == ["fruit"]
    assert catalog.roots("food/fruit")[0].rule == "folder-name"
    assert [r.wnid for r in catalog.roots("animals/birds")] == ["n01503061"]
    # 'food' covers the vegetables by its name; fruit (a plant organ, with edible fruit under both)
    # stays a root of its own; nested roots (vegetable) are dropped.
    assert [r.lemma for r in catalog.roots("food")] == ["food", "fruit"]
    with pytest.raises(targets.UnknownBranch):
        catalog.roots("vehicles")
    with pytest.raises(ValueError):
        catalog.roots("../etc")


def test_majority_root_when_the_folder_name_is_no_noun(mapper, monkeypatch):
    def photo(name, synset):
        return targets.Photo(path=f"zoo/winged/{name}.png", caption="", synset=synset, concept=name, sha256=name * 8)

    photos = [photo("peafowl", "n01806143"), photo("crane", "n02012849"), photo("goose", "n01855672"), photo("goat", "n02415829")]
    catalog = targets.Catalog(photos, mapper)
    # The fake WordNet is shallow: bird sits 3 steps below entity, 'too general' for the real threshold.
    assert catalog.roots("zoo/winged") == []
    monkeypatch.setattr(targets, "MIN_ROOT_DEPTH", 3)
    (root,) = catalog.roots("zoo/winged")
    assert (root.lemma, root.rule, root.photos) == ("bird", "majority", 3)  # 3 of 4 photos are birds
    monkeypatch.setattr(targets, "MIN_ROOT_DEPTH", 2)
    # One bird and one goat: no majority below animal.
    assert [r.lemma for r in targets.Catalog([photos[0], photos[3]], mapper).roots("zoo/winged")] == ["animal"]


def test_relevance_follows_the_subtree(catalog):
    target = targets.Target("food/fruit", tuple(catalog.roots("food/fruit")), catalog.relevant_synsets(catalog.roots("food/fruit")))
    assert targets.relevant("n07739125", target)  # apple: edible fruit is under fruit (two hypernyms)
    assert targets.relevant("n13134947", target)  # the root itself
    assert not targets.relevant("n07730207", target)  # carrot
    assert not targets.relevant("n01503061", target)  # bird
    assert not targets.relevant("", target)  # unmapped images are never relevant
    assert targets.relevant("n07739125", {"relevant_synsets": sorted(target.relevant_synsets)})


def test_splits_are_deterministic_and_agree_across_branches(catalog, packages, tmp_path, monkeypatch):
    # The fake tree's folders are too small for 3 photos a class and split: 1 lets every folder be tested.
    monkeypatch.setattr(targets, "assign_labels", functools.partial(targets.assign_labels, min_photos=1))
    image = targets.photo_image(tuxpaint.stamps_root(packages["tuxpaint"]))
    food = targets.write_target(catalog, "food", tmp_path / "food", image, eval_fraction=0.5)
    fruit = targets.write_target(catalog, "food/fruit", tmp_path / "food" / "fruit", image, eval_fraction=0.5)
    again = targets.write_target(catalog, "food/fruit", tmp_path / "again", image, eval_fraction=0.5)
    assert [r["source"] for r in fruit["images"]] == [r["source"] for r in again["images"]]
    held_out = lambda summary: {r["source"] for r in summary["images"] if r["split"] == "eval"}  # noqa: E731
    assert held_out(fruit) == {s for s in held_out(food) if s.startswith("food/fruit/")}
    # Stratified by folder: half of food/fruit's 4 photos and half of food/vegetables' 2 held out.
    assert (fruit["train"], fruit["eval"]) == (2, 2) and (food["train"], food["eval"]) == (3, 3)
    assert food["label_by"] == "folder" and food["labels"] == {"fruit": 2, "vegetables": 1}
    one = targets.split(catalog.photos_under("food/fruit")[:1], 0.5, "s")
    assert len(one[0]) == 1 and not one[1]  # a lone photo stays in train
    # Nested targets coexist: writing food/fruit left food's own files alone.
    assert (tmp_path / "food" / "target.json").is_file() and (tmp_path / "food" / "fruit" / "target.json").is_file()
    for record in fruit["images"]:
        path = tmp_path / "food" / "fruit" / record["file"]
        assert path.is_file()
        if record["split"] == "train":
            assert record["file"].count("/") == 1  # train/<hash>.png: no label in the path
        else:
            assert record["file"].startswith(f"eval/{record['label']}/")
    # Another seed gives another split (with 4 photos, some seed must differ).
    other = [targets.split(catalog.photos_under("food/fruit"), 0.5, f"seed-{i}")[1] for i in range(8)]
    assert len({tuple(p.path for p in held) for held in other}) > 1
    with pytest.raises(ValueError):
        targets.split(catalog.photos, 1.0, "s")


def test_upload_sends_only_the_targets_own_files(catalog, packages, tmp_path):
    image = targets.photo_image(tuxpaint.stamps_root(packages["tuxpaint"]))
    targets.write_target(catalog, "food", tmp_path / "food", image)
    targets.write_target(catalog, "food/fruit", tmp_path / "food" / "fruit", image)

    class Store:
        def __init__(self):
            self.objects, self.buckets = {}, []

        def ensure_bucket(self, bucket):
            self.buckets.append(bucket)

        def put_bytes(self, bucket, key, data, content_type="application/octet-stream"):
            self.objects[(bucket, key)] = (data, content_type)

    store = Store()
    uri, count = upload_target(tmp_path / "food", "s3://iex/targets/food", store)
    keys = sorted(k for _, k in store.objects)
    assert uri == "s3://iex/targets/food" and count == len(keys) == 8  # 6 photos + target.json + train_labels.json
    own_files = ("targets/food/target.json", "targets/food/train_labels.json")
    assert all(k.startswith(("targets/food/train/", "targets/food/eval/")) or k in own_files for k in keys)
    assert not any(k.startswith("targets/food/fruit/") for k in keys)  # the nested target stays out
    assert all(store.objects[("iex", k)][1] == "application/json" for k in own_files)
    with pytest.raises(ValueError):
        upload_target(tmp_path / "nothing-here", "s3://iex/x", store)


# ---- labels: the paper's protocol (fitted on train, tested on eval) ------------------------------
def _photos(counts: dict[str, int]) -> list[targets.Photo]:
    """`counts` photos in each folder, named <folder>/p<i>.png, with distinct contents."""
    out = []
    for folder, n in counts.items():
        for i in range(n):
            path = f"{folder}/p{i}.png"
            out.append(targets.Photo(path=path, caption="", synset="", concept=f"{PurePosixPath(folder).name}{i % 2}", sha256=hashlib.sha256(path.encode()).hexdigest()))
    return out


def _half_held_out(photos: list[targets.Photo]) -> set[str]:
    """Every second photo of each folder (p1, p3, ...)."""
    return {p.path for p in photos if int(PurePosixPath(p.path).stem[1:]) % 2 == 1}


def test_assign_labels_merges_short_folders_upwards():
    photos = _photos({"zoo/birds": 6, "zoo/mammals/apes": 4, "zoo/mammals/cats": 2, "zoo/fish": 2})
    held_out = _half_held_out(photos)
    labels = targets.assign_labels(photos, held_out, "zoo", "folder")
    by_folder = {folder: {labels[p.path] for p in photos if p.folder == folder} for folder in {p.folder for p in photos}}
    # birds: 3 + 3, a class of its own. apes (2 + 2) and cats (1 + 1) are too small: both join
    # mammals (3 + 3). fish (1 + 1) joins the branch, which alone still falls short: unlabelled.
    assert by_folder == {"zoo/birds": {"birds"}, "zoo/mammals/apes": {"mammals"}, "zoo/mammals/cats": {"mammals"}, "zoo/fish": {""}}
    for label in ("birds", "mammals"):
        members = [path for path, value in labels.items() if value == label]
        assert sum(path in held_out for path in members) >= 3 and sum(path not in held_out for path in members) >= 3
    # A big enough remainder is labelled with the branch's own name ("other photos of the branch").
    more = _photos({"zoo/birds": 6, "zoo/fish": 2, "zoo/frogs": 4})
    labels = targets.assign_labels(more, _half_held_out(more), "zoo", "folder")
    assert {labels[p.path] for p in more if p.folder != "zoo/birds"} == {"zoo"}
    # Nothing reaches 3 + 3: nothing is labelled.
    assert set(targets.assign_labels(photos[:4], {photos[1].path}, "zoo", "folder").values()) == {""}


def test_assign_labels_concept_mode_drops_short_concepts():
    photos = _photos({"zoo/birds": 12, "zoo/fish": 4})  # concepts birds0/birds1 (6 each), fish0/fish1 (2 each)
    labels = targets.assign_labels(photos, _half_held_out(photos), "zoo", "concept")
    # p0, p2, ... (train) are concept birds0, p1, p3, ... (held out) birds1: neither has photos in both splits.
    assert set(labels.values()) == {""}
    held_out = {p.path for p in photos if int(PurePosixPath(p.path).stem[1:]) in (0, 1, 2, 3, 4, 5)}
    labels = targets.assign_labels(photos, held_out, "zoo", "concept")
    assert {labels[p.path] for p in photos if p.folder == "zoo/birds"} == {"birds0", "birds1"}
    assert {labels[p.path] for p in photos if p.folder == "zoo/fish"} == {""}


def _noise_png(photo: targets.Photo) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(int(photo.sha256[:8], 16))
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_unlabelled_photos_return_to_train_and_train_labels_never_name_an_eval_image(mapper, tmp_path):
    photos = _photos({"zoo/birds": 6, "zoo/mammals/apes": 4, "zoo/mammals/cats": 2, "zoo/fish": 2})
    summary = targets.write_target(targets.Catalog(photos, mapper), "zoo", tmp_path / "zoo", _noise_png)
    records = summary["images"]
    by_source = {r["source"]: r for r in records}
    # Half of each folder was held out; the fish photo no class can test went back to train.
    assert {r["split"] for s, r in by_source.items() if s.startswith("zoo/fish/")} == {"train"}
    assert all(r["label"] == "" for s, r in by_source.items() if s.startswith("zoo/fish/"))
    assert summary["labels"] == {"birds": 3, "mammals": 3} and summary["train_labels"] == {"birds": 3, "mammals": 3}
    assert (summary["train"], summary["eval"]) == (8, 6)
    doc = json.loads((tmp_path / "zoo" / targets.TRAIN_LABELS_FILE).read_text())
    assert (doc["format"], doc["branch"], doc["label_by"]) == (1, "zoo", "folder")
    eval_files = {r["file"] for r in records if r["split"] == "eval"}
    eval_bytes = {(tmp_path / "zoo" / f).read_bytes() for f in eval_files}
    assert eval_files and all(f.startswith("eval/") for f in eval_files)
    for file, label in doc["labels"].items():
        assert file.startswith("train/") and file not in eval_files
        assert (tmp_path / "zoo" / file).read_bytes() not in eval_bytes  # no eval image under another name
        assert label == by_source[next(r["source"] for r in records if r["file"] == file)]["label"]
    assert len(doc["labels"]) == 6  # labelled train photos only: the unlabelled fish are not listed
    from services.search import synthetic  # the generated targets use the same file

    assert synthetic.TRAIN_LABELS_FILE == targets.TRAIN_LABELS_FILE
    # The test split's labels are its folders, and every test class is in the train labels.
    assert {f.split("/")[1] for f in eval_files} == set(doc["labels"].values())


def test_cli_lists_branches_and_answers_relevance(fake_sources, tmp_path, capsys):
    from services.offlineweb.__main__ import main

    out = tmp_path / "web"
    assert main(["build", "--out", str(out), "--sources", ",".join(SOURCES_UNDER_TEST), "--workers", "1"]) == 0
    capsys.readouterr()
    assert main(["list-branches", "--data-dir", str(out), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["food/fruit"]["roots"] == ["n13134947 fruit"]
    assert main(["relevant", "food/fruit", "n07739125", "--data-dir", str(out)]) == 0
    assert main(["relevant", "food/fruit", "n01503061", "--data-dir", str(out)]) == 1
    capsys.readouterr()
    assert main(["target", "no/such/branch", "--data-dir", str(out)]) == 2
    assert "branch: no photos under" in capsys.readouterr().err
    assert main(["build", "--out", str(out), "--sources", "apple-emoji"]) == 2
