"""Alice's cross-volume matcher and pair sampler: where is "the same body part" of case A in case B
(METHODS.md §7.5 A).

The Alice paper finds corresponding points of two volumes with a pre-trained landmark model (SAM, Yan et al.
2022). We ship no external weights; the weight-free replacement ``profile_bbox`` maps points through the
per-case body geometry of :mod:`ssl_nnunet.data.body_geometry` (body box, longitudinal profile and its affine
fit to a reference case, cached beside the preprocessed data).

Point mapping (:meth:`CrossVolumeMatcher.map_point`): a point ``p = (p0, p1, p2)`` (continuous voxel indices)
of case A goes to ``p'`` in case B with
``p'_op = (scale_A * p_op + offset_A - offset_B) / scale_B`` (same canonical coordinate ``t``) and, on the
in-plane axes, the body-box normalisation ``p'_ax = lo_B + (p_ax - lo_A) (hi_B - lo_B) / (hi_A - lo_A)``.
The point is *valid* when ``p'_op`` lies inside B's body extent along ``a_op`` (the analogue of SAM's
score threshold; the sampler redraws otherwise). For A = B the map is the identity.

:class:`CrossVolumePairSampler` uses the matcher to cut a query crop Q of case A and a key crop K of a different
case B around corresponding points: ``next_batch() -> (B, 2, C, a0, a1, a2)``, ``[:, 0] = Q``, ``[:, 1] = K``.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch

from ssl_nnunet.data.body_geometry import DatasetGeometry
from ssl_nnunet.data.case_cache import (DEFAULT_MAX_BAD_CASE_FRACTION, DEFAULT_MAX_OPEN_CASES, CaseCache,
                                        UnreadableCaseError)
from ssl_nnunet.data.samplers import crop_with_padding
from ssl_nnunet.utilities.errors import SSLInputError

__all__ = [
    "MATCHERS",
    "CrossVolumeMatcher",
    "CrossVolumePairSampler",
    "centre_range",
]

#: ``layout.matcher`` values: profile alignment with body-box fallback; body box only; no matching (ablation)
MATCHERS = ("profile_bbox", "bbox", "random")


# ------------------------------------------------------------------------------------------------ the matcher

class CrossVolumeMatcher:
    """Maps points between preprocessed cases (see the module docstring for the formulas).

    Args:
        geometry: the per-case geometry of the dataset
            (:meth:`ssl_nnunet.data.body_geometry.DatasetGeometry.load_or_compute`).

    Attributes:
        cases: ``{identifier: CaseGeometry}``; a_op: the out-of-plane axis; reference_length: ``L_ref``.
    """

    def __init__(self, geometry: DatasetGeometry):
        self.geometry = geometry
        self.cases = geometry.cases
        self.a_op = int(geometry.a_op)
        self.reference_length = int(geometry.reference_length)

    def canonical(self, identifier: str, z: float) -> float:
        """Canonical coordinate ``t = (scale z + offset) / L_ref`` of slice ``z`` of a case."""
        g = self.cases[identifier]
        return (g.scale * float(z) + g.offset) / self.reference_length

    def coverage(self, identifier: str) -> Tuple[float, float]:
        """``[t_min, t_max]`` of the case's body along ``a_op``."""
        lo, hi = self.cases[identifier].bbox[self.a_op]
        return self.canonical(identifier, lo), self.canonical(identifier, hi - 1)

    def map_point(self, source: str, target: str, point: Sequence[float]) -> Tuple[np.ndarray, bool]:
        """Map ``point`` (continuous voxel indices ``(p0, p1, p2)``) of case ``source`` into case ``target``.

        Returns:
            ``(p', valid)``: float64 ``(3,)`` and whether ``p'_op`` lies inside the target's body extent
            ``[lo, hi - 1]`` along ``a_op`` (outside: the anatomy at ``p`` is not in the target's field of view).
        """
        a, b = self.cases[source], self.cases[target]
        p = np.asarray(point, dtype=np.float64)
        out = np.empty_like(p)
        for ax in range(len(p)):
            if ax == self.a_op:
                out[ax] = (a.scale * p[ax] + a.offset - b.offset) / b.scale
            else:
                (lo_a, hi_a), (lo_b, hi_b) = a.bbox[ax], b.bbox[ax]
                out[ax] = lo_b + (p[ax] - lo_a) * (hi_b - lo_b) / max(hi_a - lo_a, 1)
        lo, hi = b.bbox[self.a_op]
        return out, bool(lo <= out[self.a_op] <= hi - 1)


# ------------------------------------------------------------------------------------------------ sampling

