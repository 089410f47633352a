"""SparK-style sparse masking of a dynamic-network-architectures CNN encoder (METHODS.md §2.3, "our spec").

:func:`convert_encoder_to_sparse` changes the *class* of the encoder's modules in place (``__class__``
swap to a subclass), so no module is wrapped or renamed: parameter names, buffers and ``state_dict`` keys
stay exactly those of the plain network and the exported weights load into a freshly built plain U-Net with
``strict=True``.

* every ``ConvNd`` (residual shortcut 1x1 convs included) and every ``AvgPoolNd`` / ``MaxPoolNd`` multiplies its
  output ``(B, C, f0, f1, f2)`` by the current mask expanded to ``(B, 1, f0, f1, f2)``;
* every ``InstanceNormNd`` becomes a sparse instance norm: per sample and channel, mean and variance over the
  visible positions only (masked sums, eps of the module), original affine, zeros at hidden positions.

The mask is re-applied only on maps whose cumulative stride divides the unit on every axis (detected from the
map size: ``f_ax % n_ax == 0``); coarser maps are computed densely. The current mask lives in a
:class:`SparseMaskContext` object owned by the converted network (``net.encoder._ssl_sparse_ctx``), never in a
module-level global. Outside :meth:`SparseMaskContext.active` (mask ``None``) every converted module runs
exactly its plain forward, so a converted network is bit-for-bit the plain network when no mask is set.

Caveat: activation checkpointing that re-runs the encoder forward during backward (outside the ``active``
block) would recompute it densely; nnU-Net networks do not use it.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Type

import torch
import torch.nn.functional as F
from torch import nn

from ssl_nnunet.methods.features import (SPARSE_CONTEXT_ATTR, check_unet, cumulative_strides,
                                         forward_features)
from ssl_nnunet.methods.masking import mask_at_resolution

__all__ = [
    "SparseMaskContext",
    "convert_encoder_to_sparse",
    "get_sparse_context",
    "is_sparse",
    "sparse_instance_norm",
    "derive_remask_strides",
    "Densify",
    "sparse_masked_forward",
]


class SparseMaskContext:
    """Holds the mask of the current masked forward of one converted network.

    ``mask`` is the low-resolution unit mask ``(B, 1, n0, n1, n2)`` (1 = visible) or ``None`` (dense).
    Expanded masks are cached per spatial size for the duration of one :meth:`active` block.
    """

    def __init__(self) -> None:
        self.mask: Optional[torch.Tensor] = None
        self._cache: Dict[Tuple[int, ...], Optional[torch.Tensor]] = {}

    @contextlib.contextmanager
    def active(self, mask: Optional[torch.Tensor]) -> Iterator["SparseMaskContext"]:
        """Use ``mask (B, 1, n0, n1, n2)`` for every converted module inside the ``with`` block (re-entrant)."""
        if mask is not None and (mask.dim() < 3 or mask.shape[1] != 1):
            raise ValueError(f"expected a unit mask of shape (B, 1, n0, n1, n2), got {tuple(mask.shape)}")
        prev = (self.mask, self._cache)
        self.mask, self._cache = mask, {}
        try:
            yield self
        finally:
            self.mask, self._cache = prev

    def mask_for(self, feature: torch.Tensor) -> Optional[torch.Tensor]:
        """Mask ``(B, 1, f0, f1, f2)`` for ``feature (B, C, f0, f1, f2)``; ``None`` if no mask is active or the
        map is coarser than the unit on some axis (dense)."""
        if self.mask is None:
            return None
        shape = tuple(feature.shape[2:])
        if shape not in self._cache:
            if feature.shape[0] != self.mask.shape[0]:
                raise ValueError(f"batch size of the feature map ({feature.shape[0]}) and of the active mask "
                                 f"({self.mask.shape[0]}) differ")
            m = mask_at_resolution(self.mask, shape)
            self._cache[shape] = None if m is None else m.to(feature.device)
        return self._cache[shape]

    def apply(self, feature: torch.Tensor) -> torch.Tensor:
        """``feature * mask`` at the feature's resolution (unchanged where the map is dense)."""
        m = self.mask_for(feature)
        return feature if m is None else feature * m.to(feature.dtype)


