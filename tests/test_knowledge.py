"""Knowledge units: extraction from boxes / pixel maps (Eqs. 1-2), merging, knowledge files, caches."""
from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import pytest
from scipy import ndimage

from distill.knowledge import (
    KnowledgeFile,
    KnowledgeUnits,
    load_shape_cache,
    merge_units,
    save_shape_cache,
    units_from_boxes,
    units_from_pixels,
    write_knowledge,
)
from gen3d.errors import DataFormatError

# -- a 1-view 4x4 render: point 5 is drawn but not visible, point 13 is occluded (not drawn) -----
INDEX_4X4 = np.array([[[0, 1, 2, 3],
                       [4, 5, 6, 7],
                       [8, 9, -1, -1],
                       [10, 11, -1, 12]]], np.int64)
VISIBLE_4X4 = np.ones((1, 14), bool)
VISIBLE_4X4[0, [5, 13]] = False


def masks(units: KnowledgeUnits) -> list[list[int]]:
    return [units.mask(n).tolist() for n in range(units.num_units)]


def assert_units_equal(a: KnowledgeUnits, b: KnowledgeUnits) -> None:
    for name in ("offsets", "point_index", "point_probs", "unit_probs", "confidence", "view", "teacher", "corrupted"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype, name
        np.testing.assert_array_equal(x, y, err_msg=name)


# ------------------------------------------------------------------------------------------------
# Boxes (Eq. 1)
# ------------------------------------------------------------------------------------------------
def test_boxes_exact_masks_probs_confidence():
    boxes = [np.array([[0, 0, 2, 2],            # pixel centres 0.5, 1.5 in x and y -> points 0 1 4 (5 hidden)
                       [1.6, 1.6, 4, 4],        # columns/rows 2..3 (1.5 < 1.6) -> only point 12
                       [2, 2, 3, 3],            # the background pixel (2, 2) -> empty, dropped
                       [-5, -5, 0.4, 0.4]],     # outside every pixel centre -> dropped
                      np.float32)]
    probs = [np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.5, 0.0], [1, 0, 0]], np.float32)]
    u = units_from_boxes(INDEX_4X4, VISIBLE_4X4, boxes, probs, teacher_id=3,
                         corrupted=[np.array([True, False, True, True])])
    u.validate(num_points=14)
    assert masks(u) == [[0, 1, 4], [12]]
    np.testing.assert_allclose(u.unit_probs, [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    np.testing.assert_allclose(u.confidence, [0.7, 0.6])
    np.testing.assert_allclose(u.point_probs, [[0.7, 0.2, 0.1]] * 3 + [[0.1, 0.3, 0.6]])
    assert u.view.tolist() == [0, 0] and u.teacher.tolist() == [3, 3] and u.corrupted.tolist() == [1, 0]
    assert u.offsets.dtype == np.int64 and u.view.dtype == np.int16 and u.corrupted.dtype == np.int8


def test_boxes_accept_tensors_and_multiple_views():
    torch = pytest.importorskip("torch")
    index = np.concatenate([INDEX_4X4, INDEX_4X4[:, ::-1]])        # view 1 mirrored top/bottom
    visible = np.concatenate([VISIBLE_4X4, VISIBLE_4X4])
    boxes = [torch.tensor([[0.0, 0.0, 4.0, 1.0]]), torch.tensor([[0.0, 0.0, 4.0, 1.0]])]
    probs = [torch.tensor([[0.2, 0.8]]), torch.tensor([[0.9, 0.1]])]
    u = units_from_boxes(index, visible, boxes, probs)
    assert masks(u) == [[0, 1, 2, 3], [10, 11, 12]]                 # top row of each view
    assert u.view.tolist() == [0, 1] and u.corrupted.tolist() == [-1, -1]
    np.testing.assert_allclose(u.confidence, [0.8, 0.9])


def test_boxes_refinement_completes_mostly_covered_sets():
    # Sets: {0,1,2,3,4} (box A holds 0 1 4 = 3 of 5 visible -> kept whole), {5..9} (5 hidden; box A
    # holds none of the visible 6 7 8 9), {10, 11, 12} (box B holds 12 = 1 of 3 -> removed).
    sets = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 3])
    boxes = [np.array([[0, 0, 2, 2], [1.6, 1.6, 4, 4]], np.float32)]
    probs = [np.array([[0.7, 0.3], [0.4, 0.6]], np.float32)]
    u = units_from_boxes(INDEX_4X4, VISIBLE_4X4, boxes, probs, refine_sets=sets)
    assert masks(u) == [[0, 1, 2, 3, 4]]
    np.testing.assert_allclose(u.point_probs, [[0.7, 0.3]] * 5)


