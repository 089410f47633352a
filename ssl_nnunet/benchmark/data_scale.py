"""``ssl_nnunet_benchmark data``: the data path at its users' scale (not a timed test).

Two measurements, on generated data written with nnU-Net's own ``nnUNetDatasetBlosc2.save_case``:

1. **Bounded state**: ``--cases`` (default 40,000) tiny cases (8³); ``--draws`` single-patch draws of the
   default sampler (:class:`ssl_nnunet.data.samplers.UnlabeledPatchSampler`) over all of them, with the
   process's open files (``/proc/self/fd``) and memory mappings (``/proc/self/maps``) at the start, every
   ``draws / 4`` draws and at the end. They must stay flat however many distinct cases were drawn.
2. **Loader throughput**: a few cases a little larger than ``--patch`` (the GPU profile's patch; default
   128³, nnU-Net's ResEnc-M 3d_fullres patch of a typical isotropic CT/MR dataset), ``next(loader)`` of
   :class:`ssl_nnunet.data.loader.PrefetchLoader` with 0 (thread) and each ``--workers`` count of worker
   processes: patches/s in total and per worker, against the patches/s one GPU step needs
   (``batch / step time``; step time from ``--gpu_step_s``, else from the GPU rows of
   ``documentation/benchmarks_throughput.json`` when there are any), and the break-even step time
   ``batch / (patches/s)`` below which the loader would make the GPU wait.

The generated data lie in ``--root`` and are deleted at the end (``--keep`` keeps them).
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import time
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from ssl_nnunet.utilities.file_io import atomic_save_json


def process_handles() -> Dict[str, int]:
    """Open file descriptors and memory mappings of this process (Linux ``/proc``)."""
    with open("/proc/self/maps") as f:
        maps = sum(1 for _ in f)
    return {"open_files": len(os.listdir("/proc/self/fd")), "mappings": maps}


def write_tiny_dataset(folder: str, num_cases: int, shape: Sequence[int] = (8, 8, 8), seed: int = 0,
                       first: int = 0, prefix: str = "case") -> List[str]:
    """``num_cases`` preprocessed cases ``{prefix}_{i:06d}`` of one channel and ``shape`` in ``folder``, written
    with ``nnUNetDatasetBlosc2.save_case`` (data, an empty segmentation and the ``.pkl`` properties with an
    ``ssl_body_bbox``); returns their identifiers. Cases already there are kept (reruns only add missing ones)."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    os.makedirs(folder, exist_ok=True)
    shape = tuple(int(s) for s in shape)
    rng = np.random.RandomState(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij"))
    body = (grid ** 2).sum(0) < 0.8
    chunks = (1, *shape)
    blocks = (1, *[min(s, 64) for s in shape])
    seg = np.zeros((1, *shape), np.int8)
    bbox = [[int(s // 8), int(s - s // 8)] for s in shape]
    identifiers = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(first, first + num_cases):
            ident = f"{prefix}_{i:06d}"
            identifiers.append(ident)
            if os.path.isfile(os.path.join(folder, ident + ".pkl")):
                continue
            data = (body * rng.uniform(0.5, 1.5) + rng.normal(0, 0.1, shape)).astype(np.float32)[None]
            props = {"ssl_body_bbox": bbox, "shape_after_cropping_and_before_resampling": list(shape),
                     "spacing": [1.0, 1.0, 1.0]}
            # the .pkl is written last by save_case, so a case with a .pkl is complete
            nnUNetDatasetBlosc2.save_case(data, seg, props, os.path.join(folder, ident), chunks=chunks,
                                          blocks=blocks, chunks_seg=chunks, blocks_seg=blocks)
    return identifiers


def bounded_state(folder: str, num_cases: int, draws: int, seed: int = 0) -> dict:
    """Part 1 (see the module docstring): handle counts over ``draws`` draws from ``num_cases`` tiny cases."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
    from ssl_nnunet.data.samplers import UnlabeledPatchSampler
    t0 = time.perf_counter()
    identifiers = write_tiny_dataset(folder, num_cases)
    write_s = time.perf_counter() - t0
    sampler = UnlabeledPatchSampler(nnUNetDatasetBlosc2(folder, identifiers), identifiers, (8, 8, 8), 1, seed=seed)
    trace = [{"draws": 0, **process_handles(), "open_cases": 0}]
    warmup = sampler.cases.max_open_cases  # "start": once the LRU is full (and lazy imports are done)
    t0 = time.perf_counter()
    for d in range(1, draws + 1):
        sampler.next_batch()
        if d == warmup or d % max(1, draws // 4) == 0 or d == draws:
            trace.append({"draws": d, **process_handles(), "open_cases": sampler.cases.num_open})
    draw_s = time.perf_counter() - t0
    start, end = next(t for t in trace if t["draws"] >= warmup), trace[-1]
    return {"cases": num_cases, "draws": draws, "distinct_cases_drawn": sampler.cases.num_seen, "write_s": write_s,
            "draws_per_s": draws / draw_s, "max_open_cases": sampler.cases.max_open_cases,
            "start": {k: start[k] for k in ("draws", "open_files", "mappings")},
            "end": {k: end[k] for k in ("draws", "open_files", "mappings")}, "trace": trace,
            "flat": end["open_files"] <= start["open_files"] and end["mappings"] <= start["mappings"]}


class _PatchSamplerFactory:
    """Picklable: the default sampler over ``identifiers`` of ``folder`` (for the loader's workers)."""

    def __init__(self, folder: str, identifiers: List[str], patch: Sequence[int], batch_size: int):
        self.folder, self.identifiers, self.patch, self.batch_size = folder, identifiers, list(patch), batch_size

    def __call__(self, seed: int):
        from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2
        from ssl_nnunet.data.samplers import UnlabeledPatchSampler
        return UnlabeledPatchSampler(nnUNetDatasetBlosc2(self.folder, self.identifiers), self.identifiers,
                                     self.patch, self.batch_size, seed=seed)


def loader_throughput(folder: str, patch: Sequence[int], batch_size: int, workers: Sequence[int],
                      batches: int, num_cases: int = 8) -> List[dict]:
    """Part 2: patches/s of the loader with 0 (thread) and each count in ``workers`` of worker processes."""
    from ssl_nnunet.data.loader import PrefetchLoader
    shape = [int(p * 5 // 4) for p in patch]
    identifiers = write_tiny_dataset(folder, num_cases, shape, prefix="large")
    factory = _PatchSamplerFactory(folder, identifiers, patch, batch_size)
    rows = []
    for n in [0, *workers]:
        loader = (PrefetchLoader(factory(0), 2) if n == 0 else
                  PrefetchLoader(None, 2, n, factory, seed=0))
        try:
            for _ in range(max(2, n)):  # warm-up: worker start and the first batch of each worker
                next(loader)
            t0 = time.perf_counter()
            for _ in range(batches):
                next(loader)
            elapsed = time.perf_counter() - t0
        finally:
            loader.close()
        per_s = batches * batch_size / elapsed
        rows.append({"workers": n, "patches_per_s": per_s, "patches_per_s_per_worker": per_s / max(1, n),
                     "break_even_step_s": batch_size / per_s})
    return rows


def gpu_step_times(path: str = os.path.join("documentation", "benchmarks_throughput.json")) -> Dict[str, float]:
    """``{method: ssl_step_s}`` of the GPU rows of the throughput benchmark's JSON (empty when there are none)."""
    try:
        with open(path) as f:
            results = json.load(f)["results"]
    except (OSError, ValueError, KeyError):
        return {}
    return {r["method"]: float(r["ssl_step_s"]) for r in results if str(r.get("device", "")).startswith("cuda")}


def run(root: str, num_cases: int = 40000, draws: int = 2000, patch: Sequence[int] = (128, 128, 128),
        batch_size: int = 2, workers: Sequence[int] = (1, 2), batches: int = 20, gpu_step_s: Optional[float] = None,
        keep: bool = False, output: Optional[str] = None, command: str = "") -> dict:
    """Both parts; returns (and with ``output`` writes) the result as JSON."""
    root = os.path.abspath(root)
    try:
        state = bounded_state(os.path.join(root, "tiny"), num_cases, draws)
        print(json.dumps({k: v for k, v in state.items() if k != "trace"}), flush=True)
        loader = loader_throughput(os.path.join(root, "large"), patch, batch_size, workers, batches)
        print(json.dumps(loader), flush=True)
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    steps = {"given": gpu_step_s} if gpu_step_s else gpu_step_times()
    need = {name: batch_size / s for name, s in steps.items()}
    result = {"command": command, "machine": platform.platform(), "cpus": os.cpu_count(),
              "torch": torch.__version__, "patch_size": list(patch), "batch_size": batch_size,
              "bounded_state": state, "loader": loader,
              "gpu_step_s": steps, "patches_per_s_needed": need,
              "gpu_step_source": ("--gpu_step_s" if gpu_step_s else
                                  "documentation/benchmarks_throughput.json" if steps else
                                  "none: no GPU rows in documentation/benchmarks_throughput.json")}
    if output:
        atomic_save_json(result, output)
    return result
