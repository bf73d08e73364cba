"""The shop's app config: one effect dispatcher per process, started with Django."""

from __future__ import annotations

from django.apps import AppConfig  # type: ignore[import-untyped]

from shop.payments import dispatcher


class ShopConfig(AppConfig):  # type: ignore[misc]  # Django ships no type information
    """Starts the process's effect dispatcher once Django is set up, before any request."""

    name = "shop"

    def ready(self) -> None:
        # The guard is built here, from settings that are loaded by now.
        dispatcher().start()
