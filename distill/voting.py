"""Direct back-projection voting: the no-distillation baseline (PartDistill Table 5, row 1).

The 2D predictions are back-projected to the points (that is what the knowledge units are) and
each point takes the part that received the most (confidence-weighted) votes, with no 3D network.
Points no unit covers stay unlabelled (-1, "uncovered"; evaluation counts them as such).
"""
from __future__ import annotations

import numpy as np

from .knowledge import KnowledgeUnits

__all__ = ["coverage", "coverage_counts", "vote"]

WEIGHTS = ("confidence", "uniform")


def _check(units: KnowledgeUnits, num_points: int) -> None:
    if num_points < 0:
        raise ValueError(f"num_points must be >= 0, got {num_points}")
    if len(units.point_index) and (units.point_index.min() < 0 or units.point_index.max() >= num_points):
        raise ValueError(f"unit masks hold point indices outside [0, {num_points})")


def vote(units: KnowledgeUnits, num_points: int, num_parts: int,
         weight: str = "confidence") -> tuple[np.ndarray, np.ndarray]:
    """Label points by direct back-projection voting of the knowledge units.

    Every mask entry (unit ``n``, point ``p in M_n``) casts one vote for the part
    ``argmax_r Y_{n,p,r}`` (the argmax of the point's own ``Y``, ``units.point_probs``; for box
    teachers that is the box's ``Y_n``) with weight ``C_n`` (``weight="confidence"``) or 1
    (``weight="uniform"``):

        scores[p, r] = sum_{n : p in M_n, argmax Y_{n,p} = r} w_n,      label[p] = argmax_r scores[p, r].

    Tie rule: ``np.argmax`` order, i.e. the smallest part index among the parts with the highest
    score (this includes a covered point whose votes all weigh 0: part 0). Points in no mask get
    label -1 and an all-zero score row.

    Args:
        units: the shape's :class:`~distill.knowledge.KnowledgeUnits` (any teachers and views).
        num_points: N.
        num_parts: R; must equal ``units.num_parts``.
        weight: ``"confidence"`` or ``"uniform"``.

    Returns:
        ``(labels int64 [N], scores float32 [N, R])``.

    Raises:
        ValueError: unknown ``weight``, R mismatch, or mask indices outside ``[0, N)``.
    """
    if weight not in WEIGHTS:
        raise ValueError(f"weight must be one of {WEIGHTS}, got {weight!r}")
    if units.num_parts != num_parts:
        raise ValueError(f"units have R={units.num_parts} parts, num_parts={num_parts}")
    _check(units, num_points)
    unit_weight = (units.confidence.astype(np.float64) if weight == "confidence"
                   else np.ones(units.num_units, np.float64))
    w = np.repeat(unit_weight, np.diff(units.offsets))                       # [E]
    part = units.point_probs.argmax(1) if len(units.point_probs) else np.zeros(0, np.int64)
    flat = units.point_index * num_parts + part
    scores = np.bincount(flat, weights=w, minlength=num_points * num_parts).reshape(num_points, num_parts)
    covered = np.bincount(units.point_index, minlength=num_points) > 0
    labels = np.where(covered, scores.argmax(1) if num_parts else -1, -1).astype(np.int64)
    return labels, scores.astype(np.float32)


def coverage_counts(units: KnowledgeUnits, num_points: int) -> np.ndarray:
    """``int64 [N]``: how many units' masks contain each point (0 = uncovered).

    Raises:
        ValueError: mask indices outside ``[0, N)``.
    """
    _check(units, num_points)
    return np.bincount(units.point_index, minlength=num_points).astype(np.int64)


def coverage(units: KnowledgeUnits, num_points: int) -> float:
    """Fraction of the N points in at least one unit's mask (the points :func:`vote` labels).

    Returns:
        ``float`` in [0, 1] (0 for N = 0).

    Raises:
        ValueError: mask indices outside ``[0, N)``.
    """
    counts = coverage_counts(units, num_points)
    return float((counts > 0).mean()) if num_points else 0.0
