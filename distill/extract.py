"""Knowledge extraction over a collection: render, ask the teachers, form units (``distill extract``).

For every shape: normalise to the unit sphere, render ``num_views`` views (:mod:`distill.render`;
meshes are drawn from dense surface samples, bare clouds by point splatting), run every teacher on the
views, and turn its boxes or pixel maps into knowledge units (:mod:`distill.knowledge`, PartDistill
Eqs. 1-2). Units of several teachers are pooled, each tagged with its teacher. Where the shape has
part labels, the ground-truth label map of every view and the pixel-to-point map are kept too (for the
2D mIoU of :mod:`eval.metrics`).

Each finished shape is written to a cache file ``CACHE/<settings hash>/<shape hash>.npz``
(temporary name, then rename), where the settings hash covers the teachers (spec and weight files)
and every render / extraction setting, and the shape hash its key, points and labels. A re-run skips cached shapes, so an interrupted run resumes,
and the knowledge file is assembled from the cache at the end (temporary name, then rename).
Work is split across processes with Accelerate's :class:`~accelerate.PartialState`
(``accelerate launch`` / ``torchrun``): process ``k`` of ``P`` takes shapes ``k, k+P, ...``.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gen3d.collection import Collection
from gen3d.records import ShapeRecord

from .knowledge import (
    KnowledgeUnits,
    load_shape_cache,
    merge_units,
    save_shape_cache,
    units_from_boxes,
    units_from_pixels,
    write_knowledge,
)
from .teachers import load_teacher, parse_teacher_spec, teacher_fingerprint


@dataclass
class ExtractSettings:
    """Render and extraction settings (all of them enter the cache hash).

    Attributes:
        num_views: V, PartSLIP's view set (:func:`distill.cameras.partslip_cameras`).
        image_size: H = W in pixels.
        radius: splat radius in pixels for bare point clouds, or ``"auto"`` (from the point spacing;
            :func:`distill.render.render_points`: fewer hidden points shown through holes).
        dense: draw meshes from dense surface samples when the shape has a mesh.
        dense_samples: number of dense surface samples for mesh renders.
        refine: intra-set label refinement (:mod:`distill.refine`) before units are formed.
        min_points: P-VLM units with fewer points are dropped.
        store_2d: keep pixel-to-point maps and GT label maps for labelled shapes (2D mIoU).
        seed: seed of the dense surface samples.
    """

    num_views: int = 10
    image_size: int = 224
    radius: float | str = "auto"
    dense: bool = True
    dense_samples: int = 100_000
    refine: bool = False
    min_points: int = 1
    store_2d: bool = True
    seed: int = 0

    def cache_hash(self, teacher_specs: Sequence[str]) -> str:
        items = {"settings": asdict(self), "teachers": [teacher_fingerprint(s) for s in teacher_specs], "version": 1}
        return hashlib.sha1(json.dumps(items, sort_keys=True).encode()).hexdigest()[:16]


def shape_key(coll: Collection, index: int) -> tuple[str, str, str]:
    """The de-duplication key ``(source, dataset, shape_id)`` of a collection shape, without
    reading its points (same as ``coll.record(index).key``)."""
    return (str(coll.sources[index]), str(coll.provenance(index).get("dataset", "")), str(coll.shape_ids[index]))


def _cache_name(coll: Collection, index: int) -> str:
    """Cache file name of a shape: a hash of its key *and* its content (points and labels), so a
    shape re-pooled under the same key with other geometry (another orientation, point count or
    sampling seed) is extracted again instead of read stale from the cache."""
    h = hashlib.sha1("\x1f".join(shape_key(coll, index)).encode())
    h.update(np.ascontiguousarray(coll.points(index), np.float32).tobytes())
    labels = coll.labels(index)
    if labels is not None:
        h.update(np.ascontiguousarray(labels, np.int16).tobytes())
    return h.hexdigest()[:24] + ".npz"


def extract_shape(record: ShapeRecord, teachers: Sequence[Any], settings: ExtractSettings,
                  cameras=None, key: int = 0, device: str | torch.device = "cpu",
                  part_prompts: Sequence[str] | None = None) -> tuple[KnowledgeUnits, dict[str, np.ndarray], dict]:
    """Render one shape, run the teachers, and form its knowledge units.

    Args:
        record: the shape (points in its own coordinates; normalised here for rendering).
        teachers: teacher objects (:func:`distill.teachers.load_teacher`), in teacher-id order.
        settings: render / extraction settings.
        cameras: :class:`distill.cameras.Cameras` (default: PartSLIP's views at ``settings``).
        key: a stable per-shape integer for the simulated teacher's corruption draw.
        part_prompts: the prompts handed to the teachers (default: the category's PartDistill prompts).

    Returns:
        ``(units, extras, timing)``: the pooled :class:`KnowledgeUnits`, ``extras`` with
        ``pixel_index int32 [V,H,W]`` and ``gt_label_maps int8 [V,H,W]`` for labelled shapes when
        ``settings.store_2d``, and seconds spent rendering / in teachers / extracting.

    Raises:
        ValueError: a simulated teacher on a shape without labels.
    """
    from gen3d.parts import part_prompts as category_prompts

    from .cameras import partslip_cameras
    from .render import label_maps, render_record

    cams = cameras or partslip_cameras(settings.num_views, (settings.image_size, settings.image_size))
    t0 = time.perf_counter()
    renders = render_record(record, cams, dense=settings.dense, radius=settings.radius,
                            num_samples=settings.dense_samples, seed=settings.seed)
    gt = label_maps(renders, torch.as_tensor(record.labels)) if record.labels is not None else None
    t1 = time.perf_counter()
    prompts = list(part_prompts or category_prompts(record.category))
    index, visible = renders.index.cpu().numpy(), renders.visible.cpu().numpy()
    sets = None
    if settings.refine:
        from gen3d.dataset import normalize_unit_sphere

        from .refine import consistency_sets

        sets = consistency_sets(normalize_unit_sphere(record.points)[0], record.normals)
    pooled, t_teach = [], 0.0
    for tid, teacher in enumerate(teachers):
        ta = time.perf_counter()
        images = renders.image.to(device)
        name = getattr(teacher, "name", "")
        extra: dict[str, Any] = {"key": key} if name == "simulated" else {}
        if name in ("clip", "detector"):
            extra["category"] = record.category  # prompts "a photo of the {part} of a {category}."
        if name == "simulated":
            if gt is None:
                raise ValueError(f"shape {record.key}: the simulated teacher needs part labels, and this shape has none")
            extra["label_maps"] = gt.to(device)
        with torch.no_grad():
            out = teacher(images, prompts, **extra)
        t_teach += time.perf_counter() - ta
        if out.kind == "box":
            corrupted = [c.cpu().numpy() for c in out.corrupted] if out.corrupted is not None else None
            units = units_from_boxes(index, visible, [b.cpu().numpy() for b in out.boxes],
                                     [p.cpu().numpy() for p in out.box_probs], teacher_id=tid,
                                     corrupted=corrupted, refine_sets=sets)
        else:
            corrupted = out.corrupted.cpu().numpy() if out.corrupted is not None else None
            units = units_from_pixels(index, visible, out.probs.float().cpu().numpy(), teacher_id=tid,
                                      corrupted=corrupted, min_points=settings.min_points, refine_sets=sets)
        pooled.append(units)
    units = merge_units(pooled)
    extras: dict[str, np.ndarray] = {}
    if settings.store_2d and gt is not None:
        extras["pixel_index"] = index.astype(np.int32)
        extras["gt_label_maps"] = gt.cpu().numpy().astype(np.int8)
    timing = {"render": t1 - t0, "teacher": t_teach, "extract": time.perf_counter() - t1 - t_teach}
    return units, extras, timing


@dataclass
class ExtractReport:
    """What :func:`extract` did."""

    out: Path
    shapes: int
    extracted: int
    cached: int
    units: int
    seconds: float
    seconds_per_shape: dict[str, float]


def extract(collection: str | os.PathLike, teacher_specs: Sequence[str], out: str | os.PathLike,
            settings: ExtractSettings | None = None, category: str | None = None,
            splits: Sequence[str] | None = None, cache_dir: str | os.PathLike | None = None,
            device: str | None = None, progress: bool = True) -> ExtractReport:
    """Write the knowledge file of every selected shape of a collection (see the module docstring).

    Args:
        collection: a shape collection (:mod:`gen3d.collection`).
        teacher_specs: teacher specs (:class:`distill.teachers.TeacherSpec`); their units are pooled.
        out: the knowledge file to write (``.h5``).
        category: the category to extract (default: the collection's only category).
        splits: splits to take (default: all).
        cache_dir: per-shape cache (default: ``OUT.cache/`` beside the output).
        device: torch device for rendering and teachers (default: CUDA when available).

    Raises:
        ValueError: no teacher, several categories without ``category``, no selected shape,
            or a simulated teacher on unlabelled shapes.
    """
    from accelerate import PartialState
    from tqdm import tqdm

    from gen3d.parts import part_names as category_parts

    from .cameras import partslip_cameras

    settings = settings or ExtractSettings()
    specs = [str(parse_teacher_spec(s)) for s in teacher_specs]
    if not specs:
        raise ValueError("extract needs at least one teacher")
    out = Path(out)
    state = PartialState(cpu=not torch.cuda.is_available())
    device = device or str(state.device)
    with Collection(collection) as coll:
        cats = sorted(set(coll.categories.tolist()))
        if category is None:
            if len(cats) != 1:
                raise ValueError(f"{collection}: holds categories {cats}; choose one with --category")
            category = cats[0]
        indices = coll.select(category=category, split=list(splits) if splits else None)
        if len(indices) == 0:
            raise ValueError(f"{collection}: no {category} shapes in splits {list(splits) if splits else 'any'}")
        names = coll.part_names.get(category) or category_parts(category)
        cache = Path(cache_dir) if cache_dir else out.with_name(out.name + ".cache")
        cache = cache / settings.cache_hash(specs)
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "settings.json").write_text(json.dumps({"settings": asdict(settings), "teachers": specs}, indent=2))
        teachers = [load_teacher(s, device=device) for s in specs]
        cams = partslip_cameras(settings.num_views, (settings.image_size, settings.image_size)).to(device)
        mine = indices[state.process_index::state.num_processes]
        names_by_row = {int(i): _cache_name(coll, int(i)) for i in mine}   # the other shapes: main process only
        todo = [i for i in mine if not (cache / names_by_row[int(i)]).exists()]
        totals = {"render": 0.0, "teacher": 0.0, "extract": 0.0}
        t0 = time.perf_counter()
        for i in tqdm(todo, desc=f"extract {category}", disable=not (progress and state.is_main_process)):
            record = coll.record(int(i))
            units, extras, timing = extract_shape(record, teachers, settings, cams, key=int(i), device=device)
            save_shape_cache(cache / names_by_row[int(i)], record.key, units, extras)
            for k, v in timing.items():
                totals[k] += v
        state.wait_for_everyone()
        n_units = 0
        if state.is_main_process:
            shapes = []
            for i in indices:
                name = names_by_row.get(int(i)) or _cache_name(coll, int(i))
                k, units, extras = load_shape_cache(cache / name)
                n_units += units.num_units
                shapes.append((tuple(k), units, extras))
            write_knowledge(out, shapes, category=category, part_names=list(names),
                            teachers=specs,
                            settings={"extract": asdict(settings), "collection": str(collection),
                                      "splits": list(splits) if splits else None},
                            simulated=any(s.startswith("simulated") for s in specs), overwrite=True)
        state.wait_for_everyone()
    seconds = time.perf_counter() - t0
    per_shape = {k: v / max(len(todo), 1) for k, v in totals.items()}
    return ExtractReport(out, len(indices), len(todo), len(mine) - len(todo), n_units, seconds, per_shape)
