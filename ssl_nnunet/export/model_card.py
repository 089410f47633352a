"""The model card (``README.md``) of an exported weights bundle (:mod:`ssl_nnunet.export.exporter`)."""
from __future__ import annotations

import datetime
import math
import os
from typing import Dict, List, Optional

from ssl_nnunet.constants import CONFIGURATION, FINETUNE_PLANS
from ssl_nnunet.methods import all_methods
from ssl_nnunet.methods.base import SSLMethod
from ssl_nnunet.utilities.provenance import project_git_commit


def final_losses(logging: dict) -> Dict[str, float]:
    """Last finite value of every ``train_*`` / ``val_*`` / ``*loss*`` series of the SSL logger."""
    out = {}
    for key, series in (logging or {}).items():
        if not (key.startswith(("train_", "val_")) or "loss" in key) or not isinstance(series, (list, tuple)):
            continue
        finite = [float(v) for v in series if isinstance(v, (int, float)) and math.isfinite(float(v))]
        if finite:
            out[key] = finite[-1]
    return out


def _source_text(entry: dict) -> str:
    """One pretraining dataset of the card: name, cases, sampling weight and held-out cases when known."""
    parts = []
    if entry.get("train_cases") is not None:
        parts.append(f"{entry['train_cases']} training / {entry.get('val_cases', 0)} held-out cases")
    elif entry.get("preprocessed_cases") is not None:
        parts.append(f"{entry['preprocessed_cases']} cases")
    if entry.get("weight") is not None:
        parts.append(f"sampling weight {float(entry['weight']):.3g}")
    return entry["name"] + (f" ({', '.join(parts)})" if parts else "")


def citations_markdown(citations: List[dict]) -> str:
    """The model card's "Please cite" section for the bundle's ``citations`` entries."""
    if not citations:
        return ""
    lines = ["", "## Please cite", ""]
    for entry in citations:
        for text in entry.get("apa_citations") or entry.get("bibtex_citations") or []:
            lines.append(f"* {entry.get('type', '?')} `{entry.get('name', '?')}`: {text}")
    return "\n".join(lines) + "\n"


