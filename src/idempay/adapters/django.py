"""Django adapter (``pip install "idempay[django]"``), Django 4.2 and later.

``settings.py``::

    IDEMPAY = {
        "GUARD": "shop.payments.guard",  # a Guard or AsyncGuard, or a function returning one
        "SCOPE": "shop.payments.scope",  # optional: (HttpRequest) -> (tenant, user)
    }

``views.py`` and ``urls.py``::

    @idempay_checkout()
    def checkout(request: CheckoutRequest) -> OrderSpec:  # ``async def`` with an AsyncGuard
        ...

    urlpatterns = [path("checkout", checkout), *idempay.adapters.django.urls()]

Settings are read on the first request and kept until they change. A guard may also be given
explicitly: ``DjangoIdempay(guard, scope=...)`` offers the same decorator and views.

Guarantees: a plain ``def`` view runs a sync :class:`~idempay.engine.Guard`; an ``async def``
view runs an :class:`~idempay.engine.AsyncGuard`, or a sync guard in a worker thread so that
the event loop is never blocked; every refusal is ``application/problem+json``;
``Idempotent-Replayed`` and ``Retry-After`` are passed through.

CSRF: checkout views stay under Django's CSRF protection (the site's own pages send the token;
API clients with their own authentication are exempted by the application). Only the webhook
views are exempt, because Stripe cannot send a token; the engine verifies the signature instead.

The body is never read through ``request.body``: a declared ``Content-Length`` over the limit
is refused with 413 before reading, then the stream is read in chunks and refused as soon as it
passes the limit. Under WSGI, Django limits the stream to the declared length, so an oversized
body is never buffered. Under ASGI, Django's handler spools the whole body (in memory up to
``FILE_UPLOAD_MAX_MEMORY_SIZE``, then on disk) before any view runs, and
``DATA_UPLOAD_MAX_MEMORY_SIZE`` does not apply to streamed reads: idempay still answers 413
and holds at most the limit, but bound what is received with the server or proxy (for example
nginx's ``client_max_body_size``).
"""

from __future__ import annotations

import threading
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from idempay._lazy import require
from idempay.adapters._common import (
    BodyCollector,
    ScopeFunction,
    anonymous,
    body_limit,
    check_declared_length,
)
from idempay.engine._async import AsyncGuard
from idempay.engine._http import GuardRequest, GuardResponse, json_response, problem_response
from idempay.engine._sync import Guard
from idempay.errors import ConfigurationError, MethodNotAllowedError, RequestError

_conf = require("django.conf", extra="django")
_http = require("django.http", extra="django")
_signals = require("django.core.signals", extra="django")
_urls = require("django.urls", extra="django")
_loading = require("django.utils.module_loading", extra="django")
_asgiref = require("asgiref.sync", extra="django")

__all__ = [
    "DjangoIdempay",
    "async_order_view",
    "async_webhook_view",
    "idempay_checkout",
    "order_view",
    "urls",
    "webhook_view",
]

# Django ships no type information: requests, responses and URL patterns are Any here.
View = Callable[..., Any]
Run = Callable[[GuardRequest], Awaitable[GuardResponse]]
_CHUNK = 65536
_SETTING = "IDEMPAY"
_KEYS = frozenset({"GUARD", "SCOPE"})


