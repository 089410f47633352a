"""nnU-Net data folders, read from the environment on every call.

nnunetv2 (2.8.1) reads ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` from ``os.environ``
each time it uses them (its ``nnunetv2.paths`` holds lazy ``os.PathLike`` objects, not strings), and so do
:func:`nnunet_raw`, :func:`nnunet_preprocessed` and :func:`nnunet_results`: a command that sets one of the
variables for a step (the transfer benchmark does) is seen by both. This module fills in defaults in
``os.environ`` (so child processes such as ``nnUNetv2_train`` see them too); the package's ``__init__``
imports it first. When a variable is unset we fall back to ``./ssl_nnunet_data/<name>`` (relative to the
current working directory) and print one notice naming the folders.
"""
from __future__ import annotations

import os
import sys

_ENV_NAMES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
DEFAULT_ROOT_NAME = "ssl_nnunet_data"
_notice_printed = False


def _apply_defaults() -> None:
    global _notice_printed
    missing = [name for name in _ENV_NAMES if not os.environ.get(name)]
    if not missing:
        return
    root = os.path.abspath(DEFAULT_ROOT_NAME)
    for name in missing:
        os.environ[name] = os.path.join(root, name)
        os.makedirs(os.environ[name], exist_ok=True)
    if not _notice_printed:
        _notice_printed = True
        print(f"ssl_nnunet: {', '.join(missing)} not set; using {root}/<name>. "
              f"Export these variables to use other folders.", file=sys.stderr)


def _folder(name: str) -> str:
    if not os.environ.get(name):
        _apply_defaults()
    return os.environ[name]


def nnunet_raw() -> str:
    """``$nnUNet_raw`` now (default ``./ssl_nnunet_data/nnUNet_raw``)."""
    return _folder("nnUNet_raw")


def nnunet_preprocessed() -> str:
    """``$nnUNet_preprocessed`` now (default ``./ssl_nnunet_data/nnUNet_preprocessed``)."""
    return _folder("nnUNet_preprocessed")


def nnunet_results() -> str:
    """``$nnUNet_results`` now (default ``./ssl_nnunet_data/nnUNet_results``)."""
    return _folder("nnUNet_results")


_apply_defaults()
