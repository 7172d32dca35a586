from services.common.wordnet import WordNet, parse_data_line

# Three real data.noun lines of WordNet 3.0 (fruit > edible fruit > apple), trimmed of some pointers.
LINES = [
    "13134947 20 n 01 fruit 0 001 @ 11675842 n 0000 | the ripened reproductive body of a seed plant  ",
    "07705931 13 n 01 edible_fruit 0 002 @ 07707451 n 0000 @ 13134947 n 0000 | edible reproductive body of a seed plant especially one having sweet flesh  ",
    '07739125 13 n 01 apple 0 001 @ 07705931 n 0000 | fruit with red or yellow or green skin and sweet to tart crisp whitish flesh; "an apple a day"  ',
    "11675842 20 n 02 reproductive_structure 0 sporophyll 0 000 | the parts of a plant involved in its reproduction  ",
]


def wordnet() -> WordNet:
    return WordNet(parse_data_line(line) for line in LINES)


def test_parse_lemmas_pointers_and_gloss():
    s = parse_data_line(LINES[1])
    assert s.lemmas == ("edible fruit",) and s.hypernyms == (7707451, 13134947)
    assert s.wnid == "n07705931"
    assert parse_data_line(LINES[2]).definition == "fruit with red or yellow or green skin and sweet to tart crisp whitish flesh"
    assert parse_data_line("  1 This software and database is being provided") is None


def test_concept_text_follows_the_paper():
    wn = wordnet()
    texts = {c.lemma: c.text for c in wn.concepts()}
    assert texts["apple"] == "apple (edible fruit): fruit with red or yellow or green skin and sweet to tart crisp whitish flesh."
    # Each lemma of a synset is its own concept.
    assert {"reproductive structure", "sporophyll"} <= set(texts)


def test_subtree_and_ancestors():
    wn = wordnet()
    assert wn.in_subtree(7739125, 13134947)
    assert not wn.in_subtree(13134947, 7739125)
    assert wn.subtree(13134947) == {13134947, 7705931, 7739125}
    assert wn.by_lemma["apple"] == [7739125]
