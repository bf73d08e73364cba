"""``idempay demo``: the FastAPI example shop under a storm, measured from the running system.

It starts the Stripe simulator and the example shop (``examples/fastapi/serve.sh``, several
uvicorn workers, SQLite and the in-process lock by default), then drives a storm through real
HTTP: every order clicked one to three times at once, bank debits released later, every webhook
duplicated, delayed and reordered by the simulator, some never delivered at all, and one worker
killed and restarted midway. Then ``idempay reconcile`` makes up for the lost webhooks from
Stripe's records. At the end it reads every order back from the shop and every PaymentIntent
and charge from the simulator, and checks the invariants: one PaymentIntent and at most one
charge per order, the order's state matching Stripe's, one receipt per paid order, intact audit
trails, no 5xx.
"""

from __future__ import annotations

import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

from idempay.errors import ConfigurationError

__all__ = ["DemoOptions", "DemoReport", "run_demo"]

PAYMENT_METHODS: Final = (
    ("pm_card_visa", 0.6),
    ("pm_card_chargeDeclined", 0.15),
    ("pm_sepa_debit", 0.25),
)
"""What the customers pay with: cards that succeed, cards that are declined, bank debits that
stay processing until the bank answers (most succeed, some bounce)."""

_HTTP_TIMEOUT: Final = 30.0
_GIVE_UP_AFTER: Final = 90.0


@dataclass(frozen=True)
class DemoOptions:
    """What to run: how many orders, how many server workers, on which stores."""

    orders: int = 300
    workers: int = 3
    clients: int = 24
    database_url: str | None = None
    lock_url: str = "memory://"
    seed: int = 7
    lose: float = 0.05
    """The share of webhooks that never arrive (the reconciler makes up for them)."""
    kill_worker: bool = True


@dataclass
class DemoReport:
    """What the demo measured; ``violations`` lists every broken invariant."""

    orders: int = 0
    clicks: int = 0
    clicks_absorbed: int = 0
    payment_intents: int = 0
    charges: int = 0
    deliveries: int = 0
    duplicates_absorbed: int = 0
    stale_ignored: int = 0
    paid: int = 0
    payment_failed: int = 0
    effects_sent: int = 0
    audit_steps: int = 0
    workers_restarted: int = 0
    webhooks_lost: int = 0
    reconciled: int = 0
    seconds: float = 0.0
    violations: list[str] = field(default_factory=list)

    def rows(self) -> list[tuple[str, int]]:
        """The table the command prints."""
        return [
            ("orders", self.orders),
            ("checkout clicks", self.clicks),
            ("duplicate clicks absorbed", self.clicks_absorbed),
            ("PaymentIntents", self.payment_intents),
            ("charges", self.charges),
            ("orders paid", self.paid),
            ("orders payment_failed", self.payment_failed),
            ("webhook deliveries", self.deliveries),
            ("duplicate deliveries absorbed", self.duplicates_absorbed),
            ("stale events ignored", self.stale_ignored),
            ("effects sent", self.effects_sent),
            ("audit steps", self.audit_steps),
            ("workers killed and restarted", self.workers_restarted),
            ("webhooks never delivered", self.webhooks_lost),
            ("orders healed by the reconciler", self.reconciled),
            ("invariant violations", len(self.violations)),
        ]

    def summary(self) -> str:
        """One ``key=value`` line, ``violations=`` first, for scripts."""
        pairs = {
            "violations": len(self.violations),
            "orders": self.orders,
            "clicks": self.clicks,
            "clicks_absorbed": self.clicks_absorbed,
            "payment_intents": self.payment_intents,
            "charges": self.charges,
            "paid": self.paid,
            "payment_failed": self.payment_failed,
            "deliveries": self.deliveries,
            "duplicates_absorbed": self.duplicates_absorbed,
            "stale_ignored": self.stale_ignored,
            "effects_sent": self.effects_sent,
            "audit_steps": self.audit_steps,
            "workers_restarted": self.workers_restarted,
            "webhooks_lost": self.webhooks_lost,
            "reconciled": self.reconciled,
            "seconds": f"{self.seconds:.1f}",
        }
        return " ".join(f"{key}={value}" for key, value in pairs.items())


@dataclass
class _Order:
    order_id: str
    key: str
    method: str
    clicks: int
    statuses: list[int] = field(default_factory=list)
    intent: str | None = None


