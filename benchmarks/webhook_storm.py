"""Benchmark: a storm of Stripe webhooks through idempay's engine, against the brief's design.

Run it::

    .venv/bin/python benchmarks/webhook_storm.py            # about 2 minutes
    .venv/bin/python benchmarks/webhook_storm.py --quick    # about 30 seconds
    .venv/bin/python benchmarks/webhook_storm.py --only postgres --threads 4
    .venv/bin/python benchmarks/webhook_storm.py --only profile   # where a webhook's time goes

What it measures, on PostgreSQL+Redis and on SQLite, with one caller (``seq``) and
``--threads`` callers (``conc``): events per second and p50/p99 latency of signed
``payment_intent.succeeded`` webhooks through a sync ``idempay.engine.Guard``
(``guard.handle_webhook``, no HTTP server), for first deliveries (``unique``: each pays its own
order) and for duplicates (``dup``: the same events again, once all were processed), against
the original brief's design written by hand in ``_brief.py`` (lock, read the order, update it
in a transaction, release), given the same events. The four contenders run interleaved in the
same repetitions; each ratio is the median of per-repetition ratios.

Then, in a separate pass that is not timed (``roundtrips``), it counts what each side sends
per webhook through ``idempay.testing.wire.WireProxy``: PostgreSQL round trips, statements and
writes, Redis commands and round trips, over sequential webhooks on warm connections. The
``profile`` section (run only when asked for) times each step of a first delivery, the brief's
handler beside it, and runs idempay under cProfile.

Services are found like the test suite finds them (``IDEMPAY_TEST_POSTGRES_URL``,
``IDEMPAY_TEST_REDIS_URL``, else the default local ports). Each run makes its own PostgreSQL
database, Redis key prefix and SQLite files, and removes them. The last line of output is a
summary in ``key=value`` form; the exit status is 1 if a section failed (not if a target is
missed).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from _common import (
    RUN,
    out,
    parse_args,
    require_port,
    run,
    scratch_database,
    service_url,
)
from _harness import Contender, Measured, Plan, measure_group

SECTIONS: Final = ("postgres", "sqlite", "roundtrips", "profile")
DEFAULT_SECTIONS: Final = ("postgres", "sqlite", "roundtrips")
# Deliveries processed before the timed batches, then replayed as the duplicates.
REPLAYED: Final = 200
# Round-trip pass: deliveries of each kind made before counting (psycopg prepares a statement
# the 5th time a connection runs it, at the cost of one more round trip that once).
COUNT_WARM_UP: Final = 8

# key: (bound, "min" or "max"): the targets, on both configurations.
TARGETS: Final = {
    "unique_vs_brief": (1.5, "min"),
    "dup_vs_unique": (3.0, "min"),
    "sqlite_unique_vs_brief": (1.5, "min"),
    "sqlite_dup_vs_unique": (3.0, "min"),
    "pg_round_trips_unique": (3.0, "max"),
    "pg_round_trips_dup": (2.0, "max"),
    # "no durable write for a duplicate": the journal's batches do not wait for the disk.
    "pg_durable_writes_dup": (0.0, "max"),
}
SUMMARY_KEYS: Final = (
    "unique_vs_brief",
    "dup_vs_unique",
    "dup_vs_brief",
    "unique_vs_brief_conc",
    "dup_vs_unique_conc",
    "pg_round_trips_unique",
    "pg_round_trips_dup",
    "pg_writes_dup",
    "pg_journal_writes_dup",
    "pg_durable_writes_dup",
    "redis_cmds_unique",
    "redis_cmds_dup",
    "brief_pg_round_trips_unique",
    "brief_pg_round_trips_dup",
    "brief_redis_cmds_unique",
    "brief_redis_cmds_dup",
    "sqlite_unique_vs_brief",
    "sqlite_dup_vs_unique",
    "sqlite_dup_vs_brief",
    "sqlite_unique_vs_brief_conc",
    "sqlite_dup_vs_unique_conc",
)


@dataclass(frozen=True, slots=True)
class Row:
    config: str
    delivery: str
    mode: str
    contender: str
    rate: float
    p50_ms: float
    p99_ms: float
    note: str


@dataclass(slots=True)
class Report:
    rows: list[Row] = field(default_factory=list)
    values: dict[str, float | None] = field(default_factory=dict)
    counts: list[str] = field(default_factory=list)
    profile: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


# --- services --------------------------------------------------------------------------------


def redis_prefix(url: str, stack: ExitStack, suffix: str) -> str:
    """A key prefix of this run's own; every key under it is deleted at the end."""
    import redis

    prefix = f"idempay-bench:{RUN}:{suffix}:"

    def cleanup() -> None:
        client = redis.Redis.from_url(url)
        try:
            for key in client.scan_iter(match=f"{prefix}*", count=1000):
                client.unlink(key)
        finally:
            client.close()

    stack.callback(cleanup)
    return prefix


