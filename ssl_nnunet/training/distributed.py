"""Multi-process pretraining: the process group from torchrun's / SLURM's environment, the exact split of the
global batch, and the requeue exit code.

Launch contract (``env://``): ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
``MASTER_PORT`` as torchrun (``torch.distributed.run``) sets them. A process started by ``srun`` without torchrun
(one task per GPU) gets them from ``SLURM_PROCID``, ``SLURM_NTASKS``, ``SLURM_LOCALID`` and
``SLURM_NTASKS_PER_NODE``; ``MASTER_ADDR`` / ``MASTER_PORT`` must then be exported by the job script.
The device of a rank is ``cuda:LOCAL_RANK`` (the GPU index on its node), never the global rank.
"""
from __future__ import annotations

import os
from typing import List

import torch
import torch.distributed as dist

from ssl_nnunet.utilities.errors import SSLInputError

#: exit status of a run stopped by SIGUSR1 / SIGTERM after writing its mid-epoch checkpoint: EX_TEMPFAIL of
#: sysexits.h ("temporary failure, retry later"); a job script requeues on it and the next run resumes with --c
REQUEUE_EXIT_CODE = 75

_SLURM_TO_TORCHRUN = (("SLURM_PROCID", "RANK"), ("SLURM_NTASKS", "WORLD_SIZE"), ("SLURM_LOCALID", "LOCAL_RANK"))


def map_slurm_environment(environ=os.environ) -> bool:
    """Under ``srun`` without torchrun (``SLURM_NTASKS`` > 1 and no ``RANK``), set the torchrun variables from
    SLURM's. Returns True when it mapped them."""
    if "RANK" in environ or int(environ.get("SLURM_NTASKS", "1")) <= 1 or "SLURM_PROCID" not in environ:
        return False
    if "MASTER_ADDR" not in environ:
        raise SSLInputError("Launched by srun with SLURM_NTASKS > 1 but MASTER_ADDR is not set: export MASTER_ADDR="
                            "$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1) and MASTER_PORT in the job "
                            "script (documentation/pretraining.md, SLURM), or launch with torchrun.")
    for slurm, torchrun in _SLURM_TO_TORCHRUN:
        environ[torchrun] = environ[slurm]
    # SLURM_NTASKS_PER_NODE may read "4(x2)" on heterogeneous allocations
    environ.setdefault("LOCAL_WORLD_SIZE", environ.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
    environ.setdefault("MASTER_PORT", "29500")
    return True


def launched_distributed(environ=os.environ) -> bool:
    """True when this process is one rank of a multi-process job (torchrun, or srun after the mapping)."""
    return int(environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in environ


def elastic_restart_count(environ=os.environ) -> int:
    """How often torchrun restarted this worker group (``--max-restarts``); > 0 means: resume from checkpoint."""
    return int(environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def init_process_group_from_env(device_type: str) -> None:
    """``init_process_group(env://)``: NCCL on CUDA (after ``set_device(LOCAL_RANK)``), gloo otherwise; on CPU
    the intra-op threads are shared among the ranks of a node."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise SSLInputError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices are "
                                f"visible on {os.uname().nodename}: start at most that many processes per node.")
        torch.cuda.set_device(local_rank)
    else:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        torch.set_num_threads(max(1, torch.get_num_threads() // max(1, local_world)))
    backend = "nccl" if device_type == "cuda" else "gloo"
    restarts = elastic_restart_count()
    if not restarts:
        dist.init_process_group(backend, init_method="env://")
        return
    # After a torchrun restart the agent's store still holds the first group's keys (each rank's gloo address),
    # so the new ranks would dial the dead ones ("connectFullMesh ... Connection refused"): give every restart
    # its own key namespace in the same store.
    store, rank, world_size = next(dist.rendezvous("env://"))
    dist.init_process_group(backend, store=dist.PrefixStore(f"ssl_nnunet/restart_{restarts}", store), rank=rank,
                            world_size=world_size)


def local_device(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for CUDA, ``device`` unchanged otherwise."""
    if device.type == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def split_global_batch(global_batch_size: int, world_size: int, where: str = "the plan") -> List[int]:
    """Per-rank batch sizes that add up to ``global_batch_size``, the remainder on the first ranks — the split of
    nnU-Net's ``nnUNetTrainer._set_batch_size_and_oversample`` (4 over 3 ranks: ``[2, 1, 1]``)."""
    if world_size > global_batch_size:
        raise SSLInputError(f"The global batch size {global_batch_size} ({where}) cannot be split over {world_size} "
                            f"processes: every rank needs at least one sample. Start at most {global_batch_size} "
                            f"processes, or raise batch_size in the plan (the plan's batch is the global batch).")
    base = global_batch_size // world_size
    sizes = [base + 1 if base * world_size + rank < global_batch_size else base for rank in range(world_size)]
    assert sum(sizes) == global_batch_size
    return sizes
