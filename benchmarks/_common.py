"""What the benchmark scripts share: finding the services, scratch databases, options, the run.

Each script defines its sections (a function per section taking the report, the plan and an
``ExitStack`` for what the section opens), how to print its report and its summary line; this
module runs the sections one after the other, so that a missing service skips one section and a
failure in one does not hide the others.
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Final
from urllib.parse import urlsplit

from _harness import Plan

RUN: Final = secrets.token_hex(4)
"""This run's tag, in the names of every database, file and key prefix it creates."""

DEFAULT_URLS: Final = {
    "postgres": (
        "IDEMPAY_TEST_POSTGRES_URL",
        "postgresql+psycopg://postgres@127.0.0.1:5432/postgres",
    ),
    "mysql": ("IDEMPAY_TEST_MYSQL_URL", "mysql+pymysql://root@127.0.0.1:3306/test"),
    "redis": ("IDEMPAY_TEST_REDIS_URL", "redis://127.0.0.1:6379/0"),
}

Section = Callable[[Any, Plan, ExitStack], None]


class Unavailable(Exception):  # noqa: N818 - reads as "the service is unavailable"
    """A service or an optional package is missing: the section is skipped, not failed."""


def out(line: str = "") -> None:
    """Print a line of the report (stdout, flushed: progress shows as it happens)."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def service_url(kind: str) -> str:
    """The server of ``kind``, found as the test suite finds it: its variable, else localhost."""
    env, default = DEFAULT_URLS[kind]
    return os.environ.get(env) or default


def require_port(url: str, what: str) -> None:
    """Raise :class:`Unavailable` unless something listens where ``url`` points."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port
    if port is None:
        port = {"redis": 6379, "rediss": 6379, "mysql": 3306}.get(parts.scheme.split("+")[0], 5432)
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return
    except OSError as exc:
        raise Unavailable(f"{what} not reachable at {host}:{port}") from exc


@contextmanager
def scratch_database(server_url: str, name: str, *, mysql: bool = False) -> Iterator[str]:
    """Create the database ``name`` for this run; drop it at the end."""
    import sqlalchemy as sa

    if mysql:
        create = f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"
        drop = f"DROP DATABASE IF EXISTS `{name}`"
    else:
        create, drop = f'CREATE DATABASE "{name}"', f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(create))
        try:
            url = sa.make_url(server_url).set(database=name)
            yield url.render_as_string(hide_password=False)
        finally:
            with admin.connect() as conn:
                conn.execute(sa.text(drop))
    finally:
        admin.dispose()


def versions(names: Sequence[str]) -> str:
    """The versions of the packages measured, as ``name version`` pairs (absent ones left out)."""
    from importlib import metadata

    found = []
    for name in names:
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def parse_args(
    argv: Sequence[str],
    *,
    description: str,
    sections: Sequence[str],
    default_sections: Sequence[str] | None = None,
) -> argparse.Namespace:
    """The options every benchmark takes: --quick, --scale, --threads, --only."""
    chosen = default_sections or sections
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="about one minute in all")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply every batch's duration (default 1)"
    )
    parser.add_argument(
        "--threads", type=int, default=8, help="callers in the concurrent mode (default 8)"
    )
    parser.add_argument(
        "--only",
        default=",".join(chosen),
        help=f"comma-separated sections to run, among {','.join(sections)} "
        f"(default: {','.join(chosen)})",
    )
    args = parser.parse_args(argv)
    if args.scale <= 0 or args.threads < 1:
        parser.error("--scale must be positive and --threads at least 1")
    unknown = set(args.only.split(",")) - set(sections)
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    return args


def run(
    title: str,
    args: argparse.Namespace,
    *,
    runners: Mapping[str, Section],
    report: Any,
    print_report: Callable[[Any], None],
    summary: Callable[[Any], str],
    packages: Sequence[str],
) -> int:
    """Run the sections ``args.only`` names, print the report, end with the summary line.

    ``report`` has ``skipped`` and ``failed`` dicts (section -> reason). Returns the exit
    status: 1 if a section failed, else 0 (a missed target is not a failure).
    """
    reps, seconds = (5, 0.2) if args.quick else (7, 0.9)
    plan = Plan(reps=reps, seconds=seconds * args.scale, warmup_ops=30, threads=args.threads)
    out(
        f"idempay {title}, run {RUN}: {plan.reps} interleaved repetitions of "
        f"{plan.seconds:.2f} s batches, conc = {plan.threads} threads, {os.cpu_count()} CPUs"
    )
    out(f"python {sys.version.split()[0]}; {versions(packages)}")
    started = time.perf_counter()
    for name in args.only.split(","):
        out(f"[{name}]")
        try:
            with ExitStack() as stack:
                runners[name](report, plan, stack)
        except Unavailable as exc:
            report.skipped[name] = str(exc)
            out(f"  skipped: {exc}")
        except Exception as exc:  # noqa: BLE001 - one broken section must not hide the others
            report.failed[name] = f"{type(exc).__name__}: {exc}"
            out(f"  FAILED: {type(exc).__name__}: {exc}")
            traceback.print_exc(file=sys.stdout)
    out()
    print_report(report)
    out(f"\n{time.perf_counter() - started:.0f} s in all")
    out(summary(report))
    return 1 if report.failed else 0