def libpq_url(url: str) -> str:
    """A SQLAlchemy PostgreSQL URL as psycopg takes it."""
    import sqlalchemy as sa

    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


# --- the two sides ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Side:
    """How to feed one side: its orders, and its handler timed as one operation."""

    name: str
    maker: Callable[[str], Any]  # tenant -> OrderMaker
    unique_op: Callable[..., Any]
    dup_op: Callable[..., Any]
    tenant_of: Callable[[str], str]


def idempay_side(guard: Any) -> Side:
    from _storm import idempay_op, idempay_order_maker

    return Side(
        "idempay",
        maker=lambda tenant: idempay_order_maker(guard, tenant),
        unique_op=lambda take, processed: idempay_op(
            guard, take, expect="applied", processed=processed
        ),
        dup_op=lambda take: idempay_op(guard, take, expect="duplicate"),
        tenant_of=lambda mode: f"storm-{mode}",
    )


def brief_side(brief: Any) -> Side:
    from _storm import brief_op

    return Side(
        "brief",
        maker=lambda _tenant: lambda pairs: brief.create_orders([i for _, i in pairs]),
        unique_op=lambda take, processed: brief_op(
            brief.handle, take, expect="applied", processed=processed
        ),
        dup_op=lambda take: brief_op(brief.handle, take, expect="duplicate"),
        tenant_of=lambda mode: f"storm-{mode}",
    )


@dataclass(slots=True)
class Fed:
    """One side in one mode: its supply of first deliveries and what it processed."""

    side: Side
    supply: Any
    processed: list[Any]
    per_op_s: float = 0.0


def feed(side: Side, tag: str, mode: str) -> Fed:
    from _storm import Supply

    tenant = side.tenant_of(mode)
    return Fed(side, Supply(tag, tenant, side.maker(tenant)), [])


def prime(fed: Fed, count: int) -> None:
    """Process ``count`` first deliveries, untimed: they are replayed as the duplicates, and
    their pace sizes the supply of the first repetition."""
    fed.supply.top_up(count)
    op = fed.side.unique_op(fed.supply.take, fed.processed)(0)
    started = time.perf_counter()
    for i in range(count):
        op(i)
    fed.per_op_s = (time.perf_counter() - started) / count


def ratios(a: Measured, b: Measured) -> list[float]:
    """a's rate over b's, repetition by repetition."""
    return [x.rate / y.rate for x, y in zip(a.batches, b.batches, strict=True) if y.rate > 0]


def spread(values: list[float]) -> str:
    if not values:
        return "na"
    return f"{statistics.median(values):.2f}x (reps {min(values):.2f}-{max(values):.2f})"


