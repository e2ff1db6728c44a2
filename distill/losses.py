"""Forward distillation loss (PartDistill Eq. 3) and class-balance weights.

Notation (PartDistill, Umam et al., CVPR 2024, §3.3): D is the set of knowledge units of a batch,
unit n has a mask M_n (point indices), per-point teacher probabilities Y (``point_probs``), a unit
prediction Y_n (``unit_probs``) and a confidence C_n; S_i = softmax of the student's logits at point i.

Eq. 3 (forward distillation), with the class-balance weight w_r added inside the sum over parts::

    L = - 1/|D| * sum_n C_n * 1/|M_n| * sum_{i in M_n} sum_r w_r * T_{n,i,r} * log S_{i,r}

where the target T is, by default (``target="hard"``, as in the paper and the official code), the
one-hot encoding Ŷ_n of ``argmax_r Y_n`` (the same for every point of the unit); ``target="soft"``
uses the teacher's per-point probabilities Y_i instead.

Units of several shapes are batched ragged (:class:`UnitBatch`, built by :func:`collate_units`):
units are concatenated, ``unit_shape`` says which of the B shapes each belongs to, and every
reduction is a segment sum (``index_add_``), so no Python loop runs over points or units.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

NORMALIZATIONS = ("unit", "point", "entry")
TARGETS = ("hard", "soft")
CLASS_BALANCE = ("none", "partdistill", "inverse", "effective")


@dataclass
class UnitBatch:
    """Knowledge units of B shapes, concatenated (ragged).

    Attributes:
        offsets: ``int64 [U+1]``; unit n covers entries ``offsets[n]:offsets[n+1]``.
        point_index: ``int64 [E]`` index of each entry's point among its shape's N points.
        entry_unit: ``int64 [E]`` the unit of each entry (``repeat_interleave`` of the unit sizes).
        unit_shape: ``int64 [U]`` which of the B shapes of the batch the unit belongs to.
        unit_label: ``int64 [U]`` the unit's part label ``argmax_r Y_n``.
        confidence: ``float32 [U]`` C_n.
        unit_id: ``int64 [U]`` a global unit id (row in a confidence table), -1 if unknown.
        corrupted: ``int8 [U]`` 1 / 0 / -1 (unknown).
        point_probs: ``float32 [E, R]`` Y per entry, or None (only needed for ``target="soft"``).
    """

    offsets: torch.Tensor
    point_index: torch.Tensor
    entry_unit: torch.Tensor
    unit_shape: torch.Tensor
    unit_label: torch.Tensor
    confidence: torch.Tensor
    unit_id: torch.Tensor
    corrupted: torch.Tensor
    point_probs: torch.Tensor | None = None

    @property
    def num_units(self) -> int:
        return int(self.unit_label.shape[0])

    @property
    def num_entries(self) -> int:
        return int(self.point_index.shape[0])

    @property
    def sizes(self) -> torch.Tensor:
        """``int64 [U]`` |M_n|."""
        return self.offsets[1:] - self.offsets[:-1]

    @property
    def entry_shape(self) -> torch.Tensor:
        """``int64 [E]`` the batch shape of each entry."""
        return self.unit_shape[self.entry_unit]

    def to(self, device, non_blocking: bool = False) -> UnitBatch:
        """A copy with every tensor on ``device`` (lets ``accelerate`` move batches)."""
        return UnitBatch(**{f.name: None if getattr(self, f.name) is None
                            else getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})


def collate_units(units: Sequence, unit_ids: Sequence[np.ndarray] | None = None,
                  point_probs: bool = True) -> UnitBatch:
    """Concatenate the knowledge units of B shapes into one :class:`UnitBatch`.

    Args:
        units: B :class:`distill.knowledge.KnowledgeUnits` (same R); shape b's units get ``unit_shape = b``.
        unit_ids: optional B arrays ``int64 [U_b]`` of global unit ids (default -1).
        point_probs: keep the per-entry probabilities Y (needed for ``target="soft"`` only).

    Returns:
        A :class:`UnitBatch` on the CPU.

    Raises:
        ValueError: units with different numbers of parts, or inconsistent ragged arrays.
    """
    if len(units) == 0:
        raise ValueError("collate_units needs at least one shape")
    parts = {int(np.asarray(u.unit_probs).shape[1]) for u in units}
    if len(parts) != 1:
        raise ValueError(f"units have different numbers of parts {sorted(parts)}")
    counts = np.array([len(u.offsets) - 1 for u in units], np.int64)
    sizes = np.concatenate([np.diff(np.asarray(u.offsets, np.int64)) for u in units])
    point_index = np.concatenate([np.asarray(u.point_index, np.int64) for u in units])
    if sizes.sum() != len(point_index) or np.any(sizes < 0):
        raise ValueError("offsets do not match point_index (ragged arrays inconsistent)")
    unit_probs = np.concatenate([np.asarray(u.unit_probs, np.float32) for u in units])
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    ids = (np.concatenate([np.asarray(i, np.int64) for i in unit_ids]) if unit_ids is not None
           else np.full(len(sizes), -1, np.int64))
    if len(ids) != len(sizes):
        raise ValueError(f"unit_ids give {len(ids)} ids for {len(sizes)} units")
    probs = None
    if point_probs:
        probs = torch.from_numpy(np.concatenate([np.asarray(u.point_probs, np.float32).reshape(-1, unit_probs.shape[1])
                                                 for u in units]))
    return UnitBatch(
        offsets=torch.from_numpy(offsets), point_index=torch.from_numpy(point_index),
        entry_unit=torch.from_numpy(np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)),
        unit_shape=torch.from_numpy(np.repeat(np.arange(len(units), dtype=np.int64), counts)),
        unit_label=torch.from_numpy(unit_probs.argmax(1).astype(np.int64) if len(unit_probs) else np.zeros(0, np.int64)),
        confidence=torch.from_numpy(np.concatenate([np.asarray(u.confidence, np.float32) for u in units])),
        unit_id=torch.from_numpy(ids),
        corrupted=torch.from_numpy(np.concatenate([np.asarray(u.corrupted, np.int8) for u in units])),
        point_probs=probs)


def _targets(units: UnitBatch, num_parts: int, target: str) -> torch.Tensor:
    """``float32 [E, R]`` the target T of every entry (one-hot of the unit label, or Y)."""
    if target == "hard":
        return F.one_hot(units.unit_label[units.entry_unit], num_parts).float()
    if units.point_probs is None:
        raise ValueError("target='soft' needs point_probs in the UnitBatch (collate_units(point_probs=True))")
    return units.point_probs.float()


def distill_loss(logits: torch.Tensor, units: UnitBatch, confidence: torch.Tensor | None = None,
                 class_weights: torch.Tensor | None = None, target: str = "hard",
                 normalize: str = "unit") -> torch.Tensor:
    """Forward distillation loss, PartDistill Eq. 3, batched over shapes.

    ``L = - 1/|D| sum_n C_n 1/|M_n| sum_{i in M_n} sum_r w_r T_{n,i,r} log S_{i,r}`` with
    S = ``softmax(logits)`` over parts and T the target (see the module docstring).

    Normalisations (``normalize``), with ``l_{n,i} = - sum_r w_r T_{n,i,r} log S_{i,r}``:

    * ``"unit"`` (default, Eq. 3 as the paper writes it): each unit's entries are averaged
      (1/|M_n|), the C_n-weighted unit losses are averaged over the |D| units of the batch.
    * ``"point"`` (the official code, ``model/loss.py`` of ardianumam/PartDistill): each point
      averages ``C_n l_{n,i}`` over the units that cover it, and the result is averaged over all
      B·N points of the batch (points covered by no unit contribute 0 but count).
    * ``"entry"``: every (unit, point) entry weighs the same: ``sum C_n l_{n,i} / E``.

    Args:
        logits: ``float [B, N, R]`` the student's per-point logits.
        units: the batch's units (``unit_shape`` indexes the B shapes, ``point_index`` the N points).
        confidence: ``float [U]`` C_n to use instead of ``units.confidence`` (e.g. re-scored by Eq. 4).
        class_weights: ``float [R]`` w_r (:func:`class_weights`), or None for w = 1.
        target: ``"hard"`` (one-hot of ``argmax Y_n``) or ``"soft"`` (per-point Y).
        normalize: ``"unit"``, ``"point"`` or ``"entry"``.

    Returns:
        A float32 scalar tensor (0, still attached to ``logits``, if the batch has no units).

    Raises:
        ValueError: unknown ``target`` / ``normalize``, mismatched shapes, or a missing ``point_probs``
            for soft targets.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {normalize!r}")
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, N, R], got {tuple(logits.shape)}")
    b, n, r = logits.shape
    conf = (units.confidence if confidence is None else confidence).float()
    if conf.shape != (units.num_units,):
        raise ValueError(f"confidence must be [{units.num_units}], got {tuple(conf.shape)}")
    if units.num_entries == 0:
        return logits.float().sum() * 0.0
    log_s = F.log_softmax(logits.float(), dim=-1)
    entry_log_s = log_s[units.entry_shape, units.point_index]                     # [E, R]
    t = _targets(units, r, target)
    if class_weights is not None:
        t = t * class_weights.to(t)[None, :]
    per_entry = -(t * entry_log_s).sum(-1) * conf[units.entry_unit]               # C_n l_{n,i}, [E]
    if normalize == "entry":
        return per_entry.sum() / units.num_entries
    if normalize == "unit":
        sizes = units.sizes.clamp(min=1).to(per_entry)
        per_unit = torch.zeros(units.num_units, device=logits.device).index_add_(0, units.entry_unit, per_entry)
        return (per_unit / sizes).sum() / units.num_units
    flat = units.entry_shape * n + units.point_index                              # "point"
    sums = torch.zeros(b * n, device=logits.device).index_add_(0, flat, per_entry)
    cover = torch.bincount(flat, minlength=b * n).clamp(min=1).to(sums)
    return (sums / cover).sum() / (b * n)


