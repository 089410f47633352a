"""Checks of a raw nnU-Net dataset with messages that name the bad file and say what to do."""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Tuple

import numpy as np
import SimpleITK as sitk

from ssl_nnunet.paths import nnunet_raw
from ssl_nnunet.utilities.errors import SSLInputError
from ssl_nnunet.utilities.file_io import load_json


BACKGROUND_ONLY_LABELS = {"background": 0}
_NOTIFIED_UNLABELED = set()  # dataset names whose "no labels key" notice was printed (one notice per process)


def with_default_labels(dataset_json: dict, dataset_name: str, verbose: bool = True) -> dict:
    """``dataset_json`` with ``"labels": {"background": 0}`` added when it has no ``labels`` key (an unlabeled
    dataset for pretraining). nnU-Net's planner, preprocessor and trainer need the key; the raw file is not
    changed. Prints one notice per dataset and process."""
    if "labels" in dataset_json:
        return dataset_json
    if verbose and dataset_name not in _NOTIFIED_UNLABELED:
        print(f"{dataset_name}: dataset.json has no 'labels' key; treating it as unlabeled (background only, "
              f"labels {BACKGROUND_ONLY_LABELS}).")
    _NOTIFIED_UNLABELED.add(dataset_name)
    return {**dataset_json, "labels": dict(BACKGROUND_ONLY_LABELS)}


def load_dataset_json(dataset_name: str, verbose: bool = True) -> dict:
    """The raw ``dataset.json`` of ``dataset_name``, checked; without a ``labels`` key it gets background-only
    labels (:func:`with_default_labels`)."""
    path = os.path.join(nnunet_raw(), dataset_name, "dataset.json")
    if not os.path.isfile(path):
        raise SSLInputError(f"{dataset_name}: dataset.json is missing ({path}). Every nnU-Net raw dataset needs one "
                            f"with 'channel_names' and 'file_ending' (see documentation/dataset_format.md; "
                            f"ssl_nnunet_make_dataset writes one for a folder of scans).")
    dataset_json = load_json(path, "dataset.json")
    if not isinstance(dataset_json, dict):
        raise SSLInputError(f"{path} must hold a JSON object with 'channel_names' and 'file_ending'.")
    for key in ("channel_names", "file_ending", "numTraining"):
        if key not in dataset_json:
            raise SSLInputError(f"{path} has no '{key}' key. Add it and rerun.")
    names = dataset_json["channel_names"]
    if not isinstance(names, dict) or not names or not all(str(k).isdigit() for k in names):
        raise SSLInputError(f"{path}: 'channel_names' must map channel numbers to names, like "
                            f"{{\"0\": \"CT\"}} or {{\"0\": \"T1\", \"1\": \"T2\"}}.")
    labels = dataset_json.get("labels", BACKGROUND_ONLY_LABELS)
    if not isinstance(labels, dict) or labels.get("background") != 0:
        raise SSLInputError(f"{path}: 'labels' must map label names to values with \"background\": 0 (got "
                            f"{labels!r}). For an unlabeled dataset leave the key out or use "
                            f"{{\"background\": 0}}.")
    return with_default_labels(dataset_json, dataset_name, verbose)


def _cases_from_dataset_key(dataset_name: str, dataset_json: dict) -> Dict[str, dict]:
    """nnU-Net v2's explicit file list: ``"dataset": {case: {"images": [...], "label": ...}}`` (paths relative to
    the raw dataset folder or absolute; ``label`` optional here)."""
    folder = os.path.join(nnunet_raw(), dataset_name)
    entries = dataset_json["dataset"]
    where = f"{os.path.join(folder, 'dataset.json')}: 'dataset'"
    if not isinstance(entries, dict) or not entries:
        raise SSLInputError(f"{where} must map case ids to {{\"images\": [files], \"label\": file}}; got "
                            f"{type(entries).__name__}. Fix it or remove the key to use imagesTr.")
    n_channels = len(dataset_json["channel_names"])

    def resolve(path):  # as nnunetv2's get_filenames_of_train_images_and_targets: $VARS expanded, relative to folder
        path = os.path.expandvars(path)
        return path if os.path.isabs(path) else os.path.abspath(os.path.join(folder, path))

    cases = {}
    for case in sorted(entries):
        entry = entries[case]
        images = entry.get("images") if isinstance(entry, dict) else None
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
            raise SSLInputError(f"{where}['{case}'] needs an 'images' list of file paths.")
        if len(images) != n_channels:
            raise SSLInputError(f"{where}['{case}'] lists {len(images)} image(s) but 'channel_names' declares "
                                f"{n_channels} channel(s).")
        images = [resolve(i) for i in images]
        missing = [i for i in images if not os.path.isfile(i)]
        if missing:
            raise SSLInputError(f"{where}['{case}']: file(s) {', '.join(missing)} do not exist. Fix the paths "
                                f"(relative paths are relative to {folder}) or remove the case.")
        label = entry.get("label")
        label = resolve(label) if isinstance(label, str) else None
        cases[case] = {"images": images, "label": label if label and os.path.isfile(label) else None}
    return cases