def storm(
    report: Report,
    plan: Plan,
    *,
    config: str,
    key_prefix: str,
    sides: tuple[Side, Side],
    verify: Callable[[str, Fed, Fed], None],
) -> None:
    """Both sides, first deliveries and duplicates, sequential then concurrent."""
    from _storm import Replays

    ours, brief = sides
    for mode, threads in (("seq", 1), ("conc", plan.threads)):
        tag = f"{RUN}{mode}"
        fed = [feed(ours, tag, mode), feed(brief, tag, mode)]
        for f in fed:
            prime(f, REPLAYED)
        replays = [Replays(f.processed[:REPLAYED], shares=threads) for f in fed]
        contenders = [
            Contender("idempay", sync_op=ours.unique_op(fed[0].supply.take, fed[0].processed)),
            Contender("brief", sync_op=brief.unique_op(fed[1].supply.take, fed[1].processed)),
            Contender("idempay", sync_op=ours.dup_op(replays[0].take)),
            Contender("brief", sync_op=brief.dup_op(replays[1].take)),
        ]
        # The harness's warm-up takes ``plan.warmup_ops`` of each before the first repetition.
        for f in fed:
            f.supply.top_up(plan.warmup_ops + 10)

        def top_up(rep: int, fed: list[Fed] = fed, threads: int = threads) -> None:
            for f in fed:
                f.supply.mark(count=rep > 0)
                if rep == 0:
                    # A generous guess from the sequential pace (as if every caller kept it);
                    # from then on, twice what the most hungry batch took.
                    need = plan.seconds / f.per_op_s * threads * 2
                else:
                    need = f.supply.most_per_batch * 2
                f.supply.top_up(int(need) + 100)

        measured = measure_group(contenders, plan, threads=threads, on_rep=top_up)
        iu, bu, idup, bdup = measured
        suffix = "" if mode == "seq" else "_conc"
        unique_vs_brief, dup_vs_unique = ratios(iu, bu), ratios(idup, iu)
        dup_vs_brief = ratios(idup, bdup)
        report.values[f"{key_prefix}unique_vs_brief{suffix}"] = statistics.median(unique_vs_brief)
        report.values[f"{key_prefix}dup_vs_unique{suffix}"] = statistics.median(dup_vs_unique)
        if mode == "seq":
            report.values[f"{key_prefix}dup_vs_brief"] = statistics.median(dup_vs_brief)
        notes = {
            0: f"{spread(unique_vs_brief)} brief unique",
            1: "",
            2: f"{spread(dup_vs_unique)} idempay unique; {spread(dup_vs_brief)} brief dup",
            3: f"{spread(ratios(bdup, bu))} brief unique",
        }
        for index, m in enumerate(measured):
            delivery = "unique" if index < 2 else "dup"
            report.rows.append(
                Row(
                    config,
                    delivery,
                    mode,
                    m.name,
                    m.rate,
                    m.latency_ms(0.50),
                    m.latency_ms(0.99),
                    notes[index],
                )
            )
        out(
            f"  {config} {mode}: idempay unique {iu.rate:.0f}/s, brief unique {bu.rate:.0f}/s, "
            f"idempay dup {idup.rate:.0f}/s, brief dup {bdup.rate:.0f}/s"
        )
        for f in fed:
            if f.supply.made_while_timed:
                report.notes.append(
                    f"{config} {mode} {f.side.name}: {f.supply.made_while_timed} orders made "
                    "inside timed batches (the supply ran short)"
                )
        verify(mode, fed[0], fed[1])


def section_postgres(report: Report, plan: Plan, stack: ExitStack) -> None:
    from _brief import BriefPostgres
    from _storm import close_guard, idempay_guard, idempay_paid

    server, redis_url = service_url("postgres"), service_url("redis")
    require_port(server, "PostgreSQL")
    require_port(redis_url, "Redis")
    url = stack.enter_context(scratch_database(server, f"idempay_storm_{RUN}_timed"))
    prefix = redis_prefix(redis_url, stack, "timed")
    guard = idempay_guard(url, redis_url, prefix=f"{prefix}idempay")
    stack.callback(close_guard, guard)
    brief = BriefPostgres(
        libpq_url(url), redis_url, prefix=f"{prefix}brief:", secret=_secret(), stack=stack
    )

    def verify(mode: str, ours: Fed, theirs: Fed) -> None:
        _check(idempay_paid(guard, ours.side.tenant_of(mode)), len(ours.processed), "idempay")
        _check_brief(brief.paid(theirs.supply.intent_prefix), len(theirs.processed))

    storm(
        report,
        plan,
        config="postgres+redis",
        key_prefix="",
        sides=(idempay_side(guard), brief_side(brief)),
        verify=verify,
    )


