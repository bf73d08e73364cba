"""Headless Chromium double-clicks Pay on the FastAPI shop: one PaymentIntent, one charge (the
test lives in ``tests/example_browser.py``, shared by every example shop)."""

from __future__ import annotations

import pytest
from tests.example_browser import *  # noqa: F403 - the browser test and its fixtures


@pytest.fixture(scope="module")
def example_name() -> str:
    return "fastapi"
