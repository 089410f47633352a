"""The shared EMA machinery (ssl_nnunet/methods/ema.py and the SSLMethod hooks): schedule, update, declared pairs."""
import math

import pytest
import torch
from torch import nn

from ssl_nnunet.methods.base import SSLMethod
from ssl_nnunet.methods.ema import cosine_momentum, ema_update, frozen_copy, paired_tensors


def test_cosine_momentum_start_end_midpoint_and_clamping():
    assert cosine_momentum(0, 100, 0.9, 1.0) == pytest.approx(0.9)
    assert cosine_momentum(100, 100, 0.9, 1.0) == pytest.approx(1.0)
    assert cosine_momentum(50, 100, 0.9, 1.0) == pytest.approx(0.95)
    assert cosine_momentum(25, 100, 0.9, 1.0) == pytest.approx(1.0 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)
    assert cosine_momentum(-3, 100, 0.9, 1.0) == pytest.approx(0.9)     # clamped to [0, I]
    assert cosine_momentum(250, 100, 0.9, 1.0) == pytest.approx(1.0)
    assert cosine_momentum(7, 100, 0.8, 0.8) == pytest.approx(0.8)      # constant momentum
    assert cosine_momentum(0, 0, 0.5, 1.0) == pytest.approx(0.5)        # no steps: no division by zero
    values = [cosine_momentum(i, 20, 0.5, 1.0) for i in range(21)]
    assert all(a < b for a, b in zip(values, values[1:]))                # increasing from start to end


class _Toy(SSLMethod):
    name = "toy_ema"

    def __init__(self, momentum=(0.5, 1.0)):
        nn.Module.__init__(self)
        self.student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        self.teacher = frozen_copy(self.student)
        self.momentum = momentum

    def ema_pairs(self):
        return [(self.student, self.teacher)]

    def ema_momentum_range(self):
        return self.momentum


def test_step_offset_the_update_after_step_k_uses_k_plus_one_steps_done():
    m = _Toy()
    assert m.ema_momentum_at(-1, 10) == pytest.approx(0.5)               # before training: mu0
    assert m.ema_momentum_at(0, 10) == pytest.approx(cosine_momentum(1, 10, 0.5, 1.0))
    assert m.ema_momentum_at(4, 10) == pytest.approx(0.75)               # after 5 of 10 steps: the midpoint
    assert m.ema_momentum_at(9, 10) == pytest.approx(1.0)                # after the last step: mu1


def test_after_optimizer_step_updates_declared_pairs_and_teacher_has_no_gradient():
    m = _Toy()
    assert not any(p.requires_grad for p in m.teacher.parameters())
    assert all(p.requires_grad for p in m.student.parameters())
    with torch.no_grad():
        for p in m.student.parameters():
            p.add_(1.0)
    m.student.train()(torch.randn(8, 3))                                 # running stats and counter move
    before = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    student = m.student.state_dict()
    mu = m.ema_momentum_at(4, 10)
    m.after_optimizer_step(4, 10)
    for k, v in m.teacher.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, mu * before[k] + (1 - mu) * student[k])
        else:                                                            # num_batches_tracked: copied
            assert torch.equal(v, student[k]) and not torch.equal(v, before[k])
    m.after_optimizer_step(9, 10)                                        # mu = 1: teacher unchanged
    after = {k: v.clone() for k, v in m.teacher.state_dict().items()}
    m.after_optimizer_step(9, 10)
    assert all(torch.equal(v, after[k]) for k, v in m.teacher.state_dict().items())


def test_ema_extremes_and_tied_weights_are_averaged_once():
    student = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    student[1].weight = student[0].weight                                # tied: one tensor, two names
    teacher = frozen_copy(student)
    assert teacher[1].weight is teacher[0].weight                        # deepcopy keeps the tie
    assert len(paired_tensors(student, teacher)) == 1
    with torch.no_grad():
        teacher[0].weight.zero_()
        student[0].weight.fill_(1.0)
    ema_update(student, teacher, 0.5)
    assert torch.equal(teacher[0].weight, torch.full((4, 4), 0.5))      # once, not 0.75
    ema_update(student, teacher, 1.0)
    assert torch.equal(teacher[0].weight, torch.full((4, 4), 0.5))
    ema_update(student, teacher, 0.0)
    assert torch.equal(teacher[0].weight, student[0].weight)


def test_mismatched_pair_is_rejected_and_methods_without_pairs_do_nothing():
    with pytest.raises(RuntimeError):
        paired_tensors(nn.Linear(3, 4), nn.Sequential(nn.Linear(3, 4)))
    plain = SSLMethod.__new__(SSLMethod)
    nn.Module.__init__(plain)
    assert plain.ema_pairs() == []
    plain.after_optimizer_step(0, 10)                                    # no pairs: no momentum range needed