def section_sqlite(report: Report, plan: Plan, stack: ExitStack) -> None:
    from _brief import BriefSQLite
    from _storm import close_guard, idempay_guard, idempay_paid

    folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="idempay-storm-")))
    guard = idempay_guard(f"sqlite:///{folder / 'idempay.db'}", "memory://")
    stack.callback(close_guard, guard)
    brief = BriefSQLite(folder / "brief.db", secret=_secret(), busy_timeout_ms=5000, stack=stack)

    def verify(mode: str, ours: Fed, theirs: Fed) -> None:
        _check(idempay_paid(guard, ours.side.tenant_of(mode)), len(ours.processed), "idempay")
        _check_brief(brief.paid(theirs.supply.intent_prefix), len(theirs.processed))

    storm(
        report,
        plan,
        config="sqlite",
        key_prefix="sqlite_",
        sides=(idempay_side(guard), brief_side(brief)),
        verify=verify,
    )


def _secret() -> str:
    from _storm import SECRET

    return SECRET


def _check(found: dict[str, int], processed: int, who: str) -> None:
    """Every first delivery paid its order and wrote its outbox row, and nothing more."""
    if found["paid"] != processed or found["outbox"] != processed:
        raise AssertionError(f"{who}: {processed} payments processed, tables hold {found}")


def _check_brief(paid: int, processed: int) -> None:
    if paid != processed:
        raise AssertionError(f"brief: {processed} payments processed, {paid} orders paid")


# --- round trips -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Counted:
    contender: str
    delivery: str
    n: int
    pg_round_trips: float
    pg_statements: float
    pg_writes: float
    redis_cmds: float
    redis_round_trips: float
    connections: int
    shape: str
    journal_round_trips: float = 0.0
    journal_writes: float = 0.0


class JournalMeter:
    """What idempay's journal flushes send, counted apart.

    The guard journals the decisions that changed nothing (duplicates) in batches; the
    delivery that completes a batch writes it, in a transaction that does not wait for the
    disk. The flush is wrapped on the guard so that its share of the counts is known.
    """

    def __init__(self, guard: Any, pg: Any) -> None:
        self.round_trips = 0
        self.writes = 0
        flush = getattr(guard, "flush_journal", None)
        self._flush: Callable[[], object] = flush if flush is not None else lambda: 0
        if flush is None:
            return

        def counted_flush() -> int:
            before = pg.stats()
            try:
                return int(flush())
            finally:
                after = pg.stats()
                self.round_trips += after.round_trips - before.round_trips
                self.writes += len(after.writes) - len(before.writes)

        guard.flush_journal = counted_flush

    def reset(self) -> None:
        self.round_trips = self.writes = 0

    def flush_uncounted(self) -> None:
        """Write what is queued now, so that the next delivery does not."""
        self._flush()


def _shape(pg: Any, rd: Any) -> str:
    """What one webhook sent, by statement kind: e.g. ``SELECT, WITH (writes); EVALSHA``."""
    writes = set(pg.writes)
    kinds = [
        s.split(None, 1)[0].upper() + (" (writes)" if s in writes else "") for s in pg.statements
    ]
    return f"PostgreSQL: {', '.join(kinds) or '-'}; Redis: {', '.join(rd.statements) or '-'}"


def count_side(
    side: Side, wires: tuple[Any, Any], *, tag: str, n: int, journal: JournalMeter | None = None
) -> tuple[Counted, Counted]:
    """Warm the side up, then count ``n`` first deliveries and ``n`` duplicates of them."""
    from _storm import Replays

    pg, rd = wires
    fed = feed(side, tag, "rt")
    fed.supply.top_up(COUNT_WARM_UP + n + 1)
    unique = fed.side.unique_op(fed.supply.take, fed.processed)(0)
    for i in range(COUNT_WARM_UP):
        unique(i)
    warm_dups = side.dup_op(Replays(fed.processed[:COUNT_WARM_UP]).take)(0)
    for i in range(COUNT_WARM_UP):
        warm_dups(i)
    results = []
    for delivery in ("unique", "dup"):
        if delivery == "unique":
            op = unique
        else:
            op = side.dup_op(Replays(fed.processed[COUNT_WARM_UP:]).take)(0)
        pg.reset()
        rd.reset()
        if journal is not None:
            journal.reset()
        for i in range(n):
            op(i)
        p, r = pg.stats(), rd.stats()
        journaled = (journal.round_trips, journal.writes) if journal is not None else (0, 0)
        if journal is not None:
            journal.flush_uncounted()
        pg.reset()
        rd.reset()
        op(n)  # one more, alone (and no journal batch due): what a single webhook sends
        shape = _shape(pg.stats(), rd.stats())
        results.append(
            Counted(
                side.name,
                delivery,
                n,
                p.round_trips / n,
                len(p.statements) / n,
                len(p.writes) / n,
                len(r.statements) / n,
                r.round_trips / n,
                p.connections + r.connections,
                shape,
                journaled[0] / n,
                journaled[1] / n,
            )
        )
    return results[0], results[1]