def test_boxes_reject_inconsistent_inputs():
    with pytest.raises(ValueError, match="V=1"):
        units_from_boxes(INDEX_4X4, VISIBLE_4X4, [], [])
    with pytest.raises(ValueError, match="box_probs"):
        units_from_boxes(INDEX_4X4, VISIBLE_4X4, [np.zeros((2, 4))], [np.zeros((3, 2))])
    with pytest.raises(ValueError, match=r"\[-1, N=5\)"):
        units_from_boxes(INDEX_4X4, np.ones((1, 5), bool), [np.zeros((0, 4))], [np.zeros((0, 2))])


# ------------------------------------------------------------------------------------------------
# Pixel maps (Eq. 2)
# ------------------------------------------------------------------------------------------------
# Column 2 (point 9) is part 1 and separates two regions of part 0; point 10 is drawn at (2, 4) but
# not visible; points 0, 7, 8 and 9 cover several pixels.
INDEX_3X5 = np.array([[[0, 1, 9, 2, 3],
                       [0, 4, 9, 5, 6],
                       [7, 7, 9, 8, 10]]], np.int64)
VISIBLE_3X5 = np.ones((1, 11), bool)
VISIBLE_3X5[0, 10] = False
P0_3X5 = np.array([[0.9, 0.8, 0.3, 0.6, 0.7],
                   [0.7, 0.6, 0.1, 0.9, 0.8],
                   [0.8, 1.0, 0.2, 0.6, 0.8]], np.float32)
PROBS_3X5 = np.stack([P0_3X5, 1 - P0_3X5])[None]                   # [1, 2, 3, 5]


def test_pixels_two_regions_of_one_part_give_two_units():
    corrupted = np.zeros((1, 3, 5), bool)
    corrupted[0, :2, :2] = True                                     # 4 of the left region's 6 pixels
    corrupted[0, 0, 3:] = True                                      # 2 of the right region's 5 pixels
    u = units_from_pixels(INDEX_3X5, VISIBLE_3X5, PROBS_3X5, teacher_id=1, corrupted=corrupted)
    u.validate(num_points=11)
    assert masks(u) == [[0, 1, 4, 7], [2, 3, 5, 6, 8], [9]]
    # point Y = mean over its pixels: left 0: (.9+.7)/2, 1: .8, 4: .6, 7: (.8+1)/2
    np.testing.assert_allclose(u.point_probs[:4, 0], [0.8, 0.8, 0.6, 0.9], atol=1e-6)
    # right: 2: .6, 3: .7, 5: .9, 6: .8, 8: .6 (its other pixel shows the hidden point 10)
    np.testing.assert_allclose(u.point_probs[4:9, 0], [0.6, 0.7, 0.9, 0.8, 0.6], atol=1e-6)
    np.testing.assert_allclose(u.point_probs[9], [0.2, 0.8], atol=1e-6)
    # Y_n = mean of the points' Y (each point once): 3.1 / 4 and 3.6 / 5
    np.testing.assert_allclose(u.unit_probs, [[0.775, 0.225], [0.72, 0.28], [0.2, 0.8]], atol=1e-6)
    np.testing.assert_allclose(u.confidence, [0.775, 0.72, 0.8], atol=1e-6)
    np.testing.assert_allclose(u.point_probs.sum(1), 1, atol=1e-6)
    assert u.corrupted.tolist() == [1, 0, 0] and u.teacher.tolist() == [1, 1, 1] and u.view.tolist() == [0, 0, 0]
    assert 10 not in u.point_index
    # min_points drops the one-point unit
    assert masks(units_from_pixels(INDEX_3X5, VISIBLE_3X5, PROBS_3X5, min_points=2)) == masks(u)[:2]
    assert units_from_pixels(INDEX_3X5, VISIBLE_3X5, PROBS_3X5).corrupted.tolist() == [-1, -1, -1]


