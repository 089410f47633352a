"""Method registry: ``-m NAME`` -> SSLMethod subclass.

A new objective is one module ``ssl_nnunet/methods/<name>.py`` whose class is decorated with ``@register``,
plus its line in the import list at the end of this file. A test (or a user's script) can register a class
defined anywhere with ``register(MyMethod)``.
"""
from __future__ import annotations

from typing import Dict, List, Type

from ssl_nnunet.methods.base import SSLMethod

_REGISTRY: Dict[str, Type[SSLMethod]] = {}


def register(cls: Type[SSLMethod]) -> Type[SSLMethod]:
    """Class decorator (or plain call) adding ``cls`` to the registry under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    _REGISTRY[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Remove a registered method (tests that register a toy objective clean up with this)."""
    _REGISTRY.pop(name, None)


def method_names() -> List[str]:
    """Registered method names, in registration order (the order of the imports below)."""
    return list(_REGISTRY)


def all_methods() -> Dict[str, Type[SSLMethod]]:
    """``{name: class}`` of every registered method, in registration order."""
    return dict(_REGISTRY)


def get_method(name: str) -> Type[SSLMethod]:
    if name not in _REGISTRY:
        raise KeyError(f"Unknown SSL method '{name}'. Implemented methods: {', '.join(method_names())}.")
    return _REGISTRY[name]


# the registry: one line per objective (each module's class is decorated with @register)
from ssl_nnunet.methods import mae  # noqa: E402,F401
from ssl_nnunet.methods import mim  # noqa: E402,F401
from ssl_nnunet.methods import voco  # noqa: E402,F401
from ssl_nnunet.methods import gvsl  # noqa: E402,F401
from ssl_nnunet.methods import alice  # noqa: E402,F401
