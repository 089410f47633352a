"""The ``ssl`` block of ``sslPlans.json``: each objective's patch layout (METHODS.md §8).

Every size is derived from the pretraining patch P, the network's total stride S and the mask quantum
q = stride of the penultimate stage, so the layout stays valid for any plan. ``validate_ssl_block`` checks
the invariants and raises :class:`SSLInputError` naming the method and key.
"""
from __future__ import annotations

import copy
import math
from typing import List, Sequence

import numpy as np

from plans import load_shipped
from ssl_nnunet.utilities.errors import SSLInputError

PROFILES = ("cpu_smoke", "cpu_bench", "gpu")


def cumulative_strides(strides: Sequence[Sequence[int]]) -> List[List[int]]:
    """Per-stage cumulative stride s_k (per axis) from the plan's per-stage ``strides``."""
    out, current = [], np.ones(len(strides[0]), dtype=int)
    for s in strides:
        current = current * np.asarray(s, dtype=int)
        out.append([int(v) for v in current])
    return out


def _divides(a: Sequence[int], b: Sequence[int]) -> bool:
    """True when every a_ax divides b_ax."""
    return all(int(y) % int(x) == 0 for x, y in zip(a, b))


def mae_layout(quantum: List[int], cum_strides: List[List[int]]) -> dict:
    return {"mask_unit": list(quantum), "mask_ratio": 0.75,
            "remask_strides": [s for s in cum_strides if _divides(s, quantum)],
            "target": "none", "variant": "sparse"}


