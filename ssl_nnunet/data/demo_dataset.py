"""Two small synthetic nnU-Net v2 raw datasets made from nilearn's bundled MNI152 template.

``Dataset900_DemoBrainSSL`` (unlabeled, for pretraining) and ``Dataset901_DemoBrainSeg`` (labeled with
four classes, for fine-tuning) let the whole pipeline run without downloading anything. Every
pseudo-subject is the MNI152 2009 T1 template (shipped inside the nilearn package, so no network access
is needed) after a random smooth elastic deformation, a random affine transform, a multiplicative bias
field, a random contrast change and Gaussian noise, resampled onto an isotropic grid (3 mm by default).

Conventions used throughout this module:

* volumes are numpy arrays with axes ``(X, Y, Z)`` that follow RAS+ world axes (the template's voxel
  order); they are transposed to SimpleITK's ``(Z, Y, X)`` only when written;
* "world" coordinates are RAS+ millimetres (MNI space). Files are written in ITK's LPS convention
  (direction ``diag(-1, -1, 1)``), so every viewer places them at their MNI position.

Every subject draws its random numbers from ``numpy.random.SeedSequence([seed, dataset_id, case])``; the
same seed therefore gives byte-identical arrays and the two datasets never share a subject.

Command line: ``ssl_nnunet_make_demo_dataset [--n_unlabeled 40] [--n_labeled 20] [--spacing 3.0]
[--seed 0] [--overwrite]`` (see ``documentation/demo.md``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
from dataclasses import dataclass
from functools import lru_cache
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from ssl_nnunet.constants import DEMO_LABELED_DATASET, DEMO_LABELED_ID, DEMO_UNLABELED_DATASET, DEMO_UNLABELED_ID
from ssl_nnunet.paths import nnunet_raw  # sets default nnUNet_* variables before nnunetv2 is imported
from ssl_nnunet.utilities.file_io import atomic_directory

# --------------------------------------------------------------------------------------------------------
# dataset identity (ids and names: ssl_nnunet.constants)
UNLABELED_CASE_PREFIX = "DemoBrainSSL"
LABELED_CASE_PREFIX = "DemoBrainSeg"
LABELS: Dict[str, int] = {"background": 0, "csf_other": 1, "grey_matter": 2, "white_matter": 3}
FILE_ENDING = ".nii.gz"
CONFIG_KEY = "ssl_nnunet_demo_config"
#: bump whenever the generated data change for the same arguments, so old folders are detected as stale
GENERATOR_VERSION = 1

# --------------------------------------------------------------------------------------------------------
# generation parameters (all lengths in mm)
#: a brain-mask voxel becomes grey (white) matter when its GM (WM) probability is the larger of the two
#: and at least this value; other brain-mask voxels are "csf_other"
TISSUE_THRESHOLD = 0.5
#: margin added around the template's brain-mask bounding box to get the output field of view
FOV_MARGIN_MM = 12.0
MAX_ROTATION_DEG = 5.0
GLOBAL_SCALE_RANGE = (0.92, 1.08)
AXIS_SCALE_RANGE = (0.97, 1.03)
MAX_TRANSLATION_MM = 4.0
ELASTIC_SMOOTHNESS_MM = 15.0
ELASTIC_AMPLITUDE_RANGE_MM = (2.0, 5.0)
BIAS_SMOOTHNESS_MM = 40.0
#: the bias field is ``exp(strength * f)`` with ``f`` a smooth field scaled to [-1, 1]
BIAS_STRENGTH_RANGE = (0.1, 0.3)
GAMMA_RANGE = (0.7, 1.5)
INTENSITY_SCALE_RANGE = (800.0, 1200.0)
#: noise standard deviation as a fraction of the subject's intensity scale
NOISE_FRACTION_RANGE = (0.01, 0.04)
MIN_SPACING_MM = 0.5
MAX_SPACING_MM = 20.0


class DemoDatasetError(RuntimeError):
    """Raised when a demo dataset folder cannot be written as requested."""


@dataclass(frozen=True)
class BrainTemplate:
    """The MNI152 template, its tissue labels and geometry.

    Attributes:
        t1: ``(X, Y, Z)`` float32 T1 intensities in [0, 1].
        labels: ``(X, Y, Z)`` uint8 tissue labels with values in ``LABELS``.
        affine: ``(4, 4)`` voxel index -> RAS+ mm.
        brain_min_mm, brain_max_mm: ``(3,)`` world bounding box of the brain mask.
    """

    t1: np.ndarray
    labels: np.ndarray
    affine: np.ndarray
    brain_min_mm: np.ndarray
    brain_max_mm: np.ndarray

    @property
    def voxel_size_mm(self) -> np.ndarray:
        """``(3,)`` voxel edge lengths."""
        return np.linalg.norm(self.affine[:3, :3], axis=0)


@dataclass(frozen=True)
class OutputGrid:
    """Axis-aligned isotropic output grid in RAS+ world space.

    Attributes:
        shape: ``(X, Y, Z)`` number of voxels.
        origin_mm: ``(3,)`` world position of voxel ``(0, 0, 0)``.
        spacing_mm: isotropic voxel size.
        center_mm: ``(3,)`` world position of the grid centre (the brain bounding-box centre).
    """

    shape: Tuple[int, int, int]
    origin_mm: np.ndarray
    spacing_mm: float
    center_mm: np.ndarray


@dataclass(frozen=True)
class _DatasetSpec:
    dataset_id: int
    name: str
    case_prefix: str
    labeled: bool
    description: str


_UNLABELED_SPEC = _DatasetSpec(
    DEMO_UNLABELED_ID, DEMO_UNLABELED_DATASET, UNLABELED_CASE_PREFIX, False,
    "ssl_nnunet demo: unlabeled synthetic T1 brains for self-supervised pretraining. Each case is the "
    "nilearn-bundled MNI152 2009 template after a random elastic + affine deformation, bias field, "
    "contrast change and Gaussian noise. Not real subjects; for testing the pipeline only.")
_LABELED_SPEC = _DatasetSpec(
    DEMO_LABELED_ID, DEMO_LABELED_DATASET, LABELED_CASE_PREFIX, True,
    f"ssl_nnunet demo: labeled synthetic T1 brains for fine-tuning. Generated like {DEMO_UNLABELED_DATASET} "
    "(but from different random states); labels come from the MNI152 GM/WM probability maps and brain "
    f"mask (grey/white matter where that probability is the larger one and >= {TISSUE_THRESHOLD}, "
    "csf_other elsewhere in the brain mask), deformed with the same field as the image. Not real "
    "subjects; for testing the pipeline only.")


# --------------------------------------------------------------------------------------------------------
# template


def tissue_labels_from_probabilities(gm: np.ndarray, wm: np.ndarray, brain_mask: np.ndarray,
                                     threshold: float = TISSUE_THRESHOLD) -> np.ndarray:
    """Hard tissue labels from probability maps.

    Args:
        gm, wm: ``(X, Y, Z)`` grey / white matter probabilities in [0, 1].
        brain_mask: ``(X, Y, Z)`` boolean brain mask.
        threshold: minimum probability for a voxel to be called grey or white matter.

    Returns:
        ``(X, Y, Z)`` uint8: 0 outside the mask; inside it 2 where ``gm >= wm`` and ``gm >= threshold``,
        3 where ``wm > gm`` and ``wm >= threshold``, 1 (csf_other) otherwise.
    """
    labels = np.zeros(brain_mask.shape, dtype=np.uint8)
    labels[brain_mask] = LABELS["csf_other"]
    labels[brain_mask & (gm >= wm) & (gm >= threshold)] = LABELS["grey_matter"]
    labels[brain_mask & (wm > gm) & (wm >= threshold)] = LABELS["white_matter"]
    return labels


def _bounding_box_mm(mask: np.ndarray, affine: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """World ``(min, max)`` corners, each ``(3,)``, of the voxel bounding box of ``mask`` ``(X, Y, Z)``."""
    idx = np.argwhere(mask)
    lo, hi = idx.min(axis=0), idx.max(axis=0)
    corners = np.array(np.meshgrid(*zip(lo, hi), indexing="ij"), dtype=np.float64).reshape(3, -1)  # (3, 8)
    world = affine[:3, :3] @ corners + affine[:3, 3:4]
    return world.min(axis=1), world.max(axis=1)


@lru_cache(maxsize=1)
def load_template() -> BrainTemplate:
    """Load the 1 mm MNI152 T1 template, GM/WM probability maps and brain mask bundled with nilearn.

    No network access: these files ship inside the nilearn package. Cached after the first call.
    """
    from nilearn import datasets as nl_datasets  # slow import, only needed here

    t1_img = nl_datasets.load_mni152_template(resolution=1)
    images = {
        "gm": nl_datasets.load_mni152_gm_template(resolution=1),
        "wm": nl_datasets.load_mni152_wm_template(resolution=1),
        "mask": nl_datasets.load_mni152_brain_mask(resolution=1),
    }
    for key, img in images.items():
        if img.shape != t1_img.shape or not np.allclose(img.affine, t1_img.affine):
            raise DemoDatasetError(f"nilearn's MNI152 {key} map is not on the T1 template's grid")
    t1 = np.asarray(t1_img.get_fdata(dtype=np.float32))
    t1 = np.clip(t1 / max(float(t1.max()), 1e-6), 0.0, 1.0).astype(np.float32)
    gm = np.asarray(images["gm"].get_fdata(dtype=np.float32))
    wm = np.asarray(images["wm"].get_fdata(dtype=np.float32))
    mask = np.asarray(images["mask"].dataobj) > 0
    affine = np.asarray(t1_img.affine, dtype=np.float64)
    brain_min, brain_max = _bounding_box_mm(mask, affine)
    return BrainTemplate(t1=t1, labels=tissue_labels_from_probabilities(gm, wm, mask), affine=affine,
                         brain_min_mm=brain_min, brain_max_mm=brain_max)


@lru_cache(maxsize=2)
def _antialiased_t1(spacing_mm: float) -> np.ndarray:
    """``(X, Y, Z)`` template T1 low-pass filtered for resampling to ``spacing_mm`` (sigma = (factor-1)/2)."""
    template = load_template()
    factor = spacing_mm / template.voxel_size_mm
    sigma = np.maximum(factor - 1.0, 0.0) / 2.0
    if not np.any(sigma > 0):
        return template.t1
    return ndimage.gaussian_filter(template.t1, sigma=sigma, mode="constant").astype(np.float32)


def make_output_grid(template: BrainTemplate, spacing_mm: float) -> OutputGrid:
    """Isotropic grid covering the template's brain bounding box plus ``FOV_MARGIN_MM`` on each side."""
    extent = template.brain_max_mm - template.brain_min_mm + 2.0 * FOV_MARGIN_MM
    shape = tuple(int(math.ceil(e / spacing_mm)) for e in extent)
    center = (template.brain_min_mm + template.brain_max_mm) / 2.0
    origin = center - (np.asarray(shape, dtype=np.float64) - 1.0) / 2.0 * spacing_mm
    return OutputGrid(shape=shape, origin_mm=origin, spacing_mm=float(spacing_mm), center_mm=center)


