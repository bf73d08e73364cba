"""The :class:`StripeSimulator`: the account, the API, the webhook sender and the HTTP server,
with a control surface in Python and over HTTP (under ``/_sim/``)."""

from __future__ import annotations

import json
import threading
from collections.abc import Collection, Iterable, Mapping
from types import TracebackType
from typing import Any, Final
from urllib.parse import parse_qsl, urlencode, urlsplit

from idempay.clock import Clock
from idempay.errors import ConfigurationError, IdempayError
from idempay.testing.simulator._api import Answer, Api
from idempay.testing.simulator._clock import SimClock
from idempay.testing.simulator._errors import StripeAPIError
from idempay.testing.simulator._faults import Fault, FaultKind, Gate
from idempay.testing.simulator._server import SimulatorHTTPServer
from idempay.testing.simulator._stripe import JSON, Account
from idempay.testing.simulator._webhooks import (
    DeliveryPolicy,
    DeliveryStats,
    WebhookEndpoint,
    WebhookSender,
)

__all__ = ["DEFAULT_API_KEY", "DEFAULT_API_VERSION", "StripeSimulator"]

DEFAULT_API_KEY: Final = "sk_test_idempay_simulator"
"""The key :attr:`StripeSimulator.api_key` names when no ``api_keys`` are given."""

DEFAULT_API_VERSION: Final = "2025-03-31.basil"
"""The API version events are rendered with (and answered when a request names none)."""


