"""The downloader against the hostile web (services/search/hostile.py): each case ends with its status.

The same cases run through the real crawler service, over Kafka and gRPC, in
tests/integration/test_crawler_hostile.py; this one keeps the downloader honest in seconds.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request

import pytest

from services.crawler import status
from services.crawler.backends import ClipRetrievalBackend
from services.crawler.fetch import FetchPolicy, ImageDownloader
from services.search.hostile import CASES, HostileWeb, bomb_png


@pytest.fixture(scope="module")
def hostile():
    web = HostileWeb(hang_s=5.0)
    yield web
    web.close()


def crawl(urls, **changes):
    policy = FetchPolicy(**{"allow_networks": ("127.0.0.0/8",), "total_timeout_s": 1.0, "retry_backoff_s": 0.05, **changes})

    async def run():
        async with ImageDownloader(policy) as downloader:
            return await downloader.fetch_many(urls)

    return asyncio.run(run())


def test_every_case_ends_with_its_status_and_the_good_ones_survive(hostile):
    results = crawl([hostile.url(case) for case in CASES])
    got = {case.name: r.status for case, r in zip(CASES, results)}
    assert got == {case.name: case.expected for case in CASES}
    assert set(got.values()) - set(status.ALL) == set()  # only bounded reasons
    by_name = dict(zip((c.name for c in CASES), results))
    # Duplicates under several URLs are the same bytes, so the same staging key downstream.
    assert by_name["ok_jpeg"].sha256 == by_name["duplicate_a"].sha256 == by_name["duplicate_b"].sha256
    assert by_name["flaky_then_ok"].attempts >= 1 and by_name["server_error"].attempts == 3
    # Nothing refused was kept, and the 50 MB bodies were abandoned long before their end.
    assert all(r.data is None for r in results if not r.ok)
    assert by_name["huge_declared"].downloaded_bytes == 0
    assert by_name["huge_streamed"].downloaded_bytes < 9 * 2**20
    # robots.txt was asked once for the whole crawl, and the disallowed path never requested.
    assert hostile.requests.get("/robots.txt") == 1 and "/private/secret.jpg" not in hostile.requests


def test_default_mode_refuses_loopback_metadata_and_private_addresses(hostile):
    before = dict(hostile.requests)
    urls = [hostile.url("/img/ok.jpg"), "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/a.png"]
    results = crawl(urls, allow_networks=())
    assert [r.status for r in results] == [status.BLOCKED_ADDRESS] * 3
    assert hostile.requests == before  # not even robots.txt was asked


def test_knn_service_lists_every_case(hostile):
    hits = ClipRetrievalBackend("hostile", hostile.base_url, timeout_s=5).search("anything", 1000)
    assert [h.url for h in hits] == [hostile.url(case) for case in CASES]
    with urllib.request.urlopen(hostile.base_url + "/cases", timeout=5) as response:
        listed = json.load(response)
    assert {c["name"]: c["expected"] for c in listed} == {c.name: c.expected for c in CASES}


def test_the_bomb_is_tiny_but_announces_900_megapixels():
    data = bomb_png()
    assert len(data) < 4096
    from PIL import Image
    import io

    Image.MAX_IMAGE_PIXELS = None  # read the header only
    try:
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == (30_000, 30_000)
    finally:
        Image.MAX_IMAGE_PIXELS = 89_478_485
