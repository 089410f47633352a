"""``ssl_nnunet_benchmark``: the one command of every benchmark (throughput, transfer, pretext, data).

Each subcommand parses its arguments and calls one function: :func:`ssl_nnunet.benchmark.throughput.
benchmark_method` (per method) and :func:`~ssl_nnunet.benchmark.throughput.write_report`,
:func:`ssl_nnunet.benchmark.transfer.run_transfer_benchmark`, :func:`ssl_nnunet.benchmark.pretext.run`,
:func:`ssl_nnunet.benchmark.data_scale.run`.
``-m`` takes the registered methods (:func:`ssl_nnunet.methods.method_names`), or ``all``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional, Sequence

import torch

from ssl_nnunet.benchmark.transfer import BUDGETS
from ssl_nnunet.constants import SSL_PLANS
from ssl_nnunet.methods import method_names
from ssl_nnunet.utilities.errors import run_cli


def _selected_methods(requested: List[str]) -> List[str]:
    return method_names() if requested == ["all"] else requested


def build_parser() -> argparse.ArgumentParser:
    methods = method_names()
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(prog="ssl_nnunet_benchmark", description="ssl_nnunet benchmarks")
    sub = p.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput", help="SSL step time vs. plain forward+backward of the same network")
    t.add_argument("-d", required=True, help=f"preprocessed dataset (its {SSL_PLANS}.json profile is used)")
    t.add_argument("-m", nargs="+", default=["all"], choices=[*methods, "all"],
                   help="methods, or all (default: all registered)")
    t.add_argument("-p", default=SSL_PLANS, help=f"plans identifier (default {SSL_PLANS}; a Primus plan, e.g. "
                                                 f"sslPlans_primus_m, is timed against the dense Primus)")
    t.add_argument("-device", default=default_device)
    t.add_argument("--warmup", type=int, default=3)
    t.add_argument("--timed", type=int, default=10)
    t.add_argument("-o", default="documentation/benchmarks", help="output prefix: writes PREFIX.json and PREFIX.md")
    tr = sub.add_parser("transfer", help="pretrain every method, fine-tune vs scratch on the demo task")
    tr.add_argument("-m", nargs="+", default=["all"], choices=[*methods, "all"],
                    help="methods, or all (default: all registered)")
    tr.add_argument("--budget", default="cpu-small", choices=list(BUDGETS))
    tr.add_argument("-device", default=default_device)
    tr.add_argument("-np", type=int, default=2)
    tr.add_argument("--root", default=None,
                    help="folder for the benchmark's own nnU-Net data and results (default: "
                         "./ssl_nnunet_data/benchmark_transfer/<budget>; each budget has its own demo datasets)")
    tr.add_argument("--write-docs", action="store_true", help="also write documentation/results.md + png")
    pt = sub.add_parser("pretext", help="loss terms on many fixed held-out batches: initialisation vs checkpoint")
    pt.add_argument("-d", required=True, help="dataset id or name")
    pt.add_argument("-m", required=True, choices=methods, help="SSL method")
    pt.add_argument("-c", default=None, help="checkpoint (default: the run's checkpoint_final.pth)")
    pt.add_argument("-n", type=int, default=64, help="number of held-out batches")
    pt.add_argument("-p", default=SSL_PLANS, help="plans identifier")
    pt.add_argument("-device", default=default_device)
    pt.add_argument("--seed", type=int, default=0, help="the pretraining run's --seed (rebuilds its initial network)")
    pt.add_argument("-o", default=None, help="also write the result as JSON")
    da = sub.add_parser("data", help="bounded loader state on many tiny cases; loader patches/s vs a GPU step")
    da.add_argument("--cases", type=int, default=40000, help="tiny (8^3) cases generated (default 40000)")
    da.add_argument("--draws", type=int, default=2000, help="sampler draws over them (default 2000)")
    da.add_argument("--patch", type=int, nargs=3, default=[128, 128, 128],
                    help="patch of the throughput part: the GPU profile's (default 128 128 128)")
    da.add_argument("--batch", type=int, default=2, help="patches per batch (default 2, nnU-Net's 3d_fullres)")
    da.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader worker counts to time")
    da.add_argument("--batches", type=int, default=20, help="timed batches per worker count")
    da.add_argument("--gpu_step_s", type=float, default=None,
                    help="GPU step time to compare with (default: GPU rows of "
                         "documentation/benchmarks_throughput.json, if any)")
    da.add_argument("--root", default=os.path.join("ssl_nnunet_data", "benchmark_data"),
                    help="folder for the generated data (deleted at the end unless --keep)")
    da.add_argument("--keep", action="store_true", help="keep the generated data")
    da.add_argument("-o", default=None, help="also write the result as JSON")
    pr = sub.add_parser("primus", help="Primus MAE step (visible tokens only) vs the dense Primus forward+backward")
    from ssl_nnunet.benchmark.primus_ratio import add_arguments
    add_arguments(pr)
    return p


def _primus(a: argparse.Namespace, argv: Sequence[str]) -> None:
    from ssl_nnunet.benchmark.primus_ratio import run
    run(a.patch, a.variants, a.batch, a.warmup, a.timed, a.device, a.o, "ssl_nnunet_benchmark " + " ".join(argv))


def _throughput(a: argparse.Namespace, argv: Sequence[str]) -> None:
    from ssl_nnunet.benchmark.throughput import benchmark_method, write_report
    results = []
    for m in _selected_methods(a.m):
        r = benchmark_method(a.d, m, a.device, a.warmup, a.timed, a.p)
        print(json.dumps(r))
        results.append(r)
    write_report(results, a.o + ".json", a.o + ".md", "ssl_nnunet_benchmark " + " ".join(argv))
    print(f"Wrote {a.o}.json and {a.o}.md")


def _transfer(a: argparse.Namespace, argv: Sequence[str]) -> None:
    from ssl_nnunet.benchmark.transfer import run_transfer_benchmark
    root = a.root or os.path.abspath(os.path.join("ssl_nnunet_data", "benchmark_transfer", a.budget))
    methods = _selected_methods(a.m)
    if a.m == ["all"]:  # every method with a realisation on the budget's backbone
        from ssl_nnunet.methods import get_method
        methods = [m for m in methods if get_method(m).variant_for(BUDGETS[a.budget].family) is not None]
    run_transfer_benchmark(methods, a.budget, root, a.device, a.np, a.write_docs)


def _pretext(a: argparse.Namespace, argv: Sequence[str]) -> None:
    from ssl_nnunet.benchmark.pretext import run
    run(a)


def _data(a: argparse.Namespace, argv: Sequence[str]) -> None:
    from ssl_nnunet.benchmark.data_scale import run
    result = run(a.root, a.cases, a.draws, a.patch, a.batch, a.workers, a.batches, a.gpu_step_s, a.keep, a.o,
                 "ssl_nnunet_benchmark " + " ".join(argv))
    print(json.dumps({k: v for k, v in result.items() if k != "bounded_state"}, indent=1))


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    command = {"throughput": _throughput, "transfer": _transfer, "pretext": _pretext, "data": _data, "primus": _primus}[a.what]
    run_cli(lambda: command(a, argv))


if __name__ == "__main__":
    main()
