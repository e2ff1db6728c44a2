"""Shape collections: the one on-disk format (HDF5, via h5py) shared by every stage.

Schema v1
=========
One HDF5 file holds S shapes of one or more categories, each with a fixed-size point cloud of
N points (N is the same for the whole file). Root attributes:

=====================  =====================================================================
``schema``             ``"partdistill.collection"``
``schema_version``     ``1``
``num_points``         N
``part_names``         JSON ``{category: [part name, ...]}``; labels index into these lists
``created_by``         ``"partdistill <version>"``
=====================  =====================================================================

Per-shape datasets (first axis S, resizable, chunked):

=======================  ==================  ==================================================
``points``               float32 [S, N, 3]   surface points in the shape's own coordinates
``normals``              float32 [S, N, 3]   unit normals; zeros where ``has_normals`` is 0
``has_normals``          uint8 [S]
``labels``               int16 [S, N]        local part index, -1 = unlabelled
``shape_id``             str [S]             unique within (source, dataset)
``category``             str [S]             lower-case category (ShapeNetPart names)
``source``               str [S]             ``real`` | ``generated`` | ``procedural``
``split``                str [S]             ``train`` | ``val`` | ``test`` | ``none``
``provenance``           str [S]             JSON: dataset, original file; for generated shapes
                                             checkpoint hash, scheduler, steps, seed
``mesh/vertex_offset``   int64 [S]           first row of the shape in ``mesh/vertices``
``mesh/vertex_count``    int64 [S]           0 = the shape has no mesh
``mesh/face_offset``     int64 [S]           first row in ``mesh/faces`` / ``mesh/face_labels``
``mesh/face_count``      int64 [S]
``mesh/vertices``        float32 [TV, 3]     ragged: all meshes' vertices, concatenated
``mesh/faces``           int32 [TF, 3]       0-based, local to the shape's own vertices
``mesh/face_labels``     int16 [TF]          local part index per face, -1 = unlabelled
=======================  ==================  ==================================================

Nothing is lost
===============
Writes are transactions: :func:`append_records` copies the file to a temporary name beside it,
appends, flushes, ``fsync``s and atomically renames it over the original (a new file is written
under a temporary name and renamed the same way). A writer killed mid-append therefore leaves the
previous file, with every earlier shape, untouched. One writer at a time (an ``flock`` on
``<file>.lock``); stale temporary files of killed writers are removed by the next writer.

Errors
======
:class:`gen3d.errors.CollectionError` (a ``ValueError``) names the file and field: unknown schema
or version, mismatched N, NaN/inf points, unknown category / source / split, conflicting part
names, truncated or non-HDF5 files. A missing file raises :class:`FileNotFoundError`.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import h5py
import numpy as np

from .errors import CollectionError
from .records import SOURCES, SPLITS, ShapeRecord

SCHEMA = "partdistill.collection"
SCHEMA_VERSION = 1
_STR = h5py.string_dtype()
_STR_FIELDS = ("shape_id", "category", "source", "split", "provenance")
_MESH_INDEX = ("vertex_offset", "vertex_count", "face_offset", "face_count")
_CHUNK_SHAPES = 32


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
class Collection:
    """A shape collection opened read-only.

    Args:
        path: the ``.h5`` file.

    Raises:
        FileNotFoundError: the file does not exist.
        CollectionError: not HDF5 / truncated, wrong schema or version, inconsistent datasets.

    The small per-shape string fields are read once; points, labels and meshes are read on demand.
    Use as a context manager or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"{self.path}: no such collection file")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as exc:
            raise CollectionError(self.path, "file", f"not a readable HDF5 file (truncated or corrupt): {exc}") from exc
        try:
            _validate(self._h5, self.path)
            self.num_points = int(self._h5.attrs["num_points"])
            self.part_names: dict[str, tuple[str, ...]] = {
                k: tuple(v) for k, v in json.loads(self._h5.attrs["part_names"]).items()}
            self.shape_ids = _read_str(self._h5["shape_id"])
            self.categories = _read_str(self._h5["category"])
            self.sources = _read_str(self._h5["source"])
            self.splits = _read_str(self._h5["split"])
        except Exception:
            self._h5.close()
            raise

    # -- container protocol -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.shape_ids)

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Close the underlying HDF5 file."""
        self._h5.close()

    def __iter__(self) -> Iterator[ShapeRecord]:
        for i in range(len(self)):
            yield self.record(i)

    # -- selection ----------------------------------------------------------------------------
    def select(self, category: str | Sequence[str] | None = None, source: str | Sequence[str] | None = None,
               split: str | Sequence[str] | None = None) -> np.ndarray:
        """Indices ``int64 [K]`` of the shapes matching every given filter (None = any).

        Raises:
            CollectionError: a category not in the collection, or an unknown source / split name.
        """
        mask = np.ones(len(self), dtype=bool)
        for field, values, allowed in (("category", category, set(self.part_names)),
                                       ("source", source, set(SOURCES)), ("split", split, set(SPLITS))):
            if values is None:
                continue
            wanted = {values} if isinstance(values, str) else set(values)
            unknown = wanted - allowed
            if unknown:
                raise CollectionError(self.path, field, f"unknown {field} {sorted(unknown)}; "
                                      f"this collection has {sorted(allowed)}")
            column = getattr(self, {"category": "categories", "source": "sources", "split": "splits"}[field])
            mask &= np.isin(column, list(wanted))
        return np.flatnonzero(mask)

    def keys(self) -> set[tuple[str, str, str]]:
        """De-duplication keys ``(source, dataset, shape_id)`` of all shapes."""
        datasets = [json.loads(p).get("dataset", "") for p in _read_str(self._h5["provenance"])]
        return set(zip(self.sources.tolist(), datasets, self.shape_ids.tolist()))

    # -- data ---------------------------------------------------------------------------------
    def points(self, index: int) -> np.ndarray:
        """``float32 [N, 3]`` points of shape ``index``.

        Raises:
            CollectionError: the stored points are not finite.
        """
        pts = self._h5["points"][index]
        if not np.all(np.isfinite(pts)):
            raise CollectionError(self.path, f"points[{index}]", "non-finite (NaN or inf) coordinates")
        return pts

    def labels(self, index: int) -> np.ndarray:
        """``int16 [N]`` local part labels of shape ``index`` (-1 = unlabelled)."""
        return self._h5["labels"][index]

    def normals(self, index: int) -> np.ndarray | None:
        """``float32 [N, 3]`` normals of shape ``index``, or None if it has none."""
        return self._h5["normals"][index] if self._h5["has_normals"][index] else None

    def mesh(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(vertices float32 [V,3], faces int32 [F,3], face_labels int16 [F])`` or None."""
        g = self._h5["mesh"]
        vo, vc, fo, fc = (int(g[name][index]) for name in _MESH_INDEX)
        if vc == 0:
            return None
        faces = g["faces"][fo:fo + fc]
        if len(faces) != fc or len(g["vertices"]) < vo + vc or (fc and (faces.min() < 0 or faces.max() >= vc)):
            raise CollectionError(self.path, f"mesh[{index}]", "mesh offsets or face indices out of range")
        return g["vertices"][vo:vo + vc], faces, g["face_labels"][fo:fo + fc]

    def provenance(self, index: int) -> dict:
        """The provenance dict of shape ``index``."""
        return json.loads(self._h5["provenance"][index])

    def record(self, index: int) -> ShapeRecord:
        """Shape ``index`` as a :class:`ShapeRecord` (labels None if all -1)."""
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: shape index {index} out of range [0, {len(self)})")
        labels = self.labels(index)
        mesh = self.mesh(index)
        cat = str(self.categories[index])
        return ShapeRecord(
            shape_id=str(self.shape_ids[index]), category=cat, source=str(self.sources[index]),
            split=str(self.splits[index]), points=self.points(index), part_names=self.part_names.get(cat, ()),
            labels=None if np.all(labels < 0) else labels, normals=self.normals(index),
            mesh_vertices=None if mesh is None else mesh[0], mesh_faces=None if mesh is None else mesh[1],
            face_labels=None if mesh is None or np.all(mesh[2] < 0) else mesh[2],
            provenance=self.provenance(index))

    def summary(self) -> list[tuple[str, str, str, int]]:
        """Rows ``(category, source, split, count)``, sorted."""
        keys, counts = np.unique(np.stack([self.categories, self.sources, self.splits], 1).astype(str),
                                 axis=0, return_counts=True) if len(self) else (np.zeros((0, 3)), [])
        return [(str(c), str(s), str(p), int(n)) for (c, s, p), n in zip(keys, counts)]


