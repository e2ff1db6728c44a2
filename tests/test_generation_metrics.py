"""Generation metrics (eval.generation): Chamfer distance, MMD / COV / 1-NNA, collections.

Chamfer distance and the three set metrics are checked against slow, obviously-correct numpy
references written from PointFlow's definitions; the rest are known answers (copies, ties,
separated sets, one repeated shape, same vs. different shape distributions, procedural chairs
vs. airplanes). Sizes are kept small: the whole file runs in well under a minute on 2 CPU cores.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eval.generation import (
    bootstrap_1nna,
    chamfer_distance,
    clear_cache,
    evaluate_collections,
    mmd_cov_1nna,
    normalize_clouds,
    pairwise_chamfer,
)
from gen3d.collection import write_collection
from gen3d.dataset import normalize_unit_sphere
from gen3d.procedural import generate

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ----------------------------------------------------------------------------------------------
# Slow references, straight from the definitions
# ----------------------------------------------------------------------------------------------
def ref_chamfer(x: np.ndarray, y: np.ndarray) -> float:
    """CD of one pair, float64, with explicit loops over points."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    sq = [[float(np.sum((p - q) ** 2)) for q in y] for p in x]
    left = np.mean([min(row) for row in sq])
    right = np.mean([min(sq[i][j] for i in range(len(x))) for j in range(len(y))])
    return left + right


