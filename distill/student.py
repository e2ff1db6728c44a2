"""The PartDistill student: a Point-M2AE hierarchical encoder and a per-point MLP head.

Encoder (Zhang et al., NeurIPS 2022, "Point-M2AE: Multi-scale Masked Autoencoders for Hierarchical
Point Cloud Pre-training", §3.2 and the official ``H_Encoder_seg``):

1. **Tokenise**, S stages (paper: 3): stage 1 selects ``num_groups[0]`` centres of the N points by
   farthest point sampling (FPS, deterministic start at point 0 as ``pointnet2_ops``) and groups the
   ``group_sizes[0]`` nearest points of each (:func:`distill.geometry.group`, relative coordinates);
   stage s > 1 selects ``num_groups[s]`` of the stage s-1 centres by FPS and groups their
   ``group_sizes[s]`` nearest stage s-1 centres.
2. **Token embedding**: stage 1 embeds each group of points by a mini-PointNet (shared MLP, max-pool,
   concatenation of the pooled feature to every point, shared MLP, max-pool); stage s > 1 embeds each
   group of stage s-1 *tokens* the same way (token merging, the paper's downsampling).
3. **Transformer blocks** (pre-norm, GELU MLP, stochastic depth), with a positional embedding
   ``Linear-GELU-Linear`` of the centre coordinates added before every block. Attention is *local*:
   a token attends only to tokens whose centres lie within ``local_radius[s]`` (an attention mask;
   radius 0 = global attention). Each stage ends with a LayerNorm.

Head (PartDistill, Umam et al., CVPR 2024, §3.5: a 4-layer MLP distillation head on the encoder's
per-point features; sizes from the official ``StudentNetworks``): each stage's token features are
propagated to all N points by 3-NN inverse-distance interpolation
(:func:`distill.geometry.three_nn_interpolate`) and prefixed with the points' xyz
(``[xyz, f_1, xyz, f_2, xyz, f_3]``: 3+96+3+192+3+384 = 681 channels at paper size), then
``Linear-ReLU`` x3 and a last ``Linear`` -> logits ``[B, N, R]``. The official code uses hidden widths
681/681/681 and no dropout (``fc1..fc4``), the default here (``head_widths=None``,
``head_dropout=0``); both are configurable.

Modes: ``freeze_encoder=True`` (PartDistill's setting: a pretrained encoder, only the head learns) keeps
the encoder in eval mode — its BatchNorm statistics and stochastic depth stay fixed even after
``student.train()`` (the official code calls ``.train()`` on the whole model, which puts the frozen
encoder's BatchNorm back into training mode; here :meth:`Student.train` does not) — and computes it
without autograd; ``freeze_encoder=False`` trains everything.

:meth:`Student.load_encoder` reads our pretraining export (``distill.pretrain``: a folder with
``config.json`` + safetensors), a ``.safetensors`` file, or an official Point-M2AE / PartDistill
``.pth`` checkpoint, with strict key and shape checks (missing / unexpected keys are an error that
lists them). Module names follow the official ``H_Encoder`` so official keys map one to one; the
official 1x1 ``Conv1d`` weights ``[out, in, 1]`` are stored here as ``Linear`` weights ``[out, in]``.

All models are diffusers ``ModelMixin`` + ``ConfigMixin`` (like :class:`gen3d.dit3d.DiT3D`):
``save_pretrained(dir)`` / ``from_pretrained(dir)`` write and read safetensors + ``config.json``.
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from gen3d.config import read_yaml_config
from gen3d.sampling import farthest_point_sample

from .geometry import gather_points, knn, three_nn_interpolate

#: constructor arguments of :class:`PointM2AEEncoder` (shared by :class:`Student` and the pretrainer)
ENCODER_ARGS = ("num_groups", "group_sizes", "encoder_dims", "encoder_depths", "num_heads", "local_radius",
                "embed_hidden", "mlp_ratio", "drop_path_rate")

#: paper sizes (Point-M2AE pre-training config and the PartDistill student)
PAPER_ENCODER = {"num_groups": (512, 256, 64), "group_sizes": (16, 8, 8), "encoder_dims": (96, 192, 384),
                 "encoder_depths": (5, 5, 5), "num_heads": 6, "local_radius": (0.32, 0.64, 1.28),
                 "embed_hidden": (128, 256, 512), "mlp_ratio": 4.0, "drop_path_rate": 0.1}


# ----------------------------------------------------------------------------------------------
# Transformer pieces (names follow the official Point-M2AE modules, so checkpoint keys match)
# ----------------------------------------------------------------------------------------------
class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016): zero a residual branch per sample with probability p."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = float(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class Mlp(nn.Module):
    """``fc1 - GELU - fc2`` of a transformer block."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention (no qkv bias, as Point-M2AE) with an optional boolean mask.

    ``forward(x [B, T, D], mask bool [B, T, T] | None) -> [B, T, D]``; ``mask[b, i, j]`` True lets
    token i attend to token j. Every row of the mask must allow at least one token.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask[:, None])
        return self.proj(out.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm1(x)), x + mlp(norm2(x))`` with stochastic depth."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class BlockStack(nn.Module):
    """A stage's blocks; the positional embedding is added before every block (Point-M2AE)."""

    def __init__(self, dim: int, depth: int, heads: int, mlp_ratio: float, drop_path: Sequence[float]):
        super().__init__()
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, drop_path[i]) for i in range(depth))

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x + pos, mask)
        return x


