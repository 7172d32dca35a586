"""The bounded set of outcomes of fetching one URL: metric labels and QueryCrawled.refused keys."""

from __future__ import annotations

OK = "ok"
TIMEOUT = "timeout"
TOO_LARGE = "too_large"
NOT_IMAGE = "not_image"
DECODE_ERROR = "decode_error"
TOO_SMALL = "too_small"
BAD_ASPECT = "bad_aspect"
BLOCKED_ADDRESS = "blocked_address"
HTTP_ERROR = "http_error"
CONNECTION_ERROR = "connection_error"
REDIRECT_LOOP = "redirect_loop"
BAD_URL = "bad_url"
# robots.txt of the image's origin (or of a redirect hop's) disallows our user agent.
ROBOTS = "robots"
# The answer carried X-Robots-Tag noai / noimageai (or another configured opt-out directive).
NOAI = "noai"

REFUSALS: tuple[str, ...] = (
    TIMEOUT,
    TOO_LARGE,
    NOT_IMAGE,
    DECODE_ERROR,
    TOO_SMALL,
    BAD_ASPECT,
    BLOCKED_ADDRESS,
    HTTP_ERROR,
    CONNECTION_ERROR,
    REDIRECT_LOOP,
    BAD_URL,
    ROBOTS,
    NOAI,
)

ALL: tuple[str, ...] = (OK, *REFUSALS)
