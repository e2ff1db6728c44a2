"""Unlabelled meshes / point clouds and the ShapeNetCore layout, on files the tests write."""
from __future__ import annotations

import json

import numpy as np
import pytest
import trimesh
from hypothesis import given, settings
from hypothesis import strategies as st

from gen3d.errors import DataFormatError
from gen3d.meshio import load_mesh, load_point_cloud, parse_off
from gen3d.readers.meshes import file_record, load_shapenet_split, read_files, read_shapenetcore


def test_mesh_formats_agree(tmp_path):
    box = trimesh.creation.box(extents=(2, 1, 0.5))
    for ext in ("obj", "ply", "off", "stl"):
        box.export(tmp_path / f"box.{ext}")
        m = load_mesh(tmp_path / f"box.{ext}")
        assert m.faces.shape == (12, 3)
        np.testing.assert_allclose(np.ptp(m.vertices, 0), [2, 1, 0.5], atol=1e-6)
    rec = file_record(tmp_path / "box.obj", "table", num_points=500)
    assert rec.points.shape == (500, 3) and rec.labels is None and rec.has_mesh
    assert rec.part_names == ("top", "leg", "support")
    # all samples lie on the box surface and normals are axis-aligned unit vectors
    half = np.array([1, 0.5, 0.25])
    assert np.all(np.abs(rec.points) <= half + 1e-5)
    assert np.all(np.isclose(np.abs(rec.points), half, atol=1e-5).any(1))
    np.testing.assert_allclose(np.abs(rec.normals).max(1), 1, atol=1e-6)


def test_off_polygons_are_triangulated_with_source_index():
    m = parse_off("OFF\n# a quad and a triangle\n5 2 0\n0 0 0\n1 0 0\n1 1 0\n0 1 0\n0 0 1\n4 0 1 2 3\n3 0 1 4\n")
    assert m.faces.shape == (3, 3)
    np.testing.assert_array_equal(m.face_source, [0, 0, 1])
    m2 = parse_off("OFF 3 1 0\n0 0 0\n1 0 0\n0 1 0\n3 0 1 2 255 0 0\n")
    assert m2.faces.tolist() == [[0, 1, 2]]


def test_point_clouds_fps_resampling(tmp_path):
    rng = np.random.default_rng(0)
    pts = rng.random((1000, 6)).astype(np.float32)
    np.save(tmp_path / "a.npy", pts)
    np.savetxt(tmp_path / "b.xyz", pts[:, :3])
    recs = list(read_files([tmp_path / "*.npy", tmp_path / "b.xyz"], "chair", num_points=256, seed=2))
    assert [r.shape_id for r in recs] == ["a", "b"]
    assert recs[0].normals is not None and recs[1].normals is None
    # resampled points are a subset of the originals, normals follow their points
    rows = {tuple(p) for p in pts[:, :3]}
    assert all(tuple(p) in rows for p in recs[0].points)
    idx = [int(np.flatnonzero((pts[:, :3] == p).all(1))[0]) for p in recs[0].points[:10]]
    np.testing.assert_array_equal(recs[0].normals[:10], pts[idx, 3:])
    again = list(read_files([tmp_path / "a.npy"], "chair", num_points=256, seed=2))
    np.testing.assert_array_equal(again[0].points, recs[0].points)


def test_shapenetcore_layout_and_splits(tmp_path):
    for sid in ("m1", "m2", "m3"):
        d = tmp_path / "core" / "03001627" / sid / "models"
        d.mkdir(parents=True)
        trimesh.creation.icosphere(1).export(d / "model_normalized.obj")
    (tmp_path / "all.csv").write_text("id,synsetId,subSynsetId,modelId,split\n"
                                       "1,03001627,0,m1,train\n2,03001627,0,m2,test\n3,03001627,0,m3,val\n")
    recs = list(read_shapenetcore(tmp_path / "core", ["chair"], tmp_path / "all.csv", num_points=64))
    assert [(r.shape_id, r.split, r.category) for r in recs] == [
        ("03001627/m1", "train", "chair"), ("03001627/m2", "test", "chair"), ("03001627/m3", "val", "chair")]
    test_only = list(read_shapenetcore(tmp_path / "core", ["03001627"], tmp_path / "all.csv", splits=["test"], num_points=64))
    assert [r.shape_id for r in test_only] == ["03001627/m2"]
    split_dir = tmp_path / "splits"
    split_dir.mkdir()
    for split, ids in (("train", ["m1"]), ("val", ["m3"]), ("test", ["m2"])):
        (split_dir / f"shuffled_{split}_file_list.json").write_text(json.dumps([f"shape_data/03001627/{i}" for i in ids]))
    assert load_shapenet_split(split_dir) == {"m1": "train", "m2": "test", "m3": "val"}
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(DataFormatError, match="bad.csv: header"):
        load_shapenet_split(tmp_path / "bad.csv")
    with pytest.raises(FileNotFoundError, match="02691156"):
        list(read_shapenetcore(tmp_path / "core", ["airplane"]))


@settings(max_examples=60, deadline=None)
@given(data=st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode),
                      st.lists(st.lists(st.sampled_from(["1", "2.5", "nan", "inf", "x", ""]), max_size=7), max_size=10)
                      .map(lambda rows: "\n".join(" ".join(r) for r in rows).encode())),
       suffix=st.sampled_from([".off", ".obj", ".ply", ".npy", ".xyz", ".txt"]))
def test_malformed_files_raise_data_format_error_only(tmp_path_factory, data, suffix):
    path = tmp_path_factory.mktemp("bad") / f"shape{suffix}"
    path.write_bytes(data)
    try:
        rec = file_record(path, "chair", num_points=8)
    except DataFormatError as exc:
        assert str(path) in str(exc)
    else:
        assert rec.points.shape == (8, 3) and np.all(np.isfinite(rec.points))


def test_missing_files():
    with pytest.raises(FileNotFoundError):
        list(read_files(["/nonexistent/x.obj"], "chair"))
    with pytest.raises(FileNotFoundError):
        load_point_cloud("/nonexistent/x.npy")
