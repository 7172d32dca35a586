"""The crawler's SSRF protection through redirects and DNS rebinding, on real sockets.

Two HTTP servers on loopback stand for the two sides: a "public" site on 127.0.0.2 (allow-listed,
as a public address would be) and an internal service on 127.0.0.1 (refused, as a pod IP or the
metadata endpoint would be). A scripted resolver plays the attacker's DNS: names that point inside,
names whose answer changes between lookups (rebinding), and answers mixing both. Whatever the
attacker does, the internal server must never receive a connection: every assertion counts the
connections it accepted, not only the status the crawler reports.
"""

from __future__ import annotations

import asyncio
import io
import socket
import threading
from collections import Counter

import pytest
from aiohttp import web
from aiohttp.abc import AbstractResolver
from PIL import Image

from services.crawler import status
from services.crawler.fetch import FetchPolicy, ImageDownloader
from services.crawler.images import ImagePolicy

PUBLIC_IP, INTERNAL_IP = "127.0.0.2", "127.0.0.1"


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = _png()


class _Counting:
    def __init__(self, factory, site) -> None:
        self._factory = factory
        self._site = site

    def __call__(self, *args, **kwargs):
        self._site.connections += 1
        return self._factory(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._factory, name)


class Site:
    """An aiohttp server bound to one loopback address, counting accepted connections and requests."""

    def __init__(self, host: str, port: int = 0, routes=None) -> None:
        self.host = host
        self.connections = 0
        self.requests: Counter[str] = Counter()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = asyncio.run_coroutine_threadsafe(self._start(port, routes or {}), self.loop).result(10)

    async def _start(self, port, routes) -> web.AppRunner:
        app = web.Application(middlewares=[self._count])
        for path, handler in routes.items():
            app.router.add_get(path, handler)
        app.router.add_get("/robots.txt", robots)
        runner = web.AppRunner(app)
        await runner.setup()
        # Count TCP connections, not only requests: the protocol factory runs once per accepted socket.
        runner._server = _Counting(runner._server, self)  # noqa: SLF001 - TCPSite reads runner.server
        site = web.TCPSite(runner, self.host, port)
        await site.start()
        return runner

    @web.middleware
    async def _count(self, request, handler):
        self.requests[request.path] += 1
        return await handler(request)

    @property
    def port(self) -> int:
        return self.runner.addresses[0][1]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def redirect_to(location_of):
    async def handler(request):
        raise web.HTTPFound(location_of(request))

    return handler


async def png(request):
    return web.Response(body=PNG, content_type="image/png")


async def robots(request):
    return web.Response(text="User-agent: *\nAllow: /\n")


class AttackerDNS(AbstractResolver):
    """Answers from a script: name -> list of answers, one per lookup (the last one repeats)."""

    def __init__(self, script: dict[str, list[list[str]]]) -> None:
        self.script = script
        self.lookups: Counter[str] = Counter()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):
        answers = self.script.get(host)
        if answers is None:
            raise OSError(f"NXDOMAIN {host}")
        self.lookups[host] += 1
        answer = answers[min(self.lookups[host], len(answers)) - 1]
        return [{"hostname": host, "host": ip, "port": port, "family": socket.AF_INET, "proto": 0, "flags": socket.AI_NUMERICHOST} for ip in answer]

    async def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def sites():
    internal = Site(INTERNAL_IP, routes={"/secret.png": png, "/ok.png": png})
    # The public site listens on the same port number as the internal one, on another address: a
    # connection to the wrong address lands on the internal server instead of failing.
    public = Site(
        PUBLIC_IP,
        port=internal.port,
        routes={
            "/ok.png": png,
            "/to-internal-name": redirect_to(lambda r: f"http://internal.example:{internal.port}/secret.png"),
            "/to-flipping-name": redirect_to(lambda r: f"http://flip.example:{internal.port}/secret.png"),
            "/to-internal-ip": redirect_to(lambda r: f"http://{INTERNAL_IP}:{internal.port}/secret.png"),
            "/to-decimal-ip": redirect_to(lambda r: f"http://2130706433:{internal.port}/secret.png"),
            "/to-mapped-ipv6": redirect_to(lambda r: f"http://[::ffff:127.0.0.1]:{internal.port}/secret.png"),
        },
    )
    yield public, internal
    public.close()
    internal.close()


