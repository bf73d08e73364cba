"""Generated files (docs tables, sync twins) match their sources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_generated_docs_are_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gen_docs.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_order_status_is_documented() -> None:
    from idempay.core.orders import OrderStatus

    text = (ROOT / "docs" / "concepts.md").read_text(encoding="utf-8")
    for status in OrderStatus:
        assert f"| `{status.value}` |" in text


def test_sync_twins_are_generated_from_their_async_sources() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "unasync.py"), "--check"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
