"""``ssl_nnunet_benchmark transfer``: does pretraining pay off on the demo task?

Pretrains every method with the same budget on the unlabeled demo set (``Dataset900``), fine-tunes each
bundle and a scratch baseline on the labeled demo set (``Dataset901``) with ``ssl_nnunet_finetune``'s fold
runner — same plan, trainer and splits — in a label-scarce setting: ``n_splits`` splits of
``train_cases`` training cases each (disjoint) against one fixed validation set. Scratch is trained twice
(two independent initialisations) to measure its run-to-run noise, and once more as vanilla nnU-Net
(``scratch_vanilla``: ``nnUNetTrainer``'s own learning rate and schedule at the same budget,
:data:`ssl_nnunet.nnunet_trainers.VANILLA_TRAINERS`), so a gain cannot come from a recipe that suits
pretrained weights better than random ones. Each method is compared with both scratch arms case by case
(:func:`ssl_nnunet.finetune.statistics.paired_comparison`: per-case Dice of every split, two-stage bootstrap
interval, Wilcoxon p, verdict). Results: ``results.json``, ``results.md`` (also written to ``documentation/results.md`` with
``--write-docs``) and ``results.png``.

The benchmark works in its own nnU-Net folders (``--root``), so the user's plans and splits are untouched: it
points ``nnUNet_raw``/``_preprocessed``/``_results`` there while it runs (ssl_nnunet and nnunetv2 both read
them at each use) and calls each step's function in this process; only the fine-tuning folds run as
``nnUNetv2_train`` processes (:func:`ssl_nnunet.finetune.finetune.run_fold`). The output of every step goes
to ``<root>/benchmark_log.txt``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import sys
import time
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import numpy as np

from ssl_nnunet.constants import (CONFIGURATION, DEMO_LABELED_DATASET, DEMO_LABELED_ID, DEMO_UNLABELED_DATASET,
                                  DEMO_UNLABELED_ID, plans_identifiers)
from ssl_nnunet.utilities.errors import SSLInputError
from ssl_nnunet.utilities.provenance import project_git_commit


class Budget(NamedTuple):
    profile: str  # plan profile of Dataset900
    pretrain_iterations: Optional[int]  # None: the plan's own length
    trainers: Dict[str, str]  # fine-tuning budget label -> nnU-Net trainer
    splits: int
    train_cases: Optional[int]  # per split; None: all cases that are not validation cases, split evenly
    validation_cases: int  # one fixed validation set for every split
    demo_cases: Tuple[int, int]  # (unlabeled Dataset900, labeled Dataset901) cases of the demo datasets
    arch: str = "cnn"  # backbone (-arch of the planner): "cnn" or a Primus size

    @property
    def family(self) -> str:
        """``ssl.architecture_family`` of the budget's plan: "cnn" or "primus"."""
        return "cnn" if self.arch == "cnn" else "primus"


BUDGETS = {
    # two fine-tuning lengths on the same pretrained weights and splits: the short one shows how much of a gain
    # survives a longer schedule, and its scratch-vs-scratch noise is reported beside it (benchmarks.md)
    "cpu-small": Budget("cpu_smoke", 200, {"300 it": "nnUNetTrainer_SSLFinetune_CPU300",
                                           "1000 it": "nnUNetTrainer_SSLFinetune_CPU1000"}, 3, 4, 6, (40, 20)),
    # the same protocol on the tiny CPU Primus (-arch primus_m -profile cpu_smoke: 96-d, depth 4, 32³); its
    # fine-tuning trainer is nnunetv2's Primus recipe at the same length, which is also its vanilla arm
    "cpu-small-primus": Budget("cpu_smoke", 200, {"1000 it": "nnUNet_Primus_SSLFinetune_CPU1000"}, 3, 4, 6, (40, 20),
                               "primus_m"),
    # keeps the subcommand working (tests): the whole pipeline on the smallest demo datasets it runs with
    "smoke": Budget("cpu_smoke", 2, {"smoke": "nnUNetTrainer_SSLSmoke"}, 1, 4, 2, (8, 6)),
    "smoke-primus": Budget("cpu_smoke", 2, {"smoke": "nnUNet_Primus_SSLSmoke_Trainer"}, 1, 4, 2, (8, 6), "primus_m"),
    "gpu-full": Budget("gpu", None, {"nnU-Net default": "nnUNetTrainer_SSLFinetune"}, 5, None, 6, (40, 20)),
}
SOURCE, TARGET = DEMO_UNLABELED_DATASET, DEMO_LABELED_DATASET
PRETRAIN_SEED = 0


