"""Optional dependencies, imported only when the feature that needs them is used."""

from __future__ import annotations

import importlib
from types import ModuleType

from idempay.errors import MissingDependencyError

__all__ = ["require"]


def require(module: str, *, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming ``extra``.

    ``import idempay`` never imports a driver or a framework; each backend and adapter calls
    this on first use, so a missing one fails with the command that installs it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        # Only a missing top-level package is "not installed"; an ImportError raised from
        # inside an installed package is a real bug and must surface unchanged.
        missing = getattr(exc, "name", None)
        if missing is not None and module.split(".", maxsplit=1)[0] == missing.split(".")[0]:
            raise MissingDependencyError(module, extra) from exc
        raise
