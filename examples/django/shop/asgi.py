"""The shop as an ASGI application, for uvicorn: ``uvicorn shop.asgi:application``.

Django answers HTTP; this module also answers the ASGI lifespan protocol, which Django does not
speak, to stop the process's effect dispatcher and write its journal before the server exits
(uvicorn ends a worker by re-raising the SIGTERM it received, so ``atexit`` would not run).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from django.core.asgi import get_asgi_application  # type: ignore[import-untyped]

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "shop.settings")

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

django_application = get_asgi_application()  # sets Django up: the dispatcher starts here


async def application(scope: Message, receive: Receive, send: Send) -> None:
    """Django for HTTP; the lifespan's shutdown stops the dispatcher (in a thread: it waits
    for the dispatcher's current round)."""
    if scope["type"] != "lifespan":
        await django_application(scope, receive, send)
        return
    from shop.payments import dispatcher

    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            dispatcher().start()  # started already by the app config: a no-op, kept explicit
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await asyncio.to_thread(dispatcher().stop)
            await send({"type": "lifespan.shutdown.complete"})
            return
