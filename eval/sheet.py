"""PNG sheets that put ground truth beside prediction, for the scoring CLI and the experiments."""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np


def comparison_sheet(collection: str | os.PathLike, predictions: str | os.PathLike, path: str | os.PathLike,
                     count: int = 6, split: str | None = None, category: str | None = None,
                     rows: Iterable[int] | None = None) -> Path | None:
    """Draw ground truth (left) beside prediction (right), parts coloured, for the first ``count``
    labelled shapes that have a prediction; one PNG (:func:`distill.predict.render_sheet`, 4 tiles a row).

    Args:
        collection: the collection with the shapes and their per-point labels.
        predictions: a predictions file (`distill predict` / `distill vote` / a TTA run).
        path: the PNG to write.
        count: shapes on the sheet (2 tiles each).
        split, category: choose shapes by split / category (ignored when ``rows`` is given).
        rows: collection row indices to choose from, in order.

    Returns:
        ``path``, or ``None`` when no labelled shape has a prediction (nothing is written).
    """
    from distill.extract import shape_key
    from distill.predict import read_predictions, render_sheet
    from gen3d.collection import Collection
    from gen3d.dataset import normalize_unit_sphere

    pts, labels, titles = [], [], []
    with Collection(collection) as c, read_predictions(predictions) as p:
        keys = {tuple(k): j for j, k in enumerate(p.keys())}
        chosen = rows if rows is not None else c.select(category=category, split=split)
        for i in (int(r) for r in chosen):
            j = keys.get(shape_key(c, i))
            gt = c.labels(i)
            if j is None or (gt < 0).all():
                continue
            pts += [normalize_unit_sphere(c.points(i))[0]] * 2
            labels += [gt.astype(np.int64), p.labels(j).astype(np.int64)]
            titles += [f"{c.shape_ids[i]} GT", f"{c.shape_ids[i]} pred"]
            if len(pts) >= 2 * count:
                break
    if not pts:
        return None
    return render_sheet(pts, labels, path, cols=4, titles=titles)
