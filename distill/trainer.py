"""PartDistill training on Accelerate: Pre, test-time alignment (TTA) and few-shot (§3.3-3.5).

* **Data** (:class:`DistillDataset`): the collection shapes that have knowledge units (matched by
  the key ``(source, dataset, shape_id)``), unit-sphere normalised, in stored point order (units index
  those points), held in memory with all their units concatenated (one global unit table, so the
  confidences can be replaced by Eq. 4 without touching the data). With ``train.num_points`` < N a
  fixed per-shape subsample (``gen3d.sampling.resample_indices`` seeded by ``(seed, row)``) is used,
  and every unit is restricted to the kept points — the same points for training and re-scoring.
* **Loss**: Eq. 3 (:func:`distill.losses.distill_loss`) with class-balance weights over all training
  units (:func:`distill.losses.class_weights`), recomputed whenever the confidences change.
* **Backward distillation** (``backward.enabled``): :class:`distill.backward.BackwardTrigger` on the
  epoch loss; when it fires, every unit is re-scored (Eq. 4) by the current student in eval mode and
  its C_n replaced (NaN scores keep the old C_n); training continues with the new confidences.
  With ``backward.normalize: part`` (ours) each part's scores are first rescaled by their
  ``backward.part_quantile`` (:func:`distill.backward.normalize_per_part`).
* **Modes** (``mode``): ``pre`` trains one student on all shapes with knowledge (validation shapes
  excepted); ``tta`` (:func:`tta_predict`) fine-tunes the head of a pre-trained student on each shape
  alone and predicts it; ``fewshot`` adds the cross-entropy of K labelled shapes to Eq. 3.
* **Validation**: mIoU on labelled shapes of split ``val.split`` (default ``"val"``) or a
  ``val.fraction`` of the training shapes carved out with a fixed seed; the test split is refused.
  Model selection: the last epoch (``train.select: last``, default) or the best validation mIoU.
* **Accelerate**: ``Accelerator(cpu=not cuda)``, mixed precision on GPU only; the DataLoader is
  prepared by accelerate (each process draws its own batches of ``batch_size`` shapes); losses are
  gathered; re-scoring and validation are split across processes and reduced. ``torchrun
  --nproc_per_node 2`` / ``accelerate launch --num_processes 2`` run on CPU with gloo.
* **Determinism / resume**: the shuffling, augmentation and torch RNG are seeded by
  ``(seed, epoch[, step], process)``; a checkpoint per epoch (``checkpoints/epoch-XXX``, temporary
  name then rename, the last ``keep_checkpoints`` kept) holds the accelerate state, the current
  confidences and the trigger state, so ``resume=True`` continues with exactly the log an
  uninterrupted run writes (up to ``seconds``).
* **Output folder**: ``config.yaml``, ``log.jsonl`` (per epoch: epoch, loss, lr, trigger epoch, unit
  score statistics when re-scored, mean confidence, val mIoU, seconds), ``checkpoints/``, ``model/``
  (``save_pretrained`` + ``partdistill.json``: class, category, part names), ``best/`` (with
  ``select: best_val``), ``run.json`` (config, data, teacher, timings, results) and
  ``confidences.npz`` (per training shape: keys ``[S,3]``, ``unit_offsets [S+1]``, ``unit_index``
  into the knowledge file's units of the shape, ``initial`` / ``final`` C_n, ``corrupted``). TTA writes
  ``tta/`` per-shape results (resumable), ``predictions.h5`` (:mod:`distill.predict`) and ``run.json``.
"""
from __future__ import annotations

import copy
import importlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch.utils.data import DataLoader, Dataset, Sampler

from gen3d.collection import Collection
from gen3d.config import read_yaml_config
from gen3d.dataset import normalize_unit_sphere
from gen3d.runs import resume_checkpoint, save_checkpoint, truncate_log, warmup_cosine

from .backward import BackwardTrigger, normalize_per_part, rescore_flat, score_stats
from .knowledge import KnowledgeUnits
from .losses import (
    UnitBatch,
    balance_weights,
    class_weights,
    collate_units,
    cross_entropy_labelled,
    distill_loss,
    hard_target_mass,
)

