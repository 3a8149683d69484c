"""Folders of plug-ins: a package whose modules register themselves when imported (architectures
in ctclab.archs, decoders in ctclab.decoders). Importing them all is what finds a user's new file."""
from __future__ import annotations

import importlib
import pkgutil
import re
import sys
from pathlib import Path
from types import ModuleType

from .errors import CtclabError


def is_name(name: str) -> bool:
    """A plug-in name that can become a params.yaml section or a recorded value: a lowercase identifier."""
    return re.fullmatch(r"[a-z][a-z0-9_]*", name) is not None


def claim(registry: dict, name: str, entry, made_by, what: str) -> None:
    """registry[name] = entry, unless another class or function (`made_by`, compared by module and
    qualified name: the same one re-imported replaces itself) holds the name already."""
    def where(obj) -> str:
        return f"{obj.__module__}.{obj.__qualname__}"
    known = registry.get(name)
    if known is not None and where(known[1]) != where(made_by):
        raise CtclabError(f"{what} {name!r}: registered twice ({where(known[1])} and {where(made_by)}); rename one")
    registry[name] = (entry, made_by)


def import_all(package: ModuleType) -> None:
    """Import every module of `package` not yet imported; one that fails is named in one line."""
    for info in pkgutil.iter_modules(package.__path__):
        name = f"{package.__name__}.{info.name}"
        if name in sys.modules:
            continue
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001  (a user's module: any error is theirs to see, in one line)
            sys.modules.pop(name, None)
            raise CtclabError(f"{Path(info.module_finder.path) / info.name}.py: cannot be imported "
                              f"({type(err).__name__}: {err})") from None
