"""Primus (dynamic-network-architectures' ViT for 3D segmentation) as an ssl_nnunet backbone.

What every part of ssl_nnunet needs to know about Primus, in one place (METHODS.md §2.4, §2.7):

* the sizes: :func:`primus_hyperparameters` reads embedding size, depth, heads and token size from
  nnunetv2's own Primus trainers (``nnUNet_Primus_S/B/M/L_Trainer``), so a plan is built with exactly the
  network ``nnUNetv2_train -tr nnUNet_Primus_M_Trainer`` builds; :func:`primus_architecture` writes them as an
  nnU-Net plans ``architecture`` entry (class ``Primus``, so the weights keep its key names
  ``down_projection.*``, ``eva.*``, ``up_projection.*``);
* the token grid and index mapping (:func:`token_grid`, :func:`token_indices`): token ``t`` of grid cell
  ``(i0, i1, i2)`` in a grid ``(n0, n1, n2)`` is ``t = (i0 n1 + i1) n2 + i2`` (C order, what Primus' own
  ``rearrange(b c w h d -> b (w h d) c)`` gives);
* the visible-token encoder :func:`eva_forward_visible`: absolute position embedding, gather of the kept
  tokens and of the rotary table with the same indices, the EVA blocks and the final norm — the encoder
  never sees a hidden token (dynamic-network-architectures' own ``patch_drop_rate`` path fails with timm
  < 1.0.23 and draws its own random set, so it is not used);
* :func:`adapt_primus_weights`: pretrained ``down_projection`` + ``eva`` into a downstream Primus with its own
  (freshly initialised) ``up_projection`` and, when the fine-tuning patch differs, the position embedding
  interpolated over the token grid.
"""
from __future__ import annotations

import inspect
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ssl_nnunet.utilities.errors import SSLInputError

PRIMUS_CLASS = "dynamic_network_architectures.architectures.primus.Primus"
#: ``-arch`` name -> nnunetv2's fine-tuning trainer of that size
PRIMUS_TRAINERS = {"primus_s": "nnUNet_Primus_S_Trainer", "primus_b": "nnUNet_Primus_B_Trainer",
                   "primus_m": "nnUNet_Primus_M_Trainer", "primus_l": "nnUNet_Primus_L_Trainer"}
#: the CPU fine-tuning trainer (builds the Primus of the plan; ``nnunet_trainers/nnUNet_Primus_SSLSmoke_Trainer``)
PRIMUS_CPU_TRAINER = "nnUNet_Primus_SSLSmoke_Trainer"
#: the keys of ``Primus.__init__`` a plan carries (besides ``input_channels`` / ``num_classes``)
_PLAN_KWARGS = ("embed_dim", "patch_embed_size", "eva_depth", "eva_numheads", "input_shape", "drop_path_rate",
                "scale_attn_inner", "init_values")


def is_primus_plan(plans: dict, configuration: str = "3d_fullres") -> bool:
    """True when ``plans``' configuration builds a Primus."""
    name = plans["configurations"][configuration]["architecture"]["network_class_name"]
    return name.split(".")[-1].startswith("Primus")


def is_primus(network: nn.Module) -> bool:
    from dynamic_network_architectures.architectures.primus import Primus
    return isinstance(network, Primus)


