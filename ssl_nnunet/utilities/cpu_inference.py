"""Fast batch-1 3D convolutions on CPU for nnU-Net's sliding-window inference.

nnU-Net predicts one patch at a time (batch 1). For such inputs PyTorch's CPU convolution picks its
oneDNN (mkldnn) kernel only when ``N*C*D*H > 20480`` (a heuristic written for 2D images), so the wide,
shallow full-resolution stages of a small 3D U-Net (e.g. 8 channels at 32³: 1*8*32*32 = 8192) run through
the generic ``slow_conv3d`` kernel instead — about 10x slower per patch on a 2-core machine (measured:
8->8 channels at 32³, 26 ms vs 2.5 ms). nnU-Net's final validation of a CPU fine-tuning run therefore spent
most of its time in these convolutions.

``onednn_conv3d_inference(network)`` routes every ``nn.Conv3d`` of ``network`` to oneDNN while gradients are
off (inference) for fp32 CPU inputs; the result is the same convolution (agreement ~1e-6, float round-off).
Training, CUDA, other dtypes and ``padding_mode != 'zeros'`` keep PyTorch's own dispatch. The original
forward is restored on exit.
"""
from __future__ import annotations

import contextlib
import types
from typing import Iterator

import torch
from torch import nn


def _onednn_conv_forward(self: nn.Conv3d, x: torch.Tensor, weight: torch.Tensor, bias):
    if (torch.is_grad_enabled() or x.device.type != "cpu" or x.dtype != torch.float32
            or self.padding_mode != "zeros" or isinstance(self.padding, str)):
        return nn.Conv3d._conv_forward(self, x, weight, bias)
    return torch.mkldnn_convolution(x.contiguous(), weight.contiguous(), bias, self.padding, self.stride,
                                    self.dilation, self.groups)


@contextlib.contextmanager
def onednn_conv3d_inference(network: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Within the block, ``network``'s 3D convolutions use oneDNN for fp32 CPU inference (see module doc)."""
    convs = [m for m in network.modules() if isinstance(m, nn.Conv3d)] \
        if enabled and torch.backends.mkldnn.is_available() else []
    for m in convs:
        m._conv_forward = types.MethodType(_onednn_conv_forward, m)  # instance attribute shadows the class's
    try:
        yield network
    finally:
        for m in convs:
            m.__dict__.pop("_conv_forward", None)


class CPUValidationMixin:
    """For nnU-Net trainers: run ``perform_actual_validation`` (nnU-Net's own sliding-window validation) with
    oneDNN convolutions when the trainer runs on CPU. Nothing changes on CUDA."""

    def perform_actual_validation(self, save_probabilities: bool = False):
        with onednn_conv3d_inference(self.network, enabled=self.device.type == "cpu"):
            return super().perform_actual_validation(save_probabilities)
