"""Reader for ShapeNetPart (Yi et al. 2016, "A scalable active framework for region annotation in
3D shape collections") in its three published layouts, and its official train/val/test splits.

Layouts (``layout=`` argument of :func:`read_shapenetpart`):

* ``"v0"`` - ``shapenetcore_partanno_segmentation_benchmark_v0``::

      <root>/<synset>/points/<id>.pts          "x y z" per line
      <root>/<synset>/points_label/<id>.seg    one 1-based LOCAL part id per line

* ``"normal"`` - ``shapenetcore_partanno_segmentation_benchmark_v0_normal``::

      <root>/<synset>/<id>.txt                 "x y z nx ny nz label" per line,
                                               label = GLOBAL part id 0..49
      <root>/train_test_split/shuffled_{train,val,test}_file_list.json

* ``"hdf5"`` - ``shapenet_part_seg_hdf5_data`` (PointNet release)::

      <root>/ply_data_{train,val,test}<k>.h5   data float [B, 2048, 3], label [B, 1] (category index
                                               0..15, alphabetical order), pid [B, 2048] (GLOBAL
                                               part id), optional normal [B, 2048, 3]
      <root>/ply_data_<split><k>_id2file.json  optional; also ply_data_<split>_<k>_id2file.json;
                                               one "<synset>/<id>" per row

Every record has *local* 0-based part ids (global id - ``pid_start`` of the category, see
``gen3d/data/shapenetpart.yaml``) and the category's canonical ``part_names``.

Errors: :class:`gen3d.errors.DataFormatError` (naming file and field) for every malformed,
truncated or inconsistent file; :class:`FileNotFoundError` for a missing root or split directory.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Iterator
from pathlib import Path

import numpy as np

from ..errors import DataFormatError
from ..parts import shapenetpart_categories, shapenetpart_category
from ..records import SPLITS, ShapeRecord
from ..sampling import resample_indices
from ._common import shape_seed

LAYOUTS = ("v0", "normal", "hdf5")
SPLIT_NAMES = ("train", "val", "test")
_H5_NAME = re.compile(r"^ply_data_(train|val|test)_?(\d*)\.h5$")


# --------------------------------------------------------------------------------------------
# Small text parsers (shared with gen3d.readers.coseg)
# --------------------------------------------------------------------------------------------

def read_numeric_table(path: str | os.PathLike, ncols: int, what: str = "values") -> np.ndarray:
    """Read a whitespace-separated ASCII table with exactly ``ncols`` columns per non-blank line.

    Args:
        path: the text file (``.pts``, ``.txt``, ``.seg``).
        ncols: required number of columns on every non-blank line.
        what: description of the columns, used in error messages (e.g. ``"x y z"``).

    Returns:
        ``float64 [N, ncols]``, N >= 1, all finite.

    Raises:
        FileNotFoundError: the file does not exist.
        DataFormatError: not ASCII text, empty, a line with another number of columns, a
            non-numeric token, or a NaN/inf value.
    """
    path = Path(path)
    data = path.read_bytes()
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise DataFormatError(path, "file", "not an ASCII text file") from exc
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        tokens = line.split()
        if not tokens:
            continue
        if len(tokens) != ncols:
            raise DataFormatError(path, f"line {lineno}",
                                  f"expected {ncols} column(s) ({what}), got {len(tokens)}")
        rows.append(tokens)
    if not rows:
        raise DataFormatError(path, "rows", f"empty file (no {what} rows)")
    try:
        with np.errstate(all="ignore"):
            arr = np.array(rows, dtype=np.float64)
    except (ValueError, TypeError, OverflowError) as exc:
        raise DataFormatError(path, "values", f"non-numeric token in {what} ({exc})") from exc
    bad = ~np.isfinite(arr)
    if bad.any():
        line = int(np.argwhere(bad)[0][0])
        raise DataFormatError(path, "values", f"non-finite (NaN or inf) value in {what} (row {line + 1})")
    return arr


def as_integer_labels(values: np.ndarray, path: str | os.PathLike, field: str) -> np.ndarray:
    """Check that float ``values`` are integers (``3`` or ``3.0``) and return them as ``int64``.

    Raises:
        DataFormatError: a non-integral or huge value (naming ``path`` and ``field``).
    """
    values = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(values)) or np.any(values != np.round(values)) or np.any(np.abs(values) > 2**31):
        raise DataFormatError(path, field, "labels must be integers")
    return values.astype(np.int64)


def read_label_file(path: str | os.PathLike) -> np.ndarray:
    """Read a label file with one integer per line (ShapeNetPart ``.seg``, COSEG ``.seg``).

    Returns:
        ``int64 [N]``.

    Raises:
        FileNotFoundError, DataFormatError (see :func:`read_numeric_table`; also non-integers).
    """
    return as_integer_labels(read_numeric_table(path, 1, "label")[:, 0], path, "labels")


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------

def _parse_entry(entry: object, path: Path, index: int) -> tuple[str, str]:
    if not isinstance(entry, str):
        raise DataFormatError(path, f"entry {index}",
                              f"expected a string 'shape_data/<synset>/<id>', got {type(entry).__name__}")
    parts = [p for p in entry.strip().split("/") if p]
    if len(parts) < 2 or (len(parts) > 2 and parts[0] != "shape_data") or len(parts) > 3:
        raise DataFormatError(path, f"entry {index}", f"expected 'shape_data/<synset>/<id>', got {entry[:80]!r}")
    return parts[-2], parts[-1]


def load_splits(split_dir: str | os.PathLike) -> dict[str, set[tuple[str, str]]]:
    """Load ShapeNetPart's official split lists.

    Reads ``<split_dir>/shuffled_{train,val,test}_file_list.json`` (JSON lists of
    ``"shape_data/<synset>/<id>"``; ``"<synset>/<id>"`` is accepted too). A list that is absent
    counts as empty (some copies ship only the train list), but at least one must exist. The
    official lists have 12137 / 1870 / 2874 entries, and a few ids occur in two lists; they are
    kept (membership is a set per split).

    Args:
        split_dir: the ``train_test_split`` folder.

    Returns:
        ``{"train": {(synset, shape_id), ...}, "val": {...}, "test": {...}}`` (always all three keys).

    Raises:
        FileNotFoundError: ``split_dir`` missing, or none of the three lists in it.
        DataFormatError: a list that is not UTF-8 JSON, not a list, or has a malformed entry.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir}: no such split directory")
    out: dict[str, set[tuple[str, str]]] = {}
    found = 0
    for split in SPLIT_NAMES:
        path = split_dir / f"shuffled_{split}_file_list.json"
        out[split] = set()
        if not path.is_file():
            continue
        found += 1
        try:
            entries = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise DataFormatError(path, "json", f"not a valid JSON file ({exc})") from exc
        if not isinstance(entries, list):
            raise DataFormatError(path, "json", f"expected a JSON list of entries, got {type(entries).__name__}")
        out[split] = {_parse_entry(e, path, i) for i, e in enumerate(entries)}
    if not found:
        raise FileNotFoundError(f"{split_dir}: no shuffled_{{train,val,test}}_file_list.json in it")
    return out


