"""The downloader against a real HTTP server on 127.0.0.1: every refusal reason, redirects, and SSRF guards."""

from __future__ import annotations

import asyncio
import hashlib
import io
import ipaddress
import threading
from collections import Counter

import pytest
from aiohttp import web
from PIL import Image

from services.crawler import status
from services.crawler.addresses import AddressPolicy
from services.crawler.fetch import FetchPolicy, ImageDownloader, url_problem
from services.crawler.images import ImagePolicy, ImageRefused, process_image, sniff_format

LOOPBACK_ONLY = ("127.0.0.0/8",)


def encode(size, fmt="PNG", mode="RGB", **save_args) -> bytes:
    if mode == "1":
        image = Image.new("1", size, 1)  # blank pixels compress to almost nothing: a bomb's shape
    else:
        # Noise, so that JPEG data is not trivially tiny and truncation hits real scan data.
        image = Image.merge("RGB", [Image.effect_noise(size, 40 + 10 * i) for i in range(3)])
        if mode == "RGBA":
            image.putalpha(128)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


PNG_64 = encode((64, 64))
JPEG_300x200 = encode((300, 200), "JPEG", quality=90)
WEBP_ALPHA = encode((80, 60), "WEBP", mode="RGBA")
GIF_50 = encode((50, 50), "GIF")
TINY_PNG = encode((8, 8))
WIDE_PNG = encode((400, 20))
BOMB_PNG = encode((3000, 3000), "PNG", mode="1", optimize=True)


def static(body: bytes, content_type: str):
    async def handler(request):
        return web.Response(body=body, content_type=content_type)

    return handler


def redirect(location: str, kind=web.HTTPFound):
    async def handler(request):
        raise kind(location)

    return handler


