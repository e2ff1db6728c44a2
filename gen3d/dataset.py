"""A ``torch.utils.data.Dataset`` view of a shape collection.

Each item is one shape, normalised to the unit sphere (centroid at the origin, farthest point at
distance 1) and brought to ``num_points`` points by

* ``sampling="fps"``: farthest point sampling (:func:`gen3d.sampling.farthest_point_sample`) from
  a start point chosen by the seeded generator, or
* ``sampling="random"``: a seeded uniform choice without replacement,

where the generator of item ``i`` is seeded by ``(seed, i)`` (and ``epoch`` if set with
:meth:`ShapeDataset.set_epoch`), so items are reproducible and independent of worker order.
With ``num_points`` equal to the stored N the points are returned in stored order.
The HDF5 file is opened lazily in each DataLoader worker.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .collection import Collection
from .sampling import resample_indices


def normalize_unit_sphere(points: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Centre ``float32 [N, 3]`` points on their centroid and scale the farthest to distance 1.

    Returns:
        ``(normalised points, centre [3], scale)`` with ``points = normalised * scale + centre``.
    """
    centre = points.mean(0)
    scale = float(np.linalg.norm(points - centre, axis=1).max()) or 1.0
    return ((points - centre) / scale).astype(np.float32), centre.astype(np.float32), scale


class ShapeDataset(Dataset):
    """Shapes of a collection as tensors.

    Args:
        path: the collection file.
        category, source, split: filters (see :meth:`gen3d.collection.Collection.select`).
        num_points: points per item (default: the collection's N; must not exceed it).
        sampling: ``"fps"`` or ``"random"`` (see the module docstring).
        normalize: unit-sphere normalisation.
        seed: base seed of the per-item generators.

    Items are dicts: ``points float32 [n, 3]``, ``normals float32 [n, 3]`` (zeros if none),
    ``labels int64 [n]`` (-1 = unlabelled), ``index`` (int, row in the collection),
    ``category`` (str), ``shape_id`` (str), ``centre float32 [3]``, ``scale`` (float).

    Raises:
        CollectionError: unknown filter values; ValueError: ``num_points`` > N or a bad ``sampling``.
    """

    def __init__(self, path: str | os.PathLike, category: str | Sequence[str] | None = None,
                 source: str | Sequence[str] | None = None, split: str | Sequence[str] | None = None,
                 num_points: int | None = None, sampling: str = "fps", normalize: bool = True, seed: int = 0):
        self.path = Path(path)
        with Collection(self.path) as c:
            self.indices = c.select(category=category, source=source, split=split)
            self.stored_points = c.num_points
            self.part_names = c.part_names
            self._categories = c.categories[self.indices]
            self._ids = c.shape_ids[self.indices]
        self.num_points = num_points or self.stored_points
        if self.num_points > self.stored_points:
            raise ValueError(f"{self.path}: num_points={self.num_points} exceeds the stored N={self.stored_points}")
        if sampling not in ("fps", "random"):
            raise ValueError(f"sampling must be 'fps' or 'random', got {sampling!r}")
        self.sampling, self.normalize, self.seed, self.epoch = sampling, normalize, seed, 0
        self._collection: Collection | None = None

    def set_epoch(self, epoch: int) -> None:
        """Draw a different (still seeded) subsample in each epoch."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def _open(self) -> Collection:
        if self._collection is None:
            self._collection = Collection(self.path)
        return self._collection

    def __getitem__(self, i: int) -> dict:
        c = self._open()
        row = int(self.indices[i])
        points = c.points(row)
        labels = c.labels(row).astype(np.int64)
        normals = c.normals(row)
        normals = np.zeros_like(points) if normals is None else normals
        if self.num_points < self.stored_points:
            seed = int(np.random.SeedSequence([self.seed, row, self.epoch]).generate_state(1)[0])
            keep = resample_indices(points, self.num_points, self.sampling, seed)
            points, labels, normals = points[keep], labels[keep], normals[keep]
        centre, scale = np.zeros(3, np.float32), 1.0
        if self.normalize:
            points, centre, scale = normalize_unit_sphere(points)
        return {"points": torch.from_numpy(np.ascontiguousarray(points)),
                "normals": torch.from_numpy(np.ascontiguousarray(normals, dtype=np.float32)),
                "labels": torch.from_numpy(labels), "index": row, "category": str(self._categories[i]),
                "shape_id": str(self._ids[i]), "centre": torch.from_numpy(centre), "scale": scale}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_collection"] = None  # each worker opens its own handle
        return state
