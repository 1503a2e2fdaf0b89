"""Packages that import their heavy modules on first use (PEP 562 module ``__getattr__``).

A model package re-exports its network, predictor and transforms. The CPU stages only need the
transforms (numpy, Pillow, OpenCV); importing the package eagerly would bring torch and timm into
every CPU worker (~270 MB of private memory and 9–17 s of import per Ray worker on 2 cores).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable
from typing import Any


def lazy_exports(package: str, where: dict[str, Iterable[str]]) -> Callable[[str], Any]:
    """The ``__getattr__`` of ``package`` that resolves each name of ``where[module]`` by
    importing ``module`` (once; the value is then set on the package)."""
    module_of = {name: module for module, names in where.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = module_of.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
