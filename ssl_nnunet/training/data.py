"""Unlabeled patch sampling from nnU-Net's preprocessed blosc2 data.

The loader only cuts and stacks patches (numpy, in a background thread); every view of an objective is
built later on the batch's device by the method itself.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import List, Optional, Sequence

import numpy as np
import torch


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


class PrefetchLoader:
    """Runs ``sampler.next_batch`` in a background thread, ``num_prefetch`` batches ahead.

    ``wait_time`` accumulates the seconds the consumer spent blocked on data (for the benchmark's
    data-wait share). With ``num_prefetch == 0`` batches are made synchronously in the caller.
    """

    def __init__(self, sampler: UnlabeledPatchSampler, num_prefetch: int = 2):
        self.sampler = sampler
        self.num_prefetch = num_prefetch
        self.wait_time = 0.0
        self._queue: Optional[queue.Queue] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        if num_prefetch > 0:
            self._queue = queue.Queue(maxsize=num_prefetch)
            self._thread = threading.Thread(target=self._work, daemon=True)
            self._thread.start()

    def _work(self):
        while not self._stop.is_set():
            try:
                batch = self.sampler.next_batch()
            except Exception as e:  # surfaced in the consumer
                batch = e
            while not self._stop.is_set():
                try:
                    self._queue.put(batch, timeout=0.1)
                    break
                except queue.Full:
                    continue

    def __next__(self) -> torch.Tensor:
        t0 = time.perf_counter()
        batch = self.sampler.next_batch() if self._queue is None else self._queue.get()
        self.wait_time += time.perf_counter() - t0
        if isinstance(batch, Exception):
            raise batch
        return batch

    def close(self, timeout: float = 60.0):
        """Stops the worker and waits for it (it finishes the batch it is making, then exits)."""
        self._stop.set()
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout)
