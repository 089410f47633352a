"""Method registry: ``-m NAME`` -> SSLMethod subclass.

A new objective needs one module ``ssl_nnunet/methods/<name>.py`` whose class is decorated with
``@register``; ``<name>`` must be listed in ``_METHOD_MODULES`` below.
"""
from __future__ import annotations

import importlib
import importlib.util
from typing import Dict, Type

from ssl_nnunet.methods.base import SSLMethod

_REGISTRY: Dict[str, Type[SSLMethod]] = {}
# modules imported lazily by get_method(); each calls register() for its class
_METHOD_MODULES = {name: f"ssl_nnunet.methods.{name}" for name in ("mae", "mim", "voco", "gvsl", "alice")}
ALL_METHODS = ("mae", "mim", "voco", "gvsl", "alice")


def register(cls: Type[SSLMethod]) -> Type[SSLMethod]:
    """Class decorator adding ``cls`` to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list:
    """Methods whose module exists in this installation."""
    return sorted(n for n, m in _METHOD_MODULES.items() if importlib.util.find_spec(m) is not None)


def get_method(name: str) -> Type[SSLMethod]:
    if name not in available_methods():
        raise KeyError(f"Unknown SSL method '{name}'. Implemented methods: {', '.join(available_methods())}.")
    importlib.import_module(_METHOD_MODULES[name])
    return _REGISTRY[name]