# --------------------------------------------------------------------------------------------------------
# random subject synthesis


def subject_rng(seed: int, dataset_id: int, case_index: int) -> np.random.Generator:
    """Independent random stream for one case; distinct ``(dataset_id, case_index)`` give distinct streams."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), int(dataset_id), int(case_index)]))


def random_smooth_field(rng: np.random.Generator, shape: Tuple[int, ...], sigma_vox: float,
                        n_components: int) -> np.ndarray:
    """White noise low-pass filtered with a Gaussian, each component rescaled to max ``|value| = 1``.

    Returns:
        ``(n_components, *shape)`` float32.
    """
    out = np.empty((n_components, *shape), dtype=np.float32)
    for c in range(n_components):
        noise = rng.standard_normal(shape, dtype=np.float32)
        smooth = ndimage.gaussian_filter(noise, sigma=sigma_vox, mode="reflect")
        smooth -= smooth.mean()
        out[c] = smooth / max(float(np.abs(smooth).max()), 1e-12)
    return out


def random_linear_map(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """Random rotation (up to ``MAX_ROTATION_DEG`` about each axis) and scaling, plus a translation.

    Returns:
        ``(matrix (3, 3), translation_mm (3,))`` mapping subject offsets from the centre to template
        offsets: ``template = matrix @ (subject - c) + c + translation``.
    """
    ax, ay, az = np.deg2rad(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG, size=3))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    scales = rng.uniform(*GLOBAL_SCALE_RANGE) * rng.uniform(*AXIS_SCALE_RANGE, size=3)
    translation = rng.uniform(-MAX_TRANSLATION_MM, MAX_TRANSLATION_MM, size=3)
    # a subject scaled by s samples the template at offsets divided by s
    return np.diag(1.0 / scales) @ (rz @ ry @ rx), translation


def template_sampling_coordinates(rng: np.random.Generator, template: BrainTemplate,
                                  grid: OutputGrid) -> np.ndarray:
    """Template voxel coordinates to sample for every output voxel (random affine + elastic field).

    Returns:
        ``(3, X, Y, Z)`` float64 coordinates in template voxel units (for ``map_coordinates``).
    """
    matrix, translation = random_linear_map(rng)
    amplitude = rng.uniform(*ELASTIC_AMPLITUDE_RANGE_MM)
    displacement = amplitude * random_smooth_field(rng, grid.shape, ELASTIC_SMOOTHNESS_MM / grid.spacing_mm, 3)

    index = np.indices(grid.shape, dtype=np.float64)  # (3, X, Y, Z)
    world = grid.origin_mm[:, None, None, None] + grid.spacing_mm * index
    offset = world - grid.center_mm[:, None, None, None]
    template_world = (np.einsum("ij,j...->i...", matrix, offset)
                      + (grid.center_mm + translation)[:, None, None, None] + displacement)
    inverse = np.linalg.inv(template.affine)
    return np.einsum("ij,j...->i...", inverse[:3, :3], template_world) + inverse[:3, 3][:, None, None, None]


def apply_intensity_changes(rng: np.random.Generator, image: np.ndarray, spacing_mm: float) -> np.ndarray:
    """Gamma contrast change, smooth multiplicative bias field, intensity scaling and Gaussian noise.

    Args:
        image: ``(X, Y, Z)`` float32 intensities in about [0, 1].

    Returns:
        ``(X, Y, Z)`` float32 in arbitrary "T1 units" (roughly 0 .. 1500).
    """
    strength = rng.uniform(*BIAS_STRENGTH_RANGE)
    bias = np.exp(strength * random_smooth_field(rng, image.shape, BIAS_SMOOTHNESS_MM / spacing_mm, 1)[0])
    gamma = math.exp(rng.uniform(math.log(GAMMA_RANGE[0]), math.log(GAMMA_RANGE[1])))
    scale = rng.uniform(*INTENSITY_SCALE_RANGE)
    noise_std = rng.uniform(*NOISE_FRACTION_RANGE) * scale
    noise = rng.standard_normal(image.shape, dtype=np.float32) * np.float32(noise_std)
    out = np.power(np.clip(image, 0.0, None), gamma) * bias * scale + noise
    return out.astype(np.float32)


def synthesize_subject(rng: np.random.Generator, grid: OutputGrid,
                       with_label: bool) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """One pseudo-subject on ``grid``.

    The random numbers drawn do not depend on ``with_label``.

    Returns:
        ``(image, label)``: image ``(X, Y, Z)`` float32; label ``(X, Y, Z)`` uint8 in ``LABELS`` values, or
        ``None`` when ``with_label`` is False.
    """
    template = load_template()
    coords = template_sampling_coordinates(rng, template, grid)
    image = ndimage.map_coordinates(_antialiased_t1(grid.spacing_mm), coords, order=1, mode="constant",
                                    cval=0.0, prefilter=False, output=np.float32)
    label = None
    if with_label:
        label = ndimage.map_coordinates(template.labels, coords, order=0, mode="constant", cval=0,
                                        prefilter=False, output=np.uint8)
    return apply_intensity_changes(rng, image, grid.spacing_mm), label


# --------------------------------------------------------------------------------------------------------
# writing


def write_volume(array: np.ndarray, path: str, grid: OutputGrid) -> None:
    """Write an ``(X, Y, Z)`` RAS-ordered array as NIfTI with the grid's spacing, origin and direction."""
    import SimpleITK as sitk

    if array.ndim != 3 or tuple(array.shape) != tuple(grid.shape):
        raise ValueError(f"expected a 3D array of shape {grid.shape}, got {array.shape}")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))  # sitk wants (Z, Y, X)
    image.SetSpacing((grid.spacing_mm,) * 3)
    # RAS+ world -> ITK's LPS: negate x and y
    image.SetOrigin((-float(grid.origin_mm[0]), -float(grid.origin_mm[1]), float(grid.origin_mm[2])))
    image.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    sitk.WriteImage(image, path, True)


