"""Knowledge units (PartDistill §3.2, Eqs. 1-2): extraction from 2D teacher outputs, knowledge files.

A *knowledge unit* ``K_n = (Y_n, M_n, C_n)`` is one piece of 2D part knowledge back-projected to the
N points of a shape: the mask ``M_n`` (points), the part probabilities ``Y_n`` and the confidence
``C_n = max_r Y_n,r``. All units of one shape are held, ragged, by :class:`KnowledgeUnits`.

Extraction (inputs are plain arrays, see ``docs/distill-design.md``: ``index int64 [V,H,W]``
pixel → point, -1 background, and ``visible bool [V,N]`` from :mod:`distill.render`):

* :func:`units_from_boxes` — B-VLM teachers, Eq. 1: one unit per box.
* :func:`units_from_pixels` — P-VLM teachers, Eq. 2: one unit per connected region of a part.
* :func:`merge_units` — pool units of several teachers / calls.

Both extraction functions take ``refine_sets int64 [N]`` (consistency sets from
:func:`distill.refine.consistency_sets`) to apply intra-set label refinement; None (default) = off.

Knowledge files (HDF5, schema v1)
=================================
One file holds the units of S shapes of one category. Root attributes:

==================  ==========================================================================
``schema``          ``"partdistill.knowledge"``
``schema_version``  ``1``
``category``        the category (str)
``part_names``      JSON list of the R part names (``Y`` columns)
``teachers``        JSON list of teacher names (``teacher`` indexes into it)
``settings``        JSON dict: extraction settings (views, image size, refinement, ...)
``simulated``       1 if any teacher is the simulated teacher, else 0
``num_points``      N if known, else 0
``created_by``      ``"partdistill <version>"``
==================  ==========================================================================

Datasets (TU units and TE mask entries over all shapes):

============================  ==================  ===============================================
``source``/``dataset``/       str [S]             the shape's collection key
``shape_id``
``shape_units``               int64 [S+1]         shape ``s`` owns units ``shape_units[s]:[s+1]``
``units/entry_offsets``       int64 [TU+1]        unit ``u`` owns entries ``entry_offsets[u]:[u+1]``
``units/point_index``         int32 [TE]          M_n (point indices of the shape)
``units/point_probs``         float32 [TE, R]     Y per masked point (gzip)
``units/unit_probs``          float32 [TU, R]     Y_n
``units/confidence``          float32 [TU]        C_n
``units/view``                int16 [TU]
``units/teacher``             int16 [TU]
``units/corrupted``           int8 [TU]           1 / 0 (simulated teacher), -1 unknown
``extras/<name>``             [S, V, H, W]        optional per-shape maps (gzip), -1 where absent:
                                                  ``gt_label_maps`` int8, ``pixel_index`` int32
``extras/has_<name>``         uint8 [S]           whether shape ``s`` has the map
============================  ==================  ===============================================

Files are written under a temporary name beside the target, ``fsync``-ed and renamed, so a killed
writer never leaves a half-written file under the real name. Readers raise
:class:`gen3d.errors.DataFormatError` naming the file and field for a foreign, corrupt or
inconsistent file. Resumable extraction caches each shape in its own ``.npz``
(:func:`save_shape_cache` / :func:`load_shape_cache`), written the same way.
"""
from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from scipy import ndimage

from gen3d.errors import DataFormatError

from .refine import refine_point_labels

__all__ = [
    "EXTRAS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "KnowledgeFile",
    "KnowledgeUnits",
    "load_shape_cache",
    "merge_units",
    "save_shape_cache",
    "units_from_boxes",
    "units_from_pixels",
    "write_knowledge",
]

SCHEMA = "partdistill.knowledge"
SCHEMA_VERSION = 1
CACHE_SCHEMA = "partdistill.knowledge-cache"
CACHE_SCHEMA_VERSION = 1
#: The per-shape extra maps a knowledge file may hold, with their on-disk dtypes (fill value -1).
EXTRAS: dict[str, type] = {"gt_label_maps": np.int8, "pixel_index": np.int32}
_FIELDS = ("offsets", "point_index", "point_probs", "unit_probs", "confidence", "view", "teacher", "corrupted")
_DTYPES = {"offsets": np.int64, "point_index": np.int64, "point_probs": np.float32, "unit_probs": np.float32,
           "confidence": np.float32, "view": np.int16, "teacher": np.int16, "corrupted": np.int8}
_STR = h5py.string_dtype()


