"""``ssl_nnunet_benchmark throughput``: SSL step time vs. the network's own forward+backward.

For each method, in one process and after warm-up, on the plan of the given dataset:
* ``ssl_step_s``: median seconds of a full SSL training iteration (data from the prefetching loader, views,
  forward, loss, backward, optimizer step);
* ``plain_step_s``: the floor — median seconds of plain dense passes of the *same* network on the *same*
  tensors the method fed it in one SSL step (recorded with hooks: full U-Net or encoder only, with or without
  autograd), one backward and an optimizer step. The objective cannot be faster than its own network passes;
* ``ratio`` = ssl / plain; ``data_wait_share``: share of SSL step time spent waiting for the loader;
* ``supervised_nnunet_step_s``: nnU-Net's own ``train_step`` (deep supervision, Dice+CE) of the plan's network,
  patch and batch size, for reference;
* peak memory: RSS of the process on CPU, ``torch.cuda.max_memory_allocated`` on CUDA.
"""
from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import tempfile
import time
from typing import Dict, List, Tuple

import torch

from ssl_nnunet.utilities.file_io import atomic_save_json, atomic_write_text


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


def _first_module(encoder: torch.nn.Module) -> torch.nn.Module:
    return encoder.stem if getattr(encoder, "stem", None) is not None else encoder.stages[0]


def teacher_encoders(trainer) -> List[torch.nn.Module]:
    """Encoders the method runs besides the network's own: the EMA teachers the method declares
    (:meth:`SSLMethod.ema_pairs`) that are encoders, i.e. have ``stages`` like the network's encoder."""
    return [teacher for _student, teacher in trainer.method.ema_pairs()
            if isinstance(getattr(teacher, "stages", None), torch.nn.Module)]


def _count_teacher_stage(teacher_calls: List[list], teacher: torch.nn.Module, n_stages: int) -> None:
    """The latest pass of ``teacher`` reached stage ``n_stages`` (1-based)."""
    for c in reversed(teacher_calls):
        if c[0] is teacher:
            c[2] = max(c[2], n_stages)
            return


def record_network_passes(trainer, step_fn) -> Tuple[List[Tuple[torch.Tensor, bool, bool]], List[Tuple]]:
    """Run ``step_fn`` once and record every pass through ``trainer.network``: ``(input, full, grad)``, and every
    pass through a teacher encoder of the method (:func:`teacher_encoders`): ``(teacher, input, n_stages)``.

    An encoder pass is detected at the encoder's first module (stem or stage 0), a full U-Net pass by the
    decoder's last stage running after it; ``grad`` is whether autograd was on. A teacher pass records how many
    of the teacher's stages ran (a teacher may stop before its last stage). Heads are the method's own work and are part
    of neither floor.
    """
    net = trainer.network
    calls: List[list] = []
    teacher_calls: List[list] = []
    from ssl_nnunet.backbones.primus import is_primus
    if is_primus(net):
        return _record_primus_passes(trainer, step_fn), []

    def on_encoder(_module, args):
        calls.append([args[0].detach().clone(), False, torch.is_grad_enabled()])

    def on_decoder(_module, _args, _out):
        for c in reversed(calls):
            if not c[1]:
                c[1] = True
                break

    hooks = [_first_module(net.encoder).register_forward_pre_hook(on_encoder),
             net.decoder.stages[-1].register_forward_hook(on_decoder)]
    for teacher in teacher_encoders(trainer):
        hooks.append(_first_module(teacher).register_forward_pre_hook(
            lambda _m, args, t=teacher: teacher_calls.append([t, args[0].detach().clone(), 0])))
        for i, stage in enumerate(teacher.stages):
            hooks.append(stage.register_forward_hook(
                lambda _m, _a, _o, t=teacher, n=i + 1: _count_teacher_stage(teacher_calls, t, n)))
    try:
        step_fn()
    finally:
        for h in hooks:
            h.remove()
    return [tuple(c) for c in calls], [tuple(c) for c in teacher_calls]


def _record_primus_passes(trainer, step_fn) -> List[Tuple[torch.Tensor, bool, bool]]:
    """Primus: every pass through the network's EVA encoder, seen at its first block (the objectives feed it
    visible tokens only, ``(B, K, E)``), recorded as a *dense* full pass of ``B`` volumes of the plan's patch —
    the floor is the whole Primus on every token (the masked-vs-dense ratio of issue 18). Passes of EMA teacher
    copies are the method's own work here (no teacher floor for Primus)."""
    net = trainer.network
    patch = [int(p) for p in trainer.configuration_manager.patch_size]
    channels = int(net.down_projection.proj.in_channels)
    calls: List[list] = []

    def on_block(_module, args, _kwargs):
        x = args[0]
        calls.append([torch.randn(x.shape[0], channels, *patch, device=x.device), True, torch.is_grad_enabled()])

    hook = net.eva.blocks[0].register_forward_pre_hook(on_block, with_kwargs=True)
    try:
        step_fn()
    finally:
        hook.remove()
    return [tuple(c) for c in calls]


