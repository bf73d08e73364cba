"""``python -m idempay.testing.simulator``: serve the Stripe simulator until interrupted.

Prints ``LISTENING <url>`` once it accepts connections, so that a script can wait for that
line. Stop it with Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType

from idempay.testing.simulator._simulator import DEFAULT_API_KEY, StripeSimulator
from idempay.testing.simulator._webhooks import DeliveryPolicy, WebhookEndpoint


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m idempay.testing.simulator",
        description="A Stripe API simulator (PaymentIntents, refunds, events, signed webhooks).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=12111, help="port (0: any free one)")
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        help=f"accepted secret key (repeatable; default: any sk_test_ key, {DEFAULT_API_KEY})",
    )
    parser.add_argument("--webhook", action="append", default=[], help="endpoint URL (repeatable)")
    parser.add_argument(
        "--secret",
        action="append",
        default=[],
        help="signing secret, one per --webhook in order, or one for all",
    )
    parser.add_argument("--seed", type=int, default=None, help="seed of the delivery policy")
    parser.add_argument("--duplicate-probability", type=float, default=0.0)
    parser.add_argument("--duplicate-copies", type=int, default=1)
    parser.add_argument("--drop-probability", type=float, default=0.0)
    parser.add_argument("--max-delay-ms", type=int, default=0)
    parser.add_argument("--reorder-window", type=int, default=1)
    parser.add_argument("--max-attempts", type=int, default=3)
    parser.add_argument("--retry-backoff-ms", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=4)
    return parser


def _endpoints(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[WebhookEndpoint]:
    urls: list[str] = args.webhook
    secrets: list[str] = args.secret
    if urls and not secrets:
        parser.error("--webhook needs --secret")
    if len(secrets) not in (1, len(urls)):
        parser.error("give one --secret for all webhooks, or one per --webhook")
    paired = secrets * len(urls) if len(secrets) == 1 else secrets
    return [WebhookEndpoint(url, secret) for url, secret in zip(urls, paired, strict=True)]


def main(argv: Sequence[str] | None = None) -> int:
    """Run the simulator until SIGINT or SIGTERM."""
    parser = _parser()
    args = parser.parse_args(argv)
    policy = DeliveryPolicy(
        duplicate_probability=args.duplicate_probability,
        duplicate_copies=args.duplicate_copies,
        drop_probability=args.drop_probability,
        max_delay_ms=args.max_delay_ms,
        reorder_window=args.reorder_window,
        max_attempts=args.max_attempts,
        retry_backoff_ms=args.retry_backoff_ms,
        concurrency=args.concurrency,
    )
    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    simulator = StripeSimulator(
        host=args.host,
        port=args.port,
        api_keys=args.api_key,
        webhook_endpoints=_endpoints(parser, args),
        delivery=policy,
        seed=args.seed,
    )
    with simulator as sim:
        print(f"LISTENING {sim.url}", flush=True)  # noqa: T201 - the line scripts wait for
        stop.wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