def _read_str(ds: h5py.Dataset) -> np.ndarray:
    return np.array(ds.asstr()[()], dtype=object) if len(ds) else np.zeros(0, dtype=object)


def _validate(h5: h5py.File, path: Path) -> None:
    if h5.attrs.get("schema") != SCHEMA:
        raise CollectionError(path, "schema", f"not a partdistill collection (schema attribute "
                              f"{h5.attrs.get('schema')!r}, expected {SCHEMA!r})")
    version = int(h5.attrs.get("schema_version", -1))
    if version != SCHEMA_VERSION:
        raise CollectionError(path, "schema_version", f"unknown schema version {version} "
                              f"(this partdistill reads version {SCHEMA_VERSION})")
    for attr in ("num_points", "part_names"):
        if attr not in h5.attrs:
            raise CollectionError(path, attr, "missing root attribute")
    try:
        json.loads(h5.attrs["part_names"])
    except (TypeError, ValueError) as exc:
        raise CollectionError(path, "part_names", f"not valid JSON: {exc}") from exc
    n = int(h5.attrs["num_points"])
    expected = {"points": (n, 3), "normals": (n, 3), "labels": (n,), "has_normals": ()}
    expected.update({f: () for f in _STR_FIELDS})
    expected.update({f"mesh/{f}": () for f in _MESH_INDEX})
    sizes = set()
    for name, tail in expected.items():
        if name not in h5:
            raise CollectionError(path, name, "missing dataset")
        shape = h5[name].shape
        if tuple(shape[1:]) != tail:
            raise CollectionError(path, name, f"shape {shape} does not match N={n} (expected [S, *{tail}])")
        sizes.add(shape[0])
    if len(sizes) != 1:
        raise CollectionError(path, "shapes", f"per-shape datasets have different lengths {sorted(sizes)}")
    for name in ("mesh/vertices", "mesh/faces", "mesh/face_labels"):
        if name not in h5:
            raise CollectionError(path, name, "missing dataset")


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def check_record(record: ShapeRecord, num_points: int, path: str | os.PathLike = "<record>") -> None:
    """Validate one record against the schema before it is written.

    Raises:
        CollectionError: naming the shape and field: wrong N or dtype shape, NaN/inf points,
            labels out of range of its part names, unknown source/split, bad mesh.
    """
    where = f"{record.source}/{record.shape_id}"
    pts = np.asarray(record.points)
    if pts.shape != (num_points, 3):
        raise CollectionError(path, f"{where}: points", f"shape {pts.shape}, the collection stores N={num_points}")
    if not np.all(np.isfinite(pts)):
        raise CollectionError(path, f"{where}: points", "non-finite (NaN or inf) coordinates")
    if record.source not in SOURCES:
        raise CollectionError(path, f"{where}: source", f"{record.source!r} is not one of {SOURCES}")
    if record.split not in SPLITS:
        raise CollectionError(path, f"{where}: split", f"{record.split!r} is not one of {SPLITS}")
    if not record.category or record.category != record.category.lower():
        raise CollectionError(path, f"{where}: category", f"{record.category!r} must be a non-empty lower-case name")
    k = len(record.part_names)
    for name, lab, size in (("labels", record.labels, num_points), ("face_labels", record.face_labels, None)):
        if lab is None:
            continue
        lab = np.asarray(lab)
        if size is not None and lab.shape != (size,):
            raise CollectionError(path, f"{where}: {name}", f"shape {lab.shape}, expected ({size},)")
        if lab.size and (lab.min() < -1 or lab.max() >= k):
            raise CollectionError(path, f"{where}: {name}", f"values must be in [-1, {k}) for parts {record.part_names}")
    if record.normals is not None and np.asarray(record.normals).shape != (num_points, 3):
        raise CollectionError(path, f"{where}: normals", f"shape {np.asarray(record.normals).shape}, expected ({num_points}, 3)")
    if record.has_mesh:
        v, f = np.asarray(record.mesh_vertices), np.asarray(record.mesh_faces)
        if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3 or len(v) == 0:
            raise CollectionError(path, f"{where}: mesh", f"vertices {v.shape} / faces {f.shape} must be [V,3] / [F,3]")
        if len(f) and (f.min() < 0 or f.max() >= len(v)):
            raise CollectionError(path, f"{where}: mesh_faces", "vertex index out of range")
        if not np.all(np.isfinite(v)):
            raise CollectionError(path, f"{where}: mesh_vertices", "non-finite coordinates")
        if record.face_labels is not None and len(record.face_labels) != len(f):
            raise CollectionError(path, f"{where}: face_labels", f"{len(record.face_labels)} labels for {len(f)} faces")


