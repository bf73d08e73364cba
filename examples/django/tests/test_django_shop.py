"""The Django shop against the examples' HTTP contract (docs/http-contract.md), run for real:
the contract's tests live in ``tests/example_contract.py``, shared by every example shop."""

from __future__ import annotations

import pytest
from tests.example_contract import *  # noqa: F403 - the contract's tests and fixtures


@pytest.fixture(scope="module")
def example_name() -> str:
    return "django"