def find_example() -> Path:
    """``examples/fastapi/serve.sh`` of the source tree this package runs from, or of the
    current directory."""
    here = Path(__file__).resolve()
    for root in (*here.parents, Path.cwd()):
        script = root / "examples" / "fastapi" / "serve.sh"
        if script.is_file():
            return script
    raise ConfigurationError(
        "idempay demo runs the example shop of a source checkout (examples/fastapi): "
        "run it from the repository, with `make demo`"
    )


def run_demo(options: DemoOptions, out: IO[str] | None = None) -> DemoReport:
    """Run the storm and return what it measured (never raises for a violated invariant)."""
    import httpx

    from idempay.testing.simulator import DeliveryPolicy, StripeSimulator, WebhookEndpoint

    out = out or sys.stdout
    report = DemoReport(orders=options.orders)
    rng = random.Random(options.seed)  # noqa: S311 - a reproducible storm, not a secret
    run = secrets.token_hex(3)
    started = time.monotonic()
    port = _free_port()
    secret = f"whsec_{secrets.token_hex(16)}"
    policy = DeliveryPolicy(
        drop_probability=options.lose,
        duplicate_probability=1.0,
        duplicate_copies=2,
        max_delay_ms=250,
        reorder_window=12,
        reorder_linger_ms=150,
        max_attempts=8,
        retry_backoff_ms=200,
        concurrency=8,
    )
    endpoint = WebhookEndpoint(f"http://127.0.0.1:{port}/stripe/webhook", secret)
    with (
        tempfile.TemporaryDirectory(prefix="idempay-demo-") as tmp,
        StripeSimulator(webhook_endpoints=[endpoint], delivery=policy, seed=options.seed) as sim,
    ):
        env = {
            "IDEMPAY_DATABASE_URL": options.database_url or f"sqlite:///{tmp}/shop.db",
            "IDEMPAY_LOCK_URL": options.lock_url,
            "STRIPE_API_KEY": sim.api_key,
            "STRIPE_API_BASE": sim.url,
            "STRIPE_WEBHOOK_SECRET": secret,
            # A checkout whose worker dies is taken over after its lease: 5 s, not 30, here.
            "IDEMPAY_LEASE_SECONDS": "5",
        }
        orders = _plan(options.orders, run, rng)
        report.clicks = sum(o.clicks for o in orders)
        with (
            _server(find_example(), port, options.workers, env, Path(tmp)) as server,
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=_HTTP_TIMEOUT) as http,
        ):
            out.write(
                f"idempay demo: {options.orders} orders, {report.clicks} clicks, "
                f"{options.workers} workers, webhooks delivered 3 times, delayed and "
                f"reordered, {options.lose:.0%} not at all\n"
            )
            kill_at = report.clicks // 2 if options.kill_worker else -1
            _storm(
                http,
                orders,
                options.clients,
                _Progress(out, report.clicks, "checkouts"),
                on_click=lambda n: _kill_worker(server, report) if n == kill_at else None,
            )
            # The bank answers the debits: most clear, some bounce.
            for order in orders:
                if order.method == "pm_sepa_debit" and order.intent is not None:
                    sim.release_debit(order.intent, succeed=rng.random() < 0.8)
            out.write("waiting for the last webhook deliveries...\n")
            stats = sim.flush_webhooks(timeout=180)
            report.webhooks_lost = stats.dropped
            out.write("idempay reconcile: making up for the webhooks that never arrived...\n")
            report.reconciled = _reconcile(find_example().parent, env, report)
            views = _settle(http, orders, _Progress(out, len(orders), "orders settled"))
            _measure(report, orders, views, sim, stats)
    report.seconds = time.monotonic() - started
    return report