def test_pixels_8_connectivity_views_background_and_unseen_pixels():
    # view 0: two part-0 pixels touching only diagonally -> one unit; view 1: same points, separate units
    # per view; a pixel with all-zero probabilities (teacher does not see it) takes no part.
    index = np.array([[[0, -1, -1, 3], [-1, 1, -1, -1], [-1, -1, 2, -1]]] * 2, np.int64)
    probs = np.zeros((2, 2, 3, 4), np.float32)
    probs[:, 0] = 1.0
    probs[1, :, 0, 3] = 0.0                                         # view 1 does not see point 3
    u = units_from_pixels(index, np.ones((2, 4), bool), probs)
    assert masks(u) == [[0, 1, 2], [3], [0, 1, 2]]
    assert u.view.tolist() == [0, 0, 1]


def test_nothing_drawn_gives_no_units():
    index, visible = np.full((2, 4, 4), -1), np.zeros((2, 5), bool)
    u = units_from_pixels(index, visible, np.ones((2, 3, 4, 4)), corrupted=np.zeros((2, 4, 4), bool),
                          refine_sets=np.zeros(5, int))
    b = units_from_boxes(index, visible, [np.array([[0, 0, 4, 4]]), np.zeros((0, 4))],
                         [np.array([[0.2, 0.3, 0.5]]), np.zeros((0, 3))])
    for units in (u, b):
        units.validate(num_points=5)
        assert units.num_units == 0 and units.num_parts == 3


def test_pixels_occluded_points_never_in_a_mask():
    rng = np.random.default_rng(0)
    index = rng.integers(-1, 50, size=(4, 16, 16))
    visible = rng.random((4, 50)) < 0.6
    probs = rng.random((4, 3, 16, 16)).astype(np.float32)
    u = units_from_pixels(index, visible, probs)
    units_b = units_from_boxes(index, visible, [np.array([[0, 0, 16, 16], [3, 3, 9, 12]])] * 4,
                               [np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])] * 4)
    for units in (u, units_b):
        assert np.all(visible[units.view[units.unit_of_entry], units.point_index])
    # and every shown, visible point of a view is in a unit of that view
    for v in range(4):
        shown = np.unique(index[v][index[v] >= 0])
        shown = set(shown[visible[v, shown]].tolist())
        in_view = set(u.point_index[u.view[u.unit_of_entry] == v].tolist())
        assert in_view == shown


def _reference_pixel_units(index, visible, probs):
    """Slow, obviously-correct Eq. 2: loops over views, parts, components and pixels."""
    units = []
    for v in range(index.shape[0]):
        shown = np.maximum(index[v], 0)
        valid = (index[v] >= 0) & visible[v][shown] & (probs[v].sum(0) > 0)
        argmax = probs[v].argmax(0)
        for r in range(probs.shape[1]):
            comps, count = ndimage.label(valid & (argmax == r), structure=np.ones((3, 3)))
            for c in range(1, count + 1):
                per_point = {}
                for y, x in zip(*np.nonzero(comps == c)):
                    per_point.setdefault(int(index[v, y, x]), []).append(probs[v, :, y, x])
                pts = sorted(per_point)
                y_pts = np.array([np.mean(per_point[p], 0) for p in pts])
                units.append((v, pts, y_pts, y_pts.mean(0)))
    return units


