"""Flask adapter (``pip install "idempay[flask]"``).

::

    idem = Idempay(scope=lambda request: ("", request.headers["X-User-Id"]))

    @shop.post("/checkout")                       # an app or a blueprint
    @idem.checkout()
    def checkout(request: CheckoutRequest) -> OrderSpec:
        ...

    def create_app() -> Flask:
        app = Flask(__name__)
        app.config["IDEMPAY_GUARD"] = make_guard  # a Guard, or a factory returning one
        idem.init_app(app)                        # /stripe/webhook and GET /orders/<order_id>
        app.register_blueprint(shop)
        return app

Guarantees: the guard is looked up in ``current_app`` at request time, so one extension
serves any number of apps and decorators may run before ``init_app``; the body is read as raw
bytes, chunk by chunk, under the guard's size limit (and ``MAX_CONTENT_LENGTH`` when lower),
so a declared or actual oversize body is refused with 413 before it is buffered; every refusal
is ``application/problem+json``; ``Idempotent-Replayed`` and ``Retry-After`` are passed
through. The guard is a sync :class:`~idempay.engine.Guard`; a checkout handler may be
``async def`` (Flask runs it with ``ensure_sync``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from idempay._lazy import require
from idempay.adapters._common import (
    BodyCollector,
    ScopeFunction,
    anonymous,
    body_limit,
    check_declared_length,
)
from idempay.engine._checkout import CheckoutRequest, OrderSpec
from idempay.engine._http import GuardRequest, GuardResponse, json_response, problem_response
from idempay.engine._sync import Guard
from idempay.errors import ConfigurationError, PayloadTooLargeError, RequestError

if TYPE_CHECKING:
    import flask
    from werkzeug.exceptions import RequestEntityTooLarge
else:
    flask = require("flask", extra="flask")
    RequestEntityTooLarge = require("werkzeug.exceptions", extra="flask").RequestEntityTooLarge

__all__ = ["EXTENSION_KEY", "Idempay"]

EXTENSION_KEY: Final = "idempay"
"""Where :meth:`Idempay.init_app` keeps an app's state: ``app.extensions[EXTENSION_KEY]``."""

# The engine answers a wrong method itself, with a problem document naming the right one.
_EVERY_METHOD: Final = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
_CHUNK: Final = 64 * 1024

Handler = Callable[[CheckoutRequest], OrderSpec | Awaitable[OrderSpec]]
View = Callable[..., "flask.Response"]


@dataclass(frozen=True, slots=True)
class _AppState:
    guard: Guard
    scope: ScopeFunction
    limit: int


