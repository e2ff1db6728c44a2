"""The simulated teacher: ground-truth part maps with controlled, recorded corruption.

For controlled experiments and tests only (its outputs say ``simulated=True``): PartDistill's claim
(Umam et al., CVPR 2024, §3.3-3.4) is that backward distillation recovers from a teacher's
missed and wrongly labelled parts; a teacher whose errors are drawn at known rates, and recorded,
lets that be measured.

**Units.** In every image, each connected region (8-connectivity, ``scipy.ndimage.label``) of each
part present in the label map is one unit (``units="region"``), or all pixels of a part are one
unit (``units="part"``). Units are enumerated by part, then by scipy's region order.

**Decisions.** Each unit independently, with four draws from the image's generator (always all
four, so that changing a probability does not shift the random stream of later units):

1. *missed* with probability ``p_miss``;
2. otherwise *wrong* with probability ``p_wrong``: its label becomes a part drawn uniformly from the
   ``R - 1`` other parts (so the expected fraction of corrupted units is
   ``p_miss + (1 - p_miss) * p_wrong``);
3. its confidence ``c ~ U(conf_range)``, drawn whatever the decision (independent of correctness);
   the unit's score vector gives ``c`` to its (possibly wrong) label and spreads ``1 - c`` evenly
   over the other ``R - 1`` parts, so ``c`` is its maximum score (``conf_range[0] >= 1/R`` is
   required).

**Box kind** (a simulated GLIP): one box per unit that is not missed and has at least
``min_region_pixels`` pixels (a detector does not find specks). Boxes are the unit's tight pixel
bounding box in pixel-edge coordinates (pixel column ``j`` spans ``[j, j + 1)``, so
``x1 = max column + 1``), enlarged by ``box_enlarge`` times its width / height on each side (leaking
onto neighbouring parts) and clipped to the image. ``corrupted[b][k]`` is True for a wrong box.
Missed units leave no box.

**Pixel kind** (a simulated segmentation teacher): a missed unit's pixels are *absorbed by their
neighbours*: each takes the ground-truth part of the nearest pixel (Euclidean) of a different part
in the same image, or, if the image shows no other part, a random other part — the way a
segmentation network that misses a part paints it with the surrounding parts. It keeps its
confidence draw, so a miss is as confident as a correct unit. ``corrupted [B, H, W]`` is True on
the pixels of missed and wrong units (exactly the pixels whose arg-max differs from the ground
truth). Background pixels get uniform probabilities ``1/R`` and are never corrupted.

**Reproducibility.** Image ``b`` of a call uses ``numpy.random.SeedSequence([seed, 0, key, b])``
for an integer ``key`` (e.g. the shape's index, so a shape always gets the same corruption whatever
the batch order or the other shapes), ``[seed, 1, keys[b]]`` for a list of per-image keys, and
``[seed, 2, counter, b]`` with an internal call counter when ``key`` is None.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from .base import TeacherOutput

_EIGHT = np.ones((3, 3), dtype=bool)


@dataclass
class SimulatedUnits:
    """The corruption plan of one image: its ``U`` units and their decisions.

    Attributes:
        unit_map: ``int64 [H, W]`` unit index per pixel, -1 on the background.
        part: ``int64 [U]`` ground-truth part of each unit.
        pixels: ``int64 [U]`` pixel count.
        bbox: ``float32 [U, 4]`` tight box ``(x0, y0, x1, y1)`` in pixel-edge coordinates (not enlarged).
        missed: ``bool [U]``.
        wrong: ``bool [U]`` (never True where ``missed``).
        alternative: ``int64 [U]`` a part drawn uniformly from the ``R - 1`` others (equal to
            ``part`` when R = 1): the label of a wrong unit, and of a missed pixel-kind unit's pixels
            when the image shows no other part.
        label: ``int64 [U]`` the label the teacher gives the unit (``alternative`` if ``wrong``; the
            ground truth if missed — a missed unit's pixels take their neighbours' parts instead).
        confidence: ``float32 [U]`` the unit's confidence, ``U(conf_range)``.
    """

    unit_map: np.ndarray
    part: np.ndarray
    pixels: np.ndarray
    bbox: np.ndarray
    missed: np.ndarray
    wrong: np.ndarray
    alternative: np.ndarray
    label: np.ndarray
    confidence: np.ndarray

    @property
    def num_units(self) -> int:
        return len(self.part)

    @property
    def corrupted(self) -> np.ndarray:
        """``bool [U]``: missed or wrong."""
        return self.missed | self.wrong


class SimulatedTeacher:
    """A teacher built from ground-truth label maps with controlled corruption (see the module doc).

    Args:
        kind: ``"box"`` (B-VLM-like) or ``"pixel"`` (P-VLM-like).
        p_miss: probability that a unit is missed.
        p_wrong: probability that a unit that is not missed gets a wrong (other, uniform) label.
        box_enlarge: box kind: each box grows by this fraction of its width / height on each side.
        conf_range: ``(lo, hi)``, the unit confidence is uniform on it; ``0 <= lo <= hi <= 1`` and,
            at call time, ``lo >= 1/R``.
        seed: base seed of all random draws.
        units: ``"region"`` (connected regions of each part) or ``"part"`` (one unit per part).
        min_region_pixels: box kind: units with fewer pixels give no box (and are not counted as
            missed or corrupted).

    Raises:
        ValueError: bad arguments.
    """

    name = "simulated"

    def __init__(self, kind: str = "box", p_miss: float = 0.2, p_wrong: float = 0.2, box_enlarge: float = 0.15,
                 conf_range: tuple[float, float] = (0.5, 1.0), seed: int = 0, units: str = "region",
                 min_region_pixels: int = 4):
        if kind not in ("box", "pixel"):
            raise ValueError(f"kind must be 'box' or 'pixel', got {kind!r}")
        for nm, p in (("p_miss", p_miss), ("p_wrong", p_wrong)):
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"{nm} must be a probability in [0, 1], got {p}")
        if float(box_enlarge) < 0:
            raise ValueError(f"box_enlarge must be >= 0, got {box_enlarge}")
        lo, hi = (float(c) for c in conf_range)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"conf_range must satisfy 0 <= lo <= hi <= 1, got {tuple(conf_range)}")
        if units not in ("region", "part"):
            raise ValueError(f"units must be 'region' or 'part', got {units!r}")
        if int(seed) < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.kind = kind
        self.p_miss, self.p_wrong, self.box_enlarge = float(p_miss), float(p_wrong), float(box_enlarge)
        self.conf_range = (lo, hi)
        self.seed = int(seed)
        self.units = units
        self.min_region_pixels = int(min_region_pixels)
        self._calls = 0

    def __repr__(self) -> str:
        return (f"SimulatedTeacher(kind={self.kind!r}, p_miss={self.p_miss}, p_wrong={self.p_wrong}, "
                f"box_enlarge={self.box_enlarge}, conf_range={self.conf_range}, seed={self.seed}, "
                f"units={self.units!r}, min_region_pixels={self.min_region_pixels})")

    # ----------------------------------------------------------------------------------- plan
    def _seed_sequences(self, batch: int, key: int | Sequence[int] | None) -> list[np.random.SeedSequence]:
        if key is None:
            counter = self._calls
            self._calls += 1
            return [np.random.SeedSequence([self.seed, 2, counter, b]) for b in range(batch)]
        if isinstance(key, (int, np.integer)):
            if key < 0:
                raise ValueError(f"key must be >= 0, got {key}")
            return [np.random.SeedSequence([self.seed, 0, int(key), b]) for b in range(batch)]
        keys = [int(k) for k in key]
        if len(keys) != batch or min(keys, default=0) < 0:
            raise ValueError(f"key must be an int >= 0 or {batch} ints >= 0 (one per image), got {key}")
        return [np.random.SeedSequence([self.seed, 1, k]) for k in keys]

    def _plan_image(self, labels: np.ndarray, num_parts: int, rng: np.random.Generator) -> SimulatedUnits:
        h, w = labels.shape
        unit_map = np.full((h, w), -1, np.int64)
        parts, count = [], 0
        for p in np.unique(labels[labels >= 0]):
            mask = labels == p
            if self.units == "region":
                comp, n = ndimage.label(mask, structure=_EIGHT)
            else:
                comp, n = mask.astype(np.int64), 1
            unit_map[mask] = comp[mask] - 1 + count
            parts += [int(p)] * n
            count += n
        part = np.asarray(parts, np.int64)
        pixels = np.bincount(unit_map[unit_map >= 0], minlength=count).astype(np.int64)
        bbox = np.zeros((count, 4), np.float32)
        for u, sl in enumerate(ndimage.find_objects(unit_map + 1, max_label=count)):
            if sl is not None:
                bbox[u] = (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop)
        draws = rng.random((count, 4))  # miss, wrong, which other part, confidence
        missed = draws[:, 0] < self.p_miss
        can_be_wrong = num_parts > 1
        wrong = ~missed & (draws[:, 1] < self.p_wrong) & can_be_wrong
        other = np.minimum((draws[:, 2] * max(num_parts - 1, 1)).astype(np.int64), max(num_parts - 2, 0))
        other = other + (other >= part) if num_parts > 1 else part.copy()  # uniform over the parts != part
        label = np.where(wrong, other, part)
        lo, hi = self.conf_range
        confidence = (lo + (hi - lo) * draws[:, 3]).astype(np.float32)
        if not can_be_wrong and self.kind == "pixel":  # R = 1: a miss cannot change any pixel's label
            missed = np.zeros_like(missed)
        return SimulatedUnits(unit_map, part, pixels, bbox, missed, wrong, other, label, confidence)

    def plan(self, label_maps: torch.Tensor, num_parts: int,
             key: int | Sequence[int] | None = None) -> list[SimulatedUnits]:
        """The corruption decisions for ``label_maps int64 [B, H, W]`` (-1 background) and ``R =
        num_parts`` parts, one :class:`SimulatedUnits` per image. :meth:`__call__` uses exactly
        this plan for the same ``key`` (``key=None`` advances the internal counter).

        Raises:
            ValueError: bad shape, labels outside ``[-1, R)`` or a bad key.
        """
        lab = self._check_labels(label_maps, num_parts)
        seqs = self._seed_sequences(lab.shape[0], key)
        return [self._plan_image(lab[b], num_parts, np.random.default_rng(seqs[b])) for b in range(lab.shape[0])]

    def _check_labels(self, label_maps: torch.Tensor, num_parts: int) -> np.ndarray:
        if label_maps is None:
            raise ValueError("the simulated teacher needs label_maps (int64 [B, H, W], -1 background): "
                             "it corrupts the ground truth")
        if not isinstance(label_maps, torch.Tensor) or label_maps.ndim != 3:
            got = getattr(label_maps, "shape", type(label_maps))
            raise ValueError(f"label_maps must be int64 [B, H, W], got {got}")
        if label_maps.is_floating_point() or label_maps.dtype == torch.bool:
            raise ValueError(f"label_maps must be an integer tensor, got {label_maps.dtype}")
        if num_parts < 1:
            raise ValueError("no part prompts")
        lab = label_maps.detach().to("cpu", torch.int64).numpy()
        if lab.size and (lab.min() < -1 or lab.max() >= num_parts):
            raise ValueError(f"label_maps values must lie in [-1, {num_parts - 1}] for R = {num_parts} parts, "
                             f"got [{lab.min()}, {lab.max()}]")
        lo = self.conf_range[0]
        if num_parts > 1 and lo < 1.0 / num_parts:
            raise ValueError(f"conf_range[0] = {lo} < 1/R = {1.0 / num_parts:.4f}: the unit's label would not "
                             f"always have the highest score")
        return lab

    # ------------------------------------------------------------------------------------ call
    def __call__(self, images: torch.Tensor, part_prompts: Sequence[str], label_maps: torch.Tensor | None = None,
                 key: int | Sequence[int] | None = None) -> TeacherOutput:
        """Corrupted ground truth for ``B`` images and ``R = len(part_prompts)`` parts.

        Args:
            images: ``float32 [B, 3, H, W]`` (only its shape and device are used).
            part_prompts: the ``R`` part prompts (only their number is used).
            label_maps: ``int64 [B, H, W]``, -1 background, else the part index; required.
            key: an int (e.g. the shape index: image ``b`` then gets the same corruption on every
                call), a list of ``B`` per-image ints, or None (an internal counter, advanced per call).

        Returns:
            ``TeacherOutput(teacher="simulated", simulated=True)`` on the images' device; box kind:
            ``boxes list[B] of float32 [K_b, 4]``, ``box_probs list[B] of float32 [K_b, R]``,
            ``corrupted list[B] of bool [K_b]``; pixel kind: ``probs float32 [B, R, H, W]`` (sum to
            1 over R everywhere), ``corrupted bool [B, H, W]``.

        Raises:
            ValueError: ``label_maps`` missing or malformed, shapes that disagree, or
                ``conf_range[0] < 1/R``.
        """
        num_parts = len(part_prompts)
        lab_np = self._check_labels(label_maps, num_parts)
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[0] != label_maps.shape[0] \
                or tuple(images.shape[-2:]) != tuple(label_maps.shape[-2:]):
            raise ValueError(f"images [B, 3, H, W] and label_maps [B, H, W] disagree: "
                             f"{getattr(images, 'shape', type(images))} vs {tuple(label_maps.shape)}")
        dev = images.device
        plans = self.plan(label_maps, num_parts, key)
        if self.kind == "box":
            boxes, box_probs, corrupted = [], [], []
            for units in plans:
                b, s, c = self._boxes(units, num_parts, lab_np.shape[1:])
                boxes.append(b.to(dev))
                box_probs.append(s.to(dev))
                corrupted.append(c.to(dev))
            return TeacherOutput(kind="box", teacher=self.name, boxes=boxes, box_probs=box_probs,
                                 corrupted=corrupted, simulated=True)
        probs, corrupted = zip(*(self._pixels(units, lab_np[b], num_parts) for b, units in enumerate(plans)))
        return TeacherOutput(kind="pixel", teacher=self.name, probs=torch.stack(probs).to(dev),
                             corrupted=torch.stack(corrupted).to(dev), simulated=True)

    @staticmethod
    def _scores(label: np.ndarray, confidence: np.ndarray, num_parts: int) -> np.ndarray:
        """``float32 [U, R]``: ``confidence`` on ``label``, the rest spread evenly over the others."""
        rest = (1.0 - confidence) / max(num_parts - 1, 1)
        scores = np.repeat(rest[:, None], num_parts, axis=1).astype(np.float32)
        scores[np.arange(len(label)), label] = confidence
        return scores

    def _boxes(self, units: SimulatedUnits, num_parts: int, hw: tuple[int, int]):
        h, w = hw
        keep = ~units.missed & (units.pixels >= self.min_region_pixels)
        box = units.bbox[keep].astype(np.float64)
        size = np.concatenate([box[:, 2:] - box[:, :2]] * 2, axis=1) * np.array([-1, -1, 1, 1]) * self.box_enlarge
        box = np.clip(box + size, 0, np.array([w, h, w, h], np.float64)).astype(np.float32)
        scores = self._scores(units.label[keep], units.confidence[keep], num_parts)
        return (torch.from_numpy(box.reshape(-1, 4)), torch.from_numpy(scores.reshape(-1, num_parts)),
                torch.from_numpy(units.wrong[keep].copy()))

    def _pixels(self, units: SimulatedUnits, labels: np.ndarray, num_parts: int):
        h, w = labels.shape
        fg = units.unit_map >= 0
        pred = np.full((h, w), -1, np.int64)
        pred[fg] = units.label[units.unit_map[fg]]
        missed_px = fg & units.missed[np.maximum(units.unit_map, 0)]
        for p in np.unique(units.part[units.missed]):
            todo = missed_px & (labels == p)
            others = fg & (labels != p)
            if others.any():
                _, (iy, ix) = ndimage.distance_transform_edt(~others, return_indices=True)
                pred[todo] = labels[iy[todo], ix[todo]]
            else:  # nothing else to be absorbed by: a random other part per unit (its "wrong" draw)
                pred[todo] = units.alternative[units.unit_map[todo]]
        conf = np.zeros((h, w), np.float32)
        conf[fg] = units.confidence[units.unit_map[fg]]
        probs = np.full((num_parts, h, w), 1.0 / num_parts, np.float32)
        if num_parts > 1:
            rest = (1.0 - conf) / (num_parts - 1)
            probs[:, fg] = rest[fg]
            yy, xx = np.nonzero(fg)
            probs[pred[fg], yy, xx] = conf[fg]
        corrupted = fg & (units.missed | units.wrong)[np.maximum(units.unit_map, 0)]
        return torch.from_numpy(probs), torch.from_numpy(corrupted)