def _generation_config(spec: _DatasetSpec, num_cases: int, spacing: float, seed: int) -> dict:
    """What determines a dataset's content; stored in dataset.json under ``CONFIG_KEY``."""
    return {"generator_version": GENERATOR_VERSION, "dataset_id": spec.dataset_id, "num_cases": int(num_cases),
            "spacing_mm": float(spacing), "seed": int(seed), "labeled": spec.labeled,
            "tissue_threshold": TISSUE_THRESHOLD}


def _dataset_json(spec: _DatasetSpec, config: dict) -> dict:
    return {
        "name": spec.name.split("_", 1)[1],
        "description": spec.description,
        "reference": "MNI ICBM152 2009 template as bundled with nilearn (nilearn.datasets.load_mni152_*)",
        "channel_names": {"0": "T1"},
        "labels": dict(LABELS) if spec.labeled else {"background": 0},
        "numTraining": config["num_cases"],
        "file_ending": FILE_ENDING,
        CONFIG_KEY: config,
    }


def _case_id(spec: _DatasetSpec, case_number: int) -> str:
    return f"{spec.case_prefix}_{case_number:04d}"


def _expected_files(spec: _DatasetSpec, num_cases: int) -> List[str]:
    """Relative paths of all image (and label) files of a complete dataset."""
    files = []
    for number in range(1, num_cases + 1):
        files.append(os.path.join("imagesTr", f"{_case_id(spec, number)}_0000{FILE_ENDING}"))
        if spec.labeled:
            files.append(os.path.join("labelsTr", f"{_case_id(spec, number)}{FILE_ENDING}"))
    return files