def make_floor_step(net: torch.nn.Module, calls, optimizer_plan: dict, grad_clip: float, teacher_calls=(),
                    autocast=contextlib.nullcontext):
    """A plain step over the recorded passes: dense forward of the full U-Net or the encoder on each recorded
    input (without autograd where the method had none), one backward of the summed output means, gradient
    clipping and a step of the method's own optimizer type (so the ratio isolates the method's extra work).
    ``teacher_calls`` (see :func:`record_network_passes`) are replayed without autograd through the same teacher
    modules and stages. ``autocast``: the trainer's autocast context factory, so on CUDA both steps run in the
    same precision."""
    from ssl_nnunet.methods.features import encoder_forward, run_encoder
    from ssl_nnunet.training.schedule import build_optimizer
    params = [p for p in net.parameters() if p.requires_grad]
    opt = build_optimizer(params, dict(optimizer_plan, lr=1e-6))

    def plain_step():
        opt.zero_grad(set_to_none=True)
        with torch.no_grad(), autocast():
            for teacher, x, n_stages in teacher_calls:
                run_encoder(teacher, x, n_stages)
        loss = None
        for x, full, grad in calls:
            with torch.set_grad_enabled(grad), autocast():
                outs = [net(x)] if full else encoder_forward(net, x)
            if grad:
                term = sum(o.float().mean() for o in outs)
                loss = term if loss is None else loss + term
        if loss is not None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
    return plain_step


