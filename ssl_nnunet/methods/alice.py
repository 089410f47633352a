"""Alice: anatomical invariance modelling + conditional anatomical semantic alignment (METHODS.md §7).

Primus realisation (§7.4): :class:`PrimusAlice` (``Alice.variant_for("primus")``; visible-token student, token
decoder, full-token EMA teacher; documentation/methods/alice.md, "Primus"). CNN realisation (§7.3) on a nnU-Net
U-Net. A batch element holds a query crop Q of case A and a key crop K
of the same body part of a different case B (``batch (B, 2, C, a0, a1, a2)``; the pairs come from
:class:`ssl_nnunet.data.alice_pairs.CrossVolumePairSampler` through :meth:`Alice.make_sampler`). Shapes below
use ``B`` pairs, ``2B`` views per branch (rows ``0..B-1`` = Q, ``B..2B-1`` = K), token stride ``t`` (= mask
unit q by default), token grid ``g = P / t``, ``N = prod(g)`` tokens, ``N_vis`` visible tokens per view,
``C_t`` channels of the encoder stage at stride ``t`` (``enc_pen`` for t = q), head output dim ``D``,
CASA width ``D_c``.

Views (built on the batch's device, no gradient):
    X_u^Q, X_r^K   masked views: random flips of Q / K (per sample and axis, p 0.5) + unit mask
                   ``m (2B, 1, *P/u)`` hiding ``floor(0.75 n + 0.5)`` units per view;
    X_w^Q, X_v^K   target views: rotation U(-15°, 15°) about the out-of-plane axis, flips (p 0.5 per axis),
                   intensity ``x * U(0.9, 1.1) + U(-0.1, 0.1)``, Gaussian noise sigma 0.1.
Networks:
    online   = SparK-sparse U-Net ``self.network`` (masked views; the nnU-Net decoder is the online decoder);
    target   = EMA copy of the *dense* encoder (intact target views), stages up to the token stage only;
    phi      = :class:`ProjectionHead` on the online decoder's stage at stride t (``dec_first`` for t = q);
    psi      = EMA of phi, on the target encoder's stage at stride t;
    CASA     = :class:`CASA` (no residual), shared by the student and teacher branch.
Tensors:
    V = online encoder stage-t tokens at visible positions  (2B, N_vis, C_t)
    H = phi(online decoder stage-t tokens)                   (2B, N, D)
    Y = sg(psi(target encoder stage-t tokens))              (2B, N, D)
    S = CASA(V, H), T = sg(CASA(V, Y))                        (2B, N_vis, D_c)
Losses (float32), default ``similarity = "infonce"`` (temperature ``tau``, cosine logits ``cos(a, sg b) / τ``):
    l_r  = masked MSE(Q) + masked MSE(K)            (Eq. 1; per-unit normalised targets, hidden voxels only)
    l_dv = in-batch InfoNCE of p(GAP H) against GAP Y: the positive of a Q row is the K teacher row of its pair
           and vice versa, candidates = all 2B teacher rows but the row's own crop; mean over Q rows + mean
           over K rows (chance 2 log(2B − 1), logged as ``dv_chance``)                        (Eq. 2)
    l_st = token-level InfoNCE per view: student token S_n against the view's teacher tokens T, positive T_n
           (same CASA query), negatives the other visible tokens; Q views + K views (chance 2 log N_vis,
           ``st_chance``)                                                                      (Eq. 5)
    loss = recon_weight * l_r + l_dv + l_st
``similarity = "cosine"`` is the paper's text, ``l_s(a, b) = 2 - 2 cos(a, sg(b))`` averaged over rows:
    l_dv = l_s(p(GAP H^Q), GAP Y^K - c_dv) + l_s(p(GAP H^K), GAP Y^Q - c_dv)
    l_st = l_s(p'(S^Q), T^Q - c_st) + l_s(p'(S^K), T^K - c_st)
with optional teacher centring (``center_momentum`` m: ``c <- m c + (1 - m) mean(teacher rows)`` after each
training forward; cosine only) and BYOL predictors ``p, p'`` (``use_predictor``, default off; identity
otherwise). The cosine losses have constant-embedding minima that need no encoder (a zero key/value norm in
CASA makes S = T constant, ℓ_st = 0); InfoNCE puts constant embeddings at chance instead (see
documentation/methods/alice.md for the measurements behind the default).
Logged besides: ``cls_std`` and ``token_std``, the collapse monitor (:func:`embedding_spread`):
``sqrt(D) * mean_d std_d`` of the l2-normalised pooled online embeddings GAP H across the 2B views, resp. of
the l2-normalised online token embeddings H across all 2B * N tokens: about 1 for unit vectors spread over
the sphere, 0 for collapse. (With one pair per batch, ``cls_std`` compares two crops of the same body part
that l_dv pulls together, so it is small by design; ``token_std`` is the collapse signal there.)

Layout keys (``method_plan["layout"]``): ``crop_size`` (= P), ``mask_unit`` (u), ``mask_ratio`` (0.75),
``token_stride`` (t; the cumulative stride of an encoder stage below the bottleneck, dividing u), ``head``
``[hidden, bottleneck, D]``, ``casa {dim: D_c, heads}``, ``ema [mu0, mu1]``, ``matcher``
(``profile_bbox`` | ``bbox`` | ``random``), ``recon_weight`` (1), ``similarity`` (``infonce`` | ``cosine``),
``tau`` (0.2, InfoNCE), ``center_momentum`` (0.9, cosine only; ``null`` = off), ``use_predictor`` (false).
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ssl_nnunet.data.alice_pairs import MATCHERS, CrossVolumeMatcher, CrossVolumePairSampler
from ssl_nnunet.data.body_geometry import DatasetGeometry
from ssl_nnunet.data.samplers import SamplerSpec
from ssl_nnunet.methods import register
from ssl_nnunet.methods.base import PlanningContext, SSLMethod, divides
from ssl_nnunet.methods.ema import frozen_copy, paired_tensors
from ssl_nnunet.methods.features import check_unet, cumulative_strides, run_encoder
from ssl_nnunet.methods.geometry import affine_theta
from ssl_nnunet.methods.helpers import per_axis_ints, uniform
from ssl_nnunet.methods.masking import (expand_mask, mask_at_resolution, masked_mse, num_hidden_units,
                                        per_unit_target, random_block_mask, unit_grid)
from ssl_nnunet.methods.sparse import Densify, convert_encoder_to_sparse, sparse_masked_forward
from ssl_nnunet.utilities.errors import SSLInputError

ROTATION_DEG = 15.0
INTENSITY_SCALE = (0.9, 1.1)
INTENSITY_SHIFT = (-0.1, 0.1)
NOISE_STD = 0.1
SIMILARITIES = ("infonce", "cosine")


# ------------------------------------------------------------------------------------------------ helpers

def cosine_loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``l_s(a, b) = 2 - 2 cos(a, sg(b))`` with ``cos = a.b / (|a| |b| + 1e-8)``, averaged over all rows.

    Args:
        a, b: ``(..., D)`` (any float dtype; computed in float32). ``b`` is detached.
    Returns:
        float32 scalar in [0, 4].
    """
    a, b = a.float(), b.detach().float()
    cos = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + 1e-8)
    return (2.0 - 2.0 * cos).mean()


