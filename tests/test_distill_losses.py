"""Eq. 3 (forward distillation), class balance, Eq. 4 (re-scoring) and the backward trigger, on
small examples worked out by hand.

The running example: one shape, N = 3 points, R = 2 parts, student probabilities
S = [[0.5, 0.5], [0.8, 0.2], [0.25, 0.75]] (logits = log S), and two units:
  A: M_A = {0, 1, 2}, Y_A = [0.9, 0.1] -> label 0, C_A = 0.9
  B: M_B = {1, 2},    Y_B = [0.4, 0.6] -> label 1, C_B = 0.6
Per-entry cross-entropies -log S_{i, label}:
  A: ln 2, ln 1.25, ln 4   (sum ln 10)
  B: ln 5, ln(4/3)         (sum ln(20/3))
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from distill.backward import BackwardTrigger, normalize_per_part, roc_auc, score_stats, unit_agreement
from distill.knowledge import KnowledgeUnits
from distill.losses import (
    class_weights,
    collate_units,
    cross_entropy_labelled,
    distill_loss,
    target_mass,
)
from distill.trainer import restrict_units, shape_miou

LN = math.log
S = np.array([[0.5, 0.5], [0.8, 0.2], [0.25, 0.75]])


def units_of(masks, unit_probs, point_probs=None, corrupted=None) -> KnowledgeUnits:
    sizes = [len(m) for m in masks]
    r = len(unit_probs[0])
    up = np.asarray(unit_probs, np.float32)
    pp = (np.asarray(point_probs, np.float32) if point_probs is not None
          else np.repeat(up, sizes, axis=0))
    return KnowledgeUnits(offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                          point_index=np.concatenate(masks).astype(np.int64), point_probs=pp.reshape(-1, r),
                          unit_probs=up, confidence=up.max(1).astype(np.float32),
                          view=np.zeros(len(masks), np.int16), teacher=np.zeros(len(masks), np.int16),
                          corrupted=np.asarray(corrupted if corrupted is not None else [-1] * len(masks), np.int8))


def example_units() -> KnowledgeUnits:
    # per-point Y for the soft target: A: [.8,.2], [1,0], [.6,.4]; B: [.4,.6], [.2,.8]
    return units_of([[0, 1, 2], [1, 2]], [[0.9, 0.1], [0.4, 0.6]],
                    point_probs=[[0.8, 0.2], [1.0, 0.0], [0.6, 0.4], [0.4, 0.6], [0.2, 0.8]])


def example_logits() -> torch.Tensor:
    return torch.tensor(np.log(S), dtype=torch.float32)[None]


# ----------------------------------------------------------------------------------------------
# Eq. 3
# ----------------------------------------------------------------------------------------------
def test_eq3_per_unit_normalisation_by_hand():
    batch = collate_units([example_units()])
    loss = distill_loss(example_logits(), batch, class_weights=None)
    # 1/|D| sum_n C_n / |M_n| sum_i CE = 1/2 (0.9 ln10 / 3 + 0.6 ln(20/3) / 2) = 0.629956
    expected = 0.5 * (0.9 * LN(10) / 3 + 0.6 * LN(20 / 3) / 2)
    assert expected == pytest.approx(0.629956, abs=1e-6)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_eq3_point_and_entry_normalisations_differ_as_computed_by_hand():
    batch = collate_units([example_units()])
    # "entry": every (unit, point) entry equally: (0.9 ln10 + 0.6 ln(20/3)) / 5 = 0.642120
    entry = (0.9 * LN(10) + 0.6 * LN(20 / 3)) / 5
    # "point" (official code): each point averages C_n CE over its units, then mean over the 3 points:
    #   p0: 0.9 ln2;  p1: (0.9 ln1.25 + 0.6 ln5) / 2;  p2: (0.9 ln4 + 0.6 ln(4/3)) / 2  -> 0.639072
    point = (0.9 * LN(2) + (0.9 * LN(1.25) + 0.6 * LN(5)) / 2 + (0.9 * LN(4) + 0.6 * LN(4 / 3)) / 2) / 3
    assert (entry, point) == (pytest.approx(0.642120, abs=1e-6), pytest.approx(0.639072, abs=1e-6))
    assert distill_loss(example_logits(), batch, normalize="entry").item() == pytest.approx(entry, rel=1e-6)
    assert distill_loss(example_logits(), batch, normalize="point").item() == pytest.approx(point, rel=1e-6)
    assert distill_loss(example_logits(), batch, normalize="unit").item() != pytest.approx(entry, rel=1e-3)


def test_eq3_soft_target_by_hand():
    batch = collate_units([example_units()])
    # A: ln2 (p0 is uniform), -ln0.8, -(0.6 ln0.25 + 0.4 ln0.75); B: -(0.4 ln0.8 + 0.6 ln0.2), -(0.2 ln0.25 + 0.8 ln0.75)
    a = LN(2) - LN(0.8) - (0.6 * LN(0.25) + 0.4 * LN(0.75))
    b = -(0.4 * LN(0.8) + 0.6 * LN(0.2)) - (0.2 * LN(0.25) + 0.8 * LN(0.75))
    expected = 0.5 * (0.9 * a / 3 + 0.6 * b / 2)
    assert expected == pytest.approx(0.513820, abs=1e-6)
    assert distill_loss(example_logits(), batch, target="soft").item() == pytest.approx(expected, rel=1e-6)


def test_eq3_with_class_weights_and_replaced_confidence_by_hand():
    batch = collate_units([example_units()])
    w = torch.tensor([0.5, 2.0])
    conf = torch.tensor([0.2, 1.0])
    expected = 0.5 * (0.2 * 0.5 * LN(10) / 3 + 1.0 * 2.0 * LN(20 / 3) / 2)
    got = distill_loss(example_logits(), batch, confidence=conf, class_weights=w)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_eq3_batches_shapes_with_ragged_units():
    one = example_units()
    flipped = units_of([[0], [0, 2]], [[0.3, 0.7], [0.55, 0.45]])   # another shape, other units
    logits2 = torch.tensor(np.log(S[::-1].copy()), dtype=torch.float32)[None]
    both = collate_units([one, flipped])
    assert both.unit_shape.tolist() == [0, 0, 1, 1]
    assert both.offsets.tolist() == [0, 3, 5, 6, 8] and both.unit_label.tolist() == [0, 1, 1, 0]
    logits = torch.cat([example_logits(), logits2])
    l1 = distill_loss(example_logits(), collate_units([one])).item()
    l2 = distill_loss(logits2, collate_units([flipped])).item()
    assert distill_loss(logits, both).item() == pytest.approx((2 * l1 + 2 * l2) / 4, rel=1e-6)
    # gradients reach only the points the units cover
    x = logits.clone().requires_grad_(True)
    distill_loss(x, collate_units([units_of([[2]], [[0.1, 0.9]]), flipped])).backward()
    assert x.grad[0, :2].abs().sum() == 0 and x.grad[0, 2].abs().sum() > 0


def test_eq3_empty_batch_and_errors():
    empty = collate_units([KnowledgeUnits.empty(2)])
    x = example_logits().requires_grad_(True)
    loss = distill_loss(x, empty)
    assert loss.item() == 0.0
    loss.backward()
    with pytest.raises(ValueError, match="normalize"):
        distill_loss(example_logits(), collate_units([example_units()]), normalize="batch")
    with pytest.raises(ValueError, match="point_probs"):
        distill_loss(example_logits(), collate_units([example_units()], point_probs=False), target="soft")
    with pytest.raises(ValueError, match="different numbers of parts"):
        collate_units([example_units(), KnowledgeUnits.empty(3)])


# ----------------------------------------------------------------------------------------------
# Class balance
# ----------------------------------------------------------------------------------------------
def test_class_weights_by_hand():
    batch = collate_units([example_units()])
    # confidence mass m_0 = 0.9 * 3 = 2.7, m_1 = 0.6 * 2 = 1.2; entry counts c_0 = 3, c_1 = 2
    assert target_mass(batch, 2).tolist() == pytest.approx([2.7, 1.2])
    assert target_mass(batch, 2, weighted=False).tolist() == [3.0, 2.0]
    # inverse: w_r = (3.9 / (2 m_r))^alpha
    assert class_weights(batch, 2, "inverse").tolist() == pytest.approx([3.9 / 5.4, 3.9 / 2.4], rel=1e-6)
    assert class_weights(batch, 2, "inverse", alpha=0.5).tolist() == pytest.approx(
        [math.sqrt(3.9 / 5.4), math.sqrt(3.9 / 2.4)], rel=1e-6)
    # partdistill (official): clip(1 + log_4(5 / (2 c_r)), 1, 4): part 0: 1 + log_4(5/6) < 1 -> 1; part 1: 1 + log_4 1.25
    assert class_weights(batch, 2, "partdistill").tolist() == pytest.approx([1.0, 1 + LN(1.25) / LN(4)], rel=1e-6)
    # effective number (Cui et al. 2019), beta = 0.5: (1-b)/(1-b^c) = 4/7, 2/3 -> normalised to sum 2: 12/13, 14/13
    assert class_weights(batch, 2, "effective", beta=0.5).tolist() == pytest.approx([12 / 13, 14 / 13], rel=1e-6)
    assert class_weights(batch, 2, "none") is None
    # a part nobody predicts: inverse gives it 0 (it never appears in a target), partdistill the cap 4
    assert class_weights(batch, 3, "inverse").tolist() == pytest.approx([3.9 / 8.1, 3.9 / 3.6, 0.0], rel=1e-6)
    assert class_weights(batch, 3, "partdistill")[2].item() == 4.0
    with pytest.raises(ValueError, match="class balance"):
        class_weights(batch, 2, "median")


def test_confidence_replacement_changes_the_inverse_weights():
    batch = collate_units([example_units()])
    w = class_weights(batch, 2, "inverse", confidence=torch.tensor([0.3, 0.6]))
    # m = [0.9, 1.2], total 2.1
    assert w.tolist() == pytest.approx([2.1 / 1.8, 2.1 / 2.4], rel=1e-6)


# ----------------------------------------------------------------------------------------------
# Eq. 4 and the trigger
# ----------------------------------------------------------------------------------------------
def test_eq4_agreement_by_hand():
    # student argmax per point: [0, 0, 1]
    logits = torch.tensor(np.log([[0.6, 0.4], [0.8, 0.2], [0.25, 0.75]]), dtype=torch.float32)[None]
    extra = units_of([[2], []], [[0.9, 0.1], [0.2, 0.8]])        # an empty unit -> NaN
    batch = collate_units([example_units(), extra])
    scores = unit_agreement(torch.cat([logits, logits]), batch)
    # A (label 0 on {0,1,2}): 2/3; B (label 1 on {1,2}): 1/2; extra unit (label 0 on {2}): 0
    assert scores[:3].tolist() == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert math.isnan(scores[3].item())


def test_trigger_fires_at_the_right_epoch():
    losses = [1.0, 0.6, 0.5, 0.45, 0.44, 0.44, 0.44, 0.44]
    # moving averages (window 3): 1.0, 0.8, 0.7, 0.5167, 0.4633, 0.4433, 0.44, 0.44
    # |change|: 1.0, 0.2, 0.1, 0.183, 0.053, 0.020, 0.0033 (< 0.01 at epoch 7), 0
    t = BackwardTrigger(tau=0.01, window=3)
    fired = [e for e, loss in enumerate(losses, 1) if t.update(e, loss)]
    assert fired == [7] and t.fired_epoch == 7
    # relative change, tau 0.05: 0.02 / 0.4633 = 0.043 at epoch 6
    t = BackwardTrigger(tau=0.05, window=3, relative=True)
    assert [e for e, loss in enumerate(losses, 1) if t.update(e, loss)] == [6]
    # never before epoch `window`, even with a flat loss; repeats with rescore_every
    t = BackwardTrigger(tau=0.01, window=3, rescore_every=2)
    assert [e for e in range(1, 10) if t.update(e, 0.5)] == [3, 5, 7, 9]
    # warm-up: a flat loss from the start fires at min_epoch, not at window
    warm = BackwardTrigger(tau=0.01, window=3, min_epoch=6)
    assert [e for e in range(1, 10) if warm.update(e, 0.5)] == [6]
    with pytest.raises(ValueError, match="min_epoch"):
        BackwardTrigger(min_epoch=-1)
    # state round trip
    t2 = BackwardTrigger(tau=0.01, window=3, rescore_every=2)
    t2.load_state_dict(t.state_dict())
    assert t2.update(10, 0.5) is False and t2.update(11, 0.5) is True
    with pytest.raises(ValueError, match="expected epoch"):
        t2.update(13, 0.5)


def test_roc_auc_and_score_stats():
    scores = np.array([0.9, 0.8, 0.3, 0.8, 0.1])
    clean = np.array([True, True, False, False, False])
    # pairs (clean, corrupted): 0.9 beats all 3; 0.8 beats 0.3 and 0.1, ties 0.8 -> (3 + 2.5) / 6
    assert roc_auc(scores, clean) == pytest.approx(5.5 / 6)
    stats = score_stats(np.append(scores, np.nan), np.array([0, 0, 1, 1, 1, -1]))
    assert stats["count"] == 5 and stats["mean"] == pytest.approx(0.58)
    assert stats["clean_vs_corrupted_auc"] == pytest.approx(5.5 / 6) and sum(stats["hist"]) == 5


# ----------------------------------------------------------------------------------------------
# Data helpers used by the trainer
# ----------------------------------------------------------------------------------------------
def test_per_part_normalisation_by_hand():
    # part 0: scores 0.2 / 0.4 / NaN, part 1: 0.05 / 0.1 (a part the student barely predicts), part 2: 0 / 0
    scores = torch.tensor([0.2, 0.4, float("nan"), 0.05, 0.1, 0.0, 0.0])
    label = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    out = normalize_per_part(scores, label, 4, quantile=1.0)
    np.testing.assert_allclose(out[:2].numpy(), [0.5, 1.0])
    np.testing.assert_allclose(out[3:5].numpy(), [0.5, 1.0])
    assert torch.isnan(out[2]) and torch.isnan(out[5:]).all()        # no points / a part that cannot be judged
    # quantile 0.5 of part 0 (linear interpolation: 0.3): 0.2 / 0.3, and 0.4 / 0.3 capped at 1
    out = normalize_per_part(scores, label, 4, quantile=0.5)
    np.testing.assert_allclose(out[:2].numpy(), [2 / 3, 1.0], rtol=1e-6)
    # the ranking within a part is kept
    s = torch.rand(100)
    lab = torch.randint(0, 3, (100,))
    o = normalize_per_part(s, lab, 3, 0.9)
    for r in range(3):
        a, b = s[lab == r], o[lab == r]
        assert (torch.argsort(a[b < 1]) == torch.argsort(b[b < 1])).all()
    with pytest.raises(ValueError, match="quantile"):
        normalize_per_part(scores, label, 4, quantile=0.0)
    with pytest.raises(ValueError, match="differ"):
        normalize_per_part(scores, label[:3], 4)


def test_restrict_units_to_a_subsample():
    units = units_of([[0, 1, 2], [1, 2], [3]], [[0.9, 0.1], [0.4, 0.6], [0.7, 0.3]])
    out, kept = restrict_units(units, np.array([2, 3]), num_points=4)   # point 2 -> 0, point 3 -> 1
    assert kept.tolist() == [0, 1, 2]
    assert out.offsets.tolist() == [0, 1, 2, 3] and out.point_index.tolist() == [0, 0, 1]
    out, kept = restrict_units(units, np.array([0, 1]), num_points=4)   # unit 2 loses its only point
    assert kept.tolist() == [0, 1] and out.offsets.tolist() == [0, 2, 3] and out.point_index.tolist() == [0, 1, 1]


def test_shape_miou_by_hand():
    pred = np.array([[0, 0, 1, 1], [2, 2, 2, 2]])
    gt = np.array([[0, 1, 1, -1], [2, 2, 2, 2]])
    # shape 0 (R=3): part 0: I=1, U=2 -> 1/2; part 1: I=1, U=2 -> 1/2; part 2: empty -> 1; mean 2/3
    # shape 1: parts 0, 1 empty -> 1; part 2: 4/4 -> 1
    assert shape_miou(pred, gt, 3).tolist() == pytest.approx([2 / 3, 1.0])


def test_fewshot_cross_entropy_ignores_unlabelled():
    logits = example_logits()
    labels = torch.tensor([[0, -1, 1]])
    assert cross_entropy_labelled(logits, labels).item() == pytest.approx((LN(2) + LN(4 / 3)) / 2, rel=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
def test_eq3_on_cuda_matches_cpu():
    batch = collate_units([example_units()])
    cpu = distill_loss(example_logits(), batch, normalize="point").item()
    gpu = distill_loss(example_logits().cuda(), batch.to("cuda"), normalize="point").item()
    assert gpu == pytest.approx(cpu, rel=1e-5)
