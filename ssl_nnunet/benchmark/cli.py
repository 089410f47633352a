"""``ssl_nnunet_benchmark``: the one command of every benchmark (throughput, transfer, pretext).

Each subcommand parses its arguments and calls one function: :func:`ssl_nnunet.benchmark.throughput.
benchmark_method` (per method) and :func:`~ssl_nnunet.benchmark.throughput.write_report`,
:func:`ssl_nnunet.benchmark.transfer.run_transfer_benchmark`, :func:`ssl_nnunet.benchmark.pretext.run`.
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
    return p


def _throughput(a: argparse.Namespace, argv: Sequence[str]) -> None:
    from ssl_nnunet.benchmark.throughput import benchmark_method, write_report
    results = []
    for m in _selected_methods(a.m):
        r = benchmark_method(a.d, m, a.device, a.warmup, a.timed)
        print(json.dumps(r))
        results.append(r)
    write_report(results, a.o + ".json", a.o + ".md", "ssl_nnunet_benchmark " + " ".join(argv))
    print(f"Wrote {a.o}.json and {a.o}.md")


def _transfer(a: argparse.Namespace, argv: Sequence[str]) -> None:
    from ssl_nnunet.benchmark.transfer import run_transfer_benchmark
    root = a.root or os.path.abspath(os.path.join("ssl_nnunet_data", "benchmark_transfer", a.budget))
    run_transfer_benchmark(_selected_methods(a.m), a.budget, root, a.device, a.np, a.write_docs)


def _pretext(a: argparse.Namespace, argv: Sequence[str]) -> None:
    from ssl_nnunet.benchmark.pretext import run
    run(a)


def main(argv: Optional[Sequence[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = build_parser().parse_args(argv)
    command = {"throughput": _throughput, "transfer": _transfer, "pretext": _pretext}[a.what]
    run_cli(lambda: command(a, argv))


if __name__ == "__main__":
    main()
