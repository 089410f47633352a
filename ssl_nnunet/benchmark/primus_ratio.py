"""Primus MAE step vs. the dense Primus forward+backward (``ssl_nnunet_benchmark primus``,
``python -m ssl_nnunet.benchmark.primus_ratio``).

For each configuration (the ``cpu_bench`` Primus preset of ``plans/profiles.json`` and Primus-M widths from
nnunetv2's ``nnUNet_Primus_M_Trainer``, both on a 64³ input by default) and each pretraining-decoder depth, one
optimizer step of :class:`~ssl_nnunet.methods.mae.PrimusMAE` at 75 % masking (visible-token encoder,
:class:`~ssl_nnunet.backbones.primus.TokenDecoder`, the network's ``up_projection``, masked MSE, AdamW) is timed
against one step of the dense Primus (all tokens through ``Primus.forward``, MSE, AdamW) on the same batch.
The steps alternate (so drifts of a shared machine hit both alike); the report gives medians and the ratio.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch

from ssl_nnunet.backbones.primus import build_primus, primus_hyperparameters
from ssl_nnunet.plans import load_shipped


def configurations(patch: Sequence[int]) -> Dict[str, dict]:
    """``{label: Primus arch_kwargs}``: the ``cpu_bench`` preset and Primus-M widths, on ``patch``."""
    preset = load_shipped("profiles.json")["cpu_bench"]["primus"]
    m = primus_hyperparameters("primus_m")
    common = {"patch_embed_size": [8, 8, 8], "input_shape": [int(p) for p in patch], "drop_path_rate": 0.0,
              "scale_attn_inner": True, "init_values": 0.1}
    return {
        f"cpu_bench Primus ({preset['embed_dim']}-d, depth {preset['eva_depth']})":
            {**common, "embed_dim": preset["embed_dim"], "eva_depth": preset["eva_depth"],
             "eva_numheads": preset["eva_numheads"]},
        f"Primus-M widths ({m['embed_dim']}-d, depth {m['eva_depth']})":
            {**common, "embed_dim": m["embed_dim"], "eva_depth": m["eva_depth"], "eva_numheads": m["eva_numheads"]},
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(arch_kwargs: dict, decoder_depth: int, pixel_head: str = "linear", batch: int = 2, ratio: float = 0.75, warmup: int = 2,
            timed: int = 5, device: str = "cpu", seed: int = 0) -> Dict:
    """Median seconds of one MAE step and one dense step (interleaved) for one configuration."""
    from ssl_nnunet.methods.mae import PrimusMAE
    dev = torch.device(device)
    torch.manual_seed(seed)
    patch = list(arch_kwargs["input_shape"])
    mae = PrimusMAE(build_primus(arch_kwargs, 1, 1),
                    {"pretrain_patch_size": patch,
                     "layout": {"mask_unit": [8, 8, 8], "mask_ratio": ratio, "decoder_depth": decoder_depth,
                                "pixel_head": pixel_head}},
                    {"architecture_family": "primus", "mask_quantum": [8, 8, 8], "total_stride": [8, 8, 8]}, 1).to(dev)
    dense = build_primus(arch_kwargs, 1, 1).to(dev)
    x = torch.randn(batch, 1, *patch, device=dev)
    opt_mae = torch.optim.AdamW(mae.parameters(), 1e-4)
    opt_dense = torch.optim.AdamW(dense.parameters(), 1e-4)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)

    def mae_step():
        opt_mae.zero_grad(set_to_none=True)
        mae(x, gen)["loss"].backward()
        opt_mae.step()

    def dense_step():
        opt_dense.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(dense(x).float(), x).backward()
        opt_dense.step()

    def timed_call(fn) -> float:
        _sync(dev)
        t0 = time.perf_counter()
        fn()
        _sync(dev)
        return time.perf_counter() - t0

    for _ in range(warmup):
        timed_call(mae_step)
        timed_call(dense_step)
    t_mae, t_dense = [], []
    for _ in range(timed):
        t_mae.append(timed_call(mae_step))
        t_dense.append(timed_call(dense_step))
    n = 1
    for p in patch:
        n *= p // 8
    mae_s, dense_s = statistics.median(t_mae), statistics.median(t_dense)
    return {"embed_dim": arch_kwargs["embed_dim"], "depth": arch_kwargs["eva_depth"],
            "heads": arch_kwargs["eva_numheads"], "patch": patch, "tokens": n,
            "visible_tokens": n - int(ratio * n + 0.5), "batch": batch, "decoder_depth": decoder_depth, "pixel_head": pixel_head,
            "decoder_width": mae.decoder.embed.out_features, "mae_step_s": mae_s, "dense_step_s": dense_s,
            "ratio": mae_s / dense_s, "timed": timed, "warmup": warmup, "device": str(dev)}


def run(patch: Sequence[int] = (64, 64, 64), variants: Sequence[str] = ("linear:1", "linear:0", "linear:2",
                                                                        "up_projection:1"), batch: int = 2,
        warmup: int = 2, timed: int = 5, device: str = "cpu", output: Optional[str] = None,
        command: str = "") -> List[Dict]:
    rows = []
    for label, kw in configurations(patch).items():
        for variant in variants:
            head, depth = variant.split(":")
            r = {"configuration": label, **measure(kw, int(depth), head, batch, 0.75, warmup, timed, device)}
            print(json.dumps(r), flush=True)
            rows.append(r)
    if output:
        from ssl_nnunet.utilities.file_io import atomic_save_json
        atomic_save_json({"command": command, "machine": platform.processor() or platform.machine(),
                          "torch_threads": torch.get_num_threads(), "rows": rows}, output)
    return rows


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--patch", type=int, nargs=3, default=[64, 64, 64], help="input patch (default 64 64 64)")
    p.add_argument("--variants", nargs="+", default=["linear:1", "linear:0", "linear:2", "up_projection:1"],
                   help="PIXEL_HEAD:DECODER_DEPTH pairs to time (default linear:1 (the plan's default) linear:0 "
                        "linear:2 up_projection:1)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--timed", type=int, default=5)
    p.add_argument("-device", default="cpu")
    p.add_argument("-o", default=None, help="also write the rows as JSON")


def main(argv: Optional[Sequence[str]] = None) -> None:
    import sys
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_arguments(p)
    a = p.parse_args(argv)
    run(a.patch, a.variants, a.batch, a.warmup, a.timed, a.device, a.o,
        "python -m ssl_nnunet.benchmark.primus_ratio " + " ".join(argv))


if __name__ == "__main__":
    main()
