"""Anatomy-anchored region sampling for VoCo (the VoCo method declares it; :meth:`VoCo.make_sampler`).

VoCo's prior is that base ``j`` of the region covers the same anatomy in every scan. That only holds when the
region sits at the same place relative to the body in every case, so :class:`AnchoredRegionSampler` places it
by the case's body box ``[lo, hi)`` per axis (:class:`~ssl_nnunet.data.case_cache.CaseInfo`, i.e. the
``ssl_body_bbox`` recorded at preprocessing from the body mask of channel 0), in one of two modes:

* ``body_box`` (default): the region ``R`` (``(a0, a1, a2)``, at the plan's spacing) is centred at the body-box
  centre ``(lo + hi) // 2`` plus a jitter ``round(u · jitter · R_ax)``, ``u ~ U(−1, 1)`` per axis (``jitter``
  0.1 by default: ±10 % of the region), then moved inside the volume where the volume is large enough; along an
  axis where the volume is smaller than ``R`` the region is centred on the volume and padded with the channel
  minimum (:func:`~ssl_nnunet.data.samplers.crop_with_padding`). Output ``(B, C, R0, R1, R2)``.
* ``body_resized`` (the paper: the foreground box resized to a fixed size): the loader cuts the whole body box
  ``(C, h0, h1, h2)`` and resizes it on the CPU, trilinearly (``F.interpolate``, ``align_corners=False``), to a
  fixed *staging* size ``S = ceil(stage · R)`` (``stage`` 2 by default), so the batch shape is fixed and its
  size bounded whatever the body size. The method resizes ``S → R`` on the device (:func:`resize_regions`); for
  ``stage = 2`` that step is an exact 2×2×2 mean (anti-aliasing), and for a body box at least ``S`` large the
  two steps together sample the box where one ``F.interpolate(box, R)`` would (identical on linear content).
  Output ``(B, C, S0, S1, S2)``; no jitter.

Cases are opened through the sampler's :class:`~ssl_nnunet.data.case_cache.CaseCache` (bounded open files,
unreadable cases skipped and counted) like every other sampler.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ssl_nnunet.data.samplers import UnlabeledPatchSampler, crop_with_padding

__all__ = ["REGION_MODES", "AnchoredRegionSampler", "staging_size", "resize_box", "resize_regions",
           "anchored_centre"]

#: ``native``: uniform centre inside the body box (:class:`UnlabeledPatchSampler`); the other two are here
REGION_MODES = ("body_box", "body_resized", "native")


def staging_size(region: Sequence[int], stage: float) -> List[int]:
    """``ceil(stage · R_ax)`` per axis: what the loader hands over in ``body_resized`` mode."""
    if float(stage) < 1.0:
        raise ValueError(f"resize stage must be >= 1, got {stage}")
    return [int(math.ceil(float(stage) * int(r) - 1e-9)) for r in region]


def resize_box(box: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Trilinear resize (``F.interpolate``, ``align_corners=False``) of ``box (C, h0, h1, h2)`` → ``(C, *size)``
    float32 (numpy in, numpy out; the loader's CPU step)."""
    x = torch.from_numpy(np.ascontiguousarray(box, dtype=np.float32))[None]
    if list(x.shape[2:]) == [int(s) for s in size]:
        return x[0].numpy()
    return F.interpolate(x, size=[int(s) for s in size], mode="trilinear", align_corners=False)[0].numpy()


def resize_regions(batch: torch.Tensor, region: Sequence[int]) -> torch.Tensor:
    """The device step of ``body_resized``: ``batch (B, C, S0, S1, S2)`` → ``(B, C, R0, R1, R2)`` (trilinear,
    ``align_corners=False``, in the batch's dtype and on its device; unchanged when ``S == R``)."""
    region = [int(r) for r in region]
    if list(batch.shape[2:]) == region:
        return batch
    return F.interpolate(batch, size=region, mode="trilinear", align_corners=False)


def anchored_centre(bbox: Sequence[Sequence[int]], region: Sequence[int], jitter: float,
                    rng: np.random.RandomState) -> List[int]:
    """Body-box centre ``(lo + hi) // 2`` plus ``round(u · jitter · R_ax)``, ``u ~ U(−1, 1)`` per axis."""
    u = rng.uniform(-1.0, 1.0, len(region)) if jitter > 0 else np.zeros(len(region))
    return [(int(lo) + int(hi)) // 2 + int(round(float(v) * jitter * int(r)))
            for (lo, hi), r, v in zip(bbox, region, u)]


class AnchoredRegionSampler(UnlabeledPatchSampler):
    """VoCo regions anchored to each case's body box (module docstring).

    Args:
        dataset, identifiers, batch_size, seed, max_open_cases, max_bad_case_fraction: as
            :class:`~ssl_nnunet.data.samplers.UnlabeledPatchSampler`.
        patch_size: what one element of a batch is: the region ``R`` (``body_box``) or the staging size ``S``
            (``body_resized``, see :func:`staging_size`).
        mode: ``"body_box"`` or ``"body_resized"``.
        jitter: ``body_box`` only: centre jitter as a fraction of the region per axis (``[0, 0.5]``).

    :meth:`next_batch` returns float32 ``(B, C, *patch_size)``.
    """

    def __init__(self, dataset, identifiers: List[str], patch_size: Sequence[int], batch_size: int,
                 mode: str = "body_box", jitter: float = 0.1, seed: int = 0, **case_options):
        if mode not in ("body_box", "body_resized"):
            raise ValueError(f"anchored region mode must be 'body_box' or 'body_resized', got '{mode}'")
        if not 0.0 <= float(jitter) <= 0.5:
            raise ValueError(f"region jitter must lie in [0, 0.5] (a fraction of the region), got {jitter}")
        super().__init__(dataset, identifiers, patch_size, batch_size, cases_per_sample=1, seed=seed,
                         **case_options)
        self.mode = mode
        self.jitter = float(jitter)

    def sample_patch(self, identifier: str) -> np.ndarray:
        bbox = self.cases.info(identifier).bbox
        if self.mode == "body_box":
            return self.patch_around(identifier, anchored_centre(bbox, self.patch_size, self.jitter, self.rng))
        lo = [int(a) for a, _ in bbox]
        size = [max(1, int(b) - int(a)) for a, b in bbox]
        box = self.cases.read(identifier, lambda data: crop_with_padding(data, lo, size))
        return resize_box(box, self.patch_size)
