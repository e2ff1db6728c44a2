"""The in-memory shape record that every reader yields and every collection stores.

A :class:`ShapeRecord` is one shape: a fixed-size point cloud with optional per-point normals and
part labels, and optionally the triangle mesh the points were sampled from, with per-face labels.
Labels are *local* part indices into the category's part-name list (``part_names``), ``-1`` meaning
unlabelled. Readers (``gen3d.readers``), procedural shapes (``gen3d.procedural``) and generators
produce records; :mod:`gen3d.collection` writes and reads them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SOURCES = ("real", "generated", "procedural")
SPLITS = ("train", "val", "test", "none")


@dataclass
class ShapeRecord:
    """One shape of a collection.

    Attributes:
        shape_id: identifier unique within ``(source, dataset)``, e.g. ``"101"`` or a ShapeNet id.
        category: lower-case category name (ShapeNetPart names where one exists: ``chair``,
            ``airplane``, ``table``, ``mug``, ...).
        source: ``"real"``, ``"generated"`` or ``"procedural"``.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"none"``.
        points: ``float32 [N, 3]`` surface points, in the shape's own coordinates (not normalised).
        part_names: the category's part names; ``labels`` index into it.
        labels: ``int16 [N]`` local part index per point, ``-1`` = unlabelled; ``None`` if unlabelled.
        normals: ``float32 [N, 3]`` unit normals per point, or ``None``.
        mesh_vertices: ``float32 [V, 3]`` or ``None``.
        mesh_faces: ``int32 [F, 3]`` 0-based vertex indices, or ``None``.
        face_labels: ``int16 [F]`` local part index per face, ``-1`` = unlabelled, or ``None``.
        provenance: JSON-serialisable dict: at least ``dataset`` and ``file`` for real shapes;
            checkpoint hash, scheduler, steps and seed for generated ones; generator and seed for
            procedural ones.
    """

    shape_id: str
    category: str
    source: str
    split: str
    points: np.ndarray
    part_names: tuple[str, ...] = ()
    labels: np.ndarray | None = None
    normals: np.ndarray | None = None
    mesh_vertices: np.ndarray | None = None
    mesh_faces: np.ndarray | None = None
    face_labels: np.ndarray | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def num_points(self) -> int:
        return int(self.points.shape[0])

    @property
    def has_mesh(self) -> bool:
        return self.mesh_vertices is not None and self.mesh_faces is not None

    @property
    def key(self) -> tuple[str, str, str]:
        """De-duplication key: ``(source, dataset, shape_id)``."""
        return (self.source, str(self.provenance.get("dataset", "")), self.shape_id)
