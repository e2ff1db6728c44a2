"""Helpers shared by the readers: data-root lookup, per-shape seeds, mesh -> record."""
from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from ..records import ShapeRecord
from ..sampling import sample_surface

DATA_ROOT_ENV = "PARTDISTILL_DATA_ROOT"


def default_data_root() -> Path:
    """The shared data folder: ``$PARTDISTILL_DATA_ROOT`` if set, else ``../shared/data``
    relative to the repository checkout this package was installed from (editable install),
    else ``../shared/data`` relative to the working directory."""
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parents[2]
    candidate = checkout.parent / "shared" / "data"
    return candidate if candidate.exists() else Path.cwd().parent / "shared" / "data"


def shape_seed(seed: int, *key: str) -> int:
    """A per-shape seed from a global seed and the shape's identity (stable across runs and
    independent of the order shapes are read in)."""
    return int(np.random.SeedSequence([seed, zlib.crc32("/".join(key).encode())]).generate_state(1)[0])


def mesh_record(vertices: np.ndarray, faces: np.ndarray, face_labels: np.ndarray | None, *, shape_id: str,
                category: str, source: str, split: str, part_names: tuple[str, ...], num_points: int,
                seed: int, provenance: dict, keep_mesh: bool = True) -> ShapeRecord:
    """Sample ``num_points`` surface points (area-weighted, labels carried from faces) and build a
    record that keeps the mesh unless ``keep_mesh`` is False."""
    s = sample_surface(vertices, faces, num_points, seed=shape_seed(seed, source, shape_id), face_labels=face_labels)
    has_labels = face_labels is not None and bool(np.any(np.asarray(face_labels) >= 0))
    return ShapeRecord(
        shape_id=shape_id, category=category, source=source, split=split, points=s.points,
        part_names=part_names, labels=s.labels if has_labels else None, normals=s.normals,
        mesh_vertices=np.asarray(vertices, np.float32) if keep_mesh else None,
        mesh_faces=np.asarray(faces, np.int32) if keep_mesh else None,
        face_labels=(np.asarray(face_labels, np.int16) if has_labels else None) if keep_mesh else None,
        provenance=provenance)
