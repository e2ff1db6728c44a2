"""Labeled PSB and PSB readers on the real files in the shared data folder."""
from __future__ import annotations

import tarfile
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gen3d.errors import DataFormatError
from gen3d.meshio import parse_off
from gen3d.readers.psb import (LabeledPSBFile, iter_labeled_psb_files, labeled_psb_record, labeled_psb_split,
                               parse_labels, psb_categories, read_labeled_psb, read_psb, read_psb_segmentations,
                               target_names)


def test_all_380_meshes_every_face_labelled_once(labeled_psb_files):
    assert len(labeled_psb_files) == 380
    assert Counter(f.category for f in labeled_psb_files) == {c: 20 for c in psb_categories()}
    total_faces = 0
    for item in labeled_psb_files:
        mesh = parse_off(item.off, item.off_name)
        parts = parse_labels(item.labels, len(mesh.faces), item.labels_name)
        counts = np.bincount(np.concatenate(list(parts.values())), minlength=len(mesh.faces))
        assert np.all(counts == 1), item.labels_name  # every face labelled exactly once
        total_faces += len(mesh.faces)
    assert total_faces == 7_768_858


def test_face_labels_survive_surface_sampling(labeled_psb_files):
    """Each sampled point carries the label of the face it was sampled on (checked for every mesh
    by recomputing the point's face with barycentric containment on a subset)."""
    for item in labeled_psb_files[::1]:
        rec = labeled_psb_record(item, num_points=512, seed=3)
        assert rec.points.shape == (512, 3) and rec.labels.shape == (512,)
        assert rec.labels.min() >= 0 and rec.labels.max() < len(rec.part_names)
        assert len(rec.face_labels) == len(rec.mesh_faces)
        # nearest-face check: the point lies on a face whose label equals the point's label
        tri = rec.mesh_vertices[rec.mesh_faces]                   # [F, 3, 3]
        for p, lab in zip(rec.points[:8], rec.labels[:8]):
            d = _point_triangle_distance(p, tri)
            on = d < 1e-5 * max(1.0, float(np.ptp(rec.mesh_vertices)))
            assert on.any() and lab in set(rec.face_labels[on].tolist()), item.off_name


def _point_triangle_distance(p, tri):
    """Distance from p to each triangle's plane if its projection is inside, else inf."""
    a, b, c = tri[:, 0], tri[:, 1], tri[:, 2]
    n = np.cross(b - a, c - a)
    nn = np.linalg.norm(n, axis=1)
    ok = nn > 0
    n = n[ok] / nn[ok, None]
    dist = np.abs(((p - a[ok]) * n).sum(1))
    q = p - ((p - a[ok]) * n).sum(1, keepdims=True) * n
    def side(u, v):
        return (np.cross(v - u, q - u) * n).sum(1)
    tol = -1e-7
    inside = (side(a[ok], b[ok]) >= tol * nn[ok]) & (side(b[ok], c[ok]) >= tol * nn[ok]) & (side(c[ok], a[ok]) >= tol * nn[ok])
    out = np.full(len(tri), np.inf)
    out[np.flatnonzero(ok)[inside]] = dist[inside]
    return out


def test_shapenet_mapping_and_split(labeled_psb_files):
    chairs = [labeled_psb_record(f, 1024, orient=False) for f in labeled_psb_files if f.category == "Chair"]
    assert {c.category for c in chairs} == {"chair"}
    assert chairs[0].part_names == ("back", "seat", "leg", "arm")
    assert Counter(c.split for c in chairs) == {"train": 10, "test": 10}
    assert [c.shape_id for c in chairs if c.split == "train"] == [str(i) for i in range(101, 111)]
    # semantics survive the mapping: along the axis that separates back and legs most, the seat
    # lies between them (raw PSB meshes are not consistently oriented: 104-106 are z-up, others y-up)
    up_axes = []
    for c in chairs:
        m = {n: c.points[c.labels == k].mean(0) for k, n in enumerate(c.part_names) if (c.labels == k).any()}
        axis = int(np.argmax(np.abs(m["back"] - m["leg"])))
        lo, hi = sorted([m["back"][axis], m["leg"][axis]])
        assert lo < m["seat"][axis] < hi, c.shape_id
        up_axes.append(axis)
    assert Counter(up_axes) == {1: 17, 2: 3}
    planes = [labeled_psb_record(f, 1024) for f in labeled_psb_files if f.category == "Airplane"]
    assert planes[0].part_names == ("body", "wing", "tail", "engine")
    # stabilizer and rudder faces both became 'tail'; 19 of 20 have a rudder, all have a tail
    assert all((p.face_labels == 2).any() for p in planes)
    assert sum((p.face_labels == 3).any() for p in planes) == 3
    cup = labeled_psb_record(next(f for f in labeled_psb_files if f.category == "Cup"), 256)
    assert cup.category == "mug" and cup.part_names == ("handle", "body")
    ant = labeled_psb_record(next(f for f in labeled_psb_files if f.category == "Ant"), 256)
    assert ant.category == "ant" and ant.part_names == ("antenna", "back", "head", "leg", "torso")
    raw = labeled_psb_record(next(f for f in labeled_psb_files if f.category == "Chair"), 256, part_names="psb")
    assert raw.category == "chair" and raw.part_names == ("arm", "backsupport", "leg", "support")


