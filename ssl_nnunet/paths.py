"""nnU-Net data folders.

nnunetv2 reads ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` once, when
``nnunetv2.paths`` is first imported, so this module must run before any nnunetv2 import. The package's
``__init__`` imports it first. When a variable is unset we fall back to ``./ssl_nnunet_data/<name>``
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
    if "nnunetv2.paths" in sys.modules:
        # nnunetv2 was imported first and captured None; update its module globals too.
        import nnunetv2.paths as nnunet_paths
        for name in missing:
            setattr(nnunet_paths, name, os.environ[name])
    print(f"ssl_nnunet: {', '.join(missing)} not set; using {root}/<name>. "
          f"Export these variables to use other folders.", file=sys.stderr)


_apply_defaults()

nnUNet_raw: str = os.environ["nnUNet_raw"]
nnUNet_preprocessed: str = os.environ["nnUNet_preprocessed"]
nnUNet_results: str = os.environ["nnUNet_results"]