def _existing_mismatch(folder: str, spec: _DatasetSpec, config: dict) -> Optional[str]:
    """``None`` when ``folder`` holds a complete dataset generated with ``config``, else the reason why not."""
    json_path = os.path.join(folder, "dataset.json")
    try:
        with open(json_path, encoding="utf-8") as f:
            recorded = json.load(f).get(CONFIG_KEY)
    except (OSError, ValueError, AttributeError) as err:
        return f"cannot read a demo config from {json_path} ({err})"
    if not isinstance(recorded, dict):
        return f"{json_path} has no '{CONFIG_KEY}' entry (not made by this generator?)"
    if recorded != config:
        changed = ", ".join(f"{key}: {recorded.get(key)!r} on disk vs {config.get(key)!r} requested"
                            for key in sorted(set(recorded) | set(config)) if recorded.get(key) != config.get(key))
        return f"it was generated with other settings ({changed})"
    missing = [p for p in _expected_files(spec, config["num_cases"]) if not os.path.isfile(os.path.join(folder, p))]
    if missing:
        return f"{len(missing)} files are missing (e.g. {missing[0]})"
    return None


def _check_id_conflict(raw_dir: str, spec: _DatasetSpec) -> None:
    """nnU-Net resolves dataset ids by folder prefix; another ``DatasetNNN_*`` folder would make it ambiguous."""
    prefix = f"Dataset{spec.dataset_id:03d}"
    others = sorted(d for d in os.listdir(raw_dir)
                    if d.startswith(prefix) and d != spec.name and os.path.isdir(os.path.join(raw_dir, d)))
    if others:
        raise DemoDatasetError(f"{raw_dir} already holds {others} with dataset id {spec.dataset_id}; nnU-Net "
                               f"could not tell it from {spec.name}. Move it away or use another nnUNet_raw.")


