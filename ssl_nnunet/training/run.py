"""``ssl_nnunet_pretrain``: run one SSL objective on a preprocessed dataset (single process or DDP)."""
from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

from ssl_nnunet.constants import CONFIGURATION, SSL_PLANS
from ssl_nnunet.data.case_cache import DEFAULT_MAX_OPEN_CASES
from ssl_nnunet.methods import get_method, method_names
from ssl_nnunet.paths import nnunet_preprocessed
from ssl_nnunet.training.distributed import (REQUEUE_EXIT_CODE, elastic_restart_count, init_process_group_from_env,
                                             launched_distributed, map_slurm_environment)
from ssl_nnunet.utilities.errors import SSLInputError, run_cli
from ssl_nnunet.utilities.file_io import dataset_name_from_id, load_json, load_plans


def _resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise SSLInputError("-device cuda requested but no CUDA device is available; use -device cpu.")
    if name == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise SSLInputError("-device mps requested but MPS is not available; use -device cpu.")
    return torch.device(name)


def default_num_loader_workers(device: str) -> int:
    """Default of ``-np_loader``: nnU-Net's ``get_allowed_n_proc_DA()`` (``nnUNet_n_proc_DA`` when set, capped at
    the CPU count) on CUDA; on CPU/MPS ``nnUNet_n_proc_DA`` when set, else 0 (the workers would compete with the
    training step for the same cores; the prefetch thread keeps up there)."""
    from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA
    if device == "cuda" or "nnUNet_n_proc_DA" in os.environ:
        return get_allowed_n_proc_DA()
    return 0


def _shared_plan_datasets(datasets: Sequence, plans_identifier: str) -> List[str]:
    """Names of several pretraining datasets, checked to share one plan (same plan apart from the dataset's name
    and image reader; same channels and modalities) — else an :class:`SSLInputError` naming both datasets."""
    from ssl_nnunet.data.multi_dataset import check_compatible, shared_plan_differences
    names = [dataset_name_from_id(d) for d in datasets]
    if len(set(names)) != len(names):
        raise SSLInputError(f"-d lists a dataset twice ({', '.join(names)}).")
    folders = [os.path.join(nnunet_preprocessed(), n) for n in names]
    plans = [load_plans(os.path.join(f, plans_identifier + ".json"), d) for f, d in zip(folders, datasets)]
    jsons = [load_json(os.path.join(f, "dataset.json"), "dataset.json") for f in folders]
    for name, p, j in zip(names[1:], plans[1:], jsons[1:]):
        check_compatible(names[0], jsons[0], name, j)
        differ = shared_plan_differences(plans[0], p)
        if differ:
            raise SSLInputError(f"{names[0]} and {name} do not share one pretraining plan ({plans_identifier}.json "
                                f"differs in {', '.join(differ)}). Plan them together: ssl_nnunet_plan_and_preprocess "
                                f"-d {' '.join(str(d) for d in datasets)} (the first dataset's plan is transferred "
                                f"to the others).")
    return names


def build_trainer(dataset, method: str, plans_identifier: str = SSL_PLANS, device: str = "cpu",
                  iterations: Optional[int] = None, seed: int = 0, num_prefetch: int = 2,
                  num_loader_workers: int = 0, max_open_cases: int = DEFAULT_MAX_OPEN_CASES,
                  tensorboard: bool = False, dataset_weights=None, subject_pattern: Optional[str] = None):
    """The configured trainer of ``dataset`` (an id/name, or a list of them: several datasets sharing the first
    one's plan, sampled with ``dataset_weights``)."""
    from ssl_nnunet.training.ssl_trainer import SSLTrainer
    try:
        get_method(method)
    except KeyError as e:
        raise SSLInputError(str(e.args[0])) from None
    datasets = list(dataset) if isinstance(dataset, (list, tuple)) else [dataset]
    names = _shared_plan_datasets(datasets, plans_identifier) if len(datasets) > 1 else None
    if names is None and dataset_weights is not None and dataset_weights not in ("cases", ["cases"], "equal",
                                                                                 ["equal"]):
        raise SSLInputError("--dataset_weights with numbers needs several datasets (-d 901 902 ...).")
    if names is not None:  # a malformed --dataset_weights fails before the network is built
        from ssl_nnunet.data.multi_dataset import resolve_dataset_weights
        resolve_dataset_weights(dataset_weights, {n: 1 for n in names})
    dataset_name = dataset_name_from_id(datasets[0])
    folder = os.path.join(nnunet_preprocessed(), dataset_name)
    plans = load_plans(os.path.join(folder, plans_identifier + ".json"), datasets[0])
    dataset_json = load_json(os.path.join(folder, "dataset.json"), "dataset.json")
    trainer = SSLTrainer(plans, CONFIGURATION, 0, dataset_json, _resolve_device(device))
    return trainer.configure(method, iterations=iterations, seed=seed, num_prefetch=num_prefetch,
                             num_loader_workers=num_loader_workers, max_open_cases=max_open_cases,
                             tensorboard=tensorboard, datasets=names, dataset_weights=dataset_weights,
                             subject_pattern=subject_pattern)