def _create_layout(h5: h5py.File, num_points: int) -> None:
    from . import __version__

    h5.attrs.update({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "num_points": num_points,
                     "part_names": "{}", "created_by": f"partdistill {__version__}"})
    c, n = _CHUNK_SHAPES, num_points
    h5.create_dataset("points", (0, n, 3), np.float32, maxshape=(None, n, 3), chunks=(c, n, 3))
    h5.create_dataset("normals", (0, n, 3), np.float32, maxshape=(None, n, 3), chunks=(c, n, 3))
    h5.create_dataset("has_normals", (0,), np.uint8, maxshape=(None,), chunks=(1024,))
    h5.create_dataset("labels", (0, n), np.int16, maxshape=(None, n), chunks=(c, n))
    for name in _STR_FIELDS:
        h5.create_dataset(name, (0,), _STR, maxshape=(None,), chunks=(1024,))
    g = h5.create_group("mesh")
    for name in _MESH_INDEX:
        g.create_dataset(name, (0,), np.int64, maxshape=(None,), chunks=(1024,))
    g.create_dataset("vertices", (0, 3), np.float32, maxshape=(None, 3), chunks=(65536, 3))
    g.create_dataset("faces", (0, 3), np.int32, maxshape=(None, 3), chunks=(65536, 3))
    g.create_dataset("face_labels", (0,), np.int16, maxshape=(None,), chunks=(65536,))


