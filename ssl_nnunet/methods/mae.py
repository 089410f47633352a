"""MAE / S3D: masked reconstruction with a SparK-style sparse CNN encoder (METHODS.md §3).

One view per patch: a unit mask over units ``u = q`` (``layout.mask_unit``) hides ``floor(0.75 n + 0.5)``
units per sample. Sparse variant (default): zeroed input → sparse encoder → :class:`Densify` → the network's
own decoder → reconstruction ``(B, C_in, a0, a1, a2)``. Dense variant: ``x * m`` through the unmodified
network. Loss: squared error over hidden voxels only, target ``none`` (the nnU-Net-normalised input) or
``per_unit``.

Layout keys (``method_plan["layout"]``):
    mask_unit       [q0, q1, q2]  (an int means the same on every axis); required
    mask_ratio      0.75
    remask_strides  optional list of per-axis cumulative strides ``s_k`` with ``s_k | q`` (an int entry means
                    the same on every axis); if present it must equal what the network's strides give
                    (:func:`ssl_nnunet.methods.sparse.derive_remask_strides`), else the plan is rejected
    target          "none" | "per_unit"
    variant         "sparse" | "dense"
"""
from __future__ import annotations

import copy
import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ssl_nnunet.methods import register
from ssl_nnunet.methods.base import PlanningContext, SSLMethod, divides
from ssl_nnunet.methods.features import check_unet, cumulative_strides, forward_features
from ssl_nnunet.methods.helpers import per_axis_ints
from ssl_nnunet.methods.masking import (expand_mask, masked_mse, per_unit_target, random_block_mask,
                                        unit_grid)
from ssl_nnunet.methods.sparse import (Densify, convert_encoder_to_sparse, derive_remask_strides,
                                       sparse_masked_forward)
from ssl_nnunet.utilities.errors import SSLInputError

TARGETS = ("none", "per_unit")
VARIANTS = ("sparse", "dense")


def mask_ratio_and_target(layout: dict):
    """``(mask_ratio, target)`` of an MAE layout, checked: the ratio in (0, 1), the target one of ``TARGETS``."""
    mask_ratio = float(layout["mask_ratio"])
    if not 0.0 < mask_ratio < 1.0:
        raise SSLInputError(f"ssl layout of 'mae': mask_ratio must lie in (0, 1), got {mask_ratio}")
    target = str(layout["target"])
    if target not in TARGETS:
        raise SSLInputError(f"ssl layout of 'mae': target must be one of {TARGETS}, got '{target}'")
    return mask_ratio, target


# ------------------------------------------------------------------------------------------------ Primus decoder
#: the layout keys of the light pretraining decoder of the Primus objectives that reconstruct (MAE, MiM)
PRIMUS_DECODER_DEFAULTS = {"decoder_width": 0.5, "decoder_depth": 1, "decoder_heads": 4, "pixel_head": "linear"}
PIXEL_HEADS = ("linear", "up_projection")


def build_primus_decoder(network: nn.Module, layout: dict, grid: Sequence[int], num_input_channels: int,
                         method: str):
    """``(TokenDecoder, pixel_head)`` of a Primus reconstruction objective from ``layout``'s decoder keys
    (:data:`PRIMUS_DECODER_DEFAULTS`): the decoder maps encoded visible tokens to all ``N = prod(grid)`` tokens,
    of ``C·u0·u1·u2`` voxel values each (``pixel_head`` linear) or of width ``E`` for the network's own
    ``up_projection``."""
    from ssl_nnunet.backbones.primus import TokenDecoder, decoder_width
    pixel_head = str(layout["pixel_head"])
    if pixel_head not in PIXEL_HEADS:
        raise SSLInputError(f"ssl layout of '{method}' (Primus): pixel_head must be one of {PIXEL_HEADS}, got "
                            f"'{pixel_head}'")
    E, heads = int(network.embed_dim), int(layout["decoder_heads"])
    voxels = num_input_channels * math.prod(int(t) for t in network.down_projection.proj.kernel_size)
    decoder = TokenDecoder(E, math.prod(int(g) for g in grid), decoder_width(E, layout["decoder_width"], heads),
                           int(layout["decoder_depth"]), heads, out_dim=voxels if pixel_head == "linear" else None)
    return decoder, pixel_head


def primus_pixels(network: nn.Module, decoded: torch.Tensor, grid: Sequence[int], unit: Sequence[int],
                  pixel_head: str) -> torch.Tensor:
    """The reconstruction ``(B, C, Z, Y, X)`` from the decoder's tokens ``decoded (B, N, ·)`` (see
    :func:`build_primus_decoder`): each token's voxels laid back (linear head) or ``up_projection`` of the
    token map."""
    from ssl_nnunet.backbones.primus import patches_to_volume, tokens_to_volume
    if pixel_head == "linear":
        return patches_to_volume(decoded, grid, unit)
    return network.up_projection(tokens_to_volume(decoded, grid))


