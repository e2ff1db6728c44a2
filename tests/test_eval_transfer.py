"""eval.transfer: 5-NN face voting, per-face vs area-weighted IoU, part mappings, mesh scores.

Known answers on tiny meshes (worked out in the comments), and one real-data sanity check: the
ground-truth point labels of two Labeled-PSB test chairs, voted onto their own meshes, must give a
per-face mIoU above 0.9.
"""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from eval.transfer import (
    MeshTruth,
    PartMapping,
    face_areas,
    face_iou,
    face_labels_from_points,
    mesh_transfer_scores,
)

# Two triangles sharing the edge v0-v1: T0 = (v0, v1, v2) of area 3, T1 = (v0, v3, v1) of area 1.
VERTS = np.array([[0.0, 0, 0], [2, 0, 0], [0, 3, 0], [0, -1, 0]])
FACES = np.array([[0, 1, 2], [0, 3, 1]])


# ----------------------------------------------------------------------------------------------
# Face IoU
# ----------------------------------------------------------------------------------------------
def test_face_areas():
    np.testing.assert_allclose(face_areas(VERTS, FACES), [3.0, 1.0])


def test_per_face_vs_area_weighted_iou_on_two_triangles():
    areas = face_areas(VERTS, FACES)
    gt = np.array([0, 1])
    # both faces predicted 0. Per face: part 0 P={T0,T1}, G={T0}: 1/2; part 1: 0 / 1 = 0.
    np.testing.assert_allclose(face_iou([0, 0], gt, 2), [0.5, 0.0])
    # area-weighted: part 0: 3 / (3 + 1) = 0.75; part 1: 0
    np.testing.assert_allclose(face_iou([0, 0], gt, 2, areas), [0.75, 0.0])
    # both predicted 1: per face part 1 = 1/2, area-weighted 1 / 4
    np.testing.assert_allclose(face_iou([1, 1], gt, 2), [0.0, 0.5])
    np.testing.assert_allclose(face_iou([1, 1], gt, 2, areas), [0.0, 0.25])
    # absent part 2: 1 or NaN
    assert face_iou([0, 1], gt, 3, areas, absent="one")[2] == 1.0
    assert np.isnan(face_iou([0, 1], gt, 3, areas, absent="skip")[2])


# ----------------------------------------------------------------------------------------------
# 5-NN voting
# ----------------------------------------------------------------------------------------------
def _triangle_at(cx: float) -> np.ndarray:
    """Vertices of a triangle with centroid (cx, 0, 0)."""
    return np.array([[cx - 1, -1, 0], [cx + 2, -1, 0], [cx - 1, 2, 0]], float)


def test_five_nearest_points_vote():
    verts = np.concatenate([_triangle_at(0), _triangle_at(100), _triangle_at(200)])
    faces = np.arange(9).reshape(3, 3)
    offsets = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 5.0])  # distances from the centroid, along z
    points, labels = [], []
    clusters = {
        0: [0, 1, 1, 2, 1, 0],      # 5 nearest: 0 1 1 2 1 -> 1 (3 votes); the 6th (a 0) is not a voter
        100: [2, 0, 0, 2, 3, 0],    # 2 and 0 tie with 2 votes; the nearer tied point is a 2 -> 2
        200: [-1, -1, 0, -1, 0, 0],  # -1 votes like any label: 3 votes -> -1
    }
    for cx, labs in clusters.items():
        points.append(np.stack([np.full(6, cx), np.zeros(6), offsets], 1))
        labels += labs
    points = np.concatenate(points)
    got = face_labels_from_points(points, np.array(labels), verts, faces)
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, [1, 2, -1])
    np.testing.assert_array_equal(face_labels_from_points(points, np.array(labels), verts, faces, k=1), [0, 2, -1])
    with pytest.raises(ValueError, match="integers"):
        face_labels_from_points(points, np.array(labels, float), verts, faces)
    with pytest.raises(ValueError, match="outside"):
        face_labels_from_points(points, np.array(labels), verts, faces + 10)


# ----------------------------------------------------------------------------------------------
# Part mappings
# ----------------------------------------------------------------------------------------------
def test_labeled_psb_and_coseg_mappings():
    table = PartMapping.labeled_psb("table")  # PSB tables label top (support) and leg only
    assert table.dataset_parts == ("top", "leg", "support")
    assert table.evaluated_parts == ("top", "leg")
    assert table.ignored_model_parts == ("support",) and table.ignored_dataset_parts == ("support",)
    chair = PartMapping.labeled_psb("Chair")
    assert chair.evaluated_parts == ("back", "seat", "leg", "arm") and chair.ignored_model_parts == ()
    coseg = PartMapping.coseg("chairs")  # COSEG chairs: back, seat, legs; no arm
    assert coseg.dataset_parts == ("back", "seat", "leg", "arm")
    assert coseg.mapping["arm"] is None and coseg.evaluated_parts == ("back", "seat", "leg")
    vases = PartMapping.coseg("vases")  # no ShapeNetPart counterpart: own names, all labelled
    assert vases.evaluated_parts == ("neck", "handle", "belly", "bottom")
    assert coseg.describe()["ignored_model_parts"] == ["arm"]
    with pytest.raises(KeyError):
        PartMapping.coseg("spoons")
    with pytest.raises(ValueError, match="keys"):
        PartMapping(("a", "b"), ("x",), {"a": "x"})
    with pytest.raises(ValueError, match="not data-set parts"):
        PartMapping(("a",), ("x",), {"a": "y"})


