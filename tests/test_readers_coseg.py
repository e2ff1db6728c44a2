"""COSEG reader: sets written here in the published layout (<set>/shapes/<i>.off + <set>/gt/<i>.seg;
there is no real COSEG copy in the shared data); hypothesis feeds malformed files and only
DataFormatError may come out."""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gen3d.errors import DataFormatError
from gen3d.parts import part_names
from gen3d.readers.coseg import read_coseg, set_name

CENTERS = np.array([0.0, 3.0, 6.0])  # one unit box per part, far apart in x


def _box(cx: float, size=(1.0, 1.0, 1.0)):
    sx, sy, sz = (s / 2 for s in size)
    v = np.array([[cx + dx * sx, dy * sy, dz * sz] for dx in (-1, 1) for dy in (-1, 1) for dz in (-1, 1)])
    quads = [(0, 1, 3, 2), (4, 6, 7, 5), (0, 4, 5, 1), (2, 3, 7, 6), (0, 2, 6, 4), (1, 5, 7, 3)]
    return v, quads


def _off_text(boxes, triangulate: bool) -> tuple[str, int]:
    """OFF of several boxes; returns (text, faces per box)."""
    verts, faces = [], []
    for cx in boxes:
        v, quads = _box(cx)
        base = len(verts)
        verts.extend(v.tolist())
        for q in quads:
            q = [base + i for i in q]
            faces.extend([[q[0], q[1], q[2]], [q[0], q[2], q[3]]] if triangulate else [q])
    lines = ["OFF", f"{len(verts)} {len(faces)} 0"]
    lines += [" ".join(f"{c:g}" for c in p) for p in verts]
    lines += [f"{len(f)} " + " ".join(map(str, f)) for f in faces]
    return "\n".join(lines) + "\n", 12 if triangulate else 6


def _write_shape(set_dir: Path, i: str, raw_labels, triangulate=True, boxes=CENTERS):
    (set_dir / "shapes").mkdir(parents=True, exist_ok=True)
    (set_dir / "gt").mkdir(exist_ok=True)
    text, per_box = _off_text(boxes, triangulate)
    (set_dir / "shapes" / f"{i}.off").write_text(text)
    (set_dir / "gt" / f"{i}.seg").write_text("".join(f"{l}\n" for l in np.repeat(raw_labels, per_box)))


def _box_of(points):
    return np.argmin(np.abs(points[:, :1] - CENTERS[None]), axis=1)


def _on_box_surface(points, box):
    local = np.abs(points - np.stack([CENTERS[box], np.zeros(len(box)), np.zeros(len(box))], 1))
    return np.all(local <= 0.5 + 1e-5, axis=1) & np.any(np.isclose(local, 0.5, atol=1e-5), axis=1)


@pytest.fixture
def coseg_root(tmp_path):
    chairs = tmp_path / "Chairs"  # folder name is lower-cased to the set name
    _write_shape(chairs, "1", [1, 2, 3], triangulate=True)    # back, seat, legs
    _write_shape(chairs, "2", [3, 1, 2], triangulate=False)   # quads: labels per polygon
    _write_shape(chairs, "10", [2, 2, 1], triangulate=True)
    _write_shape(tmp_path / "Vases", "1", [4, 1, 2], triangulate=False)
    (tmp_path / "notes").mkdir()  # not a set folder: ignored
    return tmp_path


def test_chairs_face_and_point_labels_shapenet_names(coseg_root):
    recs = list(read_coseg(coseg_root, sets=["chairs"], num_points=256, seed=3))
    assert [r.shape_id for r in recs] == ["chairs/1", "chairs/2", "chairs/10"]
    expected_box_labels = {"chairs/1": [0, 1, 2], "chairs/2": [2, 0, 1], "chairs/10": [1, 1, 0]}
    for r in recs:
        assert r.category == "chair" and r.source == "real" and r.split == "none"
        assert r.part_names == part_names("chair") == ("back", "seat", "leg", "arm")
        assert r.points.shape == (256, 3) and r.points.dtype == np.float32
        assert r.labels.shape == (256,) and r.labels.dtype == np.int16
        assert r.normals.shape == (256, 3)
        assert r.mesh_vertices.shape == (24, 3) and r.mesh_vertices.dtype == np.float32
        assert r.mesh_faces.shape == (36, 3) and r.mesh_faces.dtype == np.int32
        box_lab = np.array(expected_box_labels[r.shape_id])
        # every triangle carries the label of its polygon
        assert r.face_labels.dtype == np.int16 and np.array_equal(r.face_labels, np.repeat(box_lab, 12))
        # each point's label is the label of the face (box) it lies on
        box = _box_of(r.points)
        assert np.all(_on_box_surface(r.points, box))
        assert np.array_equal(r.labels, box_lab[box])
        assert set(np.unique(box)) == {0, 1, 2}  # boxes of equal area all get points
        assert r.provenance == {"dataset": "coseg", "set": "chairs",
                                "file": str(coseg_root / "Chairs" / "shapes" / f"{r.shape_id[7:]}.off"),
                                "labels_file": str(coseg_root / "Chairs" / "gt" / f"{r.shape_id[7:]}.seg")}