def hard_target_mass(unit_label: torch.Tensor, sizes: torch.Tensor, num_parts: int, confidence: torch.Tensor,
                     weighted: bool = True) -> torch.Tensor:
    """``float64 [R]`` target mass of hard targets from per-unit data only (no per-entry tensors):
    ``m_r = sum_{n: label_n = r} C_n |M_n|`` (``weighted``) or ``c_r = sum_{n: label_n = r} [C_n > 0] |M_n|``.

    Args:
        unit_label: ``int64 [U]``; sizes: ``int [U]`` |M_n|; confidence: ``float [U]`` C_n.
    """
    conf = confidence.double()
    unit_w = conf if weighted else (conf > 0).double()
    return torch.zeros(num_parts, dtype=torch.float64, device=conf.device).index_add_(
        0, unit_label.to(conf.device), unit_w * sizes.to(conf.device).double())


def target_mass(units: UnitBatch, num_parts: int, confidence: torch.Tensor | None = None,
                target: str = "hard", weighted: bool = True) -> torch.Tensor:
    """``float64 [R]`` how much target each part receives: ``m_r = sum_n C_n sum_{i in M_n} T_{n,i,r}``
    (``weighted``), or the entry count ``c_r = sum_n [C_n > 0] sum_{i in M_n} T_{n,i,r}`` (not weighted).

    For hard targets ``m_r = sum_{n: argmax Y_n = r} C_n |M_n|`` (:func:`hard_target_mass`).
    """
    conf = (units.confidence if confidence is None else confidence).double()
    if target == "hard":
        return hard_target_mass(units.unit_label, units.sizes, num_parts, conf, weighted)
    unit_w = conf if weighted else (conf > 0).double()
    if units.num_entries == 0:
        return torch.zeros(num_parts, dtype=torch.float64, device=conf.device)
    return (_targets(units, num_parts, target).double() * unit_w[units.entry_unit, None]).sum(0)


