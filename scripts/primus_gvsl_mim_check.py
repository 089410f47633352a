"""CPU check of MiM and GVSL on Primus (documentation/methods/mim.md and gvsl.md, "Primus" sections).

On the cpu_smoke Primus (96-d, depth 4, 4 heads, 32³ patch, 8³ tokens), one fixed batch, AdamW lr 2e-3, one thread:

* GVSL, registration isolated (no spatial augmentation, no appearance transform): the fixed image A and B = A
  shifted by 2 voxels along each axis; per ``local_features`` choice the NCC loss, ``sim_gain`` (local cc of the
  registered minus the unregistered pair) and restoration loss at the first and last step, and seconds per step.
* MiM (the planner's cpu_smoke Primus layout, per_unit target): the tokens each level's encoder saw and the loss
  terms at the first and last step, and seconds per step.

    PYTHONPATH=. OMP_NUM_THREADS=1 python scripts/primus_gvsl_mim_check.py [--steps 30]

``--probe DATASET`` instead: for the Primus MiM run ``ssl_nnunet_pretrain -d DATASET -m mim -p sslPlans_primus_m``
(its checkpoint_final.pth), the level 1→2 alignment accuracy on 32 held-out batches with each finer volume's
candidates from its own parent and from another sample's parent (same unit positions, other content).
"""
import argparse
import time

import torch

from ssl_nnunet.backbones.primus import build_primus
from ssl_nnunet.methods.base import PlanningContext, merge_layout
from ssl_nnunet.methods.gvsl import PrimusGVSL
from ssl_nnunet.methods.mim import PrimusMiM

SMOKE = {"embed_dim": 96, "patch_embed_size": [8, 8, 8], "eva_depth": 4, "eva_numheads": 4, "input_shape": [32, 32, 32],
         "drop_path_rate": 0.0, "scale_attn_inner": True, "init_values": 0.1}
SSL = {"architecture_family": "primus", "total_stride": [8, 8, 8], "mask_quantum": [8, 8, 8]}
CTX = PlanningContext(patch_size=(32, 32, 32), strides=((1, 1, 1),), spacing=(2.0, 2.0, 2.0),
                      median_shape=(40.0, 44.0, 48.0), profile="cpu_smoke", token_size=(8, 8, 8))


def build(cls, overrides):
    patch, layout = cls.default_layout(CTX)
    layout = cls.finalize_layout(patch, merge_layout(layout, overrides), CTX)
    torch.manual_seed(0)
    return cls(build_primus(SMOKE, 1, 1), {"pretrain_patch_size": patch, "layout": layout}, SSL, 1).train()


def train(method, batch, steps):
    opt = torch.optim.AdamW([p for n, p in method.named_parameters() if n not in set(method.untrained_parameters())],
                            lr=2e-3)
    rows, start = [], time.perf_counter()
    for _ in range(steps):
        out = method(batch, torch.Generator().manual_seed(0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        rows.append({k: float(v.detach()) for k, v in out.items()})
    return rows, (time.perf_counter() - start) / steps


def smooth_volume(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 1, 32, 32, 32, generator=g)
    for _ in range(3):
        x = torch.nn.functional.avg_pool3d(x, 5, stride=1, padding=2, count_include_pad=False)
    return (x - x.mean()) / x.std()


def alignment_probe(dataset, num_batches=32):
    from ssl_nnunet.benchmark.pretext import _trainer
    trainer = _trainer(dataset, "mim", "sslPlans_primus_m", "cpu", 0)
    ckpt = torch.load(trainer.output_folder + "/checkpoint_final.pth", map_location="cpu", weights_only=False)
    trainer.method.load_state_dict(ckpt["ssl_method_state"])
    method = trainer.method.eval()
    sampler = type(method).make_sampler(trainer._val_spec)
    hits = {"from its own parent": 0.0, "from another sample's parent": 0.0}
    with torch.no_grad():
        for i in range(num_batches):
            views = method.make_views(sampler.next_batch(), torch.Generator().manual_seed(i))
            (coarse, _), (fine, _) = method.masked_forward(views)[:2]
            for name, tap in zip(hits, (coarse, coarse.roll(1, dims=0))):
                _, logits = method.alignment(tap, method.grid1, fine, views.label12, views.valid12)
                hits[name] += float((logits.argmax(1) == views.label12).float().mean()) / num_batches
    print(f"mim align_12 accuracy after {ckpt.get('iterations_done')} iterations, {num_batches} held-out batches: " +
          "; ".join(f"candidates {k} {v:.3f}" for k, v in hits.items()))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--probe", default=None, help="dataset of a Primus MiM run: the alignment probe only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.probe is not None:
        return alignment_probe(args.probe)
    steps = args.steps
    a = smooth_volume(0)
    pair = torch.stack([a, torch.roll(a, (2, 2, 2), dims=(2, 3, 4))], dim=1)       # (1, 2, 1, 32, 32, 32)
    isolated = {"spatial_aug": None, "appearance": {"local_shuffle_p": 0.0, "nonlinear_p": 0.0, "inpaint": False},
                "affine_hidden": 64, "deform_hidden": 16}
    for local in ("patch_decoder", "tokens"):
        rows, sec = train(build(PrimusGVSL, {**isolated, "local_features": local}), pair, steps)
        print(f"gvsl local_features={local}: {sec:.2f} s/step; " + "; ".join(
            f"{k} {rows[0][k]:.3f} -> {rows[-1][k]:.3f}" for k in ("ncc", "sim_gain", "restore")))
    mim = build(PrimusMiM, {"gamma": 2, "beta": 1, "proj_dim": 256})
    seen = []
    hook = mim.network.eva.blocks[0].register_forward_pre_hook(lambda m, args, kw: seen.append(tuple(args[0].shape)),
                                                                with_kwargs=True)
    mim(torch.randn(2, 1, 32, 32, 32))
    hook.remove()
    rows, sec = train(mim, smooth_volume(1), steps)
    print(f"mim: encoder inputs per level (batch 2) {seen}; {sec:.2f} s/step (batch 1); " + "; ".join(
        f"{k} {rows[0][k]:.3f} -> {rows[-1][k]:.3f}" for k in ("rec_l1", "rec_l2", "rec_l3", "align_12",
                                                             "align_12_chance", "align_23", "align_23_chance")))


if __name__ == "__main__":
    main()
