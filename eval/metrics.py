"""Part-segmentation metrics: per-part IoU, shape / instance / category mIoU, and the 2D mIoU of knowledge units.

3D part IoU (points, or mesh faces through :mod:`eval.transfer`)
----------------------------------------------------------------
For one shape with R parts, predicted labels ``pred`` and ground truth ``gt`` (both local part
indices, ``int [N]``), the IoU of part r is ``|P_r ∩ G_r| / |P_r ∪ G_r|`` with ``P_r = {i : pred_i = r}``
and ``G_r = {i : gt_i = r}``, counted over the points whose ground truth is labelled:

* **GT -1 is ignored**: points with ``gt = -1`` (unlabelled in the dataset) are dropped before
  counting, whatever their prediction.
* **Prediction -1 is wrong**: a point with ``pred = -1`` ("uncovered": no teacher unit reached it,
  e.g. the voting baseline) belongs to no ``P_r``, so it adds to the union of its GT part and to no
  intersection.
* **Absent parts** (``|P_r ∪ G_r| = 0``, the part is neither in the ground truth nor predicted):
  ``absent="one"`` counts the part's IoU as 1. This is the ShapeNetPart standard evaluation
  (PointNet / PointNet++ ``part_ious``), PointCLIP V2 and PartDistill (``compute_overall_iou_batchwise``
  in ``util.py`` of ardianumam/PartDistill: "If the union ... is empty, count part IoU as 1").
  ``absent="skip"`` leaves the part out (NaN) and averages over the parts present in the ground truth
  or the prediction; a shape with no such part has a NaN mIoU and is left out of the means.
  :func:`both_conventions` reports both; they differ whenever a shape lacks a part of its category
  (a chair without arms).
* Optional per-point ``weights`` (e.g. face areas) replace the counts by sums of weights.

Shape mIoU is the mean of the part IoUs (:func:`shape_miou`). Over a data set
(:func:`miou_summary`): **instance mIoU** = mean over shapes of shape mIoU; **category mIoU** = mean
over categories of each category's mean shape mIoU (every category weighs the same, however many
shapes it has).

2D mIoU of knowledge units (:func:`miou_2d`)
--------------------------------------------
Measures the quality of the teacher's 2D knowledge, before and after backward re-scoring
(PartDistill §3.4 / Eq. 4; the supplementary's Eqs. 5-8 define a 2D mIoU weighted by the unit
confidences; we could not access them, so the definition below is ours and stated in full):

1. Teacher map. In view v, pixel p shows point ``pixel_index[v, p]`` (-1: background). Unit n of
   view ``units.view[n]`` *covers* p when that point is in its mask M_n. Unit n votes for its label
   ``l_n = argmax_r Y_n,r`` with weight ``C_n``; the pixel's predicted label is the label with the
   largest summed confidence over the units covering it (ties, zero sums included: the lowest
   label index among the labels of the covering units), and its weight ``w(p)`` is the largest
   confidence among the covering units of that label. Pixels no unit covers are unlabelled (no
   prediction).
2. Confidence-weighted counts, per part r, summed over all views of the shape, over pixels whose
   GT label (``gt_label_maps``) is a part (GT -1 — background or unlabelled points — is ignored):
   ``I_r = sum_{pred=r, gt=r} w``; ``U_r = sum_{pred=r} w + #{gt=r, pred≠r}``: every predicted pixel
   contributes its confidence, a GT pixel not predicted as r (missed or uncovered) contributes 1.
3. ``IoU_r = I_r / U_r``; mIoU over parts with both absent conventions. With all confidences 1 this
   is the ordinary pixel IoU of the teacher's map (also returned, as ``unweighted``). Lowering the
   confidence of wrong units shrinks their false-positive mass; lowering that of right units lowers
   ``I_r`` faster than ``U_r``, so the score rewards confidences that separate right from wrong units.
   Scaling all confidences by one factor changes the score only through the missed pixels, so raw
   detector scores (GLIP's are rarely above 0.7) and re-scored agreements (Eq. 4, near 1 for right
   units) can be compared. (A soft IoU — ``U_r += 1`` for every GT pixel, so a right pixel of
   confidence 0.5 counts half — was not chosen: it would mostly measure the scale of the scores.)

"Before and after re-scoring": call once with ``confidence=None`` (the extracted C_n) and once with
the re-scored confidences (:func:`distill.backward.rescore`).
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["ABSENT", "both_conventions", "miou_2d", "miou_summary", "part_iou", "shape_miou"]

#: Conventions for parts absent from both ground truth and prediction.
ABSENT: tuple[str, ...] = ("one", "skip")


# ----------------------------------------------------------------------------------------------
# Checks
# ----------------------------------------------------------------------------------------------
def _check_absent(absent: str) -> str:
    if absent not in ABSENT:
        raise ValueError(f"absent must be one of {ABSENT}, got {absent!r}")
    return absent


def _labels(x: Any, name: str, num_parts: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array of labels, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer labels, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr.size and (arr.min() < -1 or arr.max() >= num_parts):
        raise ValueError(f"{name}: labels must lie in [-1, {num_parts}), got [{arr.min()}, {arr.max()}]")
    return arr


def _num_parts(num_parts: Any) -> int:
    if isinstance(num_parts, bool) or not isinstance(num_parts, (int, np.integer)) or num_parts < 1:
        raise ValueError(f"num_parts must be a positive integer, got {num_parts!r}")
    return int(num_parts)


def _counts(pred: np.ndarray, gt: np.ndarray, num_parts: int, weights: np.ndarray | None
            ) -> tuple[np.ndarray, np.ndarray]:
    """``(intersection, union)`` float64 [R] over the points with ``gt >= 0``."""
    keep = gt >= 0
    p, g = pred[keep], gt[keep]
    w = None if weights is None else weights[keep]
    hit = p == g
    inter = np.bincount(g[hit], None if w is None else w[hit], num_parts)
    covered = p >= 0
    pred_mass = np.bincount(p[covered], None if w is None else w[covered], num_parts)
    gt_mass = np.bincount(g, w, num_parts)
    return inter.astype(np.float64), (pred_mass + gt_mass - inter).astype(np.float64)


def _iou(inter: np.ndarray, union: np.ndarray, absent: str) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 1.0 if absent == "one" else np.nan)
    return iou.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# 3D part IoU
# ----------------------------------------------------------------------------------------------
def part_iou(pred: Any, gt: Any, num_parts: int, absent: str = "one", weights: Any = None) -> np.ndarray:
    """Per-part IoU of one shape (module docstring: GT -1 ignored, prediction -1 wrong).

    Args:
        pred: ``int [N]`` predicted local part index per point (or face), ``-1`` = no prediction.
        gt: ``int [N]`` ground-truth local part index, ``-1`` = unlabelled (ignored).
        num_parts: R, the category's number of parts.
        absent: ``"one"`` (a part absent from both GT and prediction has IoU 1: ShapeNetPart standard,
            PointCLIP V2, PartDistill) or ``"skip"`` (such a part is NaN).
        weights: optional ``float [N]`` non-negative weight per point (e.g. face areas); None = 1 each.

    Returns:
        ``float32 [R]``: ``IoU_r = w(P_r ∩ G_r) / w(P_r ∪ G_r)``; 1 or NaN for absent parts (see ``absent``).

    Raises:
        ValueError: shapes differ, non-integer labels, labels outside ``[-1, R)``, bad ``absent`` or
            ``num_parts``, negative / non-finite weights.
    """
    r = _num_parts(num_parts)
    _check_absent(absent)
    p, g = _labels(pred, "pred", r), _labels(gt, "gt", r)
    if p.shape != g.shape:
        raise ValueError(f"pred and gt must have the same length, got {len(p)} and {len(g)}")
    w = None
    if weights is not None:
        w = np.asarray(weights, np.float64)
        if w.shape != g.shape:
            raise ValueError(f"weights must have shape {g.shape}, got {w.shape}")
        if not np.all(np.isfinite(w)) or (w.size and w.min() < 0):
            raise ValueError("weights must be finite and non-negative")
    return _iou(*_counts(p, g, r, w), absent)


def shape_miou(pred: Any, gt: Any, num_parts: int, absent: str = "one", weights: Any = None) -> float:
    """Mean of :func:`part_iou` over the parts (NaN parts left out; NaN if every part is NaN).

    Args / Raises: as :func:`part_iou`.

    Returns:
        float in [0, 1], or NaN (``absent="skip"`` and no part in GT or prediction).
    """
    iou = part_iou(pred, gt, num_parts, absent, weights)
    valid = ~np.isnan(iou)
    return float(iou[valid].astype(np.float64).mean()) if valid.any() else float("nan")


def _mean(values: Sequence[float]) -> float:
    arr = np.asarray(values, np.float64)
    arr = arr[~np.isnan(arr)]
    return float(arr.mean()) if arr.size else float("nan")


def miou_summary(per_shape: Iterable[Sequence[Any]], absent: str = "one",
                 part_names: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
    """Instance and category mIoU over a data set, with per-category and per-part values.

    Args:
        per_shape: one ``(category, pred, gt, num_parts)`` tuple per shape — ``pred`` / ``gt`` as in
            :func:`part_iou` — or ``(category, pred, gt, num_parts, weights)``.
        absent: ``"one"`` or ``"skip"`` (module docstring).
        part_names: optional ``{category: R names}``; per-part values are then keyed by name.

    Returns:
        ``{"convention": absent, "instance_miou": float, "category_miou": float, "num_shapes": int,
        "num_shapes_scored": int, "num_categories": int, "per_category": {category: {"miou": float,
        "num_shapes": int, "num_shapes_scored": int, "part_iou": {part: float}}}}``.
        ``instance_miou`` is the mean of the shapes' mIoU, ``category_miou`` the mean of the
        categories' ``miou`` (each the mean over its shapes); ``part_iou`` is the mean IoU of each
        part over the category's shapes (NaN-skipping; parts keyed by name, else by ``"0"``, ``"1"``,
        ...). Shapes with a NaN mIoU (``"skip"`` with nothing to score) are counted in
        ``num_shapes`` but not ``num_shapes_scored`` and left out of the means. Floats are Python
        floats (NaN where nothing was scored).

    Raises:
        ValueError: as :func:`part_iou`; a category given with two different part counts; part names
            whose count differs from ``num_parts``.
    """
    _check_absent(absent)
    by_cat: dict[str, dict[str, Any]] = {}
    shape_values: list[float] = []
    for item in per_shape:
        if len(item) not in (4, 5):
            raise ValueError(f"per_shape items must be (category, pred, gt, num_parts[, weights]), got {len(item)} values")
        category, pred, gt, num_parts = item[:4]
        weights = item[4] if len(item) == 5 else None
        iou = part_iou(pred, gt, num_parts, absent, weights)
        entry = by_cat.setdefault(str(category), {"num_parts": int(num_parts), "ious": [], "mious": []})
        if entry["num_parts"] != int(num_parts):
            raise ValueError(f"category {category!r} given with {entry['num_parts']} and {num_parts} parts")
        valid = ~np.isnan(iou)
        value = float(iou[valid].astype(np.float64).mean()) if valid.any() else float("nan")
        entry["ious"].append(iou)
        entry["mious"].append(value)
        shape_values.append(value)
    per_category: dict[str, Any] = {}
    for category in sorted(by_cat):
        entry = by_cat[category]
        names = list(part_names[category]) if part_names and category in part_names else \
            [str(i) for i in range(entry["num_parts"])]
        if len(names) != entry["num_parts"]:
            raise ValueError(f"part_names[{category!r}] has {len(names)} names for {entry['num_parts']} parts")
        stack = np.stack(entry["ious"]).astype(np.float64)
        per_part = {name: _mean(stack[:, i].tolist()) for i, name in enumerate(names)}
        per_category[category] = {"miou": _mean(entry["mious"]), "num_shapes": len(entry["mious"]),
                                  "num_shapes_scored": int(np.sum(~np.isnan(entry["mious"]))),
                                  "part_iou": per_part}
    return {"convention": absent, "instance_miou": _mean(shape_values),
            "category_miou": _mean([c["miou"] for c in per_category.values()]),
            "num_shapes": len(shape_values), "num_shapes_scored": int(np.sum(~np.isnan(shape_values))),
            "num_categories": len(per_category), "per_category": per_category}


def both_conventions(per_shape: Iterable[Sequence[Any]],
                     part_names: Mapping[str, Sequence[str]] | None = None) -> dict[str, dict[str, Any]]:
    """:func:`miou_summary` under both absent-part conventions: ``{"one": {...}, "skip": {...}}``.

    ``per_shape`` may be an iterator (it is read once). Raises as :func:`miou_summary`.
    """
    items = list(per_shape)
    return {absent: miou_summary(items, absent, part_names) for absent in ABSENT}


# ----------------------------------------------------------------------------------------------
# 2D mIoU of knowledge units
# ----------------------------------------------------------------------------------------------
def _teacher_map(units: Any, pixel_index: np.ndarray, num_parts: int, confidence: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(label int64 [V,H,W] (-1 unlabelled), weight float64 [V,H,W])`` of the teacher's 2D map."""
    num_views = pixel_index.shape[0]
    offsets = np.asarray(units.offsets, np.int64)
    points = np.asarray(units.point_index, np.int64)
    unit_probs = np.asarray(units.unit_probs)
    views = np.asarray(units.view, np.int64)
    num_units = len(offsets) - 1
    num_points = int(max(pixel_index.max(initial=-1), points.max(initial=-1))) + 1
    label = unit_probs.argmax(1) if num_units else np.zeros(0, np.int64)  # l_n, ties: lowest index
    entry_unit = np.repeat(np.arange(num_units), np.diff(offsets))
    # (view, point, label) cells of every mask entry: summed and maximal confidence
    cell = (views[entry_unit] * num_points + points) * num_parts + label[entry_unit]
    size = num_views * num_points * num_parts
    total = np.bincount(cell, confidence[entry_unit], size).reshape(num_views, num_points, num_parts)
    best = np.zeros(size)
    np.maximum.at(best, cell, confidence[entry_unit])
    best = best.reshape(num_views, num_points, num_parts)
    present = np.bincount(cell, None, size).reshape(num_views, num_points, num_parts) > 0
    covered = present.any(2)
    # labels of no covering unit never win, even against a sum of zero confidences
    point_label = np.where(covered, np.where(present, total, -1.0).argmax(2), -1)   # [V, N]
    point_weight = np.take_along_axis(best, np.maximum(point_label, 0)[..., None], 2)[..., 0]
    v = np.broadcast_to(np.arange(num_views)[:, None, None], pixel_index.shape)
    obj = pixel_index >= 0
    pix_label = np.full(pixel_index.shape, -1, np.int64)
    pix_weight = np.zeros(pixel_index.shape)
    pix_label[obj] = point_label[v[obj], pixel_index[obj]]
    pix_weight[obj] = np.where(pix_label[obj] >= 0, point_weight[v[obj], pixel_index[obj]], 0.0)
    return pix_label, pix_weight


