"""Fixtures for the observability tests: observers registered for one test only."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from tests.observability.recording import Recorder

from idempay.observability import Observer, add_observer, remove_observer


@pytest.fixture
def observe() -> Iterator[Callable[[Observer], None]]:
    """Register observers for the test; they are removed when it ends, whatever happens."""
    added: list[Observer] = []

    def register(observer: Observer) -> None:
        add_observer(observer)
        added.append(observer)

    yield register
    for observer in added:
        remove_observer(observer)


@pytest.fixture
def recorder(observe: Callable[[Observer], None]) -> Recorder:
    found = Recorder()
    observe(found)
    return found