def _remove_leftovers(raw_dir: str, spec: _DatasetSpec) -> None:
    """Delete hidden temporary folders (of :func:`atomic_directory`) an interrupted earlier run left behind."""
    for entry in os.listdir(raw_dir):
        if entry.startswith((f".{spec.name}.tmp_", f".{spec.name}.old_")):
            shutil.rmtree(os.path.join(raw_dir, entry), ignore_errors=True)


def _write_cases(folder: str, spec: _DatasetSpec, config: dict) -> None:
    """Generate and write all cases plus dataset.json into ``folder`` (new and empty)."""
    from tqdm import tqdm

    os.makedirs(os.path.join(folder, "imagesTr"))
    if spec.labeled:
        os.makedirs(os.path.join(folder, "labelsTr"))
    grid = make_output_grid(load_template(), config["spacing_mm"])
    for number in tqdm(range(1, config["num_cases"] + 1), desc=spec.name, unit="case", file=sys.stderr):
        rng = subject_rng(config["seed"], spec.dataset_id, number)
        image, label = synthesize_subject(rng, grid, with_label=spec.labeled)
        case = _case_id(spec, number)
        write_volume(image, os.path.join(folder, "imagesTr", f"{case}_0000{FILE_ENDING}"), grid)
        if label is not None:
            write_volume(label, os.path.join(folder, "labelsTr", f"{case}{FILE_ENDING}"), grid)
    with open(os.path.join(folder, "dataset.json"), "w", encoding="utf-8") as f:
        json.dump(_dataset_json(spec, config), f, indent=4)


