"""Comparison report of pretrained vs. scratch nnU-Net runs (``finetune_report.md/.json/.png``).

Reads nnU-Net's per-fold ``validation/summary.json`` (per-class mean Dice in ``mean``, the foreground mean in
``foreground_mean``) and the ``logging`` block of each fold's ``checkpoint_final.pth`` (per-epoch pseudo Dice
and losses) for the training-curve figure.
"""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional

import numpy as np

from ssl_nnunet.utilities.file_io import atomic_save_json

ARMS = ("pretrained", "scratch")


def fold_dice(summary_file: str) -> Dict[str, float]:
    """``{class_label: Dice, ..., "mean": foreground mean Dice}`` from one nnU-Net ``summary.json``."""
    with open(summary_file) as f:
        summary = json.load(f)
    out = {str(k): float(v["Dice"]) for k, v in summary["mean"].items()}
    out["mean"] = float(summary["foreground_mean"]["Dice"])
    return out


def _mean_std(values: List[float]) -> Dict[str, float]:
    arr = np.asarray(values, dtype=float)
    return {"mean": float(np.nanmean(arr)), "std": float(np.nanstd(arr, ddof=1)) if len(arr) > 1 else 0.0,
            "n": int(len(arr))}


def build_report(fold_folders: Dict[str, Dict[int, str]], label_names: Optional[Dict[str, str]] = None) -> dict:
    """``fold_folders[arm][fold]`` = nnU-Net fold folder. Only folds finished in both arms are compared."""
    dice = {arm: {} for arm in ARMS}
    for arm in ARMS:
        for fold, folder in sorted(fold_folders.get(arm, {}).items()):
            summary = os.path.join(folder, "validation", "summary.json")
            if os.path.isfile(summary):
                dice[arm][fold] = fold_dice(summary)
    folds = sorted(set(dice["pretrained"]) & set(dice["scratch"]))
    classes = sorted({c for arm in ARMS for d in dice[arm].values() for c in d}, key=lambda c: (c == "mean", c))
    label_names = label_names or {}
    rows = []
    for c in classes:
        pre = [dice["pretrained"][f][c] for f in folds]
        scr = [dice["scratch"][f][c] for f in folds]
        diff = [p - s for p, s in zip(pre, scr)]
        rows.append({"class": c, "name": label_names.get(c, "foreground mean" if c == "mean" else c),
                     "pretrained": _mean_std(pre), "scratch": _mean_std(scr), "paired_difference": _mean_std(diff),
                     "per_fold": {str(f): {"pretrained": p, "scratch": s} for f, p, s in zip(folds, pre, scr)}})
    return {"folds_compared": folds, "classes": rows,
            "folds_missing": {arm: sorted(set(fold_folders.get(arm, {})) - set(folds)) for arm in ARMS}}


def report_markdown(report: dict, title: str) -> str:
    lines = [f"# {title}", "", f"Folds compared: {report['folds_compared']} (mean ± std over folds; the paired "
             f"difference is pretrained − scratch per fold).", "",
             "| class | pretrained Dice | scratch Dice | paired difference |", "| --- | --- | --- | --- |"]
    for r in report["classes"]:
        p, s, d = r["pretrained"], r["scratch"], r["paired_difference"]
        lines.append(f"| {r['name']} ({r['class']}) | {p['mean']:.4f} ± {p['std']:.4f} | "
                     f"{s['mean']:.4f} ± {s['std']:.4f} | {d['mean']:+.4f} ± {d['std']:.4f} |")
    lines += ["", "Per fold (foreground mean Dice):", "", "| fold | pretrained | scratch | difference |",
              "| --- | --- | --- | --- |"]
    mean_row = next(r for r in report["classes"] if r["class"] == "mean")
    for f, v in mean_row["per_fold"].items():
        lines.append(f"| {f} | {v['pretrained']:.4f} | {v['scratch']:.4f} | {v['pretrained'] - v['scratch']:+.4f} |")
    if any(report["folds_missing"].values()):
        lines += ["", f"Not compared (unfinished in one arm): {report['folds_missing']}"]
    return "\n".join(lines) + "\n"


def plot_dice(report: dict, path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    rows = report["classes"]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for i, arm in enumerate(ARMS):
        axes[0].bar(x + (i - 0.5) * 0.38, [r[arm]["mean"] for r in rows], 0.38,
                    yerr=[r[arm]["std"] for r in rows], label=arm, capsize=3)
    axes[0].set_xticks(x, [r["name"] for r in rows], rotation=20)
    axes[0].set_ylabel("Dice")
    axes[0].set_title("mean ± std over folds")
    axes[0].legend()
    axes[1].bar(x, [r["paired_difference"]["mean"] for r in rows], 0.5,
                yerr=[r["paired_difference"]["std"] for r in rows], capsize=3, color="tab:green")
    axes[1].axhline(0, color="k", lw=0.8)
    axes[1].set_xticks(x, [r["name"] for r in rows], rotation=20)
    axes[1].set_ylabel("pretrained − scratch Dice")
    axes[1].set_title("paired difference")
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
    for arm, colour in zip(ARMS, ("tab:blue", "tab:orange")):
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
        print("No fold finished in both arms yet: nothing to compare.")
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
