"""Benchmark of idempay's stores, with same-run baselines and peer libraries.

Run it (after ``pip install -r benchmarks/requirements.txt`` for the peers)::

    .venv/bin/python benchmarks/stores.py            # about 3.5 minutes
    .venv/bin/python benchmarks/stores.py --quick    # about 1 minute
    .venv/bin/python benchmarks/stores.py --scale 3  # batches three times longer

What it measures, per backend (memory, SQLite, PostgreSQL, MariaDB/MySQL, Redis), one caller
(``seq``) and ``--threads`` callers (``conc``):

- ``claim+complete``: a protected request with a fresh idempotency key;
- ``webhook apply``: one new webhook event through the payment store's two steps,
  ``receive_event`` (inbox insert, order and trail read) and ``commit_event`` (order
  compare-and-set, audit row, outbox row, inbox status);

and, from the same run, ratios to references measured back to back with idempay:

- PostgreSQL: the same writes as ONE statement over raw psycopg (one round trip, autocommit);
- SQLite: the same writes with raw sqlite3 in one ``BEGIN IMMEDIATE`` transaction;
- Redis records: AWS Lambda Powertools' idempotency utility and idemkit, for unique keys and
  for duplicates (see ``_peers.py``).

Services are found like the test suite finds them: ``IDEMPAY_TEST_POSTGRES_URL``,
``IDEMPAY_TEST_MYSQL_URL``, ``IDEMPAY_TEST_REDIS_URL``, else the default local ports. Each run
works in its own database / key prefix and drops it at the end. An unreachable service is
reported as skipped, and its ratios print as ``na``. The last line of output is a summary in
``key=value`` form; the exit status is 1 if a section failed (not if a target is missed).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from _common import (
    RUN,
    Unavailable,
    out,
    parse_args,
    require_port,
    run,
    scratch_database,
    service_url,
)
from _harness import Contender, Measured, Plan, measure_group

TARGETS: Final = {
    # key: (minimum ratio, strictly above?)
    "pg_apply_vs_floor": (0.8, False),
    "sqlite_apply_vs_floor": (0.5, False),
    "redis_unique_vs_powertools": (1.2, False),
    "redis_dup_vs_powertools": (1.5, False),
    "redis_unique_vs_idemkit": (1.0, True),
    "redis_dup_vs_idemkit": (1.0, True),
}

SECTIONS: Final = ("memory", "sqlite", "postgres", "mysql", "redis")


@dataclass(frozen=True, slots=True)
class Row:
    backend: str
    workload: str
    mode: str
    impl: str
    rate: float
    p50_ms: float
    p99_ms: float
    ratio: float | None
    spread: tuple[float, float] | None
    versus: str | None


@dataclass(slots=True)
class Report:
    rows: list[Row] = field(default_factory=list)
    ratios: dict[str, float | None] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def add(
        self,
        backend: str,
        workload: str,
        mode: str,
        measured: Sequence[Measured],
        *,
        ratio_key: str | None = None,
    ) -> None:
        """Record one comparison group; the first contender is the reference."""
        reference = measured[0].name if len(measured) > 1 else None
        for m in measured:
            self.rows.append(
                Row(
                    backend,
                    workload,
                    mode,
                    m.name,
                    m.rate,
                    m.latency_ms(0.50),
                    m.latency_ms(0.99),
                    m.ratio,
                    m.ratio_spread,
                    reference if m.ratio is not None else None,
                )
            )
        if ratio_key is not None:
            self.ratios[ratio_key] = measured[-1].ratio
        ours = measured[-1]
        versus = f", {ours.ratio:.2f}x {reference}" if ours.ratio is not None else ""
        out(f"  {backend:<8} {workload:<15} {mode:<4} {ours.rate:9.0f} ops/s{versus}")


# --- services ------------------------------------------------------------------------------


# --- sections ------------------------------------------------------------------------------


def idempay_store_groups(
    report: Report,
    backend: str,
    plan: Plan,
    idem: Any,
    payments: Any,
    *,
    floor: Callable[[str], Contender] | None = None,
    ratio_prefix: str | None = None,
) -> None:
    """claim+complete and webhook apply, sequential and concurrent, with the floor if any."""
    from _workloads import claim_complete_op, webhook_apply_op

    for mode, threads in (("seq", 1), ("conc", plan.threads)):
        measured = measure_group(
            [Contender("idempay", sync_op=claim_complete_op(idem))], plan, threads=threads
        )
        report.add(backend, "claim+complete", mode, measured)
    for mode, threads in (("seq", 1), ("conc", plan.threads)):
        ours = Contender("idempay", sync_op=webhook_apply_op(payments, tenant=f"idempay-{mode}"))
        group = [ours] if floor is None else [floor(f"floor-{mode}"), ours]
        key = None
        if ratio_prefix is not None:
            key = f"{ratio_prefix}_apply_vs_floor" + ("" if mode == "seq" else "_conc")
        report.add(
            backend,
            "webhook apply",
            mode,
            measure_group(group, plan, threads=threads),
            ratio_key=key,
        )


def section_memory(report: Report, plan: Plan, stack: ExitStack) -> None:
    from idempay.memory import MemoryIdempotencyStore, MemoryPaymentStore

    idempay_store_groups(report, "memory", plan, MemoryIdempotencyStore(), MemoryPaymentStore())


def open_sql_stores(url: str, stack: ExitStack) -> tuple[Any, Any]:
    """The stores as an application builds them: ``from_url`` (READ COMMITTED, no pre-ping, on
    servers; WAL, busy timeout and BEGIN IMMEDIATE on SQLite), with a
    pool large enough for the concurrent mode, and the tables created."""
    try:
        from idempay.backends.sql import SQLIdempotencyStore, SQLPaymentStore, create_all
    except ImportError as exc:
        raise Unavailable(f"the SQL stores are not importable ({exc})") from exc

    idem = SQLIdempotencyStore.from_url(url, pool_size=16, max_overflow=4)
    stack.callback(idem.close)
    payments = SQLPaymentStore.from_url(url, pool_size=16, max_overflow=4)
    stack.callback(payments.close)
    create_all(payments.engine)
    return idem, payments


def section_sqlite(report: Report, plan: Plan, stack: ExitStack) -> None:
    from _floors import sqlite_floor

    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="idempay-bench-")))
    path = folder / "bench.db"
    idem, payments = open_sql_stores(f"sqlite:///{path}", stack)
    idempay_store_groups(
        report,
        "sqlite",
        plan,
        idem,
        payments,
        floor=lambda tenant: Contender(
            "sqlite3", sync_op=sqlite_floor(path, tenant=tenant, stack=stack)
        ),
        ratio_prefix="sqlite",
    )


def section_postgres(report: Report, plan: Plan, stack: ExitStack) -> None:
    from _floors import postgres_floor

    server = service_url("postgres")
    require_port(server, "PostgreSQL")
    url = stack.enter_context(scratch_database(server, f"idempay_bench_{RUN}"))
    idem, payments = open_sql_stores(url, stack)
    idempay_store_groups(
        report,
        "postgres",
        plan,
        idem,
        payments,
        floor=lambda tenant: Contender(
            "psycopg 1-RT", sync_op=postgres_floor(url, tenant=tenant, stack=stack)
        ),
        ratio_prefix="pg",
    )


def section_mysql(report: Report, plan: Plan, stack: ExitStack) -> None:
    server = service_url("mysql")
    require_port(server, "MySQL/MariaDB")
    url = stack.enter_context(scratch_database(server, f"idempay_bench_{RUN}", mysql=True))
    idem, payments = open_sql_stores(url, stack)
    with payments.engine.connect():  # the dialect learns the server's flavour on connecting
        flavour = "mariadb" if payments.engine.dialect.is_mariadb else "mysql"
    idempay_store_groups(report, flavour, plan, idem, payments)


def section_redis(report: Report, plan: Plan, stack: ExitStack) -> None:
    url = service_url("redis")
    require_port(url, "Redis")
    import redis
    from _workloads import claim_complete_op

    from idempay.backends.redis import RedisIdempotencyStore

    prefix = f"idempay-bench:{RUN}:"

    def cleanup() -> None:
        client = redis.Redis.from_url(url)
        try:
            for key in client.scan_iter(match=f"{prefix}*", count=1000):
                client.unlink(key)
        finally:
            client.close()

    stack.callback(cleanup)
    client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
    stack.callback(client.close)
    store = RedisIdempotencyStore(client, prefix=f"{prefix}cc")
    for mode, threads in (("seq", 1), ("conc", plan.threads)):
        report.add(
            "redis",
            "claim+complete",
            mode,
            measure_group(
                [Contender("idempay", sync_op=claim_complete_op(store))], plan, threads=threads
            ),
        )
    try:
        from _peers import open_redis_peers

        runner = stack.enter_context(asyncio.Runner())
        peers = open_redis_peers(url, prefix, runner)
    except ImportError as exc:
        # The store's own rows stand; only the comparisons are missing.
        report.skipped["redis-peers"] = f"a peer library is missing ({exc})"
        out(f"  peers skipped: {exc}: pip install -r benchmarks/requirements.txt")
        return
    stack.callback(peers.close)
    report.add(
        "redis",
        "record unique",
        "seq",
        measure_group(peers.unique_sync, plan),
        ratio_key="redis_unique_vs_powertools",
    )
    report.add(
        "redis",
        "record dup",
        "seq",
        measure_group(peers.dup_sync, plan),
        ratio_key="redis_dup_vs_powertools",
    )
    report.add(
        "redis",
        "record unique",
        "seq",
        measure_group(peers.unique_async, plan),
        ratio_key="redis_unique_vs_idemkit",
    )
    report.add(
        "redis",
        "record dup",
        "seq",
        measure_group(peers.dup_async, plan),
        ratio_key="redis_dup_vs_idemkit",
    )


RUNNERS: Final[dict[str, Callable[[Report, Plan, ExitStack], None]]] = {
    "memory": section_memory,
    "sqlite": section_sqlite,
    "postgres": section_postgres,
    "mysql": section_mysql,
    "redis": section_redis,
}


# --- output --------------------------------------------------------------------------------


def print_table(report: Report) -> None:
    header = (
        f"{'backend':<9}{'workload':<16}{'mode':<6}{'contender':<14}"
        f"{'ops/s':>9}{'p50 ms':>9}{'p99 ms':>9}  ratio"
    )
    out(header)
    out("-" * len(header) + "-" * 16)
    for r in report.rows:
        ratio = ""
        if r.ratio is not None and r.spread is not None:
            low, high = r.spread
            ratio = f"{r.ratio:.2f}x {r.versus} (reps {low:.2f}-{high:.2f})"
        out(
            f"{r.backend:<9}{r.workload:<16}{r.mode:<6}{r.impl:<14}"
            f"{r.rate:9.0f}{r.p50_ms:9.3f}{r.p99_ms:9.3f}  {ratio}"
        )


def summary(report: Report) -> str:
    """The last line: every ratio (two decimals, ``na`` when not measured) and the verdict."""
    keys = [*TARGETS, "pg_apply_vs_floor_conc", "sqlite_apply_vs_floor_conc"]
    parts = []
    met = True
    for key in keys:
        value = report.ratios.get(key)
        parts.append(f"{key}={'na' if value is None else f'{value:.2f}'}")
        if key in TARGETS:
            minimum, strict = TARGETS[key]
            ok = value is not None and (value > minimum if strict else value >= minimum)
            met = met and ok
    parts.append(f"skipped={','.join(sorted(report.skipped)) or 'none'}")
    parts.append(f"failed={','.join(sorted(report.failed)) or 'none'}")
    parts.append(f"targets_met={'yes' if met else 'no'}")
    return " ".join(parts)


# --- main ----------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
    args = parse_args(
        argv,
        description="Benchmark idempay's stores against same-run baselines and peer libraries.",
        sections=SECTIONS,
    )
    return run(
        "stores benchmark",
        args,
        runners=RUNNERS,
        report=Report(),
        print_report=print_table,
        summary=summary,
        packages=("SQLAlchemy", "psycopg", "PyMySQL", "redis", "aws-lambda-powertools", "idemkit"),
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
