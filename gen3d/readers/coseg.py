"""Reader for COSEG (Wang, Asafi, van Kaick, Zhang, Cohen-Or, Chen 2012, "Active co-analysis of a
set of shapes", SIGGRAPH Asia) - meshes with ground-truth per-face part labels, one folder per set.

Layout (as in the COSEG download, one folder per set)::

    <root>/<set>/shapes/<i>.off     OFF mesh (triangles or polygons)
    <root>/<set>/gt/<i>.seg         one integer label per face of <i>.off, one per line

``root`` may also be a set folder itself (it contains ``shapes/``). The set name is the folder
name lower-cased, with spaces and underscores turned into ``-`` (``Large_Chairs`` ->
``large-chairs``); it is looked up in ``gen3d/data/coseg.yaml`` (category, ``label_base``, part
names, mapping to ShapeNetPart names) or in a user mapping.

Errors: :class:`gen3d.errors.DataFormatError` (naming file and field) for malformed or
inconsistent files and mappings; :class:`FileNotFoundError` for a missing root or mapping file.
"""
from __future__ import annotations

import os
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from ..errors import DataFormatError
from ..meshio import read_off
from ..parts import load_table, shapenetpart_categories
from ..records import SPLITS, ShapeRecord
from ._common import mesh_record
from .shapenetpart import read_label_file


def set_name(folder: str | os.PathLike) -> str:
    """Normalised COSEG set name of a folder: lower case, spaces/underscores -> ``-``."""
    return Path(folder).name.strip().lower().replace(" ", "-").replace("_", "-")


def _load_mapping(mapping: str | os.PathLike | Mapping | None) -> tuple[dict[str, Any], str]:
    """User mapping -> ``({set: entry}, source name)``; ``{"*": entry}`` for a single entry."""
    if mapping is None:
        return {}, ""
    if isinstance(mapping, Mapping):
        data, src = dict(mapping), "<mapping>"
    else:
        path = Path(mapping)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such COSEG mapping file")
        try:
            data = yaml.safe_load(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, yaml.YAMLError) as exc:
            raise DataFormatError(path, "yaml", f"not a valid YAML file ({exc})") from exc
        src = str(path)
    if not isinstance(data, Mapping):
        raise DataFormatError(src, "yaml", "expected a mapping with 'sets:' (or one set's keys)")
    if "sets" in data:
        data = data["sets"]
        if not isinstance(data, Mapping):
            raise DataFormatError(src, "sets", "expected a mapping from set name to entry")
        return {set_name(str(k)): v for k, v in data.items()}, src
    if "parts" in data:  # one entry, used for every set read
        return {"*": data}, src
    return {set_name(str(k)): v for k, v in data.items()}, src


def _check_entry(entry: Any, name: str, src: str) -> dict[str, Any]:
    field = f"sets.{name}"
    if not isinstance(entry, Mapping):
        raise DataFormatError(src, field, "expected a mapping with category, label_base, parts, to_shapenet")
    parts = entry.get("parts")
    if not isinstance(parts, list) or not parts or not all(isinstance(p, str) for p in parts):
        raise DataFormatError(src, f"{field}.parts", "expected a non-empty list of part names")
    category = entry.get("category", name)
    base = entry.get("label_base", 1)
    if not isinstance(category, str) or not category:
        raise DataFormatError(src, f"{field}.category", "expected a category name")
    if isinstance(base, bool) or not isinstance(base, int):
        raise DataFormatError(src, f"{field}.label_base", f"expected an integer, got {base!r}")
    to_sn = entry.get("to_shapenet")
    if to_sn is not None:
        cats = shapenetpart_categories()
        if category.lower() not in cats:
            raise DataFormatError(src, f"{field}.to_shapenet", f"category {category!r} is not a ShapeNetPart category")
        sn_parts = cats[category.lower()]["parts"]
        if not isinstance(to_sn, Mapping) or set(to_sn) != set(parts):
            raise DataFormatError(src, f"{field}.to_shapenet", f"expected a mapping of every part {parts}")
        bad = [v for v in to_sn.values() if v not in sn_parts]
        if bad:
            raise DataFormatError(src, f"{field}.to_shapenet", f"{bad} are not {category} parts {sn_parts}")
    return {"category": category.lower(), "label_base": base, "parts": list(parts), "to_shapenet": to_sn}


def _set_entry(name: str, user: dict[str, Any], user_src: str, folder: Path) -> dict[str, Any]:
    if name in user:
        return _check_entry(user[name], name, user_src)
    if "*" in user:
        return _check_entry(user["*"], name, user_src)
    shipped = load_table("coseg")["sets"]
    if name in shipped:
        return _check_entry(shipped[name], name, "gen3d/data/coseg.yaml")
    known = sorted(set(shipped) | set(user))
    raise DataFormatError(folder, "set", f"unknown COSEG set {name!r}; known sets: {', '.join(known)} "
                          "(pass mapping=FILE.yaml for others)")


def _set_dirs(root: Path) -> list[Path]:
    if (root / "shapes").is_dir():
        return [root]
    return [d for d in sorted(root.iterdir()) if d.is_dir() and (d / "shapes").is_dir()]


def _shape_key(path: Path) -> tuple[int, int, str]:
    stem = path.stem
    return (0, int(stem), stem) if stem.isdigit() else (1, 0, stem)