def sparse_instance_norm(x: torch.Tensor, mask: torch.Tensor, weight: Optional[torch.Tensor] = None,
                         bias: Optional[torch.Tensor] = None, eps: float = 1e-5) -> torch.Tensor:
    """Instance norm over the visible positions only (METHODS §2.3 (c)).

    ``mu = sum(m x) / sum(m)``, ``var = sum(m (x - mu)^2) / sum(m)`` per sample and channel (float32), output
    ``((x - mu) / sqrt(var + eps)) * weight + bias`` at visible positions and exactly 0 at hidden ones.
    Visible counts may differ between samples; a sample with no visible position gives zeros.

    Args:
        x: ``(B, C, f0, f1, f2)``.
        mask: ``(B, 1, f0, f1, f2)`` in {0, 1}.
        weight, bias: optional affine parameters ``(C,)``.
    Returns:
        ``(B, C, f0, f1, f2)`` in ``x.dtype``.
    """
    dims = tuple(range(2, x.dim()))
    mf = mask.to(device=x.device, dtype=torch.float32)
    xm = x.float() * mf
    count = mf.sum(dim=dims, keepdim=True).clamp_min(1.0)
    mean = xm.sum(dim=dims, keepdim=True) / count
    # var = E_m[x^2] - mean^2 over the visible positions; the per-(sample, channel) affine of the normalisation
    # is folded into one scale and shift so that only two full-size ops follow (fewer kernels, less memory)
    var = ((xm * xm).sum(dim=dims, keepdim=True) / count - mean * mean).clamp_min(0.0)
    scale = torch.rsqrt(var + eps)
    shape = (1, -1) + (1,) * (x.dim() - 2)
    if weight is not None:
        scale = scale * weight.float().view(shape)
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias.float().view(shape)
    y = torch.addcmul(shift, xm, scale) * mf
    return y.to(x.dtype)


# ------------------------------------------------------------------------------------------------------------
# converted module classes (same __init__/parameters as their bases; only forward differs)

class _MaskedOutput:
    """Mixin: run the base class' forward, then re-apply the active mask to the output.

    ``_ssl_mask_output = False`` (set by :func:`convert_encoder_to_sparse` on a conv whose output goes straight
    into a sparse instance norm) skips the multiply: the norm masks its input before taking statistics and
    masks its output, so the result is bit-identical and one full-size op per conv is saved."""

    _ssl_sparse_ctx: SparseMaskContext
    _ssl_mask_output: bool = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        y = super().forward(x)
        return self._ssl_sparse_ctx.apply(y) if self._ssl_mask_output else y


class _SparseIN:
    """Mixin for ``nn.InstanceNormNd``: sparse statistics while a mask is active at this resolution."""

    _ssl_sparse_ctx: SparseMaskContext

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        m = self._ssl_sparse_ctx.mask_for(x)
        if m is None:
            return super().forward(x)
        return sparse_instance_norm(x, m, self.weight, self.bias, self.eps)


class SparseConv1d(_MaskedOutput, nn.Conv1d):
    pass


class SparseConv2d(_MaskedOutput, nn.Conv2d):
    pass


class SparseConv3d(_MaskedOutput, nn.Conv3d):
    pass


class SparseAvgPool1d(_MaskedOutput, nn.AvgPool1d):
    pass


class SparseAvgPool2d(_MaskedOutput, nn.AvgPool2d):
    pass


class SparseAvgPool3d(_MaskedOutput, nn.AvgPool3d):
    pass


class SparseMaxPool1d(_MaskedOutput, nn.MaxPool1d):
    pass


class SparseMaxPool2d(_MaskedOutput, nn.MaxPool2d):
    pass


class SparseMaxPool3d(_MaskedOutput, nn.MaxPool3d):
    pass


class SparseInstanceNorm1d(_SparseIN, nn.InstanceNorm1d):
    pass


class SparseInstanceNorm2d(_SparseIN, nn.InstanceNorm2d):
    pass


class SparseInstanceNorm3d(_SparseIN, nn.InstanceNorm3d):
    pass


