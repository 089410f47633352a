"""nnU-Net data folders.

nnunetv2 (2.8.1) reads ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` from the environment
when it uses them; this module fills in defaults in ``os.environ`` (so child processes such as
``nnUNetv2_train`` see them too). The package's ``__init__`` imports it first. When a variable is unset we fall back to ``./ssl_nnunet_data/<name>``
(relative to the current working directory) and print one notice naming the folders.
"""
from __future__ import annotations

import os
import sys

_ENV_NAMES = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
DEFAULT_ROOT_NAME = "ssl_nnunet_data"


def _apply_defaults() -> None:
    missing = [name for name in _ENV_NAMES if not os.environ.get(name)]
    if not missing:
        return
    root = os.path.abspath(DEFAULT_ROOT_NAME)
    for name in missing:
        os.environ[name] = os.path.join(root, name)
        os.makedirs(os.environ[name], exist_ok=True)
    print(f"ssl_nnunet: {', '.join(missing)} not set; using {root}/<name>. "
          f"Export these variables to use other folders.", file=sys.stderr)


_apply_defaults()

nnUNet_raw: str = os.environ["nnUNet_raw"]
nnUNet_preprocessed: str = os.environ["nnUNet_preprocessed"]
nnUNet_results: str = os.environ["nnUNet_results"]
