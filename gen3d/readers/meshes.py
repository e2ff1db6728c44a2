"""Unlabelled meshes and point clouds, and ShapeNetCore's layout.

* :func:`read_files`: any mix of mesh files (``.off .obj .ply .stl .glb .gltf``; a ``.ply`` with
  no faces is a point cloud) and point clouds (``.npy .pts .xyz .txt``) of one category.
* :func:`read_shapenetcore`: ShapeNetCore v2 (Chang et al. 2015)
  ``<root>/<synset>/<model id>/models/model_normalized.obj`` (v1: ``<root>/<synset>/<id>/model.obj``),
  with split membership from ShapeNet's ``all.csv`` (``id,synsetId,subSynsetId,modelId,split``)
  or from ShapeNetPart's ``shuffled_*_file_list.json`` folder.

Meshes are sampled by area (normals = face normals) and kept; point clouds are brought to N
points by :func:`gen3d.sampling.resample_indices` (FPS or random, seeded).
"""
from __future__ import annotations

import csv
import glob
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from ..errors import DataFormatError
from ..meshio import CLOUD_SUFFIXES, MESH_SUFFIXES, load_mesh, load_point_cloud
from ..parts import part_names, shapenetpart_categories, shapenetpart_category
from ..records import SPLITS, ShapeRecord
from ..sampling import resample_indices
from ._common import mesh_record, shape_seed


def _category_parts(category: str) -> tuple[str, ...]:
    try:
        return part_names(category)
    except KeyError:
        return ()


def expand_paths(patterns: Iterable[str | os.PathLike]) -> list[Path]:
    """Expand files, folders (all mesh/cloud files below) and glob patterns, sorted, unique."""
    out: list[Path] = []
    for pattern in patterns:
        p = Path(pattern)
        if p.is_dir():
            out.extend(q for q in sorted(p.rglob("*")) if q.suffix.lower() in MESH_SUFFIXES + CLOUD_SUFFIXES)
        elif any(ch in str(pattern) for ch in "*?["):
            out.extend(Path(q) for q in sorted(glob.glob(str(pattern), recursive=True)))
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file, folder or matching files")
    return list(dict.fromkeys(out))


def file_record(path: str | os.PathLike, category: str, *, source: str = "real", split: str = "none",
                num_points: int = 2048, seed: int = 0, resample: str = "fps", dataset: str = "files",
                shape_id: str | None = None, keep_mesh: bool = True, extra: dict | None = None) -> ShapeRecord:
    """One unlabelled mesh or point-cloud file as a record.

    Raises:
        FileNotFoundError, DataFormatError (from :mod:`gen3d.meshio`); ValueError for a bad split.
    """
    path = Path(path)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    shape_id = shape_id or path.stem
    prov = {"dataset": dataset, "file": str(path), **(extra or {})}
    suffix = path.suffix.lower()
    names = _category_parts(category)
    if suffix in MESH_SUFFIXES:
        try:
            mesh = load_mesh(path)
        except DataFormatError as exc:
            if suffix != ".ply" or exc.field != "faces":
                raise
        else:
            return mesh_record(mesh.vertices, mesh.faces, None, shape_id=shape_id, category=category, source=source,
                               split=split, part_names=names, num_points=num_points, seed=seed,
                               provenance=prov, keep_mesh=keep_mesh)
    points, normals = load_point_cloud(path)
    idx = resample_indices(points, num_points, resample, shape_seed(seed, source, shape_id))
    return ShapeRecord(shape_id=shape_id, category=category, source=source, split=split, points=points[idx],
                       part_names=names, normals=None if normals is None else normals[idx], provenance=prov)


def read_files(paths: Iterable[str | os.PathLike], category: str, source: str = "real", split: str = "none",
               num_points: int = 2048, seed: int = 0, resample: str = "fps", keep_mesh: bool = True) -> Iterator[ShapeRecord]:
    """Records for files, folders or glob patterns of meshes / point clouds of one category.
    Shape ids are the file stems (made unique with the parent folder name when stems repeat)."""
    files = expand_paths(paths)
    stems = [f.stem for f in files]
    for f in files:
        sid = f.stem if stems.count(f.stem) == 1 else f"{f.parent.name}/{f.stem}"
        yield file_record(f, category, source=source, split=split, num_points=num_points, seed=seed,
                          resample=resample, shape_id=sid, keep_mesh=keep_mesh)


def load_shapenet_split(split_file: str | os.PathLike) -> dict[str, str]:
    """``{model id: split}`` from ShapeNet's ``all.csv`` or a folder of ShapeNetPart split JSONs.

    Raises:
        FileNotFoundError; DataFormatError for a CSV without the ``modelId``/``split`` columns.
    """
    split_file = Path(split_file)
    if split_file.is_dir():
        from .shapenetpart import load_splits

        out: dict[str, str] = {}
        for split in ("test", "val", "train"):  # train wins for ids listed twice
            for _, sid in load_splits(split_file).get(split, ()):
                out[sid] = split
        return out
    if not split_file.exists():
        raise FileNotFoundError(f"{split_file}: no such split file")
    with open(split_file, newline="") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or not {"modelId", "split"} <= set(reader.fieldnames):
            raise DataFormatError(split_file, "header", f"expected columns modelId and split, got {reader.fieldnames}")
        return {row["modelId"]: {"train": "train", "val": "val", "test": "test"}.get(row["split"], "none")
                for row in reader}


def read_shapenetcore(root: str | os.PathLike, categories: Iterable[str], split_file: str | os.PathLike | None = None,
                      splits: Iterable[str] | None = None, num_points: int = 2048, seed: int = 0,
                      keep_mesh: bool = True) -> Iterator[ShapeRecord]:
    """Unlabelled ShapeNetCore meshes of the given categories (ShapeNetPart names or synsets).

    Raises:
        FileNotFoundError: ``root`` or a category folder is missing.
    """
    root = Path(root)
    membership = load_shapenet_split(split_file) if split_file else {}
    wanted_splits = None if splits is None else set(splits)
    for cat in categories:
        try:
            name, entry = shapenetpart_category(cat)
            synset = entry["synset"]
        except KeyError:
            name, synset = cat.lower(), cat
        folder = root / synset
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder}: no ShapeNetCore folder for {cat!r} "
                                    f"(known synsets: {', '.join(e['synset'] for e in shapenetpart_categories().values())})")
        for model in sorted(p for p in folder.iterdir() if p.is_dir()):
            obj = next((c for c in (model / "models" / "model_normalized.obj", model / "model.obj") if c.exists()), None)
            if obj is None:
                continue
            split = membership.get(model.name, "none")
            if wanted_splits is not None and split not in wanted_splits:
                continue
            yield file_record(obj, name, split=split, num_points=num_points, seed=seed, dataset="shapenetcore",
                              shape_id=f"{synset}/{model.name}", keep_mesh=keep_mesh, extra={"synset": synset})
