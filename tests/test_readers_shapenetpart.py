"""ShapeNetPart reader: the 16 real v0 samples, the official split lists, and files written here in
the normal-txt and HDF5 layouts; hypothesis feeds malformed files and only DataFormatError may
come out."""
from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gen3d.errors import DataFormatError
from gen3d.parts import part_names, shapenetpart_categories
from gen3d.readers.shapenetpart import detect_layout, load_splits, read_shapenetpart


@pytest.fixture(scope="module")
def sample(data_root) -> Path:
    """The 16 real v0 shapes (``$PARTDISTILL_DATA_ROOT`` or ``../shared/data``, see conftest)."""
    return data_root / "shapenetpart" / "sample_v0"


@pytest.fixture(scope="module")
def splits_dir(data_root) -> Path:
    """The official ShapeNetPart split lists."""
    return data_root / "shapenetpart" / "splits"


CATS = shapenetpart_categories()
SYN = {name: e["synset"] for name, e in CATS.items()}
HSET = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# Real data
# ---------------------------------------------------------------------------------------------

def test_v0_samples_all_16_load_with_file_counts(sample, splits_dir):
    recs = list(read_shapenetpart(sample, split_dir=splits_dir, num_points=None))
    assert sorted(r.category for r in recs) == sorted(CATS)
    for r in recs:
        syn = SYN[r.category]
        pts = sample / syn / "points" / f"{r.shape_id}.pts"
        seg = sample / syn / "points_label" / f"{r.shape_id}.seg"
        ref_pts = np.loadtxt(pts)
        ref_seg = np.loadtxt(seg).astype(int)
        assert r.points.shape == ref_pts.shape and r.points.dtype == np.float32
        np.testing.assert_allclose(r.points, ref_pts, atol=1e-6)
        assert r.labels.dtype == np.int16 and np.array_equal(r.labels, ref_seg - 1)
        assert 0 <= r.labels.min() and r.labels.max() < len(part_names(r.category))
        assert r.part_names == part_names(r.category)
        assert r.source == "real" and r.normals is None
        assert r.provenance == {"dataset": "shapenetpart", "layout": "v0", "file": str(pts),
                                "synset": syn, "labels_file": str(seg)}
        assert 2209 <= r.num_points <= 2834


def test_v0_samples_resampled_to_num_points(sample, splits_dir):
    recs = list(read_shapenetpart(sample, split_dir=splits_dir, categories=["chair", "02691156"], num_points=2048))
    assert [r.category for r in recs] == ["airplane", "chair"]
    for r in recs:
        assert r.points.shape == (2048, 3) and r.labels.shape == (2048,)
        ref = np.loadtxt(sample / SYN[r.category] / "points" / f"{r.shape_id}.pts").astype(np.float32)
        ref_lab = np.loadtxt(sample / SYN[r.category] / "points_label" / f"{r.shape_id}.seg").astype(int) - 1
        # every kept point is a point of the file, with that point's label
        lut = {tuple(p): l for p, l in zip(ref.tolist(), ref_lab)}
        assert all(lut[tuple(p)] == l for p, l in zip(r.points.tolist(), r.labels.tolist()))
    again = list(read_shapenetpart(sample, split_dir=splits_dir, categories=["chair"], num_points=2048))
    assert np.array_equal(again[0].points, recs[1].points)  # seeded
    other = list(read_shapenetpart(sample, split_dir=splits_dir, categories=["chair"], num_points=2048, seed=1))
    assert not np.array_equal(other[0].points, recs[1].points)


def test_chair_part_order_is_y_up_back_seat_leg(sample):
    (chair,) = read_shapenetpart(sample, categories=["chair"], num_points=None, split_dir=False)
    y = {name: chair.points[chair.labels == k, 1].mean() for k, name in enumerate(chair.part_names)
         if np.any(chair.labels == k)}
    assert set(y) == {"back", "seat", "leg"}
    assert y["back"] > y["seat"] > y["leg"]


def test_official_split_counts(splits_dir):
    s = load_splits(splits_dir)
    assert {k: len(v) for k, v in s.items()} == {"train": 12137, "val": 1870, "test": 2874}
    air = {k: sum(1 for syn, _ in v if syn == "02691156") for k, v in s.items()}
    assert air == {"train": 1958, "val": 391, "test": 341}
    assert (len(s["train"] & s["val"]), len(s["train"] & s["test"]), len(s["val"] & s["test"])) == (9, 23, 3)
    assert {syn for v in s.values() for syn, _ in v} == set(SYN.values())


