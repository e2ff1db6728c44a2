"""Predictions files: per-point part probabilities and labels of a collection, per-face labels for meshes.

Schema v1 (HDF5; root attributes ``schema = "partdistill.predictions"``, ``schema_version = 1``,
``category``, ``part_names`` (JSON list), ``collection`` (path), ``num_points`` N, ``meta`` (JSON:
model, run, ...)); one row per predicted collection shape:

=====================  ==================  ==================================================
``probs``              float16 [S, N, R]   softmax of the student's logits, stored point order
``labels``             int16 [S, N]        argmax of the (float32) probabilities
``row``                int64 [S]           row of the shape in the collection
``source``             str [S]             the key ``(source, dataset, shape_id)``
``dataset``            str [S]
``shape_id``           str [S]
``face_offset``        int64 [S]           first row of the shape in ``face_labels``
``face_count``         int64 [S]           number of faces; -1 = the shape has no mesh
``face_labels``        int16 [TF]          ragged: per-face labels, a vote of the ``k`` points
                                           nearest to each face centroid
                                           (:func:`gen3d.surface.vote_face_labels`)
=====================  ==================  ==================================================

The file is written under a temporary name and renamed once complete. :func:`read_predictions`
opens it (:class:`Predictions`). :func:`render_sheet` draws a PNG of a few shapes with coloured parts
(an orthographic point splat with a z-buffer, numpy + PIL only).
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from gen3d.collection import Collection
from gen3d.dataset import normalize_unit_sphere
from gen3d.errors import DataFormatError

SCHEMA = "partdistill.predictions"
SCHEMA_VERSION = 1
_STR = h5py.string_dtype()
PALETTE = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189], [140, 86, 75],
                    [227, 119, 194], [188, 189, 34], [23, 190, 207], [127, 127, 127], [174, 199, 232],
                    [255, 187, 120], [152, 223, 138], [255, 152, 150], [197, 176, 213], [196, 156, 148]], np.uint8)
UNLABELLED = np.array([200, 200, 200], np.uint8)


def load_model(path: str | os.PathLike) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a trained student from a run folder (``RUN/model``) or a model folder.

    The class is the ``class`` entry (``"module:Name"``) of the folder's ``partdistill.json``
    (default :class:`distill.student.Student`), loaded with ``from_pretrained``.

    Returns:
        ``(model in eval mode, partdistill.json content)``.

    Raises:
        FileNotFoundError: no model folder (``config.json``) at ``path`` or ``path/model``.
    """
    from .trainer import _import

    path = Path(path)
    model_dir = path / "model" if (path / "model" / "config.json").exists() else path
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{path}: no trained model here (expected config.json in it or in model/)")
    meta_file = model_dir / "partdistill.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    cls = _import(meta.get("class") or "distill.student:Student")
    model = cls.from_pretrained(str(model_dir))
    return model.eval(), {**meta, "model_dir": str(model_dir)}


def _select_rows(c: Collection, rows: Sequence[int] | None, category: str | None) -> np.ndarray:
    if rows is not None:
        rows = np.asarray(rows, np.int64)
        if len(rows) and (rows.min() < 0 or rows.max() >= len(c)):
            raise IndexError(f"{c.path}: rows out of range [0, {len(c)})")
        return rows
    if category is not None and category in c.part_names:
        return c.select(category=category)
    if category is not None:
        raise ValueError(f"{c.path}: no {category!r} shapes (categories: {sorted(c.part_names)})")
    return np.arange(len(c), dtype=np.int64)


