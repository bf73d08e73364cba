"""Framework-neutral requests and responses: what the web adapters hand the engine and render."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from idempay.core.records import StoredResponse
from idempay.errors import PROBLEM_CONTENT_TYPE, RequestError

__all__ = [
    "REPLAYED_HEADER",
    "GuardRequest",
    "GuardResponse",
    "json_response",
    "problem_response",
]

REPLAYED_HEADER: Final = "Idempotent-Replayed"
_JSON: Final = "application/json"


@dataclass(frozen=True, slots=True)
class GuardRequest:
    """One HTTP request, as the engine needs it.

    ``headers`` may use any case; ``body`` is the raw bytes exactly as received (signatures
    are checked over them). ``route`` is the route template (``/checkout``), not the concrete
    path, so that fingerprints do not depend on path parameters' spelling. ``tenant`` and
    ``user`` scope idempotency keys; the application sets them from its own authentication.
    """

    method: str
    route: str
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)
    tenant: str = ""
    user: str = ""

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        for key, value in self.headers.items():
            if key.lower() == wanted:
                return value
        return None


@dataclass(frozen=True, slots=True)
class GuardResponse:
    """What to answer: status, body bytes and headers (the content type among them)."""

    status: int
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()

    @property
    def content_type(self) -> str | None:
        """The ``Content-Type`` header, if any."""
        for key, value in self.headers:
            if key.lower() == "content-type":
                return value
        return None

    def header(self, name: str) -> str | None:
        """The value of header ``name`` (case-insensitive), or None."""
        wanted = name.lower()
        return next((v for k, v in self.headers if k.lower() == wanted), None)

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body)

    @classmethod
    def replay(cls, stored: StoredResponse) -> GuardResponse:
        """The stored response of an earlier request, marked as a replay."""
        headers = (("Content-Type", stored.content_type), *stored.headers)
        return cls(stored.status, stored.body, (*headers, (REPLAYED_HEADER, "true")))

    def to_stored(self) -> StoredResponse:
        """This response as kept with an idempotency record."""
        others = tuple((k, v) for k, v in self.headers if k.lower() != "content-type")
        return StoredResponse(
            status=self.status,
            body=self.body,
            content_type=self.content_type or _JSON,
            headers=others,
        )


def json_response(status: int, payload: Mapping[str, Any]) -> GuardResponse:
    """A JSON response (compact, UTF-8, keys in the given order)."""
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return GuardResponse(status, body, (("Content-Type", _JSON),))


def problem_response(error: RequestError, *, instance: str | None = None) -> GuardResponse:
    """``error`` rendered as ``application/problem+json`` with the headers it calls for."""
    headers = (("Content-Type", PROBLEM_CONTENT_TYPE), *error.headers().items())
    return GuardResponse(error.status, error.problem_json(instance=instance), headers)
