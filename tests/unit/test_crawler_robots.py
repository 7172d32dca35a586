"""robots.txt (RFC 9309) parsing and matching, X-Robots-Tag opt-outs, and the rules cache."""

from __future__ import annotations

import pytest

from services.crawler.robots import RobotsCache, RobotsRules, origin_of, parse_robots, product_token, robots_url, x_robots_opt_out

TOKEN = "iex-crawler"


def test_product_token_is_the_name_before_the_version():
    assert product_token("iex-crawler/0.1 (Internet Explorer research crawler)") == "iex-crawler"
    assert product_token("Img2Dataset") == "img2dataset"


def test_our_group_wins_over_the_star_group_and_groups_merge():
    rules = parse_robots(
        """
        User-agent: *
        Disallow: /

        User-agent: IEX-Crawler
        Disallow: /private/
        # a second group for the same agent adds its rules
        user-agent: iex-crawler/2.0
        Allow: /private/ok.png
        """,
        TOKEN,
    )
    assert rules.allowed("https://site.example/cat.jpg")
    assert not rules.allowed("https://site.example/private/cat.jpg")
    assert rules.allowed("https://site.example/private/ok.png")
    assert not parse_robots("User-agent: *\nDisallow: /\n", TOKEN).allowed("http://x/a.png")


def test_several_agents_share_one_group():
    rules = parse_robots("User-agent: otherbot\nUser-agent: iex-crawler\nDisallow: /img\n\nUser-agent: *\nAllow: /\n", TOKEN)
    assert not rules.allowed("http://x/img/a.png") and rules.allowed("http://x/a.png")


def test_longest_match_wins_and_allow_wins_a_tie():
    rules = parse_robots("User-agent: *\nDisallow: /a\nAllow: /a/b\nDisallow: /a/b/c\nAllow: /t\nDisallow: /t\n", TOKEN)
    assert not rules.allowed("http://x/a/z")
    assert rules.allowed("http://x/a/b/z")
    assert not rules.allowed("http://x/a/b/c.png")
    assert rules.allowed("http://x/t.png")


def test_wildcards_end_anchor_and_query_strings():
    rules = parse_robots("User-agent: *\nDisallow: /*.gif$\nDisallow: /*?session=\nDisallow: /shop*/cart\n", TOKEN)
    assert not rules.allowed("http://x/images/a.gif")
    assert rules.allowed("http://x/images/a.gif.png")
    assert not rules.allowed("http://x/a.png?session=42")
    assert rules.allowed("http://x/a.png?size=2")
    assert not rules.allowed("http://x/shop-de/cart")


def test_percent_encoding_is_normalised():
    rules = parse_robots("User-agent: *\nDisallow: /caf%C3%A9/\nDisallow: /a~b\n", TOKEN)
    assert not rules.allowed("http://x/café/x.png")
    assert not rules.allowed("http://x/a%7Eb")


def test_edge_cases_of_the_file():
    # Empty Disallow disallows nothing; rules before any user-agent belong to no group; robots.txt is always allowed.
    assert parse_robots("User-agent: *\nDisallow:\n", TOKEN).allowed("http://x/a.png")
    assert parse_robots("Disallow: /\nUser-agent: *\nAllow: /\n", TOKEN).allowed("http://x/a.png")
    assert parse_robots(b"User-agent: *\nDisallow: /\n", TOKEN).allowed("http://x/robots.txt")
    assert parse_robots("", TOKEN).allowed("http://x/anything")
    assert parse_robots(b"\xff\xfe garbage \x00", TOKEN).allowed("http://x/a.png")
    assert not RobotsRules.forbid_everything().allowed("http://x/a.png")
    # Sitemap and crawl-delay lines do not end a group.
    rules = parse_robots("User-agent: *\nCrawl-delay: 5\nSitemap: http://x/s.xml\nDisallow: /no\n", TOKEN)
    assert not rules.allowed("http://x/no/a.png")


def test_only_the_first_500_kib_are_read():
    padding = "# " + "x" * 1000 + "\n"
    text = "User-agent: *\n" + padding * 600 + "Disallow: /late\n"
    assert parse_robots(text.encode(), TOKEN).allowed("http://x/late/a.png")


def test_urls_of_robots_and_origins():
    assert robots_url("https://Img.Example:8443/a/b.png?x=1") == "https://Img.Example:8443/robots.txt"
    assert origin_of("https://Img.Example:8443/a/b.png") == "https://img.example:8443"


@pytest.mark.parametrize(
    "values, expected",
    [
        (["noai"], "noai"),
        (["noindex, NoImageAI"], "noimageai"),
        (["iex-crawler: noai"], "noai"),
        (["otherbot: noai"], None),
        (["unavailable_after: 25 Jun 2010 15:00:00 PST"], None),
        (["noindex", "nofollow"], None),
        ([], None),
    ],
)
def test_x_robots_tag(values, expected):
    assert x_robots_opt_out(values, TOKEN) == expected


def test_x_robots_tag_directives_are_configurable():
    assert x_robots_opt_out(["noindex"], TOKEN, ("noai", "noindex")) == "noindex"
    assert x_robots_opt_out(["noai"], TOKEN, ()) is None


def test_cache_expires_and_is_bounded():
    now = [0.0]
    cache = RobotsCache(max_entries=2, ttl_s=10, clock=lambda: now[0])
    allow = RobotsRules.allow_everything()
    cache.put("http://a", allow)
    cache.put("http://b", allow, ttl_s=1)
    assert cache.get("http://a") is allow
    cache.put("http://c", allow)  # evicts b, the least recently used
    assert cache.get("http://b") is None and len(cache) == 2
    now[0] = 10.5
    assert cache.get("http://a") is None