@torch.no_grad()
def predict_probs(model: torch.nn.Module, points: np.ndarray | torch.Tensor, batch_size: int = 16,
                  device: torch.device | str | None = None) -> np.ndarray:
    """Softmax part probabilities of unit-sphere-normalised clouds.

    Args:
        model: ``points float32 [B, N, 3] -> logits [B, N, R]`` (run in eval mode).
        points: ``float32 [S, N, 3]``.

    Returns:
        ``float32 [S, N, R]``.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    points = torch.as_tensor(points, dtype=torch.float32)
    was = model.training
    model.eval()
    out = []
    try:
        for s in range(0, len(points), batch_size):
            out.append(torch.softmax(model(points[s:s + batch_size].to(device)).float(), -1).cpu())
    finally:
        model.train(was)
    return torch.cat(out).numpy() if out else np.zeros((0, points.shape[1], 0), np.float32)


def predict(model_or_run: torch.nn.Module | str | os.PathLike, collection_path: str | os.PathLike,
            out_path: str | os.PathLike, batch_size: int = 16, mesh_faces: bool = True, k: int = 5,
            category: str | None = None, rows: Sequence[int] | None = None, device: torch.device | str | None = None,
            sheet: str | os.PathLike | None = None, sheet_shapes: int = 8, part_names: Sequence[str] | None = None,
            progress: bool = False) -> Path:
    """Predict part labels for collection shapes and write a predictions file.

    Each shape's N stored points are normalised to the unit sphere (as in training), the student's
    softmax gives ``probs float16 [N, R]`` and ``labels = argmax``; shapes with a mesh get per-face
    labels by a vote of the ``k`` points nearest to each face centroid.

    Args:
        model_or_run: a model, a run folder (``RUN/model``) or a model folder (:func:`load_model`).
        collection_path: the collection.
        out_path: the predictions ``.h5`` (replaced if it exists).
        batch_size: shapes per forward pass.
        mesh_faces: compute per-face labels for shapes with meshes.
        k: voters per face.
        category: predict the shapes of this category (default: the model's category when the
            collection has it, else every shape); ``rows`` overrides it.
        rows: collection rows to predict.
        device: default CUDA when available, else CPU.
        sheet: optional PNG path: the first ``sheet_shapes`` shapes drawn with parts coloured.
        part_names: part names to store (default: the model's, else the collection's for the category).
        progress: a progress bar.

    Returns:
        ``out_path``.

    Raises:
        FileNotFoundError: missing collection or model; ValueError: unknown category.
    """
    from tqdm import tqdm

    meta: dict[str, Any] = {}
    if isinstance(model_or_run, (str, os.PathLike)):
        model, meta = load_model(model_or_run)
        meta["run"] = str(model_or_run)
    else:
        model = model_or_run
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = model.to(device)
    with Collection(collection_path) as c:
        cat = category or (meta.get("category") if meta.get("category") in c.part_names else None)
        sel = _select_rows(c, rows, cat)
        probs = []
        for s in tqdm(range(0, len(sel), batch_size), desc="predict", disable=not progress):
            pts = np.stack([normalize_unit_sphere(c.points(int(r)))[0] for r in sel[s:s + batch_size]])
            probs.append(predict_probs(model, pts, batch_size, device))
        names = list(part_names or meta.get("part_names") or (c.part_names.get(cat, ()) if cat else ()))
    probs_arr = np.concatenate(probs) if probs else np.zeros((0, 0, 0), np.float32)
    path = write_predictions(out_path, collection_path, sel, probs_arr, part_names=names, category=cat,
                             mesh_faces=mesh_faces, k=k,
                             attrs={"model": meta.get("class") or f"{type(model).__module__}:{type(model).__qualname__}",
                                    "run": meta.get("run"), "k": k})
    if sheet is not None and len(sel):
        with Collection(collection_path) as c:
            m = min(sheet_shapes, len(sel))
            pts = [normalize_unit_sphere(c.points(int(r)))[0] for r in sel[:m]]
            titles = [str(c.shape_ids[int(r)]) for r in sel[:m]]
        render_sheet(pts, [p.argmax(1) for p in probs_arr[:m]], sheet, titles=titles)
    return path


def write_predictions(out_path: str | os.PathLike, collection_path: str | os.PathLike, rows: Sequence[int],
                      probs: np.ndarray, part_names: Sequence[str] = (), category: str | None = None,
                      mesh_faces: bool = True, k: int = 5, attrs: dict[str, Any] | None = None,
                      labels: np.ndarray | None = None) -> Path:
    """Write a predictions file (schema in the module docstring; temporary name, then rename).

    Args:
        out_path: the ``.h5`` to write.
        collection_path: the collection the rows refer to (for keys, raw points and meshes).
        rows: ``int [S]`` collection rows.
        probs: ``float [S, N, R]`` per-point probabilities, stored point order.
        part_names, category: stored as attributes.
        mesh_faces, k: per-face labels by a k-nearest-point vote for shapes with meshes.
        attrs: extra JSON-serialisable metadata (``meta`` attribute).
        labels: ``int [S, N]`` labels to store instead of ``argmax(probs)`` (e.g. -1 for points
            the voting baseline leaves uncovered).

    Returns:
        ``out_path``.

    Raises:
        ValueError: ``probs`` is not ``[S, N, R]`` with S = len(rows) and N the collection's N.
    """
    from gen3d.surface import vote_face_labels

    out_path = Path(out_path)
    rows = np.asarray(rows, np.int64)
    probs = np.asarray(probs)
    if labels is not None:
        labels = np.asarray(labels).astype(np.int16)
        if labels.shape != probs.shape[:2]:
            raise ValueError(f"labels must be {probs.shape[:2]}, got {labels.shape}")
    else:
        labels = probs.argmax(-1).astype(np.int16) if probs.size else np.zeros(probs.shape[:2], np.int16)
    face_parts, face_count = [], np.full(len(rows), -1, np.int64)
    with Collection(collection_path) as c:
        if probs.ndim != 3 or len(probs) != len(rows) or (len(rows) and probs.shape[1] != c.num_points):
            raise ValueError(f"probs must be [S={len(rows)}, N={c.num_points}, R], got {probs.shape}")
        keys = [(str(c.sources[r]), str(c.provenance(int(r)).get("dataset", "")), str(c.shape_ids[r])) for r in rows]
        n = c.num_points
        if mesh_faces:
            for j, r in enumerate(rows):
                mesh = c.mesh(int(r))
                if mesh is None:
                    continue
                face_parts.append(vote_face_labels(c.points(int(r)), labels[j], mesh[0], mesh[1], k))
                face_count[j] = len(mesh[1])
    face_offset = np.concatenate([[0], np.cumsum(np.maximum(face_count, 0))[:-1]]).astype(np.int64) \
        if len(rows) else np.zeros(0, np.int64)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as h5:
            h5.attrs.update({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "category": category or "",
                             "part_names": json.dumps(list(part_names)), "collection": str(collection_path),
                             "num_points": n, "meta": json.dumps(attrs or {})})
            chunks = (1,) + probs.shape[1:] if len(rows) else None
            h5.create_dataset("probs", data=probs.astype(np.float16), chunks=chunks, compression="gzip" if len(rows) else None)
            h5.create_dataset("labels", data=labels)
            h5.create_dataset("row", data=rows)
            for i, name in enumerate(("source", "dataset", "shape_id")):
                h5.create_dataset(name, data=np.array([kk[i] for kk in keys], dtype=object), dtype=_STR)
            h5.create_dataset("face_offset", data=face_offset)
            h5.create_dataset("face_count", data=face_count)
            h5.create_dataset("face_labels", data=np.concatenate(face_parts).astype(np.int16) if face_parts
                              else np.zeros(0, np.int16))
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    return out_path


def predict_inputs(run_dir: str | os.PathLike, inputs: Sequence[str | os.PathLike], out_path: str | os.PathLike,
                   category: str | None = None, png: str | os.PathLike | None = None, batch_size: int = 16,
                   num_points: int | None = None, k: int = 5) -> int:
    """``distill predict``: predict a collection file, or mesh / point-cloud files.

    Args:
        run_dir: a run folder or model folder (:func:`load_model`).
        inputs: one collection ``.h5``, or mesh / point-cloud files, folders or globs
            (:func:`gen3d.readers.meshes.read_files`; meshes are sampled to ``num_points``, default the
            run's ``num_points`` or 2048, and kept for per-face labels), written to a temporary collection.
        out_path: the predictions file.
        category: the category of the files (default: the run's); for a collection, the shapes to predict.
        png: optional PNG sheet of a few shapes.

    Returns:
        The number of predicted shapes.

    Raises:
        ValueError: no category for files; FileNotFoundError: missing inputs or model.
    """
    import tempfile

    from gen3d.collection import write_collection
    from gen3d.readers.meshes import read_files

    inputs = [Path(p) for p in inputs]
    model, meta = load_model(run_dir)
    if len(inputs) == 1 and inputs[0].suffix.lower() in (".h5", ".hdf5"):
        predict(model, inputs[0], out_path, batch_size=batch_size, k=k, category=category or meta.get("category"),
                sheet=png, part_names=meta.get("part_names"))
    else:
        cat = category or meta.get("category")
        if not cat:
            raise ValueError("the run records no category: pass --category for mesh / point files")
        n = num_points or meta.get("num_points") or 2048
        with tempfile.TemporaryDirectory() as tmp:
            coll = Path(tmp) / "inputs.h5"
            write_collection(coll, read_files(inputs, cat, num_points=n))
            predict(model, coll, out_path, batch_size=batch_size, k=k, category=cat, sheet=png,
                    part_names=meta.get("part_names"))
    with Predictions(out_path) as p:
        return len(p)


def vote_predictions(collection_path: str | os.PathLike, knowledge, out_path: str | os.PathLike,
                     weight: str = "confidence", mesh_faces: bool = True, k: int = 5) -> int:
    """``distill vote``: the direct back-projection voting baseline (:func:`distill.voting.vote`,
    PartDistill Table 5 row 1) as a predictions file.

    For every collection shape with knowledge: ``probs`` = the point's vote scores normalised to sum
    1 (all zeros for a point no unit covers), ``labels`` = the vote (-1 = uncovered).

    Args:
        collection_path: the collection; knowledge: a knowledge file path or object (``keys()``,
            ``units(i)``, ``part_names``, ``category``).
        out_path: the predictions file.
        weight: ``"confidence"`` or ``"uniform"`` votes.

    Returns:
        The number of shapes written.

    Raises:
        ValueError: no collection shape has knowledge.
    """
    from .trainer import _open_knowledge, collection_keys
    from .voting import vote

    kobj, opened = _open_knowledge(knowledge)
    try:
        kindex = {tuple(map(str, key)): i for i, key in enumerate(list(kobj.keys()))}
        with Collection(collection_path) as c:
            ckeys = collection_keys(c)
            rows = [r for r, key in enumerate(ckeys) if key in kindex]
            if not rows:
                raise ValueError(f"{collection_path}: no shape has knowledge units")
            n = c.num_points
            r_parts = len(getattr(kobj, "part_names", ()) or ()) or kobj.units(kindex[ckeys[rows[0]]]).num_parts
            probs = np.zeros((len(rows), n, r_parts), np.float32)
            labels = np.zeros((len(rows), n), np.int64)
            for j, r in enumerate(rows):
                labels[j], scores = vote(kobj.units(kindex[ckeys[r]]), n, r_parts, weight)
                total = scores.sum(1, keepdims=True)
                probs[j] = np.where(total > 0, scores / np.where(total > 0, total, 1), 0)
        write_predictions(out_path, collection_path, rows, probs, part_names=getattr(kobj, "part_names", ()),
                          category=getattr(kobj, "category", None), mesh_faces=mesh_faces, k=k,
                          attrs={"model": "voting", "weight": weight}, labels=labels)
    finally:
        if opened:
            kobj.close()
    return len(rows)


class Predictions:
    """A predictions file opened read-only (context manager, or call :meth:`close`).

    Attributes:
        path, category, part_names, collection, num_points, meta (dict), rows ``int64 [S]``.

    Raises:
        FileNotFoundError: missing file; gen3d.errors.DataFormatError: not a predictions file.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such predictions file")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as exc:
            raise DataFormatError(self.path, "file", f"not a readable HDF5 file: {exc}") from exc
        try:
            a = self._h5.attrs
            if a.get("schema") != SCHEMA or int(a.get("schema_version", -1)) != SCHEMA_VERSION:
                raise DataFormatError(self.path, "schema", f"not a partdistill predictions file v{SCHEMA_VERSION} "
                                      f"(schema {a.get('schema')!r}, version {a.get('schema_version')!r})")
            self.category = str(a["category"]) or None
            self.part_names = tuple(json.loads(a["part_names"]))
            self.collection = str(a["collection"])
            self.num_points = int(a["num_points"])
            self.meta = json.loads(a["meta"])
            self.rows = self._h5["row"][()]
            cols = [self._h5[n].asstr()[()].tolist() if len(self._h5[n]) else [] for n in ("source", "dataset", "shape_id")]
            self._keys = [tuple(k) for k in zip(*cols)]
            self._face_offset = self._h5["face_offset"][()]
            self._face_count = self._h5["face_count"][()]
        except DataFormatError:
            self._h5.close()
            raise
        except (KeyError, ValueError, TypeError) as exc:
            self._h5.close()
            raise DataFormatError(self.path, "file", f"malformed predictions file: {exc}") from exc

    def __len__(self) -> int:
        return len(self._keys)

    def __enter__(self) -> Predictions:  # noqa: PYI034
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying HDF5 file."""
        self._h5.close()

    def keys(self) -> list[tuple[str, str, str]]:
        """The shape keys ``(source, dataset, shape_id)`` in row order."""
        return list(self._keys)

    def index_of(self, key: tuple[str, str, str]) -> int:
        """Row of the shape with this key. Raises KeyError."""
        try:
            return self._keys.index(tuple(key))
        except ValueError:
            raise KeyError(f"{self.path}: no predictions for {key}") from None

    def probs(self, i: int) -> np.ndarray:
        """``float16 [N, R]`` part probabilities of shape ``i``."""
        return self._h5["probs"][i]

    def labels(self, i: int) -> np.ndarray:
        """``int16 [N]`` predicted part labels of shape ``i``."""
        return self._h5["labels"][i]

    def face_labels(self, i: int) -> np.ndarray | None:
        """``int16 [F]`` per-face labels of shape ``i``, or None if it has no mesh."""
        count = int(self._face_count[i])
        if count < 0:
            return None
        off = int(self._face_offset[i])
        return self._h5["face_labels"][off:off + count]


def read_predictions(path: str | os.PathLike) -> Predictions:
    """Open a predictions file (:class:`Predictions`)."""
    return Predictions(path)


def render_sheet(points: Sequence[np.ndarray], labels: Sequence[np.ndarray], path: str | os.PathLike,
                 size: int = 256, cols: int = 4, azimuth: float = 45.0, elevation: float = 25.0, radius: int = 1,
                 titles: Sequence[str] | None = None) -> Path:
    """Draw shapes as coloured points in an orthographic view, tiled into one PNG.

    Args:
        points: per shape ``float [N, 3]`` (unit sphere; y up).
        labels: per shape ``int [N]`` (-1 = light grey).
        path: the PNG to write.
        size: tile size in pixels; cols: tiles per row.
        azimuth, elevation: viewing direction in degrees.
        radius: points are squares of side ``2 * radius + 1`` pixels.
        titles: optional caption per tile.

    Returns:
        ``path``.
    """
    from PIL import Image, ImageDraw

    a, e = np.deg2rad(azimuth), np.deg2rad(elevation)
    right = np.array([np.cos(a), 0.0, -np.sin(a)])
    toward = np.array([np.sin(a) * np.cos(e), np.sin(e), np.cos(a) * np.cos(e)])   # towards the viewer
    up = np.cross(toward, right)
    rows = max(1, -(-len(points) // cols))
    sheet = np.full((rows * size, cols * size, 3), 255, np.uint8)
    offs = np.stack(np.meshgrid(np.arange(-radius, radius + 1), np.arange(-radius, radius + 1)), -1).reshape(-1, 2)
    for t, (pts, lab) in enumerate(zip(points, labels)):
        pts, lab = np.asarray(pts, np.float64), np.asarray(lab, np.int64)
        u = ((pts @ right) * 0.45 + 0.5) * (size - 1)
        v = (0.5 - (pts @ up) * 0.45) * (size - 1)
        depth = pts @ toward
        colour = np.where(lab[:, None] >= 0, PALETTE[np.maximum(lab, 0) % len(PALETTE)], UNLABELLED)
        px = (np.round(u)[:, None] + offs[None, :, 0]).astype(np.int64).ravel()
        py = (np.round(v)[:, None] + offs[None, :, 1]).astype(np.int64).ravel()
        d = np.repeat(depth, len(offs))
        c = np.repeat(colour, len(offs), axis=0)
        ok = (px >= 0) & (px < size) & (py >= 0) & (py < size)
        px, py, d, c = px[ok], py[ok], d[ok], c[ok]
        pix = py * size + px
        order = np.lexsort((-d, pix))                       # per pixel, nearest to the viewer first
        first = order[np.concatenate([[True], pix[order][1:] != pix[order][:-1]])] if len(order) else order
        tile = np.full((size * size, 3), 255, np.uint8)
        tile[pix[first]] = c[first]
        r0, c0 = (t // cols) * size, (t % cols) * size
        sheet[r0:r0 + size, c0:c0 + size] = tile.reshape(size, size, 3)
    img = Image.fromarray(sheet)
    if titles:
        draw = ImageDraw.Draw(img)
        for t, title in enumerate(titles[:len(points)]):
            draw.text(((t % cols) * size + 4, (t // cols) * size + 4), str(title), fill=(0, 0, 0))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    img.save(tmp)
    os.replace(tmp, path)
    return path