def pretrain(dataset, method: str, plans_identifier: str = SSL_PLANS, device: str = "cpu",
             continue_training: bool = False, iterations: Optional[int] = None,
             pretrained_weights: Optional[str] = None, seed: int = 0, num_prefetch: int = 2,
             num_loader_workers: int = 0, max_open_cases: int = DEFAULT_MAX_OPEN_CASES,
             tensorboard: bool = False, dataset_weights=None, subject_pattern: Optional[str] = None):
    """Pretrain ``method`` on ``dataset`` (one, or a list sharing one plan) in this process (one rank when a process group is initialised); returns
    the trainer. ``trainer.stop_signal`` is set when SIGUSR1 / SIGTERM stopped it (exit with
    :data:`~ssl_nnunet.training.distributed.REQUEUE_EXIT_CODE`)."""
    trainer = build_trainer(dataset, method, plans_identifier, device, iterations, seed, num_prefetch,
                            num_loader_workers, max_open_cases, tensorboard, dataset_weights, subject_pattern)
    trainer.initialize()
    final = os.path.join(trainer.output_folder, "checkpoint_final.pth")
    latest = os.path.join(trainer.output_folder, "checkpoint_latest.pth")
    restarts = elastic_restart_count()
    if restarts and not continue_training:
        trainer.print_to_log_file(f"torchrun restart {restarts}: continuing from the latest checkpoint.")
        continue_training = True
    if continue_training:
        for path in (latest, final):
            if os.path.isfile(path):
                trainer.load_checkpoint(path)
                break
        else:
            trainer.print_to_log_file("--c given but no checkpoint found; starting from scratch.")
    elif os.path.isfile(latest) or os.path.isfile(final):
        trainer.print_to_log_file(f"Existing checkpoints in {trainer.output_folder} will be overwritten "
                                  f"(use --c to resume instead).")
    if pretrained_weights is not None and not continue_training:
        from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
        if not os.path.isfile(pretrained_weights):
            raise SSLInputError(f"-pretrained_weights {pretrained_weights} does not exist.")
        load_pretrained_weights(trainer.network, pretrained_weights, verbose=trainer.local_rank == 0)
    trainer.run_training()
    return trainer


def pretrain_distributed(**kwargs) -> int:
    """One rank of a torchrun / srun / ``-num_gpus`` job: the process group from ``env://``, :func:`pretrain`,
    then the group is destroyed. Returns the exit status (0, or the requeue code after a stop signal)."""
    init_process_group_from_env(kwargs.get("device", "cpu"))
    try:
        trainer = pretrain(**kwargs)
    finally:
        dist.destroy_process_group()
    return REQUEUE_EXIT_CODE if trainer.stop_signal else 0