def test_coseg_names_seeds_split_and_root_as_set(coseg_root):
    (r,) = [r for r in read_coseg(coseg_root, sets="chairs", part_names="coseg", num_points=64, split="test")
            if r.shape_id == "chairs/1"]
    assert r.part_names == ("back", "seat", "legs") and r.split == "test"
    assert np.array_equal(r.labels, np.array([0, 1, 2])[_box_of(r.points)])
    a = list(read_coseg(coseg_root / "Chairs", num_points=64, seed=5))  # root is the set folder
    b = list(read_coseg(coseg_root / "Chairs", num_points=64, seed=5))
    c = list(read_coseg(coseg_root / "Chairs", num_points=64, seed=6))
    assert [r.shape_id for r in a] == ["chairs/1", "chairs/2", "chairs/10"]
    assert all(np.array_equal(x.points, y.points) for x, y in zip(a, b))
    assert not np.array_equal(a[0].points, c[0].points)
    assert not np.array_equal(a[0].points, a[2].points)  # per-shape seeds (same geometry)
    # vases: to_shapenet is null -> the set's own names
    (v,) = read_coseg(coseg_root, sets=["vases"], num_points=64)
    assert v.category == "vase" and v.part_names == ("neck", "handle", "belly", "bottom")
    assert np.array_equal(v.face_labels, np.repeat([3, 0, 1], 12))
    assert np.array_equal(v.labels, np.array([3, 0, 1])[_box_of(v.points)])
    assert [r.shape_id for r in read_coseg(coseg_root, num_points=8)][-1] == "vases/1"
    assert set_name("Large Chairs") == set_name("large_chairs") == "large-chairs"


def test_user_mapping(tmp_path):
    _write_shape(tmp_path / "MyChairs", "7", [0, 1, 0])  # 0-based labels: seat, back, seat
    with pytest.raises(DataFormatError, match="known sets: .*chairs") as exc:
        read_coseg(tmp_path)
    assert exc.value.field == "set"
    mapping = tmp_path / "map.yaml"
    mapping.write_text(yaml.safe_dump({"sets": {"mychairs": {
        "category": "chair", "label_base": 0, "parts": ["seat", "back"],
        "to_shapenet": {"seat": "seat", "back": "back"}}}}))
    (r,) = read_coseg(tmp_path, mapping=mapping, num_points=128)
    assert r.part_names == ("back", "seat", "leg", "arm") and r.shape_id == "mychairs/7"
    assert np.array_equal(r.face_labels, np.repeat([1, 0, 1], 12))
    assert np.array_equal(r.labels, np.array([1, 0, 1])[_box_of(r.points)])
    (r,) = read_coseg(tmp_path, mapping=mapping, num_points=16, part_names="coseg")
    assert r.part_names == ("seat", "back") and set(r.face_labels.tolist()) == {0, 1}
    # a single entry (no `sets:`) applies to every set read
    single = {"category": "widget", "label_base": 0, "parts": ["a", "b"], "to_shapenet": None}
    (r,) = read_coseg(tmp_path, mapping=single, num_points=16)
    assert r.category == "widget" and r.part_names == ("a", "b")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"sets": {"mychairs": {"category": "chair", "label_base": 0, "parts": ["seat", "back"],
                                                         "to_shapenet": {"seat": "seat", "back": "backrest"}}}}))
    with pytest.raises(DataFormatError, match="backrest"):
        read_coseg(tmp_path, mapping=bad)
    bad.write_text("sets: [unclosed")
    with pytest.raises(DataFormatError, match="yaml"):
        read_coseg(tmp_path, mapping=bad)
    with pytest.raises(FileNotFoundError):
        read_coseg(tmp_path, mapping=tmp_path / "nope.yaml")


