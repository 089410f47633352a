"""Per-case body geometry of a preprocessed dataset, for Alice's cross-volume matcher (METHODS.md §7.5 A).

Computed from the *preprocessed* arrays, once per dataset, and cached beside them: the part of the weight-free
SAM replacement ``profile_bbox`` that depends on a single case (and on the dataset's reference case). The
point mapping and the pair sampler that use it are in :mod:`ssl_nnunet.data.alice_pairs`.

1. **Body box.** Per case, a body mask of channel 0 of the *preprocessed* array ``(C, a0, a1, a2)``:
   CT (channel name "CT" in ``dataset.json``): voxels above -500 HU, converted to nnU-Net's normalised units
   with the fingerprint's foreground statistics; other modalities: Otsu threshold. Then the largest connected
   component, holes filled slice by slice along ``a_op``. Its bounding box ``[lo, hi)`` per axis.
2. **Longitudinal profile.** Along the out-of-plane axis ``a_op``, per slice ``z``: body area (divided by the
   case's largest slice area), mean intensity inside the body, fraction of low-intensity and of high-intensity
   body voxels (CT: below -500 HU / above +200 HU; other modalities: below / above the case's 10th / 90th
   body percentile); Gaussian-smoothed (sigma 1 slice). Array ``(L, 4)`` with ``L = shape[a_op]``.
3. **Canonical coordinate.** Every case gets an affine map to a *reference* case (the one with the median body
   length along ``a_op``): ``z_ref = scale * z + offset``. ``scale`` and ``offset`` maximise the mean per-feature
   normalised cross-correlation (NCC) of the two profiles over their overlap (grid search
   ``scale ∈ [0.8, 1.25]`` coarse-to-fine, every integer offset with parabolic sub-voxel refinement, overlap at
   least half the shorter profile). When the best NCC is below ``min_ncc`` (or for ``matcher = "bbox"``) the
   map is the body-box one: ``[lo, hi)`` of the case onto ``[lo, hi)`` of the reference along ``a_op``.
   The canonical coordinate is ``t(z) = z_ref / L_ref``; the case covers ``[t(lo), t(hi - 1)]``.

The geometry (:class:`DatasetGeometry`) is computed once, on first use, from the preprocessed arrays and cached
as JSON beside the preprocessed data folder: ``nnUNet_preprocessed/DatasetXXX/alice_matcher_<data_identifier>.json``
(atomic write; not inside the data folder, where nnU-Net infers the dataset class from the file endings). The
cache records the size and modification time of every case's ``.pkl`` and is rebuilt when they, the case list,
the matcher type or ``a_op`` change (e.g. after re-preprocessing). Assumes a consistent orientation of all
cases (the fingerprint warns when the direction matrices differ); no reorientation is done here.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from ssl_nnunet.utilities.errors import SSLInputError
from ssl_nnunet.utilities.file_io import atomic_save_json

__all__ = [
    "cache_path",
    "ct_thresholds",
    "CaseGeometry",
    "DatasetGeometry",
    "body_mask_of",
    "bounding_box",
    "longitudinal_profile",
    "fit_profile_affine",
]

CACHE_VERSION = 1
CT_BODY_HU = -500.0
CT_BONE_HU = 200.0
SCALE_RANGE = (0.8, 1.25)
MIN_NCC = 0.5
MIN_OVERLAP = 0.5


# ------------------------------------------------------------------------------------------------ body mask

def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def body_mask_of(image: np.ndarray, a_op: int, threshold: Optional[float] = None) -> np.ndarray:
    """Body mask of one preprocessed channel ``image (a0, a1, a2)``.

    ``image > threshold`` (CT: -500 HU in normalised units) or, when ``threshold`` is ``None``, above the Otsu
    threshold of the image; then the largest connected component with holes filled in every slice along
    ``a_op``. Falls back to all-ones for a constant image.
    """
    if threshold is None:
        from skimage.filters import threshold_otsu
        values = image[::2, ::2, ::2].ravel() if image.size > 2 ** 21 else image.ravel()
        if values.min() == values.max():
            return np.ones(image.shape, dtype=bool)
        threshold = float(threshold_otsu(values))
    mask = _largest_component(image > threshold)
    if not mask.any():
        return np.ones(image.shape, dtype=bool)
    moved = np.moveaxis(mask, a_op, 0)
    filled = np.stack([ndimage.binary_fill_holes(s) for s in moved])
    return np.moveaxis(filled, 0, a_op)


def bounding_box(mask: np.ndarray) -> List[List[int]]:
    """``[[lo, hi), ...]`` per axis of a non-empty boolean mask."""
    out = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        idx = np.nonzero(mask.any(axis=other))[0]
        out.append([int(idx[0]), int(idx[-1]) + 1])
    return out


def longitudinal_profile(image: np.ndarray, mask: np.ndarray, a_op: int, low: float, high: float,
                         sigma: float = 1.0) -> np.ndarray:
    """Per-slice descriptor along ``a_op``: ``(L, 4)`` float64 = (relative body area, mean body intensity,
    fraction of body voxels ``< low``, fraction ``> high``), Gaussian-smoothed along the slices."""
    img = np.moveaxis(image, a_op, 0).reshape(image.shape[a_op], -1).astype(np.float64)
    m = np.moveaxis(mask, a_op, 0).reshape(image.shape[a_op], -1)
    area = m.sum(1).astype(np.float64)
    safe = np.maximum(area, 1.0)
    mean = np.where(m, img, 0.0).sum(1) / safe
    low_frac = (m & (img < low)).sum(1) / safe
    high_frac = (m & (img > high)).sum(1) / safe
    prof = np.stack([area / max(area.max(), 1.0), mean, low_frac, high_frac], axis=1)
    return ndimage.gaussian_filter1d(prof, sigma, axis=0, mode="nearest") if sigma > 0 else prof


# ------------------------------------------------------------------------------------------------ 1-D alignment

def _stretch(profile: np.ndarray, scale: float) -> np.ndarray:
    """Resample ``profile (L, F)`` at positions ``k / scale`` for ``k = 0 .. floor(scale (L - 1))``."""
    n = int(math.floor(scale * (len(profile) - 1))) + 1
    pos = np.arange(n) / scale
    return np.stack([np.interp(pos, np.arange(len(profile)), profile[:, f]) for f in range(profile.shape[1])], 1)


def _ncc_all_shifts(c: np.ndarray, r: np.ndarray, min_overlap: float) -> Tuple[np.ndarray, np.ndarray]:
    """Mean per-feature NCC of ``c (m, F)`` placed at every integer shift ``s`` on ``r (n, F)`` (``c[i]`` on
    ``r[i + s]``), over the overlap only. Returns ``(shifts, ncc)``; shifts with too small an overlap or
    no feature with variance get ``-inf``."""
    m, n = len(c), len(r)
    shifts = np.arange(-(m - 1), n)
    lo = np.maximum(0, -shifts)
    hi = np.minimum(m, n - shifts)
    count = (hi - lo).astype(np.float64)
    total = np.zeros(len(shifts))
    used = np.zeros(len(shifts))
    for f in range(c.shape[1]):
        cf, rf = c[:, f], r[:, f]
        c1 = np.concatenate([[0.0], np.cumsum(cf)])
        c2 = np.concatenate([[0.0], np.cumsum(cf * cf)])
        r1 = np.concatenate([[0.0], np.cumsum(rf)])
        r2 = np.concatenate([[0.0], np.cumsum(rf * rf)])
        sxy = np.correlate(rf, cf, mode="full")  # index k <-> shift k - (m - 1)
        sc, sc2 = c1[hi] - c1[lo], c2[hi] - c2[lo]
        sr, sr2 = r1[hi + shifts] - r1[lo + shifts], r2[hi + shifts] - r2[lo + shifts]
        cov = sxy - sc * sr / count
        var = (sc2 - sc * sc / count) * (sr2 - sr * sr / count)
        ok = var > 1e-12 * np.maximum(count, 1.0) ** 2
        total += np.where(ok, cov / np.sqrt(np.where(ok, var, 1.0)), 0.0)
        used += ok
    ncc = np.where(used > 0, total / np.maximum(used, 1), -np.inf)
    ncc[count < min_overlap * min(m, n)] = -np.inf
    return shifts, ncc


def _best_shift(c: np.ndarray, r: np.ndarray, min_overlap: float) -> Tuple[float, float]:
    shifts, ncc = _ncc_all_shifts(c, r, min_overlap)
    k = int(np.argmax(ncc))
    best = float(ncc[k])
    if not np.isfinite(best):
        return 0.0, -np.inf
    sub = 0.0
    if 0 < k < len(ncc) - 1 and np.isfinite(ncc[k - 1]) and np.isfinite(ncc[k + 1]):
        denom = ncc[k - 1] - 2 * ncc[k] + ncc[k + 1]
        if denom < 0:
            sub = float(np.clip(0.5 * (ncc[k - 1] - ncc[k + 1]) / denom, -0.5, 0.5))
    return float(shifts[k]) + sub, best


def fit_profile_affine(profile: np.ndarray, reference: np.ndarray, scale_range: Sequence[float] = SCALE_RANGE,
                       min_overlap: float = MIN_OVERLAP) -> Tuple[float, float, float]:
    """Affine map ``z_ref = scale * z + offset`` of a case profile ``(L, F)`` onto ``reference (L_ref, F)``.

    Coarse grid over ``scale`` (step 0.02), then a fine grid (step 0.002) around the best; for every scale all
    integer offsets are scored at once (NCC via cumulative sums and one correlation per feature) and the best
    offset is refined to sub-voxel precision by a parabola through the neighbouring scores.

    Returns:
        ``(scale, offset, ncc)``; ``ncc = -inf`` when no placement has enough overlap.
    """
    lo, hi = float(scale_range[0]), float(scale_range[1])
    best = (1.0, 0.0, -np.inf)
    for grid in (np.arange(lo, hi + 1e-9, 0.02), None):
        if grid is None:
            grid = np.arange(max(lo, best[0] - 0.02), min(hi, best[0] + 0.02) + 1e-9, 0.002)
        for scale in grid:
            offset, score = _best_shift(_stretch(profile, float(scale)), reference, min_overlap)
            if score > best[2]:
                best = (float(scale), offset, score)
    return best


# ------------------------------------------------------------------------------------------------ per dataset

@dataclass
class CaseGeometry:
    """Body geometry of one case and its map to the reference case (JSON-serialisable).

    Attributes:
        shape: spatial shape ``(a0, a1, a2)`` of the preprocessed array.
        bbox: body box ``[[lo, hi), ...]`` per axis.
        scale, offset: ``z_ref = scale * z + offset`` along ``a_op``.
        ncc: profile NCC of the fit (``None`` for body-box maps).
        source: ``"profile"`` or ``"bbox"`` (which map is stored).
    """

    shape: List[int]
    bbox: List[List[int]]
    scale: float
    offset: float
    ncc: Optional[float]
    source: str


def _bbox_affine(bbox_op: Sequence[int], ref_bbox_op: Sequence[int]) -> Tuple[float, float]:
    scale = (ref_bbox_op[1] - ref_bbox_op[0]) / max(bbox_op[1] - bbox_op[0], 1)
    return scale, ref_bbox_op[0] - scale * bbox_op[0]


@dataclass
class DatasetGeometry:
    """The :class:`CaseGeometry` of every case of a dataset, aligned to its reference case (JSON-serialisable).

    Attributes:
        cases: ``{identifier: CaseGeometry}``.
        a_op: out-of-plane axis (``plans["ssl"]["out_of_plane_axis"]``).
        reference_length: ``L_ref`` (``shape[a_op]`` of the reference case); ``t = z_ref / L_ref``.
        kind: ``"profile_bbox"`` or ``"bbox"`` (the matcher type it was computed for).
        reference: identifier of the reference case.
    """

    cases: Dict[str, CaseGeometry]
    a_op: int
    reference_length: int
    kind: str = "profile_bbox"
    reference: str = ""

    @classmethod
    def from_arrays(cls, images: Dict[str, np.ndarray], a_op: int, kind: str = "profile_bbox",
                    ct_units: Optional[Dict[str, float]] = None, min_ncc: float = MIN_NCC) -> "DatasetGeometry":
        """Compute from channel-0 arrays ``{identifier: (a0, a1, a2)}``.

        Args:
            ct_units: for CT, the thresholds in the arrays' units: ``{"body": .., "low": .., "high": ..}``;
                ``None``: Otsu body mask, low/high = the case's 10th/90th body percentile.
            min_ncc: below this profile NCC a case falls back to the body-box map.
        """
        if kind not in ("profile_bbox", "bbox"):
            raise SSLInputError(f"alice matcher '{kind}' cannot be built; choose 'profile_bbox' or 'bbox'")
        if not images:
            raise SSLInputError("alice matcher: no cases to build the matcher from")
        boxes, profiles, shapes = {}, {}, {}
        for ident, image in images.items():
            image = np.asarray(image, dtype=np.float32)
            mask = body_mask_of(image, a_op, None if ct_units is None else ct_units["body"])
            boxes[ident] = bounding_box(mask)
            shapes[ident] = [int(s) for s in image.shape]
            if ct_units is None:
                low, high = np.percentile(image[mask], (10, 90))
            else:
                low, high = ct_units["low"], ct_units["high"]
            profiles[ident] = longitudinal_profile(image, mask, a_op, float(low), float(high))
        idents = sorted(images)
        lengths = [boxes[i][a_op][1] - boxes[i][a_op][0] for i in idents]
        order = np.argsort(lengths, kind="stable")
        reference = idents[int(order[(len(order) - 1) // 2])]
        cases = {}
        for ident in idents:
            scale, offset = _bbox_affine(boxes[ident][a_op], boxes[reference][a_op])
            ncc, source = None, "bbox"
            if kind == "profile_bbox":
                if ident == reference:
                    fit = (1.0, 0.0, 1.0)
                else:
                    fit = fit_profile_affine(profiles[ident], profiles[reference])
                if np.isfinite(fit[2]) and fit[2] >= min_ncc:
                    scale, offset, ncc, source = fit[0], fit[1], float(fit[2]), "profile"
                elif np.isfinite(fit[2]):
                    ncc = float(fit[2])
            cases[ident] = CaseGeometry(shapes[ident], boxes[ident], float(scale), float(offset), ncc, source)
        return cls(cases, int(a_op), shapes[reference][a_op], kind, reference)

    def to_json(self, stamps: Optional[Dict[str, List[int]]] = None) -> dict:
        return {"version": CACHE_VERSION, "matcher": self.kind, "out_of_plane_axis": self.a_op,
                "reference": self.reference, "reference_length": self.reference_length,
                "case_files": stamps or {}, "cases": {k: asdict(v) for k, v in sorted(self.cases.items())}}

    @classmethod
    def from_json(cls, obj: dict) -> "DatasetGeometry":
        cases = {k: CaseGeometry(**v) for k, v in obj["cases"].items()}
        return cls(cases, int(obj["out_of_plane_axis"]), int(obj["reference_length"]), obj["matcher"],
                   obj["reference"])

    @classmethod
    def load_or_compute(cls, dataset, a_op: int, kind: str = "profile_bbox", folder: Optional[str] = None,
                        verbose: bool = True) -> "DatasetGeometry":
        """The geometry of every case of ``dataset`` (an nnU-Net dataset: ``load_case``, ``identifiers``),
        read from :func:`cache_path` when it is current, else computed and written atomically.

        ``folder`` (the preprocessed data folder) defaults to ``dataset.source_folder``; CT thresholds come from
        ``dataset.json`` and ``dataset_fingerprint.json`` in its parent folder.
        """
        folder = os.path.abspath(folder or dataset.source_folder)
        identifiers = sorted(dataset.identifiers)
        path = cache_path(folder)
        stamps = {i: _file_stamp(os.path.join(folder, i + ".pkl")) for i in identifiers}
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    obj = json.load(f)
                if (obj.get("version") == CACHE_VERSION and obj.get("matcher") == kind
                        and obj.get("out_of_plane_axis") == int(a_op) and obj.get("case_files") == stamps
                        and sorted(obj.get("cases", {})) == identifiers):
                    return cls.from_json(obj)
            except (OSError, ValueError, KeyError, TypeError):
                pass  # unreadable or stale cache: rebuild
        if verbose:
            print(f"alice matcher ({kind}): computing body boxes and profiles of {len(identifiers)} cases "
                  f"(once; cached in {path})")
        images = {}
        for ident in identifiers:
            data = dataset.load_case(ident)[0]
            images[ident] = np.asarray(data[0], dtype=np.float32)
        geometry = cls.from_arrays(images, a_op, kind, ct_units=ct_thresholds(os.path.dirname(folder)))
        atomic_save_json(geometry.to_json(stamps), path)
        return geometry


# ------------------------------------------------------------------------------------------------ cache, CT units

def cache_path(data_folder: str) -> str:
    """``<parent>/alice_matcher_<data folder name>.json`` for a preprocessed data folder."""
    data_folder = os.path.abspath(data_folder)
    return os.path.join(os.path.dirname(data_folder), f"alice_matcher_{os.path.basename(data_folder)}.json")


def _file_stamp(path: str) -> List[int]:
    """``[size, mtime_ns]`` of a file (``[-1, -1]`` when it does not exist)."""
    try:
        st = os.stat(path)
    except OSError:
        return [-1, -1]
    return [int(st.st_size), int(st.st_mtime_ns)]


def ct_thresholds(preprocessed_dataset_folder: str) -> Optional[Dict[str, float]]:
    """CT thresholds (-500 HU body and low, +200 HU high) in nnU-Net's CT-normalised units, or ``None`` when
    channel 0 is not CT (or ``dataset.json`` / ``dataset_fingerprint.json`` are missing)."""
    try:
        with open(os.path.join(preprocessed_dataset_folder, "dataset.json")) as f:
            channels = json.load(f)["channel_names"]
        name = channels.get("0", channels.get(0, ""))
        if str(name).strip().upper() != "CT":
            return None
        with open(os.path.join(preprocessed_dataset_folder, "dataset_fingerprint.json")) as f:
            props = json.load(f)["foreground_intensity_properties_per_channel"]["0"]
    except (OSError, ValueError, KeyError):
        return None
    lo, hi = props["percentile_00_5"], props["percentile_99_5"]
    std = max(float(props["std"]), 1e-8)

    def norm(hu: float) -> float:
        return (min(max(hu, lo), hi) - props["mean"]) / std

    return {"body": norm(CT_BODY_HU), "low": norm(CT_BODY_HU), "high": norm(CT_BONE_HU)}
