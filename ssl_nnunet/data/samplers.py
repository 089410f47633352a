"""Unlabeled patch sampling from nnU-Net's preprocessed blosc2 data.

The samplers only cut and stack patches (numpy); every view of an objective is built later on the batch's
device by the method itself. :class:`SamplerSpec` is what the trainer hands to
:meth:`ssl_nnunet.methods.base.SSLMethod.make_sampler`; the background loader is
:class:`ssl_nnunet.data.loader.PrefetchLoader`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np
import torch


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
    """

    dataset: object
    identifiers: List[str]
    patch_size: List[int]
    batch_size: int
    seed: int
    method_plan: dict
    ssl_plan: dict
    preprocessed_folder: str


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
    """

    def __init__(self, dataset, identifiers: List[str], patch_size: Sequence[int], batch_size: int,
                 cases_per_sample: int = 1, seed: int = 0):
        if cases_per_sample > len(identifiers):
            raise ValueError(f"need at least {cases_per_sample} cases, got {len(identifiers)}")
        self.dataset = dataset
        self.identifiers = list(identifiers)
        self.patch_size = [int(p) for p in patch_size]
        self.batch_size = batch_size
        self.cases_per_sample = cases_per_sample
        self.rng = np.random.RandomState(seed)
        self._cache = {}

    def _case(self, identifier):
        if identifier not in self._cache:
            data, _, _, props = self.dataset.load_case(identifier)
            bbox = props.get("ssl_body_bbox") or [[0, s] for s in data.shape[1:]]
            self._cache[identifier] = (data, bbox)
        return self._cache[identifier]

    def sample_patch(self, identifier: str) -> np.ndarray:
        _, bbox = self._case(identifier)
        return self.patch_around(identifier, [self.rng.randint(lo, max(lo + 1, hi)) for lo, hi in bbox])

    def patch_around(self, identifier: str, centre) -> np.ndarray:
        """The patch of ``identifier`` centred at ``centre`` (moved inside the image where it fits)."""
        data, _ = self._case(identifier)
        start = [c - p // 2 for c, p in zip(centre, self.patch_size)]
        # keep the patch inside the image where the image is large enough
        start = [min(max(s, 0), d - p) if d >= p else (d - p) // 2
                 for s, d, p in zip(start, data.shape[1:], self.patch_size)]
        return crop_with_padding(data, start, self.patch_size)

    def next_batch(self) -> torch.Tensor:
        items = []
        for _ in range(self.batch_size):
            cases = self.rng.choice(len(self.identifiers), self.cases_per_sample, replace=False)
            patches = [self.sample_patch(self.identifiers[c]) for c in cases]
            items.append(patches[0] if self.cases_per_sample == 1 else np.stack(patches))
        return torch.from_numpy(np.stack(items))


class RelativePositionPairSampler(UnlabeledPatchSampler):
    """Pairs of patches of two different cases cut at the *same relative position* of each case's body box
    (a random r ∈ [0, 1)³ per pair: centre ``lo + r (hi - lo - 1)`` per axis, then moved inside the image like
    :meth:`UnlabeledPatchSampler.patch_around`), so A and B show roughly corresponding anatomy, as GVSL's
    whole-volume pairs do (GVSL layout ``pair_sampling = "matched"``, the default).
    Output of :meth:`next_batch`: float32 ``(B, 2, C, a0, a1, a2)``."""

    def __init__(self, dataset, identifiers, patch_size, batch_size, seed=0):
        super().__init__(dataset, identifiers, patch_size, batch_size, cases_per_sample=2, seed=seed)

    def patch_at(self, identifier: str, rel: Sequence[float]) -> np.ndarray:
        _, bbox = self._case(identifier)
        return self.patch_around(identifier, [int(lo + r * max(0, hi - lo - 1)) for (lo, hi), r in zip(bbox, rel)])

    def next_batch(self) -> torch.Tensor:
        items = []
        for _ in range(self.batch_size):
            cases = self.rng.choice(len(self.identifiers), 2, replace=False)
            rel = self.rng.uniform(0.0, 1.0, len(self.patch_size))
            items.append(np.stack([self.patch_at(self.identifiers[i], rel) for i in cases]))
        return torch.from_numpy(np.stack(items))