@contextlib.contextmanager
def _environment(variables: Dict[str, str]) -> Iterator[None]:
    """``os.environ`` updated by ``variables`` inside the block, restored afterwards."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    import torch
    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


@contextlib.contextmanager
def _step(log, description: str) -> Iterator[None]:
    """One benchmark step, run in this process; its stdout and stderr (the file descriptors, so those of its
    worker processes too) are appended to ``log``."""
    log.write(f"$ {description}\n")
    log.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, old in zip((1, 2), saved):
            os.dup2(old, fd)
            os.close(old)


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:16]


def _pretraining_done(env: dict, method: str, iterations, bundle: str, ssl_plans: str) -> bool:
    """True when an earlier benchmark run already pretrained ``method`` to the end with the current plan (the
    network and this method's entry) and length and exported it afterwards, so a rerun of the same command
    resumes instead of starting over. Otherwise the method is pretrained again and its old folds are dropped."""
    import torch
    run = os.path.join(env["nnUNet_results"], SOURCE, f"SSL_{method}__{ssl_plans}__{CONFIGURATION}",
                       "checkpoint_final.pth")
    exported = os.path.join(bundle, "checkpoint_final.pth")
    if not (os.path.isfile(run) and os.path.isfile(exported)) or os.path.getmtime(exported) < os.path.getmtime(run):
        return False
    ckpt = torch.load(run, map_location="cpu", weights_only=False)
    with open(os.path.join(env["nnUNet_preprocessed"], SOURCE, ssl_plans + ".json")) as f:
        plans = json.load(f)

    def strip(p: dict) -> dict:  # this method's entry and everything outside the ssl block (network, spacing, ...)
        p = {k: v for k, v in p.items() if k != "continue_training"}
        ssl = dict(p.get("ssl", {}))
        ssl["methods"] = {method: ssl.get("methods", {}).get(method)}
        return {**p, "ssl": ssl}
    done = ckpt.get("iterations_done") == ckpt.get("total_iterations")
    length_ok = iterations is None or ckpt.get("total_iterations") == int(iterations)
    return bool(done and length_ok and strip(ckpt["init_args"]["plans"]) == strip(plans))


def label_scarce_splits(case_ids: List[str], n_splits: int, train_cases: int, n_val: int) -> List[dict]:
    """Fixed validation set (the last ``n_val`` cases) and ``n_splits`` disjoint training sets."""
    ids = sorted(case_ids)
    val, pool = ids[-n_val:], ids[:-n_val]
    if len(pool) < n_splits * train_cases:
        raise ValueError(f"{len(ids)} cases are too few for {n_splits} splits x {train_cases} + {n_val} validation")
    return [{"train": pool[i * train_cases:(i + 1) * train_cases], "val": val} for i in range(n_splits)]


def run_transfer_benchmark(methods: List[str], budget: str, root: str, device: str = "cpu",
                           num_processes: int = 2, write_docs: bool = False) -> dict:
    from ssl_nnunet.experiment_planning.fingerprint import extract_fingerprint
    from ssl_nnunet.experiment_planning.planner import plan_experiment
    from ssl_nnunet.experiment_planning.preprocess import preprocess
    from ssl_nnunet.data.demo_dataset import make_demo_datasets
    from ssl_nnunet.export.exporter import export_bundle
    from ssl_nnunet.export.transfer import transfer_and_preprocess
    from ssl_nnunet.finetune.finetune import fold_finished, fold_folder, resolve_bundle, run_fold, target_weights
    from ssl_nnunet.methods import get_method
    from ssl_nnunet.finetune.statistics import fold_case_dice
    from ssl_nnunet.nnunet_trainers import vanilla_trainer
    from ssl_nnunet.training.run import pretrain
    from ssl_nnunet.utilities.file_io import atomic_save_json, load_json
    profile, pre_iters, trainers, n_splits, train_cases, n_val, demo_cases, arch = BUDGETS[budget]
    family = BUDGETS[budget].family
    unsupported = [m for m in methods if get_method(m).variant_for(family) is None]
    if unsupported:
        raise SSLInputError(f"--budget {budget} ({arch}): {', '.join(unsupported)} has no {family} realisation; "
                            f"choose among the methods that have one.")
    ssl_plans, ft_plans = plans_identifiers(arch)
    env = {"nnUNet_raw": os.path.join(root, "nnUNet_raw"),
           "nnUNet_preprocessed": os.path.join(root, "nnUNet_preprocessed"),
           "nnUNet_results": os.path.join(root, "nnUNet_results"),
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        os.makedirs(env[k], exist_ok=True)
    os.makedirs(root, exist_ok=True)
    t_start = time.time()
    commit = project_git_commit() or "unknown"  # the code that runs, recorded before anything can change it
    timings: Dict[str, float] = {}
    reused: List[str] = []  # work an earlier invocation of the same command finished (resumed run)
    # the steps get the thread count their own processes had (OMP_NUM_THREADS, default 2)
    with open(os.path.join(root, "benchmark_log.txt"), "a") as log, _environment(env), \
            _torch_threads(int(env["OMP_NUM_THREADS"])):
        print("[1] demo datasets + plans")
        with _step(log, f"demo datasets ({demo_cases[0]} unlabeled, {demo_cases[1]} labeled cases)"):
            make_demo_datasets(n_unlabeled=demo_cases[0], n_labeled=demo_cases[1])
        with _step(log, f"plan and preprocess {SOURCE} (profile {profile}, -arch {arch})"):
            extract_fingerprint(DEMO_UNLABELED_ID, num_processes, overwrite=True, verbose=False)
            plan_experiment(DEMO_UNLABELED_ID, profile, verbose=False, arch=arch)
            preprocess(DEMO_UNLABELED_ID, plans_identifier=ssl_plans, num_processes=num_processes, verbose=False)
        bundles = {}
        for m in methods:
            print(f"[2] pretrain + export {m} ({pre_iters or 'plan'} iterations)")
            bundles[m] = os.path.join(env["nnUNet_results"], SOURCE, f"export_{m}")
            if _pretraining_done(env, m, pre_iters, bundles[m], ssl_plans):
                print(f"    finished earlier with this plan and length; skipped ({bundles[m]})")
                timings[f"pretrain {m}"] = 0.0
                reused.append(f"pretraining {m}")
                continue
            # fine-tuning folds of an earlier run started from other weights: they must not be reused
            stale = os.path.join(env["nnUNet_results"], TARGET, "ssl_nnunet_benchmark", m)
            if os.path.isdir(stale):
                shutil.rmtree(stale)
            t0 = time.time()
            with _step(log, f"pretrain {m} on {SOURCE} ({pre_iters or 'plan'} iterations, {device})"):
                pretrain(DEMO_UNLABELED_ID, m, ssl_plans, device=device, iterations=pre_iters or None,
                         seed=PRETRAIN_SEED)
            timings[f"pretrain {m}"] = time.time() - t0
            with _step(log, f"export {m} to {bundles[m]}"):
                export_bundle(DEMO_UNLABELED_ID, m, bundles[m], ssl_plans)
        print(f"[3] transfer plans to Dataset{DEMO_LABELED_ID} + label-scarce splits")
        with _step(log, f"transfer {ft_plans} to {TARGET}, preprocess, label-scarce splits"):
            target_plans = transfer_and_preprocess(DEMO_UNLABELED_ID, DEMO_LABELED_ID, ft_plans, num_processes)
            data = os.path.join(env["nnUNet_preprocessed"], TARGET,
                                load_json(target_plans)["configurations"][CONFIGURATION]["data_identifier"])
            ids = sorted({f.split(".")[0] for f in os.listdir(data) if f.endswith(".pkl")})
            splits = label_scarce_splits(ids, n_splits, train_cases or (len(ids) - n_val) // n_splits, n_val)
            atomic_save_json(splits, os.path.join(env["nnUNet_preprocessed"], TARGET, "splits_final.json"))
        # what stays the same for every results file this invocation writes
        record = {"budget": budget, "profile": profile, "pretraining_iterations": pre_iters,
                  "pretraining_seed": PRETRAIN_SEED, "methods": methods, "trainers": trainers, "splits": n_splits,
                  "train_cases_per_split": train_cases, "validation_cases": n_val,
                  "demo_cases": {f"Dataset{DEMO_UNLABELED_ID} (unlabeled)": demo_cases[0],
                                 f"Dataset{DEMO_LABELED_ID} (labeled)": demo_cases[1]},
                  "command": " ".join(["ssl_nnunet_benchmark", *sys.argv[1:]]),
                  "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, device {device}", "git_commit": commit,
                  "arch": arch,
                  "plan_sha256": {f"{ssl_plans} (Dataset{DEMO_UNLABELED_ID})": _sha256(os.path.join(
                      env["nnUNet_preprocessed"], SOURCE, ssl_plans + ".json")),
                      f"{ft_plans} (Dataset{DEMO_LABELED_ID})": _sha256(os.path.join(
                          env["nnUNet_preprocessed"], TARGET, ft_plans + ".json"))}}
        results: Dict[str, Dict[str, List[float]]] = {}
        per_case: Dict[str, Dict[str, Dict[int, Dict[str, float]]]] = {}
        ft_root = os.path.join(env["nnUNet_results"], TARGET, "ssl_nnunet_benchmark")
        # the weights each method's arm starts from, for the target (a Primus gets its own up_projection for the
        # target's classes; a CNN bundle is used as it is)
        with _step(log, f"pretrained weights for {TARGET}"):
            weights_for = {m: target_weights(resolve_bundle(bundles[m]), TARGET, False, bundles[m])[0] for m in methods}
        arms = {**weights_for,
                "scratch": None, "scratch_seed2": None, "scratch_vanilla": None}
        for label, trainer in trainers.items():
            results[label], per_case[label] = {}, {}
            for arm, weights in arms.items():
                arm_trainer = vanilla_trainer(trainer) if arm == "scratch_vanilla" else trainer
                print(f"[4] fine-tune {arm} ({label}, {arm_trainer}, {n_splits} splits)")
                dice, folders = [], {}
                for fold in range(n_splits):
                    arm_root = os.path.join(ft_root, arm)
                    t0 = time.time()
                    folder = fold_folder(arm_root, TARGET, arm_trainer, fold, ft_plans)
                    if fold_finished(folder):  # reused without starting a child process
                        reused.append(f"fine-tuning {label} {arm} split {fold}")
                    else:
                        log.write(f"fine-tune {arm} split {fold} with {arm_trainer}: {folder}\n")
                        log.flush()
                        run_fold(arm_root, TARGET, fold, arm_trainer, device, weights, num_processes,
                                 label=f"{arm} {label} split {fold}", plans_identifier=ft_plans)
                    timings[f"finetune {label} {arm} split {fold}"] = time.time() - t0
                    with open(os.path.join(folder, "validation", "summary.json")) as f:
                        dice.append(float(json.load(f)["foreground_mean"]["Dice"]))
                    folders[fold] = folder
                results[label][arm] = dice
                per_case[label][arm] = fold_case_dice(folders)
            # results so far are written after every budget, so an interrupted run loses nothing
            summary = summarise(results, methods, per_case)
            summary.update(record, pending_budgets=[k for k in trainers if k not in results], raw=results,
                           per_case=per_case, wall_time_s=time.time() - t_start, timings_s=timings,
                           reused_from_earlier_invocation=list(reused),
                           vanilla_trainers={label: vanilla_trainer(t) for label, t in trainers.items()})
            write_results(summary, root, write_docs)
    return summary


BASELINES = ("scratch", "scratch_vanilla")  # every method is compared with both, case by case


def summarise(results: dict, methods: List[str], per_case: dict) -> dict:
    """Per budget: mean ± std over splits of every arm, its per-split gain over ``scratch``, the scratch noise,
    and the paired per-case comparison of every method (and ``scratch_seed2``) with each scratch arm.
    ``results[label][arm]`` lists the foreground mean Dice per split, ``per_case[label][arm]`` maps split ->
    case -> foreground mean Dice of the case."""
    from ssl_nnunet.finetune.statistics import paired_comparison
    table = {}
    for label, arms in results.items():
        scratch = np.asarray(arms["scratch"])
        noise = np.abs(scratch - np.asarray(arms["scratch_seed2"]))
        rows = {}
        for arm in [*methods, *(a for a in ("scratch", "scratch_seed2", "scratch_vanilla") if a in arms)]:
            d = np.asarray(arms[arm])
            rows[arm] = {"mean": float(d.mean()), "std": float(d.std(ddof=1)) if len(d) > 1 else None,
                         "gain_vs_scratch": float((d - scratch).mean()),
                         "gain_std": float((d - scratch).std(ddof=1)) if len(d) > 1 else None}
        paired = {arm: {base: paired_comparison(per_case[label][arm], per_case[label][base], arm, base)
                        for base in BASELINES if base in per_case[label] and base != arm}
                  for arm in [*methods, "scratch_seed2"] if arm in per_case[label]}
        table[label] = {"rows": rows, "scratch_noise_mean_abs": float(noise.mean()), "paired": paired}
    return {"table": table}


def _paired_cell(c: dict) -> str:
    if c["mean_difference"] is None:
        return "—"
    if c["ci95"] is None:
        return f"{c['mean_difference']:+.4f} (no interval: one split)"
    low, high = c["ci95"]
    return (f"{c['mean_difference']:+.4f} [{low:+.4f}, {high:+.4f}], p = {c['wilcoxon_p']:.2g}: "
            f"**{c['verdict']}**")


def _pm(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.4f}"


def documentation_folder() -> str:
    """The project's ``documentation/`` (where ``--write-docs`` puts the results)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "documentation")


def write_results(summary: dict, root: str, write_docs: bool) -> None:
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    from ssl_nnunet.utilities.file_io import atomic_copy, atomic_save_json, atomic_write, atomic_write_text
    atomic_save_json(summary, os.path.join(root, "results.json"))
    lines = ["# Transfer benchmark: pretrained vs scratch on the demo task", "",
             f"Budget `{summary['budget']}` (profile {summary['profile']}, backbone {summary.get('arch', 'cnn')}, "
             f"{summary['pretraining_iterations']} pretraining iterations per method on Dataset900; fine-tuning on Dataset901 with "
             f"{summary['splits']} label-scarce splits of {summary['train_cases_per_split']} training cases, one "
             f"fixed validation set of {summary['validation_cases']} cases; wall time "
             f"{summary['wall_time_s'] / 60:.1f} min"
             + (f" for this invocation, which reused {len(summary['reused_from_earlier_invocation'])} finished steps of "
                "an earlier one (listed in results.json)" if summary.get("reused_from_earlier_invocation") else "")
             + "). Foreground mean Dice from nnU-Net's validation.", "",
             f"Command: `{summary['command']}`  ", f"Machine: {summary['machine']}  ",
             f"Commit: {summary['git_commit']}; plans sha256: "
             + ", ".join(f"{k} `{v}`" for k, v in summary["plan_sha256"].items()) + "  ",
             "Machine-readable record of this run: `results.json` beside this file (per-split Dice, timings, "
             "plan hashes, commit).", ""]
    if summary.get("pending_budgets"):
        lines += [f"**Not run yet:** {', '.join(summary['pending_budgets'])} — rerun the same command to add it (finished "
                  "pretraining runs and fine-tuning folds are skipped).", ""]
    labels = list(summary["table"])
    fig, axes = plt.subplots(1, len(labels), figsize=(6 * len(labels), 4), squeeze=False)
    for ax, label in zip(axes[0], labels):
        t = summary["table"][label]
        n = summary["splits"]
        vanilla = summary.get("vanilla_trainers", {}).get(label)
        lines += [f"## {label}", "", f"Scratch run-to-run noise (mean |scratch − scratch seed 2| over splits): "
                  f"{t['scratch_noise_mean_abs']:.4f}" + (f"; `scratch_vanilla` is `{vanilla}` (nnU-Net's own "
                                                           f"learning rate and schedule)" if vanilla else ""), "",
                  "| arm | " + " | ".join(f"split {i}" for i in range(n)) + " | Dice mean ± std | gain vs "
                  "scratch (per split) | beats scratch (splits) |", "| --- " * (n + 4) + "|"]
        for arm, r in t["rows"].items():
            folds = summary["raw"][label][arm]
            wins = sum(d > s for d, s in zip(folds, summary["raw"][label]["scratch"]))
            lines.append(f"| {arm} | " + " | ".join(f"{d:.4f}" for d in folds) + f" | {r['mean']:.4f} ± "
                         f"{_pm(r['std'])} | {r['gain_vs_scratch']:+.4f} ± {_pm(r['gain_std'])} | "
                         + ("—" if arm == "scratch" else f"{wins}/{n}") + " |")
        if t.get("paired"):
            first = next(iter(next(iter(t["paired"].values())).values()))
            lines += ["", f"Paired per-case comparison (mean Dice difference [bootstrap 95 % interval over splits, "
                      f"then cases], Wilcoxon p, verdict); each rests on {first['n_cases']} case pairs in "
                      f"{first['n_folds']} split(s). `scratch_seed2` vs `scratch` shows what noise alone gives.", "",
                      "| arm | vs scratch | vs scratch_vanilla |", "| --- | --- | --- |"]
            for arm, comps in t["paired"].items():
                lines.append(f"| {arm} | " + " | ".join(_paired_cell(comps[b]) if b in comps else "—"
                                                      for b in BASELINES) + " |")
        lines.append("")
        arms = list(t["rows"])
        ax.bar(arms, [t["rows"][a]["mean"] for a in arms], yerr=[t["rows"][a]["std"] or 0.0 for a in arms],
               capsize=3)
        ax.set_title(label)
        ax.set_ylabel("foreground mean Dice")
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    atomic_write(os.path.join(root, "results.png"), lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
    text = "\n".join(lines) + "\n"
    atomic_write_text(os.path.join(root, "results.md"), text)
    if write_docs:
        docs = documentation_folder()
        # cpu-small is documentation/results.md; another budget gets its own file (results_<budget>.md), so a
        # Primus run never overwrites the CNN one
        stem = "results" if summary["budget"] == "cpu-small" else f"results_{summary['budget']}"
        others = sorted(f for f in os.listdir(docs) if f.startswith("results_") and f.endswith(".md")
                        and f != stem + ".md") if stem == "results" else []
        links = ("\nThe other budgets' runs: " + ", ".join(f"[{f[len('results_'):-3]}]({f})" for f in others)
                 + ".\n") if others else ""
        atomic_write_text(os.path.join(docs, stem + ".md"), text + f"\n![results]({stem}.png)\n" + links)
        for ext in (".png", ".json"):  # the record travels with the docs, to compare commits
            atomic_copy(os.path.join(root, "results" + ext), os.path.join(docs, stem + ext))
    print(text)