class StripeSimulator:
    """A Stripe API server for tests, on a loopback port of its own. Thread-safe.

    ::

        with StripeSimulator(webhook_endpoints=[WebhookEndpoint(url, "whsec_test")], seed=1) as sim:
            client = stripe.StripeClient(sim.api_key, base_addresses={"api": sim.url})
            intent = client.v1.payment_intents.create(params={...})
            sim.flush_webhooks()

    Args:
        host: the address to listen on (loopback by default; it has no authentication).
        port: the port; 0 picks a free one (see :attr:`url`).
        api_keys: the secret keys accepted; by default any test-mode key
            (``sk_test_...``) is, and :attr:`api_key` is :data:`DEFAULT_API_KEY`.
        webhook_endpoints: endpoints that receive every event from the start.
        delivery: the webhook :class:`DeliveryPolicy` (default: each event once, retried).
        seed: seeds every random choice of the webhook sender (ids are always random).
        clock: the base clock (a :class:`~idempay.clock.FrozenClock` to share time with the
            code under test); :meth:`advance_clock` moves the simulator's time further.
        api_version: the version events are rendered with.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_keys: Collection[str] = (),
        webhook_endpoints: Iterable[WebhookEndpoint] = (),
        delivery: DeliveryPolicy | None = None,
        seed: int | None = None,
        clock: Clock | None = None,
        api_version: str = DEFAULT_API_VERSION,
    ) -> None:
        if isinstance(api_keys, str):
            raise ConfigurationError("api_keys is a collection of keys, not a single string")
        self.clock = SimClock(clock)
        self.sender = WebhookSender(
            self.clock,
            policy=delivery or DeliveryPolicy(),
            seed=seed,
            on_delivered=self._acknowledged,
        )
        self.account = Account(self.clock, api_version=api_version, publish=self.sender.publish)
        self.api = Api(self.account, clock=self.clock, api_keys=api_keys, api_version=api_version)
        for endpoint in webhook_endpoints:
            self.sender.add_endpoint(endpoint)
        self.api_key = next(iter(api_keys), DEFAULT_API_KEY)
        self._address = (host, port)
        self._server: SimulatorHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._gates: list[Gate] = []

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> StripeSimulator:
        """Bind and serve in a background thread; returns ``self``."""
        if self._server is not None:
            raise ConfigurationError("the simulator is already started")
        server = SimulatorHTTPServer(self._address, self._dispatch)
        self._server = server
        self.account.base_url = self.url
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="idempay-sim-server",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop serving, cut open connections, release gates and stop the webhook workers."""
        for gate in self._gates:
            gate.release()
        self.sender.close()
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        server.close_all()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> StripeSimulator:
        return self.start() if self._server is None else self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def port(self) -> int:
        """The port served on (once started)."""
        if self._server is None:
            raise ConfigurationError("the simulator is not started")
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        """The base URL to give the ``stripe`` library (``base_addresses={"api": url}``)."""
        host = self._address[0]
        shown = f"[{host}]" if ":" in host else host
        return f"http://{shown}:{self.port}"

    # -- webhooks ----------------------------------------------------------------------------

    def add_webhook_endpoint(
        self, url: str, secret: str, *, enabled_events: tuple[str, ...] = ("*",)
    ) -> WebhookEndpoint:
        """Send every later event (of ``enabled_events``) to ``url``, signed with ``secret``."""
        endpoint = WebhookEndpoint(url, secret, enabled_events)
        self.sender.add_endpoint(endpoint)
        return endpoint

    def flush_webhooks(self, timeout: float = 30.0) -> DeliveryStats:
        """Release held reorder windows and wait until every delivery is done.

        Raises:
            TimeoutError: deliveries still going on after ``timeout`` seconds.
        """
        return self.sender.flush(timeout)

    def wait_webhooks_idle(self, timeout: float = 30.0) -> bool:
        """Wait until no delivery is waiting or in flight; ``False`` on timeout."""
        return self.sender.wait_idle(timeout)

    def webhook_stats(self) -> DeliveryStats:
        """What the webhook sender did so far."""
        return self.sender.stats()

    def _acknowledged(self, event_id: str) -> None:
        self.account.acknowledged(event_id)

    # -- what happens outside the API ----------------------------------------------------------

    def release_debit(
        self, intent_id: str, *, succeed: bool = True, failure_code: str = "insufficient_funds"
    ) -> JSON:
        """Clear (or, with ``succeed=False``, bounce) a bank debit that is ``processing``.

        Emits the events Stripe would: ``charge.succeeded`` and ``payment_intent.succeeded``,
        or ``charge.failed`` and ``payment_intent.payment_failed``. Returns the PaymentIntent.

        Raises:
            StripeAPIError: no such PaymentIntent, or it is not processing.
        """
        return self.account.release_debit(
            intent_id, succeed=succeed, failure_code=failure_code, now=self.clock.now()
        )

    def complete_authentication(self, intent_id: str, *, succeed: bool = True) -> JSON:
        """The customer passes (or fails) 3-D Secure for a PaymentIntent in
        ``requires_action``. Returns the PaymentIntent.

        Raises:
            StripeAPIError: no such PaymentIntent, or it is not waiting for an authentication.
        """
        return self.account.authenticate(intent_id, succeed=succeed, now=self.clock.now())

    def advance_clock(self, seconds: float) -> float:
        """Move the simulated time forward (key expiry, ``created``, signatures); returns it."""
        return self.clock.advance(seconds)

    def now(self) -> float:
        """The simulated time, in Unix seconds."""
        return self.clock.now()

    # -- faults --------------------------------------------------------------------------------

    def inject(self, fault: Fault, *, path: str, method: str = "POST", times: int = 1) -> None:
        """Make the next ``times`` requests to ``method path`` fail with ``fault``."""
        self.api.faults.add(fault, method=method, path=path, times=times)

    def fail_next(
        self,
        path: str,
        *,
        method: str = "POST",
        status: int = 500,
        times: int = 1,
        applied: bool = False,
    ) -> None:
        """Answer the next requests with an HTTP error (``api_error``); ``applied=True``
        executes them first and saves the error under their idempotency key, as Stripe does."""
        self.inject(
            Fault("error", status=status, applied=applied), path=path, method=method, times=times
        )

    def hang_next(
        self,
        path: str,
        *,
        method: str = "POST",
        seconds: float = 30.0,
        times: int = 1,
        applied: bool = True,
    ) -> None:
        """Hold the next requests unanswered for ``seconds``, then close: a client timeout.
        With ``applied`` (the default) the request took effect, and its response is saved
        under its idempotency key."""
        self.inject(
            Fault("hang", seconds=seconds, applied=applied), path=path, method=method, times=times
        )

    def reset_next(
        self, path: str, *, method: str = "POST", times: int = 1, applied: bool = True
    ) -> None:
        """Reset the connection of the next requests without an answer. With ``applied`` (the
        default) each takes effect first: committed at Stripe, the response lost on the way,
        and saved under the idempotency key for the retry."""
        self.inject(Fault("reset", applied=applied), path=path, method=method, times=times)

    def pause_next(self, path: str, *, method: str = "POST") -> Gate:
        """Hold the next matching request after it claimed its idempotency key, before it
        executes, until ``gate.release()``: a request provably in flight."""
        gate = Gate()
        self._gates.append(gate)
        self.api.faults.add(gate, method=method, path=path, times=1)
        return gate

    def clear_faults(self) -> None:
        """Drop every fault not yet triggered (and release waiting gates)."""
        for gate in self.api.faults.clear():
            gate.release()

    # -- inspection ----------------------------------------------------------------------------

    def payment_intents(self) -> list[JSON]:
        """Every PaymentIntent, oldest first."""
        return self.account.snapshot("payment_intents")

    def charges(self) -> list[JSON]:
        """Every Charge, oldest first."""
        return self.account.snapshot("charges")

    def refunds(self) -> list[JSON]:
        """Every Refund, oldest first."""
        return self.account.snapshot("refunds")

    def events(self) -> list[JSON]:
        """Every event, oldest first."""
        return self.account.snapshot("events")

    def stats(self) -> JSON:
        """Counters: API requests, statuses, replays, conflicts, faults, objects, webhooks."""
        return {
            "api": self.api.stats().as_dict(),
            "objects": self.account.counts(),
            "idempotency_keys": len(self.api.keys),
            "webhooks": self.sender.stats().as_dict(),
        }

    def reset(self) -> None:
        """Forget every object, event, key, fault, waiting delivery and counter; reseed the
        RNG and drop clock advances. Webhook endpoints stay registered."""
        for gate in self.api.reset():
            gate.release()
        self.account.reset()
        self.sender.reset()
        self.clock.reset()

    # -- HTTP ----------------------------------------------------------------------------------

    def _dispatch(self, method: str, target: str, headers: dict[str, str], body: bytes) -> Answer:
        if target.startswith("/_sim/") or target == "/_sim":
            return _Control(self).handle(method, target, body)
        return self.api.handle(method, target, headers, body)