def class_weights(units: UnitBatch, num_parts: int, mode: str = "partdistill", confidence: torch.Tensor | None = None,
                  target: str = "hard", alpha: float = 1.0, beta: float = 0.9999) -> torch.Tensor | None:
    """Class-balance weights w_r for Eq. 3, computed from the teacher's units.

    Modes (R = ``num_parts``, all parts of the category):

    * ``"partdistill"`` (default): the official code's smoothed inverse frequency
      (``get_class_weight(opt=1)`` in ``util.py`` of ardianumam/PartDistill): with ``c_r`` the
      number of (unit, point) entries with target r among units with C_n > 0,
      ``w_r = clip(1 + log_4(sum_q c_q / (R c_r)), 1, 4)`` (a part with no entry gets 4). The
      official code computes it per batch; here it is computed over the given units (the trainer
      passes the whole training set, so the weights do not depend on the batch or the process).
    * ``"inverse"``: confidence-mass inverse frequency ``w_r = (sum_q m_q / (R m_r))^alpha`` with
      ``m_r = sum_n C_n sum_{i in M_n} T_{n,i,r}`` (:func:`target_mass`); ``w_r = 0`` where
      ``m_r = 0`` (such a part never appears in a target). ``alpha = 1`` is plain inverse frequency
      (a uniform distribution gives w = 1), ``alpha = 0.5`` its square root.
    * ``"effective"``: the effective number of samples of Cui et al., "Class-Balanced Loss Based
      on Effective Number of Samples", CVPR 2019: ``w_r = (1 - beta) / (1 - beta^{c_r})``,
      normalised to ``sum_r w_r = R`` (the official code's ``opt=0``).
    * ``"none"``: returns None (w = 1).

    Args:
        units: the units to count (typically all training units, :func:`collate_units`).
        num_parts: R.
        mode, alpha, beta: see above.
        confidence: ``[U]`` C_n to use instead of ``units.confidence``.
        target: ``"hard"`` or ``"soft"`` (which T to count).

    Returns:
        ``float32 [R]`` on the units' device, or None for ``mode="none"``.

    Raises:
        ValueError: unknown mode.
    """
    if mode not in CLASS_BALANCE:
        raise ValueError(f"class balance mode must be one of {CLASS_BALANCE}, got {mode!r}")
    if mode == "none":
        return None
    return balance_weights(target_mass(units, num_parts, confidence, target, weighted=mode == "inverse"),
                           mode, alpha, beta)


