"""Pool shapes from any mix of sources into one collection (``gen3d pool OUT.h5 SOURCE...``).

Source specifications (``:``-separated; positional arguments first, then ``key=value``):

==================================================  ===============================================
``procedural:CATEGORY:COUNT[:seed=S][:split=SPLIT]``  procedural labelled shapes (chair, table,
``[:start=K]``                                        airplane, mug), :mod:`gen3d.procedural`
``labeled-psb[:CATEGORIES][:split=train|test]``       Labeled PSB; CATEGORIES comma-separated or
``[:root=PATH][:names=shapenet|psb]``                 ``all``; root defaults to the shared archive;
``[:orient=canonical|none]``                          chairs/airplanes/tables in ShapeNet's pose
``psb[:CATEGORIES][:root=PATH]``                      PSB meshes (Chen 2009), unlabelled
``shapenetpart:ROOT[:category=C][:split=S]``          ShapeNetPart, any of its three layouts
``[:layout=auto|v0|normal|hdf5][:splits=DIR]``
``coseg:ROOT[:set=S][:names=shapenet|coseg]``         COSEG sets
``[:map=YAML]``
``shapenetcore:ROOT:category=C[:split_file=F]``       ShapeNetCore meshes, unlabelled
``[:split=S]``
``files:PATHS:category=C[:split=S][:source=S]``       meshes / point clouds (files, folders or
                                                      globs; ``,``-separated), unlabelled
``PATH.h5[:category=C][:source=S][:split=S]``         shapes of another collection (e.g. generated)
==================================================  ===============================================

Shapes are de-duplicated by ``(source, dataset, shape id)``: pooling into an existing collection
skips shapes it already holds, so an interrupted ``gen3d pool`` resumes where it stopped.
Work runs in ``workers`` processes (results are written in source order, so the file does not
depend on the number of workers).
"""
from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .collection import Collection, CollectionWriter
from .records import ShapeRecord


@dataclass
class PoolSettings:
    """Settings shared by every source of one pooling run."""

    num_points: int = 2048
    seed: int = 0
    resample: str = "fps"
    keep_mesh: bool = True
    data_root: Path = field(default_factory=lambda: _default_root())


def _default_root() -> Path:
    from .readers import default_data_root

    return default_data_root()


@dataclass
class SourceSpec:
    """A parsed source specification: ``kind``, positional ``args`` and ``options``."""

    kind: str
    args: list[str]
    options: dict[str, str]
    text: str


@dataclass
class Task:
    """Work that produces one record: ``fn(**kwargs)``; ``key`` is known in advance when possible."""

    key: tuple[str, str, str] | None
    fn: Callable[..., ShapeRecord]
    kwargs: dict[str, Any]

    def __call__(self) -> ShapeRecord:
        return self.fn(**self.kwargs)


KINDS = ("procedural", "labeled-psb", "psb", "shapenetpart", "coseg", "shapenetcore", "files")


def parse_source(text: str) -> SourceSpec:
    """Parse a source specification (see the module docstring).

    Raises:
        ValueError: unknown kind, or a malformed ``key=value``.
    """
    parts = text.split(":")
    kind = parts[0].lower()
    if kind not in KINDS:
        if text.split(":")[0].endswith((".h5", ".hdf5")):
            kind, parts = "collection", ["collection", *parts]
        else:
            raise ValueError(f"unknown source {text!r}: expected one of {', '.join(KINDS)} or a collection PATH.h5")
    args, options = [], {}
    for p in parts[1:]:
        if "=" in p:
            k, v = p.split("=", 1)
            if not k:
                raise ValueError(f"source {text!r}: empty option name in {p!r}")
            options[k.strip().lower()] = v.strip()
        elif options:
            raise ValueError(f"source {text!r}: positional argument {p!r} after key=value options")
        else:
            args.append(p)
    return SourceSpec(kind, args, options, text)


def _need(spec: SourceSpec, n: int, what: str) -> list[str]:
    if len(spec.args) < n:
        raise ValueError(f"source {spec.text!r}: expected {what}")
    return spec.args


def _splits(spec: SourceSpec) -> set[str] | None:
    return set(spec.options["split"].split(",")) if "split" in spec.options else None


def _orient(spec: SourceSpec, value: str) -> bool:
    if value not in ("canonical", "none"):
        raise ValueError(f"source {spec.text!r}: orient must be 'canonical' or 'none', got {value!r}")
    return value == "canonical"


def _categories(value: str | None) -> list[str] | None:
    return None if value in (None, "", "all") else value.split(",")