@dataclass
class KnowledgeUnits:
    """All knowledge units of one shape, stored ragged (see docs/distill-design.md).

    Attributes:
        offsets: ``int64 [U+1]``; unit ``n`` covers ``point_index[offsets[n]:offsets[n+1]]`` (its mask M_n).
        point_index: ``int64 [E]`` indices into the shape's N points.
        point_probs: ``float32 [E, R]`` the teacher's part probabilities Y for each masked point.
        unit_probs: ``float32 [U, R]`` Y_n: the box's scores (B-VLM) or the mean of its points' Y (P-VLM).
        confidence: ``float32 [U]`` C_n = max_r Y_n,r.
        view: ``int16 [U]`` the view the unit comes from.
        teacher: ``int16 [U]`` index into the knowledge file's teacher names.
        corrupted: ``int8 [U]`` 1 / 0 for simulated teachers, -1 unknown (real teachers).
    """

    offsets: np.ndarray
    point_index: np.ndarray
    point_probs: np.ndarray
    unit_probs: np.ndarray
    confidence: np.ndarray
    view: np.ndarray
    teacher: np.ndarray
    corrupted: np.ndarray

    @property
    def num_units(self) -> int:
        return int(len(self.offsets) - 1)

    @property
    def num_parts(self) -> int:
        return int(self.unit_probs.shape[1])

    def mask(self, n: int) -> np.ndarray:
        """``int64 [|M_n|]`` point indices of unit ``n``."""
        return self.point_index[self.offsets[n]:self.offsets[n + 1]]

    @property
    def unit_of_entry(self) -> np.ndarray:
        """``int64 [E]`` the unit each ``point_index`` entry belongs to."""
        return np.repeat(np.arange(self.num_units), np.diff(self.offsets))

    # -- additions -----------------------------------------------------------------------------
    @classmethod
    def empty(cls, num_parts: int) -> KnowledgeUnits:
        """No units, ``R = num_parts`` columns."""
        return cls(offsets=np.zeros(1, np.int64), point_index=np.zeros(0, np.int64),
                   point_probs=np.zeros((0, num_parts), np.float32), unit_probs=np.zeros((0, num_parts), np.float32),
                   confidence=np.zeros(0, np.float32), view=np.zeros(0, np.int16),
                   teacher=np.zeros(0, np.int16), corrupted=np.zeros(0, np.int8))

    def validate(self, num_points: int | None = None, where: str = "KnowledgeUnits") -> None:
        """Check shapes, dtypes and ragged offsets (and point indices against ``num_points``).

        Raises:
            ValueError: naming ``where`` and the field that is wrong.
        """
        for name in _FIELDS:
            arr = getattr(self, name)
            if not isinstance(arr, np.ndarray) or arr.dtype != _DTYPES[name]:
                raise ValueError(f"{where}: {name}: expected a {np.dtype(_DTYPES[name])} array, got "
                                 f"{getattr(arr, 'dtype', type(arr).__name__)}")
        u = self.num_units
        if self.offsets.ndim != 1 or u < 0 or self.offsets[0] != 0 or np.any(np.diff(self.offsets) < 0) \
                or self.offsets[-1] != len(self.point_index):
            raise ValueError(f"{where}: offsets: must start at 0, not decrease and end at len(point_index)="
                             f"{len(self.point_index)}")
        r = self.unit_probs.shape[1] if self.unit_probs.ndim == 2 else -1
        checks = {"point_index": (len(self.point_index),), "point_probs": (len(self.point_index), r),
                  "unit_probs": (u, r), "confidence": (u,), "view": (u,), "teacher": (u,), "corrupted": (u,)}
        for name, shape in checks.items():
            if getattr(self, name).shape != shape:
                raise ValueError(f"{where}: {name}: shape {getattr(self, name).shape}, expected {shape}")
        if len(self.point_index) and (self.point_index.min() < 0 or
                                      (num_points is not None and self.point_index.max() >= num_points)):
            raise ValueError(f"{where}: point_index: values must lie in [0, {num_points})")
        if u and (self.corrupted.min() < -1 or self.corrupted.max() > 1):
            raise ValueError(f"{where}: corrupted: values must be -1, 0 or 1")

    def select(self, keep: np.ndarray) -> KnowledgeUnits:
        """The units where ``keep bool [U]`` is True (or the listed unit indices), in order."""
        keep = np.asarray(keep)
        ids = np.flatnonzero(keep) if keep.dtype == bool else keep.astype(np.int64)
        counts = np.diff(self.offsets)[ids]
        starts = self.offsets[ids]
        entry = (np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
                 + np.arange(counts.sum()))
        return KnowledgeUnits(offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
                              point_index=self.point_index[entry], point_probs=self.point_probs[entry],
                              unit_probs=self.unit_probs[ids], confidence=self.confidence[ids],
                              view=self.view[ids], teacher=self.teacher[ids], corrupted=self.corrupted[ids])