def _split_of(splits: dict[str, set[tuple[str, str]]] | None, synset: str, shape_id: str) -> str:
    if splits is None:
        return "none"
    for split in SPLIT_NAMES:  # an id in several lists gets the first of train, val, test
        if (synset, shape_id) in splits[split]:
            return split
    return "none"


# --------------------------------------------------------------------------------------------
# Layout detection
# --------------------------------------------------------------------------------------------

def _synset_dirs(root: Path) -> list[tuple[str, str, Path]]:
    """``(name, synset, dir)`` for every known-synset folder of ``root`` (others are skipped)."""
    by_synset = {entry["synset"]: name for name, entry in shapenetpart_categories().items()}
    out = []
    for d in sorted(root.iterdir()):
        if d.is_dir() and d.name in by_synset:
            out.append((by_synset[d.name], d.name, d))
    return out


def detect_layout(root: str | os.PathLike) -> str:
    """Guess the ShapeNetPart layout of ``root``: ``"hdf5"`` if it holds ``ply_data_*.h5`` files,
    ``"v0"`` if a synset folder has ``points/``, ``"normal"`` if a synset folder has ``*.txt``.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        DataFormatError: none of the three layouts is recognised.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such ShapeNetPart directory")
    if any(_H5_NAME.match(p.name) for p in root.iterdir() if p.is_file()):
        return "hdf5"
    for _, _, d in _synset_dirs(root):
        if (d / "points").is_dir():
            return "v0"
        if any(d.glob("*.txt")):
            return "normal"
    raise DataFormatError(root, "layout", "no ShapeNetPart layout recognised (expected ply_data_*.h5, "
                          "<synset>/points/*.pts or <synset>/*.txt)")


# --------------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------------

def _to_local(labels: np.ndarray, offset: int, nparts: int, path: str | os.PathLike, field: str,
              category: str, kind: str) -> np.ndarray:
    local = labels - offset
    bad = (local < 0) | (local >= nparts)
    if bad.any():
        v = int(labels[np.argmax(bad)])
        raise DataFormatError(path, field, f"{kind} part id {v} is outside {category}'s parts "
                              f"[{offset}, {offset + nparts})")
    return local.astype(np.int16)


def _make_record(points, labels, normals, *, name, synset, shape_id, split, layout, file,
                 num_points, resample, seed, extra=None) -> ShapeRecord:
    n = len(points)
    if num_points is not None and n != num_points:
        idx = resample_indices(points, num_points, method=resample, seed=shape_seed(seed, synset, shape_id))
        points, labels = points[idx], labels[idx]
        normals = None if normals is None else normals[idx]
    prov = {"dataset": "shapenetpart", "layout": layout, "file": str(file), "synset": synset}
    prov.update(extra or {})
    return ShapeRecord(
        shape_id=shape_id, category=name, source="real", split=split,
        points=np.ascontiguousarray(points, dtype=np.float32),
        part_names=tuple(shapenetpart_categories()[name]["parts"]),
        labels=np.ascontiguousarray(labels, dtype=np.int16),
        normals=None if normals is None else np.ascontiguousarray(normals, dtype=np.float32),
        provenance=prov,
    )


def read_shapenetpart(root: str | os.PathLike, categories: Collection[str] | None = None,
                      splits: Collection[str] | None = None, layout: str = "auto",
                      split_dir: str | os.PathLike | None | bool = None, num_points: int | None = 2048,
                      resample: str = "fps", seed: int = 0) -> Iterator[ShapeRecord]:
    """Read ShapeNetPart (Yi et al. 2016) shapes as :class:`ShapeRecord` s.

    Args:
        root: the dataset folder in one of the layouts of this module's docstring.
        categories: names (any case, ``"chair"``) or synsets (``"03001627"``) to keep (a single
            string is one category); all if None.
        splits: split names (``"train"``, ``"val"``, ``"test"``, ``"none"``) to keep; all if None.
        layout: ``"v0"``, ``"normal"``, ``"hdf5"`` or ``"auto"`` (:func:`detect_layout`).
        split_dir: folder of the official split lists (:func:`load_splits`) for the v0/normal
            layouts. ``None``: ``<root>/train_test_split`` if it holds a list, else no splits;
            ``False``: no splits. A shape in no list gets split ``"none"``; a shape in several lists
            gets the first of train, val, test. The hdf5 layout takes the split from the file name
            and ignores ``split_dir``.
        num_points: every record gets exactly this many points (farthest point or random
            resampling, :func:`gen3d.sampling.resample_indices`, seeded per shape from ``seed``
            and ``<synset>/<id>``; clouds that already have ``num_points`` points are kept as they
            are); ``None`` keeps the file's points.
        resample: ``"fps"`` or ``"random"``.
        seed: global seed of the resampling.

    Returns:
        An iterator (files are read lazily, in sorted order) of records with ``source="real"``,
        ``category`` the lower-case ShapeNetPart name, ``points float32 [num_points, 3]``,
        ``labels int16 [num_points]`` local 0-based part ids, ``part_names`` the category's parts,
        ``normals float32 [num_points, 3]`` (normal and hdf5-with-``normal`` layouts, as stored) or
        None, ``shape_id`` the ShapeNet model id (hdf5 without id2file: ``"<file stem>:<row>"``) and
        ``provenance = {"dataset": "shapenetpart", "layout", "file" (hdf5: "path:row"), "synset"}``.

    Raises:
        FileNotFoundError: ``root`` (or an explicit ``split_dir``) does not exist.
        KeyError: an unknown category in ``categories``.
        ValueError: an unknown layout, split name or resampling method, a negative seed.
        DataFormatError: malformed files (raised when the iterator reaches them): bad columns,
            non-numeric or non-finite values, ``.pts``/``.seg`` row counts that differ, a missing
            ``.seg``, a part id outside the category's parts, bad HDF5 datasets or id2file JSON;
            eagerly for malformed split lists or a root in no recognised layout. Folders whose name is not one of the 16 synsets are skipped.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such ShapeNetPart directory")
    if layout == "auto":
        layout = detect_layout(root)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown ShapeNetPart layout {layout!r} ({', '.join(LAYOUTS)}, auto)")
    if resample not in ("fps", "random"):
        raise ValueError(f"unknown resampling method {resample!r} (fps | random)")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if num_points is not None and int(num_points) < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    if isinstance(categories, str):
        categories = [categories]
    cats = None if categories is None else {shapenetpart_category(c)[0] for c in categories}
    if isinstance(splits, str):
        splits = [splits]
    keep_splits = None if splits is None else set(splits)
    if keep_splits is not None and not keep_splits <= set(SPLITS):
        raise ValueError(f"unknown split(s) {sorted(keep_splits - set(SPLITS))} ({', '.join(SPLITS)})")
    opts = dict(num_points=None if num_points is None else int(num_points), resample=resample, seed=seed)
    if layout == "hdf5":
        return _iter_hdf5(root, cats, keep_splits, opts)
    split_sets = None
    if split_dir is None:
        cand = root / "train_test_split"
        if cand.is_dir() and any(cand.glob("shuffled_*_file_list.json")):
            split_sets = load_splits(cand)
    elif split_dir is not False:
        split_sets = load_splits(split_dir)
    return _iter_files(root, layout, cats, keep_splits, split_sets, opts)