def ref_metrics(sample: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    """MMD / COV / 1-NNA from a CD table, with Python loops (no ties in random data)."""
    union = list(ref) + list(sample)  # PointFlow's order: references first
    labels = [1] * len(ref) + [0] * len(sample)
    cd = np.array([[ref_chamfer(p, q) for q in union] for p in union])
    r, s = len(ref), len(sample)
    mmd = np.mean([min(cd[i, r + k] for k in range(s)) for i in range(r)])
    covered = {min(range(r), key=lambda i: cd[r + k, i]) for k in range(s)}
    correct = 0
    for j in range(r + s):
        others = [i for i in range(r + s) if i != j]
        nearest = min(others, key=lambda i: cd[i, j])
        correct += labels[nearest] == labels[j]
    return {"MMD-CD": mmd, "COV-CD": len(covered) / r, "1-NNA-CD": correct / (r + s)}


def spheroids(n: int, points: int, gen: torch.Generator, elongation: float = 1.0) -> torch.Tensor:
    """``n`` clouds on spheres of random radius in [0.5, 1], stretched along x by ``elongation``."""
    v = torch.randn(n, points, 3, generator=gen)
    v = v / v.norm(dim=-1, keepdim=True)
    radius = 0.5 + 0.5 * torch.rand(n, 1, 1, generator=gen)
    return v * radius * torch.tensor([elongation, 1.0, 1.0])


def distinct_clouds(n: int, points: int = 64, seed: int = 0) -> torch.Tensor:
    """``n`` clearly different clouds (random blobs of different sizes and centres)."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.2, 1.0, n)[:, None, None]
    return torch.rand(n, points, 3, generator=gen) * scale + torch.randn(n, 1, 3, generator=gen)


# ----------------------------------------------------------------------------------------------
# Chamfer distance
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_chamfer_matches_reference(device, dtype):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 37, 3))
    y = rng.normal(size=(4, 23, 3)) * 0.5 + 0.3
    got = chamfer_distance(torch.tensor(x, dtype=dtype, device=device), torch.tensor(y, dtype=dtype, device=device))
    assert got.shape == (4,) and got.dtype == dtype and got.device.type == device
    want = [ref_chamfer(a, b) for a, b in zip(x, y)]
    np.testing.assert_allclose(got.cpu().numpy(), want, rtol=1e-5 if dtype == torch.float32 else 1e-12)


def test_chamfer_identity_symmetry_and_hand_case():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, 50, 3, generator=gen), torch.randn(3, 40, 3, generator=gen)
    assert torch.equal(chamfer_distance(x, x), torch.zeros(3))  # exactly, not just close
    assert torch.equal(chamfer_distance(x, y), chamfer_distance(y, x))
    # x = {(0,0,0), (1,0,0)}, y = {(0,2,0)}: x->y mins 4 and 5 (mean 4.5), y->x min 4; CD = 8.5
    cd = chamfer_distance(torch.tensor([[[0.0, 0, 0], [1, 0, 0]]]), torch.tensor([[[0.0, 2, 0]]]))
    assert cd.item() == pytest.approx(8.5)
    # squared distances, mean over points: a cloud against itself shifted by t has CD = 2 |t|^2
    shifted = chamfer_distance(torch.zeros(1, 5, 3), torch.full((1, 7, 3), 0.5))
    assert shifted.item() == pytest.approx(2 * 0.75)


def test_chamfer_rejects_bad_input():
    with pytest.raises(ValueError, match="batch size"):
        chamfer_distance(torch.zeros(2, 4, 3), torch.zeros(3, 4, 3))
    with pytest.raises(ValueError, match="num_points, 3"):
        chamfer_distance(torch.zeros(2, 4, 2), torch.zeros(2, 4, 2))
    with pytest.raises(ValueError, match="no points"):
        chamfer_distance(torch.zeros(2, 0, 3), torch.zeros(2, 4, 3))


@pytest.mark.parametrize("device", DEVICES)
def test_pairwise_equals_chamfer_on_all_pairs_for_any_blocking(device):
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(5, 30, 3, generator=gen).to(device)
    b = torch.randn(4, 20, 3, generator=gen).to(device)
    full = pairwise_chamfer(a, b)
    assert full.shape == (5, 4)
    for i in range(5):
        assert torch.equal(full[i], chamfer_distance(a[i].expand(4, -1, -1), b))
    for bs in (1, 3, 64):
        assert torch.equal(pairwise_chamfer(a, b, batch_size=bs), full)
    assert torch.equal(pairwise_chamfer(b, a, batch_size=3), full.T)  # exactly symmetric


# ----------------------------------------------------------------------------------------------
# MMD, COV, 1-NNA
# ----------------------------------------------------------------------------------------------
def test_metrics_match_reference():
    gen = torch.Generator().manual_seed(3)
    sample = torch.rand(7, 12, 3, generator=gen) * torch.rand(7, 1, 3, generator=gen)
    ref = torch.rand(5, 10, 3, generator=gen) * torch.rand(5, 1, 3, generator=gen) + 0.1
    got = mmd_cov_1nna(sample, ref, batch_size=4)
    want = ref_metrics(sample.numpy(), ref.numpy())
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-5), key


def test_copies_give_mmd_0_cov_1_and_1nna_0():
    # Every cloud's nearest *other* cloud is its copy in the other set (distance exactly 0, no
    # other cloud at 0), so the leave-one-out 1-NN classifier is wrong for every cloud: 1-NNA is
    # 0.0, as PointFlow's knn() gives (0.5 is the ideal for independent draws, not for copies).
    clouds = distinct_clouds(6)
    got = mmd_cov_1nna(clouds.clone(), clouds)
    assert got == {"MMD-CD": 0.0, "COV-CD": 1.0, "1-NNA-CD": 0.0}


def test_ties_resolve_to_first_index_references_first():
    c = distinct_clouds(1)
    # ref = [c, c], sample = [c]: all three at distance 0. Union [ref0, ref1, s0]; argmin picks
    # the first index: ref0 -> ref1 (right), ref1 -> ref0 (right), s0 -> ref0 (wrong): 2/3.
    # (With samples first it would be 0; PointFlow orders references first.)
    got = mmd_cov_1nna(c, torch.cat([c, c]))
    assert got["1-NNA-CD"] == pytest.approx(2 / 3)
    assert got["COV-CD"] == 0.5  # the sample's nearest reference is ref0 only
    assert got["MMD-CD"] == 0.0
    # two identical copies in each set: references right, samples wrong
    assert mmd_cov_1nna(torch.cat([c, c]), torch.cat([c, c]))["1-NNA-CD"] == 0.5


def test_per_cloud_correctness_is_ordered_refs_first_and_averages_to_1nna():
    c = distinct_clouds(1)
    got = mmd_cov_1nna(c, torch.cat([c, c]), per_cloud=True)  # the tie case above: [ref0, ref1, s0]
    assert got["1-NNA-CD correct"].dtype == bool
    assert got["1-NNA-CD correct"].tolist() == [True, True, False]
    gen = torch.Generator().manual_seed(6)
    sample, ref = spheroids(9, 64, gen, 1.5), spheroids(7, 64, gen)
    got = mmd_cov_1nna(sample, ref, per_cloud=True)
    assert got["1-NNA-CD correct"].shape == (16,)
    assert got["1-NNA-CD correct"].mean() == pytest.approx(got["1-NNA-CD"])
    assert "1-NNA-CD correct" not in mmd_cov_1nna(sample, ref)


def test_bootstrap_1nna_known_cases():
    gen = torch.Generator().manual_seed(8)
    sample, ref = spheroids(12, 64, gen, 1.5), spheroids(10, 64, gen)
    got = mmd_cov_1nna(sample, ref, per_cloud=True)
    dist = got["1-NNA-CD distances"]
    assert dist.shape == (22, 22) and np.isinf(np.diag(dist)).all()
    # every cloud present once: the bootstrap's weighted rule is mmd_cov_1nna's 1-NNA
    from eval.generation import _weighted_1nna
    assert _weighted_1nna(torch.as_tensor(dist), 10, torch.ones(1, 22)).item() == pytest.approx(got["1-NNA-CD"])
    # a cloud drawn twice is not its own neighbour: refs 0 and 1 only, sample 0 twice. Each ref's
    # nearest present other is the other ref or the sample; the sample's is a ref (never its copy).
    w = torch.zeros(1, 22)
    w[0, [0, 1]] = 1
    w[0, 10] = 2
    d = torch.as_tensor(dist)
    ref_right = [float(d[i, [1 - i, 10]].argmin() == 0) for i in (0, 1)]
    assert _weighted_1nna(d, 10, w).item() == pytest.approx(sum(ref_right) / 4)
    reps = bootstrap_1nna([dist, dist], 10, replicates=64, seed=3, chunk=7)
    assert reps.shape == (64, 2) and (reps[:, 0] == reps[:, 1]).all()      # same draws for both
    assert np.array_equal(reps, bootstrap_1nna([dist, dist], 10, replicates=64, seed=3))  # seeded, chunk-free
    assert 0.2 < reps.mean() < 1.0 and reps.std() > 0
    # completely separated sets: every replicate is 1 (each set has >= 2 distinct clouds drawn)
    far = mmd_cov_1nna(sample, ref + 100.0, per_cloud=True)["1-NNA-CD distances"]
    assert (bootstrap_1nna([far], 10, replicates=32)[:, 0] == 1.0).all()
    with pytest.raises(ValueError, match="one shape"):
        bootstrap_1nna([dist, dist[:-1, :-1]], 10)
    with pytest.raises(ValueError, match="num_ref"):
        bootstrap_1nna([dist], 22)


def test_separated_sets_and_one_repeated_shape():
    gen = torch.Generator().manual_seed(4)
    sample, ref = spheroids(10, 64, gen), spheroids(12, 64, gen)
    far = mmd_cov_1nna(sample, ref + 100.0)
    assert far["1-NNA-CD"] == 1.0
    assert far["COV-CD"] <= 0.25  # a large offset makes almost every sample pick the same reference
    assert far["MMD-CD"] > 100.0 ** 2
    repeated = mmd_cov_1nna(sample[:1].expand(10, -1, -1), ref)
    assert repeated["COV-CD"] == 1 / 12


def test_same_distribution_near_half_different_distribution_near_one():
    gen = torch.Generator().manual_seed(5)
    sample, ref, stretched = spheroids(40, 256, gen), spheroids(40, 256, gen), spheroids(40, 256, gen, 2.5)
    same = mmd_cov_1nna(sample, ref)
    diff = mmd_cov_1nna(stretched, ref)
    assert 0.3 <= same["1-NNA-CD"] <= 0.7
    assert diff["1-NNA-CD"] > 0.9
    assert same["MMD-CD"] < diff["MMD-CD"] and same["COV-CD"] > diff["COV-CD"]


def test_metrics_reject_empty_sets():
    with pytest.raises(ValueError, match="at least one"):
        mmd_cov_1nna(torch.zeros(0, 4, 3), torch.zeros(2, 4, 3))


# ----------------------------------------------------------------------------------------------
# Normalisation
# ----------------------------------------------------------------------------------------------
def test_normalize_unit_sphere_matches_dataset_normalisation():
    gen = torch.Generator().manual_seed(6)
    pts = torch.rand(3, 100, 3, generator=gen) * torch.tensor([5.0, 1.0, 2.0]) + 7.0
    got = normalize_clouds(pts)
    for p, g in zip(pts.numpy(), got.numpy()):
        np.testing.assert_allclose(g, normalize_unit_sphere(p)[0], atol=1e-5)  # float32, coordinates ~10
    np.testing.assert_allclose(got.norm(dim=-1).amax(-1).numpy(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(got.mean(1).numpy(), 0.0, atol=1e-6)


def test_normalize_unit_box():
    pts = torch.tensor([[[1.0, 10, 0], [5, 12, 1], [2, 11, 0.5]]])  # extents 4, 2, 1
    got = normalize_clouds(pts, "unit_box")[0]
    np.testing.assert_allclose(got.amin(0).numpy(), [-1.0, -0.5, -0.25])
    np.testing.assert_allclose(got.amax(0).numpy(), [1.0, 0.5, 0.25])
    single = normalize_clouds(torch.ones(1, 4, 3), "unit_box")  # degenerate: only centred
    assert torch.equal(single, torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalize_clouds(pts, "unit_cube")


# ----------------------------------------------------------------------------------------------
# Collections
# ----------------------------------------------------------------------------------------------
N_POINTS = 256


def _write(path, category, seed, count, split="none", transform=None):
    records = [generate(category, i, seed, num_points=N_POINTS, split=split) for i in range(count)]
    for r in records:
        if transform is not None:
            r.points = transform(r.points).astype(np.float32)
    write_collection(path, records)
    return path


def test_evaluate_collections_chairs_vs_chairs_and_airplanes(tmp_path):
    ref = tmp_path / "ref.h5"
    write_collection(ref, [generate("chair", i, 0, num_points=N_POINTS, split="test") for i in range(12)]
                     + [generate("chair", 100 + i, 0, num_points=N_POINTS, split="train") for i in range(4)]
                     + [generate("mug", i, 0, num_points=N_POINTS, split="test") for i in range(3)])
    chairs = _write(tmp_path / "chairs.h5", "chair", 1, 12)
    planes = _write(tmp_path / "planes.h5", "airplane", 1, 12)

    same = evaluate_collections(chairs, ref, category="chair", ref_split="test", num_points=N_POINTS)
    assert {k: same[k] for k in ("n_sample", "n_ref", "num_points", "normalisation")} == {
        "n_sample": 12, "n_ref": 12, "num_points": N_POINTS, "normalisation": "unit_sphere"}
    other = evaluate_collections(planes, ref, category=None, ref_split="test", num_points=N_POINTS)
    assert other["n_ref"] == 15  # 12 chairs + 3 mugs of the test split
    capped = evaluate_collections(planes, ref, ref_split="test", num_points=N_POINTS, max_shapes=5)
    assert (capped["n_sample"], capped["n_ref"]) == (5, 5)
    planes_vs_chairs = evaluate_collections(planes, tmp_path / "chairs.h5", num_points=N_POINTS)
    assert same["1-NNA-CD"] < planes_vs_chairs["1-NNA-CD"]
    assert planes_vs_chairs["1-NNA-CD"] > 0.9
    assert same["MMD-CD"] < planes_vs_chairs["MMD-CD"]


def test_evaluate_collections_normalises_and_subsamples(tmp_path):
    # The same shapes stored at another position and scale are copies after unit-sphere
    # normalisation; resampling with one seed picks the same points of each copy.
    a = _write(tmp_path / "a.h5", "mug", 2, 6)
    b = _write(tmp_path / "b.h5", "mug", 2, 6, transform=lambda p: p * 7.0 + np.array([3.0, -2.0, 40.0]))
    got = evaluate_collections(a, b, num_points=128, seed=3)
    assert got["MMD-CD"] < 1e-10 and got["COV-CD"] == 1.0 and got["1-NNA-CD"] == 0.0
    assert got["num_points"] == 128
    with pytest.raises(ValueError, match="no shapes"):
        evaluate_collections(a, b, ref_split="test")



def _brute(a, b):
    return torch.stack([chamfer_distance(a[i].expand(len(b), -1, -1), b) for i in range(len(a))])


@pytest.mark.parametrize("case", ["grid_ties", "duplicates", "float64", "single_point"])
def test_tree_path_is_bit_identical_to_brute_force(case):
    gen = torch.Generator().manual_seed(7)
    if case == "grid_ties":  # points on a lattice: many equidistant neighbours -> fallback rows
        a = torch.randint(0, 4, (4, 60, 3), generator=gen).float() * 0.25
        b = torch.randint(0, 4, (3, 50, 3), generator=gen).float() * 0.25 + 0.125
    elif case == "duplicates":
        a = torch.randn(4, 20, 3, generator=gen).repeat(1, 3, 1)
        b = torch.randn(3, 15, 3, generator=gen).repeat(1, 4, 1)
    elif case == "float64":
        a = torch.randn(4, 40, 3, generator=gen, dtype=torch.float64)
        b = torch.randn(3, 30, 3, generator=gen, dtype=torch.float64)
    else:
        a = torch.randn(3, 1, 3, generator=gen)
        b = torch.randn(2, 25, 3, generator=gen)
    assert torch.equal(pairwise_chamfer(a, b), _brute(a, b))
    assert torch.equal(pairwise_chamfer(a, a), _brute(a, a))


def test_self_matrix_cache_returns_equal_results():
    gen = torch.Generator().manual_seed(8)
    s, r1, r2 = (torch.randn(5, 30, 3, generator=gen) for _ in range(3))
    clear_cache()
    first = mmd_cov_1nna(s, r1)
    again = mmd_cov_1nna(s, r1)  # both self matrices from the cache
    assert first == again
    assert mmd_cov_1nna(s, r2).keys() == first.keys()