def test_pixels_match_reference_on_random_maps():
    rng = np.random.default_rng(7)
    v, r, h, w, n = 3, 3, 30, 40, 120
    index = np.full((v, h, w), -1, np.int64)
    index[:, 5:27, 8:33] = rng.integers(-1, n, size=(v, 22, 25))   # background margin (cropped away)
    visible = rng.random((v, n)) < 0.8
    probs = np.exp(ndimage.gaussian_filter(rng.normal(size=(v, r, h, w)), (0, 0, 2, 2)) * 20)
    probs = (probs / probs.sum(1, keepdims=True)).astype(np.float32)
    probs[0, :, 10:14, 10:20] = 0                                   # the teacher does not see these
    u = units_from_pixels(index, visible, probs)
    ref = _reference_pixel_units(index, visible, probs)
    assert u.num_units == len(ref) > 10
    for k, (view, pts, y_pts, y_unit) in enumerate(ref):
        assert u.view[k] == view and u.mask(k).tolist() == pts
        np.testing.assert_allclose(u.point_probs[u.offsets[k]:u.offsets[k + 1]], y_pts, atol=1e-6)
        np.testing.assert_allclose(u.unit_probs[k], y_unit, atol=1e-6)
        assert u.confidence[k] == pytest.approx(y_unit.max(), abs=1e-6)


def test_pixels_point_labels_and_intra_set_refinement():
    # A 1x6 strip, one point per pixel. Points 0-4 form one consistency set, point 5 another.
    # The teacher flips point 2 to part 1; refinement puts it back (majority of its set is part 0).
    index = np.arange(6)[None, None]
    p0 = np.array([0.9, 0.8, 0.4, 0.7, 0.6, 0.2], np.float32)
    probs = np.stack([p0, 1 - p0])[None, :, None, :]                # [1, 2, 1, 6]
    visible = np.ones((1, 6), bool)
    plain = units_from_pixels(index, visible, probs)
    assert masks(plain) == [[0, 1], [3, 4], [2], [5]]
    sets = np.array([0, 0, 0, 0, 0, 1])
    refined = units_from_pixels(index, visible, probs, refine_sets=sets)
    assert masks(refined) == [[0, 1, 2, 3, 4], [5]]
    # the relabelled point 2 takes the mean Y of the agreeing points of its set: (.9+.8+.7+.6)/4 = .75
    np.testing.assert_allclose(refined.point_probs[:5, 0], [0.9, 0.8, 0.75, 0.7, 0.6], atol=1e-6)
    np.testing.assert_allclose(refined.unit_probs[0, 0], (0.9 + 0.8 + 0.75 + 0.7 + 0.6) / 5, atol=1e-6)
    assert np.all(refined.point_probs[refined.unit_of_entry == 0].argmax(1) == 0)
    # explicit point labels: point 5 -> part 0 (its Y: mean of the agreeing part-0 points 0 1 3),
    # point 4 -> -1 (in no unit, and it splits the part-0 pixels into three components)
    labels = np.array([[0, 0, 1, 0, -1, 0]])
    u = units_from_pixels(index, visible, probs, point_labels=labels)
    assert masks(u) == [[0, 1], [3], [5], [2]]
    np.testing.assert_allclose(u.point_probs[3], [0.8, 0.2], atol=1e-6)       # point 5 -> donors 0 1 3
    np.testing.assert_allclose(u.point_probs[4], [0.4, 0.6], atol=1e-6)       # point 2 agrees with part 1
    with pytest.raises(ValueError, match="point_labels"):
        units_from_pixels(index, visible, probs, point_labels=np.full((1, 6), 2))