def expand_source(spec: SourceSpec, settings: PoolSettings) -> Iterator[Task | ShapeRecord]:
    """Turn one source into records or tasks (tasks are what runs in worker processes)."""
    s, o = settings, spec.options
    if spec.kind == "procedural":
        from . import procedural

        category, count = _need(spec, 2, "procedural:CATEGORY:COUNT")[:2]
        seed, start, split = int(o.get("seed", s.seed)), int(o.get("start", 0)), o.get("split", "train")
        if category not in procedural.CATEGORIES:
            raise ValueError(f"source {spec.text!r}: procedural categories are {', '.join(procedural.CATEGORIES)}")
        for i in range(start, start + int(count)):
            yield Task(("procedural", "procedural", f"{category}-s{seed}-{i:06d}"), procedural.generate,
                       dict(category=category, index=i, seed=seed, num_points=s.num_points, split=split))
    elif spec.kind == "labeled-psb":
        from .readers import psb

        root = Path(o.get("root", s.data_root / "psb_labeled_kalogerakis2010" / "LabeledDB_new.tar.xz"))
        splits = _splits(spec)
        for item in psb.iter_labeled_psb_files(root, _categories(spec.args[0] if spec.args else None)):
            if splits is None or psb.labeled_psb_split(item.category, item.mesh_id) in splits:
                yield Task(("real", "labeled-psb", str(item.mesh_id)), psb.labeled_psb_record,
                           dict(item=item, num_points=s.num_points, seed=s.seed,
                                part_names=o.get("names", "shapenet"), keep_mesh=s.keep_mesh,
                                orient=_orient(spec, o.get("orient", "canonical"))))
    elif spec.kind == "psb":
        from .readers import psb

        root = Path(o.get("root", s.data_root / "psb_chen2009"))
        yield from psb.read_psb(root, _categories(spec.args[0] if spec.args else None), s.num_points, s.seed, s.keep_mesh)
    elif spec.kind == "shapenetpart":
        from .readers import shapenetpart

        root = _need(spec, 1, "shapenetpart:ROOT")[0]
        splits_dir = o.get("splits")
        if splits_dir is None and not (Path(root) / "train_test_split").is_dir():
            default = s.data_root / "shapenetpart" / "splits"
            splits_dir = str(default) if default.is_dir() else None
        yield from shapenetpart.read_shapenetpart(
            root, categories=_categories(o.get("category")), splits=_splits(spec), layout=o.get("layout", "auto"),
            split_dir=splits_dir, num_points=s.num_points, resample=s.resample, seed=s.seed)
    elif spec.kind == "coseg":
        from .readers import coseg

        root = _need(spec, 1, "coseg:ROOT")[0]
        yield from coseg.read_coseg(root, sets=_categories(o.get("set")), num_points=s.num_points, seed=s.seed,
                                    part_names=o.get("names", "shapenet"), mapping=o.get("map"))
    elif spec.kind == "shapenetcore":
        from .readers import meshes

        root = _need(spec, 1, "shapenetcore:ROOT:category=C")[0]
        if "category" not in o:
            raise ValueError(f"source {spec.text!r}: needs category=C")
        yield from meshes.read_shapenetcore(root, o["category"].split(","), o.get("split_file"), _splits(spec),
                                            s.num_points, s.seed, s.keep_mesh)
    elif spec.kind == "files":
        from .readers import meshes

        paths = _need(spec, 1, "files:PATHS:category=C")[0].split(",")
        if "category" not in o:
            raise ValueError(f"source {spec.text!r}: needs category=C")
        for path in meshes.expand_paths(paths):
            yield Task(None, meshes.file_record, dict(
                path=path, category=o["category"], source=o.get("source", "real"), split=o.get("split", "none"),
                num_points=s.num_points, seed=s.seed, resample=s.resample, keep_mesh=s.keep_mesh))
    elif spec.kind == "collection":
        yield from _collection_records(spec, settings)


def _collection_records(spec: SourceSpec, settings: PoolSettings) -> Iterator[ShapeRecord]:
    from .sampling import resample_indices
    from .readers import shape_seed

    o = spec.options
    with Collection(spec.args[0]) as c:
        idx = c.select(category=_categories(o.get("category")), source=o.get("source"), split=_splits(spec))
        for i in idx:
            r = c.record(int(i))
            if c.num_points != settings.num_points:
                keep = resample_indices(r.points, settings.num_points, settings.resample,
                                        shape_seed(settings.seed, r.source, r.shape_id))
                r.points = r.points[keep]
                r.labels = None if r.labels is None else r.labels[keep]
                r.normals = None if r.normals is None else r.normals[keep]
            if not settings.keep_mesh:
                r.mesh_vertices = r.mesh_faces = r.face_labels = None
            yield r


