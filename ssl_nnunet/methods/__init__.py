"""Method registry: ``-m NAME`` -> SSLMethod subclass.

A new objective needs one module in this package and one ``register`` call in it, plus its module name
in ``_METHOD_MODULES`` below.
"""
from __future__ import annotations

import importlib
from typing import Dict, Type

from ssl_nnunet.methods.base import SSLMethod

_REGISTRY: Dict[str, Type[SSLMethod]] = {}
# modules imported lazily by get_method(); each calls register() for its class
_METHOD_MODULES = {"mae": "ssl_nnunet.methods.mae"}
ALL_METHODS = ("mae", "mim", "voco", "gvsl", "alice")


def register(cls: Type[SSLMethod]) -> Type[SSLMethod]:
    """Class decorator adding ``cls`` to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def available_methods() -> list:
    return sorted(_METHOD_MODULES)


def get_method(name: str) -> Type[SSLMethod]:
    if name not in _METHOD_MODULES:
        raise KeyError(f"Unknown SSL method '{name}'. Implemented methods: {', '.join(available_methods())}.")
    importlib.import_module(_METHOD_MODULES[name])
    return _REGISTRY[name]