def primus_untrained_up_projection(network: nn.Module, pixel_head: str) -> List[str]:
    """With the linear pixel head the network's ``up_projection`` never runs: its parameter names (as the method
    module names them), else none."""
    if pixel_head != "linear":
        return []
    return [f"network.up_projection.{n}" for n, _ in network.up_projection.named_parameters()]


@register
class MAE(SSLMethod):
    """Masked autoencoder on a nnU-Net U-Net (``ResidualEncoderUNet`` / ``PlainConvUNet``).

    Attributes:
        mask_unit: ``(u0, u1, u2)`` voxels per unit.
        mask_ratio: fraction of hidden units.
        target: ``"none"`` or ``"per_unit"``.
        variant: ``"sparse"`` or ``"dense"``.
        densify: :class:`Densify` (sparse variant only; not part of the exported network).
    """

    name = "mae"
    trained_parts = "encoder and decoder (the reconstruction decoder is the nnU-Net decoder)"
    layout_defaults = {"mask_ratio": 0.75, "target": "none", "variant": "sparse"}
    required_layout_keys = ("mask_unit",)

    @classmethod
    def variant_for(cls, architecture_family: str):
        """CNN: :class:`MAE` (sparse/dense); Primus: :class:`PrimusMAE` (token dropping)."""
        return {"cnn": MAE, "primus": PrimusMAE}.get(architecture_family)

    @classmethod
    def default_layout(cls, ctx: PlanningContext):
        """Mask unit q; re-masked stages: those whose cumulative stride divides q (METHODS.md §8)."""
        q = ctx.mask_quantum
        layout = {"mask_unit": list(q), "remask_strides": [s for s in ctx.cumulative_strides if divides(s, q)],
                  **copy.deepcopy(cls.layout_defaults)}
        return list(ctx.patch_size), layout

    @classmethod
    def check_layout(cls, method_plan: dict, ssl_plan: dict):
        if not divides(method_plan["layout"]["mask_unit"], method_plan["pretrain_patch_size"]):
            raise cls.layout_error(ssl_plan, "mask_unit", "does not divide the patch")
        return []

    def __init__(self, network: nn.Module, method_plan: dict, ssl_plan: dict, num_input_channels: int):
        super().__init__(network, method_plan, ssl_plan, num_input_channels)
        check_unet(network)
        layout = self.layout
        ndim = len(network.encoder.strides[0])
        self.mask_unit = tuple(per_axis_ints(layout["mask_unit"], ndim, "mask_unit", "mae"))
        self.mask_ratio, self.target = mask_ratio_and_target(layout)
        self.variant = str(layout["variant"])
        if self.variant not in VARIANTS:
            raise SSLInputError(f"ssl layout of 'mae': variant must be one of {VARIANTS}, got '{self.variant}'")

        self.remask_strides = derive_remask_strides(network, self.mask_unit)
        if not self.remask_strides:
            raise SSLInputError(f"ssl layout of 'mae': mask unit {self.mask_unit} is not a multiple of the first "
                                f"stage's stride {list(network.encoder.strides[0])}")
        if layout.get("remask_strides") is not None:
            given = [per_axis_ints(s, ndim, "remask_strides", "mae") for s in layout["remask_strides"]]
            if sorted(map(tuple, given)) != sorted(map(tuple, self.remask_strides)):
                raise SSLInputError(
                    f"ssl layout of 'mae': remask_strides {given} do not match the network, whose stages with a "
                    f"cumulative stride dividing mask_unit {list(self.mask_unit)} are {self.remask_strides}")
        if "pretrain_patch_size" in method_plan:
            try:
                unit_grid(method_plan["pretrain_patch_size"], self.mask_unit)
            except ValueError as e:
                raise SSLInputError(f"ssl plan of 'mae': {e}") from None

        n_out = getattr(network.decoder, "num_classes", num_input_channels)
        if n_out != num_input_channels:
            raise SSLInputError(f"MAE needs a network with num_classes = C_in = {num_input_channels}, "
                                f"got {n_out}")

        if self.variant == "sparse":
            convert_encoder_to_sparse(network)
            remasked = [list(s) in self.remask_strides for s in cumulative_strides(network)]
            self.densify: Optional[Densify] = Densify(network.encoder.output_channels, network.encoder.conv_op,
                                                      masked_stages=remasked)
        else:
            self.densify = None

    # --------------------------------------------------------------------------------------------------------
    def sample_mask(self, batch: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Unit mask ``(B, 1, n0, n1, n2)`` for ``batch (B, C, a0, a1, a2)``; 1 = visible."""
        grid = unit_grid(batch.shape[2:], self.mask_unit)
        return random_block_mask(batch.shape[0], grid, self.mask_ratio, device=batch.device, generator=generator)

    def reconstruct(self, batch: torch.Tensor, mask: torch.Tensor):
        """Masked forward: ``batch (B, C, a0, a1, a2)`` + unit mask → ``(enc, dec, rec (B, C, a0, a1, a2))``."""
        if self.variant == "sparse":
            return sparse_masked_forward(self.network, batch, mask, self.densify)
        m = expand_mask(mask, batch.shape[2:]).to(batch.dtype)
        return forward_features(self.network, batch * m)

    def make_target(self, batch: torch.Tensor) -> torch.Tensor:
        """Reconstruction target, float32 ``(B, C, a0, a1, a2)``."""
        if self.target == "per_unit":
            return per_unit_target(batch, self.mask_unit)
        return batch.detach().float()

    def forward(self, batch: torch.Tensor, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """``batch (B, C_in, a0, a1, a2)`` → ``{"loss": L_rec, "rec_loss": L_rec (detached)}`` (float32)."""
        if batch.dim() != 2 + len(self.mask_unit):
            raise ValueError(f"MAE expects a batch (B, C, a0, a1, a2), got shape {tuple(batch.shape)}")
        mask = self.sample_mask(batch, generator)
        _, _, rec = self.reconstruct(batch, mask)
        loss = masked_mse(rec.float(), self.make_target(batch), expand_mask(mask, batch.shape[2:]))
        return {"loss": loss, "rec_loss": loss.detach()}

    @torch.no_grad()
    def previews(self, batch: torch.Tensor) -> Dict[str, Sequence[torch.Tensor]]:
        """Rows of 3D tensors ``(a0, a1, a2)`` (sample 0, channel 0, float32 on CPU) for a preview image.

        ``input``, ``masked input`` (hidden voxels set to 0), ``reconstruction`` (network output),
        ``visible + reconstruction`` (input at visible voxels, output at hidden ones; in target units when
        the target is ``per_unit``). The mask is drawn with a fixed seed so previews are comparable over time.
        """
        x = batch[:1]
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0)
        mask = self.sample_mask(x, gen)
        _, _, rec = self.reconstruct(x, mask)
        m = expand_mask(mask, x.shape[2:])
        target = self.make_target(x)
        rec = rec.float()
        visible = m.bool()
        rows = {
            "input": [x[0, 0].float().cpu()],
            "masked input": [torch.where(visible, x.float(), 0.0)[0, 0].cpu()],
            "reconstruction": [rec[0, 0].cpu()],
            "visible + reconstruction": [torch.where(visible, target, rec)[0, 0].cpu()],
        }
        return rows


class PrimusMAE(MAE):
    """MAE on Primus with token dropping (METHODS.md §2.4, §3.1): the EVA encoder runs on the visible tokens only.

    ``x (B, C_in, Z, Y, X)``; a unit mask over the token grid (unit = one token, ``floor(ρ N + 0.5)`` hidden per
    sample); ``down_projection`` of the ``K = N - n_hidden`` visible tokens only (:func:`embed_visible`) ->
    :func:`eva_forward_visible` on them (position embedding and rotary table gathered with the same indices) -> :class:`TokenDecoder`
    (learnable mask token, ``decoder_depth`` blocks of width ``decoder_width · E``) -> the pixel head ->
    reconstruction ``(B, C_in, Z, Y, X)``; loss on the hidden tokens' voxels. Pixel head ``linear`` (default):
    MAE's per-token linear map to the token's ``C·8³`` voxels, so the network's ``up_projection`` — never
    transferred, the target gets a fresh one — costs nothing in pretraining (it is frozen and exported at its
    initialisation); ``up_projection``: the network's own patch decoder, trained.

    Layout keys: ``mask_unit`` (= the token size), ``mask_ratio`` 0.75, ``target`` none|per_unit,
    ``decoder_width`` 0.5, ``decoder_depth`` 1, ``decoder_heads`` 4, ``pixel_head`` linear|up_projection.
    Export keeps ``down_projection`` + ``eva``.
    """

    trained_parts = ("down_projection and eva (the encoder saw visible tokens only); the pretraining decoder and "
                     "up_projection are not transferred (the target gets a fresh up_projection for its classes)")
    layout_defaults = {"mask_ratio": 0.75, "target": "none", **PRIMUS_DECODER_DEFAULTS}

    @classmethod
    def default_layout(cls, ctx: PlanningContext):
        return list(ctx.patch_size), {"mask_unit": list(ctx.mask_quantum), **copy.deepcopy(cls.layout_defaults)}

    @classmethod
    def check_layout(cls, method_plan: dict, ssl_plan: dict):
        if list(method_plan["layout"]["mask_unit"]) != list(ssl_plan["mask_quantum"]):
            raise cls.layout_error(ssl_plan, "mask_unit", f"{method_plan['layout']['mask_unit']} is not the Primus "
                                                          f"token size {ssl_plan['mask_quantum']}")
        return []

    def __init__(self, network: nn.Module, method_plan: dict, ssl_plan: dict, num_input_channels: int):
        from ssl_nnunet.backbones.primus import is_primus, token_grid
        SSLMethod.__init__(self, network, method_plan, ssl_plan, num_input_channels)
        if not is_primus(network):
            raise SSLInputError(f"the Primus MAE needs a Primus network, got {type(network).__name__}")
        layout = self.layout
        token = tuple(int(t) for t in network.down_projection.proj.kernel_size)
        self.mask_unit = tuple(per_axis_ints(layout["mask_unit"], 3, "mask_unit", "mae"))
        if self.mask_unit != token:
            raise SSLInputError(f"ssl layout of 'mae' (Primus): mask_unit {list(self.mask_unit)} must be the token "
                                f"size {list(token)}")
        self.mask_ratio, self.target = mask_ratio_and_target(layout)
        self.variant = "tokens"
        try:
            self.grid = token_grid(method_plan["pretrain_patch_size"], token)
        except SSLInputError as e:
            raise SSLInputError(f"ssl plan of 'mae': {e}") from None
        self.decoder, self.pixel_head = build_primus_decoder(network, layout, self.grid, num_input_channels, "mae")
        self.densify = None

    def reconstruct(self, batch: torch.Tensor, mask: torch.Tensor):
        """``batch (B, C, Z, Y, X)`` + token mask ``(B, 1, n0, n1, n2)`` -> ``(encoded visible (B, K, E),
        decoded tokens (B, N, E), rec (B, C, Z, Y, X))``."""
        from ssl_nnunet.backbones.primus import encode_tokens, token_indices
        grid = tuple(mask.shape[2:])
        keep = token_indices(mask)
        enc = encode_tokens(self.network, batch, keep)
        dec = self.decoder(enc, keep)
        return enc, dec, primus_pixels(self.network, dec, grid, self.mask_unit, self.pixel_head)

    def untrained_parameters(self):
        """With the linear pixel head the network's ``up_projection`` never runs in pretraining."""
        return primus_untrained_up_projection(self.network, self.pixel_head)

    def forward(self, batch: torch.Tensor, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """``batch (B, C_in, Z, Y, X)`` -> ``{"loss", "rec_loss"}``: squared error over the hidden tokens' voxels.

        ``up_projection`` (transposed convolutions with kernel = stride, channel LayerNorm, GELU) acts on each
        token alone, so only the hidden tokens are decoded to voxels, laid out as a ``(B, E, n_hidden, 1, 1)``
        row -> ``(B, C, n_hidden·8, 8, 8)``, i.e. their ``(C, 8, 8, 8)`` patches; the loss equals :func:`masked_mse` of the full reconstruction."""
        from ssl_nnunet.backbones.primus import encode_tokens, gather_tokens, token_indices, volume_to_patches
        if batch.dim() != 5:
            raise ValueError(f"MAE expects a batch (B, C, a0, a1, a2), got shape {tuple(batch.shape)}")
        mask = self.sample_mask(batch, generator)
        grid = tuple(mask.shape[2:])
        keep, hidden = token_indices(mask), token_indices(1 - mask)
        enc = encode_tokens(self.network, batch, keep)
        dec = self.decoder(enc, keep)
        B, nh, E = hidden.shape[0], hidden.shape[1], dec.shape[-1]
        target = gather_tokens(volume_to_patches(self.make_target(batch), self.mask_unit), hidden)
        if self.pixel_head == "linear":
            loss = ((gather_tokens(dec, hidden).float() - target) ** 2).mean()
            return {"loss": loss, "rec_loss": loss.detach()}
        # the hidden tokens as a (B, E, n_hidden, 1, 1) row: one up_projection call of batch B, whose output
        # block i along the first axis is token i's (C, u0, u1, u2) patch
        row = gather_tokens(dec, hidden).transpose(1, 2).reshape(B, E, nh, 1, 1)
        u0, u1, u2 = self.mask_unit
        rec = self.network.up_projection(row)  # (B, C, nh·u0, u1, u2)
        C = rec.shape[1]
        rec = rec.reshape(B, C, nh, u0, u1, u2).permute(0, 2, 1, 3, 4, 5).reshape(B, nh, -1)
        loss = ((rec.float() - target) ** 2).mean()
        return {"loss": loss, "rec_loss": loss.detach()}
