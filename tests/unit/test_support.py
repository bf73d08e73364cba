"""Clocks and the lazy import of optional dependencies."""

from __future__ import annotations

import subprocess
import sys
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from idempay._lazy import require
from idempay.clock import Clock, FrozenClock, SystemClock
from idempay.errors import ConfigurationError, MissingDependencyError


def test_system_clock_is_aware_utc() -> None:
    now = SystemClock().now()
    assert now.tzinfo is UTC
    assert isinstance(SystemClock(), Clock)


def test_frozen_clock_moves_only_forward_when_told() -> None:
    clock = FrozenClock(datetime(2026, 1, 1, tzinfo=UTC))
    assert clock.now() == clock.now()
    assert clock.advance(timedelta(seconds=2)) == datetime(2026, 1, 1, 0, 0, 2, tzinfo=UTC)
    assert clock.advance(1.5) == datetime(2026, 1, 1, 0, 0, 3, 500000, tzinfo=UTC)
    with pytest.raises(ConfigurationError):
        clock.advance(-1)
    with pytest.raises(ConfigurationError):
        FrozenClock(datetime(2026, 1, 1))  # noqa: DTZ001


def test_frozen_clock_is_thread_safe() -> None:
    clock = FrozenClock()
    start = clock.now()
    n = 8
    barrier = threading.Barrier(n)

    def tick() -> None:
        barrier.wait()
        for _ in range(1000):
            clock.advance(timedelta(microseconds=1))

    threads = [threading.Thread(target=tick) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert clock.now() - start == timedelta(microseconds=n * 1000)


def test_require_names_the_extra_of_a_missing_module() -> None:
    with pytest.raises(MissingDependencyError) as err:
        require("idempay_no_such_driver.sub", extra="postgres")
    assert err.value.extra == "postgres"
    assert "idempay[postgres]" in str(err.value)
    assert require("json", extra="none").dumps([1]) == "[1]"


def test_require_lets_a_broken_installed_package_fail_as_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A module that exists but fails inside on a missing *other* module is a bug, not a
    # missing extra: its ImportError must not be disguised.
    (tmp_path / "idempay_probe_broken.py").write_text("import idempay_probe_absent_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ImportError) as err:
        require("idempay_probe_broken", extra="x")
    assert not isinstance(err.value, MissingDependencyError)
    assert err.value.name == "idempay_probe_absent_dependency"


def test_import_idempay_loads_no_driver_or_framework() -> None:
    code = (
        "import sys, idempay, idempay.core.keys, idempay.core.strictjson, idempay.core.signature,"
        " idempay.core.events, idempay.core.orders, idempay.memory, idempay.protocols\n"
        "heavy = {'sqlalchemy', 'redis', 'stripe', 'psycopg', 'pymysql', 'aiomysql', 'fastapi',"
        " 'starlette', 'django', 'flask', 'asyncio'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    # asyncio is allowed only through idempay.memory's async backends; the core never needs it.
    assert out.strip() in ("[]", "['asyncio']")


def test_the_pure_core_imports_nothing_but_the_standard_library_and_itself() -> None:
    code = (
        "import sys\n"
        "before = set(sys.modules)\n"
        "import idempay.core.keys, idempay.core.strictjson, idempay.core.signature,"
        " idempay.core.events, idempay.core.orders, idempay.core.records, idempay.core.audit,"
        " idempay.core.models\n"
        "new = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "std = set(sys.stdlib_module_names)\n"
        "ours = ('idempay', 'typing_extensions')\n"
        "print(sorted(m for m in new if m not in std and m not in ours))\n"
        "print('asyncio' in sys.modules, 'idempay.memory' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[0] == "[]"
    assert out[1] == "False False"
