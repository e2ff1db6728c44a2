"""Direct back-projection voting, consistency sets (graph-based segmentation), intra-set refinement."""
from __future__ import annotations

import numpy as np
import pytest

from distill.knowledge import KnowledgeUnits
from distill.refine import (
    consistency_sets,
    estimate_normals,
    knn_graph,
    refine_point_labels,
)
from distill.voting import coverage, coverage_counts, vote


def make_units(masks: list[list[int]], point_probs: list[list[list[float]]], confidence: list[float]) -> KnowledgeUnits:
    counts = [len(m) for m in masks]
    pp = np.array([row for rows in point_probs for row in rows], np.float32)
    unit_probs = np.stack([np.mean(rows, 0) for rows in point_probs]).astype(np.float32)
    u = len(masks)
    return KnowledgeUnits(offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                          point_index=np.array([p for m in masks for p in m], np.int64), point_probs=pp,
                          unit_probs=unit_probs, confidence=np.array(confidence, np.float32),
                          view=np.zeros(u, np.int16), teacher=np.zeros(u, np.int16), corrupted=np.full(u, -1, np.int8))


# 5 points, 3 parts. Point 3 is in no mask.
UNITS = make_units(
    masks=[[0, 1, 2], [1, 2], [0], [4], [4]],
    point_probs=[[[0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.5, 0.5, 0.0]],   # votes 0, 1, 0 (tie -> 0)
                 [[0.0, 0.0, 1.0], [0.1, 0.8, 0.1]],                      # votes 2, 1
                 [[0.0, 1.0, 0.0]],                                       # vote 1
                 [[1.0, 0.0, 0.0]],                                       # vote 0
                 [[0.0, 0.0, 1.0]]],                                      # vote 2
    confidence=[0.5, 0.8, 0.6, 0.3, 0.3])


def test_vote_known_answer_confidence_weighted():
    labels, scores = vote(UNITS, 5, 3)
    assert labels.dtype == np.int64 and scores.dtype == np.float32 and scores.shape == (5, 3)
    np.testing.assert_allclose(scores, [[0.5, 0.6, 0.0],
                                        [0.0, 0.5, 0.8],
                                        [0.5, 0.8, 0.0],
                                        [0.0, 0.0, 0.0],
                                        [0.3, 0.0, 0.3]], atol=1e-6)
    # point 3 uncovered -> -1; point 4 ties 0.3 / 0.3 between parts 0 and 2 -> the smaller, 0
    assert labels.tolist() == [1, 2, 1, -1, 0]


def test_vote_uniform_weights_and_ties():
    labels, scores = vote(UNITS, 5, 3, weight="uniform")
    np.testing.assert_array_equal(scores, [[1, 1, 0], [0, 1, 1], [1, 1, 0], [0, 0, 0], [1, 0, 1]])
    assert labels.tolist() == [0, 1, 0, -1, 0]                  # every covered point is a tie here


def test_vote_errors_and_coverage():
    assert coverage_counts(UNITS, 5).tolist() == [2, 2, 2, 0, 2]
    assert coverage(UNITS, 5) == pytest.approx(0.8)
    assert coverage(UNITS, 7) == pytest.approx(4 / 7)
    labels, scores = vote(KnowledgeUnits.empty(3), 4, 3)
    assert labels.tolist() == [-1] * 4 and not scores.any()
    with pytest.raises(ValueError, match="num_parts"):
        vote(UNITS, 5, 4)
    with pytest.raises(ValueError, match="weight"):
        vote(UNITS, 5, 3, weight="votes")
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        vote(UNITS, 4, 3)


def test_vote_matches_a_per_entry_loop():
    rng = np.random.default_rng(1)
    n, r = 40, 4
    masks = [sorted(rng.choice(n, rng.integers(1, 12), replace=False).tolist()) for _ in range(25)]
    probs = [rng.dirichlet(np.ones(r), len(m)).tolist() for m in masks]
    units = make_units(masks, probs, rng.random(25).tolist())
    labels, scores = vote(units, n, r)
    expected = np.zeros((n, r))
    for m, pr, c in zip(masks, probs, units.confidence):
        for p, y in zip(m, pr):
            expected[p, int(np.argmax(y))] += c
    np.testing.assert_allclose(scores, expected, rtol=1e-5)
    covered = np.zeros(n, bool)
    covered[[p for m in masks for p in m]] = True
    np.testing.assert_array_equal(labels, np.where(covered, expected.argmax(1), -1))


