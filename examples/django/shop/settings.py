"""Django settings of the example shop, read from the environment (see README.md).

The shop keeps no data of its own: idempay's stores hold orders, idempotency records, inbox,
outbox and audit, so Django's ORM, auth, sessions and admin are left out.
"""

from __future__ import annotations

import os
import secrets

# Nothing in this shop is signed with the key (no sessions, no auth, no signed cookies), so a
# fresh random key per process does no harm here; a real site sets DJANGO_SECRET_KEY.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY") or secrets.token_urlsafe(50)
DEBUG = False
ALLOWED_HOSTS = [
    host.strip()
    for host in os.environ.get("DJANGO_ALLOWED_HOSTS", "127.0.0.1,localhost,[::1]").split(",")
    if host.strip()
]

INSTALLED_APPS = ["shop"]  # its AppConfig starts the effect dispatcher of each process
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
ROOT_URLCONF = "shop.urls"
DATABASES: dict[str, dict[str, str]] = {}
USE_I18N = False
USE_TZ = True

# --- payments: the same variables as every idempay example and the CLI ----------------------

IDEMPAY_DATABASE_URL = os.environ.get("IDEMPAY_DATABASE_URL", "sqlite:///./idempay-example.db")
IDEMPAY_LOCK_URL = os.environ.get("IDEMPAY_LOCK_URL", "memory://")
IDEMPAY_REDIS_PREFIX = os.environ.get("IDEMPAY_REDIS_PREFIX", "idempay-example")
IDEMPAY_LEASE_SECONDS = float(os.environ.get("IDEMPAY_LEASE_SECONDS", "30"))
STRIPE_API_KEY = os.environ.get("STRIPE_API_KEY", "sk_test_idempay_example")
STRIPE_API_BASE = os.environ.get("STRIPE_API_BASE") or None
# Comma-separated: during a rotation the old and the new secret are both accepted.
STRIPE_WEBHOOK_SECRETS = tuple(
    secret.strip()
    for secret in os.environ.get("STRIPE_WEBHOOK_SECRET", "").split(",")
    if secret.strip()
)

# Read by idempay's Django adapter on the first request: the guard factory is called once per
# process, and the scope gives each user their own idempotency keys.
IDEMPAY = {"GUARD": "shop.payments.guard", "SCOPE": "shop.payments.user_scope"}

# On stderr: the shop's receipts, idempay's warnings, and server errors (Django would log every
# 4xx as a warning: refused checkouts and webhooks are expected here, and answered).
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "WARNING"},
    "loggers": {"shop": {"level": "INFO"}, "django.request": {"level": "ERROR"}},
}
