"""``python -m idempay``: the same as the ``idempay`` command."""

from __future__ import annotations

from idempay.cli import main

raise SystemExit(main())
