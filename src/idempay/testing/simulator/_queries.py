"""Reading collections the way Stripe's API does: list pages, ``created`` filters, event-type
patterns, and the part of the search language that PaymentIntents need."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from typing import Final, TypeVar

from idempay.testing.simulator._errors import invalid
from idempay.testing.simulator._forms import Params
from idempay.testing.simulator._objects import JSON, PaymentIntent

__all__ = ["created_filter", "page", "page_size", "search_predicate", "type_matcher"]

T = TypeVar("T")

_PI_FIELDS: Final = frozenset({"amount", "created", "currency", "customer", "status"})
_NUMERIC_FIELDS: Final = frozenset({"amount", "created"})
_COMPARISONS: Final[dict[str, Callable[[int, int], bool]]] = {
    "gt": operator.gt,
    "gte": operator.ge,
    "lt": operator.lt,
    "lte": operator.le,
    ":": operator.eq,
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}
_CLAUSE: Final = re.compile(
    r"""(?P<neg>-)?(?:metadata\[(?P<q>['"])(?P<key>[^'"]+)(?P=q)\]|(?P<field>[a-z_]+))"""
    r"""(?P<op>:|>=|<=|>|<)(?P<value>'[^']*'|"[^"]*"|-?[0-9]+)"""
)


def page_size(params: Params) -> int:
    """``limit``: 1 to 100, 10 when absent."""
    limit = params.integer("limit")
    if limit is None:
        return 10
    if not 1 <= limit <= 100:
        raise invalid(
            "This value must be between 1 and 100.",
            param="limit",
            code="parameter_invalid_integer",
        )
    return limit


def created_filter(params: Params) -> Callable[[int], bool]:
    """``created=<t>`` or ``created[gt|gte|lt|lte]=<t>``, as a test on a timestamp."""
    value = params.raw("created")
    if value is None:
        return lambda _created: True
    if isinstance(value, str):
        exact = params.integer("created")
        return lambda created: created == exact
    if not isinstance(value, dict):
        raise invalid("Invalid created filter.", param="created")
    bounds: list[tuple[Callable[[int, int], bool], int]] = []
    for op, raw in value.items():
        if not isinstance(raw, str) or not raw.lstrip("-").isdigit():
            raise invalid(f"Invalid integer: created[{op}]", param=f"created[{op}]")
        compare = _COMPARISONS.get(op)
        if compare is None:
            raise invalid(
                f"Received unknown parameter: created[{op}]",
                param=f"created[{op}]",
                code="parameter_unknown",
            )
        bounds.append((compare, int(raw)))
    return lambda created: all(compare(created, bound) for compare, bound in bounds)


def page(items: list[T], params: Params, url: str, render: Callable[[T], JSON]) -> JSON:
    """One page of a list, newest first, by ``limit``, ``starting_after`` or ``ending_before``."""
    limit = page_size(params)
    after = params.string("starting_after")
    before = params.string("ending_before")
    params.refuse_unknown()
    ids = [getattr(item, "id", None) for item in items]
    if after is not None:
        if after not in ids:
            raise invalid(f"No such object: '{after}'", param="starting_after")
        start = ids.index(after) + 1
        chunk = items[start : start + limit]
        more = start + limit < len(items)
    elif before is not None:
        if before not in ids:
            raise invalid(f"No such object: '{before}'", param="ending_before")
        end = ids.index(before)
        chunk = items[max(0, end - limit) : end]
        more = end - limit > 0
    else:
        chunk = items[:limit]
        more = limit < len(items)
    return {
        "object": "list",
        "data": [render(item) for item in chunk],
        "has_more": more,
        "url": url,
    }


def type_matcher(pattern: str) -> Callable[[str], bool]:
    """An event type, or a family ending in ``*`` (``payment_intent.*``)."""
    if pattern.endswith("*"):
        prefix = pattern[:-1]
        return lambda event_type: event_type.startswith(prefix)
    return lambda event_type: event_type == pattern


def search_predicate(query: str) -> Callable[[PaymentIntent], bool]:
    """Stripe's search language, the part PaymentIntents need; unsupported queries are 400s."""
    text = query.strip()
    has_and = " AND " in text
    has_or = " OR " in text
    if has_and and has_or:
        raise invalid("Search queries cannot mix AND and OR.", param="query")
    joiner = " OR " if has_or else " AND "
    clauses = [_clause(part.strip()) for part in text.split(joiner)]
    if has_or:
        return lambda intent: any(clause(intent) for clause in clauses)
    return lambda intent: all(clause(intent) for clause in clauses)


def _clause(text: str) -> Callable[[PaymentIntent], bool]:
    match = _CLAUSE.fullmatch(text)
    if match is None:
        raise invalid(f"Could not parse the search query near: {text!r}", param="query")
    negate = match.group("neg") is not None
    op = match.group("op")
    raw = match.group("value")
    quoted = raw[0] in "'\""
    value = raw[1:-1] if quoted else raw
    key = match.group("key")
    field_name = match.group("field")
    if key is not None:
        if op != ":":
            raise invalid("Metadata can only be searched for equality (':').", param="query")
        test: Callable[[PaymentIntent], bool] = lambda intent: intent.metadata.get(key) == value  # noqa: E731
    elif field_name in _NUMERIC_FIELDS:
        if quoted or not value.lstrip("-").isdigit():
            raise invalid(f"The field `{field_name}` takes a number.", param="query")
        test = _numeric(field_name, op, int(value))
    elif field_name in _PI_FIELDS:
        if op != ":" or not quoted:
            raise invalid(f"The field `{field_name}` takes a quoted string.", param="query")
        test = lambda intent: str(getattr(intent, field_name)) == value  # noqa: E731
    else:
        raise invalid(
            f"Field `{field_name}` is an unsupported search field for resource `payment_intents`.",
            param="query",
        )
    if negate:
        return lambda intent: not test(intent)
    return test


def _numeric(field_name: str, op: str, bound: int) -> Callable[[PaymentIntent], bool]:
    compare = _COMPARISONS[op]
    return lambda intent: compare(int(getattr(intent, field_name)), bound)
