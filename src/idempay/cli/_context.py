"""What every command shares: exit codes, durations, configuration from flags and the
environment, the guard to work with, and running it whether it is sync or async."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, Final, TypeVar

from idempay.engine import AsyncGuard, Guard, GuardConfig

__all__ = [
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_PROBLEMS",
    "EXIT_UNAVAILABLE",
    "EXIT_USAGE",
    "UsageError",
    "add_app_options",
    "add_database_option",
    "database_url",
    "duration",
    "guard_for",
    "run_with",
]

T = TypeVar("T")

EXIT_OK: Final = 0
EXIT_PROBLEMS: Final = 1
"""The command ran, and found something that needs attention (failed rows, a broken trail,
dead effects)."""
EXIT_USAGE: Final = 2
EXIT_UNAVAILABLE: Final = 3
"""The database or Stripe could not be reached: try again later."""
EXIT_NOT_FOUND: Final = 4

EXIT_CODES_HELP: Final = (
    f"Exit codes: {EXIT_OK} done; {EXIT_PROBLEMS} done, with something that needs attention; "
    f"{EXIT_USAGE} bad usage or configuration; {EXIT_UNAVAILABLE} the database or Stripe is "
    f"unavailable (try again); {EXIT_NOT_FOUND} not found."
)


class UsageError(Exception):
    """A command was called wrongly; the message says how to call it."""


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw]?)$")
_UNIT_SECONDS: Final = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def duration(text: str) -> timedelta:
    """Parse ``90s``, ``15m``, ``2h``, ``3d``, ``1w`` or plain seconds (``0`` included)."""
    match = _DURATION.match(text.strip())
    if match is None:
        msg = "a duration such as 0, 90s, 15m, 2h, 3d or 1w"
        raise argparse.ArgumentTypeError(msg)
    return timedelta(seconds=float(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def add_database_option(parser: argparse.ArgumentParser) -> None:
    """``--database-url``, defaulting to ``$IDEMPAY_DATABASE_URL``."""
    parser.add_argument(
        "--database-url",
        metavar="URL",
        help="SQLAlchemy URL of idempay's database (default: $IDEMPAY_DATABASE_URL)",
    )


def add_app_options(parser: argparse.ArgumentParser, *, effects_optional: bool = True) -> None:
    """``--app MODULE:ATTR`` (default ``$IDEMPAY_APP``) and, where allowed, ``--no-effects``."""
    parser.add_argument(
        "--app",
        metavar="MODULE:ATTR",
        help="your application's guard (a Guard or AsyncGuard, or a function returning one), "
        "with its effects registered; it brings its own stores and Stripe client "
        "(default: $IDEMPAY_APP)",
    )
    if effects_optional:
        parser.add_argument(
            "--no-effects",
            action="store_true",
            help="without --app, build a guard from the environment; only right if your "
            "application registers no effects (orders paid here would get none)",
        )


def database_url(args: argparse.Namespace) -> str:
    """The database URL from ``--database-url`` or ``$IDEMPAY_DATABASE_URL``."""
    url = getattr(args, "database_url", None) or os.environ.get("IDEMPAY_DATABASE_URL")
    if not url:
        raise UsageError("give --database-url or set IDEMPAY_DATABASE_URL")
    return str(url)


def guard_for(args: argparse.Namespace, *, gateway: bool, effects: bool) -> Guard | AsyncGuard:
    """The guard a command works with: the application's (``--app``), else one built from
    the environment. A command that may pay orders (``effects``) refuses to build one without
    the application's effects unless told ``--no-effects``: receipts and fulfilment would
    silently be skipped."""
    spec = getattr(args, "app", None) or os.environ.get("IDEMPAY_APP")
    if spec:
        return load_app(spec)
    if effects and not getattr(args, "no_effects", False):
        raise UsageError(
            "give --app MODULE:ATTR (your guard, with its effects) so that orders paid here "
            "get their effects, or --no-effects if your application registers none"
        )
    return _guard_from_env(args, gateway=gateway)


def load_app(spec: str) -> Guard | AsyncGuard:
    """Import ``MODULE:ATTR`` (from the current directory too) and return its guard; a
    callable attribute is called without arguments. A Django project is set up first when
    ``DJANGO_SETTINGS_MODULE`` is set."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise UsageError("--app is MODULE:ATTR, such as myshop.payments:guard")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if os.environ.get("DJANGO_SETTINGS_MODULE"):
        try:
            import django  # type: ignore[import-untyped]
        except ImportError:
            pass
        else:
            django.setup()
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as error:
        raise UsageError(f"--app: cannot import {module_name!r} ({error})") from None
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise UsageError(f"--app: {module_name!r} has no {attribute!r}")
        found = getattr(found, part)
    if callable(found) and not isinstance(found, Guard | AsyncGuard):
        found = found()
    if not isinstance(found, Guard | AsyncGuard):
        raise UsageError(f"--app: {spec!r} is not a Guard or an AsyncGuard")
    return found


def _guard_from_env(args: argparse.Namespace, *, gateway: bool) -> Guard:
    from idempay.backends import payment_store_from_url
    from idempay.gateway import StripeGateway

    url = database_url(args)
    key = os.environ.get("STRIPE_API_KEY", "")
    if gateway and not key:
        raise UsageError("set STRIPE_API_KEY (and STRIPE_API_BASE for a simulator), or give --app")
    secrets = tuple(
        s.strip() for s in os.environ.get("STRIPE_WEBHOOK_SECRET", "").split(",") if s.strip()
    )
    stripe = None
    if key:
        stripe = StripeGateway.from_settings(
            key, api_base=os.environ.get("STRIPE_API_BASE") or None
        )
    return Guard(
        payments=payment_store_from_url(url),
        config=GuardConfig(webhook_secrets=secrets),
        gateway=stripe,
    )


def run_with(
    guard: Guard | AsyncGuard,
    sync_work: Callable[[Guard], T],
    async_work: Callable[[AsyncGuard], Awaitable[T]],
) -> T:
    """Run the sync or the async form of a command's work on ``guard``, then close the
    guard's stores and Stripe client (writing its journal first)."""
    if isinstance(guard, AsyncGuard):

        async def main() -> T:
            try:
                return await async_work(guard)
            finally:
                await _aclose(guard)

        return asyncio.run(main())
    try:
        return sync_work(guard)
    finally:
        _close(guard)


def _close(guard: Guard) -> None:
    try:
        guard.flush_journal()
    finally:
        for part in _parts(guard):
            close = getattr(part, "close", None)
            if close is not None:
                close()


async def _aclose(guard: AsyncGuard) -> None:
    try:
        await guard.flush_journal()
    finally:
        for part in _parts(guard):
            close = getattr(part, "aclose", None)
            if close is not None:
                await close()


def _parts(guard: Guard | AsyncGuard) -> list[object]:
    """The guard's stores and gateway, each once (one object may serve as two stores)."""
    parts: dict[int, object] = {}
    for part in (guard.payments, guard.records, guard.gateway):
        if part is not None:
            parts.setdefault(id(part), part)
    return list(parts.values())
