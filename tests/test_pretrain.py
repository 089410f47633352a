"""SSL engine: MAE pretraining end to end, resume after kill, 2-process gloo DDP, non-finite losses."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from helpers import tensorboard_scalars, write_synthetic_dataset
from ssl_nnunet.experiment_planning.fingerprint import extract_fingerprint
from ssl_nnunet.experiment_planning.planner import plan_experiment
from ssl_nnunet.experiment_planning.preprocess import preprocess
from ssl_nnunet.paths import nnunet_preprocessed
from ssl_nnunet.training.run import pretrain, pretrain_ddp
from ssl_nnunet.utilities.file_io import ssl_output_folder

DATASET = "Dataset940_PretrainSmoke"


def _set_plan(dataset, **entries):
    path = os.path.join(nnunet_preprocessed(), dataset, "sslPlans.json")
    with open(path) as f:
        plans = json.load(f)
    plans["ssl"]["methods"]["mae"].update(entries)
    with open(path, "w") as f:
        json.dump(plans, f)


@pytest.fixture(scope="module")
def smoke_dataset():
    write_synthetic_dataset(940, "PretrainSmoke", n_cases=5, shape=(48, 52, 56))
    extract_fingerprint(940, 1, verbose=False)
    plan_experiment(940, "cpu_smoke", verbose=False)
    preprocess(940, num_processes=1, verbose=False)
    _set_plan(DATASET, iterations_per_epoch=10, num_val_iterations=1)
    return DATASET


def test_mae_pretraining_loss_falls_and_outputs_exist(smoke_dataset):
    trainer = pretrain(940, "mae", device="cpu", iterations=50, num_prefetch=1, tensorboard=True)
    losses = trainer.iteration_losses
    assert len(losses) == 50
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    out = ssl_output_folder(DATASET, "mae", "sslPlans")
    for name in ("checkpoint_final.pth", "progress.png", "plans.json", "dataset.json", "dataset_fingerprint.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert not os.path.exists(os.path.join(out, "checkpoint_latest.pth"))
    ckpt = torch.load(os.path.join(out, "checkpoint_final.pth"), weights_only=False)
    assert ckpt["iterations_done"] == 50 and ckpt["current_epoch"] == 5
    assert len(ckpt["logging"]["train_rec_loss"]) == 5 and len(ckpt["logging"]["val_rec_loss"]) == 5
    # network_weights is the plain network's state dict (no densify / mask tokens), on CPU
    assert all(v.device.type == "cpu" for v in ckpt["network_weights"].values())
    assert not any("densify" in k or "mask_token" in k for k in ckpt["network_weights"])
    assert any(f.startswith("preview_epoch_") for f in os.listdir(out))
    # --tensorboard: every iteration's loss, the loss terms per epoch, lr and data wait, the previews
    scalars, images = tensorboard_scalars(os.path.join(out, "tensorboard"))
    assert [v for _, v in scalars["iteration/loss"]] == pytest.approx(losses, rel=1e-5)
    assert [s for s, _ in scalars["iteration/loss"]] == list(range(1, 51))
    assert [s for s, _ in scalars["val/rec_loss"]] == [10, 20, 30, 40, 50]
    assert [v for _, v in scalars["val/rec_loss"]] == pytest.approx(ckpt["logging"]["val_rec_loss"], rel=1e-5)
    assert {"train/loss", "lr", "data_wait_fraction", "epoch_time_s"} <= set(scalars) and images == ["preview"]


def _pretrain_cmd(*extra):
    exe = os.path.join(os.path.dirname(sys.executable), "ssl_nnunet_pretrain")
    return [exe, "-d", "940", "-m", "mae", "-device", "cpu", "--iterations", "60", "--prefetch", "1", *extra]


def test_resume_after_kill(smoke_dataset):
    out = ssl_output_folder(DATASET, "mae", "sslPlans")
    for f in ("checkpoint_final.pth", "checkpoint_latest.pth"):
        if os.path.exists(os.path.join(out, f)):
            os.remove(os.path.join(out, f))
    proc = subprocess.Popen(_pretrain_cmd(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ))
    latest = os.path.join(out, "checkpoint_latest.pth")
    deadline = time.time() + 240
    epoch_at_kill = 0
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(latest):
            try:
                epoch_at_kill = torch.load(latest, weights_only=False)["current_epoch"]
            except Exception:  # cannot happen with atomic writes, but do not fail the poll on it
                epoch_at_kill = 0
            if epoch_at_kill >= 2:
                break
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= epoch_at_kill < 6, "the run must be killed mid-way"
    assert not os.path.exists(os.path.join(out, "checkpoint_final.pth"))
    r = subprocess.run(_pretrain_cmd("--c"), capture_output=True, text=True, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Resumed from epoch" in r.stdout
    ckpt = torch.load(os.path.join(out, "checkpoint_final.pth"), weights_only=False)
    assert ckpt["iterations_done"] == 60 and ckpt["current_epoch"] == 6
    assert len(ckpt["logging"]["train_loss"]) == 6
    assert len(ckpt["iteration_losses"]) == 60


def test_ddp_two_processes_gloo_identical_weights(smoke_dataset):
    import signal
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    pretrain_ddp(2, dataset=940, method="mae", device="cpu", iterations=4, num_prefetch=0)
    # torch's launcher leaves its signal handlers installed; pretrain_ddp puts the caller's back
    assert {s: signal.getsignal(s) for s in before} == before
    out = ssl_output_folder(DATASET, "mae", "sslPlans")
    ckpt = torch.load(os.path.join(out, "checkpoint_final.pth"), weights_only=False)
    sums = ckpt["ddp_rank_weight_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert ckpt["iterations_done"] == 4


def test_nonfinite_loss_stops_with_clear_error_and_keeps_checkpoint(smoke_dataset, monkeypatch):
    from ssl_nnunet.methods.mae import MAE
    from ssl_nnunet.training import ssl_trainer
    out = ssl_output_folder(DATASET, "mae", "sslPlans")
    real_forward = MAE.forward
    calls = {"n": 0}

    def flaky_forward(self, batch, generator=None):
        terms = real_forward(self, batch, generator)
        if self.training:
            calls["n"] += 1
            if calls["n"] > 12:  # good first epoch (10 steps), then NaN forever
                terms["loss"] = terms["loss"] * float("nan")
        return terms

    monkeypatch.setattr(MAE, "forward", flaky_forward)
    with pytest.raises(RuntimeError, match="NaN/inf for 5 consecutive"):
        pretrain(940, "mae", device="cpu", iterations=40, num_prefetch=0)
    ckpt = torch.load(os.path.join(out, "checkpoint_latest.pth"), weights_only=False)
    assert ckpt["current_epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["network_weights"].values() if v.is_floating_point())
    assert ssl_trainer.MAX_CONSECUTIVE_NONFINITE == 5
