"""Transfer of point predictions to meshes, and mesh-level part IoU (Labeled-PSB, COSEG).

PartDistill §4.2 evaluates on meshes by giving each face the label voted by the 5 points nearest
to it. Here:

* :func:`face_labels_from_points`: the vote (``gen3d.surface.vote_face_labels``): the k points
  nearest to each face *centroid* vote, the most frequent label wins, ties go to the label of the
  nearest of the tied points, and ``-1`` (a point with no prediction) is a label like any other —
  a face it wins counts as wrong.
* :func:`face_iou`: per-part IoU over faces, each face counting 1 (**per-face**) or its area
  (**area-weighted**); GT -1 faces ignored, predicted -1 wrong, absent parts per ``absent``
  (:mod:`eval.metrics`).
* :class:`PartMapping`: which of the model's parts is scored against which of the data set's. The
  readers already give Labeled-PSB and COSEG records ShapeNetPart part names where one exists
  (``gen3d/data/psb.yaml``: chair support -> seat, backsupport -> back, airplane stabilizer +
  rudder -> tail, table support -> top, cup -> mug; ``gen3d/data/coseg.yaml``: chairs back / seat /
  legs -> back / seat / leg), so the mapping is the identity on the parts the data set labels and
  ``None`` on the category's other parts (Labeled-PSB tables have no ShapeNetPart ``support``
  (drawer); COSEG chairs no ``arm``). A part mapped to ``None`` is not scored: it has no IoU, and
  faces predicted as it are left out (``unmapped="ignore"``, default) or counted wrong
  (``unmapped="wrong"``); data-set parts that no model part maps to are not scored either (their
  GT faces are left out). Every output states the mapping, what was ignored and how many faces.
* :func:`mesh_transfer_scores`: per-face and area-weighted mIoU (instance and category, both
  absent conventions) over a set of meshes.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gen3d.surface import LABEL_NEIGHBOURS, vote_face_labels

from .metrics import ABSENT, both_conventions, part_iou, shape_miou

__all__ = ["UNMAPPED", "MeshTruth", "PartMapping", "face_areas", "face_iou", "face_labels_from_points",
           "mesh_transfer_scores"]

#: What happens to faces predicted as a model part that maps to no data-set part.
UNMAPPED: tuple[str, ...] = ("ignore", "wrong")


def face_labels_from_points(points: Any, point_labels: Any, vertices: Any, faces: Any,
                            k: int = LABEL_NEIGHBOURS) -> np.ndarray:
    """Per-face labels by a vote of the ``k`` points nearest to each face centroid (PartDistill §4.2, k = 5).

    Rule (``gen3d.surface.vote_face_labels``): Euclidean k nearest points of the face centroid
    (``scipy.spatial.cKDTree``); the label occurring most often among them wins; a tie goes to the
    label of the nearest point among the tied labels; ``-1`` votes like any other label.

    Args:
        points: ``float [N, 3]`` the points the labels belong to, in the mesh's coordinates.
        point_labels: ``int [N]`` label per point, ``-1`` = no prediction.
        vertices: ``float [V, 3]``; faces: ``int [F, 3]`` 0-based triangle vertex indices.
        k: voters per face (clipped to N).

    Returns:
        ``int16 [F]``.

    Raises:
        ValueError: mismatched points / labels, non-integer labels, an empty or non-finite point
            set, faces that are not ``[F, 3]`` or index outside the vertices, ``k < 1``.
    """
    labels = np.asarray(point_labels)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"point_labels must be integers, got dtype {labels.dtype}")
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    verts, tris = _mesh(vertices, faces)
    return vote_face_labels(points, labels, verts, tris, int(k))


def _mesh(vertices: Any, faces: Any) -> tuple[np.ndarray, np.ndarray]:
    verts = np.asarray(vertices, np.float64)
    tris = np.asarray(faces)
    if verts.ndim != 2 or verts.shape[1] != 3:
        raise ValueError(f"vertices must have shape [V, 3], got {verts.shape}")
    if tris.ndim != 2 or tris.shape[1] != 3 or (tris.size and not np.issubdtype(tris.dtype, np.integer)):
        raise ValueError(f"faces must be integer [F, 3], got {tris.shape} {tris.dtype}")
    tris = tris.astype(np.int64)
    if tris.size and (tris.min() < 0 or tris.max() >= len(verts)):
        raise ValueError(f"faces index vertices outside [0, {len(verts)})")
    return verts, tris


def face_areas(vertices: Any, faces: Any) -> np.ndarray:
    """``float64 [F]`` triangle areas ``|(b - a) x (c - a)| / 2``, in squared vertex units.

    Raises:
        ValueError: as :func:`face_labels_from_points` for the mesh.
    """
    verts, tris = _mesh(vertices, faces)
    a, b, c = verts[tris[:, 0]], verts[tris[:, 1]], verts[tris[:, 2]]
    return 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)


def face_iou(pred_faces: Any, gt_faces: Any, num_parts: int, face_areas: Any = None,
             absent: str = "one") -> np.ndarray:
    """Per-part IoU over the faces of one mesh: per-face, or area-weighted when ``face_areas`` is given.

    ``IoU_r = w(P_r ∩ G_r) / w(P_r ∪ G_r)`` with ``w`` the number of faces (per-face) or their
    total area (area-weighted); conventions of :func:`eval.metrics.part_iou` (GT -1 ignored,
    prediction -1 wrong, absent parts 1 or NaN).

    Args:
        pred_faces: ``int [F]`` predicted part per face (-1 = none).
        gt_faces: ``int [F]`` GT part per face (-1 = unlabelled).
        num_parts: R.
        face_areas: ``float [F]`` (:func:`face_areas`) or None.
        absent: ``"one"`` or ``"skip"``.

    Returns:
        ``float32 [R]``.

    Raises:
        ValueError: as :func:`eval.metrics.part_iou`.
    """
    return part_iou(pred_faces, gt_faces, num_parts, absent, face_areas)


# ----------------------------------------------------------------------------------------------
# Part mapping
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PartMapping:
    """The model's part names -> the data set's part names (``None``: the data set does not label it).

    Attributes:
        model_parts: names of the model's label indices (prediction ``r`` is ``model_parts[r]``).
        dataset_parts: names of the data set's label indices (the records' ``part_names``).
        mapping: every model part -> a data-set part or ``None``. Several model parts may map to one
            data-set part (their predictions are merged).
        name: what the mapping is for, e.g. ``"labeled-psb:chair"``.

    Scored ("evaluated") parts are the data-set parts that some model part maps to, in data-set
    order; model parts mapped to ``None`` and data-set parts nobody maps to are not scored (see
    :meth:`apply`).

    Raises (on construction):
        ValueError: duplicate names, a model part missing from ``mapping`` or unknown to it, a
            target that is not a data-set part.
    """

    model_parts: tuple[str, ...]
    dataset_parts: tuple[str, ...]
    mapping: Mapping[str, str | None] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_parts", tuple(self.model_parts))
        object.__setattr__(self, "dataset_parts", tuple(self.dataset_parts))
        object.__setattr__(self, "mapping", dict(self.mapping))
        for label, names in (("model_parts", self.model_parts), ("dataset_parts", self.dataset_parts)):
            if len(set(names)) != len(names):
                raise ValueError(f"PartMapping {self.name!r}: duplicate names in {label}: {names}")
        if set(self.mapping) != set(self.model_parts):
            raise ValueError(f"PartMapping {self.name!r}: mapping must have exactly the model parts "
                             f"{list(self.model_parts)} as keys, got {sorted(self.mapping)}")
        bad = [v for v in self.mapping.values() if v is not None and v not in self.dataset_parts]
        if bad:
            raise ValueError(f"PartMapping {self.name!r}: {bad} are not data-set parts {list(self.dataset_parts)}")

    # -- constructors --------------------------------------------------------------------------
    @classmethod
    def identity(cls, part_names: Sequence[str], labelled: Sequence[str] | None = None,
                 name: str = "") -> PartMapping:
        """Model and data set share ``part_names``; parts not in ``labelled`` (None = all) map to None."""
        keep = set(part_names if labelled is None else labelled)
        return cls(tuple(part_names), tuple(part_names), {p: (p if p in keep else None) for p in part_names}, name)

    @classmethod
    def labeled_psb(cls, category: str, model_parts: Sequence[str] | None = None) -> PartMapping:
        """Mapping for Labeled-PSB records read with ``part_names="shapenet"`` (the default).

        Data-set parts are the reader's part names for the category (ShapeNetPart names for
        airplane / chair / table / mug, else the PSB names); the labelled ones are the targets of
        ``gen3d/data/psb.yaml``'s mapping. Model parts (default: the same names) map to themselves
        where labelled, else to None (e.g. table ``support``).

        Raises:
            KeyError: unknown category.
        """
        from gen3d.readers.psb import target_names

        cat, names, psb_map = target_names(category, "shapenet")
        labelled = set(psb_map.values())
        model = tuple(names if model_parts is None else model_parts)
        return cls(model, names, {p: (p if p in labelled and p in names else None) for p in model},
                   f"labeled-psb:{cat}")

    @classmethod
    def coseg(cls, set_name: str, model_parts: Sequence[str] | None = None,
              entry: Mapping[str, Any] | None = None) -> PartMapping:
        """Mapping for COSEG records read with ``part_names="shapenet"`` (the default).

        Data-set parts are the reader's part names (the ShapeNetPart category's parts when the set
        has ``to_shapenet``, else the set's own); labelled ones are the ``to_shapenet`` targets (or
        all own parts). Model parts (default: the same names) map to themselves where labelled,
        else to None (e.g. chair ``arm``).

        Args:
            set_name: a set of ``gen3d/data/coseg.yaml`` (``chairs``, ``vases``, ...).
            model_parts: the model's part names, or None.
            entry: a set entry (``category``, ``parts``, ``to_shapenet``) to use instead of the table.

        Raises:
            KeyError: unknown set (without ``entry``).
        """
        from gen3d.parts import load_table, shapenetpart_categories

        if entry is None:
            sets = load_table("coseg")["sets"]
            if set_name not in sets:
                raise KeyError(f"unknown COSEG set {set_name!r}; known: {', '.join(sorted(sets))}")
            entry = sets[set_name]
        own = tuple(entry["parts"])
        to_sn = entry.get("to_shapenet")
        if to_sn:
            names = tuple(shapenetpart_categories()[str(entry["category"]).lower()]["parts"])
            labelled = set(to_sn.values())
        else:
            names, labelled = own, set(own)
        model = tuple(names if model_parts is None else model_parts)
        return cls(model, names, {p: (p if p in labelled and p in names else None) for p in model},
                   f"coseg:{set_name}")

    # -- derived -------------------------------------------------------------------------------
    @property
    def evaluated_parts(self) -> tuple[str, ...]:
        """Data-set parts that are scored (some model part maps to them), in data-set order."""
        targets = {v for v in self.mapping.values() if v is not None}
        return tuple(p for p in self.dataset_parts if p in targets)

    @property
    def ignored_model_parts(self) -> tuple[str, ...]:
        """Model parts mapped to None (the data set does not label them)."""
        return tuple(p for p in self.model_parts if self.mapping[p] is None)

    @property
    def ignored_dataset_parts(self) -> tuple[str, ...]:
        """Data-set parts no model part maps to (their GT faces are left out)."""
        return tuple(p for p in self.dataset_parts if p not in self.evaluated_parts)

    def model_lut(self) -> np.ndarray:
        """``int64 [len(model_parts)]``: evaluated-part index of each model part, -1 for None."""
        ev = self.evaluated_parts
        return np.array([ev.index(self.mapping[p]) if self.mapping[p] is not None else -1
                         for p in self.model_parts], np.int64)

    def dataset_lut(self) -> np.ndarray:
        """``int64 [len(dataset_parts)]``: evaluated-part index of each data-set part, -1 if not scored."""
        ev = self.evaluated_parts
        return np.array([ev.index(p) if p in ev else -1 for p in self.dataset_parts], np.int64)

    def apply(self, pred: Any, gt: Any, unmapped: str = "ignore") -> tuple[np.ndarray, np.ndarray]:
        """Relabel model predictions and data-set GT into evaluated-part indices.

        Args:
            pred: ``int [N]`` model part indices (-1 = no prediction, stays -1: wrong).
            gt: ``int [N]`` data-set part indices (-1 = unlabelled).
            unmapped: for elements predicted as a model part mapped to None: ``"ignore"`` sets their
                GT to -1 (left out of the IoU), ``"wrong"`` sets their prediction to -1 (wrong for
                their GT part). GT of data-set parts nobody maps to becomes -1 in both cases.

        Returns:
            ``(pred int64 [N], gt int64 [N])`` in ``[-1, len(evaluated_parts))``.

        Raises:
            ValueError: shapes differ, labels outside ``[-1, len(model_parts))`` /
                ``[-1, len(dataset_parts))``, unknown ``unmapped``.
        """
        if unmapped not in UNMAPPED:
            raise ValueError(f"unmapped must be one of {UNMAPPED}, got {unmapped!r}")
        p, g = np.asarray(pred), np.asarray(gt)
        if p.shape != g.shape or p.ndim != 1:
            raise ValueError(f"pred and gt must be 1-D of the same length, got {p.shape} and {g.shape}")
        for label, arr, n in (("pred", p, len(self.model_parts)), ("gt", g, len(self.dataset_parts))):
            if arr.size and (not np.issubdtype(arr.dtype, np.integer) or arr.min() < -1 or arr.max() >= n):
                raise ValueError(f"{label}: integer labels in [-1, {n}) expected ({self.name or 'PartMapping'})")
        p, g = p.astype(np.int64), g.astype(np.int64)
        mlut, dlut = self.model_lut(), self.dataset_lut()
        pe = np.where(p >= 0, mlut[np.maximum(p, 0)], -1)
        ge = np.where(g >= 0, dlut[np.maximum(g, 0)], -1)
        if unmapped == "ignore":
            ge = np.where((p >= 0) & (pe < 0), -1, ge)
        return pe, ge

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable statement of the mapping (name, parts, what is scored and ignored)."""
        return {"name": self.name, "model_parts": list(self.model_parts), "dataset_parts": list(self.dataset_parts),
                "mapping": dict(self.mapping), "evaluated_parts": list(self.evaluated_parts),
                "ignored_model_parts": list(self.ignored_model_parts),
                "ignored_dataset_parts": list(self.ignored_dataset_parts)}