def _iter_files(root, layout, cats, keep_splits, split_sets, opts) -> Iterator[ShapeRecord]:
    table = shapenetpart_categories()
    for name, synset, d in _synset_dirs(root):
        if cats is not None and name not in cats:
            continue
        entry = table[name]
        nparts, offset = len(entry["parts"]), int(entry["pid_start"])
        files = sorted((d / "points").glob("*.pts")) if layout == "v0" else sorted(d.glob("*.txt"))
        for path in files:
            shape_id = path.stem
            split = _split_of(split_sets, synset, shape_id)
            if keep_splits is not None and split not in keep_splits:
                continue
            if layout == "v0":
                seg = d / "points_label" / f"{shape_id}.seg"
                if not seg.is_file():
                    raise DataFormatError(path, "labels", f"missing label file {seg}")
                points = read_numeric_table(path, 3, "x y z")
                raw = read_label_file(seg)
                if len(raw) != len(points):
                    raise DataFormatError(path, "rows",
                                          f"{len(points)} points in {path} but {len(raw)} labels in {seg}")
                labels = _to_local(raw, 1, nparts, seg, "labels", name, "1-based local")
                normals, extra = None, {"labels_file": str(seg)}
            else:
                table7 = read_numeric_table(path, 7, "x y z nx ny nz label")
                points, normals = table7[:, :3], table7[:, 3:6]
                raw = as_integer_labels(table7[:, 6], path, "label (column 7)")
                labels = _to_local(raw, offset, nparts, path, "label (column 7)", name, "global")
                extra = None
            yield _make_record(points, labels, normals, name=name, synset=synset, shape_id=shape_id,
                               split=split, layout=layout, file=path, extra=extra, **opts)


