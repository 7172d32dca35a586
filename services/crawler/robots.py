"""Site opt-outs the crawler honours: robots.txt (RFC 9309) and `X-Robots-Tag: noai / noimageai`.

Pure parsing and matching live here; fetching robots.txt (through the same address checks as any
download) is the downloader's job, and `RobotsCache` only remembers answers per origin.

robots.txt, as RFC 9309 says:
- the group whose user-agent equals our product token (case-insensitive) applies, else the `*`
  group, else nothing is disallowed; several groups for the same agent are merged;
- `*` matches any run of characters and a final `$` anchors the end; the longest matching rule
  wins and `allow` wins a tie; /robots.txt itself is always allowed;
- a 4xx answer means "no rules" (crawl); a 5xx answer means "disallow everything" for a while;
  only the first 500 KiB are parsed.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterable
from urllib.parse import quote, unquote, urlsplit

MAX_ROBOTS_BYTES = 500 * 1024
DEFAULT_NOAI_DIRECTIVES: tuple[str, ...] = ("noai", "noimageai")

# X-Robots-Tag directives whose value itself holds a colon ("unavailable_after: 25 Jun 2010"): the
# part before that colon is not a user-agent name.
_DIRECTIVES_WITH_VALUES = frozenset({"unavailable_after", "max-snippet", "max-image-preview", "max-video-preview"})


def product_token(user_agent: str) -> str:
    """'iex-crawler/0.1 (…)' -> 'iex-crawler': the name robots.txt groups and X-Robots-Tag prefixes use."""
    token = user_agent.strip().split("/", 1)[0].split(" ", 1)[0]
    return token.lower()


def _normalise_path(path: str) -> str:
    """Percent-encoding normalised so that /a%7Eb and /a~b compare equal (RFC 9309 section 2.2.2)."""
    return quote(unquote(path), safe="/?=&*$:@!'(),;+%~-._")


@dataclass(frozen=True)
class Rule:
    allow: bool
    pattern: str
    regex: re.Pattern

    @classmethod
    def of(cls, allow: bool, pattern: str) -> "Rule":
        normalised = _normalise_path(pattern)
        anchored = normalised.endswith("$")
        body = normalised[:-1] if anchored else normalised
        regex = re.compile("".join(".*" if c == "*" else re.escape(c) for c in body) + ("$" if anchored else ""), re.DOTALL)
        return cls(allow, normalised, regex)


@dataclass(frozen=True)
class RobotsRules:
    """The rules of one robots.txt that apply to one product token."""

    rules: tuple[Rule, ...] = ()
    disallow_all: bool = False

    @classmethod
    def allow_everything(cls) -> "RobotsRules":
        return cls()

    @classmethod
    def forbid_everything(cls) -> "RobotsRules":
        return cls(disallow_all=True)

    def allowed(self, url_or_path: str) -> bool:
        parts = urlsplit(url_or_path)
        path = parts.path or "/"
        if path == "/robots.txt":
            return True
        if self.disallow_all:
            return False
        target = _normalise_path(path + (f"?{parts.query}" if parts.query else ""))
        best: Rule | None = None
        for rule in self.rules:
            if not rule.regex.match(target):
                continue
            if best is None or len(rule.pattern) > len(best.pattern) or (len(rule.pattern) == len(best.pattern) and rule.allow and not best.allow):
                best = rule
        return best is None or best.allow


def parse_robots(text: str | bytes, token: str) -> RobotsRules:
    """The rules of a robots.txt body for `token` (a product token, lower case)."""
    if isinstance(text, bytes):
        text = text[:MAX_ROBOTS_BYTES].decode("utf-8", errors="replace")
    else:
        text = text[:MAX_ROBOTS_BYTES]
    token = token.lower()
    # (agents of the group, rules of the group), in file order.
    groups: list[tuple[list[str], list[Rule]]] = []
    agents: list[str] = []
    rules: list[Rule] = []
    in_rules = False
    for raw_line in text.splitlines():
        line = raw_line.split("#", 1)[0].strip()
        if ":" not in line:
            continue
        key, _, value = line.partition(":")
        key, value = key.strip().lower(), value.strip()
        if key in ("user-agent", "useragent", "user agent"):
            if in_rules:
                groups.append((agents, rules))
                agents, rules, in_rules = [], [], False
            agents.append(value.lower())
        elif key in ("allow", "disallow"):
            if not agents:
                continue  # rules before any user-agent line belong to no group
            in_rules = True
            if value:  # an empty Disallow disallows nothing
                rules.append(Rule.of(key == "allow", value))
        # sitemap, crawl-delay and unknown keys neither start nor end a group
    if agents:
        groups.append((agents, rules))

    def agent_matches(agent: str) -> bool:
        # Product tokens are compared whole; a trailing version ("iex-crawler/1.0") is tolerated.
        return agent.split("/", 1)[0] == token

    chosen = [r for a, r in groups if any(agent_matches(agent) for agent in a)]
    if not chosen:
        chosen = [r for a, r in groups if "*" in a]
    return RobotsRules(tuple(rule for group_rules in chosen for rule in group_rules))


def robots_url(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/robots.txt"


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.lower()}"


def x_robots_opt_out(values: Iterable[str], token: str, directives: Iterable[str] = DEFAULT_NOAI_DIRECTIVES) -> str | None:
    """The first refused directive among X-Robots-Tag header values that apply to `token`, else None.

    A value is either "d1, d2" (applies to every crawler) or "agent: d1, d2" (applies to that agent).
    """
    refused = {d.strip().lower() for d in directives if d.strip()}
    if not refused:
        return None
    token = token.lower()
    for value in values:
        agent: str | None = None
        body = value
        head, sep, rest = value.partition(":")
        if sep and head.strip().lower() not in _DIRECTIVES_WITH_VALUES and "," not in head:
            agent, body = head.strip().lower(), rest
        if agent is not None and agent != token:
            continue
        for directive in body.split(","):
            name = directive.strip().lower()
            if name in refused:
                return name
    return None


class RobotsCache:
    """Rules per origin with an expiry, bounded LRU; shared by every download of one event loop."""

    def __init__(self, max_entries: int = 10_000, ttl_s: float = 3600.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.ttl_s = ttl_s
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, RobotsRules]] = OrderedDict()

    def get(self, origin: str) -> RobotsRules | None:
        entry = self._entries.get(origin)
        if entry is None:
            return None
        expires_at, rules = entry
        if self._clock() >= expires_at:
            del self._entries[origin]
            return None
        self._entries.move_to_end(origin)
        return rules

    def put(self, origin: str, rules: RobotsRules, ttl_s: float | None = None) -> None:
        if self.max_entries <= 0:
            return
        self._entries[origin] = (self._clock() + (self.ttl_s if ttl_s is None else ttl_s), rules)
        self._entries.move_to_end(origin)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
