"""Concurrent, defensive image downloads over aiohttp.

`ImageDownloader` is a plain asyncio class (no service or metrics dependencies) so that benchmarks
and tools can use it directly; `BackgroundDownloader` runs one on a persistent event-loop thread for
synchronous callers such as the Kafka handler and gRPC methods.

Safety, in the order it applies to a URL:
- syntax: http/https, a host, no credentials, at most 2048 characters;
- addresses: IP literals are checked before anything is sent, host names are checked inside the
  connector's resolver, so the address that was checked is the address connected to (no DNS
  rebinding between check and connect); redirects are followed by hand and every hop is re-checked;
- consent: robots.txt of every hop's origin (fetched once per origin through the same checks, then
  cached) and `X-Robots-Tag: noai / noimageai` on the answer;
- bytes: content type and Content-Length are checked before the body is read, the body's size is
  reserved in a byte budget shared by all downloads, read in chunks and abandoned past the byte
  limit, magic bytes are checked on the first chunk;
- pixels: header dimensions are checked before decoding (decompression bombs), then size and aspect
  policy, then a full decode (truncated files) and a downscale to the staging size.

Limits: a semaphore caps images in flight (download and decode), a per-host semaphore caps what one
site sees, the byte budget caps memory. Only transient failures are retried (connection resets,
408/429/5xx gateways), with exponential backoff and jitter, honouring Retry-After; nothing a retry
cannot change (404, not an image, too large, blocked) is asked twice.
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import logging
import multiprocessing
import random
import socket
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import AsyncIterator, Iterable, Sequence

import aiohttp
from aiohttp.abc import AbstractResolver
from aiohttp.resolver import ThreadedResolver
from yarl import URL

from services.crawler import status
from services.crawler.addresses import AddressPolicy, literal_address
from services.crawler.budget import ByteBudget
from services.crawler.images import (
    MAGIC_BYTES_NEEDED,
    ImagePolicy,
    ImageRefused,
    ProcessedImage,
    content_type_acceptable,
    media_type,
    process_image,
    sniff_format,
)
from services.crawler.robots import (
    DEFAULT_NOAI_DIRECTIVES,
    MAX_ROBOTS_BYTES,
    RobotsCache,
    RobotsRules,
    origin_of,
    parse_robots,
    product_token,
    robots_url,
    x_robots_opt_out,
)

log = logging.getLogger(__name__)

MAX_URL_LENGTH = 2048
DEFAULT_USER_AGENT = "iex-crawler/0.1 (Internet Explorer research crawler)"
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Answers that say "try again later"; every other status is final.
RETRYABLE_HTTP_STATUSES = frozenset({408, 429, 500, 502, 503, 504})
_CHUNK_BYTES = 64 * 1024
# RFC 9309: follow at least five redirects of robots.txt.
_ROBOTS_MAX_REDIRECTS = 5
# How long a robots.txt answered with 5xx (complete disallow) is remembered before asking again.
_ROBOTS_FAILURE_TTL_S = 60.0


def url_problem(url: str, max_length: int = MAX_URL_LENGTH) -> str | None:
    """What is wrong with a URL as a crawl target, or None. The text completes '<field>: ...'."""
    if not url or not url.strip():
        return "must not be empty"
    if len(url) > max_length:
        return f"longer than {max_length} characters"
    try:
        parsed = URL(url)
    except (ValueError, TypeError) as exc:
        return f"cannot be parsed ({str(exc)[:80]})"
    if parsed.scheme not in ("http", "https"):
        return "scheme must be http or https"
    try:
        host = parsed.host
        parsed.port  # noqa: B018 - raises on an out-of-range port
    except ValueError:
        return "has an invalid port"
    if not host:
        return "has no host"
    if parsed.user is not None or parsed.password is not None:
        return "must not carry credentials"
    return None


@dataclass(frozen=True)
class FetchPolicy:
    concurrency: int = 64
    per_host: int = 8
    connect_timeout_s: float = 5.0
    # Budget of the network part of one attempt (robots.txt, every redirect hop and the whole body).
    total_timeout_s: float = 15.0
    max_bytes: int = 8 * 1024 * 1024
    # Response bytes held at once by all downloads together (bodies being read or decoded).
    max_bytes_in_flight: int = 256 * 1024 * 1024
    max_redirects: int = 5
    # Further attempts after a transient failure, and the backoff before the first of them (doubled
    # each time, with jitter, capped at retry_backoff_max_s; a longer Retry-After ends the retries).
    retries: int = 2
    retry_backoff_s: float = 0.5
    retry_backoff_max_s: float = 8.0
    allow_networks: tuple[str, ...] = ()
    user_agent: str = DEFAULT_USER_AGENT
    respect_robots: bool = True
    robots_ttl_s: float = 3600.0
    # X-Robots-Tag directives that refuse the image (status noai); empty ignores the header.
    noai_directives: tuple[str, ...] = DEFAULT_NOAI_DIRECTIVES
    decode_workers: int = 2
    # Decode in worker processes instead of threads: for hosts where decoding saturates one
    # interpreter (Pillow releases the GIL while decoding and resizing, so threads are the default).
    decode_processes: bool = False
    image: ImagePolicy = field(default_factory=ImagePolicy)

    def __post_init__(self) -> None:
        if self.max_bytes_in_flight < self.max_bytes:
            raise ValueError(f"max_bytes_in_flight ({self.max_bytes_in_flight}) must be at least max_bytes ({self.max_bytes})")


@dataclass(frozen=True)
class FetchResult:
    url: str
    status: str
    detail: str = ""
    final_url: str = ""
    http_status: int = 0
    redirects: int = 0
    # Of the staged bytes (after any re-encode): what ImageFetched describes.
    content_type: str = ""
    data: bytes | None = field(default=None, repr=False)
    sha256: str = ""
    width: int = 0
    height: int = 0
    # Bytes read from the network, whatever the outcome (all attempts).
    downloaded_bytes: int = 0
    elapsed_s: float = 0.0
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.status == status.OK

    @property
    def size_bytes(self) -> int:
        return len(self.data) if self.data is not None else 0


class FetchRefused(Exception):
    def __init__(self, reason: str, detail: str = "", retryable: bool = False, retry_after_s: float | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class AddressBlocked(OSError):
    """Raised by the resolver when a host resolves only to refused addresses (an OSError so aiohttp wraps it)."""


class GuardedResolver(AbstractResolver):
    """Resolves through `inner` and keeps only addresses the policy permits.

    Because aiohttp connects to exactly what the resolver returns, the check cannot be bypassed by a
    name that resolves differently a moment later. Mixed answers (a public and a private address)
    keep only the permitted ones: the refused address is never contacted.
    """

    def __init__(self, policy: AddressPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self._inner = inner

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET):  # type: ignore[override]
        if self._inner is None:
            self._inner = ThreadedResolver()
        answers = await self._inner.resolve(host, port, family)
        permitted = [answer for answer in answers if self.policy.permits(answer["host"])]
        if not permitted:
            raise AddressBlocked(f"{host} resolves only to refused addresses")
        return permitted

    async def close(self) -> None:
        if self._inner is not None:
            await self._inner.close()


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds (delta-seconds or an HTTP date), None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def backoff_delay(policy: FetchPolicy, retry_number: int, retry_after_s: float | None, rand: random.Random | None = None) -> float | None:
    """Seconds to wait before retry `retry_number` (1-based), or None when waiting is not worth it."""
    base = min(policy.retry_backoff_max_s, policy.retry_backoff_s * (2 ** (retry_number - 1)))
    # Full jitter around the base spreads retries of many URLs that failed together.
    delay = base * (0.5 + (rand or random).random())
    if retry_after_s is not None:
        if retry_after_s > policy.retry_backoff_max_s:
            return None  # the server asks for longer than we are willing to hold the query
        delay = max(delay, retry_after_s)
    return min(delay, policy.retry_backoff_max_s)


@dataclass
class _Progress:
    downloaded_bytes: int = 0
    http_status: int = 0
    redirects: int = 0
    final_url: str = ""
    # Bytes held in the byte budget for this attempt's body; released after decoding.
    reserved: int = 0


class ImageDownloader:
    """Downloads and validates images with bounded concurrency; use inside one event loop.

        async with ImageDownloader(FetchPolicy(...)) as downloader:
            results = await downloader.fetch_many(urls)
    """

    def __init__(self, policy: FetchPolicy, resolver: AbstractResolver | None = None) -> None:
        self.policy = policy
        self.addresses = AddressPolicy.from_cidrs(policy.allow_networks)
        self.agent_token = product_token(policy.user_agent)
        self._resolver = GuardedResolver(self.addresses, resolver)
        self._session: aiohttp.ClientSession | None = None
        self._decode_pool: Executor | None = None
        self._slots: asyncio.Semaphore | None = None
        self._host_slots: dict[str, tuple[asyncio.Semaphore, int]] = {}
        self.budget = ByteBudget(policy.max_bytes_in_flight)
        self.robots = RobotsCache(ttl_s=policy.robots_ttl_s)
        # One robots.txt request per origin at a time; everyone else waits for its answer.
        self._robots_pending: dict[str, asyncio.Task] = {}
        self._random = random.Random()
        self.in_flight = 0
        # Running totals for metrics (read from other threads; ints are updated atomically enough).
        self.retries_total = 0
        self.robots_fetches = 0

    async def start(self) -> None:
        policy = self.policy
        connector = aiohttp.TCPConnector(
            limit=policy.concurrency,
            limit_per_host=policy.per_host,
            resolver=self._resolver,
            ttl_dns_cache=30,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=policy.connect_timeout_s, sock_read=policy.total_timeout_s),
            headers={"User-Agent": policy.user_agent, "Accept": "image/*"},
            # No cookies carried from one site to another, and no proxy from the environment: a proxy
            # would connect on our behalf and bypass the address checks.
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
        )
        if policy.decode_processes:
            # Spawned, never forked: the service's gRPC and Kafka threads must not be copied mid-lock.
            self._decode_pool = ProcessPoolExecutor(max_workers=policy.decode_workers, mp_context=multiprocessing.get_context("spawn"))
        else:
            self._decode_pool = ThreadPoolExecutor(max_workers=policy.decode_workers, thread_name_prefix="crawler-decode")
        self._slots = asyncio.Semaphore(policy.concurrency)

    async def close(self) -> None:
        for task in list(self._robots_pending.values()):
            task.cancel()
        self._robots_pending.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=False, cancel_futures=True)
            self._decode_pool = None

    async def __aenter__(self) -> "ImageDownloader":
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.close()

    @property
    def bytes_in_flight(self) -> int:
        return self.budget.used

    # ---- public -----------------------------------------------------------------------------------
    async def fetch_many(self, urls: Sequence[str], deadline_s: float | None = None) -> list[FetchResult]:
        """Fetches every URL concurrently; results in input order. URLs unfinished at the deadline time out."""
        if not urls:
            return []
        tasks = [asyncio.ensure_future(self.fetch(url)) for url in urls]
        _done, pending = await asyncio.wait(tasks, timeout=deadline_s)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        results = []
        for url, task in zip(urls, tasks):
            if task.cancelled() or not task.done():
                results.append(FetchResult(url, status.TIMEOUT, "query deadline", elapsed_s=deadline_s or 0.0))
            else:
                results.append(task.result())
        return results

    async def fetch_stream(self, urls: Iterable[str], window: int | None = None) -> AsyncIterator[FetchResult]:
        """Results in completion order, with at most `window` URLs started and not yet yielded.

        For long URL lists (bulk downloads, benchmarks): memory stays bounded by the window, whatever
        the list's length, because results are handed over as they finish.
        """
        window = window or 2 * self.policy.concurrency
        source = iter(urls)
        pending: set[asyncio.Task] = set()
        exhausted = False
        try:
            while True:
                while not exhausted and len(pending) < window:
                    url = next(source, None)
                    if url is None:
                        exhausted = True
                        break
                    pending.add(asyncio.ensure_future(self.fetch(url)))
                if not pending:
                    return
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    yield task.result()
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)

    async def fetch(self, url: str) -> FetchResult:
        """One URL through every check, retried on transient failures; never raises for anything a remote server can cause."""
        assert self._slots is not None, "ImageDownloader.start() was not awaited"
        started = time.perf_counter()
        progress = _Progress(final_url=url)
        attempt = 1
        downloaded = 0

        def refused(reason: str, detail: str = "") -> FetchResult:
            return FetchResult(
                url,
                reason,
                detail,
                final_url=progress.final_url,
                http_status=progress.http_status,
                redirects=progress.redirects,
                downloaded_bytes=downloaded + progress.downloaded_bytes,
                elapsed_s=time.perf_counter() - started,
                attempts=attempt,
            )

        problem = url_problem(url)
        if problem is not None:
            return refused(status.BAD_URL, problem)
        host = (URL(url).host or "").lower()
        max_attempts = 1 + max(0, self.policy.retries)
        while True:
            try:
                processed, digest = await self._attempt(url, host, progress)
                break
            except FetchRefused as exc:
                delay = backoff_delay(self.policy, attempt, exc.retry_after_s, self._random) if exc.retryable and attempt < max_attempts else None
                if delay is None:
                    return refused(exc.reason, exc.detail)
            except ImageRefused as exc:
                return refused(exc.reason, exc.detail)
            except asyncio.TimeoutError:
                # The attempt's whole budget is spent: another attempt would most likely hang the same way.
                return refused(status.TIMEOUT, f"over {self.policy.total_timeout_s:g}s")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - one odd URL must not fail its whole query
                log.exception("unexpected fetch failure", extra={"url": url[:300]})
                return refused(status.CONNECTION_ERROR, f"{type(exc).__name__}: {str(exc)[:120]}")
            self.retries_total += 1
            await asyncio.sleep(delay)
            attempt += 1
            downloaded += progress.downloaded_bytes
            progress = _Progress(final_url=url)
        return FetchResult(
            url,
            status.OK,
            final_url=progress.final_url,
            http_status=progress.http_status,
            redirects=progress.redirects,
            content_type=processed.content_type,
            data=processed.data,
            sha256=digest,
            width=processed.width,
            height=processed.height,
            downloaded_bytes=downloaded + progress.downloaded_bytes,
            elapsed_s=time.perf_counter() - started,
            attempts=attempt,
        )

    # ---- internals --------------------------------------------------------------------------------
    async def _attempt(self, url: str, host: str, progress: _Progress) -> tuple[ProcessedImage, str]:
        """One try: network under the slots and the attempt timeout, then decode; the byte reservation spans both."""
        assert self._slots is not None
        async with self._slots, _HostSlot(self, host):
            self.in_flight += 1
            try:
                body = await asyncio.wait_for(self._download(url, progress), self.policy.total_timeout_s)
                return await asyncio.get_running_loop().run_in_executor(self._decode_pool, _process, body, self.policy.image)
            finally:
                self.in_flight -= 1
                if progress.reserved:
                    self.budget.release(progress.reserved)
                    progress.reserved = 0

    def _check_literal(self, url: URL) -> None:
        address = literal_address(url.raw_host or "")
        if address is not None and not self.addresses.permits(address):
            raise FetchRefused(status.BLOCKED_ADDRESS, str(address))

    async def _download(self, url: str, progress: _Progress) -> bytes:
        assert self._session is not None
        current = URL(url)
        seen = {str(current)}
        for hop in range(self.policy.max_redirects + 1):
            progress.redirects = hop
            progress.final_url = str(current)
            # IP literals never reach the resolver, so they are checked here, before any packet is sent.
            self._check_literal(current)
            if self.policy.respect_robots:
                await self._check_robots(current)
            try:
                async with self._session.get(current, allow_redirects=False) as response:
                    progress.http_status = response.status
                    if response.status in _REDIRECT_STATUSES:
                        current = self._next_hop(current, response, seen)
                        continue
                    if response.status != 200:
                        raise FetchRefused(
                            status.HTTP_ERROR,
                            f"HTTP {response.status}",
                            retryable=response.status in RETRYABLE_HTTP_STATUSES,
                            retry_after_s=retry_after_seconds(response.headers.get("Retry-After")),
                        )
                    opted_out = x_robots_opt_out(response.headers.getall("X-Robots-Tag", ()), self.agent_token, self.policy.noai_directives)
                    if opted_out is not None:
                        raise FetchRefused(status.NOAI, f"X-Robots-Tag {opted_out}")
                    header_type = response.headers.get("Content-Type", "")
                    if not content_type_acceptable(header_type):
                        raise FetchRefused(status.NOT_IMAGE, f"content type {media_type(header_type)[:60]}")
                    length = response.content_length
                    if length is not None and length > self.policy.max_bytes:
                        raise FetchRefused(status.TOO_LARGE, f"Content-Length {length}")
                    # A server that does not say how much it sends is charged the whole limit.
                    progress.reserved = await self.budget.acquire(self.policy.max_bytes if length is None else length)
                    return await self._read_bounded(response, progress)
            except aiohttp.ClientConnectorError as exc:
                raise self._connector_refusal(exc, current) from None
            except aiohttp.InvalidURL as exc:
                raise FetchRefused(status.BAD_URL, str(exc)[:120]) from None
            except aiohttp.ClientResponseError as exc:
                raise FetchRefused(status.HTTP_ERROR, f"{type(exc).__name__}: {str(exc)[:120]}") from None
            except asyncio.TimeoutError:
                raise
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as exc:
                # The connection broke mid-way (reset, closed early, truncated transfer): worth another try.
                raise FetchRefused(status.CONNECTION_ERROR, f"{type(exc).__name__}: {str(exc)[:120]}", retryable=True) from None
            except (aiohttp.ClientError, OSError) as exc:
                raise FetchRefused(status.CONNECTION_ERROR, f"{type(exc).__name__}: {str(exc)[:120]}") from None
        raise FetchRefused(status.REDIRECT_LOOP, f"more than {self.policy.max_redirects} redirects")

    @staticmethod
    def _connector_refusal(exc: aiohttp.ClientConnectorError, current: URL) -> FetchRefused:
        if isinstance(exc.os_error, AddressBlocked) or isinstance(exc.__cause__, AddressBlocked):
            return FetchRefused(status.BLOCKED_ADDRESS, str(current.host))
        # A name that does not resolve will not resolve in half a second either; a refused or reset
        # connection may be a server restarting.
        retryable = not isinstance(exc, aiohttp.ClientConnectorDNSError)
        return FetchRefused(status.CONNECTION_ERROR, f"{type(exc).__name__}: {str(exc)[:120]}", retryable=retryable)

    def _next_hop(self, current: URL, response: aiohttp.ClientResponse, seen: set[str]) -> URL:
        location = response.headers.get("Location", "")
        if not location:
            raise FetchRefused(status.HTTP_ERROR, f"HTTP {response.status} without Location")
        try:
            target = current.join(URL(location))
        except (ValueError, TypeError) as exc:
            raise FetchRefused(status.BAD_URL, f"redirect target: {str(exc)[:80]}") from None
        problem = url_problem(str(target))
        if problem is not None:
            raise FetchRefused(status.BAD_URL, f"redirect target {problem}")
        if str(target) in seen:
            raise FetchRefused(status.REDIRECT_LOOP, f"revisits {str(target)[:120]}")
        seen.add(str(target))
        return target

    async def _read_bounded(self, response: aiohttp.ClientResponse, progress: _Progress) -> bytes:
        limit = self.policy.max_bytes
        chunks: list[bytes] = []
        total = 0
        sniffed = False
        async for chunk in response.content.iter_chunked(_CHUNK_BYTES):
            total += len(chunk)
            progress.downloaded_bytes = total
            if total > limit:
                # Closing drops the connection: the rest of the body is never read.
                response.close()
                raise FetchRefused(status.TOO_LARGE, f"body over {limit} bytes")
            chunks.append(chunk)
            if not sniffed and total >= MAGIC_BYTES_NEEDED:
                sniffed = True
                head = chunks[0] if len(chunks[0]) >= MAGIC_BYTES_NEEDED else b"".join(chunks)
                if sniff_format(head[:MAGIC_BYTES_NEEDED]) is None:
                    response.close()
                    raise FetchRefused(status.NOT_IMAGE, "magic bytes")
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    # ---- robots.txt -------------------------------------------------------------------------------
    async def _check_robots(self, target: URL) -> None:
        text = str(target)
        origin = origin_of(text)
        rules = self.robots.get(origin)
        if rules is None:
            task = self._robots_pending.get(origin)
            if task is None:
                task = asyncio.ensure_future(self._robots_for(text))
                self._robots_pending[origin] = task
                task.add_done_callback(lambda t, o=origin: self._robots_done(o, t))
            # Shielded: one URL timing out must not cancel the fetch other URLs of the origin wait for.
            rules, _ttl = await asyncio.shield(task)
        if not rules.allowed(text):
            raise FetchRefused(status.ROBOTS, "disallowed by robots.txt")

    def _robots_done(self, origin: str, task: asyncio.Task) -> None:
        self._robots_pending.pop(origin, None)
        if task.cancelled():
            return
        # Retrieved here so that a failure whose every waiter went away is not reported as unhandled.
        failure = task.exception()
        if failure is None:
            rules, ttl = task.result()
            self.robots.put(origin, rules, ttl)

    async def _robots_for(self, url: str) -> tuple[RobotsRules, float]:
        """The rules of the URL's origin. Network failures are not cached: they end this URL's attempt
        with the same status the image request would have got, and a retry asks again."""
        try:
            return await asyncio.wait_for(self._fetch_robots(URL(robots_url(url))), self.policy.total_timeout_s)
        except asyncio.TimeoutError:
            raise FetchRefused(status.TIMEOUT, "robots.txt") from None

    async def _fetch_robots(self, current: URL) -> tuple[RobotsRules, float]:
        assert self._session is not None
        self.robots_fetches += 1
        for _hop in range(_ROBOTS_MAX_REDIRECTS + 1):
            self._check_literal(current)
            try:
                async with self._session.get(current, allow_redirects=False, headers={"Accept": "text/plain, */*"}) as response:
                    code = response.status
                    if code in _REDIRECT_STATUSES and response.headers.get("Location"):
                        try:
                            current = current.join(URL(response.headers["Location"]))
                        except (ValueError, TypeError):
                            return RobotsRules.allow_everything(), self.policy.robots_ttl_s
                        if url_problem(str(current)) is not None:
                            return RobotsRules.allow_everything(), self.policy.robots_ttl_s
                        continue
                    if 200 <= code < 300:
                        body = await response.content.read(MAX_ROBOTS_BYTES)
                        return parse_robots(body, self.agent_token), self.policy.robots_ttl_s
                    if 400 <= code < 500:
                        # RFC 9309: "unavailable" means there are no rules.
                        return RobotsRules.allow_everything(), self.policy.robots_ttl_s
                    # RFC 9309: "unreachable" (5xx) means complete disallow, for now.
                    return RobotsRules.forbid_everything(), min(self.policy.robots_ttl_s, _ROBOTS_FAILURE_TTL_S)
            except aiohttp.ClientConnectorError as exc:
                raise self._connector_refusal(exc, current) from None
            except aiohttp.InvalidURL as exc:
                raise FetchRefused(status.BAD_URL, str(exc)[:120]) from None
            except asyncio.TimeoutError:
                raise
            except (aiohttp.ClientError, OSError, ValueError) as exc:
                raise FetchRefused(status.CONNECTION_ERROR, f"robots.txt: {type(exc).__name__}: {str(exc)[:100]}", retryable=True) from None
        # Too many redirects: treated as unavailable, like a 4xx.
        return RobotsRules.allow_everything(), self.policy.robots_ttl_s


class _HostSlot:
    """Per-host concurrency limit; semaphores are dropped when their host has nothing in flight."""

    def __init__(self, downloader: ImageDownloader, host: str) -> None:
        self.downloader = downloader
        self.host = host
        self.semaphore: asyncio.Semaphore | None = None

    async def __aenter__(self) -> None:
        slots = self.downloader._host_slots
        semaphore, users = slots.get(self.host, (None, 0))
        if semaphore is None:
            semaphore = asyncio.Semaphore(self.downloader.policy.per_host)
        slots[self.host] = (semaphore, users + 1)
        self.semaphore = semaphore
        try:
            await semaphore.acquire()
        except BaseException:
            self._leave()
            raise

    async def __aexit__(self, *exc_info) -> None:
        assert self.semaphore is not None
        self.semaphore.release()
        self._leave()

    def _leave(self) -> None:
        slots = self.downloader._host_slots
        semaphore, users = slots[self.host]
        if users <= 1:
            del slots[self.host]
        else:
            slots[self.host] = (semaphore, users - 1)


def _process(body: bytes, policy: ImagePolicy) -> tuple[ProcessedImage, str]:
    processed = process_image(body, policy)
    return processed, hashlib.sha256(processed.data).hexdigest()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop (libuv's event loop) when installed, else asyncio's; the downloader works the same on both."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class BackgroundDownloader:
    """An ImageDownloader on a persistent event-loop thread, callable from any thread.

    Persistent rather than asyncio.run per query: the connection pool, DNS cache and robots.txt
    answers survive between queries (the offline web serves every image from one host, so keep-alive
    saves a TCP handshake per image), and gRPC threads (ProbeUrl) share the same limits as the Kafka
    handler.
    """

    def __init__(self, policy: FetchPolicy) -> None:
        self.policy = policy
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._downloader: ImageDownloader | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        with self._lock:
            if self._loop is not None:
                return
            loop = new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="crawler-fetch-loop", daemon=True)
            thread.start()
            downloader = ImageDownloader(self.policy)
            asyncio.run_coroutine_threadsafe(downloader.start(), loop).result(timeout=30)
            self._loop, self._thread, self._downloader = loop, thread, downloader

    @property
    def in_flight(self) -> int:
        return self._downloader.in_flight if self._downloader is not None else 0

    @property
    def bytes_in_flight(self) -> int:
        return self._downloader.bytes_in_flight if self._downloader is not None else 0

    @property
    def retries_total(self) -> int:
        return self._downloader.retries_total if self._downloader is not None else 0

    @property
    def robots_fetches(self) -> int:
        return self._downloader.robots_fetches if self._downloader is not None else 0

    def fetch_all(self, urls: Sequence[str], deadline_s: float | None = None) -> list[FetchResult]:
        self.start()
        assert self._loop is not None and self._downloader is not None
        future = asyncio.run_coroutine_threadsafe(self._downloader.fetch_many(list(urls), deadline_s), self._loop)
        # fetch_many enforces the deadline itself; the margin only covers scheduling.
        return future.result(timeout=None if deadline_s is None else deadline_s + 30)

    def fetch(self, url: str) -> FetchResult:
        # Room for every attempt and its backoff.
        budget = (1 + self.policy.retries) * (self.policy.total_timeout_s + self.policy.retry_backoff_max_s) + 5
        return self.fetch_all([url], deadline_s=budget)[0]

    def close(self) -> None:
        with self._lock:
            loop, thread, downloader = self._loop, self._thread, self._downloader
            self._loop = self._thread = self._downloader = None
        if loop is None:
            return
        try:
            if downloader is not None:
                asyncio.run_coroutine_threadsafe(downloader.close(), loop).result(timeout=10)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None:
                thread.join(timeout=10)
            loop.close()