def read_coseg(root: str | os.PathLike, sets: Collection[str] | None = None, num_points: int = 2048,
               seed: int = 0, part_names: str = "shapenet",
               mapping: str | os.PathLike | Mapping | None = None, split: str = "none") -> Iterator[ShapeRecord]:
    """Read COSEG sets (Wang et al. 2012) as :class:`ShapeRecord` s with meshes and face labels.

    Args:
        root: folder of set folders, or one set folder (``shapes/*.off`` + ``gt/*.seg``).
        sets: set names to read (normalised like folder names, e.g. ``"chairs"``); all if None.
        num_points: points sampled per shape (area-weighted, :func:`gen3d.sampling.sample_surface`),
            seeded per shape from ``seed`` and the shape id.
        seed: global sampling seed.
        part_names: ``"shapenet"`` - labels and ``part_names`` of the ShapeNetPart category the set
            maps to (``to_shapenet``; e.g. chairs' back/seat/legs -> back/seat/leg, with
            ``part_names`` the full ShapeNetPart chair tuple ``(back, seat, leg, arm)``); sets
            whose ``to_shapenet`` is null keep their own names. ``"coseg"`` - the set's own names.
        mapping: a YAML file (or a dict) overriding/extending ``gen3d/data/coseg.yaml``: either
            ``{sets: {<set>: {category, label_base, parts, to_shapenet}}}``, ``{<set>: entry}``,
            or a single entry (keys ``category, label_base, parts, to_shapenet``) applied to
            every set read.
        split: the split given to every record (COSEG has no official split).

    Returns:
        An iterator (sets sorted by name, shapes by number) of records with ``source="real"``,
        ``shape_id = "<set>/<i>"``, ``category`` from the mapping (``chair``, ``vase``, ...),
        ``points float32 [num_points, 3]``, ``labels int16 [num_points]`` (the label of the face
        each point lies on), ``normals float32 [num_points, 3]`` (face normals),
        ``mesh_vertices float32 [V, 3]``, ``mesh_faces int32 [F, 3]`` (polygons triangulated as
        fans), ``face_labels int16 [F]`` (a polygon's label on each of its triangles) and
        ``provenance = {"dataset": "coseg", "set", "file", "labels_file"}``.

    Raises:
        FileNotFoundError: ``root`` or the ``mapping`` file does not exist.
        ValueError: bad ``part_names``, ``split``, ``num_points`` or ``seed``, or a requested set that is not
            in ``root``.
        DataFormatError: eagerly for a root with no set folders, an unknown set without a
            mapping entry, or a bad mapping; lazily (when the iterator reaches the file) for a
            malformed OFF, a missing or malformed ``.seg``, a ``.seg`` whose line count differs
            from the OFF's polygon count, a label outside ``[label_base, label_base + K)``, or a
            mesh of zero area.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such COSEG directory")
    if part_names not in ("shapenet", "coseg"):
        raise ValueError(f"part_names must be 'shapenet' or 'coseg', got {part_names!r}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} ({', '.join(SPLITS)})")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if int(num_points) < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    user, user_src = _load_mapping(mapping)
    dirs = _set_dirs(root)
    if not dirs:
        raise DataFormatError(root, "layout", "no COSEG set folder (<set>/shapes/*.off + <set>/gt/*.seg)")
    if sets is not None:
        wanted = {set_name(s) for s in ([sets] if isinstance(sets, str) else sets)}
        present = {set_name(d) for d in dirs}
        if wanted - present:
            raise ValueError(f"COSEG set(s) {sorted(wanted - present)} not in {root}; present: {sorted(present)}")
        dirs = [d for d in dirs if set_name(d) in wanted]
    plan = [(d, set_name(d), _set_entry(set_name(d), user, user_src, d)) for d in dirs]
    return _iter_sets(plan, int(num_points), seed, part_names, split)


def _label_table(entry: dict[str, Any], part_names: str) -> tuple[tuple[str, ...], np.ndarray]:
    """Part names of the records and the local label of each COSEG part index k."""
    own = tuple(entry["parts"])
    if part_names == "coseg" or entry["to_shapenet"] is None:
        return own, np.arange(len(own), dtype=np.int16)
    sn = tuple(shapenetpart_categories()[entry["category"]]["parts"])
    return sn, np.array([sn.index(entry["to_shapenet"][p]) for p in own], dtype=np.int16)


def _iter_sets(plan, num_points, seed, part_names, split) -> Iterator[ShapeRecord]:
    for d, name, entry in plan:
        names, lut = _label_table(entry, part_names)
        base, k = entry["label_base"], len(entry["parts"])
        for off in sorted((d / "shapes").glob("*.off"), key=_shape_key):
            seg = d / "gt" / f"{off.stem}.seg"
            if not seg.is_file():
                raise DataFormatError(off, "labels", f"missing label file {seg}")
            mesh = read_off(off)
            if len(mesh.faces) == 0:
                raise DataFormatError(off, "faces", "the mesh has no faces")
            raw = read_label_file(seg)
            n_poly = int(mesh.face_source[-1]) + 1
            if len(raw) != n_poly:
                raise DataFormatError(seg, "rows", f"{len(raw)} labels in {seg} but {n_poly} faces in {off}")
            bad = (raw < base) | (raw >= base + k)
            if bad.any():
                raise DataFormatError(seg, "labels", f"label {int(raw[np.argmax(bad)])} outside "
                                      f"[{base}, {base + k}) of set {name!r} ({', '.join(entry['parts'])})")
            face_labels = lut[(raw - base)[mesh.face_source]]
            shape_id = f"{name}/{off.stem}"
            try:
                record = mesh_record(mesh.vertices, mesh.faces, face_labels, shape_id=shape_id,
                                     category=entry["category"], source="real", split=split,
                                     part_names=names, num_points=num_points, seed=seed,
                                     provenance={"dataset": "coseg", "set": name, "file": str(off),
                                                 "labels_file": str(seg)})
            except ValueError as exc:  # sample_surface: zero area / empty mesh
                raise DataFormatError(off, "faces", f"cannot sample the mesh: {exc}") from exc
            yield record
