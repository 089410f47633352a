"""Smoke tests of ``ssl_nnunet_benchmark``: throughput, pretext and transfer with minimal budgets."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import prepare_planned_dataset


def test_throughput_records_the_methods_own_network_passes(tmp_path):
    from ssl_nnunet.benchmark.throughput import benchmark_method, write_report
    prepare_planned_dataset(970, "BenchThroughput", n_cases=4, shape=(40, 44, 48))
    results = [benchmark_method(970, m, "cpu", warmup=1, timed=1) for m in ("mae", "voco")]
    mae, voco = results
    # MAE: one full U-Net pass on the batch; VoCo: one encoder-only pass on all B*(n + n_t) crops
    plans = json.load(open(os.path.join(os.environ["nnUNet_preprocessed"], "Dataset970_BenchThroughput",
                                        "sslPlans.json")))
    lay = plans["ssl"]["methods"]["voco"]["layout"]
    b = plans["ssl"]["methods"]["voco"]["batch_size"]
    n = lay["base_grid"][0] * lay["base_grid"][1] * lay["base_grid"][2]
    assert mae["network_passes"] == [f"net {[plans['ssl']['methods']['mae']['batch_size'], 1] + plans['ssl']['methods']['mae']['pretrain_patch_size']}"]
    assert voco["network_passes"] == [f"enc {[b * (n + lay['n_target_crops']), 1] + lay['crop_size']}"]
    for r in results:
        assert r["ssl_step_s"] > 0 and r["plain_step_s"] > 0 and r["supervised_nnunet_step_s"] > 0
        assert r["ratio"] == pytest.approx(r["ssl_step_s"] / r["plain_step_s"])
        assert 0 <= r["data_wait_share"] <= 1
        assert r["floor_with_teacher_s"] is None  # neither has a teacher encoder (VoCo's EMA option is off)
    write_report(results, str(tmp_path / "t.json"), str(tmp_path / "t.md"), "test")
    table = (tmp_path / "t.md").read_text()
    assert "| mae |" in table and "| voco |" in table
    # the nnU-Net reference step leaves nothing in the user's results folder
    assert not any(d.startswith("nnUNetTrainer__") for d in
                   os.listdir(os.path.join(os.environ["nnUNet_results"], "Dataset970_BenchThroughput")))


def test_throughput_floor_replays_the_teacher_encoder_passes():
    """Alice's target encoder runs (no grad) on both views up to the token stage; the second floor replays
    exactly that pass through the same module."""
    from ssl_nnunet.benchmark.throughput import make_floor_step, record_network_passes
    from ssl_nnunet.training.run import build_trainer
    prepare_planned_dataset(970, "BenchThroughput", n_cases=4, shape=(40, 44, 48))
    trainer = build_trainer(970, "alice", device="cpu", iterations=10, num_prefetch=0)
    trainer.disable_checkpointing = True
    trainer.on_train_start()
    trainer._consecutive_nonfinite = 0
    batch = next(trainer.dataloader_train)
    calls, teacher_calls = record_network_passes(trainer, lambda: trainer.train_step(batch, 0))
    method = trainer.method
    b, patch = batch.shape[0], list(batch.shape[3:])
    assert [(full, grad) for _x, full, grad in calls] == [(True, True)]
    assert len(teacher_calls) == 1
    teacher, x, n_stages = teacher_calls[0]
    assert teacher is method.target_encoder
    assert list(x.shape) == [2 * b, 1] + patch and n_stages == method.token_stage + 1
    before = [p.detach().clone() for p in teacher.parameters()]
    make_floor_step(trainer.network, calls, trainer.method_plan["optimizer"], trainer.grad_clip, teacher_calls)()
    assert all(torch.equal(a, p) for a, p in zip(before, teacher.parameters()))  # replay leaves the teacher alone
    trainer.dataloader_train.close()


def test_pretext_probe_rebuilds_the_initial_network(tmp_path):
    from ssl_nnunet.benchmark.pretext import evaluate_pretext, format_report
    from ssl_nnunet.training.run import pretrain
    prepare_planned_dataset(971, "BenchPretext", "voco", {"iterations_per_epoch": 5, "num_val_iterations": 1},
                            n_cases=4, shape=(40, 44, 48))
    with pytest.raises(Exception, match="checkpoint_final.pth"):
        evaluate_pretext(971, "voco", num_batches=2)
    trainer = pretrain(971, "voco", device="cpu", iterations=5, num_prefetch=0)
    r = evaluate_pretext(971, "voco", num_batches=2)
    assert r["iterations_done"] == 5
    assert set(r["init"]) >= {"loss", "L_pred", "L_reg", "pos_acc", "pos_acc_sem"}
    # 'init' is the run's initial network, bit for bit: same seed -> same scores; a different seed differs
    again = evaluate_pretext(971, "voco", num_batches=2)
    assert again["init"] == r["init"] and again["trained"] == r["trained"]
    other = evaluate_pretext(971, "voco", num_batches=2, seed=1)
    assert other["init"]["loss"] != r["init"]["loss"]
    assert r["trained"]["loss"] != r["init"]["loss"]
    assert "| pos_acc |" in format_report(r)
    # the first batches are the trainer's own per-epoch validation batches
    trainer.method.eval()
    assert trainer.validate(1)["loss"] == pytest.approx(evaluate_pretext(971, "voco", num_batches=1)["trained"]["loss"],
                                                        rel=1e-5)


def test_transfer_benchmark_smoke_budget(tmp_path):
    root = tmp_path / "bench"
    env = dict(os.environ, OMP_NUM_THREADS="2")
    cmd = [os.path.join(os.path.dirname(sys.executable), "ssl_nnunet_benchmark"), "transfer",
           "--budget", "smoke", "-m", "mae", "--root", str(root), "-device", "cpu"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.load(open(root / "results.json"))
    assert summary["budget"] == "smoke" and summary["methods"] == ["mae"] and summary["pending_budgets"] == []
    raw = summary["raw"]["smoke"]
    assert set(raw) == {"mae", "scratch", "scratch_seed2", "scratch_vanilla"}
    assert summary["vanilla_trainers"] == {"smoke": "nnUNetTrainer_SSLSmoke"}
    # every method is paired case by case with both scratch arms; one split gives no interval
    paired = summary["table"]["smoke"]["paired"]["mae"]
    assert set(paired) == {"scratch", "scratch_vanilla"}
    assert paired["scratch_vanilla"]["n_cases"] == 2 and paired["scratch_vanilla"]["ci95"] is None
    assert set(summary["per_case"]["smoke"]["scratch_vanilla"]["0"]) == set(summary["per_case"]["smoke"]["mae"]["0"])
    assert all(len(v) == 1 and 0.0 <= v[0] <= 1.0 for v in raw.values())
    assert summary["git_commit"] and len(summary["plan_sha256"]) == 2
    assert any(k.startswith("pretrain mae") for k in summary["timings_s"])
    md = (root / "results.md").read_text()
    assert "| mae |" in md and "Command:" in md and "| arm | vs scratch | vs scratch_vanilla |" in md
    assert (root / "results.png").stat().st_size > 0
    # a rerun of the same command resumes: finished pretraining and folds are reused, results unchanged
    r2 = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert r2.returncode == 0, r2.stdout[-3000:] + r2.stderr[-3000:]
    again = json.load(open(root / "results.json"))
    assert "pretraining mae" in again["reused_from_earlier_invocation"]
    assert len(again["reused_from_earlier_invocation"]) == 5 and again["raw"] == summary["raw"]
    # the benchmark works in its own nnU-Net folders under --root
    assert (root / "nnUNet_preprocessed" / "Dataset901_DemoBrainSeg" / "splits_final.json").is_file()


def test_transfer_summary_pairs_each_method_with_both_scratch_arms():
    """Constructed per-case Dice: a method 0.05 above scratch on every case of 3 splits is "better" than it,
    and its interval against the vanilla arm (0.05 above the method, with case noise) covers the true -0.05."""
    from ssl_nnunet.benchmark.transfer import summarise
    rng = np.random.default_rng(0)
    cases = [f"case_{i}" for i in range(6)]
    base = {s: {c: 0.6 + 0.1 * rng.standard_normal() for c in cases} for s in range(3)}
    shift = lambda d, x, noise=0.0: {s: {c: v + x + noise * rng.standard_normal() for c, v in f.items()}
                                     for s, f in d.items()}
    per_case = {"b": {"scratch": base, "scratch_seed2": shift(base, 0.0, 0.02), "mae": shift(base, 0.05),
                      "scratch_vanilla": shift(base, 0.10, 0.01)}}
    raw = {"b": {arm: [float(np.mean(list(f.values()))) for f in d.values()] for arm, d in per_case["b"].items()}}
    table = summarise(raw, ["mae"], per_case)["table"]["b"]
    vs = table["paired"]["mae"]
    assert vs["scratch"]["verdict"] == "better" and vs["scratch"]["mean_difference"] == pytest.approx(0.05)
    assert vs["scratch_vanilla"]["verdict"] == "worse"
    low, high = vs["scratch_vanilla"]["ci95"]
    assert low <= -0.05 <= high and vs["scratch"]["n_cases"] == 18 and vs["scratch"]["n_folds"] == 3
    assert table["paired"]["scratch_seed2"]["scratch"]["verdict"] == "no evidence of a difference"
    assert set(table["rows"]) == {"mae", "scratch", "scratch_seed2", "scratch_vanilla"}


def test_write_docs_names_the_file_by_budget_and_links_the_other_budgets(tmp_path, monkeypatch):
    """``--write-docs``: cpu-small is results.md (with a link to every other budget's results_<budget>.md), any
    other budget writes its own results_<budget>.md/.png/.json and never touches results.md."""
    from ssl_nnunet.benchmark import transfer
    docs, root = tmp_path / "documentation", tmp_path / "bench"
    docs.mkdir()
    root.mkdir()
    monkeypatch.setattr(transfer, "documentation_folder", lambda: str(docs))
    per_case = {"b": {arm: {s: {f"case_{c}": 0.5 + 0.01 * c + 0.001 * s for c in range(3)} for s in range(3)}
                      for arm in ("mae", "scratch", "scratch_seed2", "scratch_vanilla")}}
    raw = {"b": {arm: [float(np.mean(list(f.values()))) for f in d.values()] for arm, d in per_case["b"].items()}}
    summary = transfer.summarise(raw, ["mae"], per_case)
    summary.update(budget="cpu-small-primus", profile="cpu_smoke", arch="primus_m", pretraining_iterations=2,
                   splits=3, train_cases_per_split=4, validation_cases=3, wall_time_s=60.0, command="c",
                   machine="m", git_commit="g", plan_sha256={"p": "x"}, raw=raw, vanilla_trainers={})
    transfer.write_results(summary, str(root), write_docs=True)
    assert sorted(os.listdir(docs)) == ["results_cpu-small-primus.json", "results_cpu-small-primus.md",
                                        "results_cpu-small-primus.png"]
    assert "![results](results_cpu-small-primus.png)" in (docs / "results_cpu-small-primus.md").read_text()
    summary["budget"] = "cpu-small"
    transfer.write_results(summary, str(root), write_docs=True)
    md = (docs / "results.md").read_text()
    assert "![results](results.png)" in md and "[cpu-small-primus](results_cpu-small-primus.md)" in md
    assert (docs / "results.json").is_file() and "| mae |" in md


def test_throughput_of_primus_mae_against_the_dense_primus(primus_planned):
    """On a Primus plan the floor is the dense Primus (every token) on as many volumes as the objective fed its
    encoder, and nnU-Net's Primus trainer recipe is the supervised reference."""
    from ssl_nnunet.benchmark.throughput import benchmark_method
    r = benchmark_method(primus_planned["id"], "mae", "cpu", warmup=1, timed=1, plans_identifier="sslPlans_primus_m")
    entry = primus_planned["plans"]["ssl"]["methods"]["mae"]
    assert r["network_passes"] == [f"net {[entry['batch_size'], 1] + entry['pretrain_patch_size']}"]
    assert r["ssl_step_s"] > 0 and r["plain_step_s"] > 0 and r["supervised_nnunet_step_s"] > 0
    assert r["floor_with_teacher_s"] is None


def test_transfer_budget_on_primus_refuses_a_method_without_a_primus_realisation(tmp_path):
    """The Primus budgets plan ``-arch primus_m``; a method without a Primus variant is refused before any work
    (the full pipeline of ``--budget smoke-primus`` is run by hand, documentation/benchmarks.md)."""
    from ssl_nnunet.benchmark.transfer import BUDGETS, run_transfer_benchmark
    from ssl_nnunet.methods import register, unregister
    from ssl_nnunet.methods.base import SSLMethod
    from ssl_nnunet.utilities.errors import SSLInputError
    assert BUDGETS["cpu-small-primus"].arch == "primus_m" and BUDGETS["cpu-small"].arch == "cnn"
    assert BUDGETS["cpu-small-primus"][:-1] == BUDGETS["cpu-small"][:-1][:2] + (
        {"1000 it": "nnUNet_Primus_SSLFinetune_CPU1000"},) + BUDGETS["cpu-small"][3:-1]  # the same protocol

    @register
    class CNNOnly(SSLMethod):
        name = "cnn_only_toy"
    try:
        with pytest.raises(SSLInputError, match="cnn_only_toy has no primus realisation"):
            run_transfer_benchmark(["mae", "cnn_only_toy"], "smoke-primus", str(tmp_path))
        assert not os.listdir(tmp_path)  # refused before anything was written
    finally:
        unregister("cnn_only_toy")
