"""Atomic writes and dataset lookup shared by all commands."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from typing import Any, Sequence, Union

from ssl_nnunet.constants import CONFIGURATION, FINETUNE_PLANS, SSL_PLANS
from ssl_nnunet.paths import nnunet_preprocessed, nnunet_raw, nnunet_results
from ssl_nnunet.utilities.errors import SSLInputError


def _json_default(obj: Any):
    import numpy as np
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, (np.ndarray, tuple)):
        return obj.tolist() if isinstance(obj, np.ndarray) else list(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


def atomic_save_json(obj: Any, path: str, indent: int = 2) -> None:
    """Write JSON to ``path`` via a temporary file in the same folder and ``os.replace``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=indent, sort_keys=False, default=_json_default)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write(path: str, write) -> None:
    """Call ``write(tmp_path)`` for a temporary name next to ``path``, then rename it to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp_{os.getpid()}_{os.path.basename(path)}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_torch_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary name in the same folder, then rename."""
    import torch
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_copy(src: str, dst: str) -> None:
    atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and ``os.replace``."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def ssl_output_folder(dataset_name: str, method: str, plans_name: str = SSL_PLANS,
                      configuration: str = CONFIGURATION, datasets: Sequence[str] = ()) -> str:
    """``nnUNet_results/<Dataset>/SSL_<method>__<plans>__<configuration>``: the SSL trainer's output folder.
    A run on several datasets (``datasets``, the first is ``dataset_name``) lives in the first dataset's results
    folder, named ``SSL_<method>__<plans>__<configuration>__multi_<id>_<id>...`` (the ids of all, in -d order)."""
    name = f"SSL_{method}__{plans_name}__{configuration}"
    if len(datasets) > 1:
        name += "__multi_" + "_".join(d[len("Dataset"):].split("_", 1)[0] for d in datasets)
    return os.path.join(nnunet_results(), dataset_name, name)


@contextlib.contextmanager
def atomic_directory(final_dir: str):
    """Build a folder under a temporary sibling name and swap it in only when the block succeeds; a failure
    or interruption leaves ``final_dir`` as it was and removes the temporary folder."""
    parent = os.path.dirname(os.path.abspath(final_dir))
    os.makedirs(parent, exist_ok=True)
    base = os.path.basename(os.path.abspath(final_dir))
    tmp = os.path.join(parent, f".{base}.tmp_{os.getpid()}")
    old = os.path.join(parent, f".{base}.old_{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.isdir(final_dir):
            os.replace(final_dir, old)
        os.replace(tmp, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_plans(path: str, dataset: Union[int, str]) -> dict:
    """A plans file of ``ssl_nnunet_plan_experiment`` with its ``3d_fullres`` configuration; the errors name
    the command that writes it for ``dataset``."""
    if not os.path.isfile(path):
        raise SSLInputError(f"Plans file {path} not found. Run ssl_nnunet_plan_and_preprocess -d {dataset} "
                            f"first (it writes {SSL_PLANS}.json and {FINETUNE_PLANS}.json).")
    plans = load_json(path, "plans")
    if CONFIGURATION not in plans.get("configurations", {}):
        raise SSLInputError(f"{path} has no '{CONFIGURATION}' configuration; re-run ssl_nnunet_plan_experiment "
                            f"-d {dataset}.")
    return plans


def load_json(path: str, what: str = "file") -> Any:
    """Load JSON with an error naming the file when it is missing or invalid."""
    if not os.path.isfile(path):
        raise SSLInputError(f"{what} not found: {path}.")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise SSLInputError(f"{what} {path} is not valid JSON ({e}). Fix or recreate it.") from e


def _datasets_in(folder: str) -> list:
    if not folder or not os.path.isdir(folder):
        return []
    return sorted(d for d in os.listdir(folder) if re.fullmatch(r"Dataset\d{3}_.+", d)
                  and os.path.isdir(os.path.join(folder, d)))


def dataset_name_from_id(dataset: Union[int, str]) -> str:
    """``1`` / ``"1"`` / ``"Dataset001_X"`` -> ``"Dataset001_X"``, looked up in nnUNet_raw and
    nnUNet_preprocessed. Raises :class:`SSLInputError` listing the datasets that exist."""
    text = str(dataset)
    if text.startswith("Dataset"):
        return text
    if not text.isdigit():
        raise SSLInputError(f"'{dataset}' is not a dataset id: pass a number (e.g. -d 1) or a full name "
                            f"(e.g. -d Dataset001_Name).")
    prefix = f"Dataset{int(text):03d}_"
    raw, preprocessed = nnunet_raw(), nnunet_preprocessed()
    found = sorted(set(_datasets_in(raw) + _datasets_in(preprocessed) + _datasets_in(nnunet_results())))
    matches = sorted({d for d in found if d.startswith(prefix)})
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise SSLInputError(f"Dataset id {int(text)} is ambiguous: {', '.join(matches)}. Pass the full name.")
    listing = ", ".join(found) if found else "none"
    raise SSLInputError(
        f"Dataset id {int(text)} not found in nnUNet_raw={raw} or nnUNet_preprocessed={preprocessed}. "
        f"Datasets found: {listing}. Check the id or the nnUNet_raw environment variable "
        f"(make the demo data with ssl_nnunet_make_demo_dataset).")