class DjangoIdempay:
    """Binds a guard to Django views.

    Args:
        guard: a :class:`~idempay.engine.Guard` or :class:`~idempay.engine.AsyncGuard`;
            None reads ``settings.IDEMPAY["GUARD"]`` on the first request.
        scope: returns ``(tenant, user)`` for an ``HttpRequest``: the scope of its
            idempotency key. None reads ``settings.IDEMPAY["SCOPE"]`` (with a guard from
            settings), else one tenant and an anonymous user. Async views call it in Django's
            sync thread, so it may use the ORM (``request.user``).
    """

    def __init__(
        self, guard: Guard | AsyncGuard | None = None, *, scope: ScopeFunction | None = None
    ) -> None:
        self._guard = guard
        self._scope = scope

    def bound(self) -> tuple[Guard | AsyncGuard, ScopeFunction]:
        """The guard and the scope function in force (settings are resolved here, lazily).

        Raises:
            ConfigurationError: no guard given and none (or a wrong one) in settings.
        """
        if self._guard is not None:
            return self._guard, self._scope or anonymous
        guard, scope = _from_settings()
        return guard, self._scope or scope

    def checkout(
        self, *, operation: str = "checkout", ignore: tuple[str, ...] = ()
    ) -> Callable[[Any], View]:
        """Turn a checkout handler ``(CheckoutRequest) -> OrderSpec`` into a Django view.

        A plain ``def`` handler makes a sync view, run by a sync guard; an ``async def``
        handler makes an async view, run by an AsyncGuard (see ``Guard.checkout`` for the
        guarantees). The view stays under CSRF protection.
        """

        def decorate(handler: Any) -> View:
            if _asgiref.iscoroutinefunction(handler):

                async def async_view(request: Any, *_args: Any, **_kwargs: Any) -> Any:
                    guard, scope = self.bound()
                    if isinstance(guard, Guard):
                        raise ConfigurationError(_MISMATCH % "an async def checkout handler")
                    # The engine endpoint is a closure, cheap to build per request; building
                    # it here follows a guard resolved lazily from settings.
                    run = guard.checkout(operation=operation, ignore=ignore)(handler)
                    return await _aserve(request, guard, scope, run)

                return _named(async_view, handler)

            def sync_view(request: Any, *_args: Any, **_kwargs: Any) -> Any:
                guard, scope = self._sync("a plain def checkout handler")
                run = guard.checkout(operation=operation, ignore=ignore)(handler)
                return _serve(request, guard, scope, run)

            return _named(sync_view, handler)

        return decorate

    def webhook_view(self, request: Any, *_args: Any, **_kwargs: Any) -> Any:
        """The Stripe webhook (sync view, sync guard): 2xx for each delivery taken care of."""
        guard, scope = self._sync("webhook_view")
        return _serve(request, guard, scope, guard.handle_webhook)

    async def async_webhook_view(self, request: Any, *_args: Any, **_kwargs: Any) -> Any:
        """The Stripe webhook (async view): an AsyncGuard, or a sync guard in a thread."""
        guard, scope = self.bound()
        if isinstance(guard, Guard):
            return await _aserve(request, guard, scope, _in_thread(guard.handle_webhook))
        return await _aserve(request, guard, scope, guard.handle_webhook)

    # Exempt from CSRF because Stripe cannot send a token. This is safe only because the engine
    # verifies the Stripe-Signature (an HMAC of the raw body under the endpoint's secret) on
    # every request before it reads or writes anything: a forged request gets 400 and changes
    # nothing. Set as csrf_exempt sets it, which on Django 4.2 would wrap an async view into a
    # sync one.
    webhook_view.csrf_exempt = True  # type: ignore[attr-defined]
    async_webhook_view.csrf_exempt = True  # type: ignore[attr-defined]

    def order_view(self, request: Any, order_id: str) -> Any:
        """``GET /orders/<order_id>``: the order, its audit trail and its effects; 404 if none."""
        guard, scope = self._sync("order_view")
        if request.method not in ("GET", "HEAD"):
            return _render(_not_get(request))
        tenant, _ = scope(request)
        try:
            view = guard.inspect_order(order_id, tenant=tenant)
        except RequestError as error:
            return _render(problem_response(error, instance=request.path))
        return _render(json_response(200, view.to_document()))

    async def async_order_view(self, request: Any, order_id: str) -> Any:
        """The async twin of :meth:`order_view` (a sync guard runs in a thread)."""
        guard, scope = self.bound()
        if request.method not in ("GET", "HEAD"):
            return _render(_not_get(request))
        tenant, _ = await _ascope(scope, request)
        try:
            if isinstance(guard, Guard):
                inspect = _asgiref.sync_to_async(guard.inspect_order, thread_sensitive=False)
                view = await inspect(order_id, tenant=tenant)
            else:
                view = await guard.inspect_order(order_id, tenant=tenant)
        except RequestError as error:
            return _render(problem_response(error, instance=request.path))
        return _render(json_response(200, view.to_document()))

    def urls(
        self,
        prefix: str = "",
        *,
        webhook: str = "stripe/webhook",
        orders: str | None = "orders/<str:order_id>",
        asynchronous: bool = False,
    ) -> list[Any]:
        """``path()`` entries for the webhook and, unless ``orders`` is None, the order view.

        ``asynchronous`` picks the async views (ASGI; any guard) over the sync ones (WSGI; a
        sync guard). The order view shows an order's audit trail: keep it behind your access
        checks (route ``order_view`` yourself and pass ``orders=None``) unless it is internal.
        """
        hook, order = (
            (self.async_webhook_view, self.async_order_view)
            if asynchronous
            else (self.webhook_view, self.order_view)
        )
        patterns = [_urls.path(prefix + webhook, hook, name="idempay-webhook")]
        if orders is not None:
            patterns.append(_urls.path(prefix + orders, order, name="idempay-order"))
        return patterns

    def _sync(self, view: str) -> tuple[Guard, ScopeFunction]:
        guard, scope = self.bound()
        if not isinstance(guard, Guard):
            raise ConfigurationError(_MISMATCH % view)
        return guard, scope