# ----------------------------------------------------------------------------------------------
# Scores over meshes
# ----------------------------------------------------------------------------------------------
@dataclass
class MeshTruth:
    """A labelled mesh given as arrays (attribute names as :class:`gen3d.records.ShapeRecord`'s).

    Attributes:
        category: category name (selects the mapping when several are given).
        points: ``float [N, 3]`` the points the predictions belong to, in mesh coordinates.
        mesh_vertices: ``float [V, 3]``; mesh_faces: ``int [F, 3]``.
        face_labels: ``int [F]`` GT data-set part per face, -1 = unlabelled.
        part_names: the data-set part names ``face_labels`` index into (may be empty).
        shape_id: identifier for the per-shape rows.
    """

    category: str
    points: np.ndarray
    mesh_vertices: np.ndarray
    mesh_faces: np.ndarray
    face_labels: np.ndarray
    part_names: tuple[str, ...] = ()
    shape_id: str = ""


def _mapping_for(shape: Any, mapping: PartMapping | Mapping[str, PartMapping] | None) -> PartMapping:
    if isinstance(mapping, PartMapping):
        return mapping
    if mapping is None:
        names = tuple(shape.part_names)
        if not names:
            raise ValueError(f"shape {shape.shape_id!r} has no part_names: pass a PartMapping")
        return PartMapping.identity(names, name=f"identity:{shape.category}")
    if shape.category not in mapping:
        raise ValueError(f"no PartMapping for category {shape.category!r} (have {sorted(mapping)})")
    return mapping[shape.category]