def section_round_trips(report: Report, plan: Plan, stack: ExitStack) -> None:
    from _brief import BriefPostgres
    from _storm import close_guard, idempay_guard

    from idempay.testing.wire import WireProxy

    server, redis_url = service_url("postgres"), service_url("redis")
    require_port(server, "PostgreSQL")
    require_port(redis_url, "Redis")
    url = stack.enter_context(scratch_database(server, f"idempay_storm_{RUN}_wire"))
    prefix = redis_prefix(redis_url, stack, "wire")
    pg = stack.enter_context(WireProxy.from_url(url))
    rd = stack.enter_context(WireProxy.from_url(redis_url))
    guard = idempay_guard(pg.url_for(url), rd.url_for(redis_url), prefix=f"{prefix}idempay")
    stack.callback(close_guard, guard)
    brief = BriefPostgres(
        libpq_url(pg.url_for(url)),
        rd.url_for(redis_url),
        prefix=f"{prefix}brief:",
        secret=_secret(),
        stack=stack,
    )
    n = 200  # two batches of the journal of duplicates, at its default batch size
    counted: dict[tuple[str, str], Counted] = {}
    journal = JournalMeter(guard, pg)
    for side, meter in ((idempay_side(guard), journal), (brief_side(brief), None)):
        for c in count_side(side, (pg, rd), tag=f"{RUN}rt", n=n, journal=meter):
            counted[(c.contender, c.delivery)] = c
    header = (
        f"{'contender':<10}{'delivery':<10}{'pg RT':>7}{'pg stmts':>10}{'pg writes':>11}"
        f"{'journal RT/writes':>19}{'redis cmds':>12}{'redis RT':>10}  statements of one webhook"
    )
    report.counts.append(
        f"per webhook, mean of {n} sequential webhooks on warm connections (journal: the share "
        "of the pg columns spent on idempay's batched journal of duplicates):"
    )
    report.counts.append(header)
    report.counts.append("-" * len(header))
    for c in counted.values():
        shared = f"{c.journal_round_trips:.2f}/{c.journal_writes:.2f}"
        report.counts.append(
            f"{c.contender:<10}{c.delivery:<10}{c.pg_round_trips:7.2f}{c.pg_statements:10.2f}"
            f"{c.pg_writes:11.2f}{shared:>19}{c.redis_cmds:12.2f}{c.redis_round_trips:10.2f}"
            f"  {c.shape}"
        )
        if c.connections:
            report.notes.append(f"{c.contender} {c.delivery}: {c.connections} connections opened")
    ours_u, ours_d = counted[("idempay", "unique")], counted[("idempay", "dup")]
    theirs_u, theirs_d = counted[("brief", "unique")], counted[("brief", "dup")]
    report.values |= {
        "pg_round_trips_unique": ours_u.pg_round_trips,
        "pg_round_trips_dup": ours_d.pg_round_trips,
        "pg_writes_dup": ours_d.pg_writes,
        "pg_journal_writes_dup": ours_d.journal_writes,
        "pg_durable_writes_dup": ours_d.pg_writes - ours_d.journal_writes,
        "redis_cmds_unique": ours_u.redis_cmds,
        "redis_cmds_dup": ours_d.redis_cmds,
        "brief_pg_round_trips_unique": theirs_u.pg_round_trips,
        "brief_pg_round_trips_dup": theirs_d.pg_round_trips,
        "brief_redis_cmds_unique": theirs_u.redis_cmds,
        "brief_redis_cmds_dup": theirs_d.redis_cmds,
    }
    out(
        f"  idempay unique {ours_u.pg_round_trips:g} PG RT + {ours_u.redis_cmds:g} Redis, "
        f"dup {ours_d.pg_round_trips:g} + {ours_d.redis_cmds:g}; brief unique "
        f"{theirs_u.pg_round_trips:g} + {theirs_u.redis_cmds:g}, dup "
        f"{theirs_d.pg_round_trips:g} + {theirs_d.redis_cmds:g}"
    )