_MISMATCH = (
    "%s cannot run this guard: plain def views need a sync Guard, async def views an "
    "AsyncGuard (async_webhook_view and async_order_view also take a sync Guard)"
)


# --- settings -------------------------------------------------------------------------------

_resolved: dict[str, tuple[Guard | AsyncGuard, ScopeFunction]] = {}
_resolving = threading.Lock()


def _from_settings() -> tuple[Guard | AsyncGuard, ScopeFunction]:
    # One resolution per settings value: a factory must not build two guards (two pools)
    # because two first requests raced.
    with _resolving:
        if _SETTING not in _resolved:
            _resolved[_SETTING] = _resolve(getattr(_conf.settings, _SETTING, None))
        return _resolved[_SETTING]


def _resolve(config: object) -> tuple[Guard | AsyncGuard, ScopeFunction]:
    if not isinstance(config, Mapping) or "GUARD" not in config:
        raise ConfigurationError(
            'settings.IDEMPAY["GUARD"] is not set: give it the dotted path of a Guard or '
            "AsyncGuard, or of a function returning one, or pass guard= to idempay's views"
        )
    if unknown := sorted(set(config) - _KEYS):
        raise ConfigurationError(f"settings.IDEMPAY has unknown keys: {', '.join(unknown)}")
    guard = _load(config["GUARD"], "GUARD")
    if not isinstance(guard, (Guard, AsyncGuard)) and callable(guard):
        guard = guard()
    if not isinstance(guard, (Guard, AsyncGuard)):
        raise ConfigurationError(
            'settings.IDEMPAY["GUARD"] is neither a Guard or AsyncGuard nor a function '
            "returning one"
        )
    scope = config.get("SCOPE")
    return guard, anonymous if scope is None else _load(scope, "SCOPE")