def _cos_logits(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """``a (..., M, D)``, ``b (..., K, D)`` -> cos(a_m, sg b_k) / tau ``(..., M, K)`` in float32."""
    a = F.normalize(a.float(), dim=-1, eps=1e-8)
    b = F.normalize(b.detach().float(), dim=-1, eps=1e-8)
    return a @ b.transpose(-1, -2) / float(tau)


def token_info_nce(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """Token-level InfoNCE (ℓ_st): student token n of a view against the teacher tokens of the same view,
    positive = teacher token n (the same CASA query), negatives = the view's other teacher tokens.

    Args:
        student, teacher: ``(M, N, D)`` (M views, N tokens each); ``teacher`` is detached.
    Returns:
        float32 scalar ``mean_{m,n} −log softmax_k(cos(s_mn, t_mk) / τ)[n]``; ``log N`` for constant rows.
    """
    logits = _cos_logits(student, teacher, tau)                                   # (M, N, N)
    labels = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape[0], -1)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def pooled_info_nce(student: torch.Tensor, teacher: torch.Tensor, b: int, tau: float) -> torch.Tensor:
    """In-batch InfoNCE (ℓ_dv) of pooled embeddings ``student, teacher (2B, D)`` (rows 0..B−1 Q, B..2B−1 K).

    The positive of student row i is the teacher row of the *other* crop of its pair (i ± B); the candidates
    are all 2B teacher rows except the row's own crop (an augmented copy of the same crop, a positive too).
    Returns ``mean over Q rows + mean over K rows`` of ``−log softmax`` (float32; ``2 log(2B − 1)`` for
    constant rows).
    """
    n = student.shape[0]
    logits = _cos_logits(student, teacher, tau)                                   # (2B, 2B)
    own = torch.eye(n, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(own, float("-inf"))
    labels = (torch.arange(n, device=logits.device) + b) % n
    ce = F.cross_entropy(logits, labels, reduction="none")
    return ce[:b].mean() + ce[b:].mean()


def embedding_spread(x: torch.Tensor) -> torch.Tensor:
    """Collapse monitor: ``sqrt(D) * mean_d std_d`` of the l2-normalised rows of ``x (M, D)`` (float32 scalar).

    About 1 for unit vectors spread uniformly over the sphere, 0 when all rows are equal (collapse).
    """
    z = F.normalize(x.float(), dim=-1)
    return z.std(0, unbiased=False).mean() * math.sqrt(z.shape[-1])


def predictor_mlp(dim: int, hidden: int) -> nn.Module:
    """BYOL/SimSiam-style predictor ``(..., dim) -> (..., dim)``: Linear -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


def to_tokens(feature: torch.Tensor) -> torch.Tensor:
    """``(B, C, g0, g1, g2) -> (B, N, C)`` with tokens in C order over the grid."""
    return feature.flatten(2).transpose(1, 2)


def visible_first(token_mask: torch.Tensor) -> torch.Tensor:
    """Token indices ``(M, N)`` of a visibility mask ``(M, N)`` (bool, True = visible): each view's visible tokens
    first, then its hidden ones, both in grid order. One stable sort, no host synchronisation: with ``N_vis``
    visible tokens per view (:meth:`Alice.visible_tokens`), ``[:, :N_vis]`` are the visible, ``[:, N_vis:]``
    the hidden indices."""
    return torch.argsort((~token_mask).to(torch.int8), dim=1, stable=True)


def random_flips(x: torch.Tensor, generator: Optional[torch.Generator] = None, p: float = 0.5) -> torch.Tensor:
    """Flip every sample of ``x (B, C, a0, a1, a2)`` along each spatial axis with probability ``p``."""
    n_ax = x.dim() - 2
    flags = uniform((x.shape[0], n_ax), x.device, generator) < p
    for ax in range(n_ax):
        f = flags[:, ax].view(-1, *([1] * (x.dim() - 1)))
        x = torch.where(f, x.flip(2 + ax), x)
    return x


def rotation_about_axis(angles: torch.Tensor, axis: int, patch: Sequence[int]) -> torch.Tensor:
    """``affine_grid`` matrices ``(B, 3, 4)`` rotating a patch ``P = (a0, a1, a2)`` by ``angles (B,)`` (radians)
    about its centre, in voxel units, in the plane of the two axes other than ``axis`` (normalised for
    ``grid_sample`` by :func:`ssl_nnunet.methods.geometry.affine_theta`)."""
    b = angles.shape[0]
    rot = torch.eye(3, device=angles.device).repeat(b, 1, 1)
    i, j = [ax for ax in range(3) if ax != axis]
    c, s = torch.cos(angles), torch.sin(angles)
    rot[:, i, i], rot[:, i, j], rot[:, j, i], rot[:, j, j] = c, -s, s, c
    return affine_theta(rot, rot.new_zeros(b, 3), patch)


@torch.no_grad()
def strong_augment(x: torch.Tensor, out_of_plane_axis: int, generator: Optional[torch.Generator] = None
                   ) -> torch.Tensor:
    """Target-view augmentation of ``x (B, C, a0, a1, a2)`` (float32 in, float32 out, same shape).

    Rotation U(-15°, 15°) about ``out_of_plane_axis`` (trilinear, border padding), flips (p 0.5 per axis),
    ``x * U(0.9, 1.1) + U(-0.1, 0.1)`` per sample, additive Gaussian noise (sigma 0.1).
    """
    x = x.float()
    b, dev = x.shape[0], x.device
    angles = uniform((b,), dev, generator, -math.radians(ROTATION_DEG), math.radians(ROTATION_DEG))
    theta = rotation_about_axis(angles, out_of_plane_axis, x.shape[2:])
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    x = random_flips(x, generator)
    shape = (b,) + (1,) * (x.dim() - 1)
    x = x * uniform(shape, dev, generator, *INTENSITY_SCALE) + uniform(shape, dev, generator, *INTENSITY_SHIFT)
    draw = generator.device if generator is not None else dev
    return x + NOISE_STD * torch.randn(x.shape, generator=generator, device=draw).to(dev)


# ------------------------------------------------------------------------------------------------ modules

class ProjectionHead(nn.Module):
    """DINO-style per-token head: ``x (..., C) -> MLP C -> h -> h -> k (GELU) -> l2-normalise ->
    weight-normalised linear k -> D`` (rows of the last weight normalised to unit length, gain fixed to 1).

    Args:
        in_dim: C.  hidden: h.  bottleneck: k.  out_dim: D.
    Returns (forward): ``(..., D)``.
    """

    def __init__(self, in_dim: int, hidden: int, bottleneck: int, out_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        self.last_weight = nn.Parameter(torch.empty(out_dim, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.last_weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return F.linear(z, F.normalize(self.last_weight, dim=1, eps=1e-6))


class CASA(nn.Module):
    """Conditional anatomical semantic alignment (paper Eq. 3-4), multi-head, **no residual**.

    ``q = LN(V) W_q``, ``k = LN(X) W_k``, ``v = LN(X) W_v`` split into ``heads`` heads of ``d = D_c / heads``;
    ``ATT = softmax(q k^T / sqrt(d))`` over the N keys; ``out = zeta(ATT v)`` with heads concatenated.

    Args:
        query_dim: C_t (channels of V).  key_dim: D (head output, channels of H and Y).
        dim: D_c.  heads: number of heads (``dim % heads == 0``).
    """

    def __init__(self, query_dim: int, key_dim: int, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise SSLInputError(f"ssl layout of 'alice': casa dim {dim} is not divisible by heads {heads}")
        self.heads = int(heads)
        self.norm_q = nn.LayerNorm(query_dim)
        self.norm_kv = nn.LayerNorm(key_dim)
        self.w_q = nn.Linear(query_dim, dim)
        self.w_k = nn.Linear(key_dim, dim)
        self.w_v = nn.Linear(key_dim, dim)
        self.zeta = nn.Linear(dim, dim)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        return x.view(b, n, self.heads, c // self.heads).transpose(1, 2)  # (B, heads, n, d)

    def attention(self, queries: torch.Tensor, keys: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``queries (B, N_q, C_t)``, ``keys (B, N, D)`` -> ``(ATT (B, heads, N_q, N) float32, v (B, heads, N, d))``."""
        q = self._split(self.w_q(self.norm_q(queries))).float()
        kv = self.norm_kv(keys)
        k = self._split(self.w_k(kv)).float()
        v = self._split(self.w_v(kv))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
        return att, v

    def forward(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``queries (B, N_q, C_t)``, ``keys`` = values ``(B, N, D)`` -> ``(B, N_q, D_c)``."""
        att, v = self.attention(queries, keys)
        out = (att.to(v.dtype) @ v).transpose(1, 2).flatten(2)
        return self.zeta(out)


# ------------------------------------------------------------------------------------------------ method

@register
class Alice(SSLMethod):
    """Alice on a nnU-Net U-Net (see the module docstring for views, tensors and losses).

    Attributes:
        mask_unit, mask_ratio, token_stride, ema (mu0, mu1), recon_weight, out_of_plane_axis.
        token_stage: encoder stage k whose cumulative stride is ``token_stride``; decoder stage ``K - 2 - k``.
        densify: :class:`Densify` of the sparse online encoder.
        target_encoder: EMA copy of the dense encoder (no gradient, eval mode).
        phi, psi: projection heads (psi = EMA of phi).  casa: :class:`CASA`.
        pred_dv, pred_st: BYOL predictors on the online side of l_dv / l_st (``use_predictor``), else ``None``.
        center_dv ``(D,)``, center_st ``(D_c,)``: teacher centres (buffers; zero when centring is off).
    """

    name = "alice"
    trained_parts = ("online encoder and online (reconstruction) decoder; the EMA target encoder and heads are "
                     "not exported (the Alice paper transfers the online encoder only: ssl_nnunet_finetune "
                     "--encoder-only)")
    cases_per_sample = 2
    layout_defaults = {"mask_ratio": 0.75, "ema": [0.996, 1.0], "matcher": "profile_bbox", "recon_weight": 1.0,
                       "similarity": "infonce", "tau": 0.2, "center_momentum": 0.9, "use_predictor": False}

    required_layout_keys = ("mask_unit", "token_stride", "head", "casa")

    @classmethod
    def variant_for(cls, architecture_family: str):
        """CNN: :class:`Alice` (SparK-sparse U-Net); Primus: :class:`PrimusAlice` (visible-token encoder)."""
        return {"cnn": Alice, "primus": PrimusAlice}.get(architecture_family)

    # ---------------------------------------------------------------------------------------------- planning
    @classmethod
    def default_layout(cls, ctx: PlanningContext):
        """Crop = the plan's patch; mask unit and token stride = q; heads of the paper's size (the CPU profiles'
        smaller ones come from ``plans/method_defaults.json``)."""
        q = list(ctx.mask_quantum)
        layout = {"crop_size": list(ctx.patch_size), "mask_unit": q, "token_stride": list(q),
                  "head": [2048, 256, 512], "casa": {"dim": 512, "heads": 8}, **copy.deepcopy(cls.layout_defaults)}
        return list(ctx.patch_size), layout

    @classmethod
    def check_layout(cls, method_plan: dict, ssl_plan: dict):
        al = method_plan["layout"]
        if not divides(al["mask_unit"], al["crop_size"]):
            raise cls.layout_error(ssl_plan, "mask_unit", "does not divide the crop")
        cls.check_token_layout(al, ssl_plan)
        if al["casa"]["dim"] % al["casa"]["heads"]:
            raise cls.layout_error(ssl_plan, "casa",
                                   f"dim {al['casa']['dim']} is not divisible by heads {al['casa']['heads']}")
        if al["matcher"] not in MATCHERS:
            raise cls.layout_error(ssl_plan, "matcher", f"'{al['matcher']}' is not one of {', '.join(MATCHERS)}")
        if al.get("similarity", "infonce") not in SIMILARITIES:
            raise cls.layout_error(ssl_plan, "similarity", f"'{al['similarity']}' is not one of "
                                                           f"{', '.join(SIMILARITIES)}")
        warnings = []
        if al.get("similarity", "infonce") == "infonce" and int(method_plan.get("batch_size", 2)) < 2:
            warnings.append("alice: with similarity 'infonce' a batch of 1 pair leaves ℓ_dv a single candidate "
                            "(no negatives, no signal); use batch_size >= 2 (4 on the CPU plans)")
        return warnings

    @classmethod
    def check_token_layout(cls, al: dict, ssl_plan: dict) -> None:
        """CNN: the token stride divides the mask unit."""
        if not divides(al["token_stride"], al["mask_unit"]):
            raise cls.layout_error(ssl_plan, "token_stride",
                                   f"{al['token_stride']} does not divide the mask unit {al['mask_unit']}")

    def __init__(self, network: nn.Module, method_plan: dict, ssl_plan: dict, num_input_channels: int):
        super().__init__(network, method_plan, ssl_plan, num_input_channels)
        check_unet(network)
        ndim = len(network.encoder.strides[0])
        self.read_layout(ndim)
        self.token_stride = tuple(per_axis_ints(self.layout["token_stride"], ndim, "token_stride", "alice"))
        strides = cumulative_strides(network)
        stages = [k for k, s in enumerate(strides[:-1]) if tuple(s) == self.token_stride]
        if not stages:
            raise SSLInputError(f"ssl layout of 'alice': token_stride {list(self.token_stride)} is not the cumulative "
                                f"stride of an encoder stage below the bottleneck ({[list(s) for s in strides[:-1]]})")
        self.token_stage = stages[-1]
        if any(u % t for u, t in zip(self.mask_unit, self.token_stride)):
            raise SSLInputError(f"ssl layout of 'alice': token_stride {list(self.token_stride)} must divide mask_unit "
                                f"{list(self.mask_unit)}")
        n_out = getattr(network.decoder, "num_classes", num_input_channels)
        if n_out != num_input_channels:
            raise SSLInputError(f"Alice needs a network with num_classes = C_in = {num_input_channels}, got {n_out}")

        # target encoder: a dense copy taken *before* the online encoder is made sparse
        self.target_encoder = frozen_copy(network.encoder)
        convert_encoder_to_sparse(network)
        remasked = [all(u % s == 0 for u, s in zip(self.mask_unit, st)) for st in strides]
        self.densify = Densify(network.encoder.output_channels, network.encoder.conv_op, masked_stages=remasked)
        self.build_heads(int(network.encoder.output_channels[self.token_stage]))

    def read_layout(self, ndim: int) -> None:
        """Parse and check the backbone-independent layout keys (mask, EMA, matcher, crop)."""
        layout = self.layout
        self.mask_unit = tuple(per_axis_ints(layout["mask_unit"], ndim, "mask_unit", "alice"))
        self.mask_ratio = float(layout["mask_ratio"])
        if not 0.0 < self.mask_ratio < 1.0:
            raise SSLInputError(f"ssl layout of 'alice': mask_ratio must lie in (0, 1), got {self.mask_ratio}")
        self.recon_weight = float(layout["recon_weight"])
        ema = layout["ema"]
        self.ema = (float(ema[0]), float(ema[1]))
        if not 0.0 <= self.ema[0] <= self.ema[1] <= 1.0:
            raise SSLInputError(f"ssl layout of 'alice': ema must be [mu0, mu1] with 0 <= mu0 <= mu1 <= 1, got {ema}")
        matcher = layout["matcher"]
        if matcher not in MATCHERS:
            raise SSLInputError(f"ssl layout of 'alice': matcher '{matcher}' is not implemented; choose one of "
                                f"{', '.join(MATCHERS)}")
        self.out_of_plane_axis = int(self.ssl_plan.get("out_of_plane_axis", 0))
        try:
            unit_grid(self.required_patch_size(self.method_plan), self.mask_unit)
        except ValueError as e:
            raise SSLInputError(f"ssl plan of 'alice': {e}") from None

    def build_heads(self, token_dim: int) -> None:
        """phi / psi (token features of width ``token_dim`` -> D), CASA, the optional predictors, the similarity
        and the teacher centres; checks that every EMA pair holds matching tensors."""
        layout = self.layout
        hidden, bottleneck, out_dim = (int(v) for v in layout["head"])
        casa_dim = int(layout["casa"]["dim"])
        c_tok = int(token_dim)
        self.phi = ProjectionHead(c_tok, hidden, bottleneck, out_dim)
        self.psi = frozen_copy(self.phi)
        self.casa = CASA(c_tok, out_dim, casa_dim, int(layout["casa"]["heads"]))
        use_predictor = bool(layout["use_predictor"])
        self.pred_dv = predictor_mlp(out_dim, hidden) if use_predictor else None
        self.pred_st = predictor_mlp(casa_dim, hidden) if use_predictor else None
        self.similarity = str(layout["similarity"])
        if self.similarity not in SIMILARITIES:
            raise SSLInputError(f"ssl layout of 'alice': similarity must be one of {SIMILARITIES}, got "
                                f"'{self.similarity}'")
        self.tau = float(layout["tau"])
        if self.tau <= 0:
            raise SSLInputError(f"ssl layout of 'alice': tau must be > 0, got {self.tau}")
        momentum = layout["center_momentum"]
        self.center_momentum = None if momentum is None or self.similarity == "infonce" else float(momentum)
        if self.center_momentum is not None and not 0.0 <= self.center_momentum < 1.0:
            raise SSLInputError(f"ssl layout of 'alice': center_momentum must lie in [0, 1) or be null, got {momentum}")
        self.register_buffer("center_dv", torch.zeros(out_dim))
        self.register_buffer("center_st", torch.zeros(casa_dim))
        for student, teacher in self.ema_pairs():
            teacher.eval()
            paired_tensors(student, teacher)  # raises if the sparse conversion changed the encoder's tensors

    # ---------------------------------------------------------------- plumbing
    @classmethod
    def required_patch_size(cls, method_plan: dict) -> List[int]:
        """The crop size P (``layout.crop_size``, else ``pretrain_patch_size``)."""
        return list(method_plan["layout"].get("crop_size", method_plan["pretrain_patch_size"]))

    @classmethod
    def make_sampler(cls, spec: SamplerSpec):
        """Sampler of matched (Q, K) pairs: ``next_batch() -> (B, 2, C, *P)``
        (:class:`ssl_nnunet.data.alice_pairs.CrossVolumePairSampler`); the out-of-plane axis is
        ``spec.ssl_plan["out_of_plane_axis"]``, the geometry cache lies beside ``spec.preprocessed_folder``.

        With a single case in ``spec.identifiers`` (the trainer's one held-out validation case) the key crops
        come from the other cases of ``spec.dataset``. ``matcher = "random"`` gives the default sampler (two
        random crops of different cases).
        """
        kind = cls.resolved_layout(spec.method_plan)["matcher"]
        if kind == "random":
            return super().make_sampler(spec)
        geometry = DatasetGeometry.load_or_compute(spec.dataset, int(spec.ssl_plan["out_of_plane_axis"]), kind,
                                                   spec.preprocessed_folder)
        keys = spec.identifiers if len(spec.identifiers) >= 2 else sorted(spec.dataset.identifiers)
        return CrossVolumePairSampler(spec.dataset, spec.identifiers, spec.patch_size, spec.batch_size,
                                      CrossVolumeMatcher(geometry), seed=spec.seed, key_identifiers=keys,
                                      **spec.case_options)

    def train(self, mode: bool = True):
        super().train(mode)
        self.target_encoder.eval()
        self.psi.eval()
        return self

    # ---------------------------------------------------------------- EMA
    def ema_pairs(self) -> List[Tuple[nn.Module, nn.Module]]:
        """(online encoder, target encoder) and (phi, psi)."""
        return [(self.network.encoder, self.target_encoder), (self.phi, self.psi)]

    def ema_momentum_range(self) -> Tuple[float, float]:
        """``(mu0, mu1) = layout.ema``."""
        return self.ema

    @torch.no_grad()
    def casa_teacher(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """``T = sg(CASA(V, Y))`` float32 ``(2B, N_vis, D_c)``."""
        return self.casa(queries, keys).float()

    def centred(self, target: torch.Tensor, center: str) -> torch.Tensor:
        """``target - c`` (teacher centring; ``target`` unchanged when centring is off)."""
        if self.center_momentum is None:
            return target
        return target - getattr(self, center)

    @torch.no_grad()
    def update_centers(self, cls_y: torch.Tensor, t: torch.Tensor) -> None:
        """``c <- m c + (1 - m) mean(rows)`` for the pooled teacher embeddings ``cls_y (2B, D)`` and the teacher
        CASA tokens ``t (2B, N_vis, D_c)`` (batch means averaged over DDP ranks)."""
        import torch.distributed as dist
        for name, rows in (("center_dv", cls_y), ("center_st", t.flatten(0, -2))):
            mean = rows.float().mean(0)
            if dist.is_available() and dist.is_initialized():
                dist.all_reduce(mean)
                mean /= dist.get_world_size()
            getattr(self, name).mul_(self.center_momentum).add_(mean, alpha=1.0 - self.center_momentum)

    # ---------------------------------------------------------------- views and branches
    def sample_mask(self, views: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Unit mask ``(2B, 1, *P/u)`` for ``views (2B, C, *P)``; 1 = visible."""
        grid = unit_grid(views.shape[2:], self.mask_unit)
        return random_block_mask(views.shape[0], grid, self.mask_ratio, device=views.device, generator=generator)

    def make_views(self, batch: torch.Tensor, generator: Optional[torch.Generator] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``batch (B, 2, C, *P)`` -> ``(online (2B, C, *P), target (2B, C, *P), mask (2B, 1, *P/u))``; rows
        ``0..B-1`` come from Q (``batch[:, 0]``), rows ``B..2B-1`` from K (``batch[:, 1]``)."""
        if batch.dim() != 3 + len(self.mask_unit) or batch.shape[1] != 2:
            raise ValueError(f"Alice expects a batch (B, 2, C, a0, a1, a2) of (query, key) crops, got "
                             f"{tuple(batch.shape)}")
        with torch.no_grad():
            crops = torch.cat([batch[:, 0], batch[:, 1]]).float()
            online = random_flips(crops, generator)
            target = strong_augment(crops, self.out_of_plane_axis, generator)
        return online, target, self.sample_mask(online, generator)

    def visible_tokens(self, mask: torch.Tensor) -> int:
        """``N_vis`` = visible units x tokens per unit (the same for every view; no device sync)."""
        n_units = math.prod(mask.shape[2:])
        per_unit = math.prod(u // t for u, t in zip(self.mask_unit, self.token_stride))
        return (n_units - num_hidden_units(n_units, self.mask_ratio)) * per_unit

    def target_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Target encoder on ``x (2B, C, *P)`` up to the token stage -> ``(2B, C_t, *g)`` (no gradient)."""
        with torch.no_grad():
            return run_encoder(self.target_encoder, x, self.token_stage + 1)[-1].detach()

    def branches(self, online: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Network passes. Returns ``rec (2B, C, *P)``, ``V (2B, N_vis, C_t)``, ``H (2B, N, D)``,
        ``Y (2B, N, D)`` (detached) and ``token_mask (2B, N)`` (bool, True = visible)."""
        enc, dec, rec = sparse_masked_forward(self.network, online, mask, self.densify)
        feat_v = enc[self.token_stage]
        feat_h = dec[len(dec) - 1 - self.token_stage]
        token_mask = mask_at_resolution(mask, feat_v.shape[2:]).flatten(1).bool()  # (2B, N)
        n_vis = self.visible_tokens(mask)
        v_tokens = to_tokens(feat_v)
        order = visible_first(token_mask)[:, :n_vis]
        visible = torch.gather(v_tokens, 1, order.unsqueeze(-1).expand(-1, -1, v_tokens.shape[2]))
        h = self.phi(to_tokens(feat_h))
        with torch.no_grad():
            y = self.psi(to_tokens(self.target_tokens(target)))
        return {"rec": rec, "V": visible, "H": h, "Y": y.detach(), "token_mask": token_mask}

    def reconstruction_loss(self, out: Dict[str, torch.Tensor], online: torch.Tensor, mask: torch.Tensor,
                            b: int) -> torch.Tensor:
        """``l_r`` = masked MSE of the Q views + that of the K views (per-unit targets, hidden voxels only)."""
        m_full = expand_mask(mask, online.shape[2:])
        t_rec = per_unit_target(online, self.mask_unit)
        rec = out["rec"].float()
        return masked_mse(rec[:b], t_rec[:b], m_full[:b]) + masked_mse(rec[b:], t_rec[b:], m_full[b:])

    # ---------------------------------------------------------------- loss
    def forward(self, batch: torch.Tensor, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """``batch (B, 2, C, *P)`` -> ``{"loss", "rec_loss", "dv_loss", "st_loss", "cls_std", "token_std"}``
        (float32 scalars; only ``loss`` carries gradient)."""
        b = batch.shape[0]
        online, target, mask = self.make_views(batch, generator)
        out = self.branches(online, target, mask)
        l_r = self.reconstruction_loss(out, online, mask, b)

        h, y = out["H"].float(), out["Y"].float()
        cls_h, cls_y = h.mean(1), y.mean(1)
        pred = self.pred_dv(cls_h).float() if self.pred_dv is not None else cls_h
        s = self.casa(out["V"], out["H"])
        s = (self.pred_st(s) if self.pred_st is not None else s).float()
        t = self.casa_teacher(out["V"], out["Y"])
        if self.similarity == "infonce":
            l_dv = pooled_info_nce(pred, cls_y, b, self.tau)
            l_st = token_info_nce(s[:b], t[:b], self.tau) + token_info_nce(s[b:], t[b:], self.tau)
        else:
            target_dv = self.centred(cls_y, "center_dv")
            l_dv = cosine_loss(pred[:b], target_dv[b:]) + cosine_loss(pred[b:], target_dv[:b])
            target_st = self.centred(t, "center_st")
            l_st = cosine_loss(s[:b], target_st[:b]) + cosine_loss(s[b:], target_st[b:])
        if self.training and self.center_momentum is not None:
            self.update_centers(cls_y, t)

        loss = self.recon_weight * l_r + l_dv + l_st
        with torch.no_grad():
            cls_std = embedding_spread(cls_h)
            token_std = embedding_spread(h.flatten(0, 1))
        terms = {"loss": loss, "rec_loss": l_r.detach(), "dv_loss": l_dv.detach(), "st_loss": l_st.detach(),
                 "cls_std": cls_std, "token_std": token_std}
        if self.similarity == "infonce":  # the losses of content-free (constant) embeddings
            terms["dv_chance"] = loss.new_tensor(2 * math.log(max(1, 2 * b - 1))).detach()
            terms["st_chance"] = loss.new_tensor(2 * math.log(s.shape[1])).detach()
        return terms

    def reconstruct(self, online: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The online network's reconstruction ``(2B, C, *P)`` of the masked views (per-unit normalised units)."""
        return sparse_masked_forward(self.network, online, mask, self.densify)[2]

    @torch.no_grad()
    def previews(self, batch: torch.Tensor) -> Dict[str, Sequence[torch.Tensor]]:
        """Rows of 3D tensors ``(a0, a1, a2)`` (pair 0, channel 0, float32 on CPU), Q left and K right: the
        matched crops, the masked views (flipped, hidden voxels 0), the reconstructions (network output, in
        per-unit normalised units) and the augmented target views. Views and mask use a fixed seed."""
        x = batch[:1]
        gen = torch.Generator(device="cpu").manual_seed(0)
        online, target, mask = self.make_views(x, gen)
        rec = self.reconstruct(online, mask)
        visible = expand_mask(mask, online.shape[2:]).bool()
        masked = torch.where(visible, online, 0.0)

        def pair(t: torch.Tensor) -> List[torch.Tensor]:
            return [t[0, 0].float().cpu(), t[1, 0].float().cpu()]

        return {"Q | K crops (matched)": [x[0, 0, 0].float().cpu(), x[0, 1, 0].float().cpu()],
                "masked views": pair(masked), "reconstructions": pair(rec),
                "target views (augmented)": pair(target)}


class _PrimusEncoder(nn.Module):
    """Copies of a Primus' ``down_projection`` and ``eva`` under their own names (the EMA target encoder), so
    :func:`ssl_nnunet.backbones.primus.encode_tokens` accepts it."""

    def __init__(self, network: nn.Module):
        super().__init__()
        self.down_projection = frozen_copy(network.down_projection)
        self.eva = frozen_copy(network.eva)


class PrimusAlice(Alice):
    """Alice on Primus, native (METHODS.md §7.4): the views, CASA, heads, ℓ_dv / ℓ_st and logged terms of
    :class:`Alice`; the token grid is Primus' own (one token = one mask unit, ``g = P / 8``, ``N = prod(g)``).

    Online (masked) student: ``floor(ρ N + 0.5)`` tokens per view hidden (``mask_ratio`` ρ); ``down_projection``
    and ``eva`` run on the ``N_vis`` visible tokens only (:func:`~ssl_nnunet.backbones.primus.encode_tokens` with
    the kept indices) -> ``V (2B, N_vis, E)``. Online decoder: :class:`~ssl_nnunet.backbones.primus.TokenDecoder`
    (learnable mask token, ``decoder_depth`` blocks of width ``decoder_width · E``) restores the full grid ->
    ``(2B, N, E)``; ``H = phi(·) (2B, N, D)``; a linear pixel head maps the hidden tokens to their per-unit
    normalised ``C·8³`` voxels for ℓ_r (Q views + K views, hidden tokens only). EMA target encoder: copies of
    ``down_projection`` + ``eva`` on the intact target views, every token -> ``Y = sg(psi(·)) (2B, N, D)``.
    Pooled embeddings for ℓ_dv are the token means of H and Y, as on the CNN.

    Layout keys: as :class:`Alice` without ``token_stride`` (the token): ``crop_size`` = P (the network input),
    ``mask_unit`` = the token size, ``decoder_width`` 0.5, ``decoder_depth`` 2, ``decoder_heads`` 4.
    Export keeps ``down_projection`` + ``eva``; ``up_projection`` never runs (frozen, not transferred).
    """

    trained_parts = ("down_projection and eva (the online encoder saw visible tokens only); the EMA target encoder, "
                     "the token decoder, pixel head, heads and CASA are not exported, up_projection never runs and is "
                     "not transferred")
    layout_defaults = {**Alice.layout_defaults, "decoder_width": 0.5, "decoder_depth": 2, "decoder_heads": 4}
    required_layout_keys = ("mask_unit", "head", "casa")

    @classmethod
    def default_layout(cls, ctx: PlanningContext):
        """Crop = the plan's patch (Primus' fixed input); mask unit = the token; heads of the paper's size."""
        layout = {"crop_size": list(ctx.patch_size), "mask_unit": list(ctx.mask_quantum), "head": [2048, 256, 512],
                  "casa": {"dim": 512, "heads": 8}, **copy.deepcopy(cls.layout_defaults)}
        return list(ctx.patch_size), layout

    @classmethod
    def check_token_layout(cls, al: dict, ssl_plan: dict) -> None:
        """Primus: the mask unit is one token."""
        if list(al["mask_unit"]) != list(ssl_plan["mask_quantum"]):
            raise cls.layout_error(ssl_plan, "mask_unit", f"{al['mask_unit']} is not the Primus token size "
                                                          f"{ssl_plan['mask_quantum']}")

    def __init__(self, network: nn.Module, method_plan: dict, ssl_plan: dict, num_input_channels: int):
        from ssl_nnunet.backbones.primus import TokenDecoder, decoder_width, is_primus, token_grid
        SSLMethod.__init__(self, network, method_plan, ssl_plan, num_input_channels)
        if not is_primus(network):
            raise SSLInputError(f"the Primus Alice needs a Primus network, got {type(network).__name__}")
        self.read_layout(3)
        token = tuple(int(t) for t in network.down_projection.proj.kernel_size)
        if self.mask_unit != token:
            raise SSLInputError(f"ssl layout of 'alice' (Primus): mask_unit {list(self.mask_unit)} must be the token "
                                f"size {list(token)}")
        self.token_stride = token
        patch = self.required_patch_size(method_plan)
        if "pretrain_patch_size" in method_plan and list(method_plan["pretrain_patch_size"]) != list(patch):
            raise SSLInputError(f"ssl plan of 'alice' (Primus): crop_size {patch} must equal pretrain_patch_size "
                                f"{method_plan['pretrain_patch_size']} (Primus' fixed input shape)")
        self.grid = token_grid(patch, token)
        E, layout = int(network.embed_dim), self.layout
        heads = int(layout["decoder_heads"])
        self.target_encoder = _PrimusEncoder(network)
        self.decoder = TokenDecoder(E, math.prod(self.grid), decoder_width(E, layout["decoder_width"], heads),
                                    int(layout["decoder_depth"]), heads)
        self.pixel_head = nn.Linear(E, num_input_channels * math.prod(token))
        self.densify = None
        self.build_heads(E)

    def ema_pairs(self) -> List[Tuple[nn.Module, nn.Module]]:
        """(down_projection, its copy), (eva, its copy) and (phi, psi)."""
        return [(self.network.down_projection, self.target_encoder.down_projection),
                (self.network.eva, self.target_encoder.eva), (self.phi, self.psi)]

    def untrained_parameters(self) -> List[str]:
        """``up_projection`` never runs (the pixel head predicts the voxels)."""
        return [f"network.up_projection.{n}" for n, _ in self.network.up_projection.named_parameters()]

    def target_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Target encoder on every token of ``x (2B, C, *P)`` -> ``(2B, E, *g)`` (no gradient)."""
        from ssl_nnunet.backbones.primus import token_map
        with torch.no_grad():
            return token_map(self.target_encoder, x).detach()

    def decode(self, online: torch.Tensor, mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``online (2B, C, *P)``, token mask ``(2B, 1, *g)`` -> ``(V (2B, N_vis, E), decoded tokens (2B, N, E),
        kept indices (2B, N_vis))``: the encoder on the visible tokens only, the decoder over the full grid."""
        from ssl_nnunet.backbones.primus import encode_tokens
        keep = visible_first(mask.flatten(1).bool())[:, :self.visible_tokens(mask)]
        visible = encode_tokens(self.network, online, keep)
        return visible, self.decoder(visible, keep), keep

    def branches(self, online: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Network passes. Returns ``rec (2B, N - N_vis, C·8³)`` (pixel head on the hidden tokens), ``hidden
        (2B, N - N_vis)`` their indices, ``V (2B, N_vis, E)``, ``H (2B, N, D)``, ``Y (2B, N, D)`` (detached) and
        ``token_mask (2B, N)`` (bool, True = visible)."""
        from ssl_nnunet.backbones.primus import gather_tokens
        visible, decoded, _ = self.decode(online, mask)
        hidden = visible_first(mask.flatten(1).bool())[:, self.visible_tokens(mask):]
        h = self.phi(decoded)
        with torch.no_grad():
            y = self.psi(to_tokens(self.target_tokens(target)))
        return {"rec": self.pixel_head(gather_tokens(decoded, hidden)), "hidden": hidden, "V": visible, "H": h,
                "Y": y.detach(), "token_mask": mask.flatten(1).bool()}

    def reconstruction_loss(self, out: Dict[str, torch.Tensor], online: torch.Tensor, mask: torch.Tensor,
                            b: int) -> torch.Tensor:
        """``l_r``: squared error of the hidden tokens' per-unit normalised voxels, mean over the Q views + mean
        over the K views (every view hides the same number of tokens: :func:`masked_mse` of each half)."""
        from ssl_nnunet.backbones.primus import gather_tokens, volume_to_patches
        target = gather_tokens(volume_to_patches(per_unit_target(online, self.mask_unit), self.mask_unit),
                               out["hidden"])
        err = (out["rec"].float() - target) ** 2
        return err[:b].mean() + err[b:].mean()

    def reconstruct(self, online: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Pixel head on every decoded token -> ``(2B, C, *P)`` (per-unit normalised units)."""
        from ssl_nnunet.backbones.primus import patches_to_volume
        return patches_to_volume(self.pixel_head(self.decode(online, mask)[1]), self.grid, self.mask_unit)