# ----------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------
def _np(x: Any) -> np.ndarray:
    """A numpy view of an array or (CPU / CUDA) torch tensor, without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check_render(index: Any, visible: Any) -> tuple[np.ndarray, np.ndarray]:
    index = _np(index).astype(np.int64, copy=False)
    visible = _np(visible).astype(bool, copy=False)
    if index.ndim != 3:
        raise ValueError(f"index must be int64 [V, H, W], got shape {index.shape}")
    if visible.ndim != 2 or visible.shape[0] != index.shape[0]:
        raise ValueError(f"visible must be bool [V, N] with V={index.shape[0]}, got shape {visible.shape}")
    if index.size and (index.min() < -1 or index.max() >= visible.shape[1]):
        raise ValueError(f"index values must lie in [-1, N={visible.shape[1]})")
    return index, visible


def _check_sets(refine_sets: Any, num_points: int) -> np.ndarray | None:
    if refine_sets is None:
        return None
    sets = _np(refine_sets).astype(np.int64, copy=False)
    if sets.shape != (num_points,) or (sets.size and sets.min() < 0):
        raise ValueError(f"refine_sets must be int [N={num_points}] with values >= 0, got shape {sets.shape}")
    return sets


def _pack(per_unit_points: list[np.ndarray], per_unit_probs: list[np.ndarray], unit_probs: np.ndarray,
          view: np.ndarray, teacher_id: int, corrupted: np.ndarray) -> KnowledgeUnits:
    r = unit_probs.shape[1]
    counts = np.array([len(p) for p in per_unit_points], np.int64)
    return KnowledgeUnits(
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        point_index=(np.concatenate(per_unit_points) if per_unit_points else np.zeros(0)).astype(np.int64),
        point_probs=(np.concatenate(per_unit_probs) if per_unit_probs else np.zeros((0, r))).astype(np.float32),
        unit_probs=unit_probs.astype(np.float32), confidence=_confidence(unit_probs),
        view=view.astype(np.int16), teacher=np.full(len(view), teacher_id, np.int16),
        corrupted=corrupted.astype(np.int8))


def _confidence(unit_probs: np.ndarray) -> np.ndarray:
    """``float32 [U]`` C_n = max_r Y_n,r."""
    return (unit_probs.max(1) if len(unit_probs) else np.zeros(0)).astype(np.float32)


def _box_pixel_range(lo: float, hi: float, size: int) -> tuple[int, int]:
    """Pixels ``i`` with ``lo <= i + 0.5 <= hi``, clipped to ``[0, size)``, as ``[start, stop)``."""
    start = max(int(np.ceil(lo - 0.5)), 0)
    stop = min(int(np.floor(hi - 0.5)) + 1, size)
    return start, max(stop, start)


def units_from_boxes(index: Any, visible: Any, boxes: Sequence[Any], box_probs: Sequence[Any],
                     teacher_id: int = 0, corrupted: Sequence[Any] | None = None,
                     refine_sets: Any = None) -> KnowledgeUnits:
    """Knowledge units of a box teacher (B-VLM, PartDistill Eq. 1): one unit per non-empty box.

    For box ``k`` of view ``v``: ``M_n`` = the points shown by the pixels inside the box and
    visible in view ``v``, ``{index[v, i, j] : pixel (i, j) in box} ∩ {p : visible[v, p]}``;
    ``Y_n`` = the box's part scores, also used as ``Y`` of every masked point; ``C_n = max_r Y_n,r``.
    Pixel ``(row i, column j)`` is inside box ``(x0, y0, x1, y1)`` when its centre is:
    ``x0 <= j + 0.5 <= x1`` and ``y0 <= i + 0.5 <= y1`` (so box ``(0, 0, 2, 2)`` covers the 2x2
    pixels at the top left). Boxes with no visible point are dropped.

    Intra-set refinement (``refine_sets`` given): the mask of a box becomes the union of the
    consistency sets of which more than half of the points visible in view ``v`` lie in the box
    mask (restricted, again, to the points visible in view ``v``): sets the box only grazes are
    removed, sets it mostly covers are completed.

    Args:
        index: ``int64 [V, H, W]`` point shown by each pixel, -1 background.
        visible: ``bool [V, N]``.
        boxes: ``list[V]`` of ``float [K_v, 4]`` boxes ``(x0, y0, x1, y1)`` in pixels (arrays or tensors).
        box_probs: ``list[V]`` of ``float [K_v, R]`` part scores per box.
        teacher_id: the unit's ``teacher`` value.
        corrupted: optional ``list[V]`` of ``bool [K_v]`` (simulated teacher); None: -1 for every unit.
        refine_sets: optional ``int [N]`` consistency set per point (:func:`distill.refine.consistency_sets`).

    Returns:
        :class:`KnowledgeUnits`, units in (view, box) order.

    Raises:
        ValueError: inconsistent shapes (V, K_v, R), index values outside ``[-1, N)``.
    """
    index, visible = _check_render(index, visible)
    v_count, h, w = index.shape
    n = visible.shape[1]
    sets = _check_sets(refine_sets, n)
    if len(boxes) != v_count or len(box_probs) != v_count or (corrupted is not None and len(corrupted) != v_count):
        raise ValueError(f"boxes, box_probs (and corrupted) must be lists of V={v_count} views")
    num_sets = int(sets.max()) + 1 if sets is not None and n else 0
    r_parts = None
    pts_list, prob_list, y_list, view_list, corr_list = [], [], [], [], []
    for v in range(v_count):
        b = _np(boxes[v]).astype(np.float64)
        p = _np(box_probs[v]).astype(np.float32)
        if b.ndim != 2 or b.shape[1] != 4 or p.ndim != 2 or len(p) != len(b):
            raise ValueError(f"view {v}: boxes must be [K, 4] and box_probs [K, R], got {b.shape} and {p.shape}")
        if r_parts is None:
            r_parts = p.shape[1]
            if r_parts < 1:
                raise ValueError("box_probs must have at least one part column")
        elif p.shape[1] != r_parts:
            raise ValueError(f"view {v}: box_probs has {p.shape[1]} parts, earlier views {r_parts}")
        corr = None if corrupted is None else _np(corrupted[v]).astype(bool).reshape(-1)
        if corr is not None and len(corr) != len(b):
            raise ValueError(f"view {v}: corrupted has {len(corr)} flags for {len(b)} boxes")
        vis = visible[v]
        vis_per_set = np.bincount(sets[vis], minlength=num_sets) if sets is not None else None
        for k in range(len(b)):
            x0, y0, x1, y1 = b[k]
            r0, r1 = _box_pixel_range(y0, y1, h)
            c0, c1 = _box_pixel_range(x0, x1, w)
            pix = index[v, r0:r1, c0:c1].ravel()
            pts = np.unique(pix[pix >= 0])
            pts = pts[vis[pts]]
            if sets is not None and len(pts):
                inside = np.bincount(sets[pts], minlength=num_sets)
                chosen = 2 * inside > vis_per_set
                pts = np.flatnonzero(vis & chosen[sets])
            if len(pts) == 0:
                continue
            pts_list.append(pts)
            prob_list.append(np.broadcast_to(p[k], (len(pts), r_parts)))
            y_list.append(p[k])
            view_list.append(v)
            corr_list.append(-1 if corr is None else int(corr[k]))
    if r_parts is None:
        raise ValueError("no views: cannot tell the number of parts")
    y = np.stack(y_list) if y_list else np.zeros((0, r_parts), np.float32)
    return _pack(pts_list, prob_list, y, np.array(view_list, np.int64), teacher_id, np.array(corr_list, np.int64))


def _column_means(groups: np.ndarray, values: np.ndarray, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """``(sum / count float64 [G, R], count int64 [G])`` of ``values [P, R]`` grouped by ``groups [P]``."""
    count = np.bincount(groups, minlength=num_groups)
    sums = np.stack([np.bincount(groups, weights=values[:, r], minlength=num_groups)
                     for r in range(values.shape[1])], 1) if values.shape[1] else np.zeros((num_groups, 0))
    return sums / np.maximum(count, 1)[:, None], count


def units_from_pixels(index: Any, visible: Any, probs: Any, teacher_id: int = 0, corrupted: Any = None,
                      min_points: int = 1, point_labels: Any = None, refine_sets: Any = None) -> KnowledgeUnits:
    """Knowledge units of a pixel teacher (P-VLM, PartDistill Eq. 2): one unit per connected region.

    A pixel takes part: it shows a point (``index >= 0``) that is visible in its view, and the
    teacher sees it (``sum_r probs > 0``). Its label is ``argmax_r probs[v, :, i, j]`` (ties: the
    smallest part). For every view ``v`` and part ``r``, every 8-connected component
    (``scipy.ndimage.label``) of the participating pixels labelled ``r`` is one unit:

    * ``M_n``: the distinct points its pixels show;
    * ``Y`` of a masked point: the mean of the probability vectors of its pixels in the component;
    * ``Y_n``: the mean of its points' ``Y`` (each point counts once); ``C_n = max_r Y_n,r``;
    * ``corrupted``: 1 if more than half of its pixels are corrupted, else 0 (-1 without ``corrupted``).

    Components of fewer than ``min_points`` points are dropped. Units come in (view, part,
    raster order of the first pixel) order.

    Refinement hook. With ``point_labels int [V, N]`` the label of a pixel is the label of the
    point it shows (``point_labels[v, index[v, i, j]]``; -1: the pixel takes no part), instead of
    its argmax. With ``refine_sets int [N]`` (consistency sets), each view's point labels (the
    given ``point_labels``, else the argmax of the mean probabilities of the point's pixels in the
    view) are first refined by :func:`distill.refine.refine_point_labels` (majority label of the
    set among its points seen in that view). Components are then formed on these per-pixel labels.
    So that a unit's knowledge agrees with its label, a masked point whose own ``Y`` has an argmax
    other than the unit's part ``r`` gets as ``Y`` the mean view-level ``Y`` of the points of the
    same view (and the same set, with ``refine_sets``) that have label ``r`` and agree with it
    (one-hot ``r`` if there is none). Without either argument nothing changes: every point's own
    ``Y`` already has argmax ``r``.

    Args:
        index: ``int64 [V, H, W]`` point shown by each pixel, -1 background.
        visible: ``bool [V, N]``.
        probs: ``float [V, R, H, W]`` part probabilities (array or tensor).
        teacher_id: the unit's ``teacher`` value.
        corrupted: optional ``bool [V, H, W]`` (simulated teacher).
        min_points: minimum ``|M_n|``.
        point_labels: optional ``int [V, N]`` per-view point labels overriding the argmax (-1 = none).
        refine_sets: optional ``int [N]`` consistency set per point (intra-set refinement).

    Returns:
        :class:`KnowledgeUnits`.

    Raises:
        ValueError: inconsistent shapes, index values outside ``[-1, N)``, labels outside ``[-1, R)``.
    """
    index, visible = _check_render(index, visible)
    v_count, h, w = index.shape
    n = visible.shape[1]
    probs = _np(probs).astype(np.float32, copy=False)
    if probs.ndim != 4 or probs.shape[0] != v_count or probs.shape[2:] != (h, w):
        raise ValueError(f"probs must be [V={v_count}, R, H={h}, W={w}], got {probs.shape}")
    r_parts = probs.shape[1]
    if r_parts < 1:
        raise ValueError("probs must have at least one part channel")
    if corrupted is not None:
        corrupted = _np(corrupted).astype(bool, copy=False)
        if corrupted.shape != index.shape:
            raise ValueError(f"corrupted must be bool [V, H, W] = {index.shape}, got {corrupted.shape}")
    sets = _check_sets(refine_sets, n)
    if point_labels is not None:
        point_labels = _np(point_labels).astype(np.int64, copy=False)
        if point_labels.shape != (v_count, n):
            raise ValueError(f"point_labels must be int [V, N] = {(v_count, n)}, got {point_labels.shape}")
        if point_labels.size and (point_labels.min() < -1 or point_labels.max() >= r_parts):
            raise ValueError(f"point_labels must lie in [-1, R={r_parts})")
    relabel = point_labels is not None or sets is not None

    # Only the bounding box (over all views) of the drawn pixels can take part: crop to it.
    drawn = index >= 0
    rows, cols = np.flatnonzero(drawn.any((0, 2))), np.flatnonzero(drawn.any((0, 1)))
    y0, y1 = (rows[0], rows[-1] + 1) if len(rows) else (0, 0)
    x0, x1 = (cols[0], cols[-1] + 1) if len(cols) else (0, 0)
    index, drawn, probs = index[:, y0:y1, x0:x1], drawn[:, y0:y1, x0:x1], probs[:, :, y0:y1, x0:x1]
    if corrupted is not None:
        corrupted = corrupted[:, y0:y1, x0:x1]

    # Participating pixels.
    safe = np.where(drawn, index, 0)
    valid = drawn & np.take_along_axis(visible, safe.reshape(v_count, -1), 1).reshape(index.shape)
    valid &= probs.sum(1) > 0
    pv, py, px = np.nonzero(valid)
    ppt = index[pv, py, px]
    pprob = probs[pv, :, py, px]                                    # [P, R]

    view_point = pv * n + ppt                                       # [P] key (view, point)
    if relabel:
        vp_probs, vp_count = _column_means(view_point, pprob, v_count * n)
        labels = (point_labels if point_labels is not None else
                  np.where(vp_count > 0, vp_probs.argmax(1), -1).reshape(v_count, n))
        if sets is not None:
            labels = refine_point_labels(sets, labels)
        plabel = labels[pv, ppt]
    else:
        plabel = pprob.argmax(1) if len(pprob) else np.zeros(0, np.int64)
    keep_px = plabel >= 0
    pv, py, px, ppt, pprob, plabel = (a[keep_px] for a in (pv, py, px, ppt, pprob, plabel))

    # Connected components per (view, part): 8-connectivity within a view, none across views.
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True
    pcomp = np.zeros(len(pv), np.int64)                             # [P] component, in [0, total)
    comp_part, total = [], 0
    part_img = np.zeros(index.shape, bool)
    for r in range(r_parts):
        mine = plabel == r
        part_img[:] = False
        part_img[pv[mine], py[mine], px[mine]] = True
        lab, count = ndimage.label(part_img, structure=structure)
        pcomp[mine] = lab[pv[mine], py[mine], px[mine]] - 1 + total
        comp_part.append(np.full(count, r, np.int64))
        total += count
    comp_part = np.concatenate(comp_part)
    comp_view = np.zeros(total, np.int64)
    comp_view[pcomp] = pv
    order = np.argsort(comp_view, kind="stable")                    # view-major, then part, raster
    rank = np.empty(total, np.int64)
    rank[order] = np.arange(total)
    pcomp = rank[pcomp]
    comp_view, comp_part = comp_view[order], comp_part[order]

    # Distinct (component, point) pairs = mask entries, sorted by component then point.
    pair_key, pair_of_px = np.unique(pcomp * n + ppt, return_inverse=True)
    pair_probs, _ = _column_means(pair_of_px.ravel(), pprob, len(pair_key))
    pair_comp, pair_point = pair_key // max(n, 1), pair_key % max(n, 1)

    if relabel and len(pair_key):
        pair_part = comp_part[pair_comp]
        flipped = pair_probs.argmax(1) != pair_part
        if np.any(flipped):
            pair_probs[flipped] = _donor_probs(vp_probs, vp_count, labels, sets, comp_view[pair_comp[flipped]],
                                               pair_point[flipped], pair_part[flipped], r_parts)

    sizes = np.bincount(pair_comp, minlength=total)
    unit_probs, _ = _column_means(pair_comp, pair_probs, total)
    if corrupted is not None:
        n_px = np.bincount(pcomp, minlength=total)
        n_bad = np.bincount(pcomp, weights=corrupted[pv, py, px].astype(np.float64), minlength=total)
        corr = (2 * n_bad > n_px).astype(np.int64)
    else:
        corr = np.full(total, -1, np.int64)
    keep = sizes >= max(min_points, 1)
    entry_keep = keep[pair_comp]
    counts = sizes[keep]
    return KnowledgeUnits(
        offsets=np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
        point_index=pair_point[entry_keep].astype(np.int64), point_probs=pair_probs[entry_keep].astype(np.float32),
        unit_probs=unit_probs[keep].astype(np.float32),
        confidence=_confidence(unit_probs[keep]),
        view=comp_view[keep].astype(np.int16), teacher=np.full(int(keep.sum()), teacher_id, np.int16),
        corrupted=corr[keep].astype(np.int8))


def _donor_probs(vp_probs: np.ndarray, vp_count: np.ndarray, labels: np.ndarray, sets: np.ndarray | None,
                 views: np.ndarray, points: np.ndarray, parts: np.ndarray, r_parts: int) -> np.ndarray:
    """``float64 [F, R]`` replacement Y for relabelled points (see :func:`units_from_pixels`): the
    mean view-level Y of the donors, the points of the same view (and set) whose label is the
    target part and whose own Y agrees with it; one-hot where there is no donor."""
    n = labels.shape[1]
    group = np.zeros(n, np.int64) if sets is None else sets
    num_groups = int(group.max()) + 1 if n else 1
    flat_labels = labels.reshape(-1)
    own = vp_probs.argmax(1)
    donor = (flat_labels >= 0) & (vp_count > 0) & (own == flat_labels)
    donor_rows = np.flatnonzero(donor)
    donor_key = ((donor_rows // n) * num_groups + group[donor_rows % n]) * r_parts + flat_labels[donor_rows]
    keys, inverse = np.unique(donor_key, return_inverse=True)
    means, _ = _column_means(inverse.ravel(), vp_probs[donor_rows], len(keys))
    want = (views * num_groups + group[points]) * r_parts + parts
    pos = np.minimum(np.searchsorted(keys, want), max(len(keys) - 1, 0))
    found = (keys[pos] == want) if len(keys) else np.zeros(len(want), bool)
    out = np.eye(r_parts)[parts]
    out[found] = means[pos[found]]
    return out


def merge_units(units: Iterable[KnowledgeUnits]) -> KnowledgeUnits:
    """Concatenate the units of several calls (teachers, view batches) of one shape, in order.

    Raises:
        ValueError: no units given, or different numbers of parts R.
    """
    units = list(units)
    if not units:
        raise ValueError("merge_units needs at least one KnowledgeUnits (the number of parts is unknown)")
    r = {u.num_parts for u in units}
    if len(r) != 1:
        raise ValueError(f"cannot merge units with different numbers of parts {sorted(r)}")
    sizes = [len(u.point_index) for u in units]
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    offsets = np.concatenate([[0]] + [u.offsets[1:] + s for u, s in zip(units, starts)]).astype(np.int64)
    cat = {name: np.concatenate([getattr(u, name) for u in units]).astype(_DTYPES[name], copy=False)
           for name in _FIELDS if name != "offsets"}
    return KnowledgeUnits(offsets=offsets, **cat)


# ----------------------------------------------------------------------------------------------
# Knowledge files
# ----------------------------------------------------------------------------------------------
def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, set, tuple)):
        return list(obj.tolist() if isinstance(obj, np.ndarray) else obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"settings value of type {type(obj).__name__} is not JSON-serialisable")


def _check_key(key: Any, where: str) -> tuple[str, str, str]:
    if not (isinstance(key, (tuple, list)) and len(key) == 3 and all(isinstance(k, str) for k in key)):
        raise ValueError(f"{where}: key must be a tuple (source, dataset, shape_id) of str, got {key!r}")
    return tuple(key)


def _check_extras(extras: Mapping[str, Any] | None, where: str) -> dict[str, np.ndarray]:
    out = {}
    for name, value in (extras or {}).items():
        if name not in EXTRAS:
            raise ValueError(f"{where}: extras: unknown map {name!r} (known: {sorted(EXTRAS)})")
        arr = _np(value)
        if arr.ndim != 3:
            raise ValueError(f"{where}: extras[{name!r}]: expected [V, H, W], got shape {arr.shape}")
        info = np.iinfo(EXTRAS[name])
        if arr.size and (arr.min() < max(info.min, -1) or arr.max() > info.max):
            raise ValueError(f"{where}: extras[{name!r}]: values out of range for {np.dtype(EXTRAS[name])}")
        out[name] = arr.astype(EXTRAS[name])
    return out


#: One shape for :func:`write_knowledge`: ``(key, units, extras)``.
ShapeKnowledge = tuple[tuple[str, str, str], KnowledgeUnits, Mapping[str, Any] | None]


def write_knowledge(path: str | os.PathLike, shapes: Iterable[ShapeKnowledge], *, category: str,
                    part_names: Sequence[str], teachers: Sequence[str], settings: Mapping[str, Any], simulated: bool,
                    num_points: int | None = None, overwrite: bool = True) -> int:
    """Write a knowledge file (schema v1, see the module docstring) in one transaction.

    Args:
        path: the ``.h5`` file.
        shapes: ``(key, units, extras)`` per shape: ``key = (source, dataset, shape_id)`` (unique),
            :class:`KnowledgeUnits` with ``R = len(part_names)``, and ``extras``: None or a dict with
            optional ``"gt_label_maps" int8 [V, H, W]`` and ``"pixel_index" int32 [V, H, W]``
            (each map must have the same ``[V, H, W]`` in every shape that has it).
        category: the category.
        part_names: the R part names.
        teachers: teacher names; every unit's ``teacher`` must index into them.
        settings: JSON-serialisable extraction settings.
        simulated: whether a simulated teacher produced any of the knowledge.
        num_points: N, if known: point indices are checked against it and it is stored.
        overwrite: replace an existing file (default: yes; a knowledge file is a derived artefact,
            re-assembled from the cache by every resumed extraction, and the replacement is atomic,
            so an existing file is only ever replaced by a complete one).

    Returns:
        The number of shapes written.

    Raises:
        FileExistsError: ``path`` exists and ``overwrite`` is False.
        ValueError: a key, units or extras do not fit (nothing is written).
        TypeError: ``settings`` is not JSON-serialisable.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path}: exists (pass overwrite=True to replace it)")
    part_names, teachers = [str(p) for p in part_names], [str(t) for t in teachers]
    r = len(part_names)
    settings_json = json.dumps(dict(settings), sort_keys=True, default=_json_default)
    rows = []
    seen: set[tuple[str, str, str]] = set()
    map_shapes: dict[str, tuple[int, ...]] = {}
    for i, item in enumerate(shapes):
        key, units, extras = item
        where = f"shape {i}"
        key = _check_key(key, where)
        where = f"shape {i} {key}"
        if key in seen:
            raise ValueError(f"{where}: duplicate key")
        seen.add(key)
        units.validate(num_points, where)
        if units.num_parts != r:
            raise ValueError(f"{where}: units have R={units.num_parts} parts, part_names has {r}")
        if units.num_units and (units.teacher.min() < 0 or units.teacher.max() >= len(teachers)):
            raise ValueError(f"{where}: teacher ids must index into teachers {teachers}")
        extras = _check_extras(extras, where)
        for name, arr in extras.items():
            if map_shapes.setdefault(name, arr.shape) != arr.shape:
                raise ValueError(f"{where}: extras[{name!r}] has shape {arr.shape}, other shapes {map_shapes[name]}")
        rows.append((key, units, extras))

    s = len(rows)
    n_units = np.array([u.num_units for _, u, _ in rows], np.int64)
    n_entries = np.array([len(u.point_index) for _, u, _ in rows], np.int64)
    shape_units = np.concatenate([[0], np.cumsum(n_units)]).astype(np.int64)
    entry_start = np.concatenate([[0], np.cumsum(n_entries)]).astype(np.int64)
    tu, te = int(shape_units[-1]), int(entry_start[-1])

    from gen3d import __version__

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as h5:
            h5.attrs.update({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "category": str(category),
                             "part_names": json.dumps(part_names), "teachers": json.dumps(teachers),
                             "settings": settings_json, "simulated": int(bool(simulated)),
                             "num_points": int(num_points or 0), "created_by": f"partdistill {__version__}"})
            for j, name in enumerate(("source", "dataset", "shape_id")):
                h5.create_dataset(name, data=np.array([k[j] for k, _, _ in rows], dtype=object), dtype=_STR)
            h5.create_dataset("shape_units", data=shape_units)
            g = h5.create_group("units")
            gz = {"compression": "gzip", "compression_opts": 4, "shuffle": True}
            ds = {"entry_offsets": g.create_dataset("entry_offsets", (tu + 1,), np.int64)}
            for name, shape, dtype in (("point_index", (te,), np.int32), ("point_probs", (te, r), np.float32)):
                ds[name] = g.create_dataset(name, shape, dtype, **(gz if te else {}))
            for name in ("unit_probs", "confidence", "view", "teacher", "corrupted"):
                ds[name] = g.create_dataset(name, (tu,) + ((r,) if name == "unit_probs" else ()), _DTYPES[name])
            ds["entry_offsets"][tu] = te
            for i, (_, u, _) in enumerate(rows):
                a, b, e0, e1 = shape_units[i], shape_units[i + 1], entry_start[i], entry_start[i + 1]
                if b > a:
                    ds["entry_offsets"][a:b] = u.offsets[:-1] + e0
                    for name in ("unit_probs", "confidence", "view", "teacher", "corrupted"):
                        ds[name][a:b] = getattr(u, name)
                if e1 > e0:
                    ds["point_index"][e0:e1] = u.point_index.astype(np.int32)
                    ds["point_probs"][e0:e1] = u.point_probs
            ge = h5.create_group("extras")
            for name, shape in map_shapes.items():
                m = ge.create_dataset(name, (s,) + shape, EXTRAS[name], fillvalue=-1,
                                      chunks=(1,) + shape, compression="gzip", compression_opts=4)
                has = np.zeros(s, np.uint8)
                for i, (_, _, extras) in enumerate(rows):
                    if name in extras:
                        m[i] = extras[name]
                        has[i] = 1
                ge.create_dataset(f"has_{name}", data=has)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return s


