"""Backward distillation (PartDistill Eq. 4): re-scoring knowledge units with the student, and its trigger.

Once the student has converged on the teacher's knowledge, it is usually right more often than any
single 2D unit, so each unit is re-scored by how much the student agrees with it (§3.4, Eq. 4)::

    C_n  <-  1/|M_n| * sum_{i in M_n} [ argmax_r S_{i,r} == argmax_r Y_{n,r} ]

The new score *replaces* C_n in Eq. 3 (as in the paper, where Eq. 4 defines the unit's new
confidence, and in the official code, ``model/loss.py`` of ardianumam/PartDistill, which weights the
loss by this agreement instead of the box confidence). The student is evaluated in eval mode, without
gradients, on exactly the points it trains on (the dataset's normalised, possibly subsampled points,
without training augmentation); units with no point left after subsampling get NaN (the trainer keeps
their old C_n).

Trigger ("when the loss converges"): :class:`BackwardTrigger` follows the official ``train.py``: after
epoch e (1-based) with epoch losses l_1..l_e, ``m_e = mean(l_{e-window+1..e})`` (fewer terms while
e < window, ``m_0 = 0``) and it fires at the first e >= window with ``|m_e - m_{e-1}| < tau``
(absolute change; ``relative=True`` divides by ``|m_{e-1}|``). It fires once; with ``rescore_every=k``
re-scoring repeats every k epochs after the first firing.

``normalize: part`` (our addition, off by default): :func:`normalize_per_part` rescales each part's
scores by their 90th percentile, so parts the student has not learned yet keep weight.

``min_epoch`` (our addition, not in the paper or the official code; 0 = off) keeps the trigger from
firing before that epoch. Without it, a student whose loss sits on an initial plateau (slow first
epochs, common with a frozen encoder and per-unit normalisation) is declared converged after
``window`` epochs; re-scoring with an untrained student then rewards only the units that agree with
its near-constant prediction and training collapses onto one part (measured: quick chair run, trigger
at epoch 3 of 15, 1.7 % mIoU). ``configs/distill/pre.yaml`` sets it to 10 of 25 epochs.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import mannwhitneyu

from .losses import UnitBatch


def unit_agreement(logits: torch.Tensor, units: UnitBatch) -> torch.Tensor:
    """Eq. 4 for a batch: the fraction of each unit's points where the student's argmax equals the unit label.

    Args:
        logits: ``float [B, N, R]`` the student's logits (or probabilities: only the argmax is used).
        units: the batch's units; ``unit_label`` is ``argmax_r Y_n``.

    Returns:
        ``float32 [U]`` in [0, 1]; NaN for a unit with an empty mask.
    """
    pred = logits.argmax(-1)                                                  # [B, N]
    hit = (pred[units.entry_shape, units.point_index] == units.unit_label[units.entry_unit]).float()
    sums = torch.zeros(units.num_units, device=logits.device).index_add_(0, units.entry_unit, hit)
    sizes = units.sizes.to(sums)
    return torch.where(sizes > 0, sums / sizes.clamp(min=1), torch.full_like(sums, float("nan")))


@torch.no_grad()
def rescore_flat(model: torch.nn.Module, dataset, indices: Sequence[int] | None = None, batch_size: int = 16,
                 device: torch.device | str | None = None, autocast=None) -> torch.Tensor:
    """Eq. 4 scores of the units of ``dataset`` shapes ``indices``, as one table over all of its units.

    Args:
        model: the student, ``points float32 [B, N, 3] -> logits [B, N, R]`` (put in eval mode for
            the call, its previous mode restored afterwards).
        dataset: a :class:`distill.trainer.DistillDataset` (or anything with ``len``, items, a
            ``collate(items)`` giving ``{"points": [B,N,3], "units": UnitBatch}`` with global
            ``unit_id`` and ``num_units_total``).
        indices: the shapes to score (default all).
        batch_size: shapes per forward pass.
        device: where to run (default: the model's device).
        autocast: optional context-manager factory (e.g. ``accelerator.autocast``).

    Returns:
        ``float32 [dataset.num_units_total]`` on the CPU: the score of every unit of the scored
        shapes, NaN elsewhere (other shapes, or units without points).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    scores = torch.full((dataset.num_units_total,), float("nan"))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(indices), batch_size):
            batch = dataset.collate([dataset[i] for i in indices[start:start + batch_size]])
            units = batch["units"].to(device)
            if autocast is not None:
                with autocast():
                    logits = model(batch["points"].to(device))
            else:
                logits = model(batch["points"].to(device))
            scores[units.unit_id.cpu()] = unit_agreement(logits.float(), units).cpu()
    finally:
        model.train(was_training)
    return scores