def test_merge_and_select():
    a = units_from_pixels(INDEX_3X5, VISIBLE_3X5, PROBS_3X5, teacher_id=0)
    b = units_from_boxes(INDEX_3X5, VISIBLE_3X5, [np.array([[0, 0, 2, 1]])], [np.array([[0.3, 0.7]])], teacher_id=1)
    m = merge_units([a, b])
    m.validate(num_points=11)
    assert masks(m) == masks(a) + masks(b) == masks(a) + [[0, 1]]
    assert m.teacher.tolist() == [0, 0, 0, 1]
    np.testing.assert_array_equal(m.point_probs, np.concatenate([a.point_probs, b.point_probs]))
    s = m.select(np.array([False, True, False, True]))
    assert masks(s) == [masks(a)[1], [0, 1]] and s.teacher.tolist() == [0, 1]
    assert_units_equal(merge_units([KnowledgeUnits.empty(2), a]), a)
    with pytest.raises(ValueError, match="numbers of parts"):
        merge_units([a, KnowledgeUnits.empty(3)])
    with pytest.raises(ValueError):
        merge_units([])


# ------------------------------------------------------------------------------------------------
# Knowledge files
# ------------------------------------------------------------------------------------------------
def _shapes():
    a = units_from_pixels(INDEX_3X5, VISIBLE_3X5, PROBS_3X5, teacher_id=0,
                          corrupted=np.ones((1, 3, 5), bool))
    b = units_from_boxes(INDEX_3X5, VISIBLE_3X5, [np.array([[0, 0, 2, 1]])], [np.array([[0.3, 0.7]])], teacher_id=1)
    gt = np.array([[[0, 0, 1, 0, 0], [0, 0, 1, 0, -1], [0, 0, 1, 0, 0]]], np.int8)
    return [(("procedural", "test", "chair-0"), merge_units([a, b]),
             {"gt_label_maps": gt, "pixel_index": INDEX_3X5.astype(np.int32)}),
            (("real", "shapenetpart", "abc"), b, None),
            (("real", "shapenetpart", "empty"), KnowledgeUnits.empty(2), {"gt_label_maps": gt + 1})]


def _write(path, **kw):
    args = {"category": "chair", "part_names": ["seat", "back"], "teachers": ["clip", "detector"],
            "settings": {"views": 10, "image_size": [3, 5], "refine": None}, "simulated": True, "num_points": 11}
    args.update(kw)
    return write_knowledge(path, _shapes(), **args)


def test_knowledge_file_round_trip(tmp_path):
    path = tmp_path / "k.h5"
    assert _write(path) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["k.h5"]          # no temporary file left
    shapes = _shapes()
    with KnowledgeFile(path) as kf:
        assert len(kf) == 3 and kf.keys() == [k for k, _, _ in shapes]
        assert (kf.category, kf.part_names, kf.teachers, kf.simulated, kf.num_points) == \
            ("chair", ("seat", "back"), ("clip", "detector"), True, 11)
        assert kf.settings == {"views": 10, "image_size": [3, 5], "refine": None}
        for i, (key, units, extras) in enumerate(shapes):
            assert kf.index_of(key) == i
            assert_units_equal(kf.units(i), units)
            got = kf.extras(i)
            assert sorted(got) == sorted(extras or {})
            for name, arr in (extras or {}).items():
                assert got[name].dtype == arr.dtype
                np.testing.assert_array_equal(got[name], arr)
        with pytest.raises(KeyError, match="missing"):
            kf.index_of(("real", "shapenetpart", "missing"))
        with pytest.raises(IndexError):
            kf.units(3)
    with h5py.File(path) as h5:
        assert h5["extras/gt_label_maps"].compression == "gzip"
    with pytest.raises(FileExistsError):
        _write(path, overwrite=False)
    _write(path, simulated=False)                                   # default: atomic replacement
    with KnowledgeFile(path) as kf:
        assert kf.simulated is False