class KnowledgeFile:
    """A knowledge file opened read-only (use as a context manager or call :meth:`close`).

    Attributes:
        path: the file.
        category: ``str``.
        part_names: ``tuple[str, ...]`` the R parts.
        teachers: ``tuple[str, ...]`` teacher names (``KnowledgeUnits.teacher`` indexes into them).
        settings: ``dict`` extraction settings.
        simulated: ``bool``.
        num_points: N, or None if the writer did not know it.

    Raises:
        FileNotFoundError: the file does not exist.
        gen3d.errors.DataFormatError: not HDF5 / truncated, another schema or version, a missing or
            malformed attribute or dataset (the error names it).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such knowledge file")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as exc:
            raise DataFormatError(self.path, "file", f"not a readable HDF5 file (truncated or corrupt): {exc}") from exc
        try:
            self._open()
        except DataFormatError:
            self._h5.close()
            raise
        except (OSError, KeyError, RuntimeError, ValueError, TypeError) as exc:
            self._h5.close()
            raise DataFormatError(self.path, "file", f"unreadable (truncated or corrupt): {exc}") from exc

    def _fail(self, field: str, reason: str) -> DataFormatError:
        return DataFormatError(self.path, field, reason)

    def _json_attr(self, name: str, kind: type) -> Any:
        if name not in self._h5.attrs:
            raise self._fail(name, "missing root attribute")
        try:
            value = json.loads(self._h5.attrs[name])
        except (TypeError, ValueError) as exc:
            raise self._fail(name, f"not valid JSON: {exc}") from exc
        if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
            raise self._fail(name, f"expected a JSON {'list of str' if kind is list else kind.__name__}")
        return value

    def _open(self) -> None:
        h5, attrs = self._h5, self._h5.attrs
        if attrs.get("schema") != SCHEMA:
            raise self._fail("schema", f"not a partdistill knowledge file (schema attribute {attrs.get('schema')!r}, "
                             f"expected {SCHEMA!r})")
        try:
            version = int(attrs.get("schema_version", -1))
        except (TypeError, ValueError):
            version = -1
        if version != SCHEMA_VERSION:
            raise self._fail("schema_version", f"unknown schema version {attrs.get('schema_version')!r} "
                             f"(this partdistill reads version {SCHEMA_VERSION})")
        for name in ("category", "simulated", "num_points"):
            if name not in attrs:
                raise self._fail(name, "missing root attribute")
        self.category = str(attrs["category"])
        self.part_names = tuple(self._json_attr("part_names", list))
        self.teachers = tuple(self._json_attr("teachers", list))
        self.settings = self._json_attr("settings", dict)
        self.simulated = bool(attrs["simulated"])
        self.num_points = int(attrs["num_points"]) or None
        r = len(self.part_names)

        def need(name: str, ndim: int, tail: tuple = ()) -> h5py.Dataset:
            if name not in h5 or not isinstance(h5[name], h5py.Dataset):
                raise self._fail(name, "missing dataset")
            ds = h5[name]
            if ds.ndim != ndim or tuple(ds.shape[1:]) != tail:
                raise self._fail(name, f"shape {ds.shape}, expected {ndim}-D with trailing dims {tail}")
            return ds

        keys = [need(name, 1) for name in ("source", "dataset", "shape_id")]
        s = len(keys[0])
        if any(len(k) != s for k in keys):
            raise self._fail("shape_id", "source, dataset and shape_id have different lengths")
        self._shape_units = need("shape_units", 1)[()]
        if len(self._shape_units) != s + 1 or self._shape_units[0] != 0 or np.any(np.diff(self._shape_units) < 0):
            raise self._fail("shape_units", f"expected {s + 1} non-decreasing offsets starting at 0")
        tu = int(self._shape_units[-1])
        self._entry_offsets = need("units/entry_offsets", 1)
        if len(self._entry_offsets) != tu + 1:
            raise self._fail("units/entry_offsets", f"length {len(self._entry_offsets)}, expected {tu + 1}")
        te = int(self._entry_offsets[tu])
        for name, length, tail in (("point_index", te, ()), ("point_probs", te, (r,)), ("unit_probs", tu, (r,)),
                                   ("confidence", tu, ()), ("view", tu, ()), ("teacher", tu, ()),
                                   ("corrupted", tu, ())):
            ds = need(f"units/{name}", 1 + len(tail), tail)
            if len(ds) != length:
                raise self._fail(f"units/{name}", f"length {len(ds)}, expected {length}")
        self._extras = {}
        if "extras" in h5:
            for name in h5["extras"]:
                if name.startswith("has_"):
                    continue
                if name not in EXTRAS:
                    raise self._fail(f"extras/{name}", f"unknown map (known: {sorted(EXTRAS)})")
                m = need(f"extras/{name}", 4, tuple(h5[f"extras/{name}"].shape[1:]))
                has = need(f"extras/has_{name}", 1)
                if len(m) != s or len(has) != s:
                    raise self._fail(f"extras/{name}", f"{len(m)} maps / {len(has)} flags for {s} shapes")
                self._extras[name] = (m, has[()].astype(bool))
        self._keys = list(zip(*(k.asstr()[()].tolist() for k in keys))) if s else []
        self._index = {k: i for i, k in enumerate(self._keys)}
        if len(self._index) != s:
            raise self._fail("shape_id", "duplicate (source, dataset, shape_id) keys")

    # -- container protocol ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._keys)

    def __enter__(self) -> KnowledgeFile:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying HDF5 file."""
        self._h5.close()

    @property
    def num_parts(self) -> int:
        """R."""
        return len(self.part_names)

    def keys(self) -> list[tuple[str, str, str]]:
        """The shape keys ``(source, dataset, shape_id)``, in file order."""
        return list(self._keys)

    def index_of(self, key: tuple[str, str, str]) -> int:
        """Row of the shape with this key.

        Raises:
            KeyError: no such shape in the file.
        """
        try:
            return self._index[tuple(key)]
        except KeyError:
            raise KeyError(f"{self.path}: no shape {tuple(key)!r}") from None

    def _row(self, i: int) -> int:
        if not -len(self) <= i < len(self):
            raise IndexError(f"{self.path}: shape index {i} out of range [0, {len(self)})")
        return i % len(self)

    def units(self, i: int) -> KnowledgeUnits:
        """The :class:`KnowledgeUnits` of shape row ``i``.

        Raises:
            IndexError: ``i`` out of range.
            gen3d.errors.DataFormatError: the shape's offsets or values are inconsistent.
        """
        i = self._row(i)
        a, b = int(self._shape_units[i]), int(self._shape_units[i + 1])
        g = self._h5["units"]
        try:
            eo = self._entry_offsets[a:b + 1].astype(np.int64)
            e0, e1 = int(eo[0]), int(eo[-1])
            units = KnowledgeUnits(
                offsets=eo - e0, point_index=g["point_index"][e0:e1].astype(np.int64),
                point_probs=g["point_probs"][e0:e1].astype(np.float32),
                **{name: g[name][a:b].astype(_DTYPES[name]) for name in
                   ("unit_probs", "confidence", "view", "teacher", "corrupted")})
        except (OSError, KeyError, RuntimeError) as exc:
            raise self._fail("units", f"shape {i}: unreadable (truncated or corrupt): {exc}") from exc
        try:
            units.validate(self.num_points, f"shape {i}")
        except ValueError as exc:
            raise self._fail("units", str(exc)) from exc
        return units

    def extras(self, i: int) -> dict[str, np.ndarray]:
        """The extra maps of shape row ``i`` it has (``gt_label_maps int8 [V,H,W]``,
        ``pixel_index int32 [V,H,W]``); absent maps are left out."""
        i = self._row(i)
        return {name: m[i] for name, (m, has) in self._extras.items() if has[i]}