def _keep_existing(spec: _DatasetSpec, config: dict, raw_dir: str, overwrite: bool) -> bool:
    """Whether ``raw_dir/spec.name`` can be kept as is; raises when it differs and ``overwrite`` is False."""
    _check_id_conflict(raw_dir, spec)
    final = os.path.join(raw_dir, spec.name)
    if not os.path.exists(final):
        return False
    reason = _existing_mismatch(final, spec, config)
    if reason is None:
        return True
    if not overwrite:
        raise DemoDatasetError(f"{final} exists but differs from the request: {reason}. Pass --overwrite "
                               f"(overwrite=True) to replace it, or remove the folder yourself.")
    print(f"{spec.name}: replacing the existing folder, {reason}")
    return False


def _build_dataset(spec: _DatasetSpec, config: dict, raw_dir: str) -> str:
    """Generate one dataset in a hidden temporary folder and rename it to ``raw_dir/spec.name``."""
    final = os.path.join(raw_dir, spec.name)
    _remove_leftovers(raw_dir, spec)
    with atomic_directory(final) as tmp:
        _write_cases(tmp, spec, config)
    return final


def _validate_arguments(n_unlabeled: int, n_labeled: int, spacing: float, seed: int) -> None:
    for name, value in (("n_unlabeled", n_unlabeled), ("n_labeled", n_labeled)):
        if int(value) != value or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if not (MIN_SPACING_MM <= spacing <= MAX_SPACING_MM):
        raise ValueError(f"spacing must be between {MIN_SPACING_MM} and {MAX_SPACING_MM} mm, got {spacing}")
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")