def render_model_card(dataset_name: str, method: str, plans_identifier: str, pretrain_plans: dict,
                      finetune_plans: dict, ckpt: dict, checkpoint_path: str, adaptation: dict,
                      bundle_dir: str, source_datasets: Optional[List[dict]] = None) -> str:
    """The bundle's ``README.md``: what made the weights (method, data, plans, network, iterations, final
    losses, commit), what the objective trained (the method's ``trained_parts``) and the fine-tuning commands."""
    source_id = int(dataset_name[len("Dataset"):len("Dataset") + 3])
    src_info = finetune_plans.get("ssl_pretraining_source", {})
    ssl_block = pretrain_plans.get("ssl", {})
    profile = src_info.get("profile", ssl_block.get("profile", "unknown"))
    preset = src_info.get("planner_preset", ssl_block.get("planner_preset", "unknown"))
    cfg = finetune_plans["configurations"][CONFIGURATION]
    arch = cfg["architecture"]
    kw = arch["arch_kwargs"]
    blocks = kw.get("n_blocks_per_stage", kw.get("n_conv_per_stage"))
    sources = source_datasets or [{"name": dataset_name}]
    source_text = "; ".join(_source_text(e) for e in sources)
    losses = final_losses(ckpt.get("logging", {}))
    loss_lines = "\n".join(f"| `{k}` | {v:.6g} |" for k, v in sorted(losses.items())) or "| (none logged) | |"
    iterations = ckpt.get("iterations_done")
    total = ckpt.get("total_iterations")
    iter_text = "unknown" if iterations is None else (f"{iterations}" + (f" of {total}" if total else ""))
    method_cls = all_methods().get(method, SSLMethod)
    trained = (method_cls.variant_for(ssl_block.get("architecture_family", "cnn")) or method_cls).trained_parts
    commit = project_git_commit() or "not available"
    bundle = os.path.abspath(bundle_dir)
    ft_name = finetune_plans.get("plans_name", FINETUNE_PLANS)
    if "embed_dim" in kw:  # Primus
        network_text = (f"`{arch['network_class_name']}`, embed {kw['embed_dim']}, depth {kw['eva_depth']}, "
                        f"{kw['eva_numheads']} heads, tokens {kw['patch_embed_size']}, input {kw['input_shape']}")
    else:
        network_text = (f"`{arch['network_class_name']}`, {kw.get('n_stages')} stages, features "
                        f"{kw.get('features_per_stage')}, blocks {blocks}")
    ckpt_name = os.path.basename(checkpoint_path)
    partial = "" if ckpt_name == "checkpoint_final.pth" else (
        f"\n**Note:** exported from `{ckpt_name}` – the pretraining had not finished.\n")
    return f"""# ssl_nnunet pretrained U-Net: `{method}` on {dataset_name}
{partial}
| | |
| --- | --- |
| method | `{method}` |
| source dataset{'s' if len(sources) > 1 else ''} | {source_text} (unlabeled pretraining data) |
| pretraining plan | `{plans_identifier}` / `{CONFIGURATION}` (profile `{profile}`, nnU-Net planner preset `{preset}`) |
| fine-tuning plan | `{ft_name}` (`plans.json` in this folder) |
| network | {network_text} |
| strides | {kw.get('strides', kw.get('patch_embed_size'))} |
| input channels | {adaptation['pretrain_num_input_channels']} |
| spacing | {cfg.get('spacing')} (nnU-Net axis order) |
| pretraining patch | {adaptation['pretrain_plan']['configurations'][CONFIGURATION]['patch_size']} |
| fine-tuning patch | {adaptation['recommended_downstream_patchsize']} |
| iterations | {iter_text} (epochs: {ckpt.get('current_epoch', 'unknown')}) |
| trained by the objective | {trained} |
| source checkpoint | `{checkpoint_path}` |
| project commit | `{commit}` |
| exported | {datetime.datetime.now().isoformat(timespec='seconds')} |

## Final losses

| series | last value |
| --- | --- |
{loss_lines}

## Contents

* `checkpoint_final.pth` – nnU-Net checkpoint; `network_weights` holds every key of the U-Net that nnU-Net builds
  from `{ft_name}` (the segmentation head `decoder.seg_layers.*` is the pretraining output layer and
  is not loaded by nnU-Net). Also `nnssl_adaptation_plan` for nnssl-aware tools.
* `plans.json` – the fine-tuning plan `{ft_name}` (same network, spacing and normalisation as the
  pretraining); `dataset.json`, `dataset_fingerprint.json` – of the source dataset.
* `adaptation_plan.json` – the nnssl adaptation plan (same as in the checkpoint); `config.json` – a short
  description with the citations (what nnU-Net master downloads from a Hugging Face model repository).
* The checkpoint loads with `torch.load(..., weights_only=True)`.

## Fine-tuning with nnU-Net (target dataset `TGT`, e.g. `901`)

The easy way is `ssl_nnunet_finetune -d TGT -w <this folder> --scratch` (plan transfer, preprocessing,
k = min(5, cases) folds pretrained vs same-recipe and vanilla scratch, paired verdict; it also adapts the first
convolution when the target has another number of input channels). By hand, the target must have the same number of input channels
({adaptation['pretrain_num_input_channels']}) and be preprocessed with the transferred plan, so that nnU-Net
builds exactly this network:

`TGT` is the target's id and `DatasetTGT_Name` its folder name.

```bash
# 1. fingerprint of the target; creates nnUNet_preprocessed/DatasetTGT_Name/ (needed by step 2, and
#    nnUNetv2_train copies dataset_fingerprint.json from there)
nnUNetv2_extract_fingerprint -d TGT
# 2. transfer the fine-tuning plan from the source dataset to the target. It reads
#    nnUNet_preprocessed/{dataset_name}/{ft_name}.json; with only this bundle at hand, create that
#    folder and copy plans.json into it as {ft_name}.json first
nnUNetv2_move_plans_between_datasets -s {source_id} -t TGT -sp {ft_name} -tp {ft_name}
# 3. nnU-Net's preprocessing reads dataset.json from nnUNet_preprocessed (its planner normally copies it)
cp "$nnUNet_raw/DatasetTGT_Name/dataset.json" "$nnUNet_preprocessed/DatasetTGT_Name/"
nnUNetv2_preprocess -d TGT -plans_name {ft_name} -c {CONFIGURATION}
# 4. train from the pretrained weights (add -device cpu without a GPU)
nnUNetv2_train TGT {CONFIGURATION} 0 -p {ft_name} -pretrained_weights {bundle}/checkpoint_final.pth
```

Steps 1–3 in one call: `python -c "from ssl_nnunet.export.transfer import transfer_and_preprocess as t;
t({source_id}, TGT)"`. A quick smoke run uses the trainer variant shipped with ssl_nnunet:
`export nnUNet_extTrainer=$(python -c "import ssl_nnunet.nnunet_trainers as t; print(t.trainer_dir())")` and
`-tr nnUNetTrainer_SSLSmoke` (1 epoch of 2 iterations, no mirroring). The fine-tuning plan names its trainer:
`-tr {src_info.get('finetune_trainer', 'nnUNetTrainer_SSLFinetune')}`.
"""