def test_write_knowledge_validates_before_writing(tmp_path):
    path = tmp_path / "k.h5"
    with pytest.raises(ValueError, match="R=2 parts"):
        _write(path, part_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="teacher ids"):
        _write(path, teachers=["clip"])
    with pytest.raises(ValueError, match=r"point_index.*\[0, 5\)"):
        _write(path, num_points=5)
    bad = _shapes()[:1] * 2
    with pytest.raises(ValueError, match="duplicate"):
        write_knowledge(path, bad, category="c", part_names=["a", "b"], teachers=["x", "y"], settings={},
                        simulated=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage, field", [
    (lambda h5: h5.attrs.__setitem__("schema", "partdistill.collection"), "schema"),
    (lambda h5: h5.attrs.__setitem__("schema_version", 7), "schema_version"),
    (lambda h5: h5.attrs.__delitem__("category"), "category"),
    (lambda h5: h5.attrs.__setitem__("part_names", "{not json"), "part_names"),
    (lambda h5: h5.attrs.__setitem__("teachers", json.dumps({"a": 1})), "teachers"),
    (lambda h5: h5.__delitem__("units/confidence"), "units/confidence"),
    (lambda h5: h5.__delitem__("shape_id"), "shape_id"),
    (lambda h5: (h5.__delitem__("units/view"), h5["units"].create_dataset("view", data=np.zeros(2, np.int16))),
     "units/view"),
    (lambda h5: (h5.__delitem__("shape_units"), h5.create_dataset("shape_units", data=[0, 5, 3, 9])),
     "shape_units"),
])
def test_damaged_knowledge_file_names_the_field(tmp_path, damage, field):
    path = tmp_path / "k.h5"
    _write(path)
    with h5py.File(path, "r+") as h5:
        damage(h5)
    with pytest.raises(DataFormatError) as info:
        KnowledgeFile(path)
    assert info.value.field == field and info.value.path == str(path)
    assert str(path) in str(info.value)


def test_foreign_and_corrupt_files(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as h5:
        h5.create_dataset("points", data=np.zeros((2, 3)))
    with pytest.raises(DataFormatError, match="schema") as info:
        KnowledgeFile(foreign)
    assert info.value.field == "schema"
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(DataFormatError) as info:
        KnowledgeFile(garbage)
    assert info.value.field == "file"
    good = tmp_path / "good.h5"
    _write(good)
    truncated = tmp_path / "truncated.h5"
    truncated.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(DataFormatError):
        KnowledgeFile(truncated)
    with pytest.raises(FileNotFoundError):
        KnowledgeFile(tmp_path / "nope.h5")
    # inconsistent offsets of one shape are reported when its units are read
    shutil.copyfile(good, tmp_path / "bad_offsets.h5")
    with h5py.File(tmp_path / "bad_offsets.h5", "r+") as h5:
        h5["units/entry_offsets"][1] = 100
    with KnowledgeFile(tmp_path / "bad_offsets.h5") as kf, pytest.raises(DataFormatError) as info:
        kf.units(0)
    assert info.value.field == "units"


def test_shape_cache_round_trip_and_errors(tmp_path):
    key, units, extras = _shapes()[0]
    path = tmp_path / "cache" / "chair-0.npz"
    save_shape_cache(path, key, units, extras)
    assert [p.name for p in path.parent.iterdir()] == ["chair-0.npz"]
    got_key, got_units, got_extras = load_shape_cache(path)
    assert got_key == key
    assert_units_equal(got_units, units)
    assert sorted(got_extras) == sorted(extras)
    for name in extras:
        np.testing.assert_array_equal(got_extras[name], extras[name])
        assert got_extras[name].dtype == extras[name].dtype
    save_shape_cache(tmp_path / "e.npz", ("a", "b", "c"), KnowledgeUnits.empty(4))
    k, u, x = load_shape_cache(tmp_path / "e.npz")
    assert k == ("a", "b", "c") and u.num_units == 0 and u.num_parts == 4 and x == {}

    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(DataFormatError) as info:
        load_shape_cache(tmp_path / "junk.npz")
    assert info.value.field == "file"
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(DataFormatError) as info:
        load_shape_cache(tmp_path / "other.npz")
    assert info.value.field == "schema"
    truncated = tmp_path / "t.npz"
    truncated.write_bytes(path.read_bytes()[:300])
    with pytest.raises(DataFormatError):
        load_shape_cache(truncated)
    with pytest.raises(FileNotFoundError):
        load_shape_cache(tmp_path / "none.npz")