def voco_layout(patch: List[int], total_stride: List[int], median_shape: Sequence[float], a_op: int,
                cpu: bool) -> dict:
    crop = [max(S, (P // (2 * S)) * S) for P, S in zip(patch, total_stride)]
    grid = [1, 1, 1]
    for ax in range(3):
        if ax == a_op:
            continue
        while True:
            g = 2 if cpu else min(4, int(median_shape[ax] // crop[ax]))
            if g >= 2 or crop[ax] // 2 < total_stride[ax] or (crop[ax] // 2) % total_stride[ax]:
                grid[ax] = max(g, 2)
                break
            crop[ax] //= 2
    region = [g * c for g, c in zip(grid, crop)]
    return {"crop_size": crop, "base_grid": grid, "region_size": region, "n_target_crops": 4, "lambda_reg": 1.0,
            "loss_variant": "paper", "region_mode": "native", "proj_dims": [2048, 2048, 2048],
            "projector_norm": "batch", "logit_clamp": "hard", "use_ema_teacher": False,
            "ema_momentum": 0.9, "augmentation": {"p_flip": 0.2, "p_rot90": 0.2, "p_shift": 0.1, "shift": 0.1}}


#: GVSL's default map to [0, 1]: per-patch 0.5/99.5 percentiles (MR, mixed); CT gets a fixed range (below)
GVSL_PER_PATCH_INTENSITY = {"mode": "per_patch", "percentiles": [0.5, 99.5], "range": None}


def gvsl_intensity(normalization_schemes: Sequence[str], intensity_properties: dict) -> dict:
    """GVSL's map to [0, 1] (METHODS.md §5.3): for CT — every channel ``CTNormalization`` — a fixed range per
    channel, the fingerprint's foreground 0.5/99.5 percentiles expressed in nnU-Net-normalised units
    ``(p − mean) / std``; otherwise (MR, mixed) per-patch 0.5/99.5 percentiles."""
    per_patch = copy.deepcopy(GVSL_PER_PATCH_INTENSITY)
    if not normalization_schemes or any(s != "CTNormalization" for s in normalization_schemes):
        return per_patch
    ranges = []
    for c in range(len(normalization_schemes)):
        props = intensity_properties.get(str(c)) or intensity_properties.get(c)
        if not props or not all(k in props for k in ("mean", "std", "percentile_00_5", "percentile_99_5")):
            return per_patch
        std = max(float(props["std"]), 1e-8)
        ranges.append([(float(props["percentile_00_5"]) - float(props["mean"])) / std,
                       (float(props["percentile_99_5"]) - float(props["mean"])) / std])
    return {"mode": "fixed", "percentiles": [0.5, 99.5], "range": ranges}


def gvsl_layout(patch: List[int]) -> dict:
    """GVSL (METHODS.md §5.5; keys documented in ssl_nnunet/methods/gvsl.py and documentation/methods/gvsl.md).

    Sizes in voxels of the pair patch P; angles in radians; ``weights`` = [ncc, smooth, restore].
    """
    return {"pair_patch": list(patch),
            "ncc_window": [min(9, 2 * (P // 8) + 1) for P in patch],
            "affine_bounds": [math.pi / 9, 0.25, math.pi / 18],
            "spatial_aug": {"rotation": math.pi / 9, "scale": [0.75, 1.25], "shear": math.pi / 18,
                            "translation": 0.1, "elastic_sigma": [10, 13], "elastic_alpha": [0, 512]},
            "appearance": {"local_shuffle_p": 0.8, "nonlinear_p": 0.9, "inpaint": True,
                           "shuffle_windows_per_128": 5000, "shuffle_window_fraction": 0.05,
                           "inpaint_max_boxes": 30, "inpaint_continue_p": 0.95, "inpaint_size": [0.1, 0.2]},
            "intensity": copy.deepcopy(GVSL_PER_PATCH_INTENSITY),
            "pair_sampling": "matched",
            "weights": [1.0, 1.0, 1.0], "affine_grad": True, "restore_hidden": 16}


def _mim_u2(P: int, q: int) -> int:
    candidates = [d for d in range(2 * q, P + 1, 2 * q) if P % d == 0]
    if not candidates:
        candidates = [d for d in range(q, P + 1, q) if P % d == 0]
    return min(candidates, key=lambda d: (abs(d - P / 6), d))


def mim_layout(patch: List[int], quantum: List[int], median_shape: Sequence[float]) -> dict:
    """MiM (METHODS.md §6.4): X1 = r1 ⊙ P (r1 = 2, or 1 where 2P exceeds the median shape), level-1 grid g1 = r1
    (units of P/r1 in x1 = native P-sized level-2 regions), u2 ≈ P/6 (multiple of 2q), level 3 = a u2 region
    zoomed to P.

    Small-image fallback: when r1 = 1 on every axis (images smaller than 2P everywhere) a single level-1 unit
    would leave nothing visible next to the hidden one. Then X1 = P is split into halves (g1 = 2 wherever P/2 is
    still a multiple of q) and a level-2 volume is a hidden half upsampled to P (``level2_zoom`` = g1 / r1).
    """
    r1 = [1 if 2 * P > m else 2 for P, m in zip(patch, median_shape)]
    grid1 = list(r1)
    if int(np.prod(r1)) == 1:
        grid1 = [2 if P % (2 * q) == 0 else 1 for P, q in zip(patch, quantum)]
    u2 = [_mim_u2(P, q) for P, q in zip(patch, quantum)]
    n1 = int(np.prod(grid1))
    n_hidden1 = int(math.floor(0.5 * n1 + 0.5))
    return {"r1": r1, "level1_region": [r * P for r, P in zip(r1, patch)],
            "level1_unit": [P // g for P, g in zip(patch, grid1)], "level2_zoom": [g // r for g, r in zip(grid1, r1)],
            "u2": u2, "level3_zoom": [P // u for P, u in zip(patch, u2)],
            "ratios": [0.5, 0.6, 0.5], "gamma": max(1, min(4, n_hidden1)), "beta": 2, "alpha": 0.1, "tau": 0.2,
            "proj_dim": 2048, "align_stride": list(quantum), "target": "per_unit",
            "level_weights": [1.0, 1.0, 1.0]}


def alice_layout(patch: List[int], quantum: List[int]) -> dict:
    return {"crop_size": list(patch), "mask_unit": list(quantum), "mask_ratio": 0.75, "token_stride": list(quantum),
            "head": [2048, 256, 512], "casa": {"dim": 512, "heads": 8}, "ema": [0.996, 1.0],
            "matcher": "profile_bbox", "recon_weight": 1.0, "center_momentum": 0.9, "use_predictor": False}


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def compute_ssl_block(patch_size: Sequence[int], strides: Sequence[Sequence[int]], spacing: Sequence[float],
                      median_shape: Sequence[float], profile: str, downstream_patch_size: Sequence[int],
                      verbose: bool = True) -> dict:
    """Build the ``ssl`` block for a CNN U-Net plan (see module docstring and METHODS.md §8)."""
    if profile not in PROFILES:
        raise SSLInputError(f"Unknown profile '{profile}'. Choose one of {', '.join(PROFILES)}.")
    patch = [int(p) for p in patch_size]
    cum = cumulative_strides(strides)
    S, q = cum[-1], cum[-2]
    a_op = int(np.argmax(spacing))  # first maximum -> a0 on ties
    cpu = profile != "gpu"
    mim_patch = list(patch)
    if not cpu:
        cap = load_shipped("profiles.json")["gpu"]["mim_max_patch_size"]
        mim_patch = [min(P, max(s, (cap // s) * s)) for P, s in zip(patch, S)]
    layouts = {
        "mae": (patch, mae_layout(q, cum)),
        "mim": (mim_patch, mim_layout(mim_patch, q, median_shape)),
        "voco": (None, voco_layout(patch, S, median_shape, a_op, cpu)),
        "gvsl": (patch, gvsl_layout(patch)),
        "alice": (patch, alice_layout(patch, q)),
    }
    layouts["voco"] = (layouts["voco"][1]["crop_size"], layouts["voco"][1])
    defaults = load_shipped("method_defaults.json")["cpu" if cpu else "gpu"]
    methods = {}
    for name, (net_patch, layout) in layouts.items():
        # optimizer / lr_schedule entries of a method replace the common ones whole (no key mixing)
        settings = {**copy.deepcopy(defaults["common"]),
                    **{k: copy.deepcopy(v) for k, v in defaults.get(name, {}).items() if k != "layout"}}
        methods[name] = {"pretrain_patch_size": list(net_patch),
                         "layout": _merge(layout, defaults.get(name, {}).get("layout", {})), **settings}
    mim = methods["mim"]["layout"]
    n_level1_units = int(np.prod([P // u for P, u in zip(methods["mim"]["pretrain_patch_size"], mim["level1_unit"])]))
    mim["gamma"] = min(mim["gamma"], int(math.floor(mim["ratios"][0] * n_level1_units + 0.5)))
    block = {"architecture_family": "cnn", "profile": profile, "total_stride": S, "mask_quantum": q,
             "out_of_plane_axis": a_op, "recommended_downstream_patchsize": [int(p) for p in downstream_patch_size],
             "median_shape": [float(m) for m in median_shape], "methods": methods}
    validate_ssl_block(block, patch, warn=verbose)
    return block


def validate_ssl_block(block: dict, patch: Sequence[int], warn: bool = False) -> List[str]:
    """Check METHODS.md §8's cross-method rules; raise SSLInputError on a violation, return warnings."""
    S, q = block["total_stride"], block["mask_quantum"]
    median = block.get("median_shape", [float("inf")] * 3)
    m = block["methods"]
    warnings = []

    def fail(method, key, what):
        raise SSLInputError(f"Invalid SSL layout for '{method}', key '{key}': {what}. Sizes must be derived from a "
                            f"patch that is a multiple of the network's total stride {S} and units that are "
                            f"multiples of the mask quantum {q}; fix the plan or re-plan with another -profile.")

    for name, entry in m.items():
        if not _divides(S, entry["pretrain_patch_size"]):
            fail(name, "pretrain_patch_size", f"{entry['pretrain_patch_size']} is not a multiple of {S}")
    if not _divides(q, S):
        fail("all", "mask_quantum", f"{q} does not divide the total stride {S}")
    if not _divides(m["mae"]["layout"]["mask_unit"], m["mae"]["pretrain_patch_size"]):
        fail("mae", "mask_unit", "does not divide the patch")
    v = m["voco"]["layout"]
    if not _divides(S, v["crop_size"]):
        fail("voco", "crop_size", f"{v['crop_size']} is not a multiple of {S}")
    if list(v["region_size"]) != [g * c for g, c in zip(v["base_grid"], v["crop_size"])]:
        fail("voco", "region_size", "must equal base_grid x crop_size")
    if int(v["base_grid"][int(block.get("out_of_plane_axis", 0))]) != 1:
        fail("voco", "base_grid", f"{v['base_grid']} splits the out-of-plane axis {block.get('out_of_plane_axis', 0)}")
    if any(r > md for r, md in zip(v["region_size"], median)):
        warnings.append(f"voco region {v['region_size']} exceeds the median image shape {median}; regions get padded")
    mi = m["mim"]["layout"]
    mp = m["mim"]["pretrain_patch_size"]
    if not _divides(q, mi["level1_unit"]) or not _divides(mi["level1_unit"], mp):
        fail("mim", "level1_unit", f"{mi['level1_unit']} must divide the patch {mp} and be a multiple of {q}")
    if not _divides(mi["u2"], mp) or not _divides(q, mi["u2"]):
        fail("mim", "u2", f"{mi['u2']} must divide the patch {mp} and be a multiple of {q}")
    if list(mi["level1_region"]) != [r * P for r, P in zip(mi["r1"], mp)]:
        fail("mim", "level1_region", f"{mi['level1_region']} must equal r1 {mi['r1']} times the patch {mp}")
    if any(r > md for r, md in zip(mi["level1_region"], median)):
        warnings.append(f"mim level-1 region {mi['level1_region']} exceeds the median image shape {median}")
    grid1 = [P // u for P, u in zip(mp, mi["level1_unit"])]
    region2 = [R // g for R, g in zip(mi["level1_region"], grid1)]
    if not _divides(grid1, mi["level1_region"]) or not _divides(region2, mp):
        fail("mim", "level1_unit", f"the native level-2 region level1_region / (patch / level1_unit) = {region2} "
                                   f"must divide the patch {mp}")
    ratios = mi["ratios"]
    if len(ratios) != 3 or not all(0 < r < 1 for r in ratios):
        fail("mim", "ratios", f"{ratios} must be three mask ratios in (0, 1)")
    n1, n2 = int(np.prod(grid1)), int(np.prod([P // u for P, u in zip(mp, mi["u2"])]))
    hidden1 = math.floor(ratios[0] * n1 + 0.5)
    if n1 < 2:
        warnings.append(f"mim: the level-1 region {mi['level1_region']} has a single unit; 'ssl_nnunet_pretrain -m "
                        f"mim' will refuse this plan (use a smaller patch)")
    elif not 1 <= mi["gamma"] <= hidden1 or hidden1 >= n1:
        fail("mim", "gamma", f"gamma {mi['gamma']} must lie in [1, {hidden1}] (hidden level-1 units of {n1}, "
                             f"at least one visible)")
    if not 0 <= mi["beta"] <= math.floor(ratios[1] * n2 + 0.5):
        fail("mim", "beta", f"beta {mi['beta']} exceeds the hidden level-2 units")
    al = m["alice"]["layout"]
    if not _divides(al["mask_unit"], al["crop_size"]):
        fail("alice", "mask_unit", "does not divide the crop")
    if not _divides(al["token_stride"], al["mask_unit"]):
        fail("alice", "token_stride", f"{al['token_stride']} does not divide the mask unit {al['mask_unit']}")
    if al["casa"]["dim"] % al["casa"]["heads"]:
        fail("alice", "casa", f"dim {al['casa']['dim']} is not divisible by heads {al['casa']['heads']}")
    if al["matcher"] not in ("profile_bbox", "bbox", "random"):
        fail("alice", "matcher", f"'{al['matcher']}' is not one of profile_bbox, bbox, random")
    if any(w > P for w, P in zip(m["gvsl"]["layout"]["ncc_window"], m["gvsl"]["pretrain_patch_size"])):
        fail("gvsl", "ncc_window", "window larger than the patch")
    if any(int(w) % 2 == 0 for w in m["gvsl"]["layout"]["ncc_window"]):
        fail("gvsl", "ncc_window", "window sizes must be odd (centred box)")
    if warn:
        for w in warnings:
            print(f"WARNING: {w}")
    return warnings