def _load(value: object, key: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return _loading.import_string(value)
    except ImportError as error:
        raise ConfigurationError(
            f'settings.IDEMPAY["{key}"] = {value!r} cannot be imported: {error}'
        ) from error


def _forget_settings(*, setting: str, **_kwargs: Any) -> None:
    if setting == _SETTING:
        with _resolving:
            _resolved.clear()


_signals.setting_changed.connect(_forget_settings, dispatch_uid="idempay.adapters.django")


# --- requests and responses -----------------------------------------------------------------


def _serve(
    request: Any,
    guard: Guard,
    scope: ScopeFunction,
    run: Callable[[GuardRequest], GuardResponse],
) -> Any:
    try:
        body = _read_body(request, body_limit(guard))
    except RequestError as error:
        return _render(problem_response(error, instance=request.path))
    return _render(run(_guard_request(request, body, scope(request))))


async def _aserve(request: Any, guard: Guard | AsyncGuard, scope: ScopeFunction, run: Run) -> Any:
    try:
        # Django's ASGI handler has spooled the body already: reading at most the limit
        # from it is memory (or local file) I/O, short enough for the loop.
        body = _read_body(request, body_limit(guard))
    except RequestError as error:
        return _render(problem_response(error, instance=request.path))
    identity = await _ascope(scope, request)
    return _render(await run(_guard_request(request, body, identity)))


def _read_body(request: Any, limit: int) -> bytes:
    # Never request.body: it buffers whatever was sent before any check of ours.
    check_declared_length(request.META.get("CONTENT_LENGTH"), limit)
    collector = BodyCollector(limit)
    while chunk := request.read(min(_CHUNK, limit + 1)):
        collector.add(chunk)
    return collector.body()


def _guard_request(request: Any, body: bytes, identity: tuple[str, str]) -> GuardRequest:
    tenant, user = identity
    return GuardRequest(
        method=request.method,
        route=_route_template(request),
        body=body,
        headers=dict(request.headers),
        tenant=tenant,
        user=user,
    )


def _route_template(request: Any) -> str:
    # The matched pattern (/orders/<str:order_id>), not the concrete path, so that
    # fingerprints do not depend on path parameters; the path when no URL was resolved.
    route = getattr(request.resolver_match, "route", None)
    return f"/{route}" if isinstance(route, str) and route else str(request.path)


async def _ascope(scope: ScopeFunction, request: Any) -> tuple[str, str]:
    if scope is anonymous:
        return anonymous(request)
    # In Django's sync thread: a scope function may read request.user, which needs the ORM.
    identity: tuple[str, str] = await _asgiref.sync_to_async(scope)(request)
    return identity


def _in_thread(engine: Callable[[GuardRequest], GuardResponse]) -> Run:
    # Not thread-sensitive: the guard's stores are thread-safe and need no Django connection.
    run: Run = _asgiref.sync_to_async(engine, thread_sensitive=False)
    return run


def _not_get(request: Any) -> GuardResponse:
    error = MethodNotAllowedError("orders are read with GET", allowed=("GET", "HEAD"))
    return problem_response(error, instance=request.path)


def _render(response: GuardResponse) -> Any:
    return _http.HttpResponse(response.body, status=response.status, headers=dict(response.headers))


def _named(view: View, handler: Any) -> View:
    view.__name__ = getattr(handler, "__name__", "checkout")
    view.__qualname__ = getattr(handler, "__qualname__", view.__name__)
    view.__doc__ = handler.__doc__
    view.__module__ = getattr(handler, "__module__", __name__)
    return view


# --- with settings --------------------------------------------------------------------------

_from_django_settings = DjangoIdempay()
webhook_view = _from_django_settings.webhook_view
async_webhook_view = _from_django_settings.async_webhook_view
order_view = _from_django_settings.order_view
async_order_view = _from_django_settings.async_order_view


def idempay_checkout(
    *,
    operation: str = "checkout",
    ignore: tuple[str, ...] = (),
    guard: Guard | AsyncGuard | None = None,
    scope: ScopeFunction | None = None,
) -> Callable[[Any], View]:
    """Decorate a checkout handler into a view (see :meth:`DjangoIdempay.checkout`), with the
    guard and scope from settings unless given."""
    return DjangoIdempay(guard, scope=scope).checkout(operation=operation, ignore=ignore)


def urls(
    prefix: str = "",
    *,
    webhook: str = "stripe/webhook",
    orders: str | None = "orders/<str:order_id>",
    asynchronous: bool = False,
    guard: Guard | AsyncGuard | None = None,
    scope: ScopeFunction | None = None,
) -> list[Any]:
    """The webhook and order views as ``path()`` entries (see :meth:`DjangoIdempay.urls`),
    with the guard and scope from settings unless given."""
    idem = DjangoIdempay(guard, scope=scope)
    return idem.urls(prefix, webhook=webhook, orders=orders, asynchronous=asynchronous)
