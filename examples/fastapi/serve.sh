#!/usr/bin/env bash
# Start the example shop in the foreground: serve.sh HOST PORT [WORKERS]
#
# Applies idempay's migrations first (idempotent), then execs uvicorn, so that a signal to this
# script's PID reaches the server. Configuration: see README.md (IDEMPAY_DATABASE_URL,
# IDEMPAY_LOCK_URL, STRIPE_API_KEY, STRIPE_API_BASE, STRIPE_WEBHOOK_SECRET).
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
HERE=$(cd "$(dirname "$0")" && pwd)
"$PYTHON" -m idempay db upgrade --url "$IDEMPAY_DATABASE_URL" >/dev/null
exec "$PYTHON" -m uvicorn --factory shop:create_app --app-dir "$HERE" \
  --host "$HOST" --port "$PORT" --workers "$WORKERS" --no-access-log
