"""eval.metrics: part IoU conventions, instance / category mIoU, and the confidence-weighted 2D mIoU.

Every value is a hand-computed known answer (worked out in the comments), plus one comparison with a
slow, loop-and-set reference on random labels.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from distill.knowledge import KnowledgeUnits
from eval.metrics import both_conventions, miou_2d, miou_summary, part_iou, shape_miou


# ----------------------------------------------------------------------------------------------
# part_iou / shape_miou
# ----------------------------------------------------------------------------------------------
def test_part_iou_hand_case():
    gt = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 2, 0])
    # part 0: P={0,5}, G={0,1}: 1/3; part 1: P={1,2,3}, G={2,3}: 2/3; part 2: P={4}, G={4,5}: 1/2
    iou = part_iou(pred, gt, 3)
    assert iou.dtype == np.float32 and iou.shape == (3,)
    np.testing.assert_allclose(iou, [1 / 3, 2 / 3, 1 / 2], rtol=1e-6)
    assert shape_miou(pred, gt, 3) == pytest.approx(0.5)


def test_absent_conventions_differ():
    gt = np.array([0, 0, 1, 1])
    pred = np.array([0, 0, 1, 0])
    # part 0: P={0,1,3}, G={0,1}: 2/3; part 1: P={2}, G={2,3}: 1/2; part 2 in neither
    one = part_iou(pred, gt, 3, absent="one")
    skip = part_iou(pred, gt, 3, absent="skip")
    np.testing.assert_allclose(one, [2 / 3, 1 / 2, 1.0], rtol=1e-6)
    np.testing.assert_allclose(skip[:2], [2 / 3, 1 / 2], rtol=1e-6)
    assert np.isnan(skip[2])
    assert shape_miou(pred, gt, 3, "one") == pytest.approx(13 / 18)  # (2/3 + 1/2 + 1) / 3
    assert shape_miou(pred, gt, 3, "skip") == pytest.approx(7 / 12)  # (2/3 + 1/2) / 2
    # a part predicted but absent from GT is scored (IoU 0) under both conventions
    assert part_iou(np.array([2, 0]), np.array([0, 0]), 3, "skip")[2] == 0.0


def test_gt_minus_one_ignored_and_uncovered_prediction_wrong():
    # point 1 has no GT: its prediction (part 1) is not counted; without the rule part 1 would be 1/2
    np.testing.assert_array_equal(part_iou(np.array([0, 1, 1]), np.array([0, -1, 1]), 2), [1.0, 1.0])
    # point 1 is uncovered (-1): it is in no P_r, so part 0 has I=1, U=2
    np.testing.assert_allclose(part_iou(np.array([0, -1, 1, 1]), np.array([0, 0, 1, 1]), 2), [0.5, 1.0])
    # nothing scorable at all: "one" gives 1 for every part, "skip" NaN
    assert shape_miou(np.array([0, 1]), np.array([-1, -1]), 2, "one") == 1.0
    assert math.isnan(shape_miou(np.array([0, 1]), np.array([-1, -1]), 2, "skip"))


def test_weights():
    # part 0: I = 3, U = 3 + 1 = 4; part 1: I = 0, U = 1
    np.testing.assert_allclose(part_iou(np.array([0, 0]), np.array([0, 1]), 2, weights=[3.0, 1.0]), [0.75, 0.0])


def _ref_part_iou(pred, gt, num_parts, absent, weights=None):
    w = np.ones(len(gt)) if weights is None else weights
    out = []
    for r in range(num_parts):
        p = {i for i in range(len(gt)) if pred[i] == r and gt[i] != -1}
        g = {i for i in range(len(gt)) if gt[i] == r}
        union = sum(w[i] for i in p | g)
        if not p | g:
            out.append(1.0 if absent == "one" else float("nan"))
        else:
            out.append(sum(w[i] for i in p & g) / union if union > 0 else (1.0 if absent == "one" else float("nan")))
    return np.array(out)


@pytest.mark.parametrize("absent", ["one", "skip"])
def test_part_iou_matches_reference_on_random_labels(absent):
    rng = np.random.default_rng(0)
    for trial in range(20):
        r = int(rng.integers(2, 6))
        n = int(rng.integers(1, 60))
        gt = rng.integers(-1, r - 1, n)  # the last part is never in GT
        pred = rng.integers(-1, r, n)
        w = rng.random(n) if trial % 2 else None
        np.testing.assert_allclose(part_iou(pred, gt, r, absent, w), _ref_part_iou(pred, gt, r, absent, w),
                                   rtol=1e-6, equal_nan=True)


def test_part_iou_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        part_iou([0, 1], [0], 2)
    with pytest.raises(ValueError, match=r"\[-1, 2\)"):
        part_iou([0, 2], [0, 1], 2)
    with pytest.raises(ValueError, match="integer"):
        part_iou(np.array([0.0, 1.0]), np.array([0, 1]), 2)
    with pytest.raises(ValueError, match="absent"):
        part_iou([0], [0], 1, absent="zero")
    with pytest.raises(ValueError, match="non-negative"):
        part_iou([0], [0], 1, weights=[-1.0])


# ----------------------------------------------------------------------------------------------
# miou_summary / both_conventions
# ----------------------------------------------------------------------------------------------
def test_instance_vs_category_mean_on_unbalanced_set():
    perfect = ("mug", np.array([0, 1]), np.array([0, 1]), 2)
    swapped = ("knife", np.array([1, 0]), np.array([0, 1]), 2)  # both parts IoU 0
    s = miou_summary([perfect, perfect, perfect, swapped], part_names={"mug": ["handle", "body"]})
    assert s["instance_miou"] == pytest.approx(0.75)  # (1 + 1 + 1 + 0) / 4
    assert s["category_miou"] == pytest.approx(0.5)  # (1 + 0) / 2
    assert s["num_shapes"] == 4 and s["num_categories"] == 2 and s["convention"] == "one"
    assert s["per_category"]["mug"] == {"miou": 1.0, "num_shapes": 3, "num_shapes_scored": 3,
                                        "part_iou": {"handle": 1.0, "body": 1.0}}
    assert s["per_category"]["knife"]["part_iou"] == {"0": 0.0, "1": 0.0}


def test_both_conventions_and_unscorable_shapes():
    chair = ("chair", np.array([0, 0, 1, 0]), np.array([0, 0, 1, 1]), 3)  # 13/18 vs 7/12 (see above)
    empty = ("chair", np.array([0, 1]), np.array([-1, -1]), 3)  # nothing scorable: 1 vs NaN
    both = both_conventions(iter([chair, empty]))
    assert both["one"]["instance_miou"] == pytest.approx((13 / 18 + 1) / 2)
    assert both["skip"]["instance_miou"] == pytest.approx(7 / 12)
    assert both["skip"]["num_shapes"] == 2 and both["skip"]["num_shapes_scored"] == 1
    # per-part means: part 2 is absent in both shapes -> 1 ("one") / NaN ("skip")
    assert both["one"]["per_category"]["chair"]["part_iou"]["2"] == 1.0
    assert math.isnan(both["skip"]["per_category"]["chair"]["part_iou"]["2"])
    assert both["skip"]["per_category"]["chair"]["part_iou"]["0"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="parts"):
        miou_summary([chair, ("chair", np.array([0]), np.array([0]), 4)])


# ----------------------------------------------------------------------------------------------
# 2D mIoU
# ----------------------------------------------------------------------------------------------
def _units_4x4(num_parts=3):
    """Two units in view 0 of a 4x4 image whose pixel (y, x) shows point 4y + x; pixel (3,3) is background.

    Unit A (label 0, C=0.9) covers the points of rows 0-1, columns 0-2; unit B (label 1, C=0.5)
    covers the points of columns 2-3 (point 15 is not shown).
    """
    a = [0, 1, 2, 4, 5, 6]
    b = [2, 3, 6, 7, 10, 11, 14, 15]
    probs = np.zeros((2, num_parts), np.float32)
    probs[0, :2] = [0.9, 0.1]
    probs[1, :3] = [0.3, 0.5, 0.2][:num_parts]
    units = KnowledgeUnits(offsets=np.array([0, 6, 14]), point_index=np.array(a + b),
                           point_probs=np.zeros((14, num_parts), np.float32), unit_probs=probs,
                           confidence=np.array([0.9, 0.5], np.float32), view=np.zeros(2, np.int16),
                           teacher=np.zeros(2, np.int16), corrupted=np.full(2, -1, np.int8))
    index = np.arange(16).reshape(1, 4, 4)
    index[0, 3, 3] = -1
    gt = np.array([[0, 0, 1, 1]] * 4)[None]
    gt[0, 3, 3] = -1
    return units, index, gt


def test_miou_2d_hand_case_before_and_after_rescoring():
    units, index, gt = _units_4x4()
    # Teacher map: the overlap pixels (0,2), (1,2) get label 0 (0.9 > 0.5) with w = 0.9.
    #   row 0: 0 0 0 1 | row 1: 0 0 0 1 | row 2: - - 1 1 | row 3: - - 1 bg
    # part 0: I = 4 * 0.9 = 3.6; U = 6 * 0.9 (predicted) + 4 (GT-0 pixels of rows 2-3, uncovered) = 9.4
    # part 1: I = 5 * 0.5 = 2.5; U = 2.5 + 2 (GT-1 pixels (0,2), (1,2) predicted 0) = 4.5
    # part 2: absent
    got = miou_2d(units, index, gt, 3)
    np.testing.assert_allclose(got["intersection"], [3.6, 2.5, 0.0], rtol=1e-6)
    np.testing.assert_allclose(got["union"], [9.4, 4.5, 0.0], rtol=1e-6)
    iou0, iou1 = 3.6 / 9.4, 2.5 / 4.5
    assert got["miou"]["skip"] == pytest.approx((iou0 + iou1) / 2)
    assert got["miou"]["one"] == pytest.approx((iou0 + iou1 + 1) / 3)
    assert np.isnan(got["part_iou"][2])
    # 15 labelled pixels (16 minus background); covered: rows 0-1 (8) + (2,2), (2,3), (3,2)
    assert (got["object_pixels"], got["covered_pixels"], got["num_units"]) == (15, 11, 2)
    assert got["confidence"] == "units"
    # Unweighted: all confidences 1; the overlap ties (1 vs 1) and goes to the lower label, 0:
    # part 0: 4 / (6 + 4) = 0.4; part 1: 5 / (5 + 2) = 5/7
    np.testing.assert_allclose(got["unweighted"]["part_iou"][:2], [0.4, 5 / 7], rtol=1e-6)

    # Re-scored: A is down-weighted to 0.2, B raised to 1.0; the overlap now goes to label 1 (w = 1).
    # part 0: I = 4 * 0.2 = 0.8, U = 0.8 + 4 = 4.8 -> 1/6; part 1: I = U = 7 -> 1
    after = miou_2d(units, index, gt, 3, confidence=np.array([0.2, 1.0]))
    np.testing.assert_allclose(after["part_iou"][:2], [1 / 6, 1.0], rtol=1e-6)
    assert after["miou"]["skip"] == pytest.approx(7 / 12)
    assert after["confidence"] == "override"
    assert after["miou"]["skip"] > got["miou"]["skip"]


def test_miou_2d_ignores_gt_minus_one_and_counts_unpainted_views():
    units, index, gt = _units_4x4(num_parts=2)
    gt_unlabelled = gt.copy()
    gt_unlabelled[0, 2, 0] = -1  # an uncovered GT-0 pixel becomes unlabelled: part 0 U = 9.4 - 1
    got = miou_2d(units, index, gt_unlabelled, 2)
    assert got["part_iou"][0] == pytest.approx(3.6 / 8.4)
    assert got["miou"]["one"] == got["miou"]["skip"]  # no absent part with R = 2
    # a second view that no unit paints: its GT pixels are all missed (+8 for part 0, +7 for part 1)
    two = miou_2d(units, np.concatenate([index, index]), np.concatenate([gt, gt]), 2)
    np.testing.assert_allclose(two["part_iou"], [3.6 / 17.4, 2.5 / 11.5], rtol=1e-6)


def test_miou_2d_rejects_bad_input():
    units, index, gt = _units_4x4()
    with pytest.raises(ValueError, match="confidence"):
        miou_2d(units, index, gt, 3, confidence=np.array([np.nan, 1.0]))
    with pytest.raises(ValueError, match="confidence"):
        miou_2d(units, index, gt, 3, confidence=np.array([1.0]))
    with pytest.raises(ValueError, match="V, H, W"):
        miou_2d(units, index, gt[0], 3)
    with pytest.raises(ValueError, match="unit_probs"):
        miou_2d(units, index, gt, 4)
    with pytest.raises(ValueError, match="view"):
        miou_2d(units, index[:0], gt[:0], 3)


def test_miou_2d_zero_confidence_unit_keeps_its_label():
    # Only unit B (label 1) gets confidence 0: its uncontested pixels are still predicted 1 (with
    # w = 0, so they drop out of I_1 and of the predicted mass); the overlap goes to A (0.9 > 0).
    # part 1: I = 0, U = 0 + 2 (GT-1 pixels (0,2), (1,2) predicted 0) -> 0, not a label-0 map
    units, index, gt = _units_4x4(num_parts=2)
    got = miou_2d(units, index, gt, 2, confidence=np.array([0.9, 0.0]))
    np.testing.assert_allclose(got["union"], [9.4, 2.0], rtol=1e-6)
    np.testing.assert_allclose(got["part_iou"], [3.6 / 9.4, 0.0], rtol=1e-6)