def _elastic_worker(kwargs: dict) -> None:
    status = pretrain_distributed(**kwargs)
    if status:
        sys.exit(status)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pretrain_ddp(num_processes: int, **kwargs) -> int:
    """``-num_gpus K``: K ranks on this machine (NCCL on CUDA, gloo on CPU) started by torch's own elastic launcher
    (``torch.distributed.launcher.elastic_launch``, what torchrun runs), so every rank sees the torchrun
    environment and takes the same code path as under torchrun. Returns the exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    if kwargs.get("device") == "cuda" and torch.cuda.device_count() < num_processes:
        raise SSLInputError(f"-num_gpus {num_processes} but only {torch.cuda.device_count()} CUDA devices found.")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=num_processes, run_id=f"ssl_nnunet_{os.getpid()}",
                          rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{_free_port()}", max_restarts=0,
                          monitor_interval=0.2, start_method="spawn")
    import signal
    # torch's launcher installs SIGTERM/SIGINT/SIGHUP/SIGQUIT handlers and never restores them; a caller that goes
    # on (a test session, a notebook) would otherwise keep them, and multiprocessing pools forked later could
    # then not be terminated (a hang seen in the test suite)
    names = [n for n in ("SIGTERM", "SIGINT", "SIGHUP", "SIGQUIT") if hasattr(signal, n)]
    saved = ({n: signal.getsignal(getattr(signal, n)) for n in names}
             if threading.current_thread() is threading.main_thread() else {})
    try:
        elastic_launch(config, _elastic_worker)(kwargs)
    except ChildFailedError as e:
        codes = {f.exitcode for f in e.failures.values()}
        if codes == {REQUEUE_EXIT_CODE}:
            return REQUEUE_EXIT_CODE
        raise
    finally:
        for n, handler in saved.items():
            if handler is not None:
                signal.signal(getattr(signal, n), handler)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description=f"Self-supervised pretraining of the nnU-Net network of {SSL_PLANS}.json. "
                                f"Multi-GPU / multi-node: launch with torchrun (or srun); see "
                                f"documentation/pretraining.md. Exits {REQUEUE_EXIT_CODE} after a SIGUSR1/SIGTERM "
                                f"stop (checkpoint written; requeue and resume with --c).")
    p.add_argument("-d", nargs="+", required=True,
                   help="dataset id(s) or name(s); several (planned together by ssl_nnunet_plan_and_preprocess -d "
                        "A B ...) are sampled in one run, the run folder is in the first one's results folder")
    p.add_argument("-m", required=True, choices=method_names(), help="SSL method")
    p.add_argument("-p", default=SSL_PLANS, help=f"plans identifier (default {SSL_PLANS})")
    p.add_argument("-device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu", "mps"])
    p.add_argument("-num_gpus", type=int, default=1,
                   help="single-machine shortcut: number of DDP processes (gloo on CPU, NCCL on CUDA); do not combine "
                        "with torchrun")
    p.add_argument("--c", action="store_true", help="continue from checkpoint_latest.pth")
    p.add_argument("--iterations", type=int, default=None,
                   help="total training iterations (overrides the plan; the LR schedule follows it)")
    p.add_argument("-pretrained_weights", default=None, help="nnU-Net checkpoint to initialise the network")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefetch", type=int, default=2,
                   help="batches prepared ahead (in a background thread, or per loader worker)")
    p.add_argument("-np_loader", type=int, default=None,
                   help="loader worker processes per GPU/process that cut the patches (0: a thread of the "
                        "trainer). Default: nnU-Net's nnUNet_n_proc_DA convention on CUDA, 0 on CPU unless "
                        "nnUNet_n_proc_DA is set")
    p.add_argument("--max_open_cases", type=int, default=DEFAULT_MAX_OPEN_CASES,
                   help=f"case files each sampler keeps open (LRU; default {DEFAULT_MAX_OPEN_CASES})")
    p.add_argument("--dataset_weights", nargs="+", default=None,
                   help="several -d: sampling weight per dataset: 'cases' (default, proportional to the training "
                        "cases), 'equal', or one number per dataset in -d order")
    p.add_argument("--subject_pattern", default=None,
                   help="regular expression with a group (?P<subject>...) that gives a case id's subject for the "
                        "held-out split when dataset.json has no 'subject' field (default: strip a trailing "
                        "_ses/_session/_visit/_tp/_timepoint token; see documentation/pretraining.md)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also log loss terms, learning rate, data wait and previews to <run folder>/tensorboard "
                        "(needs the tensorboard extra); progress.png is written either way")
    a = p.parse_args(argv)
    kwargs = dict(dataset=a.d if len(a.d) > 1 else a.d[0], method=a.m, dataset_weights=a.dataset_weights,
                  subject_pattern=a.subject_pattern, plans_identifier=a.p, device=a.device, continue_training=a.c,
                  iterations=a.iterations, pretrained_weights=a.pretrained_weights, seed=a.seed,
                  num_prefetch=a.prefetch, max_open_cases=a.max_open_cases, tensorboard=a.tensorboard,
                  num_loader_workers=default_num_loader_workers(a.device) if a.np_loader is None else a.np_loader)

    def go() -> int:
        if map_slurm_environment() or launched_distributed():
            if a.num_gpus > 1:
                raise SSLInputError("-num_gpus given inside a torchrun/srun job (WORLD_SIZE is set): the launcher "
                                    "starts the processes; drop -num_gpus.")
            return pretrain_distributed(**kwargs)
        if a.num_gpus > 1:
            return pretrain_ddp(a.num_gpus, **kwargs)
        return REQUEUE_EXIT_CODE if pretrain(**kwargs).stop_signal else 0
    status = run_cli(go)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
