"""Descriptor sources: the paper's prompt and cut against a local OpenAI-compatible server, WordNet adjectives, fallbacks."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from services.planner import descriptors as d

# Trimmed lines of the real WordNet 3.0 files: apple (noun), temperature (noun with attribute links), adjectives.
DATA_NOUN = [
    "  1 This software and database is being provided",
    "07739125 13 n 01 apple 0 001 @ 07705931 n 0000 | fruit with red or yellow or green skin and sweet to tart crisp whitish flesh; \"an apple a day\"  ",
    "05011790 07 n 01 temperature 0 002 @ 05009170 n 0000 = 01247240 a 0000 | the degree of hotness or coldness of a body  ",
    "05009170 07 n 01 physical_property 0 000 | any property used to characterize matter  ",
]
DATA_ADJ = [
    "  1 This software and database is being provided",
    "01247240 00 a 02 hot 0 cold 0 000 | used of physical heat  ",
    "00381097 07 a 01 red 0 000 | of a color at the end of the color spectrum  ",
]
INDEX_ADJ = ["  1 licence", "red a 3 2 & + 3 3 00381097 00248560 00395626  ", "sweet a 10 4 ! & ^ + 10 7 02368337  ",
             "crisp a 2 1 & 2 1 00704316  ", "whitish a 1 1 & 1 0 00393105  ", "tart a 2 1 & 2 0 02369763  ",
             "green a 5 4 ! & \\ + 5 1 00375969  ", "hot a 21 1 & 21 10 01247240  ", "cold a 14 1 & 14 8 01251128  ",
             "day a 1 1 & 1 0 00000001  "]
INDEX_NOUN = ["  1 licence", "red n 4 4 @ ~ #p + 4 3 04962784  ", "green n 8 5 @ ~ #m #p + 8 2 04967191  ",
              "day n 10 5 @ ~ #p %p + 10 9 15155220  ", "apple n 2 3 @ ~ + 2 1 07739125  "]
INDEX_VERB = ["  1 licence", "green v 1 2 @ + 1 0 00521478  "]


@pytest.fixture(scope="module")
def adjectives(tmp_path_factory) -> d.WordNetAdjectives:
    root: Path = tmp_path_factory.mktemp("wordnet")
    for name, lines in (("data.noun", DATA_NOUN), ("data.adj", DATA_ADJ), ("index.adj", INDEX_ADJ), ("index.noun", INDEX_NOUN), ("index.verb", INDEX_VERB)):
        (root / name).write_text("\n".join(lines) + "\n")
    return d.WordNetAdjectives(root)


def test_wordnet_descriptors_come_from_the_definition_and_attributes(adjectives):
    source = d.WordNetDescriptors(adjectives)
    apple = d.ConceptRef("apple", 7739125)
    # "green" is used more as a noun than as an adjective in the sense-tagged corpus; "day" only appears in an example.
    assert source.candidates(apple) == ["red", "sweet", "tart", "crisp", "whitish"]
    # Attribute links of the synset: temperature -> hot, cold.
    assert source.candidates(d.ConceptRef("temperature", 5011790)) == ["hot", "cold"]
    picks = source.describe([apple] * 30, np.random.default_rng(0))
    assert {p.text for p in picks} <= {"red", "sweet", "tart", "crisp", "whitish"} and all(p.source == "wordnet" for p in picks)
    # A concept WordNet knows nothing about falls back to the curated list, and says so.
    fallback = source.describe([d.ConceptRef("widget")], np.random.default_rng(0))[0]
    assert fallback.source == "curated" and fallback.text in d.CURATED_ADJECTIVES


class CompletionServer:
    """A local OpenAI-compatible /v1/completions endpoint that records what it was asked."""

    def __init__(self, answer=None, status: int = 200) -> None:
        self.requests: list[dict] = []
        self.answer = answer or (lambda prompt: " tiny, fluffy and yellow")
        self.status = status
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), **body})
                if outer.status != 200:
                    self.send_response(outer.status)
                    self.end_headers()
                    return
                choices = [{"index": i, "text": outer.answer(p)} for i, p in enumerate(body["prompt"])]
                payload = json.dumps({"choices": list(reversed(choices))}).encode()  # order by index, not position
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_llm_descriptors_use_the_papers_prompt_and_cut():
    server = CompletionServer(answer=lambda prompt: " baby_duck." if "duck" in prompt else "\n")
    try:
        source = d.LLMDescriptors(server.url, "gpt-j-6b", api_key="secret", batch=2, fallback=d.CuratedDescriptors())
        out = source.describe([d.ConceptRef("duck"), d.ConceptRef("duck"), d.ConceptRef("rock")], np.random.default_rng(0))
    finally:
        server.close()
    assert [o.text for o in out[:2]] == ["baby", "baby"] and out[0].source == "llm"
    assert out[2].source == "curated"  # an empty completion falls back
    first = server.requests[0]
    assert first["path"] == "/v1/completions" and first["auth"] == "Bearer secret"
    assert first["model"] == "gpt-j-6b" and first["temperature"] == 0.9
    assert first["prompt"][0] == (
        "What are some words that describe the quality of 'duck'? The duck is frail. The duck is red. "
        "The duck is humongous. The duck is tall. The duck is"
    )
    assert len(server.requests) == 2  # batches of two prompts


def test_failing_llm_endpoint_falls_back_offline():
    server = CompletionServer(status=503)
    try:
        source = d.LLMDescriptors(server.url, "m", fallback=d.CuratedDescriptors(), timeout_s=2)
        out = source.describe([d.ConceptRef("duck")], np.random.default_rng(0))
    finally:
        server.close()
    assert out[0].source == "curated" and source.failures == 1


@pytest.mark.parametrize(
    "completion, cut",
    [(" frail", "frail"), (" very small, and round", "very small"), (" red_ish", "red"), ("\nbig", ""), (" one two three four", "one two three")],
)
def test_completion_cut(completion, cut):
    assert d.LLMDescriptors.clean(completion) == cut


def test_query_text_is_descriptor_then_concept():
    assert d.query_text("baby", "duck") == "baby duck"
    assert d.query_text("", "duck") == "duck"