def fetch(urls, dns: AttackerDNS):
    policy = FetchPolicy(
        allow_networks=(f"{PUBLIC_IP}/32",),  # the "public internet" of this test; 127.0.0.1 stays refused
        connect_timeout_s=2.0,
        total_timeout_s=3.0,
        retries=0,
        image=ImagePolicy(min_side=16, max_side=128),
    )

    async def run():
        async with ImageDownloader(policy, resolver=dns) as downloader:
            return await downloader.fetch_many(list(urls))

    return asyncio.run(run())


def test_the_setup_reaches_the_public_site_and_could_reach_the_internal_one(sites):
    public, internal = sites
    dns = AttackerDNS({"public.example": [[PUBLIC_IP]]})
    [ok] = fetch([f"http://public.example:{public.port}/ok.png"], dns)
    assert ok.status == status.OK and public.requests["/ok.png"] >= 1
    # Without the guard the internal server would answer, and the counter would see it: the
    # refusals below are the guard's doing, and a connection would not go unnoticed.
    before = internal.connections
    with socket.create_connection((INTERNAL_IP, internal.port), timeout=2):
        for _ in range(50):
            if internal.connections > before:
                break
            threading.Event().wait(0.05)
    assert internal.connections == before + 1


@pytest.mark.parametrize("path", ["/to-internal-name", "/to-internal-ip", "/to-decimal-ip", "/to-mapped-ipv6"])
def test_redirects_into_the_internal_network_are_refused_before_connecting(sites, path):
    public, internal = sites
    dns = AttackerDNS({"public.example": [[PUBLIC_IP]], "internal.example": [[INTERNAL_IP]]})
    before = internal.connections
    [result] = fetch([f"http://public.example:{public.port}{path}"], dns)
    assert result.status in (status.BLOCKED_ADDRESS, status.BAD_URL), (result.status, result.detail)
    assert result.redirects == 1 or result.status == status.BAD_URL
    assert internal.connections == before and internal.requests["/secret.png"] == 0


def test_dns_rebinding_between_check_and_connect_cannot_reach_inside(sites):
    """The name answers public first and internal on every later lookup: the address connected to is
    the address that was checked, and a later lookup is checked again."""
    public, internal = sites
    dns = AttackerDNS({"flip.example": [[PUBLIC_IP], [INTERNAL_IP]]})
    before = internal.connections
    url = f"http://flip.example:{public.port}/ok.png"
    first = fetch([url], dns)[0]
    assert first.status == status.OK  # connected to the public answer it checked
    second = fetch([url], dns)[0]  # a new session: the name is looked up again and now points inside
    assert second.status == status.BLOCKED_ADDRESS, second.detail
    assert dns.lookups["flip.example"] >= 2
    assert internal.connections == before and internal.requests["/ok.png"] == 0


def test_dns_rebinding_through_a_redirect(sites):
    public, internal = sites
    # Looked up once for the first hop (public), then the redirect target's lookup flips inside.
    dns = AttackerDNS({"public.example": [[PUBLIC_IP]], "flip.example": [[INTERNAL_IP]]})
    before = internal.connections
    [result] = fetch([f"http://public.example:{public.port}/to-flipping-name"], dns)
    assert result.status == status.BLOCKED_ADDRESS and result.redirects == 1, result.detail
    assert internal.connections == before


def test_mixed_answers_never_touch_the_refused_address(sites):
    public, internal = sites
    dns = AttackerDNS({"mixed.example": [[INTERNAL_IP, PUBLIC_IP]]})
    before = internal.connections
    results = fetch([f"http://mixed.example:{public.port}/ok.png"] * 3, dns)
    assert [r.status for r in results] == [status.OK] * 3
    assert internal.connections == before