def _h5_files(root: Path) -> list[tuple[str, Path]]:
    files = []
    for p in root.iterdir():
        m = _H5_NAME.match(p.name)
        if m and p.is_file():
            files.append((SPLIT_NAMES.index(m.group(1)), int(m.group(2) or 0), m.group(1), p))
    return [(split, p) for _, _, split, p in sorted(files)]


def _id2file(h5path: Path, split: str, rows: int) -> list[tuple[str, str]] | None:
    m = _H5_NAME.match(h5path.name)
    k = m.group(2) if m else ""
    for cand in (f"ply_data_{split}{k}_id2file.json", f"ply_data_{split}_{k}_id2file.json"):
        path = h5path.with_name(cand)
        if path.is_file():
            break
    else:
        return None
    try:
        entries = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise DataFormatError(path, "json", f"not a valid JSON file ({exc})") from exc
    if not isinstance(entries, list) or len(entries) != rows:
        got = f"{len(entries)} entries" if isinstance(entries, list) else type(entries).__name__
        raise DataFormatError(path, "json", f"expected a list of {rows} '<synset>/<id>' entries "
                              f"(one per row of {h5path.name}), got {got}")
    out = []
    for i, e in enumerate(entries):
        if not isinstance(e, str):
            raise DataFormatError(path, f"entry {i}", f"expected a string '<synset>/<id>', got {type(e).__name__}")
        parts = [p for p in e.strip().split("/") if p]
        if len(parts) < 2:
            raise DataFormatError(path, f"entry {i}", f"expected '<synset>/<id>', got {e[:80]!r}")
        out.append((parts[-2], os.path.splitext(parts[-1])[0]))
    return out


