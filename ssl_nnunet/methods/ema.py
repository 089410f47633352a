"""EMA teachers: one momentum schedule and one update, shared by every method that keeps a teacher.

A method declares its ``(student, teacher)`` module pairs (:meth:`SSLMethod.ema_pairs`) and its momentum range
``(μ0, μ1)`` (:meth:`SSLMethod.ema_momentum_range`); the base class's ``after_optimizer_step`` then moves every
teacher towards its student after each optimizer step:

    θ_t ← μ(i)·θ_t + (1 − μ(i))·θ_s,      μ(i) = μ1 − (μ1 − μ0)·(cos(π·i/I) + 1)/2,

over parameters and floating-point buffers (other buffers, e.g. BatchNorm's ``num_batches_tracked``, are
copied), ``I`` the run's number of optimizer steps.

Step convention: ``i`` is the number of optimizer steps *done*, so the update after step ``step`` (0-based, as
the trainer counts) uses ``i = step + 1``. Hence μ(0) = μ0 is the value before training (teacher = student at
initialisation, nothing to average yet) and the update after the run's last step uses exactly μ1, the end of
the schedule the layout names. (VoCo used ``i = step`` before, which never reaches μ1; Alice, the one method
whose default layout schedules μ, already used ``i = step + 1`` — so its default behaviour is unchanged, and
VoCo's default constant momentum does not depend on the offset.)
"""
from __future__ import annotations

import copy
import math
from typing import List, Tuple

import torch
from torch import nn

__all__ = ["cosine_momentum", "frozen_copy", "paired_tensors", "ema_update"]


def cosine_momentum(steps_done: int, total_steps: int, start: float, end: float) -> float:
    """``μ(i) = end − (end − start)·(cos(π·i/I) + 1)/2`` with ``i = steps_done`` clamped to ``[0, I]``,
    ``I = max(total_steps, 1)``: ``start`` at i = 0, ``end`` at i = I, constant when ``start == end``."""
    total = max(int(total_steps), 1)
    frac = min(max(steps_done, 0), total) / total
    return end - (end - start) * (math.cos(math.pi * frac) + 1.0) / 2.0


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` with ``requires_grad = False`` on every parameter (so the trainer's optimizer,
    which takes the parameters that require grad, never sees it): the initial state of an EMA teacher."""
    return copy.deepcopy(module).requires_grad_(False)


def paired_tensors(student: nn.Module, teacher: nn.Module) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``(student tensor, teacher tensor)`` for every parameter, then every buffer, matched by name.

    ``named_parameters`` / ``named_buffers`` visit an aliased (tied) tensor once, so it is averaged once (a
    state dict lists it under each of its names). Raises ``RuntimeError`` when the two modules' tensor names
    differ (the teacher is not a copy of the student).
    """
    pairs = []
    for s_items, t_items in ((student.named_parameters(), teacher.named_parameters()),
                             (student.named_buffers(), teacher.named_buffers())):
        s_items, t_items = list(s_items), list(t_items)
        if [n for n, _ in s_items] != [n for n, _ in t_items]:
            raise RuntimeError(f"EMA pair: teacher {type(teacher).__name__} and student {type(student).__name__} "
                               f"have different parameter/buffer names")
        pairs += [(s, t) for (_, s), (_, t) in zip(s_items, t_items)]
    return pairs


@torch.no_grad()
def ema_update(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """``θ_t ← μ·θ_t + (1 − μ)·θ_s`` in place on ``teacher`` (μ = ``momentum``) for parameters and floating-point
    buffers; other buffers are copied. μ = 1 leaves the teacher bit-exactly unchanged, μ = 0 copies the student."""
    for s, t in paired_tensors(student, teacher):
        if t.is_floating_point():
            t.lerp_(s.detach().to(t.dtype), 1.0 - momentum)
        else:
            t.copy_(s)
