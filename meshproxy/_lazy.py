"""Module attributes that import their home module on first use (PEP 562).

A package's ``__init__`` keeps its public names while its heavy modules load only when
one of their names is used: ``meshproxy run`` starts without what it does not need.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, homes: Mapping[str, tuple[str, str]]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``homes`` maps a name to (module, attribute)."""
    namespace = vars(importlib.import_module(package))

    def __getattr__(name: str) -> Any:
        try:
            module, attr = homes[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        value = getattr(importlib.import_module(f"{package}.{module}"), attr)
        namespace[name] = value  # the next use is a plain global
        return value

    return __getattr__
