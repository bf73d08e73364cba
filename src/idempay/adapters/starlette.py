"""Starlette and FastAPI adapter (``pip install "idempay[fastapi]"``).

::

    guard = AsyncGuard(...)                      # or a sync Guard: run in a worker thread
    idem = StarletteIdempay(guard, scope=lambda request: ("", request.headers["x-user-id"]))

    @app.post("/checkout")                       # FastAPI; or Route("/checkout", checkout, ...)
    @idem.checkout()
    async def checkout(request: CheckoutRequest) -> OrderSpec:
        ...

    app.router.routes.extend(idem.routes())      # POST /stripe/webhook, GET /orders/{order_id}

Guarantees: the body is read as raw bytes, with the guard's size limit enforced while reading
(a declared or actual oversize body is refused with 413 before it is buffered); every refusal
is ``application/problem+json``; with a sync :class:`~idempay.engine.Guard` the engine runs in
a worker thread, so the event loop is never blocked; ``Idempotent-Replayed`` and
``Retry-After`` are passed through.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, cast

from idempay._lazy import require
from idempay.adapters._common import (
    BodyCollector,
    ScopeFunction,
    anonymous,
    body_limit,
    check_declared_length,
    is_sync,
)
from idempay.engine._async import AsyncGuard
from idempay.engine._checkout import CheckoutRequest, OrderSpec
from idempay.engine._http import GuardRequest, GuardResponse, json_response, problem_response
from idempay.engine._sync import Guard
from idempay.errors import MethodNotAllowedError, RequestError

if TYPE_CHECKING:
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route
else:
    Request = require("starlette.requests", extra="fastapi").Request
    Response = require("starlette.responses", extra="fastapi").Response
    Route = require("starlette.routing", extra="fastapi").Route
_threads = require("anyio.to_thread", extra="fastapi")

__all__ = ["StarletteIdempay"]

# The engine answers a wrong method itself, with a problem document naming the right one.
_EVERY_METHOD = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

Endpoint = Callable[["Request"], Awaitable["Response"]]
AsyncHandler = Callable[[CheckoutRequest], Awaitable[OrderSpec]]
SyncHandler = Callable[[CheckoutRequest], OrderSpec]


class StarletteIdempay:
    """Binds one guard to Starlette or FastAPI.

    Args:
        guard: an :class:`~idempay.engine.AsyncGuard` (handlers are ``async def``) or a
            :class:`~idempay.engine.Guard` (handlers are plain functions, run in a thread).
        scope: returns ``(tenant, user)`` for a request: the scope of its idempotency key.
            By default, one tenant and an anonymous user.
    """

    def __init__(self, guard: AsyncGuard | Guard, *, scope: ScopeFunction | None = None) -> None:
        self.guard = guard
        self.scope = scope or anonymous
        self.limit = body_limit(guard)

    # --- endpoints --------------------------------------------------------------------------

    def checkout(
        self, *, operation: str = "checkout", ignore: tuple[str, ...] = ()
    ) -> Callable[[Any], Endpoint]:
        """Turn a checkout handler into a Starlette endpoint ``(request) -> Response``.

        The handler receives a :class:`~idempay.engine.CheckoutRequest` and returns the
        :class:`~idempay.engine.OrderSpec` to charge (see ``Guard.checkout`` for the
        guarantees).
        """

        def decorate(handler: Any) -> Endpoint:
            if is_sync(self.guard):
                engine = cast("Guard", self.guard).checkout(operation=operation, ignore=ignore)(
                    cast("SyncHandler", handler)
                )
                run: Callable[[GuardRequest], Awaitable[GuardResponse]] = self._in_thread(engine)
            else:
                run = cast("AsyncGuard", self.guard).checkout(operation=operation, ignore=ignore)(
                    cast("AsyncHandler", handler)
                )

            async def endpoint(request: Request) -> Response:
                return await self._serve(request, run)

            return _as_endpoint(endpoint, handler)

        return decorate

    async def webhook(self, request: Request) -> Response:
        """The Stripe webhook endpoint: 2xx for every delivery taken care of, 4xx refused."""
        if is_sync(self.guard):
            run = self._in_thread(cast("Guard", self.guard).handle_webhook)
        else:
            run = cast("AsyncGuard", self.guard).handle_webhook
        return await self._serve(request, run)

    async def order(self, request: Request) -> Response:
        """``GET /orders/{order_id}``: the order, its audit trail and its effects; 404 if none."""
        if request.method not in ("GET", "HEAD"):
            refused = MethodNotAllowedError("orders are read with GET", allowed=("GET", "HEAD"))
            return _render(problem_response(refused, instance=request.url.path))
        tenant, _ = self.scope(request)
        order_id = str(request.path_params.get("order_id", ""))
        try:
            if is_sync(self.guard):
                guard = cast("Guard", self.guard)
                view = await _threads.run_sync(lambda: guard.inspect_order(order_id, tenant=tenant))
            else:
                view = await cast("AsyncGuard", self.guard).inspect_order(order_id, tenant=tenant)
        except RequestError as error:
            return _render(problem_response(error, instance=request.url.path))
        return _render(json_response(200, view.to_document()))

    def routes(
        self, *, webhook: str = "/stripe/webhook", orders: str | None = "/orders/{order_id}"
    ) -> list[Route]:
        """Ready routes: the webhook (every method, so that a wrong one gets a problem 405)
        and, unless ``orders`` is None, the order view."""
        routes = [Route(webhook, self.webhook, methods=_EVERY_METHOD, name="idempay-webhook")]
        if orders is not None:
            routes.append(Route(orders, self.order, methods=_EVERY_METHOD, name="idempay-order"))
        return routes

    # --- plumbing ---------------------------------------------------------------------------

    @staticmethod
    def _in_thread(
        engine: Callable[[GuardRequest], GuardResponse],
    ) -> Callable[[GuardRequest], Awaitable[GuardResponse]]:
        async def run(request: GuardRequest) -> GuardResponse:
            response: GuardResponse = await _threads.run_sync(engine, request)
            return response

        return run

    async def _serve(
        self, request: Request, run: Callable[[GuardRequest], Awaitable[GuardResponse]]
    ) -> Response:
        try:
            body = await self._body(request)
        except RequestError as error:
            return _render(problem_response(error, instance=request.url.path))
        tenant, user = self.scope(request)
        guard_request = GuardRequest(
            method=request.method,
            route=_route_template(request),
            body=body,
            headers=dict(request.headers),
            tenant=tenant,
            user=user,
        )
        return _render(await run(guard_request))

    async def _body(self, request: Request) -> bytes:
        check_declared_length(request.headers.get("content-length"), self.limit)
        collector = BodyCollector(self.limit)
        async for chunk in request.stream():
            collector.add(chunk)
        return collector.body()


def _route_template(request: Request) -> str:
    # FastAPI and Starlette's router record the matched route: fingerprints then use its
    # template (/orders/{order_id}), not the concrete path.
    route = request.scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else request.url.path


def _render(response: GuardResponse) -> Response:
    return Response(
        content=response.body,
        status_code=response.status,
        headers=dict(response.headers),
    )


def _as_endpoint(endpoint: Endpoint, handler: Any) -> Endpoint:
    # FastAPI reads an endpoint's signature to decide what to inject: make it say "the
    # request", whatever the handler's own signature is.
    endpoint.__name__ = getattr(handler, "__name__", "checkout")
    endpoint.__qualname__ = getattr(handler, "__qualname__", endpoint.__name__)
    endpoint.__doc__ = handler.__doc__
    endpoint.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter("request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request)],
        return_annotation=Response,
    )
    return endpoint
