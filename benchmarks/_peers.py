"""The Redis idempotency-record store against two Python peers, on the same Redis.

Each library does the equivalent of one protected request, through its own store API, with a
client of the same settings (its own connection pool, same timeouts), in the same process:

``unique``: a key never seen: claim it, then store the response.
    idempay   ``claim`` (one Lua script) + ``complete`` (one Lua script)
    Powertools ``save_inprogress`` (SET NX) + ``save_success`` (SET), as its handler calls them
    idemkit   ``claim`` (one Lua script) + ``complete`` (one Lua script, and a PUBLISH)

``unique`` also has a floor, not a library: ``2 empty scripts`` makes the same two EVALSHA
round trips as idempay, with the same arguments, to scripts that do nothing. No store that needs
a round trip to claim and another to complete can beat it; its ratio to Powertools is the
ceiling of any such store's ratio.

``dup``: the key was completed before: the call that returns the stored response.
    idempay   ``claim`` -> Existing, then ``decide`` -> Replay (one round trip)
    Powertools ``save_inprogress`` -> SET NX fails, GET, AlreadyExists; the handler then
              ``get_record`` (GET) and decodes the response (three round trips)
    idemkit   ``claim`` -> ALREADY_COMPLETED with the record (one round trip)

Powertools is synchronous, so it faces idempay's sync store; idemkit is asyncio-native (its
sync API is a bridge to a background loop), so it faces idempay's async store. Each request
carries a payload fingerprint (idempay, idemkit: a SHA-256 of the body, computed in the timed
call, checked on replay). Powertools runs without ``payload_validation_jmespath``: its Redis
layer drops the validation hash when it stores the response (``_update_record``), so with
validation on every replay fails with IdempotencyValidationError. It does less work here.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
import warnings
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

from _harness import Contender

__all__ = ["RedisPeers", "open_redis_peers"]

LEASE = timedelta(seconds=30)
RETAIN = timedelta(hours=1)
DUPLICATE_POOL = 64
"""How many completed keys the duplicate runs cycle through."""

_RESULT: dict[str, Any] = {"id": "pi_3Bench", "status": "requires_payment_method", "amount": 1999}


def _body(key: str) -> dict[str, Any]:
    return {"amount": 1999, "currency": "eur", "cart": ["sku_1", "sku_2"], "ref": key}


def _fingerprint(body: dict[str, Any]) -> str:
    raw = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(raw).hexdigest()


@dataclass(slots=True)
class RedisPeers:
    """The contenders of the four peer comparisons, and what must be closed afterwards."""

    unique_sync: list[Contender]
    dup_sync: list[Contender]
    unique_async: list[Contender]
    dup_async: list[Contender]
    close: Callable[[], None]


def _powertools(url: str, prefix: str, *, timeout: float) -> tuple[Any, Callable[[], None]]:
    import redis
    from aws_lambda_powertools.utilities.idempotency import IdempotencyConfig
    from aws_lambda_powertools.utilities.idempotency.persistence.cache import (
        CachePersistenceLayer,
    )

    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    with warnings.catch_warnings():
        # The Redis-named class is deprecated in favour of its Cache alias: the same class.
        warnings.simplefilter("ignore", DeprecationWarning)
        # Powertools types its client as a narrow Protocol that redis-py's signatures overrun.
        layer = CachePersistenceLayer(client=cast("Any", client))
    layer.configure(
        IdempotencyConfig(
            event_key_jmespath="key",
            expires_after_seconds=int(RETAIN.total_seconds()),
        ),
        function_name="checkout",
        key_prefix=f"{prefix}powertools",
    )
    return layer, client.close


def _powertools_ops(layer: Any) -> tuple[Callable[[int], Any], Callable[[int], Any]]:
    from aws_lambda_powertools.utilities.idempotency.exceptions import (
        IdempotencyItemAlreadyExistsError,
    )

    lease_ms = int(LEASE.total_seconds() * 1000)

    def unique(w: int) -> Any:
        tag = secrets.token_hex(4)

        def op(i: int) -> None:
            key = f"pt-{tag}-{w}-{i}"
            data = {"key": key, "body": _body(key)}
            layer.save_inprogress(data=data, remaining_time_in_millis=lease_ms)
            layer.save_success(data=data, result=_RESULT)

        return op

    done = [{"key": f"pt-dup-{n}", "body": _body(f"pt-dup-{n}")} for n in range(DUPLICATE_POOL)]

    def dup(w: int) -> Any:
        def op(i: int) -> object:
            data = done[(i + w) % DUPLICATE_POOL]
            # What IdempotencyHandler does with a completed key: the failed SET NX raises,
            # then the record is read (again) and its stored response decoded.
            try:
                layer.save_inprogress(data=data, remaining_time_in_millis=lease_ms)
            except IdempotencyItemAlreadyExistsError as exc:
                record = exc.old_data_record or layer.get_record(data=data)
                return record.response_json_as_dict()
            raise AssertionError("a completed key was claimed again")

        return op

    for data in done:
        layer.save_inprogress(data=data, remaining_time_in_millis=lease_ms)
        layer.save_success(data=data, result=_RESULT)
    return unique, dup


def _idempay_sync(url: str, prefix: str, *, timeout: float) -> tuple[Any, Any, Callable[[], None]]:
    import redis

    from idempay.backends.redis import RedisIdempotencyStore
    from idempay.core.records import Claimed, Existing, Replay, StoredResponse, decide

    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    store = RedisIdempotencyStore(client, prefix=f"{prefix}idempay")
    scope = "tenant_1/checkout"

    def unique(w: int) -> Any:
        tag = secrets.token_hex(4)

        def op(i: int) -> None:
            key = f"ip-{tag}-{w}-{i}"
            result = store.claim(
                scope, key, _fingerprint(_body(key)), lease_for=LEASE, retain_for=RETAIN
            )
            if not isinstance(result, Claimed):
                raise AssertionError("a fresh key was not claimed")
            body = json.dumps(_RESULT, sort_keys=True).encode()
            store.complete(scope, key, result.lease, StoredResponse(201, body))

        return op

    done = [(f"ip-dup-{n}", _fingerprint(_body(f"ip-dup-{n}"))) for n in range(DUPLICATE_POOL)]
    for key, fp in done:
        claimed = store.claim(scope, key, fp, lease_for=LEASE, retain_for=RETAIN)
        if not isinstance(claimed, Claimed):
            raise AssertionError("a fresh key was not claimed")
        store.complete(scope, key, claimed.lease, StoredResponse(201, b"{}"))
    clock = store_clock()

    def dup(w: int) -> Any:
        def op(i: int) -> object:
            key, _ = done[(i + w) % DUPLICATE_POOL]
            fp = _fingerprint(_body(key))
            result = store.claim(scope, key, fp, lease_for=LEASE, retain_for=RETAIN)
            decision = decide(result, fp, clock())
            if not (isinstance(result, Existing) and isinstance(decision, Replay)):
                raise AssertionError("a completed key was not replayed")
            return json.loads(decision.response.body)

        return op

    return unique, dup, client.close


def _script_floor(url: str, prefix: str, *, timeout: float) -> tuple[Any, Callable[[], None]]:
    """Two round trips shaped like idempay's claim and complete, to scripts that do nothing.

    The client work is idempay's (the fingerprint, a token, the record key's digest, the same
    arguments and a reply as short as idempay's fresh claim), the server's is none: what is left
    is redis-py and the network. Nothing is written.
    """
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    claim_sha = client.script_load("return redis.status_reply('C1:1')")
    complete_sha = client.script_load("return 1")
    lease_us = LEASE // timedelta(microseconds=1)
    retain_us = RETAIN // timedelta(microseconds=1)

    def unique(w: int) -> Any:
        tag = secrets.token_hex(4)

        def op(i: int) -> None:
            key = f"fl-{tag}-{w}-{i}"
            record = f"{prefix}floor:{{{hashlib.sha256(key.encode()).hexdigest()}}}"
            token = secrets.token_hex(16)
            fp = _fingerprint(_body(key))
            client.evalsha(claim_sha, 1, record, fp, token, lease_us, retain_us)
            body = base64.b64encode(json.dumps(_RESULT, sort_keys=True).encode()).decode()
            client.evalsha(
                complete_sha,
                1,
                record,
                token,
                1,
                "completed",
                "201",
                "application/json",
                body,
                "[]",
            )

        return op

    return unique, client.close


def store_clock() -> Callable[[], Any]:
    """The time ``decide`` compares leases with (only read for records in flight)."""
    from idempay.clock import SystemClock

    return SystemClock().now


def _idempay_async(
    url: str, prefix: str, runner: asyncio.Runner, *, timeout: float
) -> tuple[Any, Any, Callable[[], Coroutine[Any, Any, None]]]:
    import redis.asyncio as aioredis

    from idempay.backends.redis import AsyncRedisIdempotencyStore
    from idempay.core.records import Claimed, Existing, Replay, StoredResponse, decide

    client = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    store = AsyncRedisIdempotencyStore(client, prefix=f"{prefix}idempay-async")
    scope = "tenant_1/checkout"
    clock = store_clock()

    def unique(w: int) -> Any:
        tag = secrets.token_hex(4)

        async def op(i: int) -> None:
            key = f"ia-{tag}-{w}-{i}"
            result = await store.claim(
                scope, key, _fingerprint(_body(key)), lease_for=LEASE, retain_for=RETAIN
            )
            if not isinstance(result, Claimed):
                raise AssertionError("a fresh key was not claimed")
            body = json.dumps(_RESULT, sort_keys=True).encode()
            await store.complete(scope, key, result.lease, StoredResponse(201, body))

        return op

    done = [(f"ia-dup-{n}", _fingerprint(_body(f"ia-dup-{n}"))) for n in range(DUPLICATE_POOL)]

    async def fill() -> None:
        for key, fp in done:
            claimed = await store.claim(scope, key, fp, lease_for=LEASE, retain_for=RETAIN)
            if not isinstance(claimed, Claimed):
                raise AssertionError("a fresh key was not claimed")
            await store.complete(scope, key, claimed.lease, StoredResponse(201, b"{}"))

    runner.run(fill())

    def dup(w: int) -> Any:
        async def op(i: int) -> object:
            key, _ = done[(i + w) % DUPLICATE_POOL]
            fp = _fingerprint(_body(key))
            result = await store.claim(scope, key, fp, lease_for=LEASE, retain_for=RETAIN)
            decision = decide(result, fp, clock())
            if not (isinstance(result, Existing) and isinstance(decision, Replay)):
                raise AssertionError("a completed key was not replayed")
            return json.loads(decision.response.body)

        return op

    return unique, dup, client.aclose


def _idemkit(
    url: str, prefix: str, runner: asyncio.Runner, *, timeout: float
) -> tuple[Any, Any, Callable[[], Coroutine[Any, Any, None]]]:
    import redis.asyncio as aioredis
    from idemkit import RedisBackend
    from idemkit.core.fingerprint import compose_key
    from idemkit.core.state import ClaimResultType

    client = aioredis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    backend = RedisBackend(client, namespace=f"{prefix}idemkit")
    scope = "tenant_1/checkout"
    lease_s = LEASE.total_seconds()
    retain_s = RETAIN.total_seconds()

    def unique(w: int) -> Any:
        tag = secrets.token_hex(4)

        async def op(i: int) -> None:
            key = f"ik-{tag}-{w}-{i}"
            effective = compose_key([key, scope])
            claim = await backend.claim(effective, _fingerprint(_body(key)), 1, lease_s)
            if claim.result is not ClaimResultType.NEW_CLAIMED or claim.our_claim_token is None:
                raise AssertionError("a fresh key was not claimed")
            body = json.dumps(_RESULT, sort_keys=True).encode()
            if not await backend.complete(
                effective, claim.our_claim_token, 201, {}, body, retain_s
            ):
                raise AssertionError("a claim was lost")

        return op

    done = [f"ik-dup-{n}" for n in range(DUPLICATE_POOL)]

    async def fill() -> None:
        for key in done:
            effective = compose_key([key, scope])
            claim = await backend.claim(effective, _fingerprint(_body(key)), 1, lease_s)
            if claim.our_claim_token is None:
                raise AssertionError("a fresh key was not claimed")
            await backend.complete(effective, claim.our_claim_token, 201, {}, b"{}", retain_s)

    runner.run(fill())

    def dup(w: int) -> Any:
        async def op(i: int) -> object:
            key = done[(i + w) % DUPLICATE_POOL]
            fp = _fingerprint(_body(key))
            claim = await backend.claim(compose_key([key, scope]), fp, 1, lease_s)
            record = claim.record
            if claim.result is not ClaimResultType.ALREADY_COMPLETED or record.fingerprint != fp:
                raise AssertionError("a completed key was not replayed")
            return json.loads(record.response_body)

        return op

    return unique, dup, backend.aclose


def open_redis_peers(
    url: str, prefix: str, runner: asyncio.Runner, *, timeout: float = 2.0
) -> RedisPeers:
    """Build the four comparisons (the peer first: it is the reference of the ratios; idempay
    last: its ratio is the one reported).

    Raises ImportError when a peer is not installed (``pip install -r
    benchmarks/requirements.txt``).
    """
    layer, close_pt = _powertools(url, prefix, timeout=timeout)
    pt_unique, pt_dup = _powertools_ops(layer)
    floor_unique, close_floor = _script_floor(url, prefix, timeout=timeout)
    ip_unique, ip_dup, close_ip = _idempay_sync(url, prefix, timeout=timeout)
    ia_unique, ia_dup, close_ia = _idempay_async(url, prefix, runner, timeout=timeout)
    ik_unique, ik_dup, close_ik = _idemkit(url, prefix, runner, timeout=timeout)

    def close() -> None:
        close_pt()
        close_floor()
        close_ip()
        runner.run(close_ia())
        runner.run(close_ik())

    return RedisPeers(
        unique_sync=[
            Contender("powertools", sync_op=pt_unique),
            Contender("2 empty scripts", sync_op=floor_unique),
            Contender("idempay", sync_op=ip_unique),
        ],
        dup_sync=[
            Contender("powertools", sync_op=pt_dup),
            Contender("idempay", sync_op=ip_dup),
        ],
        unique_async=[
            Contender("idemkit", async_op=ik_unique, runner=runner),
            Contender("idempay async", async_op=ia_unique, runner=runner),
        ],
        dup_async=[
            Contender("idemkit", async_op=ik_dup, runner=runner),
            Contender("idempay async", async_op=ia_dup, runner=runner),
        ],
        close=close,
    )