def primus_hyperparameters(arch: str) -> dict:
    """Embedding size, depth, heads, token size and regularisation of nnunetv2's ``-tr`` trainer of ``arch``.

    The trainer's ``build_network_architecture`` is called with the ``Primus`` constructor replaced by a
    recorder (nothing is built), so the numbers are the trainer's own, not a copy."""
    if arch not in PRIMUS_TRAINERS:
        raise SSLInputError(f"Unknown Primus size -arch {arch}; choose one of {', '.join(PRIMUS_TRAINERS)}.")
    from types import SimpleNamespace

    from dynamic_network_architectures.architectures.primus import Primus
    from nnunetv2.training.nnUNetTrainer.primus import primus_trainers as pt
    recorded = {}

    def recorder(*args, **kwargs):
        bound = inspect.signature(Primus.__init__).bind(None, *args, **kwargs)
        recorded.update({k: v for k, v in bound.arguments.items() if k != "self"})

    trainer = getattr(pt, PRIMUS_TRAINERS[arch])
    original = pt.Primus
    pt.Primus = recorder
    try:
        trainer.build_network_architecture(None, SimpleNamespace(patch_size=(64, 64, 64)), 1, 2, False)
    finally:
        pt.Primus = original
    return {"embed_dim": int(recorded["embed_dim"]), "patch_embed_size": [int(p) for p in recorded["patch_embed_size"]],
            "eva_depth": int(recorded["eva_depth"]), "eva_numheads": int(recorded["eva_numheads"]),
            "drop_path_rate": float(recorded.get("drop_path_rate", 0.0)),
            "scale_attn_inner": bool(recorded.get("scale_attn_inner", False)),
            "init_values": recorded.get("init_values")}


def check_primus_sizes(embed_dim: int, num_heads: int, patch: Sequence[int], token: Sequence[int],
                       where: str) -> None:
    """The constraints of dynamic-network-architectures' Primus: ``patch % token == 0`` per axis, and the
    rotary embedding's ``embed_dim / num_heads / 1.5`` an integer divisible by 4."""
    if any(int(p) % int(t) for p, t in zip(patch, token)):
        raise SSLInputError(f"{where}: patch {list(patch)} is not a multiple of the Primus token size {list(token)}; "
                            f"choose a patch whose every axis is a multiple of {list(token)}.")
    rope = embed_dim / num_heads / 1.5
    if rope != int(rope) or int(rope) % 4:
        raise SSLInputError(f"{where}: Primus embed_dim {embed_dim} with {num_heads} heads gives a rotary dimension "
                            f"{rope:g}; it must be an integer divisible by 4 (embed_dim / heads / 1.5).")


def primus_architecture(hp: dict, patch: Sequence[int]) -> dict:
    """The nnU-Net plans ``architecture`` entry of a Primus with hyper-parameters ``hp`` for input ``patch``."""
    check_primus_sizes(hp["embed_dim"], hp["eva_numheads"], patch, hp["patch_embed_size"], "Primus plan")
    kwargs = {k: hp[k] for k in _PLAN_KWARGS if k != "input_shape"}
    kwargs["input_shape"] = [int(p) for p in patch]
    kwargs["patch_embed_size"] = [int(t) for t in hp["patch_embed_size"]]
    return {"network_class_name": PRIMUS_CLASS, "arch_kwargs": kwargs, "_kw_requires_import": []}


def build_primus(arch_kwargs: dict, num_input_channels: int, num_classes: int) -> nn.Module:
    """``Primus(input_channels, num_classes, **arch_kwargs)`` (a plans' ``arch_kwargs``)."""
    from dynamic_network_architectures.architectures.primus import Primus
    kw = dict(arch_kwargs)
    kw["patch_embed_size"] = tuple(kw["patch_embed_size"])
    kw["input_shape"] = tuple(kw["input_shape"])
    return Primus(input_channels=num_input_channels, num_classes=num_classes, **kw)


# ------------------------------------------------------------------------------------------------ tokens

def token_grid(patch: Sequence[int], token: Sequence[int]) -> Tuple[int, ...]:
    """``(n0, n1, n2) = patch / token`` (raises :class:`SSLInputError` when it does not divide)."""
    if any(int(p) % int(t) for p, t in zip(patch, token)):
        raise SSLInputError(f"patch {list(patch)} is not a multiple of the Primus token size {list(token)}")
    return tuple(int(p) // int(t) for p, t in zip(patch, token))


def tokens_from_volume(network: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, ...]]:
    """Patch embedding: ``x (B, C, Z, Y, X)`` -> tokens ``(B, N, E)`` in C order and the grid ``(n0, n1, n2)``."""
    t = network.down_projection(x)
    grid = tuple(t.shape[2:])
    return t.flatten(2).transpose(1, 2), grid