def test_sample_splits_and_filters(sample, splits_dir):
    recs = list(read_shapenetpart(sample, split_dir=splits_dir, num_points=64))
    split = {r.category: r.split for r in recs}
    # checked with grep on the JSON lists: these three sample ids are in the test list only
    assert {c for c, s in split.items() if s == "test"} == {"earphone", "rocket", "table"}
    assert {c for c, s in split.items() if s == "train"} == set(CATS) - {"earphone", "rocket", "table"}
    test = list(read_shapenetpart(sample, split_dir=splits_dir, splits=["test"], num_points=64))
    assert sorted(r.category for r in test) == ["earphone", "rocket", "table"]
    # the sample's own train_test_split lists all 16 as train; split_dir=False ignores it
    assert {r.split for r in read_shapenetpart(sample, num_points=16)} == {"train"}
    assert {r.split for r in read_shapenetpart(sample, num_points=16, split_dir=False)} == {"none"}
    assert detect_layout(sample) == "v0"


# ---------------------------------------------------------------------------------------------
# Files written in the published layouts
# ---------------------------------------------------------------------------------------------

def _write_splits(d: Path, train=(), val=(), test=()):
    d.mkdir(parents=True, exist_ok=True)
    for name, entries in (("train", train), ("val", val), ("test", test)):
        (d / f"shuffled_{name}_file_list.json").write_text(json.dumps([f"shape_data/{s}/{i}" for s, i in entries]))


def _normal_file(path: Path, pts, nrm, glob_labels):
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [" ".join(f"{v:.6f}" for v in (*p, *n, float(l))) for p, n, l in zip(pts, nrm, glob_labels)]
    path.write_text("\n".join(rows) + "\n")


def test_normal_layout_labels_normals_splits(tmp_path):
    rng = np.random.default_rng(0)
    chair_lab = np.array([12, 13, 14, 15, 12, 13, 14, 15, 12, 12])  # chair pid_start = 12
    air_lab = np.array([0, 1, 2, 3, 3, 2])
    table_lab = np.array([47, 48, 49])
    shapes = {("chair", "c1"): chair_lab, ("airplane", "a1"): air_lab, ("table", "t1"): table_lab}
    ref = {}
    for (cat, sid), lab in shapes.items():
        pts = rng.normal(size=(len(lab), 3))
        nrm = rng.normal(size=(len(lab), 3))
        nrm /= np.linalg.norm(nrm, axis=1, keepdims=True)
        _normal_file(tmp_path / SYN[cat] / f"{sid}.txt", pts, nrm, lab)
        ref[sid] = (pts, nrm, lab - CATS[cat]["pid_start"])
    (tmp_path / "99999999").mkdir()  # unknown synset: skipped
    (tmp_path / "99999999" / "x.txt").write_text("garbage")
    _write_splits(tmp_path / "train_test_split", train=[(SYN["chair"], "c1")],
                  test=[(SYN["chair"], "c1"), (SYN["airplane"], "a1")])
    assert detect_layout(tmp_path) == "normal"
    recs = {r.shape_id: r for r in read_shapenetpart(tmp_path, num_points=None)}
    assert set(recs) == {"c1", "a1", "t1"}
    assert (recs["c1"].split, recs["a1"].split, recs["t1"].split) == ("train", "test", "none")
    assert (recs["c1"].category, recs["a1"].category, recs["t1"].category) == ("chair", "airplane", "table")
    for sid, r in recs.items():
        pts, nrm, lab = ref[sid]
        np.testing.assert_allclose(r.points, pts, atol=1e-5)
        np.testing.assert_allclose(r.normals, nrm, atol=1e-5)
        assert r.labels.dtype == np.int16 and np.array_equal(r.labels, lab)
        assert r.provenance["layout"] == "normal" and r.provenance["synset"] == SYN[r.category]
    assert np.array_equal(recs["c1"].labels, [0, 1, 2, 3, 0, 1, 2, 3, 0, 0])
    # resampling keeps point/label/normal together and gives exactly num_points
    for method in ("fps", "random"):
        (r,) = read_shapenetpart(tmp_path, categories=["chair"], num_points=6, resample=method)
        assert r.points.shape == (6, 3) and r.normals.shape == (6, 3) and r.labels.shape == (6,)
        pts, nrm, lab = ref["c1"]
        for p, n, l in zip(r.points, r.normals, r.labels):
            i = int(np.argmin(np.linalg.norm(pts - p, axis=1)))
            assert np.allclose(pts[i], p, atol=1e-5) and np.allclose(nrm[i], n, atol=1e-5) and lab[i] == l
    (r,) = read_shapenetpart(tmp_path, categories=["table"], num_points=8)  # upsampling by repetition
    assert r.points.shape == (8, 3) and set(r.labels.tolist()) == {0, 1, 2}
    assert [r.shape_id for r in read_shapenetpart(tmp_path, splits={"none"})] == ["t1"]
    other = tmp_path / "my_splits"
    _write_splits(other, val=[(SYN["table"], "t1")])
    assert {r.shape_id: r.split for r in read_shapenetpart(tmp_path, split_dir=other)} == \
        {"c1": "none", "a1": "none", "t1": "val"}