MODES = ("pre", "tta", "fewshot")
DEFAULTS: dict[str, dict[str, Any]] = {
    "model": {"config": None, "class": None, "kwargs": {}, "encoder": None, "freeze_encoder": False},
    "train": {"epochs": 25, "batch_size": 16, "lr": 1e-3, "weight_decay": 0.0, "lr_schedule": "constant",
              "min_lr_ratio": 0.01, "seed": 0, "mixed_precision": "bf16", "num_points": None, "sampling": "fps",
              "augment": None, "grad_clip": None, "keep_checkpoints": 2, "num_workers": 0, "select": "last"},
    "loss": {"target": "hard", "normalize": "unit", "class_balance": "partdistill", "alpha": 1.0, "beta": 0.9999},
    "backward": {"enabled": True, "tau": 0.01, "window": 3, "relative": False, "rescore_every": None, "min_epoch": 0,
                 "normalize": "none", "part_quantile": 0.9},
    "val": {"split": "val", "fraction": 0.0, "seed": 0, "every": 1, "batch_size": 16},
    "fewshot": {"keys": None, "collection": None, "count": 0, "weight": 1.0, "batch_size": 16, "split": "train",
                "seed": 0},
    "tta": {"init": None, "steps": 50, "lr": 1e-3, "batch_size": 16},
}
AUGMENT_DEFAULTS = {"scale": [0.9, 1.1], "translate": 0.1, "jitter_sigma": 0.01, "jitter_clip": 0.02}


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------
def resolve_config(config: dict[str, Any]) -> dict[str, Any]:
    """Fill in :data:`DEFAULTS` and check a config dict (as read from ``configs/distill/*.yaml``).

    Top-level keys: ``description``, ``mode`` (``pre`` | ``tta`` | ``fewshot``) and the sections of
    :data:`DEFAULTS`. ``train.augment`` is null (none) or a dict with keys of :data:`AUGMENT_DEFAULTS`
    (the official code's scale / translate / jitter).

    Raises:
        ValueError: unknown keys or values.
    """
    unknown = set(config) - set(DEFAULTS) - {"description", "mode"}
    if unknown:
        raise ValueError(f"unknown config keys {sorted(unknown)} (known: {sorted(DEFAULTS)} + description, mode)")
    out: dict[str, Any] = {"description": config.get("description", ""), "mode": config.get("mode", "pre")}
    for section, defaults in DEFAULTS.items():
        given = config.get(section) or {}
        bad = set(given) - set(defaults)
        if bad:
            raise ValueError(f"unknown {section} keys {sorted(bad)} (known: {sorted(defaults)})")
        out[section] = {**copy.deepcopy(defaults), **copy.deepcopy(given)}
    if out["mode"] not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {out['mode']!r}")
    aug = out["train"]["augment"]
    if aug:
        bad = set(aug) - set(AUGMENT_DEFAULTS)
        if bad:
            raise ValueError(f"unknown train.augment keys {sorted(bad)} (known: {sorted(AUGMENT_DEFAULTS)})")
        out["train"]["augment"] = {**AUGMENT_DEFAULTS, **aug}
    if out["train"]["select"] not in ("last", "best_val"):
        raise ValueError(f"train.select must be 'last' or 'best_val', got {out['train']['select']!r}")
    if out["train"]["lr_schedule"] not in ("constant", "cosine"):
        raise ValueError(f"train.lr_schedule must be 'constant' or 'cosine', got {out['train']['lr_schedule']!r}")
    if out["backward"]["normalize"] not in ("none", "part"):
        raise ValueError(f"backward.normalize must be 'none' or 'part', got {out['backward']['normalize']!r}")
    if out["val"]["split"] == "test":
        raise ValueError("validation on the test split is not allowed (val.split: test); use 'val' or val.fraction")
    return out


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``configs/distill/*.yaml`` file and fill in defaults (:func:`resolve_config`).

    Raises:
        FileNotFoundError; ValueError for invalid YAML or unknown keys.
    """
    path = Path(path)
    cfg = read_yaml_config(path)
    try:
        return resolve_config(cfg)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc


load_distill_config = load_config  # the name `distill train` (distill/cli.py) imports


def _import(spec: str):
    module, _, name = spec.partition(":")
    if not name:
        raise ValueError(f"model class must be 'module:Name', got {spec!r}")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def class_path(model: torch.nn.Module) -> str:
    """``"module:QualName"`` of a model's class (stored with the weights so it can be loaded again)."""
    cls = type(model)
    return f"{cls.__module__}:{cls.__qualname__}"


def build_model(config: dict[str, Any], num_parts: int) -> torch.nn.Module:
    """Build the student from ``config["model"]``.

    * ``model.class: "module:Name"`` (+ ``model.kwargs``): ``Name(num_parts=R, **kwargs)`` — any
      ``ModelMixin`` mapping ``points float32 [B,N,3]`` to ``logits [B,N,R]`` (tests use a tiny MLP).
    * otherwise the Point-M2AE student (:mod:`distill.student`, imported here, lazily):
      ``Student(num_parts=R, **load_student_config(model.config)["model"], **model.kwargs)``
      (``configs/distill/student_*.yaml``; paper sizes without a config); then, if given,
      ``model.load_encoder(model.encoder)`` (pre-trained Point-M2AE weights).

    ``model.freeze_encoder`` is applied by the trainer (:func:`freeze_encoder`).

    Raises:
        ValueError: a bad class spec; ImportError if the student module is missing.
    """
    mc = config.get("model", {}) or {}
    kwargs = dict(mc.get("kwargs") or {})
    if mc.get("class"):
        model = _import(mc["class"])(num_parts=num_parts, **kwargs)
    else:
        from .student import (  # lazy: tests inject a stand-in model
            Student,
            load_student_config,
        )

        student_cfg = load_student_config(mc["config"])["model"] if mc.get("config") else {}
        model = Student(num_parts=num_parts, **{**student_cfg, **kwargs})
    if mc.get("encoder"):
        if not hasattr(model, "load_encoder"):
            raise ValueError(f"{type(model).__name__} has no load_encoder() for model.encoder={mc['encoder']!r}")
        model.load_encoder(mc["encoder"])
    return model


def freeze_encoder(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Freeze ``model.encoder`` (no gradients, eval mode) and return the parameters left to train.

    Uses ``model.set_encoder_frozen(True)`` where the model has it (:class:`distill.student.Student`,
    whose ``train()`` then keeps the encoder in eval mode).

    Raises:
        ValueError: the model has no ``encoder`` submodule.
    """
    if hasattr(model, "set_encoder_frozen"):
        model.set_encoder_frozen(True)
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, torch.nn.Module):
        raise ValueError(f"{type(model).__name__} has no `encoder` submodule to freeze")  # noqa: TRY004
    for p in encoder.parameters():
        p.requires_grad_(False)
    encoder.eval()
    return [p for p in model.parameters() if p.requires_grad]


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def collection_keys(c: Collection) -> list[tuple[str, str, str]]:
    """The key ``(source, dataset, shape_id)`` of every row of an open collection, in row order."""
    return [(str(c.sources[i]), str(c.provenance(i).get("dataset", "")), str(c.shape_ids[i])) for i in range(len(c))]


def _open_knowledge(knowledge):
    """``(knowledge object, opened here)``: a path is opened as a :class:`distill.knowledge.KnowledgeFile`."""
    if isinstance(knowledge, (str, os.PathLike)):
        from .knowledge import KnowledgeFile

        return KnowledgeFile(knowledge), True
    return knowledge, False


def restrict_units(units: KnowledgeUnits, keep: np.ndarray, num_points: int) -> tuple[KnowledgeUnits, np.ndarray]:
    """Restrict a shape's units to the points ``keep`` (indices into its N points), renumbered 0..k-1.

    Entries whose point is not kept are dropped; units left with no entry are dropped.

    Returns:
        ``(units on the kept points, kept unit indices int64 [U'])``.
    """
    new_of_old = np.full(num_points, -1, np.int64)
    new_of_old[np.asarray(keep, np.int64)] = np.arange(len(keep))
    pi = new_of_old[np.asarray(units.point_index, np.int64)]
    ok = pi >= 0
    unit_of_entry = np.repeat(np.arange(units.num_units), np.diff(units.offsets))[ok]
    sizes = np.bincount(unit_of_entry, minlength=units.num_units)
    kept = np.flatnonzero(sizes > 0)
    out = KnowledgeUnits(
        offsets=np.concatenate([[0], np.cumsum(sizes[kept])]).astype(np.int64), point_index=pi[ok],
        point_probs=np.asarray(units.point_probs)[ok], unit_probs=np.asarray(units.unit_probs)[kept],
        confidence=np.asarray(units.confidence)[kept], view=np.asarray(units.view)[kept],
        teacher=np.asarray(units.teacher)[kept], corrupted=np.asarray(units.corrupted)[kept])
    return out, kept


def _compact(units: KnowledgeUnits, keep_probs: bool, num_points: int) -> KnowledgeUnits:
    """The units with small in-memory dtypes: ``point_index`` int16 / int32 and, unless
    ``keep_probs``, ``point_probs`` as a zero-copy broadcast of zeros (only soft targets read them)."""
    r = np.asarray(units.unit_probs).shape[1]
    e = len(units.point_index)
    probs = (np.asarray(units.point_probs, np.float32) if keep_probs
             else np.broadcast_to(np.zeros((1, r), np.float32), (e, r)))
    return KnowledgeUnits(offsets=np.asarray(units.offsets, np.int64),
                          point_index=np.asarray(units.point_index, np.int16 if num_points < 2**15 else np.int32),
                          point_probs=probs, unit_probs=np.asarray(units.unit_probs, np.float32),
                          confidence=np.asarray(units.confidence, np.float32), view=np.asarray(units.view),
                          teacher=np.asarray(units.teacher), corrupted=np.asarray(units.corrupted, np.int8))


class EpochSampler(Sampler):
    """A permutation of ``range(n)`` seeded by ``(seed, epoch)`` (set with :meth:`set_epoch`)."""

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator().manual_seed(_derive_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def _derive_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class DistillDataset(Dataset):
    """The collection shapes that have knowledge, with their units, in memory.

    Args:
        collection: the collection ``.h5``.
        knowledge: a knowledge file path or an object with ``len``, ``keys()`` (list of
            ``(source, dataset, shape_id)``) and ``units(i) -> KnowledgeUnits``.
        keys: restrict to these keys (default: every collection shape with knowledge).
        num_points: points per shape (default the stored N, in stored order); fewer = a fixed
            subsample per shape, units restricted to it (:func:`restrict_units`).
        sampling: ``"fps"`` or ``"random"`` for the subsample.
        seed: seed of the subsample.
        point_probs: keep the per-entry teacher probabilities (needed for soft targets).

    Attributes:
        rows ``int64 [S]`` collection rows; keys; splits; ``points float32 [S,n,3]`` (unit sphere);
        ``labels int16 [S,n]``; ``unit_offsets int64 [S+1]`` (shape i owns global units
        ``unit_offsets[i]:unit_offsets[i+1]``); ``confidence float32 [U]``, ``corrupted int8 [U]``,
        ``unit_label int64 [U]`` (argmax Y_n) over all units; ``unit_source_index int64 [U]`` (each
        unit's index among its shape's units in the knowledge file); ``num_units_total``; ``num_parts``.

    Items: dicts ``points float32 [n,3]``, ``labels int64 [n]``, ``index`` (int), ``units``
    (:class:`KnowledgeUnits` of the shape, restricted; held with ``point_index`` int16/int32 and,
    without ``point_probs``, zero per-entry probabilities, to keep memory small), ``unit_ids
    int64 [U_i]`` (global). Batch them with :meth:`collate`.

    Raises:
        ValueError: no collection shape has knowledge, or units index points out of range.
    """

    def __init__(self, collection: str | os.PathLike, knowledge, keys: Sequence[tuple] | None = None,
                 num_points: int | None = None, sampling: str = "fps", seed: int = 0, point_probs: bool = False):
        self.collection_path = Path(collection)
        knowledge, opened = _open_knowledge(knowledge)
        try:
            self._load(knowledge, keys, num_points, sampling, seed, point_probs)
        finally:
            if opened:
                knowledge.close()

    def _load(self, knowledge, keys, num_points, sampling, seed, point_probs) -> None:
        kkeys = [tuple(map(str, k)) for k in list(knowledge.keys())]
        kindex = {k: i for i, k in enumerate(kkeys)}
        wanted = None if keys is None else {tuple(map(str, k)) for k in keys}
        self.point_probs = point_probs
        with Collection(self.collection_path) as c:
            ckeys = collection_keys(c)
            rows = [r for r, k in enumerate(ckeys) if k in kindex and (wanted is None or k in wanted)]
            if not rows:
                raise ValueError(f"{self.collection_path}: no shape has knowledge units "
                                 f"({len(kkeys)} knowledge keys, e.g. {kkeys[:2]}; collection keys e.g. {ckeys[:2]})")
            self.rows = np.asarray(rows, np.int64)
            self.keys = [ckeys[r] for r in rows]
            self.splits = [str(c.splits[r]) for r in rows]
            self.categories = [str(c.categories[r]) for r in rows]
            n_stored = c.num_points
            n = num_points or n_stored
            if n > n_stored:
                raise ValueError(f"num_points={n} exceeds the stored N={n_stored}")
            pts, labs, per_shape, kept_units = [], [], [], []
            for r, key in zip(rows, self.keys):
                p = c.points(r)
                lab = c.labels(r)
                u = knowledge.units(kindex[key])
                if u.num_units and (np.min(u.point_index) < 0 or np.max(u.point_index) >= n_stored):
                    raise ValueError(f"{key}: unit point indices out of range [0, {n_stored})")
                if n < n_stored:
                    from gen3d.sampling import resample_indices

                    keep = resample_indices(p, n, sampling, _derive_seed(seed, r))
                    p, lab = p[keep], lab[keep]
                    u, kept = restrict_units(u, keep, n_stored)
                else:
                    kept = np.arange(u.num_units, dtype=np.int64)
                kept_units.append(kept)
                pts.append(normalize_unit_sphere(p)[0])
                labs.append(lab)
                per_shape.append(_compact(u, point_probs, n))
        self.num_points = n
        self.points = np.stack(pts).astype(np.float32)
        self.labels = np.stack(labs).astype(np.int16)
        self.part_names = tuple(getattr(knowledge, "part_names", ()) or ())
        self.category = getattr(knowledge, "category", None) or (self.categories[0] if len(set(self.categories)) == 1 else None)
        self.teachers = list(getattr(knowledge, "teachers", []) or [])
        self.simulated = bool(getattr(knowledge, "simulated", False))
        parts = {u.num_parts for u in per_shape if u.num_units}
        if len(parts) > 1:
            raise ValueError(f"knowledge units have different numbers of parts {sorted(parts)}")
        self.num_parts = len(self.part_names) or (parts.pop() if parts else 0)
        counts = np.array([u.num_units for u in per_shape], np.int64)
        self.unit_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.units = per_shape
        cat = lambda name, dt: (np.concatenate([np.asarray(getattr(u, name), dt) for u in per_shape])
                                if per_shape else np.zeros(0, dt))
        self.confidence = cat("confidence", np.float32)
        self.corrupted = cat("corrupted", np.int8)
        self.teacher = cat("teacher", np.int16)
        self.unit_label = np.concatenate([np.asarray(u.unit_probs).reshape(-1, max(self.num_parts, 1)).argmax(1)
                                          for u in per_shape]).astype(np.int64)
        self.unit_size = np.concatenate([np.diff(np.asarray(u.offsets, np.int64)) for u in per_shape])
        self.unit_source_index = np.concatenate(kept_units).astype(np.int64)
        self.num_units_total = int(self.unit_offsets[-1])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"points": torch.from_numpy(self.points[i]), "labels": torch.from_numpy(self.labels[i].astype(np.int64)),
                "index": int(i), "units": self.units[i],
                "unit_ids": np.arange(self.unit_offsets[i], self.unit_offsets[i + 1], dtype=np.int64)}

    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        """Batch items: ``points [B,n,3]``, ``labels [B,n]``, ``index [B]``, ``units`` (:class:`UnitBatch`)."""
        return {"points": torch.stack([it["points"] for it in items]),
                "labels": torch.stack([it["labels"] for it in items]),
                "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
                "units": collate_units([it["units"] for it in items], [it["unit_ids"] for it in items],
                                       point_probs=self.point_probs)}

    def all_units(self, indices: Sequence[int] | None = None) -> UnitBatch:
        """One :class:`UnitBatch` of the units of ``indices`` (default all shapes), for class weights."""
        indices = range(len(self)) if indices is None else indices
        items = [self[i] for i in indices]
        return collate_units([it["units"] for it in items], [it["unit_ids"] for it in items], point_probs=self.point_probs)


def load_labelled(collection: str | os.PathLike, rows: Sequence[int], num_points: int | None = None,
                  sampling: str = "fps", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-sphere points ``float32 [K,n,3]`` and labels ``int64 [K,n]`` of collection ``rows``."""
    pts, labs = [], []
    with Collection(collection) as c:
        for r in rows:
            p, lab = c.points(int(r)), c.labels(int(r))
            if num_points and num_points < len(p):
                from gen3d.sampling import resample_indices

                keep = resample_indices(p, num_points, sampling, _derive_seed(seed, int(r)))
                p, lab = p[keep], lab[keep]
            elif num_points and num_points > len(p):
                raise ValueError(f"{collection}: row {r} has {len(p)} points < num_points={num_points}")
            pts.append(normalize_unit_sphere(p)[0])
            labs.append(lab.astype(np.int64))
    if not pts:
        return torch.zeros(0, num_points or 0, 3), torch.zeros(0, num_points or 0, dtype=torch.long)
    return torch.from_numpy(np.stack(pts)), torch.from_numpy(np.stack(labs))


# ----------------------------------------------------------------------------------------------
# Metrics and helpers
# ----------------------------------------------------------------------------------------------
def shape_miou(pred: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, num_parts: int) -> np.ndarray:
    """Per-shape mean part IoU (ShapeNetPart convention, as PointCLIPv2 / the official code).

    For every shape and part r: ``IoU_r = |pred=r ∧ gt=r| / |pred=r ∨ gt=r|`` over labelled points
    (gt >= 0), and 1 where the union is empty; the shape's mIoU is the mean over the R parts.

    Args:
        pred, labels: ``int [S, N]`` (labels -1 = unlabelled, ignored).

    Returns:
        ``float64 [S]`` in [0, 1].
    """
    pred = torch.as_tensor(pred).long().cpu()
    labels = torch.as_tensor(labels).long().cpu()
    s = pred.shape[0]
    m = labels >= 0
    shape = torch.arange(s)[:, None].expand_as(pred)
    base = (shape * num_parts)[m]
    p, g = pred[m].clamp(0, num_parts - 1), labels[m]
    size = s * num_parts
    inter = torch.bincount((base + g)[p == g], minlength=size)
    union = torch.bincount(base + p, minlength=size) + torch.bincount(base + g, minlength=size) - inter
    iou = torch.where(union > 0, inter.double() / union.clamp(min=1).double(), torch.ones(size, dtype=torch.float64))
    return iou.reshape(s, num_parts).mean(1).numpy()


def augment_points(points: torch.Tensor, generator: torch.Generator, scale=(0.9, 1.1), translate: float = 0.1,
                   jitter_sigma: float = 0.01, jitter_clip: float = 0.02) -> torch.Tensor:
    """The official code's training augmentation (``augment_cloud``): per-shape, per-axis scale
    ``U(scale)``, translation ``U(-translate, translate)`` and clipped Gaussian jitter.

    Args:
        points: ``float [B, N, 3]``; generator: CPU generator (draws are made on the CPU).

    Returns:
        ``float [B, N, 3]`` on the points' device.
    """
    b, n, _ = points.shape
    lo, hi = scale
    s = lo + (hi - lo) * torch.rand(b, 1, 3, generator=generator)
    t = (2 * torch.rand(b, 1, 3, generator=generator) - 1) * translate
    j = (torch.randn(b, n, 3, generator=generator) * jitter_sigma).clamp(-jitter_clip, jitter_clip)
    return points * s.to(points) + t.to(points) + j.to(points)


def _lr_at(tc: dict, epoch: int) -> float:
    """Learning rate of (1-based) ``epoch``: constant, or cosine from lr to lr * min_lr_ratio."""
    if tc["lr_schedule"] == "constant":
        return float(tc["lr"])
    return float(tc["lr"] * warmup_cosine(epoch - 1, max(int(tc["epochs"]), 1), 0, tc["min_lr_ratio"]))


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_model(model: torch.nn.Module, dest: Path, meta: dict[str, Any]) -> Path:
    """``save_pretrained`` a model to ``dest`` (temporary name, then rename) with ``partdistill.json``
    (``class``, category, part names, ...) so :func:`distill.predict.load_model` can rebuild it."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    (tmp / "partdistill.json").write_text(json.dumps({"class": class_path(model), **meta}, indent=2,
                                                     default=_json_default))
    old = dest.with_name(f".{dest.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if dest.exists():
        os.replace(dest, old)
    os.replace(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest


def _sharded_sum(accelerator, values: torch.Tensor, have: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum per-process partial results (disjoint shards) over processes."""
    if accelerator.num_processes == 1:
        return values, have
    dev = accelerator.device
    v = accelerator.reduce(values.to(dev).double(), "sum").cpu()
    h = accelerator.reduce(have.to(dev).double(), "sum").cpu() > 0
    return v.to(values.dtype), h


@torch.no_grad()
def _predict_labels(model: torch.nn.Module, points: torch.Tensor, batch_size: int, device, autocast=None) -> torch.Tensor:
    was = model.training
    model.eval()
    out = []
    try:
        for s in range(0, len(points), batch_size):
            x = points[s:s + batch_size].to(device)
            if autocast is not None:
                with autocast():
                    logits = model(x)
            else:
                logits = model(x)
            out.append(logits.float().argmax(-1).cpu())
    finally:
        model.train(was)
    return torch.cat(out) if out else torch.zeros(0, points.shape[1], dtype=torch.long)


def _labelled_rows(c: Collection) -> set[int]:
    """Rows of an open collection with at least one labelled point."""
    return {r for r in range(len(c)) if bool((c.labels(r) >= 0).any())}


def _select_shapes(dataset_keys: list, coll: Collection, category: str | None, vc: dict,
                   labelled_rows: set[int], row_of_key: dict) -> tuple[list[int], str]:
    """Validation collection rows and how they were chosen."""
    if vc["split"]:
        cats = [category] if category and category in coll.part_names else None
        rows = [int(r) for r in coll.select(category=cats, split=vc["split"]) if int(r) in labelled_rows]
        if rows:
            return rows, f"split {vc['split']!r}"
    if vc["fraction"] and vc["fraction"] > 0:
        cand = [row_of_key[k] for k in dataset_keys if row_of_key[k] in labelled_rows]
        if cand:
            k = max(1, round(vc["fraction"] * len(cand)))
            pick = np.random.default_rng(vc["seed"]).permutation(len(cand))[:k]
            return sorted(cand[i] for i in pick), f"fraction {vc['fraction']} of the training shapes (seed {vc['seed']})"
    return [], "none"


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def train_distill(collection: str | os.PathLike, knowledge, config: dict[str, Any], out: str | os.PathLike,
                  resume: bool = False, progress: bool = True, max_epochs: int | None = None,
                  model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Train a PartDistill student (``mode`` pre / fewshot) or run test-time alignment (``mode`` tta).

    Args:
        collection: the collection ``.h5`` holding the shapes (and validation / few-shot shapes).
        knowledge: a knowledge file path, or an object with ``len``, ``keys()``, ``units(i)`` (and
            optionally ``category``, ``part_names``, ``teachers``, ``simulated``).
        config: a config dict (``configs/distill/*.yaml``; defaults filled by :func:`resolve_config`).
        out: output folder (see the module docstring).
        resume: continue from the latest checkpoint in ``out``.
        progress: show a progress bar.
        max_epochs: stop after this epoch (the run can be resumed to the configured epochs).
        model: the student to train (default :func:`build_model`); with ``tta`` the pre-trained student
            (default: loaded from ``tta.init``).

    Returns:
        The content of ``out/run.json``.

    Raises:
        FileExistsError: ``out`` holds a run and ``resume`` is False.
        ValueError: bad config, no shape with knowledge, few-shot keys that are validation shapes, ...
    """
    config = resolve_config(config)
    if config["mode"] == "tta":
        return _run_tta(collection, knowledge, config, Path(out), resume, progress, model)
    return _train(collection, knowledge, config, Path(out), resume, progress, max_epochs, model)


def _train(collection, knowledge, config, out: Path, resume, progress, max_epochs, model) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm import tqdm

    tc, lc, bc, vc, fc = (config[k] for k in ("train", "loss", "backward", "val", "fewshot"))
    if (out / "log.jsonl").exists() and not resume:
        raise FileExistsError(f"{out}: holds a training run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=tc["mixed_precision"] if cuda else "no", cpu=not cuda)
    t_setup = time.perf_counter()

    # -- shapes: knowledge shapes minus validation shapes ----------------------------------------
    kobj, opened = _open_knowledge(knowledge)
    try:
        kkeys = {tuple(map(str, k)) for k in list(kobj.keys())}
        with Collection(collection) as c:
            ckeys = collection_keys(c)
            row_of_key = {k: r for r, k in enumerate(ckeys)}
            matched = [k for k in ckeys if k in kkeys]
            if not matched:
                raise ValueError(f"{collection}: no shape has knowledge units ({len(kkeys)} knowledge keys)")
            cats = {str(c.categories[row_of_key[k]]) for k in matched}
            category = getattr(kobj, "category", None) or (cats.pop() if len(cats) == 1 else None)
            labelled = _labelled_rows(c)
            val_rows, val_how = _select_shapes(matched, c, category, vc, labelled, row_of_key)
            if any(str(c.splits[r]) == "test" for r in val_rows):
                raise ValueError("validation shapes must not come from the test split")
            fs_rows: list[int] = []
            if config["mode"] == "fewshot":
                fs_rows = _fewshot_rows(config, c, ckeys, category, labelled, set(val_rows), collection)
        val_keys = {ckeys[r] for r in val_rows}
        train_keys = [k for k in matched if k not in val_keys]
        if not train_keys:
            raise ValueError("every shape with knowledge is a validation shape: nothing left to train on")
        dataset = DistillDataset(collection, kobj, keys=train_keys, num_points=tc["num_points"],
                                 sampling=tc["sampling"], seed=tc["seed"], point_probs=lc["target"] == "soft")
    finally:
        if opened:
            kobj.close()
    num_parts = dataset.num_parts
    val_points, val_labels = load_labelled(collection, val_rows, dataset.num_points, tc["sampling"], tc["seed"])
    fs_collection = fc["collection"] or collection
    fs_points, fs_labels = load_labelled(fs_collection, fs_rows, dataset.num_points, tc["sampling"], tc["seed"])

    # -- model, optimiser, loader ---------------------------------------------------------------
    set_seed(tc["seed"])
    if model is None:
        model = build_model(config, num_parts)
    frozen = bool(config["model"]["freeze_encoder"])
    if frozen:
        freeze_encoder(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=tc["lr"], weight_decay=tc["weight_decay"])
    sampler = EpochSampler(len(dataset), tc["seed"])
    loader = DataLoader(dataset, batch_size=tc["batch_size"], sampler=sampler, collate_fn=dataset.collate,
                        num_workers=tc["num_workers"], drop_last=False)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    unwrapped = accelerator.unwrap_model(model)
    device = accelerator.device
    conf = torch.from_numpy(dataset.confidence.copy()).to(device)
    # class-balance totals over all training units: per-unit tensors for hard targets, per-entry
    # (on the CPU, E can be large) only for soft targets
    soft_units = dataset.all_units() if lc["target"] == "soft" else None
    unit_label = torch.from_numpy(dataset.unit_label).to(device)
    unit_size = torch.from_numpy(dataset.unit_size).to(device)

    def weights():
        mode = lc["class_balance"]
        if mode == "none":
            return None
        if soft_units is not None:
            return class_weights(soft_units, num_parts, mode, conf.cpu(), "soft", lc["alpha"], lc["beta"]).to(device)
        mass = hard_target_mass(unit_label, unit_size, num_parts, conf, weighted=mode == "inverse")
        return balance_weights(mass, mode, lc["alpha"], lc["beta"])

    trigger = BackwardTrigger(bc["tau"], bc["window"], bc["relative"], bc["rescore_every"], bc["min_epoch"])
    epoch, wall, best = 0, 0.0, {"val_miou": None, "epoch": None}
    ckpt, meta = resume_checkpoint(accelerator, out, "epoch") if resume else (None, {})
    if ckpt is not None:
        epoch, wall, best = meta["epoch"], meta["wall_seconds"], meta["best"]
        trigger.load_state_dict(meta["trigger"])
        conf = torch.from_numpy(np.load(ckpt / "confidence.npy")).to(device)
    if resume and accelerator.is_main_process:
        truncate_log(out / "log.jsonl", "epoch", epoch)  # epoch 0 without a checkpoint: the log starts again
    accelerator.wait_for_everyone()
    cw = weights()
    if accelerator.is_main_process:
        _atomic_write_text(out / "config.yaml", yaml.safe_dump({**config, "collection": str(collection)}, sort_keys=False))
    total = min(tc["epochs"], max_epochs) if max_epochs is not None else tc["epochs"]
    pidx, nproc = accelerator.process_index, accelerator.num_processes
    setup_seconds = time.perf_counter() - t_setup
    bar = tqdm(total=total, initial=epoch, desc=f"distill {config['mode']}",
               disable=not (progress and accelerator.is_main_process))
    t0 = time.perf_counter()
    epoch_seconds: list[float] = []
    last: dict[str, Any] = {}
    while epoch < total:
        epoch += 1
        te = time.perf_counter()
        lr = _lr_at(tc, epoch)
        for g in optimizer.param_groups:
            g["lr"] = lr
        loader.set_epoch(epoch)
        torch.manual_seed(_derive_seed(tc["seed"], epoch, pidx))
        model.train()
        if frozen:
            unwrapped.encoder.eval()  # BatchNorm statistics / stochastic depth of a frozen encoder stay fixed
        losses, fs_losses = [], []
        for step, batch in enumerate(loader):
            g = torch.Generator().manual_seed(_derive_seed(tc["seed"], epoch, step, pidx))
            points, units = batch["points"], batch["units"]
            b = points.shape[0]
            if len(fs_points):
                k = min(len(fs_points), fc["batch_size"])
                pick = torch.randperm(len(fs_points), generator=g)[:k]
                points = torch.cat([points, fs_points[pick].to(device)])
                fs_lab = fs_labels[pick].to(device)
            if tc["augment"]:
                points = augment_points(points, g, **tc["augment"])
            with accelerator.autocast():
                logits = model(points)
            loss = distill_loss(logits[:b], units, conf[units.unit_id], cw, lc["target"], lc["normalize"])
            if len(fs_points):
                fs_loss = cross_entropy_labelled(logits[b:], fs_lab)
                loss = loss + fc["weight"] * fs_loss
                fs_losses.append(accelerator.gather(fs_loss.detach()[None]).mean().item())
            accelerator.backward(loss)
            if tc["grad_clip"]:
                accelerator.clip_grad_norm_(params, tc["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(accelerator.gather(loss.detach()[None]).mean().item())
        epoch_loss = float(np.mean(losses)) if losses else float("nan")
        entry: dict[str, Any] = {"epoch": epoch, "loss": epoch_loss, "lr": lr}
        if fs_losses:
            entry["fewshot_loss"] = float(np.mean(fs_losses))
        if bc["enabled"]:
            fire = trigger.update(epoch, epoch_loss)
            entry["loss_change"] = trigger.last_change
            if fire:
                scores = _rescore_distributed(accelerator, unwrapped, dataset, tc["batch_size"])
                if bc["normalize"] == "part":
                    entry["unit_scores_eq4"] = score_stats(scores.numpy(), dataset.corrupted)
                    scores = normalize_per_part(scores, torch.from_numpy(dataset.unit_label), num_parts,
                                                bc["part_quantile"])
                entry["unit_scores"] = score_stats(scores.numpy(), dataset.corrupted)
                entry["confidence_before"] = score_stats(conf.cpu().numpy(), dataset.corrupted)
                conf = torch.where(torch.isnan(scores.to(device)), conf, scores.to(device).float())
                cw = weights()
            entry["trigger_epoch"] = trigger.fired_epoch
            entry["rescored"] = bool(fire)
        else:
            entry["trigger_epoch"], entry["rescored"] = None, False
        entry["confidence_mean"] = float(conf.mean().item()) if len(conf) else None
        if cw is not None:
            entry["class_weights"] = [round(float(w), 6) for w in cw.cpu()]
        if len(val_points) and (epoch % vc["every"] == 0 or epoch == total):
            miou = _val_miou(accelerator, unwrapped, val_points, val_labels, num_parts, vc["batch_size"])
            entry["val_miou"] = miou
            if best["val_miou"] is None or miou > best["val_miou"]:
                best = {"val_miou": miou, "epoch": epoch}
                if tc["select"] == "best_val" and accelerator.is_main_process:
                    write_model(unwrapped, out / "best", _model_meta(dataset, config, epoch))
        else:
            entry["val_miou"] = None
        epoch_seconds.append(time.perf_counter() - te)
        entry["seconds"] = round(wall + time.perf_counter() - t0, 3)
        if accelerator.is_main_process:
            with open(out / "log.jsonl", "a") as fh:
                fh.write(json.dumps(entry, default=_json_default) + "\n")
        _checkpoint(accelerator, out, epoch, wall + time.perf_counter() - t0, trigger, conf, best, tc["keep_checkpoints"])
        last = entry
        bar.update(1)
        bar.set_postfix(loss=f"{epoch_loss:.4f}")
    bar.close()
    wall_total = wall + time.perf_counter() - t0
    info = {
        "mode": config["mode"], "epochs_done": epoch, "epochs": tc["epochs"], "final": last,
        "trigger_epoch": trigger.fired_epoch, "best_val": best, "select": tc["select"],
        "config": config,
        "data": {"collection": str(collection), "knowledge": str(knowledge) if isinstance(knowledge, (str, os.PathLike))
                 else type(knowledge).__name__, "category": dataset.category, "part_names": list(dataset.part_names),
                 "num_parts": num_parts, "num_points": dataset.num_points, "train_shapes": len(dataset),
                 "train_splits": {s: dataset.splits.count(s) for s in sorted(set(dataset.splits))},
                 "units": dataset.num_units_total, "entries": int(dataset.unit_size.sum()),
                 "val_shapes": len(val_rows), "val_from": val_how,
                 "fewshot": {"collection": str(fs_collection), "rows": [int(r) for r in fs_rows],
                             "keys": [list(ckeys[r]) for r in fs_rows] if not fc["collection"] else None}},
        "teacher": {"teachers": dataset.teachers, "simulated": dataset.simulated,
                    "corrupted_fraction": float((dataset.corrupted == 1).mean()) if (dataset.corrupted >= 0).any() else None},
        "timings": {"setup_seconds": round(setup_seconds, 3), "wall_seconds": round(wall_total, 3),
                    "seconds_per_epoch_this_call": round(float(np.mean(epoch_seconds)), 3) if epoch_seconds else None},
        "device": str(device), "processes": nproc, "torch": torch.__version__,
        "model_class": class_path(unwrapped),
    }
    if accelerator.is_main_process:
        if tc["select"] == "best_val" and (out / "best").exists():
            tmp = out / ".model.copy"
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(out / "best", tmp)
            shutil.rmtree(out / "model", ignore_errors=True)
            os.replace(tmp, out / "model")
        else:
            write_model(unwrapped, out / "model", _model_meta(dataset, config, epoch))
        _atomic_write_text(out / "run.json", json.dumps(info, indent=2, default=_json_default))
        tmp = out / ".confidences.tmp.npz"
        np.savez(tmp, keys=np.array(dataset.keys, dtype=str).reshape(-1, 3), unit_offsets=dataset.unit_offsets,
                 unit_index=dataset.unit_source_index, initial=dataset.confidence, final=conf.cpu().numpy(),
                 corrupted=dataset.corrupted)
        os.replace(tmp, out / "confidences.npz")
    accelerator.wait_for_everyone()
    return info


def _model_meta(dataset: DistillDataset, config: dict, epoch: int) -> dict[str, Any]:
    return {"category": dataset.category, "part_names": list(dataset.part_names), "num_parts": dataset.num_parts,
            "num_points": dataset.num_points, "epoch": epoch, "mode": config["mode"]}


def _fewshot_rows(config, c: Collection, ckeys, category, labelled: set[int], val_rows: set[int], collection) -> list[int]:
    fc = config["fewshot"]
    if fc["collection"] and Path(fc["collection"]) != Path(collection):
        with Collection(fc["collection"]) as fcoll:
            return _fewshot_pick(fc, fcoll, collection_keys(fcoll), category,
                                 _labelled_rows(fcoll), set())
    return _fewshot_pick(fc, c, ckeys, category, labelled, val_rows)


def _fewshot_pick(fc, c: Collection, ckeys, category, labelled: set[int], val_rows: set[int]) -> list[int]:
    if fc["keys"]:
        row_of = {k: r for r, k in enumerate(ckeys)}
        rows = []
        for k in fc["keys"]:
            k = tuple(map(str, k))
            if k not in row_of:
                raise ValueError(f"few-shot key {k} is not in {c.path}")
            r = row_of[k]
            if r in val_rows:
                raise ValueError(f"few-shot key {k} is a validation shape")
            if str(c.splits[r]) == "test":
                raise ValueError(f"few-shot key {k} is a test shape")
            if r not in labelled:
                raise ValueError(f"few-shot key {k} has no labels")
            rows.append(r)
        return rows
    if fc["count"] < 1:
        raise ValueError("mode fewshot needs fewshot.keys or fewshot.count >= 1")
    cats = [category] if category and category in c.part_names else None
    cand = [int(r) for r in c.select(category=cats, split=fc["split"]) if int(r) in labelled and int(r) not in val_rows]
    if len(cand) < fc["count"]:
        raise ValueError(f"only {len(cand)} labelled {fc['split']} shapes for fewshot.count={fc['count']}")
    pick = np.random.default_rng(fc["seed"]).permutation(len(cand))[:fc["count"]]
    return sorted(cand[i] for i in pick)


def _rescore_distributed(accelerator, model, dataset: DistillDataset, batch_size: int) -> torch.Tensor:
    """Eq. 4 scores of every unit, shapes split across processes: ``float32 [U]`` (NaN = no points)."""
    idx = list(range(accelerator.process_index, len(dataset), accelerator.num_processes))
    s = rescore_flat(model, dataset, idx, batch_size, accelerator.device, accelerator.autocast)
    have = ~torch.isnan(s)
    v, h = _sharded_sum(accelerator, torch.nan_to_num(s, nan=0.0), have)
    return torch.where(h, v, torch.full_like(v, float("nan")))


def _val_miou(accelerator, model, points: torch.Tensor, labels: torch.Tensor, num_parts: int, batch_size: int) -> float:
    idx = torch.arange(accelerator.process_index, len(points), accelerator.num_processes)
    per = torch.zeros(len(points), dtype=torch.float64)
    have = torch.zeros(len(points), dtype=torch.bool)
    if len(idx):
        pred = _predict_labels(model, points[idx], batch_size, accelerator.device, accelerator.autocast)
        per[idx] = torch.from_numpy(shape_miou(pred, labels[idx], num_parts))
        have[idx] = True
    per, have = _sharded_sum(accelerator, per, have)
    return float(per[have].mean())


def _checkpoint(accelerator, out: Path, epoch: int, wall: float, trigger: BackwardTrigger, conf: torch.Tensor,
                best: dict, keep: int) -> None:
    meta = {"epoch": epoch, "wall_seconds": wall, "trigger": trigger.state_dict(), "best": best}
    save_checkpoint(accelerator, out / "checkpoints" / f"epoch-{epoch:03d}", json.loads(json.dumps(meta, default=_json_default)),
                    keep, write_extra=lambda folder: np.save(folder / "confidence.npy", conf.detach().cpu().numpy()))
    accelerator.wait_for_everyone()


# ----------------------------------------------------------------------------------------------
# Test-time alignment
# ----------------------------------------------------------------------------------------------
def tta_predict(model: torch.nn.Module, dataset: DistillDataset, config: dict[str, Any],
                indices: Sequence[int] | None = None, device: torch.device | str | None = None,
                progress: bool = False, autocast=None, on_shape=None) -> dict[str, Any]:
    """Test-time alignment: for each shape alone, start from the pre-trained student, freeze its
    encoder, train the head on the shape's own units (Eq. 3, ``tta.steps`` Adam steps at ``tta.lr``,
    class weights from the shape's units) and predict the shape.

    Args:
        model: the pre-trained student (not modified: each shape starts from its weights).
        dataset: the shapes and their units.
        config: a config dict (``tta``, ``loss``, ``train.augment`` / ``train.seed`` are used).
        indices: the shapes (default all).
        device: where to run (default the model's device).
        progress: a progress bar.
        autocast: optional context-manager factory (mixed precision).
        on_shape: optional callback ``on_shape(i, result_dict)`` after each shape (for caching).

    Returns:
        ``{"indices": [...], "probs": list of float32 [n, R], "loss": [...] (last step), "seconds": [...]}``
        with ``seconds`` the wall time of each shape (alignment and prediction).

    Raises:
        ValueError: the model has no ``encoder`` submodule.
    """
    from tqdm import tqdm

    config = resolve_config(config)
    tc, lc, ttc = config["train"], config["loss"], config["tta"]
    device = torch.device(device) if device is not None else next(model.parameters()).device
    indices = list(range(len(dataset))) if indices is None else [int(i) for i in indices]
    work = copy.deepcopy(model).to(device)
    initial = {k: v.detach().clone() for k, v in work.state_dict().items()}
    result: dict[str, Any] = {"indices": [], "probs": [], "loss": [], "seconds": []}
    for i in tqdm(indices, desc="tta", disable=not progress):
        t = time.perf_counter()
        work.load_state_dict(initial)
        params = freeze_encoder(work)
        opt = torch.optim.Adam(params, lr=ttc["lr"])
        batch = dataset.collate([dataset[i]])
        points, units = batch["points"].to(device), batch["units"].to(device)
        cw = class_weights(units, dataset.num_parts, lc["class_balance"], None, lc["target"], lc["alpha"], lc["beta"])
        loss = torch.zeros(())
        for step in range(ttc["steps"]):
            work.train()
            work.encoder.eval()
            g = torch.Generator().manual_seed(_derive_seed(tc["seed"], dataset.rows[i], step))
            x = augment_points(points, g, **tc["augment"]) if tc["augment"] else points
            torch.manual_seed(_derive_seed(tc["seed"], dataset.rows[i], step, 1))
            if autocast is not None:
                with autocast():
                    logits = work(x)
            else:
                logits = work(x)
            loss = distill_loss(logits, units, None, cw, lc["target"], lc["normalize"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        work.eval()
        with torch.no_grad():
            probs = torch.softmax(work(points).float(), -1)[0].cpu().numpy()
        res = {"probs": probs, "loss": float(loss.item()), "seconds": time.perf_counter() - t}
        for k in ("probs", "loss", "seconds"):
            result[k].append(res[k])
        result["indices"].append(i)
        if on_shape is not None:
            on_shape(i, res)
    return result


def _run_tta(collection, knowledge, config, out: Path, resume, progress, model) -> dict[str, Any]:
    from accelerate import Accelerator

    from .predict import load_model, write_predictions

    if ((out / "log.jsonl").exists() or any((out / "tta").glob("shape-*.npz"))) and not resume:
        raise FileExistsError(f"{out}: holds a TTA run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    accelerator = Accelerator(mixed_precision=config["train"]["mixed_precision"] if cuda else "no", cpu=not cuda)
    t_start = time.perf_counter()
    dataset = DistillDataset(collection, knowledge, num_points=config["train"]["num_points"],
                             sampling=config["train"]["sampling"], seed=config["train"]["seed"],
                             point_probs=config["loss"]["target"] == "soft")
    if model is None:
        if not config["tta"]["init"]:
            raise ValueError("mode tta needs a pre-trained student: tta.init (run or model folder) or model=")
        model, _ = load_model(config["tta"]["init"])
    model = model.to(accelerator.device)
    cache = out / "tta"
    if accelerator.is_main_process:
        cache.mkdir(exist_ok=True)
        _atomic_write_text(out / "config.yaml", yaml.safe_dump({**config, "collection": str(collection)}, sort_keys=False))
    accelerator.wait_for_everyone()
    mine = [i for i in range(accelerator.process_index, len(dataset), accelerator.num_processes)
            if not (cache / f"shape-{i:06d}.npz").exists()]

    def save(i: int, res: dict) -> None:
        tmp = cache / f".shape-{i:06d}.tmp.npz"
        np.savez(tmp, probs=res["probs"].astype(np.float32), loss=res["loss"], seconds=res["seconds"])
        os.replace(tmp, cache / f"shape-{i:06d}.npz")
        with open(cache / f"log-{accelerator.process_index}.jsonl", "a") as fh:
            fh.write(json.dumps({"shape": i, "key": list(dataset.keys[i]), "loss": res["loss"],
                                 "seconds": round(res["seconds"], 4)}) + "\n")

    tta_predict(model, dataset, config, mine, accelerator.device, progress and accelerator.is_main_process,
                accelerator.autocast if cuda else None, on_shape=save)
    accelerator.wait_for_everyone()
    info: dict[str, Any] = {}
    if accelerator.is_main_process:
        probs, losses, seconds = [], [], []
        for i in range(len(dataset)):
            with np.load(cache / f"shape-{i:06d}.npz") as z:
                probs.append(z["probs"])
                losses.append(float(z["loss"]))
                seconds.append(float(z["seconds"]))
        with open(out / "log.jsonl", "w") as fh:
            for i in range(len(dataset)):
                fh.write(json.dumps({"epoch": i + 1, "shape": i, "key": list(dataset.keys[i]), "loss": losses[i],
                                     "seconds": round(seconds[i], 4)}) + "\n")
        full_n = None
        with Collection(collection) as c:
            full_n = c.num_points
        if dataset.num_points == full_n:
            write_predictions(out / "predictions.h5", collection, dataset.rows, np.stack(probs),
                              part_names=dataset.part_names, category=dataset.category,
                              attrs={"model": "tta", "mode": "tta"})
        info = {"mode": "tta", "shapes": len(dataset), "config": config,
                "data": {"collection": str(collection), "category": dataset.category,
                         "part_names": list(dataset.part_names), "units": dataset.num_units_total,
                         "splits": {s: dataset.splits.count(s) for s in sorted(set(dataset.splits))}},
                "teacher": {"teachers": dataset.teachers, "simulated": dataset.simulated},
                "timings": {"seconds_per_shape_mean": float(np.mean(seconds)), "seconds_per_shape_median":
                            float(np.median(seconds)), "wall_seconds": round(time.perf_counter() - t_start, 3)},
                "device": str(accelerator.device), "processes": accelerator.num_processes,
                "model_class": class_path(model)}
        _atomic_write_text(out / "run.json", json.dumps(info, indent=2, default=_json_default))
    accelerator.wait_for_everyone()
    if not info:
        info = json.loads((out / "run.json").read_text())
    return info