def tokens_to_volume(tokens: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """``(B, N, E)`` -> ``(B, E, n0, n1, n2)`` (inverse of the flattening in :func:`tokens_from_volume`)."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *grid)


def token_indices(visible: torch.Tensor) -> torch.Tensor:
    """Sorted flat indices ``(B, n_keep)`` of the visible tokens of a unit mask ``(B, 1, n0, n1, n2)`` or
    ``(B, N)`` (1 = visible). Every sample must keep the same number of tokens."""
    flat = visible.reshape(visible.shape[0], -1).bool()
    counts = flat.sum(1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"every sample must keep the same number of tokens, got {counts.tolist()}")
    n_keep = int(counts[0])
    # stable sort puts the visible tokens first, in increasing index order
    order = torch.sort((~flat).to(torch.int8), dim=1, stable=True).indices
    return order[:, :n_keep]


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x (B, N, E)``, ``index (B, K)`` -> ``(B, K, E)``."""
    return torch.gather(x, 1, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def scatter_tokens(visible: torch.Tensor, index: torch.Tensor, fill: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Full sequence ``(B, N, E)``: ``fill (1, 1, E)`` (e.g. a learnable mask token) everywhere, ``visible
    (B, K, E)`` back at its own indices ``index (B, K)``."""
    B, _, E = visible.shape
    full = fill.to(visible.dtype).expand(B, num_tokens, E)
    return full.scatter(1, index.unsqueeze(-1).expand(-1, -1, E), visible)


def volume_to_patches(x: torch.Tensor, unit: Sequence[int]) -> torch.Tensor:
    """``(B, C, Z, Y, X)`` -> ``(B, N, C·u0·u1·u2)``: each token's voxels (C order within), tokens in C order."""
    B, C = x.shape[:2]
    (u0, u1, u2) = unit
    n0, n1, n2 = x.shape[2] // u0, x.shape[3] // u1, x.shape[4] // u2
    x = x.reshape(B, C, n0, u0, n1, u1, n2, u2).permute(0, 2, 4, 6, 1, 3, 5, 7)
    return x.reshape(B, n0 * n1 * n2, C * u0 * u1 * u2)


def patches_to_volume(patches: torch.Tensor, grid: Sequence[int], unit: Sequence[int]) -> torch.Tensor:
    """``(B, N, C·u0·u1·u2)`` over the token grid ``(n0, n1, n2)`` -> ``(B, C, Z, Y, X)`` (inverse of
    :func:`volume_to_patches`)."""
    B = patches.shape[0]
    (n0, n1, n2), (u0, u1, u2) = grid, unit
    C = patches.shape[2] // (u0 * u1 * u2)
    x = patches.reshape(B, n0, n1, n2, C, u0, u1, u2).permute(0, 4, 1, 5, 2, 6, 3, 7)
    return x.reshape(B, C, n0 * u0, n1 * u1, n2 * u2)


def embed_visible(network: nn.Module, x: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
    """``down_projection`` of the visible tokens only: ``x (B, C, Z, Y, X)``, ``keep_idx (B, K)`` -> ``(B, K, E)``.

    Primus' patch embedding is a convolution with kernel = stride = token size, i.e. one linear map per token;
    applied to the gathered visible patches with the same weight and bias it gives exactly the conv's tokens
    (same parameters, same keys) at a quarter of the cost at 75 % masking."""
    conv = network.down_projection.proj
    patches = gather_tokens(volume_to_patches(x, conv.kernel_size), keep_idx)
    return torch.nn.functional.linear(patches, conv.weight.reshape(conv.weight.shape[0], -1), conv.bias)


def eva_forward_visible(eva: nn.Module, tokens: torch.Tensor, keep_idx: Optional[torch.Tensor],
                        gathered: bool = False) -> torch.Tensor:
    """dynamic-network-architectures' ``Eva.forward_features`` on the tokens ``keep_idx`` only.

    Args:
        eva: ``Primus.eva`` (no register tokens, no ``patch_drop_rate``).
        tokens: ``(B, N, E)``, all tokens of the grid (C order).
        keep_idx: ``(B, K)`` sorted token indices, the same count per sample; ``None`` = all tokens.
        gathered: ``tokens`` already holds only the ``K`` kept tokens ``(B, K, E)`` (:func:`embed_visible`).

    Returns:
        ``(B, K, E)``: the encoded visible tokens (after the final norm).
    """
    if getattr(eva, "num_prefix_tokens", 0):
        raise SSLInputError("Primus with register tokens is not supported by the visible-token encoder")
    if getattr(eva, "patch_drop", None) is not None:
        raise SSLInputError("build the Primus with patch_drop_rate=0: tokens are selected by the objective")
    x = tokens
    if eva.pos_embed is not None:
        pos = eva.pos_embed
        if gathered:
            pos = gather_tokens(pos.expand(x.shape[0], -1, -1), keep_idx)
        x = x + pos
    x = eva.pos_drop(x)
    rope = eva.rope.get_embed() if eva.rope is not None else None  # (N, D_rope)
    if keep_idx is not None:
        if not gathered:
            x = gather_tokens(x, keep_idx)
        if rope is not None:  # the same indices; (B, 1, K, D) broadcasts over the heads
            rope = rope[keep_idx].unsqueeze(1)
    for blk in eva.blocks:
        x = blk(x, rope=rope)
    return eva.norm(x)


def encode_tokens(network: nn.Module, x: torch.Tensor, keep_idx: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Primus' encoder (``down_projection`` + ``eva``) on ``x (B, C, Z, Y, X)``: the encoded tokens ``(B, K, E)`` of
    ``keep_idx (B, K)`` (only those are embedded and attended over), or of every token ``(B, N, E)`` in C order
    when ``keep_idx`` is None. The objectives' one entry point to the Primus encoder."""
    if keep_idx is None:
        tokens, _ = tokens_from_volume(network, x)
        return eva_forward_visible(network.eva, tokens, None)
    return eva_forward_visible(network.eva, embed_visible(network, x, keep_idx), keep_idx, gathered=True)


def token_map(network: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The encoded token grid of ``x`` as a feature map ``(B, E, n0, n1, n2)`` (every token encoded; the
    Primus counterpart of a CNN's bottleneck map)."""
    grid = tuple(int(s) // int(k) for s, k in zip(x.shape[2:], network.down_projection.proj.kernel_size))
    return tokens_to_volume(encode_tokens(network, x), grid)


# ------------------------------------------------------------------------------------------------ transfer

def interpolate_pos_embed(pos_embed: torch.Tensor, old_grid: Sequence[int], new_grid: Sequence[int]) -> torch.Tensor:
    """``(1, prod(old_grid), E)`` -> ``(1, prod(new_grid), E)``, trilinear over the token grid."""
    E = pos_embed.shape[-1]
    vol = pos_embed.reshape(1, *old_grid, E).permute(0, 4, 1, 2, 3)
    out = torch.nn.functional.interpolate(vol.float(), size=tuple(new_grid), mode="trilinear", align_corners=False)
    return out.permute(0, 2, 3, 4, 1).reshape(1, -1, E).to(pos_embed.dtype)


def adapt_primus_weights(pretrained: Dict[str, torch.Tensor], fresh: Dict[str, torch.Tensor],
                         pretrain_patch: Sequence[int], target_patch: Sequence[int],
                         token: Sequence[int]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """Weights for a downstream Primus whose state dict (at initialisation) is ``fresh``.

    ``down_projection.*`` and ``eva.*`` come from ``pretrained``; ``up_projection.*`` and the ``mask_token``
    buffer stay ``fresh`` (the decoder's widths depend on the target's class count). When the target patch
    differs, ``eva.pos_embed`` is interpolated from the pretraining token grid to the target's. Returns
    ``(weights, notes)``; raises :class:`SSLInputError` naming the key when a transferred tensor does not fit."""
    out, notes = {}, []
    old_grid, new_grid = token_grid(pretrain_patch, token), token_grid(target_patch, token)
    for key, value in fresh.items():
        if not key.startswith(("down_projection.", "eva.")):
            out[key] = value
            continue
        if key not in pretrained:
            raise SSLInputError(f"pretrained weights lack '{key}' of the downstream Primus; were they pretrained "
                                f"with the same Primus size? Re-export from a matching plan.")
        w = pretrained[key]
        if key == "eva.pos_embed" and w.shape != value.shape:
            if w.shape[1] != int(torch.tensor(old_grid).prod()):
                raise SSLInputError(f"eva.pos_embed has {w.shape[1]} tokens, but the pretraining patch "
                                    f"{list(pretrain_patch)} gives {list(old_grid)}")
            w = interpolate_pos_embed(w, old_grid, new_grid)
            notes.append(f"eva.pos_embed interpolated from the pretraining token grid {list(old_grid)} (patch "
                         f"{list(pretrain_patch)}) to {list(new_grid)} (patch {list(target_patch)})")
        if w.shape != value.shape:
            raise SSLInputError(f"'{key}': pretrained shape {tuple(w.shape)} does not fit the downstream Primus "
                                f"{tuple(value.shape)}; pretrain and fine-tune the same Primus size.")
        out[key] = w
    notes.append("transferred down_projection.* and eva.*; up_projection.* freshly initialised for the target's "
                 "classes")
    return out, notes


# ------------------------------------------------------------------------------------------------ pretraining decoder

class TokenDecoder(nn.Module):
    """A light MAE-style pretraining decoder over the full token grid (not part of Primus; never exported).

    Encoded visible tokens ``(B, K, E)`` -> linear to the decoder width ``d`` -> scattered into a learnable
    mask token ``(1, 1, d)`` at their own indices -> + a learnable position embedding ``(1, N, d)`` ->
    ``depth`` pre-norm transformer blocks (timm's ``Block``) -> LayerNorm -> linear to ``out_dim`` -> ``(B, N, out_dim)``:
    ``out_dim = E`` feeds the network's ``up_projection``; ``out_dim = C·u0·u1·u2`` predicts each token's voxels
    directly (MAE's linear pixel head). ``depth = 0`` keeps only the linear maps. Its cost runs over all N tokens,
    so it is kept narrow and shallow (MAE's lesson).
    """

    def __init__(self, embed_dim: int, num_tokens: int, dim: int, depth: int, heads: int,
                 out_dim: Optional[int] = None):
        super().__init__()
        from timm.models.vision_transformer import Block
        if dim % heads:
            raise SSLInputError(f"Primus pretraining decoder: width {dim} is not divisible by {heads} heads")
        self.num_tokens = int(num_tokens)
        self.embed = nn.Linear(embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, dim))
        self.blocks = nn.ModuleList([Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, embed_dim if out_dim is None else int(out_dim))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def features(self, visible: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """The decoded tokens before the output map: ``visible (B, K, E)``, ``keep_idx (B, K)`` -> ``(B, N, d)``
        (after the final LayerNorm; MiM's alignment features)."""
        x = scatter_tokens(self.embed(visible), keep_idx, self.mask_token, self.num_tokens) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, visible: torch.Tensor, keep_idx: torch.Tensor) -> torch.Tensor:
        """``visible (B, K, E)``, ``keep_idx (B, K)`` -> ``(B, N, out_dim)``."""
        return self.out(self.features(visible, keep_idx))


def decoder_width(embed_dim: int, fraction: float, heads: int) -> int:
    """Decoder width ``≈ fraction · embed_dim``, a multiple of ``heads`` (at least ``heads``)."""
    return max(heads, int(round(embed_dim * float(fraction) / heads)) * heads)
