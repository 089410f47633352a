"""Paired statistics of two fine-tuning arms from nnU-Net's per-case validation Dice.

nnU-Net's final validation writes ``fold_X/validation/summary.json`` with ``metric_per_case``: one entry per
validation case (``reference_file``, ``prediction_file``, ``metrics[label]["Dice"]``). Both arms of a
comparison use the same ``splits_final.json``, so every validation case of a fold has one Dice per arm and
the two arms can be compared case by case.

:func:`paired_comparison` gives

* the mean paired difference (arm A − arm B) over all cases of all compared folds;
* a seeded bootstrap 95 % interval of that mean that resamples **folds first, then cases within each drawn
  fold** (a two-stage bootstrap): each fold is one training run per arm, and the run-to-run noise of training
  (≈ 0.1 Dice on the short CPU budgets, documentation/results.md) is shared by all cases of a fold, so
  resampling cases alone would pretend that noise away;
* Wilcoxon's signed-rank p-value (scipy) over the paired per-case differences;
* a ``verdict``: "better" / "worse" when the interval excludes 0 *and* p < 0.05, otherwise "no evidence of
  a difference". With a single fold there is no verdict (``None``): all its cases share one training run per
  arm, so nothing measures how much a second run would differ.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

BOOTSTRAP_SAMPLES = 10000
BOOTSTRAP_SEED = 0
ALPHA = 0.05
VERDICTS = ("better", "no evidence of a difference", "worse")


def case_id(entry: dict, file_ending: Optional[str] = None) -> str:
    """Case identifier of one ``metric_per_case`` entry: the reference file name without its ending."""
    name = os.path.basename(entry["reference_file"])
    if file_ending and name.endswith(file_ending):
        return name[: -len(file_ending)]
    return name.split(".")[0]


def case_dice(summary_file: str) -> Dict[str, Dict[str, float]]:
    """``{case: {label: Dice, ..., "mean": foreground mean}}`` from one nnU-Net ``summary.json``.

    The foreground mean of a case is the mean over its labels with a defined Dice (nnU-Net writes NaN for a
    label absent from both reference and prediction), as nnU-Net's ``foreground_mean`` does over classes."""
    with open(summary_file) as f:
        summary = json.load(f)
    if "metric_per_case" not in summary:
        raise ValueError(f"{summary_file} has no 'metric_per_case' (not written by nnU-Net's evaluation?)")
    out = {}
    for entry in summary["metric_per_case"]:
        per_label = {str(k): float(v["Dice"]) if v["Dice"] is not None else float("nan")
                     for k, v in entry["metrics"].items()}
        values = [v for v in per_label.values() if not np.isnan(v)]
        per_label["mean"] = float(np.mean(values)) if values else float("nan")
        out[case_id(entry)] = per_label
    return out


def _bootstrap_interval(per_fold: List[np.ndarray], n_samples: int, seed: int) -> tuple:
    """Two-stage bootstrap (folds, then cases within each drawn fold) of the mean paired difference."""
    rng = np.random.default_rng(seed)
    n_folds = len(per_fold)
    sizes = np.array([len(d) for d in per_fold])
    drawn = rng.integers(0, n_folds, (n_samples, n_folds))  # which fold fills each of the n_folds slots
    # sum of a within-fold resample of every fold for every (sample, slot); only the drawn one is used
    sums = np.stack([d[rng.integers(0, len(d), (n_samples, n_folds, len(d)))].sum(-1) for d in per_fold])
    rows, slots = np.indices(drawn.shape)
    means = sums[drawn, rows, slots].sum(1) / sizes[drawn].sum(1)
    low, high = np.percentile(means, [100 * ALPHA / 2, 100 * (1 - ALPHA / 2)])
    return float(low), float(high)


def _wilcoxon_p(differences: np.ndarray) -> float:
    from scipy.stats import wilcoxon
    if np.all(differences == 0):
        return 1.0  # identical arms: scipy has nothing to rank
    return float(wilcoxon(differences, zero_method="wilcox", alternative="two-sided").pvalue)