def test_folder_and_archive_give_the_same_records(tmp_path, labeled_psb_archive, data_root):
    with tarfile.open(labeled_psb_archive) as tar:
        members = [m for m in tar.getmembers() if "/Cup/2" in m.name]
        tar.extractall(tmp_path, members=members, filter="data")
    from_dir = list(read_labeled_psb(tmp_path, num_points=300))
    from_tar = list(read_labeled_psb(labeled_psb_archive, categories=["cup"], num_points=300))
    assert [r.shape_id for r in from_dir] == [str(i) for i in range(21, 30)]
    for a, b in zip(from_dir, [r for r in from_tar if int(r.shape_id) < 30]):
        np.testing.assert_array_equal(a.points, b.points)
        np.testing.assert_array_equal(a.labels, b.labels)
    # the unpacked Airplane / Chair label files in labels/ pair with psb_chen2009/off meshes
    labels = (data_root / "psb_labeled_kalogerakis2010" / "labels" / "Chair" / "105_labels.txt").read_bytes()
    off = (data_root / "psb_chen2009" / "off" / "105.off").read_bytes()
    rec = labeled_psb_record(LabeledPSBFile("Chair", 105, off, labels, "105.off", "105_labels.txt"), 200)
    assert rec.split == "train" and rec.face_labels.min() >= 0


def test_splits_filter_and_fixed_split():
    assert labeled_psb_split("Airplane", 70) == "train" and labeled_psb_split("Airplane", 71) == "test"
    assert labeled_psb_split("mug", 21) == "train"
    with pytest.raises(KeyError):
        labeled_psb_split("Chair", 61)
    assert target_names("Table")[1] == ("top", "leg", "support")


def test_psb_human_segmentations_match_meshes(data_root):
    root = data_root / "psb_chen2009"
    recs = list(read_psb(root, num_points=128))
    assert len(recs) == 40 and Counter(r.category for r in recs) == {"airplane": 20, "chair": 20}
    n_files = 0
    for r in recs:
        segs = read_psb_segmentations(root, int(r.shape_id), len(r.mesh_faces))
        assert segs and all(len(s) == len(r.mesh_faces) for s in segs)
        assert all(s.max() >= 1 for s in segs)  # a segmentation has at least two segments
        assert r.labels is None and len(r.provenance["segmentations"]) == len(segs)
        n_files += len(segs)
    assert n_files == 476


# ---------------------------------------------------------------------------------------------
# Malformed files give DataFormatError only
# ---------------------------------------------------------------------------------------------
GOOD_OFF = b"OFF\r\n4 2 0\r\n0 0 0\r\n1 0 0\r\n0 1 0\r\n0 0 1\r\n3 0 1 2\r\n3 0 1 3\r\n"
GOOD_LABELS = b"support\r\n1\r\nleg\r\n2\r\n"


def _mutations():
    def cut(data, frac):
        return data[: int(len(data) * frac)]
    return st.one_of(
        st.binary(max_size=200),
        st.tuples(st.sampled_from([GOOD_OFF, GOOD_LABELS]), st.floats(0, 0.95)).map(lambda t: cut(*t)),
        st.tuples(st.sampled_from([GOOD_OFF, GOOD_LABELS]), st.integers(0, 60), st.binary(min_size=1, max_size=4))
          .map(lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]):]),
        st.sampled_from([b"OFF\n4 2 0\n0 0 nan\n1 0 0\n0 1 0\n0 0 1\n3 0 1 2\n3 0 1 3\n",
                         b"OFF\n4 2 0\n0 0 0\n1 0 0\n0 1 0\n0 0 1\n3 0 1 9\n3 0 1 3\n",
                         b"OFF\n-1 2 0\n", b"PLY\n", b"", b"OFF\n4 2\n"]),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(off=_mutations(), labels=_mutations())
def test_malformed_labeled_psb_files_raise_data_format_error_only(off, labels):
    item = LabeledPSBFile("Chair", 101, off, labels, "101.off", "101_labels.txt")
    try:
        rec = labeled_psb_record(item, num_points=16)
    except DataFormatError as exc:
        assert exc.path in ("101.off", "101_labels.txt")
    else:
        assert rec.points.shape == (16, 3)