class Idempay:
    """The Flask extension: binds a guard to each app given to :meth:`init_app`.

    Args:
        app: an app to bind now (or call :meth:`init_app` later, from an app factory).
        guard: the :class:`~idempay.engine.Guard` of every app; by default each app's
            ``IDEMPAY_GUARD`` setting, a guard or a factory called once by ``init_app``.
        scope: returns ``(tenant, user)`` for a request: the scope of its idempotency key.
            By default, one tenant and an anonymous user.
        webhook_path: the Stripe webhook endpoint's rule (it answers every method).
        orders_path: the order view's rule, with an ``<order_id>`` variable; None for none.
    """

    def __init__(
        self,
        app: flask.Flask | None = None,
        *,
        guard: Guard | None = None,
        scope: ScopeFunction | None = None,
        webhook_path: str = "/stripe/webhook",
        orders_path: str | None = "/orders/<order_id>",
    ) -> None:
        self.guard = guard
        self.scope = scope or anonymous
        self.webhook_path = webhook_path
        self.orders_path = orders_path
        if app is not None:
            self.init_app(app)

    def init_app(self, app: flask.Flask) -> None:
        """Store ``app``'s guard in ``app.extensions`` and register the webhook endpoint
        (``idempay_webhook``) and the order view (``idempay_order``).

        Raises:
            ConfigurationError: no guard is given or configured, or it is not a sync ``Guard``.
        """
        guard = _resolve(self.guard if self.guard is not None else app.config.get("IDEMPAY_GUARD"))
        app.extensions[EXTENSION_KEY] = _AppState(guard, self.scope, body_limit(guard))
        app.add_url_rule(self.webhook_path, "idempay_webhook", self.webhook, methods=_EVERY_METHOD)
        if self.orders_path is not None:
            app.add_url_rule(self.orders_path, "idempay_order", self.order, methods=["GET"])

    def checkout(
        self, *, operation: str = "checkout", ignore: tuple[str, ...] = ()
    ) -> Callable[[Handler], View]:
        """Turn a checkout handler into a Flask view (path variables are left to the handler,
        in ``flask.request.view_args``).

        The handler receives a :class:`~idempay.engine.CheckoutRequest` and returns the
        :class:`~idempay.engine.OrderSpec` to charge (see ``Guard.checkout`` for the
        guarantees).
        """

        def decorate(handler: Handler) -> View:
            def view(**_path: Any) -> flask.Response:
                state = _state()
                sync_handler = flask.current_app.ensure_sync(handler)
                endpoint = state.guard.checkout(operation=operation, ignore=ignore)(sync_handler)
                return _serve(state, endpoint)

            # Flask names the endpoint after the view: keep the handler's name.
            view.__name__ = getattr(handler, "__name__", "checkout")
            view.__qualname__ = getattr(handler, "__qualname__", view.__name__)
            view.__module__ = getattr(handler, "__module__", view.__module__)
            view.__doc__ = handler.__doc__
            return view

        return decorate

    def webhook(self) -> flask.Response:
        """The Stripe webhook endpoint: 2xx for every delivery taken care of, 4xx refused."""
        state = _state()
        return _serve(state, state.guard.handle_webhook)

    def order(self, order_id: str) -> flask.Response:
        """``GET /orders/<order_id>``: the order, its audit trail and its effects; 404 if none."""
        state = _state()
        tenant, _ = state.scope(flask.request)
        try:
            view = state.guard.inspect_order(order_id, tenant=tenant)
        except RequestError as error:
            return _render(problem_response(error, instance=flask.request.path))
        return _render(json_response(200, view.to_document()))


def _resolve(configured: object) -> Guard:
    guard = configured() if callable(configured) else configured
    if guard is None:
        raise ConfigurationError("pass Idempay(guard=...) or set app.config['IDEMPAY_GUARD']")
    if not isinstance(guard, Guard):
        # Flask serves each request in a thread of its own: an AsyncGuard's stores and
        # clients belong to one event loop, which Flask does not keep.
        raise ConfigurationError("the Flask adapter needs a sync idempay.engine.Guard")
    return guard


def _state() -> _AppState:
    state = flask.current_app.extensions.get(EXTENSION_KEY)
    if not isinstance(state, _AppState):
        raise ConfigurationError("Idempay.init_app(app) was not called for this app")
    return state


def _serve(state: _AppState, run: Callable[[GuardRequest], GuardResponse]) -> flask.Response:
    request = flask.request
    try:
        body = _body(request, state.limit)
    except RequestError as error:
        return _render(problem_response(error, instance=request.path))
    tenant, user = state.scope(request)
    rule = request.url_rule
    guard_request = GuardRequest(
        method=request.method,
        # The rule (/orders/<order_id>), not the path: fingerprints ignore path spellings.
        route=rule.rule if rule is not None else request.path,
        body=body,
        headers=dict(request.headers),
        tenant=tenant,
        user=user,
    )
    return _render(run(guard_request))


def _body(request: flask.Request, guard_limit: int) -> bytes:
    # Werkzeug enforces MAX_CONTENT_LENGTH itself: when lower, it is the limit to report.
    app_limit = request.max_content_length
    limit = guard_limit if app_limit is None else min(guard_limit, app_limit)
    # content_length is None for a chunked body, whose Content-Length (if any) means nothing.
    declared = request.content_length
    check_declared_length(None if declared is None else str(declared), limit)
    collector = BodyCollector(limit)
    try:
        stream = request.stream
        while chunk := stream.read(_CHUNK):
            collector.add(chunk)
    except RequestEntityTooLarge:
        raise PayloadTooLargeError(limit=limit) from None
    return collector.body()


def _render(response: GuardResponse) -> flask.Response:
    return flask.Response(response.body, status=response.status, headers=list(response.headers))