_CONVERSION: Dict[Type[nn.Module], Type[nn.Module]] = {
    nn.Conv1d: SparseConv1d, nn.Conv2d: SparseConv2d, nn.Conv3d: SparseConv3d,
    nn.AvgPool1d: SparseAvgPool1d, nn.AvgPool2d: SparseAvgPool2d, nn.AvgPool3d: SparseAvgPool3d,
    nn.MaxPool1d: SparseMaxPool1d, nn.MaxPool2d: SparseMaxPool2d, nn.MaxPool3d: SparseMaxPool3d,
    nn.InstanceNorm1d: SparseInstanceNorm1d, nn.InstanceNorm2d: SparseInstanceNorm2d,
    nn.InstanceNorm3d: SparseInstanceNorm3d,
}
_CONVERTED = frozenset(_CONVERSION.values())
# modules that mix information across positions in a way the mask cannot follow
_UNSUPPORTED = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm,
                nn.modules.conv._ConvTransposeNd)


def convert_encoder_to_sparse(net: nn.Module) -> SparseMaskContext:
    """Make ``net.encoder`` sparse in place and return its :class:`SparseMaskContext`.

    Idempotent (a second call returns the existing context). Parameter names and ``state_dict`` keys are
    unchanged. With no active mask the network's forward is bit-identical to the plain one.

    Raises:
        TypeError: not a supported U-Net, or the encoder holds a layer the sparse rules do not cover
            (batch/group/layer norm, transposed conv, or a subclass of a conv/pool/norm class).
    """
    check_unet(net)
    encoder = net.encoder
    ctx = getattr(encoder, SPARSE_CONTEXT_ATTR, None)
    if ctx is None:
        ctx = SparseMaskContext()
    todo = []
    for name, module in encoder.named_modules():
        cls = type(module)
        if cls in _CONVERTED:
            continue
        if cls in _CONVERSION:
            todo.append(module)
        elif isinstance(module, _UNSUPPORTED) or isinstance(
                module, (nn.modules.conv._ConvNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._MaxPoolNd,
                         nn.modules.instancenorm._InstanceNorm)):
            raise TypeError(f"sparse encoder: layer encoder.{name} ({cls.__name__}) is not supported; "
                            f"supported are Conv/AvgPool/MaxPool/InstanceNorm (1d/2d/3d)")
    for module in todo:
        module.__class__ = _CONVERSION[type(module)]
    for module in encoder.modules():
        if type(module) in _CONVERTED:
            module._ssl_sparse_ctx = ctx
        if isinstance(module, nn.Sequential):  # conv -> norm as run by ConvDropoutNormReLU.all_modules
            children = list(module)
            for conv, norm in zip(children, children[1:]):
                if isinstance(conv, _MaskedOutput) and isinstance(conv, nn.modules.conv._ConvNd) \
                        and isinstance(norm, _SparseIN):
                    conv._ssl_mask_output = False
    setattr(encoder, SPARSE_CONTEXT_ATTR, ctx)
    return ctx


def get_sparse_context(net: nn.Module) -> Optional[SparseMaskContext]:
    """The context of a converted network, ``None`` for a plain one."""
    return getattr(getattr(net, "encoder", None), SPARSE_CONTEXT_ATTR, None)


def is_sparse(net: nn.Module) -> bool:
    return get_sparse_context(net) is not None


def derive_remask_strides(stage_strides, unit: Sequence[int]) -> List[List[int]]:
    """Cumulative strides ``s_k`` (per axis) of the stages whose maps are re-masked: ``u_ax % s_k,ax == 0`` on
    all axes (METHODS §3.4 ``remask_strides``), in stage order, duplicates removed.

    Args:
        stage_strides: a U-Net or its per-stage strides (``plans["configurations"][c]["architecture"]
            ["arch_kwargs"]["strides"]``).
        unit: the mask unit ``(u0, u1, u2)``.
    """
    unit = [int(u) for u in unit]
    out: List[List[int]] = []
    for s in cumulative_strides(stage_strides):
        if len(s) != len(unit):
            raise ValueError(f"stride {s} and mask unit {unit} have different lengths")
        if all(u % v == 0 for u, v in zip(unit, s)) and list(s) not in out:
            out.append(list(s))
    return out


# ------------------------------------------------------------------------------------------------------------