_JSON_HEADERS: Final = {"Content-Type": "application/json"}


def _json_answer(status: int, payload: Any) -> Answer:
    return Answer(status, (json.dumps(payload, indent=2) + "\n").encode(), _JSON_HEADERS)


class _Control:
    """The control API: JSON in and out, under ``/_sim/``, no authentication (loopback)."""

    def __init__(self, sim: StripeSimulator) -> None:
        self.sim = sim

    def handle(self, method: str, target: str, body: bytes) -> Answer:
        parts = urlsplit(target)
        segments = [segment for segment in parts.path.split("/") if segment][1:]
        try:
            data = self._body(body)
            return self._route(method, segments, data, dict(parse_qsl(parts.query)))
        except StripeAPIError as error:
            return _json_answer(error.status, error.body())
        except (IdempayError, TimeoutError, ValueError, TypeError, KeyError) as error:
            return _json_answer(
                400, {"error": {"type": "invalid_request_error", "message": str(error)}}
            )

    @staticmethod
    def _body(body: bytes) -> dict[str, Any]:
        if not body.strip():
            return {}
        data = json.loads(body)
        if not isinstance(data, dict):
            raise ValueError("the control API takes a JSON object")
        return data

    def _route(  # noqa: PLR0911 - one flat table of calls reads best
        self, method: str, path: list[str], data: dict[str, Any], query: Mapping[str, str]
    ) -> Answer:
        sim = self.sim
        match (method, path):
            case ("GET", ["health"]):
                return _json_answer(200, {"ok": True, "url": sim.url})
            case ("GET", ["stats"]):
                return _json_answer(200, sim.stats())
            case ("POST", ["reset"]):
                sim.reset()
                return _json_answer(200, {"ok": True})
            case ("POST", ["clock", "advance"]):
                return _json_answer(200, {"now": sim.advance_clock(float(data["seconds"]))})
            case ("POST", ["payment_intents", intent_id, "release"]):
                outcome = _outcome(data.get("outcome", "succeeded"))
                code = str(data.get("failure_code", "insufficient_funds"))
                return _json_answer(
                    200, sim.release_debit(intent_id, succeed=outcome, failure_code=code)
                )
            case ("POST", ["payment_intents", intent_id, "authenticate"]):
                outcome = _outcome(data.get("outcome", "succeeded"))
                return _json_answer(200, sim.complete_authentication(intent_id, succeed=outcome))
            case ("GET", ["3ds", intent_id]):
                return self._three_d_secure(intent_id, query)
            case ("POST", ["faults"]):
                return self._add_fault(data)
            case ("DELETE", ["faults"]):
                sim.clear_faults()
                return _json_answer(200, {"ok": True})
            case ("GET", ["webhook_endpoints"]):
                endpoints = [
                    {"url": e.url, "enabled_events": list(e.enabled_events)}
                    for e in sim.sender.endpoints()
                ]
                return _json_answer(200, {"data": endpoints})
            case ("POST", ["webhook_endpoints"]):
                events = tuple(data.get("enabled_events", ("*",)))
                endpoint = sim.add_webhook_endpoint(
                    str(data["url"]), str(data["secret"]), enabled_events=events
                )
                return _json_answer(200, {"url": endpoint.url})
            case ("POST", ["webhooks", "flush"]):
                stats = sim.flush_webhooks(float(data.get("timeout", 30.0)))
                return _json_answer(200, stats.as_dict())
        return _json_answer(
            404, {"error": {"type": "invalid_request_error", "message": "no such control call"}}
        )

    def _add_fault(self, data: dict[str, Any]) -> Answer:
        kind: FaultKind = data["kind"]
        applied = data.get("applied")
        fault = Fault(
            kind,
            status=int(data.get("status", 500)),
            seconds=float(data.get("seconds", 30.0)),
            applied=None if applied is None else bool(applied),
        )
        self.sim.inject(
            fault,
            path=str(data["path"]),
            method=str(data.get("method", "POST")),
            times=int(data.get("times", 1)),
        )
        return _json_answer(200, {"ok": True})

    def _three_d_secure(self, intent_id: str, query: Mapping[str, str]) -> Answer:
        # The page a customer's browser is sent to by next_action: ?outcome= decides.
        outcome = query.get("outcome")
        if outcome is None:
            page = (
                "<!doctype html><title>3-D Secure (simulated)</title>"
                '<p><a href="?outcome=succeeded">Complete</a> '
                '<a href="?outcome=failed">Fail</a></p>'
            )
            return Answer(200, page.encode(), {"Content-Type": "text/html; charset=utf-8"})
        return_url = self.sim.account.return_url(intent_id)
        intent = self.sim.complete_authentication(intent_id, succeed=_outcome(outcome))
        if return_url is None:
            return _json_answer(200, intent)
        separator = "&" if "?" in return_url else "?"
        query_string = urlencode(
            {
                "payment_intent": intent["id"],
                "payment_intent_client_secret": intent["client_secret"],
            }
        )
        return Answer(302, b"", {"Location": f"{return_url}{separator}{query_string}"})


def _outcome(value: object) -> bool:
    if value not in ("succeeded", "failed"):
        raise ValueError("outcome is 'succeeded' or 'failed'")
    return value == "succeeded"