def list_cases(dataset_name: str, dataset_json: dict) -> Dict[str, dict]:
    """``{case_id: {"images": [channel files], "label": path or None}}`` from imagesTr/labelsTr, or from the
    ``dataset`` key of dataset.json when it has one (nnU-Net v2's explicit file list).

    Raises :class:`SSLInputError` for an empty ``imagesTr`` or a case with a missing channel file.
    """
    if "dataset" in dataset_json:
        return _cases_from_dataset_key(dataset_name, dataset_json)
    folder = os.path.join(nnunet_raw(), dataset_name)
    images_dir = os.path.join(folder, "imagesTr")
    ending = dataset_json["file_ending"]
    n_channels = len(dataset_json["channel_names"])
    files = sorted(f for f in os.listdir(images_dir) if f.endswith(ending)) if os.path.isdir(images_dir) else []
    if not files:
        raise SSLInputError(f"{dataset_name}: no '*_0000{ending}' images in {images_dir}. Put the training images "
                            f"there (nnU-Net naming: CASE_XXXX{ending}, one file per channel).")
    case_ids = sorted({f[:-len(ending) - 5] for f in files if len(f) > len(ending) + 5 and f[-len(ending) - 5] == "_"})
    if not case_ids:
        raise SSLInputError(f"{dataset_name}: files in {images_dir} do not follow nnU-Net naming CASE_XXXX{ending}.")
    cases = {}
    for case in case_ids:
        images = [os.path.join(images_dir, f"{case}_{c:04d}{ending}") for c in range(n_channels)]
        missing = [p for p in images if not os.path.isfile(p)]
        if missing:
            raise SSLInputError(f"{dataset_name}: case '{case}' lacks channel file(s) {', '.join(missing)}; "
                                f"dataset.json declares {n_channels} channel(s). Add the files or remove the case.")
        label = os.path.join(folder, "labelsTr", case + ending)
        cases[case] = {"images": images, "label": label if os.path.isfile(label) else None}
    return cases


def _nonfinite_in_nifti(path: str) -> int:
    """Count NaN/inf voxels of a NIfTI file as stored (ITK's NIfTI reader silently turns them into 0)."""
    if not path.endswith((".nii", ".nii.gz")):
        return 0
    import nibabel
    data = np.asanyarray(nibabel.load(path).dataobj)
    return int((~np.isfinite(data)).sum()) if np.issubdtype(data.dtype, np.floating) else 0


def read_checked_case(case: str, image_files: List[str], label_file: Optional[str]
                      ) -> Tuple[np.ndarray, Optional[np.ndarray], dict]:
    """Read one case (all channels) and check it. Returns ``(images (C, x, y, z) in SimpleITK array order,
    label or None, info)`` with ``info`` = spacing (array order), direction, shape."""
    arrays, spacing, direction = [], None, None
    for path in image_files:
        try:
            itk = sitk.ReadImage(path)
        except Exception as e:  # SimpleITK raises RuntimeError with a long C++ trace
            raise SSLInputError(f"Case '{case}': cannot read image file {path} ({str(e).splitlines()[0][:200]}). "
                                f"The file is missing, corrupt or not a medical image format; replace or remove it.")
        if itk.GetDimension() != 3 or itk.GetNumberOfComponentsPerPixel() != 1:
            raise SSLInputError(f"Case '{case}': {path} is a {itk.GetDimension()}D image with "
                                f"{itk.GetNumberOfComponentsPerPixel()} component(s); ssl_nnunet pretrains 3D "
                                f"networks and needs single-component 3D volumes (one file per channel).")
        arr = sitk.GetArrayFromImage(itk).astype(np.float32)
        n_bad = int((~np.isfinite(arr)).sum()) or _nonfinite_in_nifti(path)
        if n_bad:
            raise SSLInputError(f"Case '{case}': {path} contains {n_bad} NaN/inf voxel(s). Replace them (e.g. by the "
                                f"background value) or remove the case, then rerun.")
        this_spacing = list(itk.GetSpacing())[::-1]
        this_direction = list(itk.GetDirection())
        if spacing is None:
            spacing, direction, shape = this_spacing, this_direction, arr.shape
        else:
            problems = []
            if arr.shape != shape:
                problems.append(f"shape {arr.shape} vs {shape}")
            if not np.allclose(this_spacing, spacing, rtol=1e-4):
                problems.append(f"spacing {this_spacing} vs {spacing}")
            if not np.allclose(this_direction, direction, atol=1e-4):
                problems.append("orientation (direction matrix)")
            if problems:
                raise SSLInputError(f"Case '{case}': channel file {path} differs from {image_files[0]} in "
                                    f"{', '.join(problems)}. All channels of a case must share the same grid; "
                                    f"resample them to one grid and rerun.")
        arrays.append(arr)
    label = None
    if label_file is not None:
        try:
            label_itk = sitk.ReadImage(label_file)
        except Exception as e:
            raise SSLInputError(f"Case '{case}': cannot read label file {label_file} "
                                f"({str(e).splitlines()[0][:200]}). Replace or remove it.")
        label = sitk.GetArrayFromImage(label_itk)
        if label.shape != shape:
            raise SSLInputError(f"Case '{case}': label {label_file} has shape {label.shape}, image has {shape}.")
    info = {"spacing": spacing, "direction": direction, "shape": list(shape)}
    return np.stack(arrays), label, info
