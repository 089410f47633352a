"""``ssl_nnunet_benchmark throughput``: SSL step time vs. the network's own forward+backward.

For each method, in one process and after warm-up, on the plan of the given dataset:
* ``ssl_step_s``: median seconds of a full SSL training iteration (data from the prefetching loader, views,
  forward, loss, backward, optimizer step);
* ``plain_step_s``: median seconds of a plain forward + MSE + backward + optimizer step of the *same*
  network on a batch of the same shape (the floor: the objective cannot be faster than its network passes
  for a single-pass method such as MAE);
* ``ratio`` = ssl / plain; ``data_wait_share``: share of SSL step time spent waiting for the loader;
* peak memory: RSS of the process on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from typing import Dict, List

import torch

from ssl_nnunet.utilities.errors import run_cli
from ssl_nnunet.utilities.file_io import atomic_save_json


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _time(fn, n: int, device: torch.device) -> List[float]:
    out = []
    for _ in range(n):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(time.perf_counter() - t0)
    return out


def benchmark_method(dataset, method: str, device: str = "cpu", warmup: int = 3, timed: int = 10) -> Dict:
    from ssl_nnunet.training.run import build_trainer
    trainer = build_trainer(dataset, method, device=device, iterations=10 ** 6, num_prefetch=2)
    trainer.disable_checkpointing = True
    trainer.on_train_start()
    dev = trainer.device
    trainer._consecutive_nonfinite = 0
    state = {"it": 0}

    def ssl_step():
        trainer.train_step(next(trainer.dataloader_train), state["it"])
        state["it"] += 1

    _time(ssl_step, warmup, dev)
    wait0 = trainer.dataloader_train.wait_time
    ssl_times = _time(ssl_step, timed, dev)
    wait = trainer.dataloader_train.wait_time - wait0

    # the floor: the same network, a plain dense forward + backward on a batch of the same shape
    net = trainer.network
    batch = next(trainer.dataloader_train).to(dev)
    x = batch if batch.ndim == 5 else batch.flatten(0, 1)
    opt = torch.optim.SGD(net.parameters(), lr=1e-6)

    def plain_step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.mse_loss(net(x).float(), x.float())
        loss.backward()
        opt.step()

    _time(plain_step, warmup, dev)
    plain_times = _time(plain_step, timed, dev)
    trainer.dataloader_train.close()
    ssl_s, plain_s = statistics.median(ssl_times), statistics.median(plain_times)
    return {"method": method, "device": str(dev), "batch_shape": list(batch.shape),
            "ssl_step_s": ssl_s, "plain_step_s": plain_s, "ratio": ssl_s / plain_s,
            "data_wait_share": wait / sum(ssl_times), "peak_memory_mb": _peak_memory_mb(dev),
            "timed_iterations": timed, "warmup_iterations": warmup,
            "profile": trainer.ssl_plan.get("profile"), "patch_size": trainer.configuration_manager.patch_size}


def write_report(results: List[Dict], json_path: str, md_path: str, command: str) -> None:
    atomic_save_json({"command": command, "machine": platform.platform(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "results": results}, json_path)
    lines = [
        "# Throughput benchmark", "",
        f"Command: `{command}`  ",
        f"Machine: {platform.platform()}, torch {torch.__version__}, {torch.get_num_threads()} threads. "
        "Medians of the timed iterations after warm-up, measured in one process run.", "",
        "| method | device | profile | batch | SSL step [s] | plain fwd+bwd [s] | ratio | data wait | peak mem [MB] |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(f"| {r['method']} | {r['device']} | {r['profile']} | {r['batch_shape']} | "
                     f"{r['ssl_step_s']:.3f} | {r['plain_step_s']:.3f} | {r['ratio']:.2f} | "
                     f"{100 * r['data_wait_share']:.1f} % | {r['peak_memory_mb']:.0f} |")
    os.makedirs(os.path.dirname(os.path.abspath(md_path)), exist_ok=True)
    tmp = md_path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, md_path)


def main() -> None:
    import sys
    p = argparse.ArgumentParser(description="ssl_nnunet benchmarks")
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput", help="SSL step time vs. plain forward+backward of the same network")
    t.add_argument("-d", required=True, help="preprocessed dataset (its sslPlans.json profile is used)")
    t.add_argument("-m", nargs="+", default=["all"], help="methods (default: all implemented)")
    t.add_argument("-device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--timed", type=int, default=10)
    t.add_argument("-o", default="documentation/benchmarks", help="output prefix: writes PREFIX.json and PREFIX.md")
    tr = sub.add_parser("transfer", help="pretrain every method, fine-tune vs scratch on the demo task")
    tr.add_argument("-m", nargs="+", default=["all"], help="methods (default: all implemented)")
    tr.add_argument("--budget", default="cpu-small", choices=["cpu-small", "gpu-full", "smoke"])
    tr.add_argument("-device", default="cuda" if torch.cuda.is_available() else "cpu")
    tr.add_argument("-np", type=int, default=2)
    tr.add_argument("--root", default=os.path.abspath("ssl_nnunet_data/benchmark_transfer"),
                    help="folder for the benchmark's own nnU-Net data and results")
    tr.add_argument("--write-docs", action="store_true", help="also write documentation/results.md + png")
    a = p.parse_args()

    def go_transfer():
        from ssl_nnunet.benchmark.transfer import run_transfer_benchmark
        from ssl_nnunet.methods import available_methods
        methods = available_methods() if a.m == ["all"] else a.m
        run_transfer_benchmark(methods, a.budget, a.root, a.device, a.np, a.write_docs)

    def go():
        from ssl_nnunet.methods import available_methods
        methods = available_methods() if a.m == ["all"] else a.m
        results = []
        for m in methods:
            r = benchmark_method(a.d, m, a.device, a.warmup, a.timed)
            print(json.dumps(r))
            results.append(r)
        write_report(results, a.o + ".json", a.o + ".md", "ssl_nnunet_benchmark " + " ".join(sys.argv[1:]))
        print(f"Wrote {a.o}.json and {a.o}.md")
    run_cli(go if a.what == "throughput" else go_transfer)