class Densify(nn.Module):
    """Fill the hidden positions of the sparse encoder's outputs before the decoder (METHODS §2.3 (d)).

    Per stage k: sparse instance norm without affine (visible statistics) → hidden positions replaced by a
    learnable mask token (``C_k`` values, truncated normal, std 0.02) → projection (identity for k = 0,
    3x3x3 conv ``C_k → C_k`` with bias for k ≥ 1). Stages coarser than the unit (dense maps) are normalised
    densely and get no token. These parameters belong to the SSL method, not to the exported network.

    Args:
        channels: ``[C_0, ..., C_{K-1}]`` (``net.encoder.output_channels``).
        conv_op: ``nn.Conv3d`` (or ``nn.Conv2d``), ``net.encoder.conv_op``.
        eps: instance norm epsilon.
        masked_stages: optional ``[bool] * K``: which stages are ever re-masked (e.g. from
            :func:`derive_remask_strides`). Only those get a mask token, so no parameter is left without
            gradient (matters for DDP). Default: every stage gets one.
    """

    def __init__(self, channels: Sequence[int], conv_op: Type[nn.Module] = nn.Conv3d, eps: float = 1e-5,
                 masked_stages: Optional[Sequence[bool]] = None):
        super().__init__()
        self.eps = float(eps)
        if masked_stages is None:
            masked_stages = [True] * len(channels)
        if len(masked_stages) != len(channels):
            raise ValueError(f"masked_stages has {len(masked_stages)} entries for {len(channels)} stages")
        self.mask_tokens = nn.ParameterDict()
        self.projections = nn.ModuleList()
        for k, c in enumerate(channels):
            if masked_stages[k]:
                token = nn.Parameter(torch.zeros(int(c)))
                nn.init.trunc_normal_(token, mean=0.0, std=0.02, a=-0.04, b=0.04)
                self.mask_tokens[str(k)] = token
            self.projections.append(nn.Identity() if k == 0 else conv_op(int(c), int(c), 3, 1, 1, bias=True))

    def forward(self, skips: Sequence[torch.Tensor], mask: Optional[torch.Tensor]) -> List[torch.Tensor]:
        """``skips[k] (B, C_k, f_k0, f_k1, f_k2)`` + unit mask ``(B, 1, n0, n1, n2)`` (or ``None`` = all visible)
        → list of densified maps with the same shapes."""
        if len(skips) != len(self.projections):
            raise ValueError(f"Densify was built for {len(self.projections)} stages, got {len(skips)} maps")
        out = []
        for k, e in enumerate(skips):
            if mask is not None:
                mask = mask.to(e.device)
            m = mask_at_resolution(mask, e.shape[2:])
            if m is None:
                h = F.instance_norm(e.float(), eps=self.eps).to(e.dtype)
            else:
                if str(k) not in self.mask_tokens:
                    raise ValueError(f"Densify: stage {k} ({tuple(e.shape[2:])}) is masked but was built without "
                                     f"a mask token (masked_stages)")
                h = sparse_instance_norm(e, m, eps=self.eps)
                token = self.mask_tokens[str(k)].to(h.dtype).view((1, -1) + (1,) * (e.dim() - 2))
                h = torch.where(m.to(device=h.device, dtype=torch.bool), h, token)
            out.append(self.projections[k](h))
        return out


def sparse_masked_forward(net: nn.Module, x: torch.Tensor, mask: torch.Tensor,
                          densify: Optional[Densify] = None
                          ) -> Tuple[List[torch.Tensor], List[torch.Tensor], torch.Tensor]:
    """Masked sparse forward of a U-Net (shared by MAE, MiM, Alice).

    The input is zeroed at hidden voxels, the converted encoder runs with ``mask`` active, the skips are
    densified (if ``densify`` is given) and the standard decoder produces the reconstruction.

    Args:
        net: U-Net converted with :func:`convert_encoder_to_sparse` (converted here if it is not yet).
        x: ``(B, C_in, a0, a1, a2)``.
        mask: unit mask ``(B, 1, n0, n1, n2)``, 1 = visible; ``a_ax % n_ax == 0``.
        densify: the method's :class:`Densify` (outside the network).

    Returns:
        ``(enc, dec, rec)``: sparse encoder maps ``[e_0 .. e_{K-1}]`` (zeros at hidden positions of re-masked
        maps, before densification), decoder maps ``[d_0 .. d_{K-2}]`` and ``rec (B, num_classes, a0, a1, a2)``.
    """
    if not is_sparse(net):
        convert_encoder_to_sparse(net)
    return forward_features(net, x, mask=mask, densify=densify)