# ------------------------------------------------------------------------------------------------
# Consistency sets
# ------------------------------------------------------------------------------------------------
def fold(n: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two n x n grids meeting at a right angle along the z axis: plane y = 0 (x > 0) and plane
    x = 0 (y > 0); exact normals; which plane each point is on."""
    t = (np.arange(n) + 0.5) / n
    a, b = np.meshgrid(t, t, indexing="ij")
    a, b = a.ravel(), b.ravel()
    zeros = np.zeros_like(a)
    points = np.concatenate([np.stack([a, zeros, b], 1), np.stack([zeros, a, b], 1)])
    normals = np.concatenate([np.tile([0.0, 1.0, 0.0], (n * n, 1)), np.tile([1.0, 0.0, 0.0], (n * n, 1))])
    return points, normals, np.repeat([0, 1], n * n)


def test_consistency_sets_separate_a_right_angle_fold():
    points, normals, plane = fold()
    sets = consistency_sets(points, normals, k=10)
    assert sets.dtype == np.int64 and sets.shape == (800,)
    assert len(np.unique(sets)) >= 2
    for s in np.unique(sets):
        assert len(np.unique(plane[sets == s])) == 1, f"set {s} crosses the fold"
    # with exact normals each plane is one smooth set
    assert len(np.unique(sets)) == 2
    # numbered by first point
    assert sets[0] == 0 and sets[-1] == 1


def test_consistency_sets_with_estimated_normals():
    points, _, plane = fold()
    normals = estimate_normals(points, k=10)
    interior = np.abs(points[:, 0] - points[:, 1]) > 0.2            # away from the fold line
    expected = np.where(plane[:, None] == 0, [[0, 1, 0]], [[1, 0, 0]])
    np.testing.assert_allclose(np.abs((normals * expected).sum(1))[interior], 1, atol=1e-5)
    sets = consistency_sets(points, None, k=10)
    sizes = np.bincount(sets)
    big = np.argsort(sizes)[-2:]
    assert sizes[big].sum() > 0.8 * len(points)
    for s in big:
        assert len(np.unique(plane[sets == s])) == 1


def _reference_fh(points, normals, k, c, distance_weight):
    """Slow, obviously-correct Felzenszwalb-Huttenlocher: explicit member lists and MST maxima."""
    edges = knn_graph(points, k)
    dist = np.linalg.norm(points[edges[:, 0]] - points[edges[:, 1]], axis=1)
    w = 1 - np.abs((normals[edges[:, 0]] * normals[edges[:, 1]]).sum(1)) + distance_weight * dist / dist.mean()
    members = {i: {i} for i in range(len(points))}
    owner = list(range(len(points)))
    internal = {i: 0.0 for i in range(len(points))}
    for e in sorted(range(len(edges)), key=lambda e: w[e]):
        a, b = owner[edges[e, 0]], owner[edges[e, 1]]
        if a == b:
            continue
        if w[e] <= min(internal[a] + c / len(members[a]), internal[b] + c / len(members[b])):
            members[a] |= members.pop(b)
            internal[a] = max(internal.pop(b), internal[a], w[e])
            for p in members[a]:
                owner[p] = a
    return np.array(owner)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_consistency_sets_match_reference(seed):
    rng = np.random.default_rng(seed)
    points = rng.random((80, 3))
    normals = rng.normal(size=(80, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    got = consistency_sets(points, normals, k=6, c=0.8, distance_weight=0.05)
    ref = _reference_fh(points, normals, 6, 0.8, 0.05)
    # same partition: a bijection between set ids
    pairs = np.unique(np.stack([got, ref], 1), axis=0)
    assert len(pairs) == len(np.unique(got)) == len(np.unique(ref))
    assert 1 < len(np.unique(got)) < 80                             # a non-trivial case


def test_consistency_sets_min_size_and_errors():
    rng = np.random.default_rng(3)
    points = rng.random((200, 3))
    normals = rng.normal(size=(200, 3))
    sets = consistency_sets(points, normals, c=0.1, min_size=5)
    assert np.bincount(sets).min() >= 5
    with pytest.raises(ValueError, match="normals"):
        consistency_sets(points, normals[:10])
    with pytest.raises(ValueError, match=r"\[N, 3\]"):
        consistency_sets(points[:, :2])
    assert consistency_sets(np.zeros((0, 3))).shape == (0,)


def test_knn_graph_is_symmetric_and_unique():
    rng = np.random.default_rng(4)
    points = rng.random((50, 3))
    edges = knn_graph(points, k=4)
    assert np.all(edges[:, 0] < edges[:, 1])
    assert len(np.unique(edges, axis=0)) == len(edges)
    d = np.linalg.norm(points[:, None] - points[None], axis=2)
    np.fill_diagonal(d, np.inf)
    nn = np.argsort(d, 1)[:, :4]
    expected = {(min(i, j), max(i, j)) for i in range(50) for j in nn[i]}
    assert set(map(tuple, edges.tolist())) == expected


# ------------------------------------------------------------------------------------------------
# Refinement
# ------------------------------------------------------------------------------------------------
def test_refinement_fixes_minority_flips_and_keeps_unseen():
    set_ids = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1, 2])
    labels = np.array([2, 2, 1, 2, -1, 0, 0, 1, -1, -1])
    out = refine_point_labels(set_ids, labels)
    # set 0: 2 2 1 2 0 -> 2; set 1: 0 / 1 tie -> 0 (smallest); set 2: nothing seen
    assert out.tolist() == [2, 2, 2, 2, -1, 2, 0, 0, -1, -1]
    per_view = refine_point_labels(set_ids, np.stack([labels, np.where(labels == 2, 1, labels)]))
    assert per_view.tolist() == [out.tolist(), [1, 1, 1, 1, -1, 1, 0, 0, -1, -1]]
    with pytest.raises(ValueError):
        refine_point_labels(set_ids, labels[:5])


def test_refinement_on_the_fold_restores_plane_labels():
    points, normals, plane = fold()
    rng = np.random.default_rng(5)
    noisy = plane.copy()
    flip = rng.random(len(plane)) < 0.2
    noisy[flip] = 1 - noisy[flip]
    noisy[rng.random(len(plane)) < 0.1] = -1
    out = refine_point_labels(consistency_sets(points, normals), noisy)
    np.testing.assert_array_equal(out[noisy >= 0], plane[noisy >= 0])
    assert np.all(out[noisy < 0] == -1)