# --- profile ---------------------------------------------------------------------------------


def section_profile(report: Report, plan: Plan, stack: ExitStack) -> None:
    """Where a first delivery's time goes on PostgreSQL+Redis, sequentially: each step the
    guard takes (wall and CPU), the brief's handler beside it, and idempay under cProfile."""
    from _brief import BriefPostgres
    from _profile import median_ms, timed_calls
    from _storm import Replays, close_guard, idempay_guard

    server, redis_url = service_url("postgres"), service_url("redis")
    require_port(server, "PostgreSQL")
    require_port(redis_url, "Redis")
    url = stack.enter_context(scratch_database(server, f"idempay_storm_{RUN}_profile"))
    prefix = redis_prefix(redis_url, stack, "profile")
    guard = idempay_guard(url, redis_url, prefix=f"{prefix}idempay")
    stack.callback(close_guard, guard)
    brief = BriefPostgres(
        libpq_url(url), redis_url, prefix=f"{prefix}brief:", secret=_secret(), stack=stack
    )
    # The same guard without a lock (locks are never needed for correctness): what the lock
    # costs a first delivery.
    unlocked = idempay_guard(url, "none://")
    stack.callback(close_guard, unlocked)
    n = 200 if plan.reps < 7 else 600
    unique, dups = [], []
    for side in (idempay_side(guard), brief_side(brief), idempay_side(unlocked)):
        fed = feed(side, f"{RUN}pf{len(unique)}", "profile")
        fed.supply.top_up(50 + 4 * n)
        op = side.unique_op(fed.supply.take, fed.processed)(0)
        timed_calls(op, 50)  # warm: connections, scripts, prepared statements
        unique.append(op)
        dups.append(side.dup_op(Replays(fed.processed[:50]).take)(0))
    totals: dict[str, list[Any]] = {
        "idempay, first delivery": [],
        "brief, first delivery": [],
        "idempay without a lock, first delivery": [],
        "idempay, duplicate": [],
        "brief, duplicate": [],
    }
    for _ in range(2):  # interleaved, so that all meet the machine in the same mood
        for name, op in zip(totals, (*unique, *dups[:2]), strict=True):
            totals[name] += timed_calls(op, n // 2)
    lines = report.profile
    lines.append(
        f"one webhook on PostgreSQL+Redis, sequential: medians of {n} webhooks, in ms "
        "(CPU: this thread's, without the waiting)"
    )
    lines.append(f"{'':<44}{'wall':>8}{'CPU':>8}")
    for name, values in totals.items():
        lines.append(f"{name:<44}{median_ms(values):8.3f}{median_ms(values, 1):8.3f}")
    lines.extend(_idempay_steps(guard, unique[0], n))
    lines.extend(_idempay_profile(unique[0], n, "first deliveries"))
    lines.extend(_idempay_profile(dups[0], n, "duplicates"))
    ms = {name: median_ms(values) for name, values in totals.items()}
    out("  " + ", ".join(f"{name} {value:.2f} ms" for name, value in ms.items()))


def _idempay_steps(guard: Any, op: Callable[[int], object], n: int) -> list[str]:
    """Time each call the guard makes to its stores and locks; the rest is the guard's own."""
    from collections import defaultdict

    from _profile import Stopwatch, median_ms, timed_calls

    samples: dict[str, list[Any]] = defaultdict(list)
    payments, locks = guard.payments, guard.locks
    guard.payments = Stopwatch(payments, ("receive_event", "commit_event"), samples)
    guard.locks = Stopwatch(locks, ("acquire", "release"), samples)
    try:
        whole = timed_calls(op, n)
    finally:
        guard.payments, guard.locks = payments, locks
    steps = {
        "receive_event (PostgreSQL: the read)": samples["receive_event"],
        "locks.acquire (Redis: EVALSHA)": samples["acquire"],
        "commit_event (PostgreSQL: the write)": samples["commit_event"],
        "locks.release (Redis: EVALSHA)": samples["release"],
    }
    if any(len(v) != n for v in steps.values()):
        raise AssertionError("a step was not called once per webhook (a retry?)")
    rest = [
        (w - sum(v[i][0] for v in steps.values()), c - sum(v[i][1] for v in steps.values()))
        for i, (w, c) in enumerate(whole)
    ]
    steps["the rest: signature, parse, decide, draft"] = rest
    lines = [f"idempay, step by step ({n} more webhooks):"]
    lines.append(f"{'  all of it':<44}{median_ms(whole):8.3f}{median_ms(whole, 1):8.3f}")
    for name, values in steps.items():
        lines.append(f"{'  ' + name:<44}{median_ms(values):8.3f}{median_ms(values, 1):8.3f}")
    return lines


def _idempay_profile(op: Callable[[int], object], n: int, what: str) -> list[str]:
    from _profile import by_library, profile_calls, top_functions

    stats = profile_calls(op, n)
    lines = [f"idempay under cProfile ({n} {what}), own time per webhook by library, ms:"]
    for label, ms in by_library(stats, n):
        lines.append(f"  {label:<50}{ms:8.3f}")
    lines.append("  the functions with the most own time, ms per webhook:")
    for name, ms in top_functions(stats, n, 12):
        lines.append(f"    {ms:7.3f}  {name}")
    return lines


RUNNERS: Final[dict[str, Callable[[Report, Plan, ExitStack], None]]] = {
    "postgres": section_postgres,
    "sqlite": section_sqlite,
    "roundtrips": section_round_trips,
    "profile": section_profile,
}


# --- output ----------------------------------------------------------------------------------


def print_report(report: Report) -> None:
    if report.rows:
        print_rows(report)
    if report.counts:
        out()
        for line in report.counts:
            out(line)
    if report.profile:
        out()
        for line in report.profile:
            out(line)
    for note in report.notes:
        out(f"note: {note}")


def print_rows(report: Report) -> None:
    header = (
        f"{'config':<16}{'delivery':<10}{'mode':<6}{'contender':<11}"
        f"{'events/s':>9}{'p50 ms':>9}{'p99 ms':>9}  ratio"
    )
    out(header)
    out("-" * len(header) + "-" * 30)
    for r in report.rows:
        out(
            f"{r.config:<16}{r.delivery:<10}{r.mode:<6}{r.contender:<11}"
            f"{r.rate:9.0f}{r.p50_ms:9.3f}{r.p99_ms:9.3f}  {r.note}"
        )


def _fmt(value: float | None) -> str:
    return "na" if value is None else f"{value:.2f}"


def summary(report: Report) -> str:
    parts = [f"{key}={_fmt(report.values.get(key))}" for key in SUMMARY_KEYS]
    met = True
    for key, (bound, kind) in TARGETS.items():
        value = report.values.get(key)
        ok = value is not None and (value >= bound if kind == "min" else value <= bound)
        met = met and ok
    parts.append(f"skipped={','.join(sorted(report.skipped)) or 'none'}")
    parts.append(f"failed={','.join(sorted(report.failed)) or 'none'}")
    parts.append(f"targets_met={'yes' if met else 'no'}")
    return " ".join(parts)


# --- main ------------------------------------------------------------------------------------


def main(argv: Sequence[str]) -> int:
    args = parse_args(
        argv,
        description="A storm of Stripe webhooks through idempay, against the brief's design.",
        sections=SECTIONS,
        default_sections=DEFAULT_SECTIONS,
    )
    return run(
        "webhook storm",
        args,
        runners=RUNNERS,
        report=Report(),
        print_report=print_report,
        summary=summary,
        packages=("SQLAlchemy", "psycopg", "redis"),
    )


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
