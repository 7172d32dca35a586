"""The downloader's manners against a real HTTP server on 127.0.0.1: retries on transient failures only,
robots.txt, X-Robots-Tag opt-outs, and the byte budget that bounds memory."""

from __future__ import annotations

import asyncio
import io
import random
import threading
from collections import Counter

import pytest
from aiohttp import web
from PIL import Image

from services.crawler import status
from services.crawler.budget import ByteBudget
from services.crawler.fetch import FetchPolicy, ImageDownloader, backoff_delay, retry_after_seconds
from services.crawler.images import ImagePolicy


def png(size=(64, 64)) -> bytes:
    image = Image.merge("RGB", [Image.effect_noise(size, 40 + 10 * i) for i in range(3)])
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png()


class PoliteWeb:
    """Scripted answers per path; counts every request, robots.txt included."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.robots_status = 200
        self.robots_body = "User-agent: *\nDisallow: /private/\n\nUser-agent: iex-crawler\nDisallow: /private/\nDisallow: /not-for-iex/\n"
        self.failures: dict[str, list[int]] = {}
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_get("/robots.txt", self._robots)
        app.router.add_get("/{tail:.*}", self._any)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner

    async def _robots(self, request):
        self.hits["/robots.txt"] += 1
        await asyncio.sleep(0.05)  # long enough for concurrent downloads to pile up behind one request
        return web.Response(status=self.robots_status, text=self.robots_body)

    async def _any(self, request):
        path = request.path
        self.hits[path] += 1
        script = self.failures.get(path)
        if script:
            code = script.pop(0)
            headers = {"Retry-After": request.query["retry_after"]} if "retry_after" in request.query else {}
            return web.Response(status=code, text="busy", headers=headers)
        if path == "/missing.png":
            raise web.HTTPNotFound()
        if path == "/redirect-to-private":
            raise web.HTTPFound("/private/x.png")
        headers = {}
        if "tag" in request.query:
            headers["X-Robots-Tag"] = request.query["tag"]
        return web.Response(body=PNG, content_type="image/png", headers=headers)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}{path}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def site():
    s = PoliteWeb()
    yield s
    s.close()


def policy(**changes) -> FetchPolicy:
    base = dict(
        allow_networks=("127.0.0.0/8",),
        connect_timeout_s=1.0,
        total_timeout_s=2.0,
        retry_backoff_s=0.01,
        retry_backoff_max_s=0.5,
        image=ImagePolicy(min_side=16, max_side=128),
    )
    base.update(changes)
    return FetchPolicy(**base)


def fetch_all(urls, fetch_policy=None):
    async def run():
        async with ImageDownloader(fetch_policy or policy()) as downloader:
            return await downloader.fetch_many(urls), downloader

    return asyncio.run(run())


# ---- retries -------------------------------------------------------------------------------------


def test_transient_statuses_are_retried_until_success(site):
    site.failures["/flaky.png"] = [503, 502]
    [result], downloader = fetch_all([site.url("/flaky.png")])
    assert result.status == status.OK and result.attempts == 3
    assert site.hits["/flaky.png"] == 3 and downloader.retries_total == 2


def test_retries_are_bounded(site):
    site.failures["/down.png"] = [500] * 10
    [result], _ = fetch_all([site.url("/down.png")], policy(retries=2))
    assert result.status == status.HTTP_ERROR and result.attempts == 3 and site.hits["/down.png"] == 3


def test_final_answers_are_never_asked_twice(site):
    site.failures["/gone.png"] = [410]
    site.failures["/forbidden.png"] = [403]
    results, downloader = fetch_all([site.url("/missing.png"), site.url("/gone.png"), site.url("/forbidden.png")])
    assert [r.status for r in results] == [status.HTTP_ERROR] * 3
    assert all(r.attempts == 1 for r in results) and downloader.retries_total == 0
    assert site.hits["/missing.png"] == site.hits["/gone.png"] == site.hits["/forbidden.png"] == 1


def test_a_long_retry_after_ends_the_retries(site):
    site.failures["/throttled.png"] = [429, 429]
    [result], _ = fetch_all([site.url("/throttled.png?retry_after=3600")])
    assert result.status == status.HTTP_ERROR and result.attempts == 1
    site.failures["/throttled.png"] = [429]
    [result], _ = fetch_all([site.url("/throttled.png?retry_after=0")])
    assert result.status == status.OK and result.attempts == 2


def test_connection_refused_is_retried_then_reported():
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    [result], downloader = fetch_all([f"http://127.0.0.1:{port}/x.png"], policy(retries=1))
    assert result.status == status.CONNECTION_ERROR and result.attempts == 2 and downloader.retries_total == 1


def test_backoff_doubles_with_jitter_and_honours_retry_after():
    p = policy(retry_backoff_s=1.0, retry_backoff_max_s=5.0)
    rand = random.Random(0)
    delays = [backoff_delay(p, n, None, rand) for n in (1, 2, 3, 4)]
    assert 0.5 <= delays[0] <= 1.5 and 1.0 <= delays[1] <= 3.0 and all(d <= 5.0 for d in delays)
    assert backoff_delay(p, 1, 4.0, rand) >= 4.0
    assert backoff_delay(p, 1, 60.0, rand) is None
    assert retry_after_seconds("7") == 7.0 and retry_after_seconds("soon") is None and retry_after_seconds(None) is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: now


# ---- robots.txt ----------------------------------------------------------------------------------


def test_robots_txt_is_honoured_and_fetched_once_per_origin(site):
    urls = [site.url(f"/ok/{i}.png") for i in range(6)] + [site.url("/private/a.png"), site.url("/not-for-iex/b.png")]
    results, downloader = fetch_all(urls)
    assert [r.status for r in results] == [status.OK] * 6 + [status.ROBOTS, status.ROBOTS]
    assert site.hits["/robots.txt"] == 1 and downloader.robots_fetches == 1
    # Disallowed paths are never requested.
    assert site.hits["/private/a.png"] == 0 and site.hits["/not-for-iex/b.png"] == 0


def test_robots_txt_of_a_redirect_target_applies_too(site):
    [result], _ = fetch_all([site.url("/redirect-to-private")])
    assert result.status == status.ROBOTS and result.redirects == 1
    assert site.hits["/redirect-to-private"] == 1 and site.hits["/private/x.png"] == 0


@pytest.mark.parametrize("code, expected", [(404, status.OK), (403, status.OK), (500, status.ROBOTS), (503, status.ROBOTS)])
def test_robots_txt_errors_follow_rfc_9309(site, code, expected):
    site.robots_status = code
    [result], _ = fetch_all([site.url("/ok.png")])
    assert result.status == expected


def test_robots_can_be_turned_off_for_own_servers(site):
    [result], downloader = fetch_all([site.url("/private/a.png")], policy(respect_robots=False))
    assert result.status == status.OK and site.hits["/robots.txt"] == 0 and downloader.robots_fetches == 0


# ---- X-Robots-Tag --------------------------------------------------------------------------------


def test_x_robots_tag_noai_refuses_the_image(site):
    results, _ = fetch_all(
        [site.url("/a.png?tag=noai"), site.url("/b.png?tag=noimageai,%20noindex"), site.url("/c.png?tag=otherbot:%20noai"), site.url("/d.png?tag=noindex")]
    )
    assert [r.status for r in results] == [status.NOAI, status.NOAI, status.OK, status.OK]
    assert results[0].data is None and results[0].downloaded_bytes == 0  # refused before the body is read


def test_noai_directives_are_configurable(site):
    results, _ = fetch_all([site.url("/a.png?tag=noai"), site.url("/d.png?tag=noindex")], policy(noai_directives=("noindex",)))
    assert [r.status for r in results] == [status.OK, status.NOAI]


# ---- byte budget ---------------------------------------------------------------------------------


def test_bytes_in_flight_stay_under_the_cap(site):
    cap = 3 * len(PNG)
    urls = [site.url(f"/ok/{i}.png") for i in range(24)]
    results, downloader = fetch_all(urls, policy(max_bytes=len(PNG) + 10, max_bytes_in_flight=cap, concurrency=16, per_host=16))
    assert all(r.ok for r in results)
    assert 0 < downloader.budget.peak <= cap and downloader.bytes_in_flight == 0


def test_budget_must_hold_one_whole_body():
    with pytest.raises(ValueError, match="max_bytes_in_flight"):
        FetchPolicy(max_bytes=10_000, max_bytes_in_flight=1_000)


def test_byte_budget_is_first_come_first_served_and_survives_cancellation():
    asyncio.run(asyncio.wait_for(_fifo(), 2))


def test_byte_budget_clamps_requests_larger_than_itself():
    async def clamp():
        budget = ByteBudget(100)
        assert await budget.acquire(10_000) == 100
        budget.release(100)
        assert budget.used == 0 and budget.peak == 100

    asyncio.run(asyncio.wait_for(clamp(), 2))


async def _fifo():
    budget = ByteBudget(100)
    order: list[str] = []
    assert await budget.acquire(70) == 70

    async def take(name, size):
        await budget.acquire(size)
        order.append(name)

    big = asyncio.ensure_future(take("big", 60))
    await asyncio.sleep(0)
    small = asyncio.ensure_future(take("small", 10))  # would fit now, but waits behind big
    doomed = asyncio.ensure_future(take("doomed", 50))
    await asyncio.sleep(0.01)
    assert order == [] and budget.waiting == 3
    doomed.cancel()
    await asyncio.gather(doomed, return_exceptions=True)
    budget.release(70)
    await asyncio.gather(big, small)
    assert order == ["big", "small"] and budget.used == 70 and budget.waiting == 0


def test_decoding_in_spawned_processes_gives_the_same_result(site):
    [threaded], _ = fetch_all([site.url("/ok/a.png")])
    [in_process], _ = fetch_all([site.url("/ok/a.png")], policy(decode_processes=True, decode_workers=1))
    assert in_process.status == status.OK and in_process.sha256 == threaded.sha256
