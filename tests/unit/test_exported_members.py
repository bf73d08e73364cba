"""The public surface: every ``__all__`` is sorted, complete and resolvable."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import idempay


def isort_key(name: str) -> tuple[int, str]:
    """Constants, then classes, then the rest, each alphabetically (ruff's RUF022 order)."""
    if name.isupper() and len(name) > 1:
        return (0, name)
    if name[:1].isupper():
        return (1, name)
    return (2, name)


PUBLIC_MODULES = sorted(
    name
    for _, name, _ in pkgutil.walk_packages(idempay.__path__, "idempay.")
    if not any(part.startswith("_") for part in name.split("."))
)


def test_top_level_all_is_sorted_and_resolves() -> None:
    names = idempay.__all__
    assert names == sorted(names, key=isort_key)
    for name in names:
        assert hasattr(idempay, name), name


def test_top_level_exports_every_error() -> None:
    from idempay import errors

    for name in errors.__all__:
        if name.endswith("Error"):
            assert name in idempay.__all__, name


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_module_all_is_sorted_and_resolves(module_name: str) -> None:
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    if names is None:
        assert module.__name__ == "idempay.core", "every public module declares __all__"
        return
    assert len(names) == len(set(names))
    assert list(names) == sorted(names, key=isort_key)
    for name in names:
        assert hasattr(module, name), f"{module_name}.{name}"
