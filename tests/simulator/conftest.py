"""Fixtures for the simulator's tests: a simulator, a stripe client on it, a webhook receiver."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import stripe

from idempay.core.signature import verify_signature
from idempay.testing.simulator import DeliveryPolicy, StripeSimulator, WebhookEndpoint

SECRET = "whsec_simulator_tests"


@dataclass(frozen=True)
class Delivery:
    """One webhook request as the receiver got it."""

    body: bytes
    headers: dict[str, str]
    status: int


@dataclass
class Receiver:
    """A real HTTP endpoint that checks every delivery's signature and records it.

    ``answer`` decides the status of each delivery from the raw body and how many times that
    body was seen before (0 for the first time); 200 by default. ``forward``, when set, is
    called instead with the body and the headers (lower-case names): an application's handler.
    """

    secrets: tuple[str, ...] = (SECRET,)
    now: Callable[[], float] = field(default=lambda: 0.0)
    answer: Callable[[bytes, int], int] = field(default=lambda _body, _seen: 200)
    forward: Callable[[bytes, dict[str, str]], int] | None = None
    deliveries: list[Delivery] = field(default_factory=list)
    bad_signatures: int = 0
    _seen: dict[bytes, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def handle(self, body: bytes, headers: dict[str, str]) -> int:
        try:
            verify_signature(body, headers.get("stripe-signature"), self.secrets, now=self.now())
        except Exception:  # noqa: BLE001 - any refusal is counted, and answered 400
            with self._lock:
                self.bad_signatures += 1
            return 400
        with self._lock:
            seen = self._seen.get(body, 0)
            self._seen[body] = seen + 1
        if self.forward is not None:
            status = self.forward(body, headers)
        else:
            status = self.answer(body, seen)
        with self._lock:
            self.deliveries.append(Delivery(body, headers, status))
        return status

    def accepted(self) -> list[Delivery]:
        with self._lock:
            return [d for d in self.deliveries if 200 <= d.status < 300]


def _serve(receiver: Receiver) -> Iterator[Receiver]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            headers = {name.lower(): value for name, value in self.headers.items()}
            status = receiver.handle(body, headers)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    receiver.url = f"http://127.0.0.1:{server.server_address[1]}/stripe/webhook"
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    """A webhook endpoint on a free loopback port (its clock is set by the simulator fixtures)."""
    yield from _serve(Receiver())


@pytest.fixture
def second_receiver() -> Iterator[Receiver]:
    """Another webhook endpoint, for tests with two."""
    yield from _serve(Receiver())


@pytest.fixture
def sim() -> Iterator[StripeSimulator]:
    """A simulator with no webhook endpoint."""
    with StripeSimulator() as simulator:
        yield simulator


@pytest.fixture
def make_sim(receiver: Receiver) -> Iterator[Callable[..., StripeSimulator]]:
    """Start simulators whose webhooks go to ``receiver``; every one is closed at the end."""
    started: list[StripeSimulator] = []

    def make(policy: DeliveryPolicy | None = None, **options: Any) -> StripeSimulator:
        simulator = StripeSimulator(
            webhook_endpoints=[WebhookEndpoint(receiver.url, SECRET)],
            delivery=policy,
            **options,
        )
        simulator.start()
        receiver.now = simulator.now
        started.append(simulator)
        return simulator

    yield make
    for simulator in started:
        simulator.close()


@dataclass
class Clients:
    """stripe clients on one server, closed together."""

    base: str
    opened: list[stripe.HTTPXClient] = field(default_factory=list)

    def __call__(self, api_key: str = "sk_test_simulator", **options: Any) -> stripe.StripeClient:
        http = stripe.HTTPXClient(timeout=options.pop("timeout", 10.0), allow_sync_methods=True)
        self.opened.append(http)
        return stripe.StripeClient(
            api_key,
            base_addresses={"api": self.base},
            max_network_retries=0,
            http_client=http,
            **options,
        )

    def close(self) -> None:
        for http in self.opened:
            http.close()


@pytest.fixture
def clients(sim: StripeSimulator) -> Iterator[Clients]:
    """Make stripe clients on ``sim`` (any ``sk_test_`` key)."""
    made = Clients(sim.url)
    yield made
    made.close()


@pytest.fixture
def client(clients: Clients) -> stripe.StripeClient:
    """The official stripe client, pointed at ``sim``, without automatic retries."""
    return clients()