def _write_h5(path: Path, cats, pids, normals=True, ids=None, id_style=""):
    rng = np.random.default_rng(1)
    b, n = pids.shape
    with h5py.File(path, "w") as f:
        f["data"] = rng.normal(size=(b, n, 3)).astype(np.float32)
        f["label"] = np.array(cats, np.uint8).reshape(b, 1)
        f["pid"] = pids.astype(np.uint8)
        if normals:
            f["normal"] = rng.normal(size=(b, n, 3)).astype(np.float32)
    if ids is not None:
        split_k = path.stem[len("ply_data_"):]
        k = split_k.lstrip("abcdefghijklmnopqrstuvwxyz")
        split = split_k[: len(split_k) - len(k)]
        path.with_name(f"ply_data_{split}{id_style}{k}_id2file.json").write_text(json.dumps(ids))
    with h5py.File(path, "r") as f:
        return f["data"][()], (f["normal"][()] if normals else None)


def test_hdf5_layout(tmp_path):
    names = list(CATS)
    assert names[0] == "airplane" and names[4] == "chair" and names[15] == "table"
    n = 16
    pid_train = np.stack([np.arange(n) % 4 + 12, np.arange(n) % 4, np.arange(n) % 3 + 47])
    data_tr, nrm_tr = _write_h5(tmp_path / "ply_data_train0.h5", [4, 0, 15], pid_train,
                                ids=[f"{SYN['chair']}/chairA", f"{SYN['airplane']}/airB", f"{SYN['table']}/tabC"])
    pid_test = np.stack([np.arange(n) % 2 + 36])  # mug: pid_start 36
    data_te, _ = _write_h5(tmp_path / "ply_data_test0.h5", [11], pid_test, normals=False)
    pid_val = np.stack([np.arange(n) % 2 + 28])  # laptop
    _write_h5(tmp_path / "ply_data_val0.h5", [9], pid_val, ids=[f"{SYN['laptop']}/lapD"], id_style="_")
    (tmp_path / "unrelated.h5").write_bytes(b"not hdf5")  # not a ply_data_* file: ignored
    assert detect_layout(tmp_path) == "hdf5"
    recs = list(read_shapenetpart(tmp_path, num_points=n))
    assert [(r.shape_id, r.category, r.split) for r in recs] == [
        ("chairA", "chair", "train"), ("airB", "airplane", "train"), ("tabC", "table", "train"),
        ("lapD", "laptop", "val"), ("ply_data_test0:0", "mug", "test")]
    for r, lab in zip(recs[:3], pid_train):
        start = CATS[r.category]["pid_start"]
        assert np.array_equal(r.labels, lab - start) and r.labels.dtype == np.int16
        assert r.part_names == part_names(r.category)
    np.testing.assert_array_equal(recs[0].points, data_tr[0])
    np.testing.assert_array_equal(recs[2].normals, nrm_tr[2])
    assert np.array_equal(recs[4].labels, np.arange(n) % 2) and recs[4].normals is None
    np.testing.assert_array_equal(recs[4].points, data_te[0])
    assert recs[0].provenance == {"dataset": "shapenetpart", "layout": "hdf5",
                                  "file": f"{tmp_path / 'ply_data_train0.h5'}:0", "synset": SYN["chair"]}
    only = list(read_shapenetpart(tmp_path, categories=["table", "mug"], splits=["test", "train"], num_points=8))
    assert [(r.category, r.points.shape) for r in only] == [("table", (8, 3)), ("mug", (8, 3))]