def make_demo_datasets(n_unlabeled: int = 40, n_labeled: int = 20, spacing: float = 3.0, seed: int = 0,
                       raw_dir: Optional[str] = None, overwrite: bool = False) -> Dict[str, str]:
    """Create ``Dataset900_DemoBrainSSL`` (unlabeled) and ``Dataset901_DemoBrainSeg`` (labeled).

    Args:
        n_unlabeled: number of cases in the unlabeled dataset.
        n_labeled: number of cases in the labeled dataset.
        spacing: isotropic output voxel size in mm (3 mm gives volumes of 56 x 68 x 60 voxels).
        seed: non-negative integer; equal seeds give byte-identical arrays.
        raw_dir: where to put the dataset folders; default: ``$nnUNet_raw`` (read at call time).
        overwrite: replace an existing dataset folder whose recorded settings differ from the request.
            Without it such a folder raises :class:`DemoDatasetError`. A folder with matching settings
            is always kept as is.

    Returns:
        ``{"unlabeled": path_of_dataset900, "labeled": path_of_dataset901}``.

    Each dataset is built in a hidden temporary sibling folder and renamed into place when complete, so
    an interrupted run leaves no half-written dataset.
    """
    _validate_arguments(n_unlabeled, n_labeled, spacing, seed)
    raw_dir = os.path.abspath(raw_dir or nnunet_raw())
    os.makedirs(raw_dir, exist_ok=True)
    jobs = {"unlabeled": (_UNLABELED_SPEC, int(n_unlabeled)), "labeled": (_LABELED_SPEC, int(n_labeled))}
    configs = {key: _generation_config(spec, n, float(spacing), int(seed)) for key, (spec, n) in jobs.items()}
    # check both folders before generating anything, so a conflict on the second one wastes no work
    keep = {key: _keep_existing(spec, configs[key], raw_dir, overwrite) for key, (spec, _) in jobs.items()}
    folders = {}
    for key, (spec, _) in jobs.items():
        if keep[key]:
            print(f"{spec.name}: already exists with the requested settings, skipping")
            folders[key] = os.path.join(raw_dir, spec.name)
        else:
            folders[key] = _build_dataset(spec, configs[key], raw_dir)
    return folders


# --------------------------------------------------------------------------------------------------------
# command line


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssl_nnunet_make_demo_dataset",
        description=f"Write the synthetic demo datasets {DEMO_UNLABELED_DATASET} (unlabeled) and "
                    f"{DEMO_LABELED_DATASET} (labeled) into $nnUNet_raw. They are made from the MNI152 "
                    f"template bundled with nilearn; nothing is downloaded.")
    parser.add_argument("--n_unlabeled", type=int, default=40, help="cases in the unlabeled dataset (default 40)")
    parser.add_argument("--n_labeled", type=int, default=20, help="cases in the labeled dataset (default 20)")
    parser.add_argument("--spacing", type=float, default=3.0,
                        help="isotropic voxel size in mm (default 3.0; smaller is slower and bigger)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace existing demo datasets that were generated with other settings")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``ssl_nnunet_make_demo_dataset``."""
    args = _build_parser().parse_args(argv)
    try:
        folders = make_demo_datasets(n_unlabeled=args.n_unlabeled, n_labeled=args.n_labeled,
                                     spacing=args.spacing, seed=args.seed, overwrite=args.overwrite)
    except (DemoDatasetError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"unlabeled dataset: {folders['unlabeled']}")
    print(f"labeled dataset:   {folders['labeled']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
