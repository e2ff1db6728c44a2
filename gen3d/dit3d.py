"""DiT-3D: a plain diffusion transformer on voxelised point clouds (Mo et al., NeurIPS 2023,
"DiT-3D: Exploring Plain Diffusion Transformers for 3D Shape Generation").

Forward pass, as in the paper (§3.2, Fig. 2):

1. **Voxelise**: normalise the (noisy) points of each cloud (centre on the mean, scale by twice the
   largest norm, shift to [0, 1]; PVCNN's ``Voxelization(normalize=True)``), and average the point
   features (their xyz) in each voxel of an r^3 grid -> ``[B, 3, r, r, r]``.
2. **Patchify**: ``Conv3d(3, D, kernel=p, stride=p)`` -> ``(r/p)^3`` tokens of width D, plus a frozen
   3D sine-cosine positional embedding.
3. **DiT blocks** with adaLN-Zero conditioning on the timestep embedding (plus an optional class
   embedding); blocks listed in ``window_blocks`` use 3D window attention (tokens attend within
   non-overlapping windows of ``window_size^3`` tokens), the others global attention.
4. **Final layer** (adaLN + linear to ``p^3 * out_channels``), **unpatchify** to
   ``[B, C, r, r, r]``, and **devoxelise** by trilinear interpolation at every point's normalised
   coordinate -> per-point output ``[B, N, C]`` (the predicted noise epsilon).

The model is a diffusers ``ModelMixin`` + ``ConfigMixin``: its constructor arguments are its
config, so ``save_pretrained(dir)`` / ``from_pretrained(dir)`` write and read safetensors +
``config.json``. Sizes (DiT): S = 384 wide, 12 deep, 6 heads; B = 768/12/12; L = 1024/24/16;
XL = 1152/28/16 (``configs/gen3d/*.yaml``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn


# ----------------------------------------------------------------------------------------------
# Voxelisation (PVCNN / DiT-3D)
# ----------------------------------------------------------------------------------------------
def normalize_for_voxels(points: torch.Tensor, resolution: int, eps: float = 1e-6) -> torch.Tensor:
    """Map each cloud into voxel coordinates ``[0, r-1]`` (PVCNN ``Voxelization(normalize=True)``).

    Args:
        points: ``float [B, N, 3]``.
        resolution: r.

    Returns:
        ``float [B, N, 3]`` continuous voxel coordinates.
    """
    centred = points - points.mean(1, keepdim=True)
    scale = centred.norm(dim=-1, keepdim=True).amax(1, keepdim=True) * 2.0 + eps
    return ((centred / scale + 0.5) * resolution).clamp(0, resolution - 1)


def voxelize(features: torch.Tensor, coords: torch.Tensor, resolution: int) -> torch.Tensor:
    """Average point features in the voxel each point falls in (nearest voxel).

    Args:
        features: ``float [B, N, C]``.
        coords: ``float [B, N, 3]`` voxel coordinates from :func:`normalize_for_voxels`.
        resolution: r.

    Returns:
        ``float [B, C, r, r, r]`` (zeros in empty voxels), indexed ``[b, c, x, y, z]``.
    """
    b, n, c = features.shape
    r = resolution
    idx = torch.round(coords).long()
    flat = (idx[..., 0] * r + idx[..., 1]) * r + idx[..., 2] + torch.arange(b, device=coords.device)[:, None] * r**3
    sums = torch.zeros(b * r**3, c, dtype=features.dtype, device=features.device)
    sums.index_add_(0, flat.reshape(-1), features.reshape(-1, c))
    counts = torch.zeros(b * r**3, dtype=features.dtype, device=features.device)
    counts.index_add_(0, flat.reshape(-1), torch.ones(b * n, dtype=features.dtype, device=features.device))
    grid = sums / counts.clamp(min=1)[:, None]
    return grid.view(b, r, r, r, c).permute(0, 4, 1, 2, 3).contiguous()


def devoxelize(grid: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation of a voxel grid at continuous voxel coordinates.

    Args:
        grid: ``float [B, C, r, r, r]`` indexed ``[b, c, x, y, z]``.
        coords: ``float [B, N, 3]`` in ``[0, r-1]``.

    Returns:
        ``float [B, N, C]``.
    """
    r = grid.shape[-1]
    # grid_sample's last coordinate indexes the last spatial dim (z), the first indexes D (x).
    norm = coords / (r - 1) * 2 - 1
    sample = norm.flip(-1)[:, :, None, None, :]  # [B, N, 1, 1, 3] as (z, y, x) -> (W, H, D)
    out = F.grid_sample(grid, sample, mode="bilinear", align_corners=True)  # [B, C, N, 1, 1]
    return out[:, :, :, 0, 0].transpose(1, 2)