def test_deterministic_errors(tmp_path):
    d = tmp_path / "v0" / SYN["chair"]
    (d / "points").mkdir(parents=True)
    (d / "points_label").mkdir()
    (d / "points" / "s.pts").write_text("0 0 0\n1 1 1\n2 2 2\n")
    (d / "points_label" / "s.seg").write_text("1\n2\n")
    with pytest.raises(DataFormatError, match=r"3 points in .*s\.pts but 2 labels in .*s\.seg"):
        list(read_shapenetpart(tmp_path / "v0"))
    (d / "points_label" / "s.seg").write_text("1\n2\n5\n")  # chair has 4 parts
    with pytest.raises(DataFormatError, match=r"s\.seg: labels: .*5") as exc:
        list(read_shapenetpart(tmp_path / "v0"))
    assert exc.value.field == "labels"
    (d / "points_label" / "s.seg").unlink()
    with pytest.raises(DataFormatError, match="missing label file"):
        list(read_shapenetpart(tmp_path / "v0"))
    (d / "points_label" / "s.seg").write_text("1\n2\n3\n")
    (d / "points" / "s.pts").write_text("0 0 0\n1 1\n2 2 2\n")
    with pytest.raises(DataFormatError, match="line 2") as exc:
        list(read_shapenetpart(tmp_path / "v0"))
    assert exc.value.path.endswith("s.pts")
    (d / "points" / "s.pts").write_text("0 0 0\n1 nan 1\n2 2 2\n")
    with pytest.raises(DataFormatError, match="non-finite"):
        list(read_shapenetpart(tmp_path / "v0"))
    # normal layout: a global label of another category
    _normal_file(tmp_path / "n" / SYN["airplane"] / "a.txt", np.zeros((2, 3)), np.ones((2, 3)), [0, 12])
    with pytest.raises(DataFormatError, match=r"label \(column 7\).*12"):
        list(read_shapenetpart(tmp_path / "n"))
    with pytest.raises(FileNotFoundError):
        read_shapenetpart(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        load_splits(tmp_path / "missing")
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "shuffled_train_file_list.json").write_text('["shape_data/0269/x", 3]')
    with pytest.raises(DataFormatError, match="entry 1"):
        load_splits(tmp_path / "sp")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="layout"):
        read_shapenetpart(tmp_path / "empty")
    with pytest.raises(KeyError):
        read_shapenetpart(tmp_path / "n", categories=["sofa"])
    with pytest.raises(ValueError):
        read_shapenetpart(tmp_path / "n", splits=["training"])


# ---------------------------------------------------------------------------------------------
# Hypothesis: malformed files give DataFormatError and nothing else
# ---------------------------------------------------------------------------------------------

BAD_TOKENS = ["nan", "NaN", "inf", "-inf", "1e999", "abc", "0x10", "--", "1,2", "\x00", "\x0c", "+", "\u00e9"]
TEXT_OPS = ["none", "none", "crlf", "blank", "truncate", "garbage", "empty", "drop_col", "add_col",
            "bad_token", "bad_label", "drop_row", "nonascii"]


def _valid_rows(rng, n, ncols, label_col=None, lo=0, hi=1):
    rows = [[f"{v:.4f}" for v in rng.normal(size=ncols)] for _ in range(n)]
    if label_col is not None:
        for r in rows:
            r[label_col] = str(int(rng.integers(lo, hi)))
    return rows


def _corrupt(draw, rows, label_col=None, bad_labels=("-1",), op=None):
    """Rows of tokens -> file bytes, after one corruption (``op``, drawn if None; may be none)."""
    op = op or draw(st.sampled_from(TEXT_OPS))
    rows = [list(r) for r in rows]
    i = draw(st.integers(0, len(rows) - 1))
    if op == "drop_col":
        rows[i].pop(draw(st.integers(0, len(rows[i]) - 1)))
    elif op == "add_col":
        rows[i].append(draw(st.sampled_from(["0", "1.5", "abc"])))
    elif op == "bad_token" or (op == "bad_label" and label_col is None):
        rows[i][draw(st.integers(0, len(rows[i]) - 1))] = draw(st.sampled_from(BAD_TOKENS))
    elif op == "bad_label":
        rows[i][label_col] = draw(st.sampled_from(bad_labels))
    elif op == "drop_row":
        rows.pop(i)
    sep = "\r\n" if op == "crlf" else ("\n\n  \n" if op == "blank" else "\n")
    data = (sep.join(" ".join(r) for r in rows) + "\n").encode("utf-8")
    if op == "truncate":
        data = data[: draw(st.integers(0, len(data)))]
    elif op == "garbage":
        data = draw(st.binary(max_size=120))
    elif op == "empty":
        data = draw(st.sampled_from([b"", b"\n", b"   \n\n"]))
    elif op == "nonascii":
        data = data + b"\xff\xfe\n"
    return data