def test_mapping_apply_merges_and_ignores():
    # model parts a, b -> x (merged); c -> None; data-set part z has no model part
    pm = PartMapping(("a", "b", "c"), ("x", "y", "z"), {"a": "x", "b": "x", "c": None}, "toy")
    assert pm.evaluated_parts == ("x",) and pm.ignored_dataset_parts == ("y", "z")
    pred = np.array([0, 1, 2, 2, -1, 0])
    gt = np.array([0, 0, 0, 1, 0, 2])
    p, g = pm.apply(pred, gt, "ignore")
    np.testing.assert_array_equal(p, [0, 0, -1, -1, -1, 0])
    np.testing.assert_array_equal(g, [0, 0, -1, -1, 0, -1])  # c-predicted and y/z GT left out
    p, g = pm.apply(pred, gt, "wrong")
    np.testing.assert_array_equal(g, [0, 0, 0, -1, 0, -1])  # c-predicted kept, as a wrong prediction
    with pytest.raises(ValueError, match="unmapped"):
        pm.apply(pred, gt, "drop")
    with pytest.raises(ValueError, match=r"\[-1, 3\)"):
        pm.apply(np.array([3]), np.array([0]))


# ----------------------------------------------------------------------------------------------
# Mesh scores
# ----------------------------------------------------------------------------------------------
def _toy_mesh(face_labels, category="chair"):
    # one point per face, at its centroid, so the k=1 vote gives each face its own point's label
    centroids = VERTS[FACES].mean(1)
    return MeshTruth(category=category, points=centroids, mesh_vertices=VERTS, mesh_faces=FACES,
                     face_labels=np.array(face_labels), part_names=("back", "seat", "leg", "arm"), shape_id="toy")


def test_mesh_transfer_scores_known_answer():
    mapping = PartMapping.coseg("chairs")  # arm not scored: 3 evaluated parts back, seat, leg
    shape = _toy_mesh([0, 1])  # T0 (area 3) back, T1 (area 1) seat
    got = mesh_transfer_scores([shape], [np.array([0, 0])], mapping, k=1)
    # per face: back 1/2, seat 0, leg absent -> one: (0.5 + 0 + 1) / 3 = 0.5, skip: 0.25
    # area:     back 3/4, seat 0              -> one: (0.75 + 0 + 1) / 3,   skip: 0.375
    assert got["per_face"]["one"]["instance_miou"] == pytest.approx(0.5)
    assert got["per_face"]["skip"]["instance_miou"] == pytest.approx(0.25)
    assert got["area_weighted"]["one"]["instance_miou"] == pytest.approx(1.75 / 3)
    assert got["area_weighted"]["skip"]["category_miou"] == pytest.approx(0.375)
    assert got["per_face"]["one"]["per_category"]["chair"]["part_iou"] == {"back": 0.5, "seat": 0.0, "leg": 1.0}
    assert got["mappings"]["chair"]["ignored_model_parts"] == ["arm"] and got["unmapped"] == "ignore"
    assert got["shapes"][0]["miou_area"]["skip"] == pytest.approx(0.375)

    # T0 predicted arm (not labelled by COSEG): ignored -> only T1 scored (seat, right: skip mIoU 1);
    # counted wrong -> back 0/1, seat 1/1
    ignore = mesh_transfer_scores([shape], [np.array([3, 1])], mapping, k=1)
    assert ignore["per_face"]["skip"]["instance_miou"] == 1.0
    assert ignore["shapes"][0]["ignored_faces"] == 1
    assert ignore["shapes"][0]["ignored_area_fraction"] == pytest.approx(0.75)
    wrong = mesh_transfer_scores([shape], [np.array([3, 1])], mapping, k=1, unmapped="wrong")
    assert wrong["per_face"]["skip"]["instance_miou"] == pytest.approx(0.5)
    assert wrong["area_weighted"]["skip"]["instance_miou"] == pytest.approx(0.5)

    with pytest.raises(ValueError, match="predictions"):
        mesh_transfer_scores([shape], [], mapping)
    with pytest.raises(ValueError, match="part_names"):
        mesh_transfer_scores([shape], [np.array([0, 0])], PartMapping.labeled_psb("table"))


@pytest.fixture(scope="module")
def psb_test_chairs(labeled_psb_archive):
    from gen3d.readers.psb import read_labeled_psb

    return list(itertools.islice(read_labeled_psb(labeled_psb_archive, categories=["chair"], splits=["test"]), 2))


def test_real_labeled_psb_chairs_transfer_their_own_labels(psb_test_chairs):
    assert len(psb_test_chairs) == 2
    got = mesh_transfer_scores(psb_test_chairs, [r.labels for r in psb_test_chairs], PartMapping.labeled_psb("chair"))
    for row in got["shapes"]:
        assert row["miou_per_face"]["one"] > 0.9, row
        assert row["miou_area"]["one"] > 0.9, row
    assert got["per_face"]["skip"]["instance_miou"] > 0.9
    assert got["area_weighted"]["skip"]["instance_miou"] > 0.9
    assert not math.isnan(got["per_face"]["one"]["category_miou"])
