"""One API request, from its bytes to its answer: authentication, routing, idempotency, faults.

Transport-free: :meth:`Api.handle` takes what the HTTP server read and returns an
:class:`Answer`, which may tell the server to hold or cut the connection instead of replying.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import threading
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from idempay.testing.simulator._clock import SimClock
from idempay.testing.simulator._errors import StripeAPIError
from idempay.testing.simulator._faults import Fault, FaultPlan, Gate
from idempay.testing.simulator._forms import Params, fingerprint, parse_form
from idempay.testing.simulator._idempotency import (
    Claimed,
    IdempotencyStore,
    InFlight,
    Mismatch,
    Outcome,
    Replay,
    SavedResponse,
    check_key,
)
from idempay.testing.simulator._stripe import JSON, Account, RequestContext, new_id

__all__ = ["Answer", "Api", "ApiStats"]

logger = logging.getLogger(__name__)

_GATE_TIMEOUT: Final = 120.0
_TEST_KEY_PREFIXES: Final = ("sk_test_", "rk_test_")

Action = Literal["reply", "reset", "hang"]
Handler = Callable[[Account, Params, RequestContext, str], JSON]
"""(account, parameters, the request, the id in the path) -> the object answered."""


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    template: str
    pattern: re.Pattern[str]
    name: str
    handler: Handler

    def path(self, object_id: str) -> str:
        """The request's path, for fault rules and idempotency endpoints."""
        return self.template.replace("{id}", object_id)


def _route(method: str, path: str, name: str, handler: Handler) -> _Route:
    pattern = re.compile(path.replace("{id}", "(?P<id>[A-Za-z0-9_]+)"))
    return _Route(method, path, pattern, name, handler)


# Order matters where paths overlap: "search" is not an id.
_ROUTES: Final = (
    _route(
        "POST",
        "/v1/payment_intents",
        "payment_intents.create",
        lambda a, p, c, _id: a.create_payment_intent(p, c),
    ),
    _route(
        "GET",
        "/v1/payment_intents",
        "payment_intents.list",
        lambda a, p, _c, _id: a.list_payment_intents(p),
    ),
    _route(
        "GET",
        "/v1/payment_intents/search",
        "payment_intents.search",
        lambda a, p, _c, _id: a.search_payment_intents(p),
    ),
    _route(
        "GET",
        "/v1/payment_intents/{id}",
        "payment_intents.retrieve",
        lambda a, p, _c, i: a.retrieve_payment_intent(i, p),
    ),
    _route(
        "POST",
        "/v1/payment_intents/{id}",
        "payment_intents.update",
        lambda a, p, c, i: a.update_payment_intent(i, p, c),
    ),
    _route(
        "POST",
        "/v1/payment_intents/{id}/confirm",
        "payment_intents.confirm",
        lambda a, p, c, i: a.confirm_payment_intent(i, p, c),
    ),
    _route(
        "POST",
        "/v1/payment_intents/{id}/cancel",
        "payment_intents.cancel",
        lambda a, p, c, i: a.cancel_payment_intent(i, p, c),
    ),
    _route(
        "POST",
        "/v1/payment_intents/{id}/capture",
        "payment_intents.capture",
        lambda a, p, c, i: a.capture_payment_intent(i, p, c),
    ),
    _route(
        "GET",
        "/v1/payment_methods/{id}",
        "payment_methods.retrieve",
        lambda a, p, _c, i: a.retrieve_payment_method(i, p),
    ),
    _route("GET", "/v1/charges", "charges.list", lambda a, p, _c, _id: a.list_charges(p)),
    _route(
        "GET", "/v1/charges/{id}", "charges.retrieve", lambda a, p, _c, i: a.retrieve_charge(i, p)
    ),
    _route(
        "POST",
        "/v1/refunds",
        "refunds.create",
        lambda a, p, c, _id: a.create_refund(p, c),
    ),
    _route("GET", "/v1/refunds", "refunds.list", lambda a, p, _c, _id: a.list_refunds(p)),
    _route(
        "GET", "/v1/refunds/{id}", "refunds.retrieve", lambda a, p, _c, i: a.retrieve_refund(i, p)
    ),
    _route("GET", "/v1/events", "events.list", lambda a, p, _c, _id: a.list_events(p)),
    _route("GET", "/v1/events/{id}", "events.retrieve", lambda a, p, _c, i: a.retrieve_event(i, p)),
)


