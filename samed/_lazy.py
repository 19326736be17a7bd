"""Lazy package exports (PEP 562), shared by ``samed`` and its packages.

A package lists ``name -> submodule`` and gets a module ``__getattr__`` that imports the
submodule on first use, so that importing the package (``samed --help``, the plugin's menus)
does not load torch, MONAI or pydicom before a command needs them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    package: str, table: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` exporting ``table``'s names lazily.

    Args:
        package: the package's ``__name__``.
        table: exported name -> module that defines it, absolute (``"samed.io.readers"``) or
            relative to ``package`` when it starts with a dot (``".readers"``).
        namespace: the package's ``globals()``; a resolved name is stored there so later
            look-ups skip ``__getattr__``.
    """

    def __getattr__(name: str) -> Any:
        if name in table:
            value = getattr(importlib.import_module(table[name], package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted({*namespace, *table})

    return __getattr__, __dir__