def _reconcile(shop: Path, env: dict[str, str], report: DemoReport) -> int:
    """Run ``idempay reconcile`` on the shop, as an operator would (with the shop's own guard,
    so that the orders it pays get their receipt); return how many orders it changed."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "idempay",
            "reconcile",
            "--older-than",
            "0",
            "--app",
            "shop:build_guard",
            "--json",
        ],
        cwd=shop,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        report.violations.append(f"idempay reconcile exited {done.returncode}: {done.stderr}")
        return 0
    result: dict[str, Any] = json.loads(done.stdout)
    return int(result["results"]["changed"])


def _plan(count: int, run: str, rng: random.Random) -> list[_Order]:
    methods = [m for m, _ in PAYMENT_METHODS]
    weights = [w for _, w in PAYMENT_METHODS]
    return [
        _Order(
            order_id=f"demo-{run}-{n:05d}",
            key=f"key-{run}-{n:05d}-{secrets.token_hex(4)}",
            method=rng.choices(methods, weights)[0],
            clicks=rng.choice((1, 2, 2, 3)),
        )
        for n in range(count)
    ]


def _storm(
    http: Any,
    orders: list[_Order],
    clients: int,
    progress: _Progress,
    *,
    on_click: Callable[[int], None],
) -> None:
    # An order's clicks sit next to each other in the queue, so that they run at once.
    clicks = [order for order in orders for _ in range(order.clicks)]
    done = 0
    lock = threading.Lock()

    def click(order: _Order) -> None:
        nonlocal done
        status, body = _checkout(http, order)
        with lock:
            order.statuses.append(status)
            if status == 201 and order.intent is None:
                order.intent = body.get("payment_intent_id")
            done += 1
            count = done
        progress.update(count)
        on_click(count)

    with ThreadPoolExecutor(clients) as pool:
        for _ in pool.map(click, clicks):
            pass
    progress.finish()


def _checkout(http: Any, order: _Order) -> tuple[int, dict[str, Any]]:
    """One click, retried like a careful client: the same key after a dropped connection (a
    killed worker), and after a 409 or 503 once ``Retry-After`` has passed."""
    import httpx

    body = {"order_id": order.order_id, "amount": 2500, "currency": "eur"}
    body["payment_method"] = order.method
    deadline = time.monotonic() + _GIVE_UP_AFTER
    status = 0
    while time.monotonic() < deadline:
        try:
            response = http.post(
                "/checkout",
                content=json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "Idempotency-Key": order.key},
            )
        except httpx.TransportError:
            status = 0
            time.sleep(0.2)  # the worker died under this request; the next one answers
            continue
        status = response.status_code
        if status in (409, 503):
            time.sleep(min(float(response.headers.get("retry-after", "1")), 5.0))
            continue
        payload: dict[str, Any] = response.json() if status == 201 else {}
        return status, payload
    return status, {}


def _settle(http: Any, orders: list[_Order], progress: _Progress) -> dict[str, dict[str, Any]]:
    """Every order's view, once its effects and every worker's journal are written."""
    views: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 60
    for n, order in enumerate(orders, 1):
        while True:
            response = http.get(f"/orders/{order.order_id}")
            view: dict[str, Any] = response.json() if response.status_code == 200 else {}
            settled = bool(view) and (view["status"] != "paid" or bool(view["effects"]))
            if settled or time.monotonic() > deadline:
                break
            time.sleep(0.1)  # the dispatchers run in the workers: wait for their next round
        views[order.order_id] = view
        progress.update(n)
    progress.finish()
    time.sleep(1.5)  # one more dispatcher round in every worker: their journals are flushed
    for order in orders:
        response = http.get(f"/orders/{order.order_id}")
        if response.status_code == 200:
            views[order.order_id] = response.json()
    return views


def _measure(
    report: DemoReport,
    orders: list[_Order],
    views: dict[str, dict[str, Any]],
    sim: Any,
    stats: Any,
) -> None:
    ours = {o.order_id: o for o in orders}
    intents: dict[str, list[dict[str, Any]]] = {o: [] for o in ours}
    for pi in sim.payment_intents():
        order_id = pi.get("metadata", {}).get("order_id")
        if order_id in intents:
            intents[order_id].append(pi)
    charges: Counter[str] = Counter(
        ch["payment_intent"] for ch in sim.charges() if ch.get("status") == "succeeded"
    )
    steps: Counter[str] = Counter()
    for order_id, order in ours.items():
        view = views.get(order_id) or {}
        report.payment_intents += len(intents[order_id])
        report.violations.extend(_check_order(order, view, intents[order_id], charges))
        if not view:
            continue
        report.charges += sum(charges[pi["id"]] for pi in intents[order_id])
        report.paid += view["status"] == "paid"
        report.payment_failed += view["status"] == "payment_failed"
        report.effects_sent += len(view["effects"])
        report.audit_steps += len(view["audit"])
        steps.update(entry["step"] for entry in view["audit"])
    v = report.violations
    # Every click but the one that started its order was absorbed (replayed, or told to wait).
    report.clicks_absorbed = report.clicks - steps["started"]
    report.duplicates_absorbed = steps["duplicate"]
    report.stale_ignored = steps["ignored_stale"]
    report.deliveries = stats.attempted
    server_errors = {code: n for code, n in stats.status_codes.items() if code.startswith("5")}
    if server_errors:
        v.append(f"webhooks answered 5xx: {server_errors}")
    if stats.failed:
        v.append(f"{stats.failed} webhook deliveries never got a 2xx")


def _check_order(
    order: _Order, view: dict[str, Any], found: list[dict[str, Any]], charges: Counter[str]
) -> list[str]:
    """The invariants of one order, checked against Stripe's side of the story."""
    order_id = order.order_id
    problems = []
    if any(s >= 500 for s in order.statuses):
        problems.append(f"{order_id}: a checkout answered 5xx ({order.statuses})")
    if not view:
        return [*problems, f"{order_id}: the order is missing"]
    if len(found) != 1:
        return [*problems, f"{order_id}: {len(found)} PaymentIntents"]
    intent = found[0]
    if charges[intent["id"]] > 1:
        problems.append(f"{order_id}: {charges[intent['id']]} charges")
    expected = {
        "succeeded": "paid",
        "requires_payment_method": "payment_failed",
        "processing": "processing",
    }.get(intent["status"])
    if view["status"] != expected:
        problems.append(f"{order_id}: order {view['status']}, Stripe says {intent['status']}")
    if view.get("payment_intent_id") != intent["id"]:
        problems.append(f"{order_id}: the order names another PaymentIntent")
    receipts = [e for e in view["effects"] if e["kind"] == "receipt_email"]
    if len(receipts) != (1 if view["status"] == "paid" else 0):
        problems.append(f"{order_id}: {len(receipts)} receipts for a {view['status']} order")
    if not view.get("audit_verified", False):
        problems.append(f"{order_id}: its audit trail does not verify")
    return problems


