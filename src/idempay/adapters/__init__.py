"""Web framework adapters: thin layers that map a framework's request to a
:class:`~idempay.engine.GuardRequest`, call the engine, and render its answer.

- :mod:`idempay.adapters.starlette`: Starlette and FastAPI (``idempay[fastapi]``);
- :mod:`idempay.adapters.django`: Django (``idempay[django]``);
- :mod:`idempay.adapters.flask`: Flask (``idempay[flask]``).

Every adapter reads the raw body (signatures are checked over the exact bytes) with a size
limit enforced while reading, so an oversized body is refused with 413 without being buffered;
renders every refusal as ``application/problem+json``; and passes ``Idempotent-Replayed`` and
``Retry-After`` through.
"""

from __future__ import annotations

__all__: list[str] = []