def _check_records(recs, n):
    for r in recs:
        assert r.points.shape == (n, 3) and r.points.dtype == np.float32 and np.all(np.isfinite(r.points))
        assert r.labels.dtype == np.int16 and r.labels.shape == (n,)
        assert 0 <= r.labels.min() and r.labels.max() < len(r.part_names)


@st.composite
def v0_cases(draw):
    """(pts bytes, seg bytes or None) of a chair (4 parts, 1-based labels), one file corrupted."""
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    n = draw(st.integers(1, 12))
    pts = _valid_rows(rng, n, 3)
    seg = _valid_rows(rng, n, 1, 0, 1, 5)
    which = draw(st.sampled_from(["pts", "seg", "seg", "missing"]))
    if which == "missing":
        return _corrupt(draw, pts, op="none"), None
    if which == "pts":
        return _corrupt(draw, pts), _corrupt(draw, seg, op="none")
    return _corrupt(draw, pts, op="none"), _corrupt(draw, seg, 0, ["0", "5", "-1", "99", "2.5", "1e9"])


@HSET
@given(case=v0_cases())
def test_v0_malformed_only_dataformaterror(case):
    pts, seg = case
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / SYN["chair"]
        (d / "points").mkdir(parents=True)
        (d / "points_label").mkdir()
        (d / "points" / "x.pts").write_bytes(pts)
        if seg is not None:
            (d / "points_label" / "x.seg").write_bytes(seg)
        try:
            recs = list(read_shapenetpart(tmp, layout="v0", num_points=8))
        except DataFormatError:
            return
        _check_records(recs, 8)
        assert len(recs) == 1


@st.composite
def normal_cases(draw):
    """(category, txt bytes): 7 columns, GLOBAL label in the category's range, one corruption."""
    cat = draw(st.sampled_from(["airplane", "chair", "table"]))
    start, k = CATS[cat]["pid_start"], len(CATS[cat]["parts"])
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    rows = _valid_rows(rng, draw(st.integers(1, 12)), 7, 6, start, start + k)
    bad = [str(start - 1), str(start + k), "50", "-1", f"{start}.5"]
    return cat, _corrupt(draw, rows, 6, bad)


@HSET
@given(case=normal_cases())
def test_normal_malformed_only_dataformaterror(case):
    cat, txt = case
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp) / SYN[cat]
        d.mkdir()
        (d / "x.txt").write_bytes(txt)
        try:
            recs = list(read_shapenetpart(tmp, layout="normal", num_points=8))
        except DataFormatError:
            return
        _check_records(recs, 8)
        assert len(recs) == 1 and recs[0].category == cat and recs[0].normals.shape == (8, 3)


JSONISH = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
                       lambda ch: st.lists(ch, max_size=4) | st.dictionaries(st.text(max_size=5), ch, max_size=3),
                       max_leaves=8)
ENTRY = st.one_of(st.sampled_from(["shape_data/02691156/abc", "03001627/def", "shape_data//x", "a/b/c/d", "x", ""]),
                  st.text(max_size=20))


@HSET
@given(content=st.one_of(JSONISH.map(lambda v: json.dumps(v).encode()),
                         st.lists(ENTRY, max_size=5).map(lambda v: json.dumps(v).encode()),
                         st.binary(max_size=80),
                         st.lists(ENTRY, min_size=1, max_size=5).map(lambda v: json.dumps(v).encode()[:-1])))
def test_split_lists_malformed_only_dataformaterror(content):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "shuffled_val_file_list.json").write_bytes(content)
        try:
            s = load_splits(tmp)
        except DataFormatError:
            return
        assert set(s) == {"train", "val", "test"} and not s["train"] and not s["test"]
        assert all(isinstance(a, str) and isinstance(b, str) for a, b in s["val"])


H5_OPS = ["garbage", "truncate", "empty", "data_shape2", "data_2d", "data_rows", "data_missing", "data_group",
          "data_str", "data_nan", "data_inf", "label_shape", "label_range", "label_missing", "label_str",
          "label_frac", "pid_shape", "pid_high", "pid_neg", "pid_frac", "pid_missing", "normal_shape",
          "normal_nan", "ids_short", "ids_notjson", "ids_dict", "ids_badsyn", "ids_ints", "b0", "n0"]