def sincos_pos_embed_3d(dim: int, size: int) -> np.ndarray:
    """Frozen 3D sine-cosine positional embedding ``float32 [size^3, dim]`` (DiT-3D: the 2D MAE
    embedding extended to 3 axes; each axis gets dim/3 channels, rounded down to an even number,
    the remaining channels are zero)."""
    per_axis = (dim // 3) // 2 * 2
    omega = 1.0 / 10000 ** (np.arange(per_axis // 2, dtype=np.float64) / (per_axis / 2))
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1).reshape(-1, 3)
    parts = []
    for axis in range(3):
        angles = grid[:, axis:axis + 1] * omega[None]
        parts += [np.sin(angles), np.cos(angles)]
    emb = np.concatenate(parts, 1)
    return np.pad(emb, ((0, 0), (0, dim - emb.shape[1]))).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# DiT blocks
# ----------------------------------------------------------------------------------------------
def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class Attention(nn.Module):
    """Multi-head self-attention, global or within 3D windows of ``window^3`` tokens."""

    def __init__(self, dim: int, heads: int, grid: int, window: int = 0):
        super().__init__()
        self.heads, self.grid, self.window = heads, grid, window
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def _windows(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        g, w = self.grid, self.window
        x = x.view(b, g // w, w, g // w, w, g // w, w, d).permute(0, 1, 3, 5, 2, 4, 6, 7)
        return x.reshape(b * (g // w) ** 3, w**3, d)

    def _unwindows(self, x: torch.Tensor, b: int) -> torch.Tensor:
        g, w, d = self.grid, self.window, x.shape[-1]
        x = x.view(b, g // w, g // w, g // w, w, w, w, d).permute(0, 1, 4, 2, 5, 3, 6, 7)
        return x.reshape(b, g**3, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        if self.window:
            x = self._windows(x)
        bw, t, d = x.shape
        q, k, v = self.qkv(x).view(bw, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(bw, t, d)
        out = self.proj(out)
        return self._unwindows(out, b) if self.window else out


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning (Peebles & Xie 2023, DiT)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, grid: int, window: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, grid, window)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + g_a[:, None] * self.attn(modulate(self.norm1(x), sh_a, sc_a))
        return x + g_m[:, None] * self.mlp(modulate(self.norm2(x), sh_m, sc_m))


class FinalLayer(nn.Module):
    """adaLN + linear projection of each token to ``p^3 * out_channels`` values."""

    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch**3 * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm(x), shift, scale))


@dataclass
class DiT3DOutput(BaseOutput):
    """Output of :class:`DiT3D`: ``sample`` is the per-point prediction ``float [B, N, C]``."""

    sample: torch.Tensor


class DiT3D(ModelMixin, ConfigMixin):
    """The DiT-3D denoiser (see the module docstring).

    Args:
        resolution: voxel grid size r (16, 32 or 64).
        patch_size: patch size p (2, 4 or 8); r must be divisible by p.
        in_channels: point feature channels (3: xyz).
        out_channels: per-point output channels (3: epsilon).
        hidden_size, depth, num_heads, mlp_ratio: transformer size (DiT S/B/L/XL or smaller).
        num_classes: number of class labels (0 = unconditional).
        window_size: tokens per side of a 3D attention window (0 = no window attention).
        window_blocks: indices of the blocks that use window attention.

    Raises:
        ValueError: r not divisible by p, or the token grid not divisible by ``window_size``.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(self, resolution: int = 32, patch_size: int = 4, in_channels: int = 3, out_channels: int = 3,
                 hidden_size: int = 384, depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0,
                 num_classes: int = 0, window_size: int = 0, window_blocks: tuple[int, ...] = ()):
        super().__init__()
        if resolution % patch_size:
            raise ValueError(f"resolution {resolution} is not divisible by patch_size {patch_size}")
        grid = resolution // patch_size
        if window_size and (grid % window_size or not window_blocks):
            raise ValueError(f"token grid {grid} is not divisible by window_size {window_size} (or no window_blocks)")
        self.grid = grid
        self.patch_embed = nn.Conv3d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        self.register_buffer("pos_embed", torch.from_numpy(sincos_pos_embed_3d(hidden_size, grid))[None], persistent=False)
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(256, hidden_size)
        self.class_embed = nn.Embedding(num_classes, hidden_size) if num_classes else None
        windows = set(window_blocks) if window_size else set()
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, grid, window_size if i in windows else 0)
                                    for i in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, out_channels)
        self._init_weights()

    def _init_weights(self) -> None:
        def xavier(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(xavier)
        w = self.patch_embed.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for lin in (self.time_embed.linear_1, self.time_embed.linear_2):
            nn.init.normal_(lin.weight, std=0.02)
        if self.class_embed is not None:
            nn.init.normal_(self.class_embed.weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every residual branch starts at zero
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for m in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, p^3 C]`` tokens -> ``[B, C, r, r, r]`` voxels."""
        b, g, p, c = x.shape[0], self.grid, self.config.patch_size, self.config.out_channels
        x = x.view(b, g, g, g, p, p, p, c).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return x.reshape(b, c, g * p, g * p, g * p)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int, class_labels: torch.Tensor | None = None,
                return_dict: bool = True) -> DiT3DOutput | tuple[torch.Tensor]:
        """Predict the per-point output (epsilon) for noisy clouds.

        Args:
            sample: noisy points ``float [B, N, 3]``.
            timestep: diffusion step, an int or ``long [B]``.
            class_labels: ``long [B]`` when ``num_classes`` > 0.
            return_dict: return a :class:`DiT3DOutput` (else a 1-tuple).

        Returns:
            ``sample``: ``float [B, N, out_channels]``.
        """
        b = sample.shape[0]
        r = self.config.resolution
        coords = normalize_for_voxels(sample, r)
        vox = voxelize(sample, coords, r)
        x = self.patch_embed(vox).flatten(2).transpose(1, 2) + self.pos_embed.to(sample.dtype)
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(b)
        c = self.time_embed(self.time_proj(t).to(sample.dtype))
        if self.class_embed is not None:
            if class_labels is None:
                raise ValueError("this DiT3D is class-conditional: pass class_labels")
            c = c + self.class_embed(class_labels)
        for block in self.blocks:
            x = block(x, c)
        out = devoxelize(self.unpatchify(self.final_layer(x, c)), coords)
        return DiT3DOutput(sample=out) if return_dict else (out,)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["DiT3D", "DiT3DOutput", "voxelize", "devoxelize", "normalize_for_voxels", "sincos_pos_embed_3d",
           "count_parameters"]