# ----------------------------------------------------------------------------------------------
# Per-shape cache (resumable extraction)
# ----------------------------------------------------------------------------------------------
def save_shape_cache(path: str | os.PathLike, key: tuple[str, str, str], units: KnowledgeUnits,
                     extras: Mapping[str, Any] | None = None) -> None:
    """Write one shape's knowledge to ``path`` (``.npz``, temporary name + fsync + rename).

    Raises:
        ValueError: bad key, units or extras (see :func:`write_knowledge`).
    """
    path = Path(path)
    key = _check_key(key, str(path))
    units.validate(None, str(path))
    extras = _check_extras(extras, str(path))
    arrays = {"schema": np.array(CACHE_SCHEMA), "schema_version": np.array(CACHE_SCHEMA_VERSION),
              "key": np.array(key, dtype=str)}
    arrays.update({f"units_{name}": getattr(units, name) for name in _FIELDS})
    arrays.update({f"extras_{name}": arr for name, arr in extras.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_shape_cache(path: str | os.PathLike) -> tuple[tuple[str, str, str], KnowledgeUnits, dict[str, np.ndarray]]:
    """Read a file written by :func:`save_shape_cache`.

    Returns:
        ``(key, units, extras)``.

    Raises:
        FileNotFoundError: no such file.
        gen3d.errors.DataFormatError: not a cache file (foreign, truncated), wrong version, a missing
            or inconsistent field (named).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such knowledge cache file")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {name: z[name] for name in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataFormatError(path, "file", f"not a readable .npz file (truncated or corrupt): {exc}") from exc
    if "schema" not in data or str(data["schema"]) != CACHE_SCHEMA:
        raise DataFormatError(path, "schema", f"not a partdistill knowledge cache (expected {CACHE_SCHEMA!r})")
    if "schema_version" not in data or int(data["schema_version"]) != CACHE_SCHEMA_VERSION:
        raise DataFormatError(path, "schema_version", f"unknown version (this partdistill reads "
                              f"{CACHE_SCHEMA_VERSION})")
    for name in ["key"] + [f"units_{f}" for f in _FIELDS]:
        if name not in data:
            raise DataFormatError(path, name, "missing field")
    key = data["key"]
    if key.shape != (3,) or key.dtype.kind != "U":
        raise DataFormatError(path, "key", f"expected 3 strings, got {key.dtype} {key.shape}")
    units = KnowledgeUnits(**{f: data[f"units_{f}"] for f in _FIELDS})
    try:
        units.validate(None, "units")
    except ValueError as exc:
        raise DataFormatError(path, "units", str(exc)) from exc
    extras = {name[len("extras_"):]: arr for name, arr in data.items() if name.startswith("extras_")}
    unknown = set(extras) - set(EXTRAS)
    if unknown:
        raise DataFormatError(path, f"extras_{min(unknown)}", f"unknown map (known: {sorted(EXTRAS)})")
    return tuple(str(k) for k in key), units, extras
