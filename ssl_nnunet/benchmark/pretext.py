"""``ssl_nnunet_benchmark pretext``: is the pretext task being learned?

Scores a method's loss terms (each term its ``forward`` returns) on a large, fixed held-out set — the
same validation patches, masks and crops the trainer uses each epoch, only many more batches — once for the
network at initialisation (rebuilt with the run's seed, so bit-identical to the start of the run) and once
for a checkpoint. The per-epoch validation in ``progress.png`` uses a few batches and is noisy; this gives
numbers with a standard error small enough to compare.
"""
from __future__ import annotations

import math
import os
from datetime import datetime
from typing import Dict, Optional

import torch

from ssl_nnunet.constants import SSL_PLANS
from ssl_nnunet.utilities.errors import SSLInputError
from ssl_nnunet.utilities.file_io import atomic_save_json


def _trainer(dataset, method: str, plans_identifier: str, device: str, seed: int):
    from ssl_nnunet.training.run import build_trainer
    trainer = build_trainer(dataset, method, plans_identifier, device, iterations=1, seed=seed, num_prefetch=0)
    stamp = datetime.now().strftime("%Y_%m_%d_%H_%M_%S")
    trainer.log_file = os.path.join(trainer.output_folder, f"pretext_probe_log_{stamp}.txt")
    trainer.initialize()
    trainer._resumed = True  # score on the run's own held-out split (ssl_split.json) when it has one
    trainer._make_samplers()
    return trainer


def _score(trainer, num_batches: int) -> Dict[str, float]:
    batch_terms = trainer.validation_terms(num_batches)  # per batch, for the standard error of each mean
    out = {}
    for k in batch_terms[0]:
        vals = [t[k] for t in batch_terms]
        mean = sum(vals) / len(vals)
        var = sum((v - mean) ** 2 for v in vals) / max(1, len(vals) - 1)
        out[k] = mean
        out[k + "_sem"] = math.sqrt(var / len(vals))
    return out


def evaluate_pretext(dataset, method: str, checkpoint: Optional[str] = None, num_batches: int = 64,
                     plans_identifier: str = SSL_PLANS, device: str = "cpu", seed: int = 0) -> Dict:
    """Mean (and standard error) of every loss term over ``num_batches`` fixed held-out batches, for the
    network at initialisation and for ``checkpoint`` (default: the run's ``checkpoint_final.pth``)."""
    trainer = _trainer(dataset, method, plans_identifier, device, seed)
    if checkpoint is None:
        checkpoint = os.path.join(trainer.output_folder, "checkpoint_final.pth")
    if not os.path.isfile(checkpoint):
        raise SSLInputError(f"{checkpoint} not found: run ssl_nnunet_pretrain -d {dataset} -m {method} first "
                            f"or pass -c CHECKPOINT.")
    init = _score(trainer, num_batches)
    ckpt = torch.load(checkpoint, map_location=trainer.device, weights_only=False)
    if ckpt.get("ssl_method") not in (None, method):
        raise SSLInputError(f"{checkpoint} was written by method '{ckpt['ssl_method']}', not '{method}'.")
    trainer.method.load_state_dict(ckpt["ssl_method_state"])
    final = _score(trainer, num_batches)
    return {"dataset": trainer.plans_manager.dataset_name, "method": method, "checkpoint": checkpoint,
            "iterations_done": ckpt.get("iterations_done"), "num_batches": num_batches,
            "batch_size": trainer.batch_size, "seed": seed, "init": init, "trained": final}


def format_report(r: Dict) -> str:
    lines = [f"{r['method']} on {r['dataset']}: {r['num_batches']} fixed held-out batches of {r['batch_size']}; "
             f"checkpoint after {r['iterations_done']} iterations",
             "| term | at initialisation | trained |", "| --- | --- | --- |"]
    for k in r["init"]:
        if k.endswith("_sem"):
            continue
        lines.append(f"| {k} | {r['init'][k]:.4f} ± {r['init'][k + '_sem']:.4f} | "
                     f"{r['trained'][k]:.4f} ± {r['trained'][k + '_sem']:.4f} |")
    return "\n".join(lines)


def run(args) -> None:
    r = evaluate_pretext(args.d, args.m, args.c, args.n, args.p, args.device, args.seed)
    print(format_report(r))
    if args.o:
        atomic_save_json(r, args.o)
        print(f"Wrote {args.o}")

