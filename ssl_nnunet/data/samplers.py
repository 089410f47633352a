"""Unlabeled patch sampling from nnU-Net's preprocessed blosc2 data.

The samplers only cut and stack patches (numpy); every view of an objective is built later on the batch's
device by the method itself. :class:`SamplerSpec` is what the trainer hands to
:meth:`ssl_nnunet.methods.base.SSLMethod.make_sampler`; the background loader is
:class:`ssl_nnunet.data.loader.PrefetchLoader`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Sequence

import numpy as np
import torch

from ssl_nnunet.data.case_cache import (DEFAULT_MAX_BAD_CASE_FRACTION, DEFAULT_MAX_OPEN_CASES, CaseCache,
                                        UnreadableCaseError, choose_cases)
from ssl_nnunet.data.multi_dataset import dataset_groups


@dataclass(frozen=True)
class SamplerSpec:
    """Everything a method needs to build its data sampler (:meth:`SSLMethod.make_sampler`).

    Attributes:
        dataset: the nnU-Net dataset of the preprocessed folder (``load_case``, ``identifiers``).
        identifiers: the cases to draw from (training or held-out validation cases).
        patch_size: spatial size ``(a0, a1, a2)`` of a patch (the method's ``required_patch_size``).
        batch_size: batch elements per ``next_batch()``.
        seed: seed of the sampler's random state.
        method_plan: ``plans["ssl"]["methods"][name]``.
        ssl_plan: the whole ``plans["ssl"]`` block (``out_of_plane_axis``, ...).
        preprocessed_folder: the preprocessed data folder (where per-dataset caches are placed beside).
        max_open_cases: case arrays a sampler keeps open (:class:`~ssl_nnunet.data.case_cache.CaseCache`).
        max_bad_case_fraction: share of unreadable cases a sampler skips before it stops with an error.
    """

    dataset: object
    identifiers: List[str]
    patch_size: List[int]
    batch_size: int
    seed: int
    method_plan: dict
    ssl_plan: dict
    preprocessed_folder: str
    max_open_cases: int = DEFAULT_MAX_OPEN_CASES
    max_bad_case_fraction: float = DEFAULT_MAX_BAD_CASE_FRACTION

    @property
    def case_options(self) -> dict:
        """The keyword arguments of every sampler's :class:`~ssl_nnunet.data.case_cache.CaseCache`."""
        return {"max_open_cases": self.max_open_cases, "max_bad_case_fraction": self.max_bad_case_fraction}


def crop_with_padding(data, start: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Crop ``data`` (C, a0, a1, a2; numpy or blosc2 array) at ``start`` (may be negative or run past the
    end) to ``size``; outside voxels are filled with the per-channel minimum of the loaded part."""
    shape = data.shape[1:]
    lo = [max(0, s) for s in start]
    hi = [min(d, s + z) for d, s, z in zip(shape, start, size)]
    part = np.asarray(data[(slice(None), *[slice(a, b) for a, b in zip(lo, hi)])], dtype=np.float32)
    if list(part.shape[1:]) == list(size):
        return part
    fill = part.reshape(part.shape[0], -1).min(1) if part.size else np.zeros(data.shape[0], np.float32)
    out = np.empty((data.shape[0], *size), np.float32)
    out[:] = fill[:, None, None, None]
    dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
    out[(slice(None), *dst)] = part
    return out


class UnlabeledPatchSampler:
    """Draws random patches of ``patch_size`` whose centre lies inside each case's body bounding box.

    ``cases_per_sample`` > 1 returns, per batch element, patches of that many *different* cases.
    Output of :meth:`next_batch`: float32 tensor (B, C, *P) or (B, cases_per_sample, C, *P).

    Cases are opened through a :class:`~ssl_nnunet.data.case_cache.CaseCache` (at most ``max_open_cases`` open
    at a time); an unreadable case is logged, skipped and replaced by another draw, and the sampler stops with
    a clear error once more than ``max_bad_case_fraction`` of its cases are unreadable.
    """

    def __init__(self, dataset, identifiers: List[str], patch_size: Sequence[int], batch_size: int,
                 cases_per_sample: int = 1, seed: int = 0, max_open_cases: int = DEFAULT_MAX_OPEN_CASES,
                 max_bad_case_fraction: float = DEFAULT_MAX_BAD_CASE_FRACTION):
        if cases_per_sample > len(identifiers):
            raise ValueError(f"need at least {cases_per_sample} cases, got {len(identifiers)}")
        self.dataset = dataset
        self.identifiers = list(identifiers)
        self.patch_size = [int(p) for p in patch_size]
        self.batch_size = batch_size
        self.cases_per_sample = cases_per_sample
        self.rng = np.random.RandomState(seed)
        self.cases = CaseCache(dataset, self.identifiers, max_open_cases, max_bad_case_fraction,
                               min_good_cases=cases_per_sample)
        # several datasets: a dataset by its weight, then its cases (plain numbers per dataset, none per case)
        self.groups = dataset_groups(dataset, self.identifiers)

    def sample_patch(self, identifier: str) -> np.ndarray:
        bbox = self.cases.info(identifier).bbox
        return self.patch_around(identifier, [self.rng.randint(lo, max(lo + 1, hi)) for lo, hi in bbox])

    def patch_around(self, identifier: str, centre) -> np.ndarray:
        """The patch of ``identifier`` centred at ``centre`` (moved inside the image where it fits)."""
        shape = self.cases.info(identifier).shape
        start = [c - p // 2 for c, p in zip(centre, self.patch_size)]
        # keep the patch inside the image where the image is large enough
        start = [min(max(s, 0), d - p) if d >= p else (d - p) // 2
                 for s, d, p in zip(start, shape, self.patch_size)]
        return self.cases.read(identifier, lambda data: crop_with_padding(data, start, self.patch_size))

    def _retrying(self, make_item: Callable[[], np.ndarray]) -> np.ndarray:
        """``make_item()``, drawn again (with new cases) while it hits an unreadable case."""
        while True:
            try:
                return make_item()
            except UnreadableCaseError as e:
                self.cases.mark_bad(e)  # raises once too many cases are bad

    def _random_item(self) -> np.ndarray:
        cases = choose_cases(self.rng, self.identifiers, self.cases_per_sample, self.cases, self.groups)
        patches = [self.sample_patch(c) for c in cases]
        return patches[0] if self.cases_per_sample == 1 else np.stack(patches)

    def next_batch(self) -> torch.Tensor:
        return torch.from_numpy(np.stack([self._retrying(self._random_item) for _ in range(self.batch_size)]))


class RelativePositionPairSampler(UnlabeledPatchSampler):
    """Pairs of patches of two different cases cut at the *same relative position* of each case's body box
    (a random r ∈ [0, 1)³ per pair: centre ``lo + r (hi - lo - 1)`` per axis, then moved inside the image like
    :meth:`UnlabeledPatchSampler.patch_around`), so A and B show roughly corresponding anatomy, as GVSL's
    whole-volume pairs do (GVSL layout ``pair_sampling = "matched"``, the default).
    Output of :meth:`next_batch`: float32 ``(B, 2, C, a0, a1, a2)``."""

    def __init__(self, dataset, identifiers, patch_size, batch_size, seed=0, **case_options):
        super().__init__(dataset, identifiers, patch_size, batch_size, cases_per_sample=2, seed=seed, **case_options)

    def patch_at(self, identifier: str, rel: Sequence[float]) -> np.ndarray:
        bbox = self.cases.info(identifier).bbox
        return self.patch_around(identifier, [int(lo + r * max(0, hi - lo - 1)) for (lo, hi), r in zip(bbox, rel)])

    def _random_item(self) -> np.ndarray:
        cases = choose_cases(self.rng, self.identifiers, 2, self.cases, self.groups)
        rel = self.rng.uniform(0.0, 1.0, len(self.patch_size))
        return np.stack([self.patch_at(c, rel) for c in cases])