def _weighted_counts(pred: np.ndarray, weight: np.ndarray, gt: np.ndarray, num_parts: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    keep = gt >= 0
    p, w, g = pred[keep], weight[keep], gt[keep]
    hit = p == g
    inter = np.bincount(g[hit], w[hit], num_parts)
    pred_mass = np.bincount(p[p >= 0], w[p >= 0], num_parts)
    missed = np.bincount(g[~hit], None, num_parts)
    return inter, pred_mass + missed


def miou_2d(units: Any, pixel_index: Any, gt_label_maps: Any, num_parts: int,
            confidence: Any = None) -> dict[str, Any]:
    """Confidence-weighted 2D mIoU of one shape's knowledge units against its GT label maps.

    Definition (ours; the paper's supplementary Eqs. 5-8 were not available): see the module
    docstring — teacher map by confidence-summed votes of the units covering each pixel, then
    ``I_r = sum_{pred=r, gt=r} w``, ``U_r = sum_{pred=r} w + #{gt=r, pred≠r}``, summed over views,
    GT -1 pixels ignored, ``IoU_r = I_r / U_r``.

    Args:
        units: :class:`distill.knowledge.KnowledgeUnits` of the shape (``offsets``, ``point_index``,
            ``unit_probs`` and ``view`` are used; ``confidence`` unless overridden).
        pixel_index: ``int [V, H, W]`` point index shown by each pixel of each view, -1 = background
            (``distill.render.Renders.index``); view v is the view ``units.view == v`` refers to.
        gt_label_maps: ``int [V, H, W]`` GT part label per pixel, -1 = background / unlabelled.
        num_parts: R.
        confidence: ``float [U]`` confidences to use instead of ``units.confidence`` (e.g. the
            re-scored ones of backward distillation); None = the units' own.

    Returns:
        ``{"miou": {"one": float, "skip": float}, "part_iou": float32 [R] (NaN where U_r = 0),
        "intersection": float64 [R], "union": float64 [R], "unweighted": {"miou": {...},
        "part_iou": [R]} (every confidence set to 1: the plain pixel IoU of the units' majority-vote
        map), "object_pixels": int (GT >= 0),
        "covered_pixels": int (GT >= 0 and covered by a unit), "num_units": int,
        "confidence": "units" | "override"}``. Sum ``intersection`` / ``union`` over shapes to pool.

    Raises:
        ValueError: maps of different or non-3-D shapes; labels outside ``[-1, R)``; unit views
            outside ``[0, V)``; ``unit_probs`` not ``[U, R]``; ``confidence`` not ``[U]``, negative
            or non-finite.
    """
    r = _num_parts(num_parts)
    index = np.asarray(pixel_index)
    gt = np.asarray(gt_label_maps)
    if index.ndim != 3 or gt.shape != index.shape:
        raise ValueError(f"pixel_index and gt_label_maps must both be [V, H, W], got {index.shape} and {gt.shape}")
    if not (np.issubdtype(index.dtype, np.integer) and np.issubdtype(gt.dtype, np.integer)):
        raise ValueError("pixel_index and gt_label_maps must hold integers")
    index, gt = index.astype(np.int64), gt.astype(np.int64)
    if index.size and index.min() < -1:
        raise ValueError("pixel_index: values must be >= -1")
    if gt.size and (gt.min() < -1 or gt.max() >= r):
        raise ValueError(f"gt_label_maps: labels must lie in [-1, {r})")
    num_units = len(units.offsets) - 1
    if np.asarray(units.unit_probs).shape != (num_units, r):
        raise ValueError(f"units.unit_probs must be [{num_units}, {r}], got {np.asarray(units.unit_probs).shape}")
    views = np.asarray(units.view, np.int64)
    if num_units and (views.min() < 0 or views.max() >= index.shape[0]):
        raise ValueError(f"units.view must lie in [0, {index.shape[0]}) (the views of pixel_index)")
    conf = np.asarray(units.confidence if confidence is None else confidence, np.float64)
    if conf.shape != (num_units,):
        raise ValueError(f"confidence must have shape ({num_units},), got {conf.shape}")
    if not np.all(np.isfinite(conf)) or (conf.size and conf.min() < 0):
        raise ValueError("confidence must be finite and non-negative (replace NaN re-scores, e.g. by the old C_n)")

    pred, weight = _teacher_map(units, index, r, conf)
    inter, union = _weighted_counts(pred, weight, gt, r)
    pred1, weight1 = _teacher_map(units, index, r, np.ones(num_units))
    inter1, union1 = _weighted_counts(pred1, weight1, gt, r)

    def scores(i: np.ndarray, u: np.ndarray) -> tuple[dict[str, float], np.ndarray]:
        out = {}
        for absent in ABSENT:
            iou = _iou(i, u, absent)
            out[absent] = _mean(iou.tolist())
        return out, _iou(i, u, "skip")

    miou, iou = scores(inter, union)
    miou1, iou1 = scores(inter1, union1)
    labelled = gt >= 0
    return {"miou": miou, "part_iou": iou, "intersection": inter, "union": union,
            "unweighted": {"miou": miou1, "part_iou": iou1},
            "object_pixels": int(labelled.sum()), "covered_pixels": int((labelled & (pred >= 0)).sum()),
            "num_units": int(num_units), "confidence": "units" if confidence is None else "override"}