def _h5_dataset(f, name: str, path: Path, ndim_ok: tuple[int, ...], required: bool = True):
    import h5py

    if name not in f:
        if required:
            raise DataFormatError(path, name, "dataset missing")
        return None
    ds = f[name]
    if not isinstance(ds, h5py.Dataset):
        raise DataFormatError(path, name, "expected a dataset, found a group")
    if ds.dtype.kind not in "fiub" or ds.ndim not in ndim_ok:
        raise DataFormatError(path, name, f"expected a numeric array of {' or '.join(map(str, ndim_ok))} dims, "
                              f"got {ds.dtype} {ds.shape}")
    return np.asarray(ds[()])


def _read_h5(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    import h5py

    try:
        with h5py.File(path, "r") as f:
            data = _h5_dataset(f, "data", path, (3,))
            label = _h5_dataset(f, "label", path, (1, 2))
            pid = _h5_dataset(f, "pid", path, (2,))
            normal = _h5_dataset(f, "normal", path, (3,), required=False)
    except DataFormatError:
        raise
    except FileNotFoundError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        raise DataFormatError(path, "file", f"not a readable HDF5 file ({exc})") from exc
    b, n = data.shape[0], data.shape[1]
    if data.shape[2] != 3 or b == 0 or n == 0:
        raise DataFormatError(path, "data", f"expected float [B, N, 3] with B, N >= 1, got {data.shape}")
    if label.shape not in ((b,), (b, 1)):
        raise DataFormatError(path, "label", f"expected [{b}, 1] category indices, got {label.shape}")
    if pid.shape != (b, n):
        raise DataFormatError(path, "pid", f"expected [{b}, {n}] part ids (like data), got {pid.shape}")
    if normal is not None and normal.shape != data.shape:
        raise DataFormatError(path, "normal", f"expected {data.shape} (like data), got {normal.shape}")
    for field, arr in (("data", data), ("normal", normal)):
        if arr is not None and not np.all(np.isfinite(arr)):
            raise DataFormatError(path, field, "non-finite (NaN or inf) values")
    return (data.astype(np.float64), as_integer_labels(label.reshape(b), path, "label"),
            as_integer_labels(pid, path, "pid"), normal)


def _iter_hdf5(root, cats, keep_splits, opts) -> Iterator[ShapeRecord]:
    table = shapenetpart_categories()
    names = list(table)  # alphabetical = the HDF5 release's category order
    for split, path in _h5_files(root):
        if keep_splits is not None and split not in keep_splits:
            continue
        data, label, pid, normal = _read_h5(path)
        ids = _id2file(path, split, len(data))
        for row in range(len(data)):
            c = int(label[row])
            if not 0 <= c < len(names):
                raise DataFormatError(path, f"label[{row}]", f"category index {c} outside [0, {len(names)})")
            name = names[c]
            entry = table[name]
            if ids is not None:
                synset, shape_id = ids[row]
                if synset != entry["synset"]:
                    raise DataFormatError(path, f"label[{row}]", f"category {name} ({entry['synset']}) but the "
                                          f"id2file entry names synset {synset}")
            else:
                synset, shape_id = entry["synset"], f"{path.stem}:{row}"
            if cats is not None and name not in cats:
                continue
            labels = _to_local(pid[row], int(entry["pid_start"]), len(entry["parts"]), path, f"pid[{row}]",
                               name, "global")
            yield _make_record(data[row], labels, None if normal is None else normal[row], name=name,
                               synset=synset, shape_id=shape_id, split=split, layout="hdf5",
                               file=f"{path}:{row}", **opts)