def balance_weights(mass: torch.Tensor, mode: str = "partdistill", alpha: float = 1.0,
                    beta: float = 0.9999) -> torch.Tensor | None:
    """Class-balance weights (see :func:`class_weights`) from per-part totals.

    Args:
        mass: ``float [R]``: the confidence mass m_r for ``mode="inverse"``, the entry counts c_r
            (units with C_n > 0) for ``"partdistill"`` and ``"effective"``.
        mode, alpha, beta: as :func:`class_weights`.

    Returns:
        ``float32 [R]``, or None for ``mode="none"``. All ones if every total is 0.

    Raises:
        ValueError: unknown mode.
    """
    if mode not in CLASS_BALANCE:
        raise ValueError(f"class balance mode must be one of {CLASS_BALANCE}, got {mode!r}")
    if mode == "none":
        return None
    m = mass.double()
    r = m.shape[0]
    if not bool(m.sum() > 0):
        return torch.ones(r, device=m.device)
    if mode == "inverse":
        return torch.where(m > 0, (m.sum() / (r * m.clamp(min=1e-300))) ** alpha, torch.zeros_like(m)).float()
    if mode == "partdistill":
        ratio = m.sum() / (r * m)                                             # inf where c_r = 0
        return torch.clamp(1.0 + torch.log(ratio) / math.log(4.0), 1.0, 4.0).float()
    w = (1.0 - beta) / (1.0 - beta ** m)                                      # "effective"; inf where c_r = 0
    w = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
    return (r * w / w.sum()).float()


def cross_entropy_labelled(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labelled points (the few-shot term).

    Args:
        logits: ``float [K, N, R]``; labels: ``int64 [K, N]``, -1 = unlabelled (ignored).

    Returns:
        A float32 scalar (0 attached to ``logits`` if no point is labelled).
    """
    flat = labels.reshape(-1)
    if not bool((flat >= 0).any()):
        return logits.float().sum() * 0.0
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), flat, ignore_index=-1)