def _extend(ds: h5py.Dataset, values: np.ndarray) -> None:
    start = ds.shape[0]
    ds.resize(start + len(values), axis=0)
    if len(values):
        ds[start:] = values


def _merge_part_names(h5: h5py.File, records: Sequence[ShapeRecord], path: Path) -> None:
    names = json.loads(h5.attrs["part_names"])
    for r in records:
        have = names.setdefault(r.category, list(r.part_names))
        if tuple(have) != tuple(r.part_names):
            raise CollectionError(path, "part_names", f"category {r.category!r} has parts {tuple(have)} in the "
                                  f"collection but {tuple(r.part_names)} in shape {r.source}/{r.shape_id}")
    h5.attrs["part_names"] = json.dumps(names)


def _append_to_open(h5: h5py.File, records: Sequence[ShapeRecord], path: Path) -> None:
    n = int(h5.attrs["num_points"])
    for r in records:
        check_record(r, n, path)
    _merge_part_names(h5, records, path)
    s = len(records)
    _extend(h5["points"], np.stack([np.asarray(r.points, np.float32) for r in records]))
    _extend(h5["normals"], np.stack([np.zeros((n, 3), np.float32) if r.normals is None
                                     else np.asarray(r.normals, np.float32) for r in records]))
    _extend(h5["has_normals"], np.array([r.normals is not None for r in records], np.uint8))
    _extend(h5["labels"], np.stack([np.full(n, -1, np.int16) if r.labels is None
                                    else np.asarray(r.labels, np.int16) for r in records]))
    for name in _STR_FIELDS:
        values = [json.dumps(r.provenance, sort_keys=True, default=_json_default) if name == "provenance"
                  else str(getattr(r, name)) for r in records]
        _extend(h5[name], np.array(values, dtype=object))
    g = h5["mesh"]
    v0, f0 = g["vertices"].shape[0], g["faces"].shape[0]
    vcount = np.array([len(r.mesh_vertices) if r.has_mesh else 0 for r in records], np.int64)
    fcount = np.array([len(r.mesh_faces) if r.has_mesh else 0 for r in records], np.int64)
    _extend(g["vertex_offset"], v0 + np.concatenate([[0], np.cumsum(vcount)[:-1]]) if s else vcount)
    _extend(g["vertex_count"], vcount)
    _extend(g["face_offset"], f0 + np.concatenate([[0], np.cumsum(fcount)[:-1]]) if s else fcount)
    _extend(g["face_count"], fcount)
    meshes = [r for r in records if r.has_mesh]
    if meshes:
        _extend(g["vertices"], np.concatenate([np.asarray(r.mesh_vertices, np.float32) for r in meshes]))
        _extend(g["faces"], np.concatenate([np.asarray(r.mesh_faces, np.int32) for r in meshes]))
        _extend(g["face_labels"], np.concatenate([
            np.full(len(r.mesh_faces), -1, np.int16) if r.face_labels is None
            else np.asarray(r.face_labels, np.int16) for r in meshes]))


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (np.ndarray, set, tuple)):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"provenance value of type {type(obj).__name__} is not JSON-serialisable")


