"""The in-memory demo: it holds every invariant, and its checks can see a broken one."""

from __future__ import annotations

import io
import subprocess
import sys
from dataclasses import replace

import pytest

from idempay import _demo
from idempay.cli import main
from idempay.core.orders import Observation, OrderState, Transition


def test_the_storm_keeps_every_invariant() -> None:
    report = _demo.run_demo(orders=60, workers=4, seed=3)
    assert report.violations == []
    # Every extra click was absorbed: one checkout executed per order.
    assert report.clicks_absorbed == report.clicks - report.orders
    assert report.duplicates_absorbed > 0
    assert 0 < report.paid <= report.orders
    assert report.effects_sent >= report.paid
    assert report.summary().startswith("violations=0 orders=60 ")


def test_a_broken_state_machine_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    real_apply = _demo.apply

    def forgetful(state: OrderState, observation: Observation) -> Transition:
        # Drops every refund: the orders that were refunded end in the wrong state.
        transition = real_apply(state, observation)
        if transition.after.amount_refunded:
            return replace(transition, after=replace(transition.after, amount_refunded=0))
        return transition

    monkeypatch.setattr(_demo, "apply", forgetful)
    report = _demo.run_demo(orders=60, workers=2, seed=3)
    assert report.violations
    assert report.summary().startswith(f"violations={len(report.violations)} ")


def test_cli_demo_prints_the_table_and_the_summary_last(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--orders", "20", "--workers", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any("duplicate deliveries absorbed" in line for line in lines)
    assert lines[-1].startswith("violations=0 orders=20 ")


def test_cli_refuses_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["demo", "--orders", "0"])
    assert exit_.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err


def test_python_m_idempay_has_help_and_version() -> None:
    help_ = subprocess.run(
        [sys.executable, "-m", "idempay", "--help"], capture_output=True, text=True, check=True
    ).stdout
    assert "demo" in help_
    version = subprocess.run(
        [sys.executable, "-m", "idempay", "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert version.startswith("idempay ")


def test_progress_goes_to_the_given_stream() -> None:
    out = io.StringIO()
    _demo.run_demo(orders=5, workers=1, seed=1, out=out)
    assert "webhooks" in out.getvalue()
