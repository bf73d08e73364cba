#!/usr/bin/env bash
# Start the example shop in the foreground: serve.sh HOST PORT [WORKERS]
#
# Applies idempay's migrations first (idempotent; Django's own tables are not used), then execs
# uvicorn on Django's ASGI application, so that a signal to this script's PID reaches the
# server. Configuration: see README.md (IDEMPAY_DATABASE_URL, IDEMPAY_LOCK_URL, STRIPE_API_KEY,
# STRIPE_API_BASE, STRIPE_WEBHOOK_SECRET, IDEMPAY_LEASE_SECONDS, DJANGO_ALLOWED_HOSTS).
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 HOST PORT [WORKERS]" >&2
  exit 2
fi
HOST=$1
PORT=$2
WORKERS=${3:-1}
PYTHON=${PYTHON:-python3}
export IDEMPAY_DATABASE_URL=${IDEMPAY_DATABASE_URL:-sqlite:///./idempay-example.db}
export DJANGO_SETTINGS_MODULE=shop.settings
HERE=$(cd "$(dirname "$0")" && pwd)
"$PYTHON" -m idempay db upgrade --url "$IDEMPAY_DATABASE_URL" >/dev/null
# shop.asgi answers the lifespan protocol (Django does not): it stops the effect dispatcher.
exec "$PYTHON" -m uvicorn shop.asgi:application --app-dir "$HERE" \
  --host "$HOST" --port "$PORT" --workers "$WORKERS" --lifespan on --no-access-log
