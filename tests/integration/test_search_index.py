"""The stack's search service persists its index in S3, and a new replica reloads it instead of embedding."""

from __future__ import annotations

import json
import urllib.request

import pytest

from services.common.endpoints import LOOPBACK, SERVICE_PORTS
from services.common.objectstore import ObjectStore
from services.common.textembed import MINILM_DIMENSION, MINILM_NAME
from services.search.corpus import load_corpus
from services.search.index import build_caption_index
from services.search.index_store import DEFAULT_S3_PREFIX, S3IndexStore

pytestmark = [pytest.mark.integration]

INDEX = "offline-web"


@pytest.fixture(scope="module")
def store(stack_env) -> ObjectStore:
    return ObjectStore(stack_env["IEX_S3_ENDPOINT"], stack_env["IEX_S3_ACCESS_KEY"], stack_env["IEX_S3_SECRET_KEY"])


class RefusingEmbedder:
    """Stands for MiniLM (same name and size, so the same index version) but must never be asked."""

    name, dimension = MINILM_NAME, MINILM_DIMENSION

    def embed(self, texts):
        raise AssertionError(f"asked to embed {len(texts)} captions: the index was not reloaded from S3")


def test_the_running_service_persisted_its_index_in_s3(store, stack_env):
    keys = list(store.list_keys(stack_env.get("IEX_S3_BUCKET", "iex"), f"{DEFAULT_S3_PREFIX}/{INDEX}/"))
    versions = {key.split("/")[-2] for key in keys}
    assert versions, "no persisted index under search/indices/offline-web/"
    for version in versions:
        meta = json.loads(store.get_bytes(stack_env.get("IEX_S3_BUCKET", "iex"), f"{DEFAULT_S3_PREFIX}/{INDEX}/{version}/meta.json"))
        assert meta["digest"] == version and meta["dimension"] == MINILM_DIMENSION and "embeddings.npy" in meta["files"]


def test_a_new_replica_reloads_the_index_without_embedding_and_answers_alike(store, stack_env):
    corpus = load_corpus(stack_env["IEX_SEARCH_CORPUS_DIR"])
    index = build_caption_index(INDEX, corpus, RefusingEmbedder(), S3IndexStore(store, stack_env.get("IEX_S3_BUCKET", "iex")))
    assert len(index) == len(corpus)
    # The reloaded vectors rank captions as the running service does: its best hit for a caption is
    # an image carrying that caption, and so is the reloaded index's for that caption's own vector.
    caption = index.captions[0]
    body = json.dumps({"text": caption, "num_images": 1, "indice_name": INDEX}).encode()
    request = urllib.request.Request(
        f"http://{LOOPBACK}:{SERVICE_PORTS['search'].http}/knn-service", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - the local stack
        [hit] = json.load(response)
    assert hit["caption"] == caption
    [match] = index.search(index.vectors.vectors[0], 1)
    assert match.record.caption == caption
