"""The torch Dataset view: normalisation, fixed N, determinism, DataLoader workers."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gen3d.collection import write_collection
from gen3d.dataset import ShapeDataset, normalize_unit_sphere
from gen3d.sampling import farthest_point_sample, resample_indices
from test_collection import make_record


@pytest.fixture()
def collection(tmp_path):
    path = tmp_path / "c.h5"
    recs = [make_record(i) for i in range(6)] + [make_record(10 + i, "mug", split="test") for i in range(3)]
    for r in recs:
        r.points = r.points * 5 + np.array([10, -3, 2], np.float32)  # off-centre, large
    write_collection(path, recs)
    return path, recs


def test_unit_sphere_and_labels_follow_points(collection):
    path, recs = collection
    ds = ShapeDataset(path, category="chair", num_points=32, sampling="random", seed=1)
    assert len(ds) == 6
    item = ds[2]
    pts = item["points"].numpy()
    assert pts.shape == (32, 3) and item["labels"].dtype == torch.int64
    assert np.allclose(np.linalg.norm(pts, axis=1).max(), 1.0, atol=1e-5)
    # every returned point is a stored point (after undoing the normalisation), with its label
    orig = pts * item["scale"] + item["centre"].numpy()
    stored = recs[2].points
    nearest = np.argmin(((orig[:, None] - stored[None]) ** 2).sum(-1), 1)
    assert np.allclose(stored[nearest], orig, atol=1e-4)
    np.testing.assert_array_equal(recs[2].labels[nearest], item["labels"].numpy())


def test_deterministic_and_epoch_dependent(collection):
    path, _ = collection
    a, b = ShapeDataset(path, num_points=16, seed=3), ShapeDataset(path, num_points=16, seed=3)
    assert torch.equal(a[4]["points"], b[4]["points"])
    b.set_epoch(1)
    assert not torch.equal(a[4]["points"], b[4]["points"])


def test_full_n_keeps_stored_order_and_split_filter(collection):
    path, recs = collection
    ds = ShapeDataset(path, split="test", normalize=False)
    assert len(ds) == 3 and ds[0]["category"] == "mug"
    np.testing.assert_allclose(ds[0]["points"].numpy(), recs[6].points)


def test_dataloader_with_workers(collection):
    path, _ = collection
    ds = ShapeDataset(path, num_points=24)
    batches = list(DataLoader(ds, batch_size=4, num_workers=2))
    assert sum(len(b["points"]) for b in batches) == 9
    assert batches[0]["points"].shape == (4, 24, 3)
    single = list(DataLoader(ds, batch_size=4, num_workers=0))
    assert torch.equal(batches[1]["points"], single[1]["points"])


def test_bad_arguments(collection):
    path, _ = collection
    with pytest.raises(ValueError, match="exceeds"):
        ShapeDataset(path, num_points=10_000)
    with pytest.raises(ValueError, match="sampling"):
        ShapeDataset(path, sampling="poisson")


def test_fps_against_reference():
    """Batched torch FPS equals a slow, obviously-correct reference, and beats random coverage."""
    rng = np.random.default_rng(0)
    pts = rng.random((3, 300, 3)).astype(np.float32)
    idx = farthest_point_sample(torch.from_numpy(pts), 40, start=torch.tensor([0, 5, 7])).numpy()
    for b in range(3):
        ref = [[0, 5, 7][b]]
        for _ in range(39):
            d = np.min(((pts[b][:, None] - pts[b][ref][None]) ** 2).sum(-1), 1)
            ref.append(int(np.argmax(d)))
        np.testing.assert_array_equal(idx[b], ref)
    cover = lambda sel: np.max(np.min(((pts[0][:, None] - pts[0][sel][None]) ** 2).sum(-1), 1))
    assert cover(idx[0]) < cover(rng.choice(300, 40, replace=False))
    assert len(set(resample_indices(pts[0], 40, "fps", seed=1))) == 40
    up = resample_indices(pts[0], 500, "random", seed=1)
    assert len(up) == 500 and set(up) == set(range(300))


def test_normalize_unit_sphere_known_answer():
    pts = np.array([[1, 1, 1], [3, 1, 1]], np.float32)
    out, centre, scale = normalize_unit_sphere(pts)
    np.testing.assert_allclose(centre, [2, 1, 1]) and np.testing.assert_allclose(out, [[-1, 0, 0], [1, 0, 0]])
    assert scale == 1.0