class ImageServer:
    """An aiohttp server on its own thread and loop, counting the requests each path receives."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    async def _start(self) -> web.AppRunner:
        app = web.Application(middlewares=[self._count])
        app.router.add_get("/ok.png", static(PNG_64, "image/png"))
        app.router.add_get("/ok.jpg", static(JPEG_300x200, "image/jpeg"))
        app.router.add_get("/alpha.webp", static(WEBP_ALPHA, "image/webp"))
        app.router.add_get("/anim.gif", static(GIF_50, "image/gif"))
        app.router.add_get("/octet.png", static(PNG_64, "application/octet-stream"))
        app.router.add_get("/page.jpg", static(b"<html>not here</html>", "text/html"))
        app.router.add_get("/lying.jpg", static(b"<html>" + b"x" * 500, "image/jpeg"))
        app.router.add_get("/truncated.jpg", static(JPEG_300x200[: len(JPEG_300x200) // 2], "image/jpeg"))
        app.router.add_get("/tiny.png", static(TINY_PNG, "image/png"))
        app.router.add_get("/wide.png", static(WIDE_PNG, "image/png"))
        app.router.add_get("/bomb.png", static(BOMB_PNG, "image/png"))
        app.router.add_get("/declared-huge.png", self._declared_huge)
        app.router.add_get("/streamed-huge.png", self._streamed_huge)
        app.router.add_get("/slow.png", self._slow)
        app.router.add_get("/loop", redirect("/loop"))
        app.router.add_get("/hop/{n}", self._next_hop)
        app.router.add_get("/redirect-ok", redirect("/ok.png", web.HTTPMovedPermanently))
        app.router.add_get("/to-metadata", redirect("http://169.254.169.254/latest/meta-data/"))
        app.router.add_get("/to-private", redirect("http://10.0.0.1/x.png"))
        app.router.add_get("/to-ftp", redirect("ftp://example.org/x.png"))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner

    @web.middleware
    async def _count(self, request, handler):
        self.hits[request.path] += 1
        return await handler(request)

    async def _next_hop(self, request):
        raise web.HTTPFound(f"/hop/{int(request.match_info['n']) + 1}")

    async def _declared_huge(self, request):
        return web.Response(body=b"\x89PNG\r\n\x1a\n" + b"\0" * 300_000, content_type="image/png")

    async def _streamed_huge(self, request):
        # No Content-Length: only counting while reading can stop it.
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"\x89PNG\r\n\x1a\n")
        try:
            for _ in range(200):
                await response.write(b"\0" * 64 * 1024)
        except (ConnectionError, RuntimeError):
            pass  # the client hung up, as it should
        return response

    async def _slow(self, request):
        await asyncio.sleep(3)
        return web.Response(body=PNG_64, content_type="image/png")

    @property
    def port(self) -> int:
        return self.runner.addresses[0][1]

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(scope="module")
def server():
    s = ImageServer()
    yield s
    s.close()


def policy(**changes) -> FetchPolicy:
    base = dict(
        allow_networks=LOOPBACK_ONLY,
        connect_timeout_s=1.0,
        total_timeout_s=1.0,
        max_bytes=256 * 1024,
        image=ImagePolicy(max_pixels=1_000_000, min_side=16, max_aspect=4.0, max_side=128),
    )
    base.update(changes)
    return FetchPolicy(**base)


def fetch_all(urls, fetch_policy=None, deadline_s=None):
    async def run():
        async with ImageDownloader(fetch_policy or policy()) as downloader:
            return await downloader.fetch_many(urls, deadline_s)

    return asyncio.run(run())


@pytest.fixture
def tripwire(monkeypatch):
    """Records every address the event loop is asked to connect to."""
    attempts: list[str] = []
    probe = asyncio.new_event_loop()
    base = type(probe)  # the class asyncio.run will use; sock_connect is overridden below BaseEventLoop
    probe.close()
    original_sock_connect = base.sock_connect
    original_create_connection = base.create_connection

    async def sock_connect(self, sock, address):
        attempts.append(str(address[0]))
        return await original_sock_connect(self, sock, address)

    async def create_connection(self, protocol_factory, host=None, port=None, *args, **kwargs):
        if host is not None:
            attempts.append(str(host))
        return await original_create_connection(self, protocol_factory, host, port, *args, **kwargs)

    monkeypatch.setattr(base, "sock_connect", sock_connect)
    monkeypatch.setattr(base, "create_connection", create_connection)
    return attempts


# ---- accepted images -----------------------------------------------------------------------------


def test_png_small_enough_is_staged_byte_for_byte(server):
    [result] = fetch_all([server.url("/ok.png")])
    assert result.status == status.OK, result.detail
    assert result.data == PNG_64
    assert result.sha256 == hashlib.sha256(PNG_64).hexdigest()
    assert (result.width, result.height, result.content_type) == (64, 64, "image/png")
    assert result.downloaded_bytes == len(PNG_64) and result.http_status == 200


def test_jpeg_larger_than_max_side_is_resized_and_stays_jpeg(server):
    [result] = fetch_all([server.url("/ok.jpg")])
    assert result.status == status.OK, result.detail
    assert result.content_type == "image/jpeg" and sniff_format(result.data) == "JPEG"
    assert (result.width, result.height) == (128, 85)
    with Image.open(io.BytesIO(result.data)) as image:
        assert image.size == (128, 85)
    assert result.sha256 == hashlib.sha256(result.data).hexdigest()


def test_webp_with_alpha_becomes_png_and_gif_becomes_png(server):
    webp, gif, octet = fetch_all([server.url("/alpha.webp"), server.url("/anim.gif"), server.url("/octet.png")])
    assert webp.status == status.OK and webp.content_type == "image/png"
    with Image.open(io.BytesIO(webp.data)) as image:
        assert image.mode == "RGBA" and image.size == (80, 60)
    assert gif.status == status.OK and gif.content_type == "image/png"
    # A neutral content type is accepted when the bytes are an image.
    assert octet.status == status.OK


# ---- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, expected",
    [
        ("/missing.png", status.HTTP_ERROR),
        ("/page.jpg", status.NOT_IMAGE),
        ("/lying.jpg", status.NOT_IMAGE),
        ("/truncated.jpg", status.DECODE_ERROR),
        ("/tiny.png", status.TOO_SMALL),
        ("/wide.png", status.BAD_ASPECT),
        ("/bomb.png", status.TOO_LARGE),
        ("/declared-huge.png", status.TOO_LARGE),
        ("/streamed-huge.png", status.TOO_LARGE),
        ("/loop", status.REDIRECT_LOOP),
        ("/hop/0", status.REDIRECT_LOOP),
        ("/to-ftp", status.BAD_URL),
    ],
)
def test_refusal_reasons(server, path, expected):
    [result] = fetch_all([server.url(path)])
    assert result.status == expected, (result.status, result.detail)
    assert result.data is None


def test_oversize_stream_is_abandoned_early(server):
    [result] = fetch_all([server.url("/streamed-huge.png")])
    assert result.status == status.TOO_LARGE
    # Stopped just past the 256 KiB limit, not after the 12.5 MiB the server would send.
    assert 256 * 1024 < result.downloaded_bytes <= 256 * 1024 + 64 * 1024 + 8


def test_declared_oversize_body_is_not_read(server):
    [result] = fetch_all([server.url("/declared-huge.png")])
    assert result.status == status.TOO_LARGE and result.downloaded_bytes == 0


def test_timeout(server):
    [result] = fetch_all([server.url("/slow.png")], policy(total_timeout_s=0.3))
    assert result.status == status.TIMEOUT


def test_query_deadline_marks_unfinished_urls_as_timeout(server):
    fast, slow = fetch_all([server.url("/ok.png"), server.url("/slow.png")], policy(total_timeout_s=10), deadline_s=0.5)
    assert fast.status == status.OK
    assert slow.status == status.TIMEOUT


def test_hop_limit_counts_redirects(server):
    [result] = fetch_all([server.url("/hop/0")], policy(max_redirects=5))
    assert result.status == status.REDIRECT_LOOP and result.redirects == 5
    [followed] = fetch_all([server.url("/redirect-ok")])
    assert followed.status == status.OK and followed.redirects == 1 and followed.final_url.endswith("/ok.png")


def test_connection_refused(server):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        free_port = sock.getsockname()[1]
    [result] = fetch_all([f"http://127.0.0.1:{free_port}/x.png"])
    assert result.status == status.CONNECTION_ERROR


@pytest.mark.parametrize(
    "url",
    ["", "ftp://example.org/a.png", "file:///etc/passwd", "http:///nohost", "http://user:pw@example.org/a.png", "http://example.org/" + "a" * 2100],
)
def test_bad_urls_are_refused_without_traffic(url, tripwire):
    [result] = fetch_all([url])
    assert result.status == status.BAD_URL
    assert tripwire == []


# ---- SSRF ----------------------------------------------------------------------------------------


def test_default_policy_refuses_internal_addresses_before_connecting(server, tripwire):
    urls = [
        server.url("/ok.png"),  # a live server on loopback: it must not see the request
        "http://10.0.0.1/a.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/a.png",
        "http://[::ffff:127.0.0.1]/a.png",
        "http://0.0.0.0/a.png",
        "http://100.100.100.200/a.png",
    ]
    before = server.hits["/ok.png"]
    results = fetch_all(urls, policy(allow_networks=()))
    assert [r.status for r in results] == [status.BLOCKED_ADDRESS] * len(urls), [(r.url, r.status, r.detail) for r in results]
    assert tripwire == []
    assert server.hits["/ok.png"] == before
    assert all(r.elapsed_s < 0.5 for r in results)


def test_host_names_are_checked_at_resolution(server, tripwire):
    before = server.hits["/ok.png"]
    [blocked] = fetch_all([server.url("/ok.png", host="localhost")], policy(allow_networks=()))
    assert blocked.status == status.BLOCKED_ADDRESS, blocked.detail
    assert tripwire == [] and server.hits["/ok.png"] == before
    [allowed] = fetch_all([server.url("/ok.png", host="localhost")])
    assert allowed.status == status.OK
    assert tripwire == ["127.0.0.1"]  # the tripwire does see real connections


def test_redirects_to_blocked_addresses_are_refused(server, tripwire):
    metadata, private = fetch_all([server.url("/to-metadata"), server.url("/to-private")])
    assert metadata.status == status.BLOCKED_ADDRESS and metadata.redirects == 1
    assert private.status == status.BLOCKED_ADDRESS
    assert set(tripwire) <= {"127.0.0.1"}


def test_address_policy():
    default = AddressPolicy.from_cidrs([])
    for refused in ("127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1", "224.0.0.1", "0.0.0.0", "::1", "fe80::1", "fd00:ec2::254", "::ffff:10.0.0.1", "2002:0a00:0001::1"):
        assert not default.permits(refused), refused
    for allowed in ("93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"):
        assert default.permits(allowed), allowed
    local = AddressPolicy.from_cidrs(["127.0.0.0/8"])
    assert local.permits("127.0.0.1") and local.permits(ipaddress.ip_address("127.9.9.9"))
    assert not local.permits("10.0.0.1") and not local.permits("169.254.169.254")


def test_url_problems():
    assert url_problem("https://example.org/a.jpg") is None
    assert url_problem("") == "must not be empty"
    assert url_problem("gopher://x/") == "scheme must be http or https"
    assert "2048" in url_problem("http://e.org/" + "a" * 2048)


# ---- image checks without the network ------------------------------------------------------------


def test_process_image_refusals_and_reencode():
    small = ImagePolicy(min_side=16, max_side=128, max_pixels=1_000_000)
    with pytest.raises(ImageRefused) as refused:
        process_image(b"GIF89a" + b"\0" * 20, small)
    assert refused.value.reason == status.DECODE_ERROR
    with pytest.raises(ImageRefused) as refused:
        process_image(b"%PDF-1.4 not an image", small)
    assert refused.value.reason == status.NOT_IMAGE
    kept = process_image(PNG_64, small)
    assert kept.data == PNG_64 and not kept.reencoded
    resized = process_image(JPEG_300x200, small)
    assert resized.reencoded and (resized.source_width, resized.source_height) == (300, 200)


@pytest.mark.parametrize("host", ["127.1", "2130706433", "0x7f000001", "017700000001", "[fe80::1%25eth0]", "LOCALHOST"])
def test_disguised_internal_hosts_never_connect(host, tripwire):
    [result] = fetch_all([f"http://{host}/a.png"], policy(allow_networks=()))
    # Legacy numeric forms are either refused as URLs or resolved and refused as addresses.
    assert result.status in (status.BAD_URL, status.BLOCKED_ADDRESS), result.detail
    assert tripwire == []