def supervised_nnunet_step_time(trainer, warmup: int, timed: int) -> float:
    """Median seconds of nnU-Net's own ``nnUNetTrainer.train_step`` (deep supervision, Dice+CE, SGD, grad
    clipping; AMP on CUDA) for the plan's network, patch and batch size on random two-class labels — a
    supervised iteration without data loading, for reference. A Primus plan uses nnU-Net's Primus trainer
    recipe (``AbstractPrimus``: AdamW, no deep supervision) through our CPU variant, which builds the plan's
    Primus (:data:`ssl_nnunet.backbones.primus.PRIMUS_CPU_TRAINER`)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from ssl_nnunet.backbones.primus import is_primus
    if is_primus(trainer.network):
        import importlib
        import sys as _sys
        from ssl_nnunet.backbones.primus import PRIMUS_CPU_TRAINER
        from ssl_nnunet.nnunet_trainers import trainer_dir
        if trainer_dir() not in _sys.path:
            _sys.path.append(trainer_dir())
        nnUNetTrainer = getattr(importlib.import_module(PRIMUS_CPU_TRAINER), PRIMUS_CPU_TRAINER)  # noqa: N806
    os.environ.setdefault("nnUNet_compile", "f")
    dataset_json = dict(trainer.dataset_json, labels={"background": 0, "foreground": 1})
    plans = dict(trainer.plans_manager.plans, continue_training=False)  # nnunetv2 2.8.1 pops this key
    old_results = os.environ.get("nnUNet_results")
    with tempfile.TemporaryDirectory() as tmp:
        # nnU-Net's trainer writes a results folder and log; keep them out of the user's nnUNet_results
        os.environ["nnUNet_results"] = tmp
        try:
            ref = nnUNetTrainer(plans, trainer.configuration_name, 0, dataset_json, trainer.device)
            ref.initialize()
            ref.print_to_log_file = lambda *a, **k: None
        finally:
            if old_results is None:
                os.environ.pop("nnUNet_results", None)
            else:
                os.environ["nnUNet_results"] = old_results
    dev = trainer.device
    patch = [int(p) for p in trainer.configuration_manager.patch_size]
    b = int(trainer.configuration_manager.batch_size)
    g = torch.Generator().manual_seed(0)
    data = torch.randn((b, ref.num_input_channels, *patch), generator=g)
    seg = (torch.rand((b, 1, *patch), generator=g) > 0.5).float()
    scales = ref._get_deep_supervision_scales()  # None without deep supervision (a Primus)
    target = []
    for scale in scales or []:
        step = [max(1, round(1 / s)) for s in scale]
        target.append(seg[:, :, ::step[0], ::step[1], ::step[2]].contiguous())
    batch = {"data": data, "target": target if scales else seg}
    _time(lambda: ref.train_step(batch), warmup, dev)
    return statistics.median(_time(lambda: ref.train_step(batch), timed, dev))


def benchmark_method(dataset, method: str, device: str = "cpu", warmup: int = 3, timed: int = 10,
                     plans_identifier: str = "sslPlans") -> Dict:
    from ssl_nnunet.training.run import build_trainer
    from ssl_nnunet.training.ssl_trainer import amp_dtype_name
    trainer = build_trainer(dataset, method, plans_identifier, device=device, iterations=10 ** 6, num_prefetch=2)
    trainer.disable_checkpointing = True
    trainer.on_train_start()
    dev = trainer.device
    trainer._consecutive_nonfinite = 0
    state = {"it": 0}

    def ssl_step():
        trainer.train_step(next(trainer.dataloader_train), state["it"])
        state["it"] += 1

    # the floor: the same network's passes on the same tensors the method fed it in one SSL step
    calls, teacher_calls = record_network_passes(trainer, ssl_step)
    opt_plan = trainer.method_plan["optimizer"]
    plain_step = make_floor_step(trainer.network, calls, opt_plan, trainer.grad_clip, autocast=trainer._autocast)
    # second floor: the same plus the method's teacher-encoder passes (no autograd), where it has a teacher
    full_step = make_floor_step(trainer.network, calls, opt_plan, trainer.grad_clip, teacher_calls,
                                autocast=trainer._autocast) \
        if teacher_calls else None
    steps = [ssl_step, plain_step] + ([full_step] if full_step else [])
    for fn in steps:
        _time(fn, warmup, dev)
    # interleaved, so that drifts of the machine's speed hit all measurements alike
    times = [[] for _ in steps]
    wait = 0.0
    try:
        for _ in range(timed):
            wait0 = trainer.dataloader_train.wait_time
            for fn, out in zip(steps, times):
                out += _time(fn, 1, dev)
            wait += trainer.dataloader_train.wait_time - wait0
    finally:
        trainer.dataloader_train.close()
    supervised_s = supervised_nnunet_step_time(trainer, warmup, timed)
    ssl_s, plain_s = statistics.median(times[0]), statistics.median(times[1])
    teacher_s = statistics.median(times[2]) if full_step else None
    passes = [f"{'net' if full else 'enc'}{'' if grad else '(no grad)'} {list(x.shape)}" for x, full, grad in calls]
    passes += [f"teacher enc[:{k}](no grad) {list(x.shape)}" for _t, x, k in teacher_calls]
    return {"method": method, "device": str(dev), "amp": amp_dtype_name(trainer.amp_dtype) or "off",
            "network_passes": passes,
            "ssl_step_s": ssl_s, "plain_step_s": plain_s, "ratio": ssl_s / plain_s,
            "floor_with_teacher_s": teacher_s, "ratio_with_teacher": ssl_s / teacher_s if teacher_s else None,
            "supervised_nnunet_step_s": supervised_s,
            "data_wait_share": wait / sum(times[0]), "peak_memory_mb": _peak_memory_mb(dev),
            "timed_iterations": timed, "warmup_iterations": warmup,
            "profile": trainer.ssl_plan.get("profile"), "patch_size": trainer.configuration_manager.patch_size}


def write_report(results: List[Dict], json_path: str, md_path: str, command: str) -> None:
    atomic_save_json({"command": command, "machine": platform.platform(), "torch": torch.__version__,
                      "threads": torch.get_num_threads(), "results": results}, json_path)
    lines = [
        "# Throughput benchmark", "",
        f"Command: `{command}`  ",
        f"Machine: {platform.platform()}, torch {torch.__version__}, {torch.get_num_threads()} threads. "
        "Medians of the timed iterations after warm-up (SSL and floor steps interleaved), measured in one process run.", "",
        "| method | device | profile | network passes per SSL step | SSL step [s] | own passes (floor) [s] | ratio "
        "| floor incl. teacher passes [s] | ratio incl. teacher | nnU-Net supervised step [s] | data wait "
        "| peak mem [MB] |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        lines.append(f"| {r['method']} | {r['device']} | {r['profile']} | {'; '.join(r['network_passes'])} | "
                     f"{r['ssl_step_s']:.3f} | {r['plain_step_s']:.3f} | {r['ratio']:.2f} | "
                     + (f"{r['floor_with_teacher_s']:.3f} | {r['ratio_with_teacher']:.2f} | "
                        if r.get("floor_with_teacher_s") else "– | – | ") +
                     f"{r['supervised_nnunet_step_s']:.3f} | "
                     f"{100 * r['data_wait_share']:.1f} % | {r['peak_memory_mb']:.0f} |")
    atomic_write_text(md_path, "\n".join(lines) + "\n")