def paired_comparison(a: Dict[int, Dict[str, float]], b: Dict[int, Dict[str, float]], name_a: str = "A",
                      name_b: str = "B", n_samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED) -> dict:
    """Compare arm ``a`` with arm ``b``; ``a[fold][case]`` / ``b[fold][case]`` are per-case Dice values.

    Only folds present in both arms and, within them, cases present in both with a defined (non-NaN) Dice
    in both are paired. Returns the numbers, the verdict and the sentence saying what it rests on."""
    per_fold, folds, n_cases = [], [], 0
    for fold in sorted(set(a) & set(b)):
        cases = sorted(c for c in set(a[fold]) & set(b[fold])
                       if not (np.isnan(a[fold][c]) or np.isnan(b[fold][c])))
        if not cases:
            continue
        per_fold.append(np.array([a[fold][c] - b[fold][c] for c in cases], dtype=float))
        folds.append(fold)
        n_cases += len(cases)
    out = {"arms": [name_a, name_b], "difference": f"{name_a} − {name_b}", "folds": folds, "n_folds": len(folds),
           "n_cases": n_cases, "mean_difference": None, "ci95": None, "wilcoxon_p": None, "verdict": None,
           "bootstrap": {"samples": n_samples, "seed": seed, "resampling": "folds, then cases within each fold"}}
    if not per_fold:
        out["rests_on"] = "no validation case finished in both arms: nothing to compare"
        return out
    diffs = np.concatenate(per_fold)
    out["mean_difference"] = float(diffs.mean())
    out["wilcoxon_p"] = _wilcoxon_p(diffs)
    rests = (f"{n_cases} validation case(s) in {len(folds)} fold(s) ({', '.join(map(str, folds))}), each case "
             f"paired between {name_a} and {name_b}")
    if len(folds) < 2:
        out["rests_on"] = (f"no verdict: {rests}, but a single fold is one training run per arm, so nothing "
                           f"measures how much a second run would differ (on short budgets that run-to-run "
                           f"noise is larger than typical gains). Run more folds (-f) for a verdict.")
        return out
    low, high = _bootstrap_interval(per_fold, n_samples, seed)
    out["ci95"] = [low, high]
    significant = out["wilcoxon_p"] < ALPHA
    if low > 0 and significant:
        out["verdict"] = "better"
    elif high < 0 and significant:
        out["verdict"] = "worse"
    else:
        out["verdict"] = "no evidence of a difference"
    out["rests_on"] = rests
    return out


def comparison_sentence(c: dict) -> str:
    """One line for the console and the markdown, e.g. ``pretrained − scratch: +0.0312 Dice (95 % CI ...)``."""
    if c["mean_difference"] is None:
        return f"{c['difference']}: {c['rests_on']}."
    head = f"{c['difference']}: {c['mean_difference']:+.4f} Dice"
    if c["verdict"] is None:
        return f"{head}; {c['rests_on']}"
    low, high = c["ci95"]
    return (f"{head} (95 % CI {low:+.4f} to {high:+.4f}, Wilcoxon p = {c['wilcoxon_p']:.3g}) -> "
            f"{c['arms'][0]} {_verdict_words(c['verdict'], c['arms'][1])}; rests on {c['rests_on']}.")


def _verdict_words(verdict: str, other: str) -> str:
    return {"better": f"better than {other}", "worse": f"worse than {other}",
            "no evidence of a difference": f"vs {other}: no evidence of a difference"}[verdict]


def fold_case_dice(fold_folders: Dict[int, str], label: str = "mean") -> Dict[int, Dict[str, float]]:
    """``{fold: {case: Dice of label}}`` for the folds of one arm whose ``validation/summary.json`` exists."""
    out = {}
    for fold, folder in sorted(fold_folders.items()):
        summary = os.path.join(folder, "validation", "summary.json")
        if os.path.isfile(summary):
            out[fold] = {c: d.get(label, float("nan")) for c, d in case_dice(summary).items()}
    return out


def compare_arms(fold_folders: Dict[str, Dict[int, str]], arm: str, baselines: Sequence[str],
                 labels: Sequence[str] = ("mean",)) -> Dict[str, Dict[str, dict]]:
    """``{baseline: {label: paired_comparison(arm, baseline)}}`` for every baseline arm with folders."""
    out = {}
    for base in baselines:
        if base not in fold_folders:
            continue
        out[base] = {lab: paired_comparison(fold_case_dice(fold_folders[arm], lab),
                                            fold_case_dice(fold_folders[base], lab), arm, base)
                     for lab in labels}
    return out