def normalize_per_part(scores: torch.Tensor, unit_label: torch.Tensor, num_parts: int,
                       quantile: float = 0.9) -> torch.Tensor:
    """Per-part normalisation of Eq. 4 scores (ours; ``backward.normalize: part``; not in the paper).

    Eq. 4 compares every unit with the student's argmax, so when the student has not learned a part
    yet (small parts: airplane engines and tails), *all* of that part's units score near 0 and
    backward distillation removes the part from the loss for good. Dividing each part's scores by
    their ``quantile`` keeps the ranking *within* a part (a unit that disagrees with the student more
    than the part's other units still loses weight) while every part keeps units at full weight::

        C_n  <-  min(1, s_n / q_r),   q_r = quantile({s_m : argmax Y_m = r}),   r = argmax Y_n

    A part whose ``q_r`` is 0 (the student predicts it on almost none of its units' points) cannot
    be judged: its units get NaN, i.e. keep their current confidence (the trainer's rule for NaN).

    Args:
        scores: ``float [U]`` Eq. 4 scores in [0, 1]; NaN entries (no points) stay NaN.
        unit_label: ``int64 [U]`` argmax_r Y_n of each unit.
        num_parts: R.
        quantile: in (0, 1].

    Returns:
        ``float32 [U]`` on the device of ``scores``.

    Raises:
        ValueError: ``quantile`` outside (0, 1] or shapes that differ.
    """
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    if scores.shape != unit_label.shape:
        raise ValueError(f"scores {tuple(scores.shape)} and unit_label {tuple(unit_label.shape)} differ")
    scores = scores.float()
    out = torch.full_like(scores, float("nan"))
    label = unit_label.to(scores.device)
    for r in range(num_parts):
        sel = (label == r) & ~torch.isnan(scores)
        if not sel.any():
            continue
        q = torch.quantile(scores[sel], quantile)
        if q > 0:
            out[sel] = (scores[sel] / q).clamp(max=1.0)
    return out


def rescore(model: torch.nn.Module, dataset, indices: Sequence[int] | None = None, batch_size: int = 16,
            device: torch.device | str | None = None) -> list[np.ndarray]:
    """Backward distillation re-scoring (Eq. 4) per shape.

    Args: see :func:`rescore_flat`.

    Returns:
        One ``float32 [U_s]`` array per shape of ``indices`` (default all), in the order of the
        shape's knowledge units (``dataset.unit_offsets``); NaN for units without points.
    """
    indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    flat = rescore_flat(model, dataset, indices, batch_size, device).numpy()
    off = dataset.unit_offsets
    return [flat[off[i]:off[i + 1]].astype(np.float32) for i in indices]


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``scores`` for telling ``positive`` from the rest: the Mann-Whitney
    U of the positives (``scipy.stats.mannwhitneyu``, ties counted half) over ``n_pos * n_neg``.
    NaN if either class is empty."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float(mannwhitneyu(scores[positive], scores[~positive]).statistic / (n_pos * n_neg))