@dataclass(frozen=True, slots=True)
class Answer:
    """What to do with the connection: reply, or (a fault) reset it or hold it unanswered."""

    status: int
    body: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    action: Action = "reply"
    hold_seconds: float = 0.0


@dataclass(slots=True)
class ApiStats:
    """Counters of the API side, since the last reset."""

    requests: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    replayed: int = 0
    in_flight_conflicts: int = 0
    key_mismatches: int = 0
    faults: Counter[str] = field(default_factory=Counter)

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON data."""
        return {
            "requests": dict(sorted(self.requests.items())),
            "statuses": dict(sorted(self.statuses.items())),
            "replayed": self.replayed,
            "in_flight_conflicts": self.in_flight_conflicts,
            "key_mismatches": self.key_mismatches,
            "faults": dict(sorted(self.faults.items())),
        }


def _encode(payload: JSON) -> bytes:
    return (json.dumps(payload, indent=2) + "\n").encode()


def _error_answer(error: StripeAPIError, headers: dict[str, str]) -> Answer:
    return Answer(error.status, _encode(error.body()), headers)


class Api:
    """Stripe's v1 API over an :class:`Account`, with Stripe's idempotency and injected faults.

    Args:
        account: the objects.
        clock: the simulated time (idempotency-key expiry, ``created``).
        api_keys: the accepted secret keys; empty accepts any test-mode key
            (``sk_test_...``, ``rk_test_...``).
        api_version: sent back in ``Stripe-Version`` when the request sends none.
    """

    def __init__(
        self,
        account: Account,
        *,
        clock: SimClock,
        api_keys: Collection[str],
        api_version: str,
    ) -> None:
        self.account = account
        self.clock = clock
        self.api_keys = frozenset(api_keys)
        self.api_version = api_version
        self.keys = IdempotencyStore()
        self.faults = FaultPlan()
        self.closing = threading.Event()
        self._stats = ApiStats()
        self._stats_lock = threading.Lock()

    def stats(self) -> ApiStats:
        """A snapshot of the counters."""
        with self._stats_lock:
            return ApiStats(
                requests=Counter(self._stats.requests),
                statuses=Counter(self._stats.statuses),
                replayed=self._stats.replayed,
                in_flight_conflicts=self._stats.in_flight_conflicts,
                key_mismatches=self._stats.key_mismatches,
                faults=Counter(self._stats.faults),
            )

    def reset(self) -> list[Gate]:
        """Forget keys, faults and counters; return the gates to release."""
        self.keys.clear()
        with self._stats_lock:
            self._stats = ApiStats()
        return self.faults.clear()

    def _count(self, route: str, status: int, **flags: bool) -> None:
        with self._stats_lock:
            self._stats.requests[route] += 1
            self._stats.statuses[str(status)] += 1
            if flags.get("replayed"):
                self._stats.replayed += 1
            if flags.get("in_flight"):
                self._stats.in_flight_conflicts += 1
            if flags.get("mismatch"):
                self._stats.key_mismatches += 1

    def _count_fault(self, kind: str) -> None:
        with self._stats_lock:
            self._stats.faults[kind] += 1

    # -- the request -----------------------------------------------------------------------

    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Answer:
        """Answer one API request (``target`` is the path and query string)."""
        parts = urlsplit(target)
        path = parts.path.rstrip("/") or "/"
        request_id = new_id("req_", 14)
        version = headers.get("stripe-version") or self.api_version
        out = {"Request-Id": request_id, "Stripe-Version": version}
        key = headers.get("idempotency-key")
        if key is not None and method == "POST":
            out["Idempotency-Key"] = key
        route, object_id = self._match(method, path)
        name = route.name if route is not None else "unknown"
        try:
            api_key = self._authenticate(headers.get("authorization"))
            if route is None:
                raise StripeAPIError(
                    404, f"Unrecognized request URL ({method}: {path}).", stored=False
                )
            params = Params(self._params(method, parts.query, headers, body))
        except StripeAPIError as error:
            self._count(name, error.status)
            return _error_answer(error, out)
        if method != "POST" or key is None:
            return self._run(route, object_id, params, out, api_key=api_key, key=None)
        return self._idempotent(route, object_id, params, out, api_key=api_key, key=key)

    def _match(self, method: str, path: str) -> tuple[_Route | None, str]:
        for route in _ROUTES:
            if route.method != method:
                continue
            match = route.pattern.fullmatch(path)
            if match is not None:
                return route, match.groupdict().get("id") or ""
        return None, ""

    def _authenticate(self, header: str | None) -> str:
        if not header:
            raise StripeAPIError(
                401,
                "You did not provide an API key. Send it in the Authorization header "
                "(Authorization: Bearer sk_test_...).",
                stored=False,
            )
        scheme, _, credentials = header.partition(" ")
        key = credentials.strip()
        if scheme.lower() == "basic":
            try:
                key = base64.b64decode(key, validate=True).decode().partition(":")[0]
            except (binascii.Error, UnicodeDecodeError):
                key = ""
        elif scheme.lower() != "bearer":
            key = ""
        accepted = key in self.api_keys if self.api_keys else key.startswith(_TEST_KEY_PREFIXES)
        if not accepted:
            shown = key[:8] + "*" * max(0, len(key) - 12) + key[-4:] if len(key) > 12 else "***"
            raise StripeAPIError(401, f"Invalid API Key provided: {shown}", stored=False)
        return key

    def _params(
        self, method: str, query: str, headers: Mapping[str, str], body: bytes
    ) -> dict[str, Any]:
        if method != "POST" or not body:
            return parse_form(query)
        content_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type not in ("", "application/x-www-form-urlencoded"):
            raise StripeAPIError(
                400,
                "Send parameters form-encoded (application/x-www-form-urlencoded).",
                stored=False,
            )
        try:
            text = body.decode()
        except UnicodeDecodeError:
            raise StripeAPIError(400, "The request body is not UTF-8.", stored=False) from None
        return parse_form(text)

    def _idempotent(
        self,
        route: _Route,
        object_id: str,
        params: Params,
        out: dict[str, str],
        *,
        api_key: str,
        key: str,
    ) -> Answer:
        fault = self.faults.take(route.method, route.path(object_id), gates=False)
        if isinstance(fault, Fault) and not fault.takes_effect:
            # The request never reached the endpoint: nothing executed, nothing saved.
            return self._fault_answer(route.name, fault, None, out)
        try:
            check_key(key)
        except StripeAPIError as error:
            self._count(route.name, error.status)
            return _error_answer(error, out)
        endpoint = f"{route.method} {route.path(object_id)}"
        outcome = self.keys.claim(
            api_key,
            key,
            endpoint=endpoint,
            fingerprint=fingerprint(route.method, endpoint, params.data),
            now=self.clock.now(),
        )
        early = self._without_execution(outcome, route.name, endpoint, key, out)
        if early is None:
            return self._run(route, object_id, params, out, api_key=api_key, key=key, fault=fault)
        if isinstance(fault, Fault):
            # The network fails a replay or a refusal as readily as a first answer.
            return self._fault_answer(route.name, fault, early, out)
        return early

    def _without_execution(
        self, outcome: Outcome, route: str, endpoint: str, key: str, out: dict[str, str]
    ) -> Answer | None:
        """The answer to a request whose key is not its own to execute; ``None`` if it is."""
        match outcome:
            case Replay(response=saved):
                self._count(route, saved.status, replayed=True)
                headers = {
                    **out,
                    "Idempotent-Replayed": "true",
                    "Original-Request": saved.request_id,
                }
                return Answer(saved.status, saved.body, headers)
            case InFlight():
                self._count(route, 409, in_flight=True)
                conflict = StripeAPIError(
                    409,
                    "There is currently another in-progress request using this idempotency "
                    f"key (the other request is still running): {key}. Try again later.",
                    code="idempotency_key_in_use",
                    stored=False,
                )
                return _error_answer(conflict, out)
            case Mismatch(other_endpoint=other):
                self._count(route, 400, mismatch=True)
                if other is not None:
                    message = (
                        "Keys for idempotent requests can only be used for the same endpoint "
                        f"they were first used for ({other} vs {endpoint}). Try a key other "
                        f"than '{key}' if you meant to execute a different request."
                    )
                else:
                    message = (
                        "Keys for idempotent requests can only be used with the same "
                        f"parameters they were first used with. Try a key other than '{key}' "
                        "if you meant to execute a different request."
                    )
                refusal = StripeAPIError(400, message, type="idempotency_error", stored=False)
                return _error_answer(refusal, out)
            case Claimed():
                return None

    def _run(
        self,
        route: _Route,
        object_id: str,
        params: Params,
        out: dict[str, str],
        *,
        api_key: str,
        key: str | None,
        fault: Fault | Gate | None = None,
    ) -> Answer:
        path = route.path(object_id)
        if key is None:
            fault = self.faults.take(route.method, path, gates=False)
            if isinstance(fault, Fault) and not fault.takes_effect:
                return self._fault_answer(route.name, fault, None, out)
        gate = self.faults.take(route.method, path, gates=True)
        if isinstance(gate, Gate):
            self._count_fault("pause")
            gate.hold(_GATE_TIMEOUT)
        ctx = RequestContext(
            now=self.clock.now(), request_id=out["Request-Id"], idempotency_key=key
        )
        saved = True
        try:
            payload = route.handler(self.account, params, ctx, object_id)
            answer = Answer(200, _encode(payload), out)
        except StripeAPIError as error:
            saved = error.stored
            answer = _error_answer(error, out)
        except Exception:
            # A bug of the simulator: answer like Stripe's 500, keep the key free for a retry.
            logger.exception("the simulator failed on %s", route.name)
            saved = False
            answer = _error_answer(
                StripeAPIError(500, "An unexpected error occurred.", type="api_error"), out
            )
        if isinstance(fault, Fault):
            answer = self._fault_answer(route.name, fault, answer, out)
        if key is not None:
            if saved:
                self.keys.save(
                    api_key, key, SavedResponse(answer.status, answer.body, out["Request-Id"])
                )
            else:
                self.keys.release(api_key, key)
        if answer.action == "reply":
            self._count(route.name, answer.status)
        return answer

    def _fault_answer(
        self, route: str, fault: Fault, executed: Answer | None, out: dict[str, str]
    ) -> Answer:
        """The answer a fault turns a request into; ``executed`` is the real one, if it ran."""
        self._count_fault(fault.kind)
        if fault.kind == "error":
            injected = StripeAPIError(
                fault.status,
                "An error occurred with our connection to Stripe (injected by the simulator).",
                type="api_error",
            )
            answer = _error_answer(injected, out)
            if executed is None:
                self._count(route, answer.status)
            return answer
        # The connection is cut or held: the status is only what the idempotency key saves.
        base = executed or Answer(0, b"", out)
        return Answer(
            base.status,
            base.body,
            base.headers,
            action=fault.kind,
            hold_seconds=fault.seconds if fault.kind == "hang" else 0.0,
        )