def _pointwise_mlp(c_in: int, hidden: int, c_out: int) -> nn.Sequential:
    """``Linear - BatchNorm1d - ReLU - Linear`` on rows (the official 1x1 Conv1d stack)."""
    return nn.Sequential(nn.Linear(c_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
                         nn.Linear(hidden, c_out))


class TokenEmbed(nn.Module):
    """Mini-PointNet embedding of groups (Point-M2AE ``Token_Embed``).

    ``forward(groups [B, G, K, C_in]) -> [B, G, C_out]``: shared MLP ``first_conv`` on every member,
    max-pool over K, concatenate the pooled feature to every member, shared MLP ``second_conv``,
    max-pool. Stage 1 (``C_in = 3``, relative xyz) uses widths ``hidden = (h1, h2, h3)``
    (official: 128, 256, 512); token merging (``C_in`` = previous width) uses ``C_in`` hidden widths
    and ``C_out`` in the second MLP, as the official code does.
    """

    def __init__(self, c_in: int, c_out: int, hidden: Sequence[int] | None = None):
        super().__init__()
        self.c_out = c_out
        if hidden is not None:
            h1, h2, h3 = hidden
            self.first_conv = _pointwise_mlp(c_in, h1, h2)
            self.second_conv = _pointwise_mlp(2 * h2, h3, c_out)
        else:
            self.first_conv = _pointwise_mlp(c_in, c_in, c_in)
            self.second_conv = _pointwise_mlp(2 * c_in, c_out, c_out)

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        b, g, k, c = groups.shape
        f = self.first_conv(groups.reshape(b * g * k, c)).view(b * g, k, -1)
        f = torch.cat([f.amax(1, keepdim=True).expand(-1, k, -1), f], -1)
        f = self.second_conv(f.reshape(b * g * k, -1)).view(b * g, k, -1)
        return f.amax(1).view(b, g, self.c_out)


def _pos_embed(dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(3, dim), nn.GELU(), nn.Linear(dim, dim))


# ----------------------------------------------------------------------------------------------
# Encoder
# ----------------------------------------------------------------------------------------------
@dataclass
class Tokenization:
    """Multi-scale groups of a batch of clouds (:meth:`PointM2AEEncoder.tokenize`).

    Attributes:
        centers: per stage ``float [B, G_s, 3]``.
        idx: per stage ``int64 [B, G_s, K_s]``: stage 1 indexes the N points, stage s > 1 the
            stage s-1 centres.
        neighborhood: ``float [B, G_1, K_1, 3]`` stage-1 groups relative to their centres.
    """

    centers: list[torch.Tensor]
    idx: list[torch.Tensor]
    neighborhood: torch.Tensor


@dataclass
class EncoderOutput:
    """Output of :class:`PointM2AEEncoder`.

    Attributes:
        features: per stage ``float [B, G_s, C_s]`` (after the stage's LayerNorm); with a visibility
            mask, masked tokens are zero.
        tokens: the :class:`Tokenization` used.
        visible: per stage ``bool [B, G_s]``, or None when nothing was masked.
    """

    features: list[torch.Tensor]
    tokens: Tokenization
    visible: list[torch.Tensor] | None = field(default=None)


def _pack(visible: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Order that moves each row's visible tokens first: ``(order int64 [B, L], valid bool [B, L])``
    with L the largest visible count; ``valid`` marks real (not padding) entries."""
    counts = visible.sum(1)
    length = max(int(counts.max()), 1)
    order = torch.argsort((~visible).to(torch.int8), dim=1, stable=True)[:, :length]
    valid = torch.arange(length, device=visible.device)[None] < counts[:, None]
    return order, valid


def _attention_mask(centers: torch.Tensor, radius: float, valid: torch.Tensor | None) -> torch.Tensor | None:
    """``bool [B, T, T]``: key j within ``radius`` of query i (if radius > 0) and a real token (if
    ``valid``); every token may attend to itself so that no row is empty."""
    if radius <= 0 and valid is None:
        return None
    b, t, _ = centers.shape
    mask = torch.ones(b, t, t, dtype=torch.bool, device=centers.device)
    if radius > 0:
        mask &= torch.cdist(centers.float(), centers.float(), compute_mode="donot_use_mm_for_euclid_dist") < radius
    if valid is not None:
        mask &= valid[:, None, :]
    return mask | torch.eye(t, dtype=torch.bool, device=centers.device)


class PointM2AEEncoder(ModelMixin, ConfigMixin):
    """Point-M2AE hierarchical encoder (see the module docstring).

    Args:
        num_groups: centres per stage, non-increasing (paper: 512, 256, 64).
        group_sizes: kNN group size per stage (paper: 16, 8, 8); ``group_sizes[s] <= num_groups[s-1]``.
        encoder_dims: token width per stage (paper: 96, 192, 384), each divisible by ``num_heads``.
        encoder_depths: transformer blocks per stage (paper: 5, 5, 5).
        num_heads: attention heads (paper: 6).
        local_radius: attention radius per stage in unit-sphere units (paper: 0.32, 0.64, 1.28;
            0 = global).
        embed_hidden: stage-1 mini-PointNet widths ``(h1, h2, h3)`` (official: 128, 256, 512).
        mlp_ratio: transformer MLP width / token width.
        drop_path_rate: stochastic depth, linearly increasing from 0 to this over all blocks.

    ``forward(points float [B, N, 3]) -> EncoderOutput``; N must be at least ``num_groups[0]`` and
    ``group_sizes[0]``.

    Raises:
        ValueError: inconsistent sizes (different numbers of stages, increasing ``num_groups``, a group
        larger than the previous stage, widths not divisible by the heads).
    """

    @register_to_config
    def __init__(self, num_groups: Sequence[int] = (512, 256, 64), group_sizes: Sequence[int] = (16, 8, 8),
                 encoder_dims: Sequence[int] = (96, 192, 384), encoder_depths: Sequence[int] = (5, 5, 5),
                 num_heads: int = 6, local_radius: Sequence[float] = (0.32, 0.64, 1.28),
                 embed_hidden: Sequence[int] = (128, 256, 512), mlp_ratio: float = 4.0, drop_path_rate: float = 0.1):
        super().__init__()
        _check_encoder_sizes(num_groups, group_sizes, encoder_dims, encoder_depths, num_heads, local_radius, embed_hidden)
        self.num_stages = len(num_groups)
        dims = list(encoder_dims)
        self.token_embed = nn.ModuleList(
            TokenEmbed(3, dims[0], tuple(embed_hidden)) if s == 0 else TokenEmbed(dims[s - 1], dims[s])
            for s in range(self.num_stages))
        self.encoder_pos_embeds = nn.ModuleList(_pos_embed(d) for d in dims)
        dpr = torch.linspace(0, drop_path_rate, sum(encoder_depths)).tolist()
        starts = [sum(encoder_depths[:s]) for s in range(self.num_stages)]
        self.encoder_blocks = nn.ModuleList(
            BlockStack(dims[s], encoder_depths[s], num_heads, mlp_ratio, dpr[starts[s]:starts[s] + encoder_depths[s]])
            for s in range(self.num_stages))
        self.encoder_norms = nn.ModuleList(nn.LayerNorm(d) for d in dims)
        self.apply(_init_weights)

    @property
    def out_dims(self) -> list[int]:
        """Token width per stage."""
        return list(self.config.encoder_dims)

    def tokenize(self, points: torch.Tensor, fps_start: int = 0) -> Tokenization:
        """FPS centres and kNN groups of every stage.

        Args:
            points: ``float [B, N, 3]``.
            fps_start: index of the first FPS centre at every stage (0, as ``pointnet2_ops``).

        Raises:
            ValueError: ``points`` not ``[B, N, 3]`` or N smaller than ``num_groups[0]`` / ``group_sizes[0]``.
        """
        if points.dim() != 3 or points.shape[-1] != 3:
            raise ValueError(f"points must be [B, N, 3], got {tuple(points.shape)}")
        n = points.shape[1]
        need = max(self.config.num_groups[0], self.config.group_sizes[0])
        if n < need:
            raise ValueError(f"this encoder needs at least {need} points per cloud, got {n}")
        centers, idx = [], []
        src = points
        with torch.no_grad():
            for s in range(self.num_stages):
                sel = farthest_point_sample(src.detach(), self.config.num_groups[s], fps_start)
                c = gather_points(src, sel)
                idx.append(knn(c, src, self.config.group_sizes[s]).idx)
                centers.append(c)
                src = c
        neighborhood = gather_points(points, idx[0]) - centers[0].unsqueeze(2)
        return Tokenization(centers, idx, neighborhood)

    def encode(self, tokens: Tokenization, visible: Sequence[torch.Tensor] | None = None,
               local_attention: bool = True) -> list[torch.Tensor]:
        """Run the token embeddings and transformer stages.

        Args:
            tokens: from :meth:`tokenize`.
            visible: optional per stage ``bool [B, G_s]`` (masked autoencoding): only visible tokens
                enter the transformer (packed, padded to the longest row); a visible token's group
                must be visible at the previous stage (:func:`distill.pretrain.multiscale_mask`).
            local_attention: restrict attention to ``local_radius`` (Point-M2AE disables it for
                pre-training).

        Returns:
            per stage ``float [B, G_s, C_s]``, normalised; masked tokens are zero.
        """
        outs = []
        x_full = None
        for s in range(self.num_stages):
            if s == 0:
                tok = self.token_embed[0](tokens.neighborhood)
            else:
                tok = self.token_embed[s](gather_points(x_full, tokens.idx[s]))
            centers = tokens.centers[s]
            pos = self.encoder_pos_embeds[s](centers)
            radius = self.config.local_radius[s] if local_attention else 0.0
            if visible is None:
                x_full = self.encoder_blocks[s](tok, pos, _attention_mask(centers, radius, None))
                outs.append(self.encoder_norms[s](x_full))
                continue
            vis = visible[s]
            order, valid = _pack(vis)
            xp, pp, cp = gather_points(tok, order), gather_points(pos, order), gather_points(centers, order)
            xp = self.encoder_blocks[s](xp, pp, _attention_mask(cp, radius, valid))
            xp = torch.where(valid[..., None], xp, gather_points(tok, order))
            index = order[..., None].expand(-1, -1, xp.shape[-1])
            # masked tokens keep their embedding (they only feed masked tokens of the next stage)
            x_full = tok.scatter(1, index, xp)
            outs.append(self.encoder_norms[s](x_full) * vis[..., None].to(x_full.dtype))
        return outs

    def forward(self, points: torch.Tensor, local_attention: bool = True, fps_start: int = 0) -> EncoderOutput:
        """Encode whole clouds: ``points float [B, N, 3]`` -> :class:`EncoderOutput` (no masking)."""
        tokens = self.tokenize(points, fps_start)
        return EncoderOutput(self.encode(tokens, None, local_attention), tokens, None)


def _check_encoder_sizes(num_groups, group_sizes, dims, depths, heads, radius, embed_hidden) -> None:
    lens = {len(num_groups), len(group_sizes), len(dims), len(depths), len(radius)}
    if len(lens) != 1 or not num_groups:
        raise ValueError("num_groups, group_sizes, encoder_dims, encoder_depths and local_radius need one entry "
                         f"per stage; got lengths {[len(num_groups), len(group_sizes), len(dims), len(depths), len(radius)]}")
    if any(b > a for a, b in itertools.pairwise(num_groups)) or min(num_groups) < 1:
        raise ValueError(f"num_groups must be positive and non-increasing, got {list(num_groups)}")
    for s in range(1, len(num_groups)):
        if not 1 <= group_sizes[s] <= num_groups[s - 1]:
            raise ValueError(f"group_sizes[{s}]={group_sizes[s]} must be in [1, num_groups[{s - 1}]={num_groups[s - 1]}]")
    if group_sizes[0] < 1:
        raise ValueError(f"group_sizes[0] must be >= 1, got {group_sizes[0]}")
    bad = [d for d in dims if d % heads]
    if bad:
        raise ValueError(f"encoder_dims {bad} are not divisible by num_heads={heads}")
    if len(embed_hidden) != 3:
        raise ValueError(f"embed_hidden must be 3 widths (h1, h2, h3), got {list(embed_hidden)}")


def _init_weights(m: nn.Module) -> None:
    """Point-M2AE initialisation: truncated normal (std 0.02) linear weights, zero biases, unit LayerNorm."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# ----------------------------------------------------------------------------------------------
# Loading encoder weights
# ----------------------------------------------------------------------------------------------
class EncoderLoadError(ValueError):
    """Encoder weights that do not match the encoder: missing / unexpected keys, wrong shapes, or a
    different encoder config. The message lists every offending key."""


@dataclass
class EncoderLoadReport:
    """What :meth:`Student.load_encoder` loaded.

    Attributes:
        path: the file read.
        format: ``"pretrained-folder"``, ``"safetensors"`` or ``"torch"`` (official ``.pth``).
        prefix: the key prefix taken as the encoder (``""`` for our own exports).
        loaded: number of tensors loaded.
        ignored: keys of the file outside the encoder (decoder, heads), not loaded.
    """

    path: str
    format: str
    prefix: str
    loaded: int
    ignored: list[str]


#: key prefixes taken as the encoder in torch checkpoints, tried in order (official Point-M2AE pre-training
#: and segmentation ``h_encoder.``, PartDistill ``extractor.h_encoder.``, our Student ``encoder.``)
ENCODER_PREFIXES = ("h_encoder.", "extractor.h_encoder.", "encoder.")


def _format_keys(keys: Sequence[str], limit: int = 40) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], str, dict | None]:
    """(state dict, format, saved encoder config or None) of a folder, safetensors or torch file."""
    from safetensors.torch import load_file

    if path.is_dir():
        if (path / "encoder").is_dir() and not (path / "config.json").exists():
            path = path / "encoder"  # a pretraining output folder
        files = sorted(path.glob("*.safetensors"))
        if len(files) != 1 or not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: expected config.json and one .safetensors file (a saved encoder)")
        return load_file(str(files[0])), "pretrained-folder", json.loads((path / "config.json").read_text())
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such encoder checkpoint")
    if path.suffix == ".safetensors":
        return load_file(str(path)), "safetensors", None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise EncoderLoadError(f"{path}: not readable as a checkpoint of tensors (read with weights_only=True; "
                               f"if it also pickles other objects, re-save its state dict alone): {exc}") from exc
    if isinstance(ckpt, dict):
        for key in ("base_model", "model", "state_dict", "model_state_dict"):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise EncoderLoadError(f"{path}: no state dict of tensors found (looked at base_model / model / state_dict)")
    return {k.removeprefix("module."): v for k, v in ckpt.items()}, "torch", None


