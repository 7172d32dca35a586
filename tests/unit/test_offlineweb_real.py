"""services.offlineweb against the real Debian packages, when they are in the cache.

Skipped, with the reason, when WordNet or the Tux Paint stamps have not been fetched (`make data`
fetches them); nothing here downloads. Checks what the fake packages cannot: the WordNet 3.0 offsets
the mapping rules name, the sense choices on real captions, and the photo rule on the real stamps.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from services.common import debpkg
from services.offlineweb import synsets, tuxpaint
from services.offlineweb.build import WORDNET_SUBDIR
from services.offlineweb.targets import Catalog

pytestmark = pytest.mark.slow


def _cached(package: str) -> Path:
    root = debpkg.cache_root() / package
    if not (root / ".complete").exists():
        pytest.skip(f"Debian package {package} is not in {debpkg.cache_root()} (run `make data` to fetch it)")
    return root


@pytest.fixture(scope="module")
def mapper() -> synsets.SynsetMapper:
    return synsets.SynsetMapper.load(_cached("wordnet-base") / WORDNET_SUBDIR)


def test_context_roots_are_the_wordnet_30_synsets_they_claim(mapper):
    lemmas = {
        synsets.ANIMAL: "animal",
        synsets.FOOD: "food",
        synsets.PLANT: "plant",
        synsets.PLANT_PART: "plant part",
        synsets.NATURAL_OBJECT: "natural object",
        synsets.ARTIFACT: "artifact",
        synsets.CONVEYANCE: "conveyance",
        synsets.CELESTIAL_BODY: "celestial body",
        synsets.CLOTHING: "clothing",
        synsets.PERSON: "person",
        synsets.BODY_PART: "body part",
        synsets.STRUCTURE: "structure",
        synsets.MUSICAL_INSTRUMENT: "musical instrument",
        synsets.CONTAINER: "container",
        synsets.DEVICE: "device",
        synsets.TOOL: "tool",
        synsets.SPORTS_EQUIPMENT: "sports equipment",
        synsets.GEOLOGICAL_FORMATION: "geological formation",
        synsets.COIN: "coin",
        synsets.MONETARY_UNIT: "monetary unit",
        synsets.ATMOSPHERIC_PHENOMENON: "atmospheric phenomenon",
        synsets.PHYSICAL_ENTITY: "physical entity",
        synsets.ENTITY: "entity",
    }
    for offset, lemma in lemmas.items():
        assert mapper.taxonomy.wordnet.synsets[offset].lemmas[0] == lemma


@pytest.mark.parametrize(
    "texts, context, wnid",
    [
        (["RED APPLE", "apple"], ["fruit", "food", "Food & Drink"], "n07739125"),
        (["A bunch of grapes."], ["fruit", "food"], "n07758680"),
        (["A peacock (a male peafowl)."], ["birds", "animals"], "n01806143"),  # sense 1 is a butterfly
        (["A dolphin."], ["aquatic", "mammals", "animals"], "n02068974"),  # sense 1 is the dolphinfish
        (["hand with index and middle fingers crossed"], ["partial", "fingers", "hand", "People & Body"], "n05564590"),
        (["A crowned crane."], ["birds", "animals"], "n02012849"),
        (["Apple Bitten", "apple bitten"], ["fruit", "food"], "n07739125"),
        (["sun behind small cloud"], ["weather", "sky", "Travel & Places"], "n09450163"),  # the Sun, a named star
        (["ball of yarn", "yarn"], ["crafts", "arts", "Activities"], "n04426788"),
        (["Cigno di notte nella palude"], ["animals"], None),  # Italian: no 'pa' (father) or 'di'
        (["A crane."], [], "n03126707"),  # not Hart Crane, not the constellation
    ],
)
def test_real_captions_map_to_the_expected_synsets(mapper, texts, context, wnid):
    match = mapper.map_texts(texts, mapper.context_roots(context))
    assert (match.wnid if match else None) == wnid


def test_real_stamps_photo_rule_and_branches(mapper):
    root = _cached("tuxpaint-stamps-default")
    stamps = list(tuxpaint.scan(root))
    kinds = {s.path: s.kind for s in stamps}
    assert kinds["food/fruit/apple_granny_smith.png"] == "photo"
    assert kinds["town/roadsigns/stop.png"] == "drawing"
    cartoons = [kind for path, kind in kinds.items() if "/cartoon/" in path]
    assert len(cartoons) > 50 and set(cartoons) == {"drawing"}
    assert not any(p.endswith("_mirror.png") for p in kinds)
    photos = [s for s in stamps if s.kind == "photo"]
    assert 300 <= len(photos) <= 450
    catalog = Catalog.from_stamps(stamps, tuxpaint.stamps_root(root), mapper)
    branches = catalog.branches()
    assert branches["food/fruit"] >= 20 and branches["animals/birds"] >= 30
    assert [r.wnid for r in catalog.roots("food/fruit")] == ["n13134947"]  # fruit
    assert [r.wnid for r in catalog.roots("animals/birds")] == ["n01503061"]  # bird
    assert sum(1 for p in catalog.photos if p.synset) / len(catalog.photos) > 0.95
