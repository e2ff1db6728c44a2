"""DiT-3D: voxelisation known answers, attention windows, adaLN-Zero init, save/load."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from gen3d.dit3d import Attention, DiT3D, devoxelize, normalize_for_voxels, sincos_pos_embed_3d, voxelize

TINY = dict(resolution=8, patch_size=4, hidden_size=32, depth=2, num_heads=2)


def test_voxelize_averages_and_devoxelize_interpolates():
    # two points in one voxel, one in another: the voxel holds their mean feature
    coords = torch.tensor([[[1.2, 2.1, 3.0], [0.9, 1.8, 3.3], [4.0, 4.0, 4.0]]])
    feats = torch.tensor([[[1.0], [3.0], [10.0]]])
    grid = voxelize(feats, coords, 8)
    assert grid.shape == (1, 1, 8, 8, 8)
    assert grid[0, 0, 1, 2, 3] == 2.0 and grid[0, 0, 4, 4, 4] == 10.0 and grid.sum() == 12.0
    # trilinear interpolation of a linear field is exact: f(x, y, z) = x + 2y + 3z
    idx = torch.arange(8.0)
    field = (idx[:, None, None] + 2 * idx[None, :, None] + 3 * idx[None, None, :])[None, None]
    pts = torch.rand(1, 50, 3) * 7
    got = devoxelize(field, pts)[0, :, 0]
    torch.testing.assert_close(got, pts[0, :, 0] + 2 * pts[0, :, 1] + 3 * pts[0, :, 2], atol=1e-4, rtol=1e-5)


def test_normalize_for_voxels_fills_the_grid():
    pts = torch.randn(3, 500, 3) * torch.tensor([1.0, 5.0, 0.1]) + 7
    c = normalize_for_voxels(pts, 32)
    assert c.min() >= 0 and c.max() <= 31
    # scale and translation invariant
    torch.testing.assert_close(normalize_for_voxels(pts * 3 - 2, 32), c, atol=1e-4, rtol=1e-4)


def test_window_attention_with_one_window_equals_global():
    torch.manual_seed(0)
    glob, win = Attention(16, 2, grid=4), Attention(16, 2, grid=4, window=4)
    win.load_state_dict(glob.state_dict())
    x = torch.randn(2, 64, 16)
    torch.testing.assert_close(win(x), glob(x))
    # windows of 2^3 tokens: a token's output depends only on tokens of its own window
    small = Attention(16, 2, grid=4, window=2)
    small.load_state_dict(glob.state_dict())
    y = x.clone()
    y[:, 63] += 5.0  # token (3,3,3) lies in the last window; token 0 in the first
    assert torch.allclose(small(x)[:, 0], small(y)[:, 0]) and not torch.allclose(small(x)[:, 63], small(y)[:, 63])


def test_pos_embed_is_distinct_per_token():
    emb = sincos_pos_embed_3d(48, 4)
    assert emb.shape == (64, 48) and len({tuple(np.round(r, 5)) for r in emb}) == 64


def test_adaln_zero_output_is_zero_at_init_and_shapes():
    model = DiT3D(**TINY)
    x = torch.randn(3, 300, 3)
    out = model(x, torch.tensor([1, 500, 999])).sample
    assert out.shape == (3, 300, 3) and torch.count_nonzero(out) == 0
    cond = DiT3D(**TINY, num_classes=4)
    with pytest.raises(ValueError, match="class_labels"):
        cond(x, 3)
    assert cond(x, 3, class_labels=torch.tensor([0, 1, 2])).sample.shape == (3, 300, 3)
    with pytest.raises(ValueError, match="divisible"):
        DiT3D(resolution=10, patch_size=4)
    with pytest.raises(ValueError, match="window"):
        DiT3D(resolution=16, patch_size=4, window_size=3, window_blocks=(0,))


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(1)
    model = DiT3D(**TINY, window_size=1, window_blocks=(1,))
    for p in model.parameters():
        p.data.normal_(0, 0.02)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = DiT3D.from_pretrained(tmp_path)
    assert loaded.config.window_blocks == [1] or tuple(loaded.config.window_blocks) == (1,)
    x = torch.randn(2, 128, 3)
    torch.testing.assert_close(loaded(x, 10).sample, model(x, 10).sample)


def test_every_shipped_config_builds():
    """Each YAML config builds a model whose forward pass runs on a small batch (tiny widths are
    substituted for the big ones, keeping r, p and the window layout)."""
    from pathlib import Path

    from gen3d.train import load_config

    configs = sorted((Path(__file__).resolve().parents[1] / "configs" / "gen3d").glob("*.yaml"))
    assert len(configs) >= 10
    for path in configs:
        cfg = load_config(path)["model"]
        small = {**cfg, "hidden_size": 24, "num_heads": 2, "depth": max(cfg.get("window_blocks") or [0]) + 1}
        model = DiT3D(**small)
        assert model(torch.randn(1, 64, 3), 5).sample.shape == (1, 64, 3), path.name