def mesh_transfer_scores(shapes: Sequence[Any], point_predictions: Sequence[Any],
                         mapping: PartMapping | Mapping[str, PartMapping] | None = None,
                         k: int = LABEL_NEIGHBOURS, unmapped: str = "ignore") -> dict[str, Any]:
    """Per-face and area-weighted mIoU of point predictions transferred to labelled meshes.

    For each shape: faces get the 5-NN vote of the point predictions (:func:`face_labels_from_points`),
    model and GT labels are brought to the scored parts by the mapping (:meth:`PartMapping.apply`),
    and part IoUs are computed per face and area-weighted (:func:`face_iou`); then instance and
    category mIoU under both absent conventions (:func:`eval.metrics.both_conventions`).

    Args:
        shapes: records with meshes (:class:`gen3d.records.ShapeRecord` from the Labeled-PSB / COSEG
            readers with ``keep_mesh=True``) or :class:`MeshTruth`.
        point_predictions: one ``int [N]`` per shape: model part index per point of ``shape.points``
            (-1 = no prediction).
        mapping: one :class:`PartMapping` for every shape, ``{category: PartMapping}``, or None (the
            identity on each shape's ``part_names``: the model predicts the data set's own parts).
        k: voters per face.
        unmapped: ``"ignore"`` or ``"wrong"`` (:meth:`PartMapping.apply`).

    Returns:
        ``{"per_face": {"one": summary, "skip": summary}, "area_weighted": {...}, "mappings":
        {category: PartMapping.describe()}, "unmapped": unmapped, "k": k, "shapes": [{"shape_id",
        "category", "num_faces", "scored_faces" (GT >= 0 after mapping), "ignored_faces",
        "ignored_area_fraction", "miou_per_face": {"one", "skip"}, "miou_area": {"one", "skip"}}]}``;
        each summary as :func:`eval.metrics.miou_summary`, parts named by the mapping's
        ``evaluated_parts``.

    Raises:
        ValueError: different numbers of shapes and predictions, a shape without a mesh or face
            labels, predictions not ``[N]``, a shape whose ``part_names`` differ from the mapping's
            data-set parts, labels out of range; as :func:`face_labels_from_points`.
    """
    if unmapped not in UNMAPPED:
        raise ValueError(f"unmapped must be one of {UNMAPPED}, got {unmapped!r}")
    shapes, point_predictions = list(shapes), list(point_predictions)
    if len(shapes) != len(point_predictions):
        raise ValueError(f"{len(shapes)} shapes but {len(point_predictions)} predictions")
    per_face, per_area, rows, described, names = [], [], [], {}, {}
    for shape, pred in zip(shapes, point_predictions):
        if shape.mesh_vertices is None or shape.mesh_faces is None or shape.face_labels is None:
            raise ValueError(f"shape {shape.shape_id!r} has no mesh or no face labels (read with keep_mesh=True)")
        pm = _mapping_for(shape, mapping)
        if tuple(shape.part_names) and tuple(shape.part_names) != pm.dataset_parts:
            raise ValueError(f"shape {shape.shape_id!r}: part_names {tuple(shape.part_names)} differ from the "
                             f"mapping's data-set parts {pm.dataset_parts} ({pm.name})")
        pred = np.asarray(pred)
        if pred.shape != (len(shape.points),):
            raise ValueError(f"shape {shape.shape_id!r}: predictions must have shape ({len(shape.points)},), "
                             f"got {pred.shape}")
        faces_model = face_labels_from_points(shape.points, pred, shape.mesh_vertices, shape.mesh_faces, k)
        fp, fg = pm.apply(faces_model, np.asarray(shape.face_labels), unmapped)
        areas = face_areas(shape.mesh_vertices, shape.mesh_faces)
        r = len(pm.evaluated_parts)
        if r == 0:
            raise ValueError(f"mapping {pm.name!r} scores no part")
        category = str(shape.category)
        described[category] = pm.describe()
        names[category] = pm.evaluated_parts
        per_face.append((category, fp, fg, r))
        per_area.append((category, fp, fg, r, areas))
        scored = fg >= 0
        total_area = float(areas.sum())
        rows.append({"shape_id": str(shape.shape_id), "category": category, "num_faces": len(fg),
                     "scored_faces": int(scored.sum()), "ignored_faces": int((~scored).sum()),
                     "ignored_area_fraction": float(areas[~scored].sum() / total_area) if total_area > 0 else 0.0,
                     "miou_per_face": {a: shape_miou(fp, fg, r, a) for a in ABSENT},
                     "miou_area": {a: shape_miou(fp, fg, r, a, areas) for a in ABSENT}})
    return {"per_face": both_conventions(per_face, names), "area_weighted": both_conventions(per_area, names),
            "mappings": described, "unmapped": unmapped, "k": int(k), "shapes": rows}