def centre_range(bbox: Sequence[Sequence[int]], shape: Sequence[int], patch: Sequence[int]
                 ) -> List[Tuple[int, int]]:
    """Per axis the inclusive range ``[c_min, c_max]`` of crop centres (crop = ``[c - P//2, c - P//2 + P)``)
    that keep the crop inside the body box where the box is at least ``P`` long, else centre the crop on the
    box; then, where the image is at least ``P`` long, inside the image (METHODS.md §7.8)."""
    out = []
    for (lo, hi), d, p in zip(bbox, shape, patch):
        if hi - lo >= p:
            cmin, cmax = lo + p // 2, hi - p + p // 2
        else:
            cmin = cmax = (lo + hi) // 2
        if d >= p:
            cmin = min(max(cmin, p // 2), d - p + p // 2)
            cmax = min(max(cmax, p // 2), d - p + p // 2)
        out.append((int(cmin), int(cmax)))
    return out


class CrossVolumePairSampler:
    """Pairs of crops of the same body part from two different cases.

    Per batch element: a query case A is drawn from ``identifiers`` and a key case B ≠ A from
    ``key_identifiers`` (default: ``identifiers``; a single held-out validation case is paired with the other
    cases of the dataset this way); a crop centre ``c_A`` is drawn uniformly from A's
    :func:`centre_range`, mapped to B with the matcher and redrawn (up to ``max_tries``) while the point falls
    outside B's field of view; the mapped centre is rounded and clamped to B's :func:`centre_range`. When no
    try succeeds the last mapped point is clamped (nearest covered position).

    ``next_batch() -> float32 (B, 2, C, *P)``: ``[:, 0]`` query crops Q (case A), ``[:, 1]`` key crops K
    (case B). ``last_pairs`` holds ``(id_A, id_B, c_A, c_B, matched)`` of the latest batch.
    """

    def __init__(self, dataset, identifiers: List[str], patch_size: Sequence[int], batch_size: int,
                 matcher: CrossVolumeMatcher, seed: int = 0, max_tries: int = 100,
                 key_identifiers: Optional[List[str]] = None, max_open_cases: int = DEFAULT_MAX_OPEN_CASES,
                 max_bad_case_fraction: float = DEFAULT_MAX_BAD_CASE_FRACTION):
        keys = sorted(set(key_identifiers if key_identifiers is not None else identifiers))
        if not identifiers or any(all(k == q for k in keys) for q in identifiers):
            raise ValueError(f"every query case needs a different key case; got queries {list(identifiers)} and "
                             f"keys {keys}")
        missing = [i for i in list(identifiers) + keys if i not in matcher.cases]
        if missing:
            raise SSLInputError(f"alice matcher has no geometry for {missing[:3]}; delete the matcher cache "
                                f"(alice_matcher_*.json beside the preprocessed data) to rebuild it")
        self.dataset = dataset
        self.identifiers = list(identifiers)
        self.key_identifiers = keys
        self.patch_size = [int(p) for p in patch_size]
        self.batch_size = int(batch_size)
        self.matcher = matcher
        self.max_tries = max(1, int(max_tries))
        self.rng = np.random.RandomState(seed)
        self.last_pairs: List[tuple] = []
        self.cases = CaseCache(dataset, sorted(set(self.identifiers) | set(keys)), max_open_cases,
                               max_bad_case_fraction, min_good_cases=2)

    def _crop(self, identifier: str, centre: Sequence[int]) -> np.ndarray:
        start = [c - p // 2 for c, p in zip(centre, self.patch_size)]
        return self.cases.read(identifier, lambda data: crop_with_padding(data, start, self.patch_size))

    def draw_pair(self, source: str, target: str) -> Tuple[List[int], List[int], bool]:
        """Centres ``(c_A, c_B, matched)`` of a query crop in ``source`` and its key crop in ``target``."""
        ga, gb = self.matcher.cases[source], self.matcher.cases[target]
        range_a = centre_range(ga.bbox, ga.shape, self.patch_size)
        range_b = centre_range(gb.bbox, gb.shape, self.patch_size)
        for _ in range(self.max_tries):
            c_a = [int(self.rng.randint(lo, hi + 1)) for lo, hi in range_a]
            mapped, valid = self.matcher.map_point(source, target, c_a)
            if valid:
                break
        c_b = [int(min(max(int(round(v)), lo), hi)) for v, (lo, hi) in zip(mapped, range_b)]
        return c_a, c_b, valid

    def _draw_case(self, identifiers: List[str]) -> str:
        while True:  # a known unreadable case is drawn again (see CaseCache)
            case = identifiers[self.rng.randint(len(identifiers))]
            if not self.cases.is_bad(case):
                return case

    def _pair_item(self) -> np.ndarray:
        source = self._draw_case(self.identifiers)
        target = self._draw_case([k for k in self.key_identifiers if k != source])
        c_a, c_b, matched = self.draw_pair(source, target)
        item = np.stack([self._crop(source, c_a), self._crop(target, c_b)])
        self.last_pairs.append((source, target, c_a, c_b, matched))
        return item

    def next_batch(self) -> torch.Tensor:
        items, self.last_pairs = [], []
        for _ in range(self.batch_size):
            while True:
                try:
                    items.append(self._pair_item())
                    break
                except UnreadableCaseError as e:
                    self.cases.mark_bad(e)  # raises once too many cases are bad
        return torch.from_numpy(np.stack(items))
