"""Stripe's form encoding, read back: ``metadata[order_id]=o1&expand[0]=latest_charge``.

The official libraries send bodies (and query strings) as ``application/x-www-form-urlencoded``
pairs whose keys carry the nesting in brackets: ``a[b][c]=v`` is ``{"a": {"b": {"c": "v"}}}``,
and ``a[0]=x&a[1]=y`` or ``a[]=x&a[]=y`` is a list. :class:`Params` reads the result with exact
types and answers a bad value with Stripe's own 400 errors.
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Iterator
from typing import Final, TypeAlias
from urllib.parse import parse_qsl

from idempay.testing.simulator._errors import StripeAPIError, invalid, missing

__all__ = ["FormValue", "Params", "fingerprint", "parse_form"]

FormValue: TypeAlias = "str | list[FormValue] | dict[str, FormValue]"

_KEY: Final = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")
_PART: Final = re.compile(r"\[([^\[\]]*)\]")
_MAX_PAIRS: Final = 1000


def _malformed(key: str) -> StripeAPIError:
    name = key.split("[", 1)[0]
    return invalid(f"Invalid parameter: {name}.", param=name, code="parameter_invalid_string")


def _as_lists(value: FormValue) -> FormValue:
    # Nested dicts whose keys are all indexes ("0", "1", or "" from `a[]`) were lists.
    if isinstance(value, dict):
        converted = {key: _as_lists(item) for key, item in value.items()}
        if converted and all(key.isdigit() or key.startswith("\0") for key in converted):
            ordered = sorted(converted.items(), key=lambda kv: _index(kv[0]))
            return [item for _, item in ordered]
        return converted
    return value


def _index(key: str) -> tuple[int, int]:
    # `a[]` appends: those keys are numbered in arrival order after a NUL marker.
    if key.startswith("\0"):
        return (1, int(key[1:]))
    return (0, int(key))


def parse_form(text: str) -> dict[str, FormValue]:
    """Parse a form-encoded body or query string into nested dicts and lists of strings.

    Raises:
        StripeAPIError: 400 for a key that is not ``name[part]...``, a key used both as a
            value and as a container, or more than 1000 pairs.
    """
    pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=False)
    if len(pairs) > _MAX_PAIRS:
        raise invalid("Too many parameters.")
    root: dict[str, FormValue] = {}
    appended = 0
    for key, value in pairs:
        match = _KEY.fullmatch(key)
        if match is None:
            raise _malformed(key)
        parts = [match.group(1), *_PART.findall(match.group(2))]
        node = root
        for depth, part in enumerate(parts):
            name = part
            if part == "" and depth > 0:
                name = f"\0{appended}"
                appended += 1
            if depth == len(parts) - 1:
                if name in node:
                    raise _malformed(key)
                node[name] = value
                break
            child = node.setdefault(name, {})
            if not isinstance(child, dict):
                raise _malformed(key)
            node = child
    # Metadata keys are the user's strings: `metadata[0]=x` is a key "0", never a list.
    return {name: value if name == "metadata" else _as_lists(value) for name, value in root.items()}


def fingerprint(method: str, path: str, params: dict[str, FormValue]) -> str:
    """What the idempotency layer compares: the endpoint and the parameters, order aside."""
    return json.dumps([method, path, params], sort_keys=True, separators=(",", ":"))


_TRUE: Final = frozenset({"true"})
_FALSE: Final = frozenset({"false"})


class Params:
    """The parameters of one request, read with exact types.

    Every read marks its name as known; :meth:`refuse_unknown` then answers any parameter the
    endpoint does not take with Stripe's ``parameter_unknown``.
    """

    def __init__(self, data: dict[str, FormValue]) -> None:
        self.data = data
        self._known: set[str] = {"expand"}

    def __contains__(self, name: str) -> bool:
        self._known.add(name)
        return name in self.data

    def accept(self, *names: str) -> None:
        """Take these parameters without reading them (accepted, and ignored)."""
        self._known.update(names)

    def refuse_unknown(self) -> None:
        """Raise 400 ``parameter_unknown`` for the first parameter nothing read."""
        for name in self.data:
            if name not in self._known:
                raise invalid(
                    f"Received unknown parameter: {name}", param=name, code="parameter_unknown"
                )

    def raw(self, name: str) -> FormValue | None:
        """The parameter as parsed (a string, a list or a hash), or ``None``."""
        self._known.add(name)
        return self.data.get(name)

    def string(self, name: str, *, required: bool = False) -> str | None:
        """A string parameter; an empty string reads as absent (Stripe's "unset")."""
        value = self.raw(name)
        if value is None or value == "":
            if required:
                raise missing(name)
            return None
        if not isinstance(value, str):
            raise invalid(f"Invalid string: {name}", param=name, code="parameter_invalid_string")
        return value

    def choice(self, name: str, choices: Collection[str]) -> str | None:
        """A string that must be one of ``choices``."""
        value = self.string(name)
        if value is not None and value not in choices:
            allowed = ", ".join(sorted(choices))
            raise invalid(f"Invalid {name}: must be one of {allowed}", param=name)
        return value

    def integer(
        self, name: str, *, required: bool = False, minimum: int | None = None
    ) -> int | None:
        """An integer parameter, written in decimal digits."""
        value = self.string(name, required=required)
        if value is None:
            return None
        if not re.fullmatch(r"-?[0-9]{1,18}", value):
            raise invalid(f"Invalid integer: {value}", param=name, code="parameter_invalid_integer")
        number = int(value)
        if minimum is not None and number < minimum:
            raise invalid(
                f"This value must be greater than or equal to {minimum}.",
                param=name,
                code="parameter_invalid_integer",
            )
        return number

    def boolean(self, name: str) -> bool | None:
        """``true`` or ``false``."""
        value = self.string(name)
        if value is None:
            return None
        if value in _TRUE:
            return True
        if value in _FALSE:
            return False
        raise invalid(f"Invalid boolean: {value}", param=name)

    def mapping(self, name: str) -> dict[str, FormValue] | None:
        """A hash parameter (``name[key]=...``); an empty string reads as absent."""
        value = self.raw(name)
        if value is None or value == "":
            return None
        if not isinstance(value, dict):
            raise invalid(f"Invalid hash: {name}", param=name, code="parameter_invalid_string")
        return value

    def strings(self, name: str) -> list[str] | None:
        """An array of strings (``name[0]=...`` or ``name[]=...``)."""
        value = self.raw(name)
        if value is None or value == "":
            return None
        if isinstance(value, str):
            return [value]
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise invalid(f"Invalid array: {name}", param=name)
        return [item for item in value if isinstance(item, str)]

    def metadata(self) -> dict[str, str] | None:
        """``metadata[key]=value`` pairs with Stripe's limits (50 keys, 40 and 500 characters)."""
        value = self.mapping("metadata")
        if value is None:
            return None
        if len(value) > 50:
            raise invalid("Metadata can have at most 50 keys.", param="metadata")
        result: dict[str, str] = {}
        for key, item in value.items():
            if not isinstance(item, str):
                raise invalid("Metadata values must be strings.", param=f"metadata[{key}]")
            if len(key) > 40 or len(item) > 500:
                raise invalid(
                    "Metadata keys are at most 40 characters and values at most 500.",
                    param=f"metadata[{key}]",
                )
            result[key] = item
        return result

    def expand(self) -> list[str]:
        """The ``expand[]`` paths asked for."""
        return self.strings("expand") or []

    def items(self) -> Iterator[tuple[str, FormValue]]:
        """Every parameter, marking each as known."""
        for name, value in self.data.items():
            self._known.add(name)
            yield name, value
