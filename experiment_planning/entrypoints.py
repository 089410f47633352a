"""Console commands of the planning stage; each is a thin wrapper over one function."""
from __future__ import annotations

import argparse
import os
import time

from ssl_nnunet.constants import ARCHS, FINETUNE_PLANS, PROFILES, SSL_PLANS, plans_identifiers
from ssl_nnunet.utilities.errors import run_cli


def _common_args(parser: argparse.ArgumentParser, planning: bool = True) -> None:
    parser.add_argument("-d", nargs="+", required=True,
                        help="dataset id(s) or name(s), e.g. -d 900. Planning several (-d 901 902) makes ONE shared "
                             "pretraining plan: the first is planned, its plan is transferred to the others")
    parser.add_argument("-np", type=int, default=None,
                        help="number of worker processes (default: one per CPU this process may use)")
    if planning:
        parser.add_argument("-profile", default="gpu", choices=PROFILES,
                            help="network/patch profile: cpu_smoke (tests), cpu_bench (CPU benchmarks, demo), "
                                 "gpu (nnU-Net ResEnc plan; default)")
        parser.add_argument("-pl", default="ResEncM", help="nnU-Net planner preset: ResEncM (default), ResEncL, "
                                                           "ResEncXL, ResEnc, default (PlainConvUNet)")
        parser.add_argument("-arch", default="cnn", choices=ARCHS,
                            help="backbone: cnn (the nnU-Net plan's U-Net; default) or a Primus size as nnunetv2's "
                                 "nnUNet_Primus_S/B/M/L_Trainer (writes sslPlans_<arch>.json and "
                                 "sslFinetunePlans_<arch>.json; the CPU profiles shrink it to a tiny Primus)")
        parser.add_argument("-gpu_memory_target", type=float, default=None,
                            help="GPU memory target in GB for the nnU-Net planner (preset default if unset)")
        parser.add_argument("--spacing", type=float, nargs=3, default=None,
                            help="target spacing in the order of the fingerprint's 'spacings' (before nnU-Net's "
                                 "transpose) instead of the median")
        parser.add_argument("--isotropic", action="store_true",
                            help="isotropic target spacing = the smallest median spacing")
    parser.add_argument("--quiet", action="store_true", help="less output")


def _part_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-part", type=int, default=0,
                        help="preprocess only part I (0-based) of -total_parts: every total_parts-th case")
    parser.add_argument("-total_parts", type=int, default=1,
                        help="split the cases into this many disjoint parts (run each part as its own job, all "
                             "into the same folder; default 1 = all cases)")


def _num_processes(args) -> int:
    from ssl_nnunet.experiment_planning.preprocess import available_cpus
    return available_cpus() if args.np is None else args.np


def _fingerprint(args, datasets=None) -> None:
    from ssl_nnunet.experiment_planning.fingerprint import extract_fingerprint
    from ssl_nnunet.paths import nnunet_preprocessed
    from ssl_nnunet.utilities.file_io import dataset_name_from_id
    for d in args.d if datasets is None else datasets:
        existing = os.path.join(nnunet_preprocessed(), dataset_name_from_id(d), "dataset_fingerprint.json")
        if getattr(args, "total_parts", 1) > 1 and os.path.isfile(existing):
            if not args.quiet:  # every part would read every case; the plan made from it is deterministic
                print(f"Part {args.part} of {args.total_parts}: using the existing fingerprint {existing}")
            continue
        extract_fingerprint(d, _num_processes(args), overwrite=True, verbose=not args.quiet)


def _plan(args) -> None:
    from ssl_nnunet.experiment_planning.planner import plan_experiment, transfer_shared_plan
    # several datasets: one shared plan, the first -d's, transferred to the others (documentation/planning.md)
    plan_experiment(args.d[0], args.profile, args.pl, args.gpu_memory_target, args.spacing, args.isotropic,
                    verbose=not args.quiet, arch=args.arch)
    if len(args.d) > 1:
        transfer_shared_plan(args.d[0], args.d[1:], verbose=not args.quiet, arch=args.arch)


def _plans_identifier(args) -> str:
    """``-p`` of ssl_nnunet_preprocess, else the pretraining plans of ``-arch`` (plan_and_preprocess)."""
    if getattr(args, "p", None):
        return args.p
    return plans_identifiers(getattr(args, "arch", "cnn"))[0]


def _preprocess(args) -> None:
    from ssl_nnunet.experiment_planning.preprocess import preprocess
    for d in args.d:
        preprocess(d, plans_identifier=_plans_identifier(args), num_processes=_num_processes(args),
                   verbose=not args.quiet, part=args.part, total_parts=args.total_parts)


def extract_fingerprint_entry(argv=None) -> None:
    p = argparse.ArgumentParser(description="Fingerprint a raw nnU-Net dataset; labels are optional.")
    _common_args(p, planning=False)
    run_cli(lambda: _fingerprint(p.parse_args(argv)))


def plan_experiment_entry(argv=None) -> None:
    p = argparse.ArgumentParser(description=f"Write {SSL_PLANS}.json (pretraining) and {FINETUNE_PLANS}.json.")
    _common_args(p)
    run_cli(lambda: _plan(p.parse_args(argv)))


def preprocess_entry(argv=None) -> None:
    p = argparse.ArgumentParser(description=f"Preprocess a dataset with its {SSL_PLANS}.json (nnU-Net blosc2 format).")
    _common_args(p, planning=False)
    _part_args(p)
    p.add_argument("-p", default=None, help=f"plans identifier (default {SSL_PLANS}; a Primus plan: "
                                            f"{SSL_PLANS}_primus_m etc.)")
    run_cli(lambda: _preprocess(p.parse_args(argv)))


def plan_and_preprocess(args) -> None:
    t0 = time.time()
    from ssl_nnunet.experiment_planning.preprocess import select_part
    select_part([], args.part, args.total_parts)  # a bad -part fails before the slow steps
    if len(args.d) > 1:  # incompatible datasets fail before the slow steps
        from ssl_nnunet.data.multi_dataset import check_compatible
        from ssl_nnunet.experiment_planning.dataset_checks import load_dataset_json
        from ssl_nnunet.utilities.file_io import dataset_name_from_id
        names = [dataset_name_from_id(d) for d in args.d]
        for name in names[1:]:
            check_compatible(names[0], load_dataset_json(names[0], False), name, load_dataset_json(name, False))
    _fingerprint(args, args.d[:1])  # the shared plan comes from the first dataset's fingerprint alone
    _plan(args)
    _preprocess(args)
    if not args.quiet:
        print(f"ssl_nnunet_plan_and_preprocess finished in {time.time() - t0:.1f} s")


def plan_and_preprocess_entry(argv=None) -> None:
    p = argparse.ArgumentParser(description="Fingerprint, plan and preprocess in one go "
                                            "(like nnUNetv2_plan_and_preprocess).")
    _common_args(p)
    _part_args(p)
    run_cli(lambda: plan_and_preprocess(p.parse_args(argv)))