@st.composite
def h5_cases(draw):
    """A valid ``ply_data_train0.h5`` description plus 0-2 corruptions."""
    ops = set(draw(st.lists(st.sampled_from(H5_OPS), max_size=2, unique=True)))
    if not draw(st.integers(0, 3)):
        ops = set()
    cat = draw(st.sampled_from([0, 4, 15]))
    return {"ops": ops, "cat": cat, "b": 0 if "b0" in ops else draw(st.integers(1, 3)),
            "n": 0 if "n0" in ops else draw(st.integers(1, 6)), "normal": draw(st.booleans()),
            "ids": draw(st.booleans()), "seed": draw(st.integers(0, 2**16)), "frac": draw(st.floats(0, 0.99))}


def _write_h5_case(path: Path, c):
    rng = np.random.default_rng(c["seed"])
    ops, b, n, name = c["ops"], c["b"], c["n"], list(CATS)[c["cat"]]
    start, k = CATS[name]["pid_start"], len(CATS[name]["parts"])
    data = rng.normal(size=(b, n, 3)).astype(np.float32)
    label = np.full((b, 1), c["cat"], np.int64)
    pid = (start + rng.integers(0, k, size=(b, n))).astype(np.float64)
    normal = rng.normal(size=(b, n, 3)).astype(np.float32) if c["normal"] else None
    if data.size:
        data.flat[0] = math.nan if "data_nan" in ops else (math.inf if "data_inf" in ops else data.flat[0])
    if "data_shape2" in ops:
        data = data[..., :2]
    if "data_2d" in ops:
        data = data[..., 0]
    if "data_rows" in ops:
        data = np.concatenate([data, data[:1] if b else np.zeros((1, n, 3), np.float32)])
    if "label_shape" in ops:
        label = np.zeros((b, 2), np.int64)
    if "label_range" in ops:
        label[:] = 16
    if "label_frac" in ops:
        label = label + 0.5
    if pid.size:
        pid.flat[0] = {"pid_high": 60, "pid_neg": -3, "pid_frac": start + 0.5}.get(
            next((o for o in ops if o in ("pid_high", "pid_neg", "pid_frac")), ""), pid.flat[0])
    if "pid_shape" in ops:
        pid = pid[:, :-1] if n else np.zeros((b, 2))
    if normal is not None and "normal_shape" in ops:
        normal = np.zeros((b, n, 4), np.float32)
    if normal is not None and "normal_nan" in ops and normal.size:
        normal.flat[-1] = math.nan
    with h5py.File(path, "w") as f:
        for key, arr in (("data", data), ("label", label), ("pid", pid), ("normal", normal)):
            if arr is None or f"{key}_missing" in ops:
                continue
            if f"{key}_group" in ops:
                f.create_group(key)
            elif f"{key}_str" in ops:
                f[key] = np.array([b"abc", b"de"])
            else:
                f[key] = arr
    if c["ids"] or any(o.startswith("ids_") for o in ops):
        syn = SYN[name]
        ids = [f"{syn}/m{i}" for i in range(b)]
        text = json.dumps(ids)
        if "ids_short" in ops:
            text = json.dumps(ids[:-1] if b else ["x"])
        elif "ids_notjson" in ops:
            text = text[:-1] or "["
        elif "ids_dict" in ops:
            text = json.dumps({"a": ids})
        elif "ids_badsyn" in ops:
            text = json.dumps(["11111111/q"] * b)
        elif "ids_ints" in ops:
            text = json.dumps(list(range(b)))
        path.with_name("ply_data_train0_id2file.json").write_text(text)
    raw = path.read_bytes()
    if "garbage" in ops:
        path.write_bytes(bytes(rng.integers(0, 256, size=int(rng.integers(0, 300)), dtype=np.uint8)))
    elif "truncate" in ops:
        path.write_bytes(raw[: int(len(raw) * c["frac"])])
    elif "empty" in ops:
        path.write_bytes(b"")


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=h5_cases())
def test_hdf5_malformed_only_dataformaterror(case):
    with tempfile.TemporaryDirectory() as tmp:
        _write_h5_case(Path(tmp) / "ply_data_train0.h5", case)
        try:
            recs = list(read_shapenetpart(tmp, layout="auto", num_points=8))
        except DataFormatError:
            return
        _check_records(recs, 8)
        assert len(recs) == case["b"] and all(r.split == "train" for r in recs)
        assert all(r.category == list(CATS)[case["cat"]] for r in recs)