def test_deterministic_errors(tmp_path):
    s = tmp_path / "chairs"
    _write_shape(s, "1", [1, 2, 3], triangulate=False)
    seg = s / "gt" / "1.seg"
    seg.write_text("1\n" * 36)  # one label per triangle, but the OFF has 18 quads
    with pytest.raises(DataFormatError, match=r"36 labels in .*1\.seg but 18 faces in .*1\.off"):
        list(read_coseg(tmp_path))
    seg.write_text("1\n" * 17 + "4\n")
    with pytest.raises(DataFormatError, match=r"label 4 outside \[1, 4\)") as exc:
        list(read_coseg(tmp_path))
    assert exc.value.path == str(seg) and exc.value.field == "labels"
    seg.write_text("1\n" * 17 + "0\n")
    with pytest.raises(DataFormatError, match="label 0"):
        list(read_coseg(tmp_path))
    seg.unlink()
    with pytest.raises(DataFormatError, match="missing label file"):
        list(read_coseg(tmp_path))
    seg.write_text("1\n")
    (s / "shapes" / "1.off").write_text("OFF\n3 1 0\n0 0 0\n1 1 1\n2 2 2\n3 0 1 2\n")  # zero area
    with pytest.raises(DataFormatError, match="cannot sample"):
        list(read_coseg(tmp_path))
    with pytest.raises(FileNotFoundError):
        read_coseg(tmp_path / "missing")
    with pytest.raises(ValueError, match="not in"):
        read_coseg(tmp_path, sets=["vases"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="no COSEG set"):
        read_coseg(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------
# Hypothesis: malformed OFF / .seg files give DataFormatError and nothing else
# ---------------------------------------------------------------------------------------------

BAD = ["nan", "inf", "-inf", "1e999", "abc", "\x00", "2.5", "-1", "99", "+", "\u00e9"]
OFF_OPS = ["none", "none", "quads", "truncate", "garbage", "empty", "header", "counts", "index", "token",
           "polysize", "fewer_faces", "nonascii", "comment", "zero_area"]
SEG_OPS = ["none", "none", "truncate", "garbage", "empty", "extra", "fewer", "token", "range", "blank", "crlf", "missing"]


@st.composite
def coseg_cases(draw):
    """(off bytes, seg bytes or None) of a 3-box chair, each possibly corrupted."""
    off_op, seg_op = draw(st.sampled_from(OFF_OPS)), draw(st.sampled_from(SEG_OPS))
    quads = off_op == "quads" or draw(st.booleans())
    boxes = CENTERS[: draw(st.integers(1, 3))]
    text, per_box = _off_text(boxes, triangulate=not quads)
    lines = text.splitlines()
    nv = 8 * len(boxes)
    nface = per_box * len(boxes)
    labels = [str(draw(st.integers(1, 3))) for _ in range(nface)]
    if off_op == "header":
        lines[0] = draw(st.sampled_from(["COFF", "PLY", "OF", "", "NOFF"]))
    elif off_op == "counts":
        lines[1] = draw(st.sampled_from([f"{nv + 1} {nface} 0", f"{nv} {nface + 1} 0", f"{nv} -1 0", "a b c", f"{nv}",
                                         f"0 {nface} 0"]))
    elif off_op == "index":
        i = draw(st.integers(2 + nv, len(lines) - 1))
        lines[i] = lines[i].rsplit(" ", 1)[0] + " " + draw(st.sampled_from([str(nv), "-1", "1.5", "999999"]))
    elif off_op == "token":
        i = draw(st.integers(2, len(lines) - 1))
        lines[i] = lines[i].split(" ", 1)[0] + " " + draw(st.sampled_from(BAD)) + " 0"
    elif off_op == "polysize":
        i = draw(st.integers(2 + nv, len(lines) - 1))
        lines[i] = draw(st.sampled_from(["2 0 1", "0", "-3 0 1 2", "7 0 1 2"]))
    elif off_op == "fewer_faces":
        lines = lines[:-1]
    elif off_op == "comment":
        lines.insert(1, "# a comment")
    elif off_op == "zero_area":
        lines = ["OFF", "3 1 0", "0 0 0", "1 1 1", "2 2 2", "3 0 1 2"]
        labels = ["1"]
    off = ("\n".join(lines) + "\n").encode()
    if off_op == "truncate":
        off = off[: draw(st.integers(0, len(off)))]
    elif off_op == "garbage":
        off = draw(st.binary(max_size=200))
    elif off_op == "empty":
        off = b""
    elif off_op == "nonascii":
        off = off[:20] + b"\xff\xfe" + off[20:]
    if seg_op == "missing":
        return off, None
    if seg_op == "extra":
        labels.append("1")
    elif seg_op == "fewer":
        labels.pop()
    elif seg_op == "token":
        labels[draw(st.integers(0, len(labels) - 1))] = draw(st.sampled_from(BAD))
    elif seg_op == "range":
        labels[draw(st.integers(0, len(labels) - 1))] = draw(st.sampled_from(["0", "4", "-1", "1000"]))
    elif seg_op == "blank":
        labels.insert(draw(st.integers(0, len(labels))), "1 2")
    sep = "\r\n" if seg_op == "crlf" else "\n"
    seg = (sep.join(labels) + sep).encode("utf-8")
    if seg_op == "truncate":
        seg = seg[: draw(st.integers(0, len(seg)))]
    elif seg_op == "garbage":
        seg = draw(st.binary(max_size=100))
    elif seg_op == "empty":
        seg = b""
    return off, seg


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=coseg_cases())
def test_malformed_only_dataformaterror(case):
    off, seg = case
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / "chairs"
        (d / "shapes").mkdir(parents=True)
        (d / "gt").mkdir()
        (d / "shapes" / "1.off").write_bytes(off)
        if seg is not None:
            (d / "gt" / "1.seg").write_bytes(seg)
        try:
            recs = list(read_coseg(tmp, num_points=32))
        except DataFormatError:
            return
        (r,) = recs
        assert r.points.shape == (32, 3) and np.all(np.isfinite(r.points))
        assert r.labels.dtype == np.int16 and set(r.labels.tolist()) <= {0, 1, 2}
        assert len(r.face_labels) == len(r.mesh_faces)
        assert np.all(r.mesh_faces >= 0) and np.all(r.mesh_faces < len(r.mesh_vertices))
        assert not math.isnan(float(r.points.sum()))
