"""The shop's routes: the page, the checkout, and idempay's webhook and order views."""

from __future__ import annotations

from django.urls import path  # type: ignore[import-untyped]

from idempay.adapters import django as idempay_django
from shop import views

urlpatterns = [
    path("", views.page, name="page"),
    path("checkout", views.checkout_view, name="checkout"),
    # POST stripe/webhook and GET orders/<order_id>. The order view shows an order's audit
    # trail: a real shop routes it behind its staff checks (urls(orders=None)).
    *idempay_django.urls(),
]