@contextlib.contextmanager
def _writer_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):
            stale.unlink(missing_ok=True)  # left by a writer that was killed
        yield


def append_records(path: str | os.PathLike, records: Iterable[ShapeRecord], num_points: int | None = None) -> int:
    """Append records to a collection in one transaction, creating the file if needed.

    Args:
        path: the ``.h5`` file.
        records: shapes to add (all validated before anything is written).
        num_points: N for a new file (default: N of the first record); must match an existing file.

    Returns:
        The number of shapes in the collection afterwards.

    Raises:
        CollectionError: a record does not fit the schema (nothing is written), or the existing
            file is not a valid collection.
    """
    path = Path(path)
    records = list(records)
    with _writer_lock(path):
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            if path.exists():
                with Collection(path) as existing:  # validates the schema
                    n = existing.num_points
                if num_points is not None and num_points != n:
                    raise CollectionError(path, "num_points", f"collection stores N={n}, asked for {num_points}")
                shutil.copyfile(path, tmp)
                mode = "r+"
            else:
                if num_points is None and not records:
                    raise CollectionError(path, "num_points", "cannot create an empty collection without num_points")
                n = int(num_points if num_points is not None else np.asarray(records[0].points).shape[0])
                mode = "w"
            with h5py.File(tmp, mode) as h5:
                if mode == "w":
                    _create_layout(h5, n)
                _append_to_open(h5, records, path)
                total = h5["points"].shape[0]
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    return total


class CollectionWriter:
    """Buffered writer: collects records and commits them with :func:`append_records` every
    ``commit_every`` shapes and on close, so that a long job that is interrupted keeps every
    committed shape and can resume (use :meth:`has` to skip shapes already written).

    Args:
        path: the ``.h5`` file (created on the first commit if missing).
        num_points: N; required for a new file unless records carry it.
        commit_every: shapes per transaction.
    """

    def __init__(self, path: str | os.PathLike, num_points: int | None = None, commit_every: int = 256):
        self.path = Path(path)
        self.num_points = num_points
        self.commit_every = commit_every
        self._buffer: list[ShapeRecord] = []
        self._keys: set[tuple[str, str, str]] = set()
        if self.path.exists():
            with Collection(self.path) as c:
                self._keys = c.keys()
                if num_points is not None and c.num_points != num_points:
                    raise CollectionError(self.path, "num_points", f"collection stores N={c.num_points}, asked for {num_points}")
                self.num_points = c.num_points
        self.written = 0

    def has(self, key: tuple[str, str, str]) -> bool:
        """Whether a shape with this ``(source, dataset, shape_id)`` is written or buffered."""
        return key in self._keys

    def add(self, record: ShapeRecord) -> bool:
        """Buffer one record; returns False (and ignores it) if its key is already present."""
        if record.key in self._keys:
            return False
        check_record(record, self.num_points or len(record.points), self.path)
        self._keys.add(record.key)
        self._buffer.append(record)
        if len(self._buffer) >= self.commit_every:
            self.commit()
        return True

    def commit(self) -> None:
        """Write the buffered records now (one transaction)."""
        if self._buffer:
            append_records(self.path, self._buffer, self.num_points)
            self.written += len(self._buffer)
            self._buffer = []

    def __enter__(self) -> CollectionWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None or exc_type is KeyboardInterrupt:
            self.commit()


def write_collection(path: str | os.PathLike, records: Iterable[ShapeRecord], num_points: int | None = None,
                     overwrite: bool = False) -> int:
    """Write a new collection (temporary name, then rename). Returns the number of shapes.

    Raises:
        FileExistsError: the file exists and ``overwrite`` is False.
        CollectionError: see :func:`check_record`.
    """
    path = Path(path)
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path}: exists (pass overwrite=True to replace it)")
        path.unlink()
    return append_records(path, records, num_points)
