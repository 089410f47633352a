"""Dataset fingerprint that works without labels (``ssl_nnunet_extract_fingerprint``).

Writes ``nnUNet_preprocessed/DatasetXXX/dataset_fingerprint.json`` with the keys nnunetv2's planners read
(``spacings``, ``shapes_after_crop``, ``foreground_intensity_properties_per_channel``,
``median_relative_size_after_cropping``) plus an ``ssl_nnunet`` block (case ids, direction matrices, shapes
before cropping, the source of the foreground mask and per-channel modality).

Foreground for the intensity statistics: the labels (> 0) where a case has them, else a body mask
(CT: voxels above -500 HU; other modalities: Otsu threshold of the first channel inside the nonzero region).
"""
from __future__ import annotations

import multiprocessing
import os
from typing import Dict, List, Optional

import numpy as np
from tqdm import tqdm

from ssl_nnunet.experiment_planning.dataset_checks import list_cases, load_dataset_json, read_checked_case
from ssl_nnunet.paths import nnunet_preprocessed
from ssl_nnunet.utilities.file_io import atomic_save_json, dataset_name_from_id

TOTAL_INTENSITY_SAMPLES = 10_000_000
CT_BODY_THRESHOLD_HU = -500.0


def is_ct(channel_name: str) -> bool:
    return channel_name.strip().upper() == "CT"


def body_mask(image: np.ndarray, ct: bool) -> np.ndarray:
    """Boolean body mask of one channel ``image`` (x, y, z): CT > -500 HU, else Otsu inside the nonzero region."""
    if ct:
        return image > CT_BODY_THRESHOLD_HU
    from skimage.filters import threshold_otsu
    nonzero = image != 0
    values = image[nonzero]
    if values.size < 2 or values.min() == values.max():
        return nonzero
    return nonzero & (image > threshold_otsu(values))


def analyze_case(case: str, image_files: List[str], label_file: Optional[str], channel_is_ct: List[bool],
                 num_samples: int, seed: int = 1234) -> dict:
    """Fingerprint of one case; runs in a worker process."""
    from nnunetv2.preprocessing.cropping.cropping import crop_to_nonzero
    images, label, info = read_checked_case(case, image_files, label_file)
    seg = None if label is None else label[None].astype(np.int16)
    cropped, seg_cropped, _ = crop_to_nonzero(images, seg)
    if label is not None:
        foreground = seg_cropped[0] > 0
        source = "labels"
    else:
        foreground = body_mask(cropped[0], channel_is_ct[0])
        source = "body_mask"
    if not foreground.any():
        foreground = np.ones_like(foreground)
        source += "_empty_fallback_all"
    rng = np.random.RandomState(seed)
    samples = [rng.choice(c[foreground], num_samples, replace=True) for c in cropped]
    return {
        "case": case,
        "spacing": info["spacing"],
        "direction": info["direction"],
        "shape_before_crop": list(images.shape[1:]),
        "shape_after_crop": list(cropped.shape[1:]),
        "relative_size_after_cropping": float(np.prod(cropped.shape[1:]) / np.prod(images.shape[1:])),
        "foreground_source": source,
        "samples": samples,
    }


def _analyze_star(args):
    return analyze_case(*args)


def intensity_properties(values: np.ndarray) -> Dict[str, float]:
    """nnU-Net's per-channel foreground statistics of a 1D sample."""
    p005, median, p995 = np.percentile(values, (0.5, 50.0, 99.5))
    return {"mean": float(values.mean()), "median": float(median), "std": float(values.std()),
            "min": float(values.min()), "max": float(values.max()),
            "percentile_99_5": float(p995), "percentile_00_5": float(p005)}


def extract_fingerprint(dataset: str | int, num_processes: int = 2, overwrite: bool = True,
                        verbose: bool = True) -> dict:
    """Fingerprint ``dataset`` and write ``dataset_fingerprint.json`` atomically. Returns the fingerprint."""
    dataset_name = dataset_name_from_id(dataset)
    out_file = os.path.join(nnunet_preprocessed(), dataset_name, "dataset_fingerprint.json")
    dataset_json = load_dataset_json(dataset_name)
    cases = list_cases(dataset_name, dataset_json)
    if os.path.isfile(out_file) and not overwrite:
        from ssl_nnunet.utilities.file_io import load_json
        return load_json(out_file, "fingerprint")
    channel_names = [dataset_json["channel_names"][k] for k in sorted(dataset_json["channel_names"], key=int)]
    channel_is_ct = [is_ct(n) for n in channel_names]
    per_case_samples = max(1000, int(TOTAL_INTENSITY_SAMPLES // len(cases)))
    jobs = [(c, v["images"], v["label"], channel_is_ct, per_case_samples) for c, v in cases.items()]
    results = []
    progress = tqdm(total=len(jobs), desc=f"Fingerprint {dataset_name}", disable=not verbose)
    if num_processes <= 1:
        for job in jobs:
            results.append(analyze_case(*job))
            progress.update()
    else:
        with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
            for r in pool.imap(_analyze_star, jobs):
                results.append(r)
                progress.update()
    progress.close()

    n_channels = len(channel_names)
    props = {str(c): intensity_properties(np.concatenate([r["samples"][c] for r in results]))
             for c in range(n_channels)}
    directions = [r["direction"] for r in results]
    inconsistent = [r["case"] for r in results if not np.allclose(r["direction"], directions[0], atol=1e-3)]
    if inconsistent and verbose:
        print(f"WARNING: {len(inconsistent)} case(s) have a different orientation than {results[0]['case']} "
              f"(e.g. {inconsistent[:3]}). nnU-Net does not reorient; SSL objectives that match anatomy "
              f"across cases (anchored regions, paired crops) assume a consistent orientation.")
    fingerprint = {
        "spacings": [r["spacing"] for r in results],
        "shapes_after_crop": [r["shape_after_crop"] for r in results],
        "foreground_intensity_properties_per_channel": props,
        "median_relative_size_after_cropping": float(np.median([r["relative_size_after_cropping"] for r in results])),
        "ssl_nnunet": {
            "case_identifiers": [r["case"] for r in results],
            "shapes_before_crop": [r["shape_before_crop"] for r in results],
            "directions": directions,
            "orientation_consistent": not inconsistent,
            "foreground_source": [r["foreground_source"] for r in results],
            "channel_names": channel_names,
            "modality_is_ct": channel_is_ct,
            "has_labels": all(v["label"] is not None for v in cases.values()),
        },
    }
    atomic_save_json(fingerprint, out_file)
    if verbose:
        print(f"Fingerprint of {len(results)} case(s) written to {out_file}")
    return fingerprint