def map_encoder_state(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                      source: str = "<state>") -> tuple[dict[str, torch.Tensor], str, list[str]]:
    """Map a checkpoint's keys onto an encoder state dict, strictly.

    The encoder's keys are found under the first of ``""`` (exact match) or :data:`ENCODER_PREFIXES`
    that holds any encoder key; 3-D ``[out, in, 1]`` Conv1d weights become 2-D Linear weights.

    Args:
        state: the checkpoint's tensors.
        target: the encoder's ``state_dict()`` (names and shapes to match).
        source: shown in errors.

    Returns:
        ``(mapped state dict, prefix, ignored keys outside the prefix)``.

    Raises:
        EncoderLoadError: no encoder keys, or missing / unexpected keys / shape mismatches (all listed).
    """
    prefix = None
    if any(k in target for k in state):
        prefix = ""
    else:
        for p in ENCODER_PREFIXES:
            if any(k.startswith(p) for k in state):
                prefix = p
                break
    if prefix is None:
        tops = sorted({k.split(".")[0] for k in state})
        raise EncoderLoadError(f"{source}: no encoder weights found (top-level names: {tops}; "
                               f"expected our encoder keys or the prefixes {list(ENCODER_PREFIXES)})")
    if prefix:
        mine = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        ignored = sorted(k for k in state if not k.startswith(prefix))
    else:
        mine, ignored = dict(state), []
    missing = sorted(set(target) - set(mine))
    unexpected = sorted(set(mine) - set(target))
    mapped, wrong = {}, []
    for k in sorted(set(mine) & set(target)):
        v = mine[k]
        want = target[k].shape
        if v.dim() == 3 and v.shape[-1] == 1 and len(want) == 2:
            v = v[..., 0]  # official Conv1d(kernel 1) -> our Linear
        if v.shape != want:
            wrong.append(f"{k} (checkpoint {tuple(mine[k].shape)}, encoder {tuple(want)})")
        mapped[k] = v
    if missing or unexpected or wrong:
        parts = [f"{source}: encoder weights do not match this encoder (prefix {prefix!r})"]
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_format_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_format_keys(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches ({len(wrong)}): {_format_keys(wrong)}")
        raise EncoderLoadError("\n  ".join(parts))
    return mapped, prefix, ignored


# ----------------------------------------------------------------------------------------------
# Student
# ----------------------------------------------------------------------------------------------
class Student(ModelMixin, ConfigMixin):
    """PartDistill student: Point-M2AE encoder + 3-NN feature propagation + 4-layer MLP head.

    Args:
        num_parts: R, the number of part classes of the category.
        num_groups, group_sizes, encoder_dims, encoder_depths, num_heads, local_radius, embed_hidden,
            mlp_ratio, drop_path_rate: the encoder (:class:`PointM2AEEncoder`; defaults: paper sizes).
        head_widths: the 3 hidden widths of the head (None: each equal to the point-feature width,
            681 at paper size, as the official ``StudentNetworks``).
        head_dropout: dropout after each hidden ReLU of the head (official: 0).
        freeze_encoder: keep the encoder fixed (eval mode, no gradients); see the module docstring.

    ``forward(points float [B, N, 3]) -> logits float [B, N, num_parts]``.

    Raises:
        ValueError: bad sizes (see :class:`PointM2AEEncoder`), ``num_parts < 1``, not 3 head widths.
    """

    @register_to_config
    def __init__(self, num_parts: int = 4, num_groups: Sequence[int] = (512, 256, 64),
                 group_sizes: Sequence[int] = (16, 8, 8), encoder_dims: Sequence[int] = (96, 192, 384),
                 encoder_depths: Sequence[int] = (5, 5, 5), num_heads: int = 6,
                 local_radius: Sequence[float] = (0.32, 0.64, 1.28), embed_hidden: Sequence[int] = (128, 256, 512),
                 mlp_ratio: float = 4.0, drop_path_rate: float = 0.1, head_widths: Sequence[int] | None = None,
                 head_dropout: float = 0.0, freeze_encoder: bool = True):
        super().__init__()
        if num_parts < 1:
            raise ValueError(f"num_parts must be >= 1, got {num_parts}")
        self.encoder = PointM2AEEncoder(**self.encoder_config())
        width = self.feature_dim
        widths = [width] * 3 if head_widths is None else list(head_widths)
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"head_widths must be 3 positive widths (a 4-layer head), got {head_widths}")
        layers: list[nn.Module] = []
        for w in widths:
            layers += [nn.Linear(width, w), nn.ReLU(inplace=True)]
            if head_dropout > 0:
                layers.append(nn.Dropout(head_dropout))
            width = w
        layers.append(nn.Linear(width, num_parts))
        self.head = nn.Sequential(*layers)
        self._apply_freeze()

    # -- configuration ----------------------------------------------------------------------------
    def encoder_config(self) -> dict[str, Any]:
        """The :class:`PointM2AEEncoder` arguments of this student."""
        return {k: _plain(self.config[k]) for k in ENCODER_ARGS}

    @property
    def feature_dim(self) -> int:
        """Width of the per-point features fed to the head: ``sum(encoder_dims) + 3 * stages``."""
        return sum(self.config.encoder_dims) + 3 * len(self.config.encoder_dims)

    @property
    def encoder_frozen(self) -> bool:
        return bool(self.config.freeze_encoder)

    def set_encoder_frozen(self, frozen: bool) -> None:
        """Switch between the frozen-encoder and learnable-encoder modes (updates the config, the
        encoder's ``requires_grad`` and its train/eval mode). Build the optimizer afterwards."""
        self.register_to_config(freeze_encoder=bool(frozen))
        self._apply_freeze()

    def _apply_freeze(self) -> None:
        for p in self.encoder.parameters():
            p.requires_grad_(not self.encoder_frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> Student:
        """Set train/eval mode; a frozen encoder always stays in eval mode (BatchNorm statistics and
        stochastic depth fixed), unlike the official code's ``model.train()``."""
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self

    # -- forward ----------------------------------------------------------------------------------
    def point_features(self, points: torch.Tensor) -> torch.Tensor:
        """Per-point features ``float [B, N, feature_dim]``: ``[xyz, f_1, xyz, f_2, ...]`` with each
        stage's token features interpolated to the points (3-NN, inverse squared distance).
        Computed without autograd when the encoder is frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_frozen):
            enc = self.encoder(points)
            parts = []
            for feats, centers in zip(enc.features, enc.tokens.centers):
                parts += [points.to(feats.dtype), three_nn_interpolate(points, centers, feats)]
            return torch.cat(parts, -1)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """Part logits.

        Args:
            points: ``float32 [B, N, 3]`` clouds normalised to the unit sphere, N >= ``num_groups[0]``.

        Returns:
            ``float [B, N, num_parts]`` unnormalised logits.

        Raises:
            ValueError: ``points`` not ``[B, N, 3]`` or too few points.
        """
        return self.head(self.point_features(points))

    # -- weights ----------------------------------------------------------------------------------
    def load_encoder(self, path: str | os.PathLike) -> EncoderLoadReport:
        """Load pretrained encoder weights, strictly.

        Args:
            path: one of
                * a folder written by ``PointM2AEEncoder.save_pretrained`` (``distill.pretrain`` writes
                  ``OUT/encoder``; ``OUT`` itself is accepted) — its ``config.json`` must equal this
                  student's encoder config;
                * a ``.safetensors`` file of encoder weights (our key names);
                * an official Point-M2AE ``.pth`` (``{"base_model": {"h_encoder.…": …}}``, optionally
                  ``module.``-prefixed; decoder keys are ignored and reported) or a PartDistill
                  student checkpoint (``extractor.h_encoder.…``). Official checkpoints carry no config:
                  the group counts, group sizes and radii (512/256/64, 16/8/8, 0.32/0.64/1.28) must match
                  this student's, which only the tensor shapes can partly check.

        Returns:
            :class:`EncoderLoadReport`.

        Raises:
            FileNotFoundError: no such file / not a saved encoder folder.
            EncoderLoadError: different encoder config, missing or unexpected keys, or shape mismatches
            (every offending key is listed); the student is left unchanged.
        """
        path = Path(path)
        state, fmt, saved_config = _read_weights(path)
        if saved_config is not None:
            mine = self.encoder_config()
            diff = {k: (_plain(saved_config.get(k)), v) for k, v in mine.items() if _plain(saved_config.get(k)) != v
                    and k != "drop_path_rate"}
            if diff:
                rows = ", ".join(f"{k}: saved {a} vs student {b}" for k, (a, b) in sorted(diff.items()))
                raise EncoderLoadError(f"{path}: encoder config differs from this student's: {rows}")
        target = self.encoder.state_dict()
        mapped, prefix, ignored = map_encoder_state(state, target, str(path))
        self.encoder.load_state_dict({k: v.to(target[k].dtype) for k, v in mapped.items()}, strict=True)
        return EncoderLoadReport(str(path), fmt, prefix, len(mapped), ignored)


def _plain(value: Any) -> Any:
    """Config values as JSON would hold them (tuples -> lists), for comparisons."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------
# Config files
# ----------------------------------------------------------------------------------------------
STUDENT_KEYS = set(ENCODER_ARGS) | {"head_widths", "head_dropout", "freeze_encoder"}


def load_student_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``configs/distill/student_*.yaml`` file.

    Keys: ``model`` (:class:`Student` arguments except ``num_parts``, which comes from the category),
    ``num_points`` (points per shape, default 2048), ``description``.

    Returns:
        ``{"model": {...}, "num_points": int, "description": str}``; build with
        ``Student(num_parts=R, **cfg["model"])``.

    Raises:
        FileNotFoundError; ValueError: not YAML, unknown keys, or sizes :class:`Student` rejects.
    """
    path = Path(path)
    cfg = read_yaml_config(path, {"model", "num_points", "description"})
    model = dict(cfg.get("model") or {})
    bad = set(model) - STUDENT_KEYS
    if bad:
        raise ValueError(f"{path}: unknown model keys {sorted(bad)} (known: {sorted(STUDENT_KEYS)})")
    merged = {**PAPER_ENCODER, **model}
    _check_encoder_sizes(merged["num_groups"], merged["group_sizes"], merged["encoder_dims"], merged["encoder_depths"],
                         merged["num_heads"], merged["local_radius"], merged["embed_hidden"])
    num_points = int(cfg.get("num_points", 2048))
    if num_points < merged["num_groups"][0]:
        raise ValueError(f"{path}: num_points={num_points} < num_groups[0]={merged['num_groups'][0]}")
    return {"model": model, "num_points": num_points, "description": cfg.get("description", "")}


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "ENCODER_ARGS",
    "ENCODER_PREFIXES",
    "PAPER_ENCODER",
    "Attention",
    "Block",
    "BlockStack",
    "DropPath",
    "EncoderLoadError",
    "EncoderLoadReport",
    "EncoderOutput",
    "PointM2AEEncoder",
    "Student",
    "TokenEmbed",
    "Tokenization",
    "count_parameters",
    "load_student_config",
    "map_encoder_state",
]
