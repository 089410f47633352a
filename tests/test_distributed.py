"""Multi-process pretraining: nnU-Net's global-batch split, no unused DDP parameters, torchrun across two "nodes",
SIGUSR1 mid-epoch stop + exact resume, elastic restart after a killed worker."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch

from helpers import prepare_planned_dataset
from ssl_nnunet.methods import method_names
from ssl_nnunet.training.distributed import REQUEUE_EXIT_CODE, map_slurm_environment, split_global_batch
from ssl_nnunet.training.run import build_trainer, main, pretrain
from ssl_nnunet.training.schedule import learning_rate
from ssl_nnunet.utilities.errors import SSLInputError
from ssl_nnunet.utilities.file_io import ssl_output_folder

WORKTREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("batch,world", [(4, 3), (2, 2), (5, 2), (7, 4), (3, 1)])
def test_global_batch_split_is_nnunets(batch, world, monkeypatch):
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as nnunet_module
    expected = []
    for rank in range(world):  # nnU-Net's own rule, run on a stand-in trainer
        monkeypatch.setattr(nnunet_module.dist, "get_world_size", lambda: world)
        monkeypatch.setattr(nnunet_module.dist, "get_rank", lambda r=rank: r)
        fake = SimpleNamespace(is_ddp=True, configuration_manager=SimpleNamespace(batch_size=batch),
                               oversample_foreground_percent=0.33)
        nnunet_module.nnUNetTrainer._set_batch_size_and_oversample(fake)
        expected.append(fake.batch_size)
    assert split_global_batch(batch, world) == expected and sum(expected) == batch
    if (batch, world) == (4, 3):
        assert expected == [2, 1, 1]


def test_world_larger_than_batch_is_refused():
    with pytest.raises(SSLInputError, match="global batch size 2 .* cannot be split over 3 processes"):
        split_global_batch(2, 3)


def test_slurm_variables_are_mapped():
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_NTASKS_PER_NODE": "4(x2)",
           "MASTER_ADDR": "node01"}
    assert map_slurm_environment(env)
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"], env["LOCAL_WORLD_SIZE"]) == ("5", "8", "1", "4")
    assert not map_slurm_environment(env)  # RANK set (torchrun inside srun): left alone
    with pytest.raises(SSLInputError, match="MASTER_ADDR"):
        map_slurm_environment({"SLURM_PROCID": "0", "SLURM_NTASKS": "2"})


@pytest.fixture(scope="module")
def dist_dataset(new_dataset_id):
    did, name = new_dataset_id("DistSmoke")
    prepare_planned_dataset(did, "DistSmoke", n_cases=5, shape=(48, 52, 56))
    return did, name


def _set_mae_plan(name, **entries):
    path = os.path.join(os.environ["nnUNet_preprocessed"], name, "sslPlans.json")
    with open(path) as f:
        plans = json.load(f)
    plans["ssl"]["methods"]["mae"].update(entries)
    with open(path, "w") as f:
        json.dump(plans, f)


@pytest.mark.parametrize("method", method_names())
def test_every_trainable_parameter_gets_a_gradient(dist_dataset, method):
    """What DDP's find_unused_parameters=False requires: after freezing ``untrained_parameters()`` every parameter
    that still requires grad receives one in a training step, and the deep-supervision heads are frozen."""
    trainer = build_trainer(dist_dataset[0], method, device="cpu", iterations=2, num_prefetch=0)
    trainer.initialize()
    trainer._make_samplers()
    terms = trainer.method(next(trainer.dataloader_train))
    terms["loss"].backward()
    missing = [n for n, p in trainer.method.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"{method}: no gradient for {missing}"
    seg = trainer.network.decoder.seg_layers
    assert all(not p.requires_grad for layer in seg[:-1] for p in layer.parameters())
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert all(id(p) not in optimized for layer in seg[:-1] for p in layer.parameters())


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", *args]


def _env():
    return dict(os.environ, PYTHONPATH=WORKTREE + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")


def test_torchrun_two_nodes_three_ranks_split_4_as_2_1_1(dist_dataset):
    """Two torchrun agents ("nodes", c10d rendezvous on localhost) with 2 + 1 processes: batch 4 is trained as
    2/1/1, all ranks end with identical weights and the global batch of a 1-process run."""
    did, name = dist_dataset
    _set_mae_plan(name, batch_size=4, iterations_per_epoch=3, num_val_iterations=1)
    port = _free_port()
    cmd = ["-m", "ssl_nnunet.training.run", "-d", str(did), "-m", "mae", "-device", "cpu", "--iterations", "3",
           "--prefetch", "0"]
    nodes = [subprocess.Popen(_torchrun("--nnodes", "2", f"--nproc-per-node={n}", "--rdzv-backend", "c10d",
                                        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "i17", *cmd),
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (2, 1)]
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    out = ssl_output_folder(name, "mae", "sslPlans")
    ckpt = torch.load(os.path.join(out, "checkpoint_final.pth"), weights_only=False)
    sums = ckpt["ddp_rank_weight_checksums"]
    assert len(sums) == 3 and sums[0] == sums[1] == sums[2]
    assert ckpt["batch_size_per_rank"] == [2, 1, 1] and ckpt["global_batch_size"] == 4
    assert ckpt["world_size"] == 3 and ckpt["iterations_done"] == 3
    single = build_trainer(did, "mae", device="cpu", iterations=3, num_prefetch=0)
    single.initialize()
    assert single.batch_sizes_per_rank == [4] and single.global_batch_size == ckpt["global_batch_size"]


def test_sigusr1_mid_epoch_then_resume_continues_at_that_iteration(dist_dataset, monkeypatch):
    from ssl_nnunet.training.ssl_trainer import SSLTrainer
    did, name = dist_dataset
    _set_mae_plan(name, batch_size=2, iterations_per_epoch=10, num_val_iterations=1)
    seen = []
    real_step = SSLTrainer.train_step

    def recording_step(self, batch, iteration):
        if iteration == 13 and len(seen) == 13:  # the cluster's warning arrives during iteration 13
            os.kill(os.getpid(), signal.SIGUSR1)
        out = real_step(self, batch, iteration)
        seen.append((iteration, self.optimizer.param_groups[0]["lr"]))
        return out

    monkeypatch.setattr(SSLTrainer, "train_step", recording_step)
    out = ssl_output_folder(name, "mae", "sslPlans")
    for f in ("checkpoint_final.pth", "checkpoint_latest.pth"):  # the torchrun test's run shares this folder
        if os.path.exists(os.path.join(out, f)):
            os.remove(os.path.join(out, f))
    argv = ["-d", str(did), "-m", "mae", "-device", "cpu", "--iterations", "25", "--prefetch", "1"]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code == REQUEUE_EXIT_CODE
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # the trainer's handler is removed again
    out = ssl_output_folder(name, "mae", "sslPlans")
    ckpt = torch.load(os.path.join(out, "checkpoint_latest.pth"), weights_only=False)
    assert (ckpt["current_epoch"], ckpt["iteration_in_epoch"], ckpt["iterations_done"]) == (1, 4, 14)
    assert ckpt["stop_signal"] == "SIGUSR1" and len(ckpt["iteration_losses"]) == 14
    assert not os.path.exists(os.path.join(out, "checkpoint_final.pth"))
    assert [i for i, _ in seen] == list(range(14))

    trainer = pretrain(did, "mae", device="cpu", iterations=25, num_prefetch=1, continue_training=True)
    assert [i for i, _ in seen] == list(range(25))  # nothing repeated, nothing skipped
    plan = trainer.method_plan
    for i, lr in seen:  # the schedule continues exactly
        assert lr == pytest.approx(learning_rate(plan["lr_schedule"], plan["optimizer"]["lr"], i, 25), rel=1e-12)
    final = torch.load(os.path.join(out, "checkpoint_final.pth"), weights_only=False)
    assert final["iteration_losses"][:14] == ckpt["iteration_losses"] and len(final["iteration_losses"]) == 25
    assert final["iterations_done"] == 25 and len(final["logging"]["train_loss"]) == 3
    assert trainer.stop_signal is None


def _children(pid):
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def test_elastic_restart_after_a_killed_worker_completes(dist_dataset):
    did, name = dist_dataset
    _set_mae_plan(name, batch_size=2, iterations_per_epoch=4, num_val_iterations=1)
    out = ssl_output_folder(name, "mae", "sslPlans")
    for f in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        if os.path.exists(os.path.join(out, f)):
            os.remove(os.path.join(out, f))
    cmd = _torchrun("--nproc-per-node=2", "--max-restarts=1", "--monitor-interval=0.2", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", f"127.0.0.1:{_free_port()}", "-m", "ssl_nnunet.training.run", "-d", str(did),
                    "-m", "mae", "-device", "cpu", "--iterations", "16", "--prefetch", "1")
    agent = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    latest = os.path.join(out, "checkpoint_latest.pth")
    deadline = time.time() + 240
    killed = None
    while time.time() < deadline and agent.poll() is None:
        if os.path.isfile(latest) and torch.load(latest, weights_only=False)["current_epoch"] >= 1:
            workers = _children(agent.pid)
            if len(workers) == 2:
                killed = workers[-1]
                os.kill(killed, signal.SIGKILL)
                break
        time.sleep(0.1)
    log = agent.communicate(timeout=300)[0]
    assert killed is not None, "no worker was killed mid-run:\n" + log[-3000:]
    assert agent.returncode == 0, log[-4000:]
    assert "torchrun restart 1: continuing from the latest checkpoint" in log and "Resumed from epoch" in log
    final = torch.load(os.path.join(out, "checkpoint_final.pth"), weights_only=False)
    assert final["iterations_done"] == 16 and final["current_epoch"] == 4
    assert final["ddp_rank_weight_checksums"][0] == final["ddp_rank_weight_checksums"][1]