@settings(max_examples=40, deadline=None)
@given(data=_mutations())
def test_malformed_segmentation_files(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("psb")
    (root / "off").mkdir()
    (root / "off" / "101.off").write_bytes(GOOD_OFF)
    (root / "seg_human" / "101").mkdir(parents=True)
    (root / "seg_human" / "101" / "101_0.seg").write_bytes(data)
    try:
        segs = read_psb_segmentations(root, 101)
    except DataFormatError as exc:
        assert "101_0.seg" in exc.path
    else:
        assert len(segs[0]) == 2


def test_missing_archive_and_broken_archive(tmp_path):
    with pytest.raises(FileNotFoundError):
        list(iter_labeled_psb_files(tmp_path / "nope.tar.xz"))
    bad = tmp_path / "bad.tar.xz"
    bad.write_bytes(b"\xfd7zXZ\x00 not really")
    with pytest.raises(DataFormatError, match="archive"):
        list(iter_labeled_psb_files(bad))
    (tmp_path / "LabeledDB_new" / "Chair").mkdir(parents=True)
    (tmp_path / "LabeledDB_new" / "Chair" / "101.off").write_bytes(GOOD_OFF)
    with pytest.raises(DataFormatError, match="no label file"):
        list(iter_labeled_psb_files(tmp_path / "LabeledDB_new"))


def _centroid(rec, part):
    return rec.points[rec.labels == rec.part_names.index(part)].mean(0)


def test_chairs_airplanes_and_tables_are_put_in_shapenet_pose(labeled_psb_files):
    """All 60 Labeled-PSB chairs, airplanes and tables end up in the procedural shapes' pose: +y up,
    chair backs and airplane tails at -z, airplanes thinnest along y, long table sides along x."""
    items = [f for f in labeled_psb_files if f.category in ("Chair", "Airplane", "Table")]
    assert len(items) == 60
    turned = 0
    for item in items:
        rec = labeled_psb_record(item, num_points=1024, keep_mesh=True)
        raw = labeled_psb_record(item, num_points=1024, keep_mesh=True, orient=False)
        rot = np.array(rec.provenance["rotation"], np.float64)
        # a proper signed permutation, applied to the mesh and the points alike
        assert np.allclose(np.abs(rot).sum(0), 1) and np.allclose(np.abs(rot).sum(1), 1)
        assert round(np.linalg.det(rot)) == 1 and raw.provenance["rotation"] is None
        np.testing.assert_allclose(rec.mesh_vertices, raw.mesh_vertices @ rot.T, atol=1e-5)
        np.testing.assert_allclose(rec.points, raw.points @ rot.T, atol=1e-5)
        turned += not np.allclose(rot, np.eye(3))
        extent = rec.points.max(0) - rec.points.min(0)
        if rec.category == "chair":
            back, seat, leg = (_centroid(rec, p) for p in ("back", "seat", "leg"))
            assert back[1] > seat[1] > leg[1] and back[2] < seat[2], item.mesh_id
        elif rec.category == "airplane":
            body, tail = _centroid(rec, "body"), _centroid(rec, "tail")
            assert tail[2] < body[2] - 0.2 and extent[1] == extent.min(), item.mesh_id
            fin = rec.points[rec.labels == rec.part_names.index("tail"), 1] - body[1]
            assert fin.max() > -fin.min(), item.mesh_id
        else:
            assert _centroid(rec, "top")[1] > _centroid(rec, "leg")[1] and extent[0] >= extent[2] - 0.01, item.mesh_id  # (vertex vs sample extent)
    assert turned >= 20  # most of them needed it


def test_canonical_rotation_undoes_any_axis_aligned_turn_of_procedural_shapes():
    from itertools import permutations, product

    from gen3d.orient import canonical_rotation
    from gen3d.procedural import generate

    turns = [np.eye(3)[list(p)] * np.array(s)[:, None] for p in permutations(range(3)) for s in product((1, -1), repeat=3)]
    turns = [t for t in turns if round(np.linalg.det(t)) == 1]
    assert len(turns) == 24
    for category in ("chair", "airplane", "table"):
        rec = generate(category, 3, seed=5)
        for t in turns:
            rot = canonical_rotation(category, rec.mesh_vertices @ t.T, rec.mesh_faces, rec.face_labels, rec.part_names)
            back = rot @ t
            if category == "table":  # a table is symmetric under a half turn about y: either is right
                assert np.allclose(back, np.eye(3)) or np.allclose(back, np.diag([-1.0, 1.0, -1.0])), t.tolist()
            else:
                np.testing.assert_allclose(back, np.eye(3), atol=1e-9, err_msg=f"{category} {t.tolist()}")
    assert canonical_rotation("mug", rec.mesh_vertices, rec.mesh_faces, rec.face_labels, rec.part_names) is None