def score_stats(scores: np.ndarray, corrupted: np.ndarray | None = None, bins: int = 10) -> dict[str, Any]:
    """Summary of unit scores for the log: count, mean, std, quantiles, a histogram on [0, 1] and,
    where corruption flags are known (``corrupted`` 1 / 0, -1 unknown), the ROC AUC of the score for
    telling clean from corrupted units (1 = every clean unit scores above every corrupted one).

    NaN scores are left out.
    """
    scores = np.asarray(scores, np.float64)
    ok = np.isfinite(scores)
    s = scores[ok]
    out: dict[str, Any] = {"count": len(s)}
    if len(s) == 0:
        return out
    q = np.quantile(s, [0.05, 0.25, 0.5, 0.75, 0.95])
    out.update({"mean": float(s.mean()), "std": float(s.std()),
                **{f"q{int(p * 100):02d}": float(v) for p, v in zip([0.05, 0.25, 0.5, 0.75, 0.95], q)},
                "hist": np.histogram(np.clip(s, 0, 1), bins=bins, range=(0, 1))[0].astype(int).tolist()})
    if corrupted is not None:
        c = np.asarray(corrupted)[ok]
        known = c >= 0
        if known.any():
            out["clean_vs_corrupted_auc"] = roc_auc(s[known], c[known] == 0)
            out["corrupted_fraction"] = float((c[known] == 1).mean())
    return out


class BackwardTrigger:
    """When to run backward distillation: the moving average of the epoch loss has converged.

    Args:
        tau: threshold on the change of the moving average (absolute, or relative with ``relative``).
        window: moving-average window in epochs; the trigger cannot fire before epoch ``window``.
        min_epoch: nor before this epoch (warm-up; 0 = no warm-up beyond ``window``).
        relative: compare ``|m_e - m_{e-1}| / |m_{e-1}|`` instead of the absolute change.
        rescore_every: after firing, re-score again every this many epochs (None = once, the paper).

    See the module docstring for the exact rule. State (losses, firing epoch) round-trips through
    :meth:`state_dict` / :meth:`load_state_dict` for resumed runs.
    """

    def __init__(self, tau: float = 0.01, window: int = 3, relative: bool = False, rescore_every: int | None = None,
                 min_epoch: int = 0):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        if tau < 0:
            raise ValueError(f"tau must be >= 0, got {tau}")
        if rescore_every is not None and rescore_every < 1:
            raise ValueError(f"rescore_every must be >= 1 or None, got {rescore_every}")
        if min_epoch < 0:
            raise ValueError(f"min_epoch must be >= 0, got {min_epoch}")
        self.min_epoch = int(min_epoch)
        self.tau, self.window, self.relative, self.rescore_every = float(tau), int(window), bool(relative), rescore_every
        self.losses: list[float] = []
        self.fired_epoch: int | None = None
        self.last_change: float | None = None

    def moving_average(self, upto: int | None = None) -> float:
        """``m_e`` for ``e = upto`` (default: the last epoch); 0 for e = 0."""
        e = len(self.losses) if upto is None else upto
        if e == 0:
            return 0.0
        return float(np.mean(self.losses[max(0, e - self.window):e]))

    def update(self, epoch: int, loss: float) -> bool:
        """Record the mean loss of ``epoch`` (1-based, consecutive) and say whether to re-score now.

        Returns:
            True when the trigger fires at this epoch, or (with ``rescore_every``) a repeat is due.

        Raises:
            ValueError: ``epoch`` is not the next epoch.
        """
        if epoch != len(self.losses) + 1:
            raise ValueError(f"expected epoch {len(self.losses) + 1}, got {epoch}")
        self.losses.append(float(loss))
        m, prev = self.moving_average(epoch), self.moving_average(epoch - 1)
        change = abs(m - prev)
        if self.relative:
            change = change / abs(prev) if prev != 0 else float("inf")
        self.last_change = change
        if self.fired_epoch is None:
            if epoch >= max(self.window, self.min_epoch) and change < self.tau:
                self.fired_epoch = epoch
                return True
            return False
        return bool(self.rescore_every and (epoch - self.fired_epoch) % self.rescore_every == 0)

    @property
    def fired(self) -> bool:
        return self.fired_epoch is not None

    def state_dict(self) -> dict[str, Any]:
        return {"tau": self.tau, "window": self.window, "relative": self.relative, "rescore_every": self.rescore_every,
                "min_epoch": self.min_epoch,
                "losses": list(self.losses), "fired_epoch": self.fired_epoch, "last_change": self.last_change}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.losses = [float(x) for x in state["losses"]]
        self.fired_epoch = state["fired_epoch"]
        self.last_change = state.get("last_change")
