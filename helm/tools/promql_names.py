"""Metric names referenced by a PromQL expression, and the sample names a /metrics page offers.

A small lexer rather than a full parser: it skips strings, label matchers, durations, numbers,
keywords, function and aggregation names and the label lists of by/without/on/ignoring/group_*,
and what remains in identifier position is a metric name. `{__name__=~"a_(b|c)_d"}` selectors are
expanded when the regular expression is a plain alternation, so every concrete name is checked.
"""

from __future__ import annotations

import itertools
import re

FUNCTIONS = frozenset(
    """abs absent absent_over_time avg_over_time ceil changes clamp clamp_max clamp_min count_over_time
    day_of_month day_of_week day_of_year days_in_month delta deriv exp floor histogram_avg histogram_count
    histogram_fraction histogram_quantile histogram_stddev histogram_stdvar histogram_sum holt_winters
    double_exponential_smoothing hour idelta increase irate label_join label_replace last_over_time ln log10
    log2 mad_over_time max_over_time min_over_time minute month predict_linear present_over_time
    quantile_over_time rate resets round scalar sgn sort sort_desc sort_by_label sort_by_label_desc sqrt start end
    stddev_over_time stdvar_over_time sum_over_time time timestamp vector year acos acosh asin asinh atan
    atanh cos cosh deg pi rad sin sinh tan tanh""".split()
)
AGGREGATIONS = frozenset("sum min max avg group stddev stdvar count count_values bottomk topk quantile limitk limit_ratio".split())
KEYWORDS = frozenset("by without on ignoring group_left group_right bool and or unless offset atan2".split())
LABEL_LIST_KEYWORDS = frozenset("by without on ignoring group_left group_right".split())

_TOKEN = re.compile(
    r"""
    (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
    | (?P<duration>\[[^\]]*\])
    | (?P<number>(?:0x[0-9a-fA-F]+|[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?)(?:ms|s|m|h|d|w|y)?)
    | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
    | (?P<brace>[{}])
    | (?P<paren>[()])
    | (?P<other>\S)
    """,
    re.VERBOSE,
)


class PromQLError(ValueError):
    """The expression uses something this lexer does not understand (say so, never guess)."""


def _tokens(expr: str) -> list[tuple[str, str]]:
    return [(m.lastgroup or "other", m.group(m.lastgroup or "other")) for m in _TOKEN.finditer(expr)]


def _unquote(text: str) -> str:
    return text[1:-1].encode().decode("unicode_escape") if text[0] in "\"'" else text[1:-1]


def expand_alternation(pattern: str) -> list[str]:
    """Concrete names of a regex made of literals and (a|b|c) groups; PromQLError otherwise."""
    parts = re.split(r"(\([^()]*\))", pattern)
    choices: list[list[str]] = []
    for part in parts:
        if part.startswith("(") and part.endswith(")"):
            options = part[1:-1].split("|")
        else:
            options = [part]
        for option in options:
            if not re.fullmatch(r"[A-Za-z0-9_:]*", option):
                raise PromQLError(f"__name__ regex {pattern!r} is not a plain alternation of names")
        choices.append(options)
    return ["".join(combo) for combo in itertools.product(*choices)]


def _names_in_matchers(body: list[tuple[str, str]]) -> list[str]:
    """__name__ matchers inside one {...}."""
    names = []
    for i, (kind, text) in enumerate(body):
        if kind == "ident" and text == "__name__":
            op = "".join(t for _, t in body[i + 1 : i + 3] if t in ("=", "~", "!"))
            value = next((t for k, t in body[i + 1 :] if k == "string"), None)
            if value is None:
                raise PromQLError("__name__ matcher without a value")
            if op.startswith("!"):
                raise PromQLError("negative __name__ matchers cannot be checked")
            if "~" in op:
                names.extend(expand_alternation(_unquote(value)))
            else:
                names.append(_unquote(value))
    return names


def metric_names(expr: str) -> set[str]:
    """Every metric name `expr` selects."""
    tokens = _tokens(expr)
    names: set[str] = set()
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        if kind == "brace" and text == "{":
            depth, j = 1, i + 1
            while j < len(tokens) and depth:
                if tokens[j] == ("brace", "{"):
                    depth += 1
                elif tokens[j] == ("brace", "}"):
                    depth -= 1
                j += 1
            names.update(_names_in_matchers(tokens[i + 1 : j - 1]))
            i = j
            continue
        if kind == "ident":
            following = tokens[i + 1] if i + 1 < len(tokens) else ("", "")
            lowered = text.lower()
            if lowered in LABEL_LIST_KEYWORDS and following == ("paren", "("):
                # Skip the label list: by (namespace, job) names labels, not metrics.
                depth, j = 1, i + 2
                while j < len(tokens) and depth:
                    if tokens[j] == ("paren", "("):
                        depth += 1
                    elif tokens[j] == ("paren", ")"):
                        depth -= 1
                    j += 1
                i = j
                continue
            if following == ("paren", "(") and (lowered in FUNCTIONS or lowered in AGGREGATIONS):
                i += 1
                continue
            # `sum by (job) (...)`: the aggregation comes before its grouping clause.
            grouped = following[0] == "ident" and following[1].lower() in ("by", "without")
            if lowered in KEYWORDS or (lowered in AGGREGATIONS and grouped):
                i += 1
                continue
            if lowered in ("inf", "nan"):
                i += 1
                continue
            names.add(text)
        i += 1
    return names


# ---- what a /metrics page offers ---------------------------------------------------------------

_SUFFIXES = {
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
}


def exposed_names(page: str) -> set[str]:
    """Sample names a Prometheus text exposition offers, from its # TYPE lines (which list
    families before their first sample) and its sample lines. A histogram family `x` offers
    x_bucket, x_sum and x_count, not `x` itself; a counter offers its own name (x_total)."""
    names: set[str] = set()
    for line in page.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4:
                family, kind = parts[2], parts[3].lower()
                if kind == "counter":
                    names.add(family)
                    if family.endswith("_total"):
                        names.add(family[: -len("_total")] + "_created")
                else:
                    names.update(family + suffix for suffix in _SUFFIXES.get(kind, ("",)))
        elif line and not line.startswith("#"):
            match = re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line)
            if match:
                names.add(match.group(0))
    return names