def _kill_worker(server: _Server, report: DemoReport) -> None:
    """SIGKILL one uvicorn worker in the middle of the storm; uvicorn starts another."""
    workers = server.workers()
    if not workers:
        return
    victim = workers[0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        alive = server.workers()
        if victim not in alive and len(alive) == len(workers):
            report.workers_restarted += 1
            return
        time.sleep(0.05)  # waiting for uvicorn to notice and replace the worker


@dataclass
class _Server:
    process: subprocess.Popen[bytes]
    log: Path

    def workers(self) -> list[int]:
        """The PIDs of uvicorn's worker processes (children of the supervisor)."""
        pid = self.process.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text(encoding="ascii")
        except OSError:
            return []
        return [int(p) for p in children.split() if _is_worker(int(p))]


@contextmanager
def _server(
    script: Path, port: int, workers: int, env: dict[str, str], tmp: Path
) -> Iterator[_Server]:
    import httpx

    log = tmp / "shop.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(  # noqa: S603 - our own example's script
            [str(script), "127.0.0.1", str(port), str(workers)],
            env={**os.environ, "PYTHON": sys.executable, **env},
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = _Server(process, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise ConfigurationError(
                    f"the example shop did not start:\n{log.read_text(errors='replace')}"
                )
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise ConfigurationError("the example shop did not answer within 60 s")
            time.sleep(0.1)  # waiting for the server to bind
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)


class _Progress:
    """A progress bar on a terminal; a few plain lines elsewhere (logs, CI)."""

    def __init__(self, out: IO[str], total: int, label: str) -> None:
        self.out, self.total, self.label = out, max(total, 1), label
        self.tty = out.isatty()
        self._shown = -1
        self._lock = threading.Lock()

    def update(self, done: int) -> None:
        with self._lock:
            if self.tty:
                filled = 30 * done // self.total
                self.out.write(
                    f"\r  [{'#' * filled}{'.' * (30 - filled)}] {done}/{self.total} {self.label}"
                )
                self.out.flush()
            elif (tenth := 10 * done // self.total) > self._shown:
                self._shown = tenth
                self.out.write(f"  {done}/{self.total} {self.label}\n")

    def finish(self) -> None:
        if self.tty:
            self.out.write("\n")


def _is_worker(pid: int) -> bool:
    # uvicorn's workers are multiprocessing children; its resource tracker is one too.
    try:
        return b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