def _run_task(task: Task) -> ShapeRecord:
    return task()


def _init_worker() -> None:
    import torch

    torch.set_num_threads(1)


def _produce(items: Iterable[Task | ShapeRecord], workers: int) -> Iterator[ShapeRecord]:
    """Run tasks (in ``workers`` processes when > 1), yielding records in input order.

    Uses :class:`concurrent.futures.ProcessPoolExecutor` (spawned workers, one torch thread each):
    a worker that dies raises ``BrokenProcessPool`` instead of hanging the run.
    """
    if workers <= 1:
        for item in items:
            yield item() if isinstance(item, Task) else item
        return
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker) as procs:
        batch: list[Task | ShapeRecord] = []

        def flush() -> Iterator[ShapeRecord]:
            tasks = [b for b in batch if isinstance(b, Task)]
            done = procs.map(_run_task, tasks, chunksize=max(1, len(tasks) // (4 * workers)))
            for b in batch:
                yield next(done) if isinstance(b, Task) else b
            batch.clear()

        for item in items:
            batch.append(item)
            if len(batch) >= 64 * workers:
                yield from flush()
        yield from flush()


@dataclass
class PoolReport:
    """What a pooling run did: shapes added / skipped per source, and the collection's summary."""

    added: dict[str, int]
    skipped: dict[str, int]
    total: int
    summary: list[tuple[str, str, str, int]]


def pool(out: str | os.PathLike, sources: Iterable[str], settings: PoolSettings | None = None, workers: int = 1,
         commit_every: int = 256, progress: Callable[[int], None] | None = None) -> PoolReport:
    """Build or extend the collection ``out`` from source specifications.

    Args:
        out: the collection file (created if missing; resumed/extended if present).
        sources: source specifications (see the module docstring); all are parsed before any work.
        settings: points per shape, seed, resampling method, whether meshes are kept, data root.
        workers: processes for the per-shape work.
        commit_every: shapes per write transaction.
        progress: called with the number of shapes handled after each one.

    Raises:
        ValueError: a malformed source specification.
        gen3d.errors.DataFormatError / CollectionError: malformed input or a shape that does not fit.
    """
    settings = settings or PoolSettings()
    specs = [parse_source(s) for s in sources]
    added: dict[str, int] = {}
    skipped: dict[str, int] = {}
    with CollectionWriter(out, settings.num_points, commit_every) as writer:
        for spec in specs:
            added[spec.text] = skipped[spec.text] = 0

            def pending(spec=spec) -> Iterator[Task | ShapeRecord]:
                for item in expand_source(spec, settings):
                    key = item.key if isinstance(item, (Task, ShapeRecord)) else None
                    if key is not None and writer.has(key):
                        skipped[spec.text] += 1
                        if progress:
                            progress(1)
                        continue
                    yield item

            for record in _produce(pending(), workers):
                if writer.add(record):
                    added[spec.text] += 1
                else:
                    skipped[spec.text] += 1
                if progress:
                    progress(1)
    with Collection(out) as c:
        return PoolReport(added, skipped, len(c), c.summary())


def format_summary(summary: list[tuple[str, str, str, int]]) -> str:
    """A Markdown table of shapes per category / source / split."""
    lines = ["| category | source | split | shapes |", "|---|---|---|---|"]
    lines += [f"| {c} | {s} | {p} | {n} |" for c, s, p, n in summary]
    lines.append(f"| **total** | | | {sum(r[3] for r in summary)} |")
    return "\n".join(lines)



def collections_for(data: Iterable[str], target: str | os.PathLike, settings: PoolSettings | None = None,
                    workers: int = 1, log: Callable[[str], None] | None = None) -> list[str]:
    """Collection files for a mix of inputs: existing ``.h5`` files are used as they are; every other
    source specification is pooled into ``target`` first (resumable, see :func:`pool`).

    Returns:
        the collection paths, the ``.h5`` inputs first, then ``target`` if anything was pooled.
    """
    data = list(data)
    files = [d for d in data if d.endswith((".h5", ".hdf5")) and ":" not in d and Path(d).exists()]
    specs = [d for d in data if d not in files]
    if specs:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        if log:
            log(f"pooling {len(specs)} source(s) into {target}")
        pool(target, specs, settings, workers=workers)
        files.append(str(target))
    return files
