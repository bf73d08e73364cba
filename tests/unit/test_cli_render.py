"""The command line's small parts: durations, tables and progress bars."""

from __future__ import annotations

import argparse
import io
from datetime import timedelta

import pytest

from idempay.cli._context import duration
from idempay.cli._render import ProgressBar, table


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", timedelta(0)),
        ("90", timedelta(seconds=90)),
        ("90s", timedelta(seconds=90)),
        ("15m", timedelta(minutes=15)),
        ("1.5h", timedelta(minutes=90)),
        ("3d", timedelta(days=3)),
        ("1w", timedelta(days=7)),
    ],
)
def test_durations(text: str, expected: timedelta) -> None:
    assert duration(text) == expected


@pytest.mark.parametrize("text", ["", "-1", "abc", "3 days", "1y", "1e3"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        duration(text)


def test_a_table_aligns_its_columns_and_shows_none_as_a_dash() -> None:
    assert table(("order", "result"), [("o-1", "changed"), ("order-22", None)]) == (
        "order     result\no-1       changed\norder-22  -\n"
    )


def test_a_progress_bar_draws_on_a_terminal_only() -> None:
    silent = io.StringIO()
    ProgressBar(silent)("orders", 3, 10)  # a StringIO is not a terminal
    assert silent.getvalue() == ""

    out = io.StringIO()
    bar = ProgressBar(out, enabled=True)
    bar("backfill", 5, 10)
    bar("backfill", 10, 10)  # the last step is always drawn
    bar("events", 4, None)
    bar.close()
    lines = out.getvalue().split("\n")
    assert lines[0].endswith("backfill   [##############################] 10/10")
    assert "backfill   [###############...............] 5/10" in lines[0]
    assert lines[1] == "\revents     4"
    assert lines[2] == ""
