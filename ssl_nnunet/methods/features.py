"""Feature taps on dynamic-network-architectures U-Nets (METHODS.md §2.1).

Supported: ``ResidualEncoderUNet`` (encoder with ``stem``) and ``PlainConvUNet`` (no stem; stage 0 holds the
first convs), both with the standard ``UNetDecoder`` (``transpconvs``, ``stages``, ``seg_layers``). The loops
of encoder and decoder are re-implemented here (no forward hooks), so every stage output is returned.

Shapes (3D; K encoder stages, cumulative stride ``s_k`` of stage k, ``C_k = features_per_stage[k]``):
    x     (B, C_in, a0, a1, a2)
    e_k   (B, C_k, a0/s_k0, a1/s_k1, a2/s_k2),                    k = 0 .. K-1      (``enc``)
    d_j   (B, C_{K-2-j}, a/s_{K-2-j}),                             j = 0 .. K-2      (``dec``)
    out   (B, num_classes, a0, a1, a2) = ``decoder.seg_layers[-1](d_{K-2})``
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ssl_nnunet.methods.masking import expand_mask

__all__ = [
    "SPARSE_CONTEXT_ATTR",
    "check_unet",
    "cumulative_strides",
    "encoder_forward",
    "decoder_forward",
    "forward_features",
]

#: attribute of ``net.encoder`` under which ``ssl_nnunet.methods.sparse`` stores the network's mask context
SPARSE_CONTEXT_ATTR = "_ssl_sparse_ctx"

Densify = Callable[[List[torch.Tensor], Optional[torch.Tensor]], List[torch.Tensor]]


def check_unet(net: nn.Module) -> None:
    """Raise ``TypeError`` unless ``net`` has the encoder/decoder layout this module relies on."""
    enc = getattr(net, "encoder", None)
    dec = getattr(net, "decoder", None)
    if enc is None or not hasattr(enc, "stages") or not hasattr(enc, "strides"):
        raise TypeError(f"{type(net).__name__} has no dynamic-network-architectures U-Net encoder "
                        f"(expected net.encoder.stages / net.encoder.strides)")
    if dec is None or not all(hasattr(dec, a) for a in ("transpconvs", "stages", "seg_layers")):
        raise TypeError(f"{type(net).__name__} has no UNetDecoder (expected net.decoder.transpconvs / stages / "
                        f"seg_layers)")
    if len(dec.stages) != len(enc.stages) - 1:
        raise TypeError(f"decoder has {len(dec.stages)} stages for an encoder with {len(enc.stages)} stages")


def cumulative_strides(net_or_strides) -> List[Tuple[int, ...]]:
    """Cumulative stride ``s_k`` (per axis) of every encoder stage.

    Args:
        net_or_strides: a U-Net (its ``encoder.strides`` is used) or a list of per-stage strides
            (ints or per-axis lists, as in nnU-Net plans).
    """
    strides = net_or_strides.encoder.strides if isinstance(net_or_strides, nn.Module) else net_or_strides
    strides = list(strides)
    ndim = next((len(s) for s in strides if isinstance(s, (list, tuple))), 3)
    acc = [1] * ndim
    out = []
    for s in strides:
        s = [int(s)] * ndim if not isinstance(s, (list, tuple)) else [int(v) for v in s]
        acc = [a * v for a, v in zip(acc, s)]
        out.append(tuple(acc))
    return out


def run_encoder(encoder: nn.Module, x: torch.Tensor, num_stages: Optional[int] = None) -> List[torch.Tensor]:
    """Outputs ``[e_0, ..., e_{k-1}]`` of the first ``num_stages`` stages (all by default) of a U-Net encoder
    (or a copy of one, e.g. an EMA teacher) for input ``x (B, C_in, a0, a1, a2)``; the stem runs first, if any."""
    stem = getattr(encoder, "stem", None)
    if stem is not None:
        x = stem(x)
    skips = []
    for stage in encoder.stages[:num_stages]:
        x = stage(x)
        skips.append(x)
    return skips


def encoder_forward(net: nn.Module, x: torch.Tensor) -> List[torch.Tensor]:
    """Encoder skips ``[e_0, ..., e_{K-1}]`` of ``net.encoder`` for input ``x (B, C_in, a0, a1, a2)``."""
    return run_encoder(net.encoder, x)


def decoder_forward(net: nn.Module, skips: Sequence[torch.Tensor]) -> Tuple[List[torch.Tensor], torch.Tensor]:
    """Run ``UNetDecoder``'s loop on ``skips`` and return ``([d_0, ..., d_{K-2}], out)``.

    ``d_j = stages[j](cat(transpconvs[j](d_{j-1}), e_{K-2-j}))`` with ``d_{-1} = e_{K-1}``;
    ``out = seg_layers[-1](d_{K-2})`` (the full-resolution head, whatever ``deep_supervision`` says).
    """
    dec = net.decoder
    lres = skips[-1]
    outs = []
    for j in range(len(dec.stages)):
        h = dec.transpconvs[j](lres)
        h = torch.cat((h, skips[-(j + 2)]), dim=1)
        h = dec.stages[j](h)
        outs.append(h)
        lres = h
    out = dec.seg_layers[-1](outs[-1])
    return outs, out


def forward_features(net: nn.Module, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                     densify: Optional[Densify] = None
                     ) -> Tuple[List[torch.Tensor], List[torch.Tensor], torch.Tensor]:
    """Full U-Net forward returning every encoder and decoder stage output.

    Args:
        net: ``ResidualEncoderUNet`` or ``PlainConvUNet`` (see module docstring).
        x: ``(B, C_in, a0, a1, a2)``.
        mask: optional low-resolution block mask ``(B, 1, n0, n1, n2)`` (1 = visible). Only for networks
            converted with :func:`ssl_nnunet.methods.sparse.convert_encoder_to_sparse`: the input is zeroed at
            hidden voxels and the encoder runs with the mask active (SparK-style sparse encoder). With
            ``mask=None`` the forward is the plain dense forward (for a converted network too).
        densify: optional callable ``densify(skips, mask) -> skips`` applied to the encoder outputs before
            decoding (e.g. :class:`ssl_nnunet.methods.sparse.Densify`). ``enc`` holds the skips *before*
            densification.

    Returns:
        ``(enc, dec, out)``: ``enc = [e_0 .. e_{K-1}]``, ``dec = [d_0 .. d_{K-2}]``,
        ``out (B, num_classes, a0, a1, a2)``.
    """
    check_unet(net)
    if mask is None:
        enc = encoder_forward(net, x)
    else:
        ctx = getattr(net.encoder, SPARSE_CONTEXT_ATTR, None)
        if ctx is None:
            raise ValueError("forward_features got a mask but the network's encoder is not sparse; call "
                             "ssl_nnunet.methods.sparse.convert_encoder_to_sparse(net) first (or feed x * mask to "
                             "the plain network for the dense variant)")
        m = expand_mask(mask.to(x.device), x.shape[2:])
        x = torch.where(m.to(torch.bool), x, x.new_zeros(()))
        with ctx.active(mask):
            enc = encoder_forward(net, x)
    skips = densify(enc, mask) if densify is not None else enc
    dec, out = decoder_forward(net, skips)
    return enc, dec, out
