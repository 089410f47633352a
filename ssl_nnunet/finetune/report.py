"""Comparison report of the fine-tuning arms (``finetune_report.md/.json/.png``).

Arms: ``pretrained``, ``scratch`` (same recipe, random initialisation) and ``scratch_vanilla`` (nnU-Net's own
learning rate and schedule at the same budget). Reads nnU-Net's per-fold ``validation/summary.json``
(per-class mean Dice in ``mean``, the foreground mean in ``foreground_mean``, per-case Dice in
``metric_per_case`` for the paired statistics of :mod:`ssl_nnunet.finetune.statistics`) and the ``logging``
block of each fold's ``checkpoint_final.pth`` (per-epoch pseudo Dice and losses) for the training-curve figure.
The JSON carries ``verdict`` (pretrained vs ``scratch``, else vs ``scratch_vanilla``), ``verdicts`` (per
scratch arm), ``rests_on`` and the full ``comparisons``; a std over folds is ``null`` with a single fold.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import numpy as np

from ssl_nnunet.constants import FINETUNE_ARMS, SCRATCH_ARMS
from ssl_nnunet.finetune.statistics import compare_arms, comparison_sentence
from ssl_nnunet.utilities.file_io import atomic_save_json

ARMS = FINETUNE_ARMS
BASELINES = SCRATCH_ARMS
ARM_DESCRIPTIONS = {
    "pretrained": "pretrained weights, fine-tuning recipe",
    "scratch": "random initialisation, the same recipe (isolates the weights)",
    "scratch_vanilla": "random initialisation, nnU-Net's own lr and schedule at the same budget",
}


def fold_dice(summary_file: str) -> Dict[str, float]:
    """``{class_label: Dice, ..., "mean": foreground mean Dice}`` from one nnU-Net ``summary.json``."""
    with open(summary_file) as f:
        summary = json.load(f)
    out = {str(k): float(v["Dice"]) for k, v in summary["mean"].items()}
    out["mean"] = float(summary["foreground_mean"]["Dice"])
    return out


def _mean_std(values: List[float]) -> Dict[str, object]:
    """Mean and std over folds; the std is ``None`` for a single fold (a spread over one value is no spread)."""
    arr = np.asarray(values, dtype=float)
    return {"mean": float(np.nanmean(arr)) if len(arr) else None,
            "std": float(np.nanstd(arr, ddof=1)) if len(arr) > 1 else None, "n": int(len(arr))}


def build_report(fold_folders: Dict[str, Dict[int, str]], label_names: Optional[Dict[str, str]] = None) -> dict:
    """``fold_folders[arm][fold]`` = nnU-Net fold folder, arms from :data:`ARMS`. Only folds finished in every
    arm given are compared; the verdicts pair the per-case Dice of those folds (:mod:`.statistics`)."""
    dice = {arm: {} for arm in ARMS}
    for arm in ARMS:
        for fold, folder in sorted(fold_folders.get(arm, {}).items()):
            summary = os.path.join(folder, "validation", "summary.json")
            if os.path.isfile(summary):
                dice[arm][fold] = fold_dice(summary)
    arms = [a for a in ARMS if dice[a]]  # arms with at least one finished fold
    baselines = [a for a in BASELINES if a in arms]
    folds = sorted(set.intersection(*(set(dice[a]) for a in arms))) if arms else []
    classes = sorted({c for arm in arms for d in dice[arm].values() for c in d}, key=lambda c: (c == "mean", c))
    label_names = label_names or {}
    rows = []
    for c in classes:
        values = {arm: [dice[arm][f][c] for f in folds] for arm in arms}
        row = {"class": c, "name": label_names.get(c, "foreground mean" if c == "mean" else c),
               **{arm: _mean_std(values[arm]) for arm in arms},
               "per_fold": {str(f): {arm: values[arm][i] for arm in arms} for i, f in enumerate(folds)}}
        for base in baselines:
            row[f"difference_vs_{base}"] = _mean_std([p - s for p, s in zip(values["pretrained"], values[base])])
        rows.append(row)
    compared = {a: {f: fold_folders[a][f] for f in folds} for a in arms}
    comparisons = compare_arms(compared, "pretrained", baselines, classes) if "pretrained" in arms else {}
    headline = comparisons.get("scratch", comparisons.get("scratch_vanilla", {})).get("mean")
    return {"arms": arms, "folds_compared": folds, "classes": rows,
            "comparisons": {b: {c: comparisons[b][c] for c in classes} for b in comparisons},
            "verdict": headline["verdict"] if headline else None,
            "verdicts": {b: comparisons[b]["mean"]["verdict"] for b in comparisons if "mean" in comparisons[b]},
            "rests_on": headline["rests_on"] if headline else "nothing compared",
            "folds_missing": {arm: sorted(set(fold_folders.get(arm, {})) - set(folds)) for arm in ARMS
                              if fold_folders.get(arm)}}


def _fmt(stat: dict) -> str:
    if stat["mean"] is None:
        return "—"
    return f"{stat['mean']:.4f}" + (f" ± {stat['std']:.4f}" if stat["std"] is not None else "")


def _fmt_diff(stat: dict) -> str:
    if stat["mean"] is None:
        return "—"
    return f"{stat['mean']:+.4f}" + (f" ± {stat['std']:.4f}" if stat["std"] is not None else "")


def summary_lines(report: dict) -> List[str]:
    """The verdict lines (foreground mean Dice, one per scratch arm) for the console and the markdown."""
    lines = []
    for base, by_class in report.get("comparisons", {}).items():
        if "mean" in by_class:
            lines.append(comparison_sentence(by_class["mean"]))
    return lines


def report_markdown(report: dict, title: str) -> str:
    arms, baselines = report["arms"], [b for b in BASELINES if b in report["arms"]]
    n = len(report["folds_compared"])
    lines = [f"# {title}", "", "## Verdict (foreground mean Dice, paired per validation case)", ""]
    lines += [f"- {s}" for s in summary_lines(report)]
    if report.get("splits"):
        lines += [f"- Cross-validation: {report['splits']['description']}"]
    lines += ["", "Arms: " + "; ".join(f"`{a}` = {ARM_DESCRIPTIONS[a]}"
                                        + (f" (`{report['trainers'][a]}`)" if report.get("trainers", {}).get(a)
                                           else "") for a in arms) + ".", "",
              f"## Dice per class over {n} fold(s) {report['folds_compared']}", "",
              "Mean ± std over folds" + (" (no std: one fold)." if n < 2 else ".")
              + " Differences are pretrained − scratch arm, paired per fold; the 95 % interval and the Wilcoxon "
                "p-value pair the validation cases.", "",
              "| class | " + " | ".join(f"{a} Dice" for a in arms) + " | "
              + " | ".join(f"pretrained − {b}" for b in baselines) + " |",
              "| --- " * (1 + len(arms) + len(baselines)) + "|"]
    for r in report["classes"]:
        cells = [_fmt(r[a]) for a in arms]
        for b in baselines:
            c = report["comparisons"].get(b, {}).get(r["class"], {})
            extra = ""
            if c.get("ci95"):
                extra = f" [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}], p = {c['wilcoxon_p']:.3g}"
            cells.append(_fmt_diff(r[f"difference_vs_{b}"]) + extra)
        lines.append(f"| {r['name']} ({r['class']}) | " + " | ".join(cells) + " |")
    lines += ["", "Per fold (foreground mean Dice):", "",
              "| fold | " + " | ".join(arms) + " |", "| --- " * (1 + len(arms)) + "|"]
    mean_row = next(r for r in report["classes"] if r["class"] == "mean")
    for f, v in mean_row["per_fold"].items():
        lines.append(f"| {f} | " + " | ".join(f"{v[a]:.4f}" for a in arms) + " |")
    if any(report["folds_missing"].values()):
        lines += ["", f"Not compared (unfinished in one arm): {report['folds_missing']}"]
    return "\n".join(lines) + "\n"


_COLOURS = {"pretrained": "tab:blue", "scratch": "tab:orange", "scratch_vanilla": "tab:gray"}


def plot_dice(report: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    rows, arms = report["classes"], report["arms"]
    baselines = [b for b in BASELINES if b in arms]
    x = np.arange(len(rows))
    width = 0.8 / len(arms)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for i, arm in enumerate(arms):
        std = [r[arm]["std"] for r in rows]
        axes[0].bar(x + (i - (len(arms) - 1) / 2) * width, [r[arm]["mean"] for r in rows], width,
                    yerr=None if None in std else std, label=arm, capsize=3, color=_COLOURS[arm])
    axes[0].set_xticks(x, [r["name"] for r in rows], rotation=20)
    axes[0].set_ylabel("Dice")
    axes[0].set_title("mean ± std over folds" if len(report["folds_compared"]) > 1 else "one fold (no spread)")
    axes[0].legend()
    width = 0.8 / max(1, len(baselines))
    for i, base in enumerate(baselines):
        means, err = [], [[], []]
        for r in rows:
            c = report["comparisons"].get(base, {}).get(r["class"], {})
            m = c.get("mean_difference")
            means.append(np.nan if m is None else m)
            low, high = c.get("ci95") or (m, m)
            err[0].append(0 if m is None else m - low)
            err[1].append(0 if m is None else high - m)
        axes[1].bar(x + (i - (len(baselines) - 1) / 2) * width, means, width, yerr=err, capsize=3,
                    color=_COLOURS[base], label=f"pretrained − {base}")
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set_xticks(x, [r["name"] for r in rows], rotation=20)
    axes[1].set_ylabel("paired difference of Dice")
    axes[1].set_title("mean paired difference per case (bars: bootstrap 95 % CI, none with one fold)")
    if baselines:
        axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_curves(fold_folders: Dict[str, Dict[int, str]], path: str) -> bool:
    """Pseudo Dice and training loss per epoch for every fold of both arms; False when no logs exist."""
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    import torch
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    found = False
    for arm in ARMS:
        colour = _COLOURS[arm]
        for fold, folder in sorted(fold_folders.get(arm, {}).items()):
            ckpt_file = os.path.join(folder, "checkpoint_final.pth")
            if not os.path.isfile(ckpt_file):
                continue
            log = torch.load(ckpt_file, map_location="cpu", weights_only=False).get("logging", {})
            found = True
            label = f"{arm} fold {fold}"
            axes[0].plot(log.get("mean_fg_dice", []), color=colour, alpha=0.8, label=label)
            axes[1].plot(log.get("train_losses", []), color=colour, alpha=0.8, label=label)
    axes[0].set_ylabel("pseudo Dice (validation)")
    axes[1].set_ylabel("training loss")
    for ax in axes:
        ax.set_xlabel("epoch")
        if found:
            ax.legend(fontsize=7)
    fig.tight_layout()
    if found:
        fig.savefig(path)
    plt.close(fig)
    return found


def write_report(fold_folders: Dict[str, Dict[int, str]], output_dir: str, title: str,
                 label_names: Optional[Dict[str, str]] = None, extra: Optional[dict] = None) -> dict:
    """Write ``finetune_report.{md,json,png}`` and ``finetune_curves.png``; print and return the report."""
    os.makedirs(output_dir, exist_ok=True)
    report = build_report(fold_folders, label_names)
    report.update(extra or {})
    atomic_save_json(report, os.path.join(output_dir, "finetune_report.json"))
    if not report["folds_compared"]:
        print("No fold finished in every arm yet: nothing to compare.")
        return report
    text = report_markdown(report, title)
    if extra:
        text += "\n" + "\n".join(f"- {k}: {v}" for k, v in extra.items()) + "\n"
    tmp = os.path.join(output_dir, ".tmp_finetune_report.md")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(output_dir, "finetune_report.md"))
    plot_dice(report, os.path.join(output_dir, "finetune_report.png"), title)
    plot_curves(fold_folders, os.path.join(output_dir, "finetune_curves.png"))
    print(text)
    return report
