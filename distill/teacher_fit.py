"""Fit the few-shot 2D teacher on renders of K labelled shapes (``distill teacher-fit``).

PartSLIP's few-shot setting (Liu et al., CVPR 2023): K = 8 labelled shapes of a category. The K shapes
are drawn by a seeded permutation from the labelled ``train`` shapes of the category (never ``test``
shapes), each is rendered from PartSLIP's views plus ``extra_views`` random views, and the network of
:mod:`distill.teachers.fewshot` is fitted on the images and ground-truth label maps.
"""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from gen3d.collection import Collection


def choose_shots(collection: str | os.PathLike, category: str, shots: int, seed: int = 0,
                 splits: Sequence[str] = ("train",)) -> np.ndarray:
    """Indices ``int64 [K]`` of ``shots`` labelled shapes of ``category`` from ``splits``, drawn by a
    permutation seeded with ``seed`` (sorted by shape id first, so independent of file order).

    Raises:
        ValueError: fewer labelled shapes than ``shots``.
    """
    with Collection(collection) as coll:
        candidates = [int(i) for i in coll.select(category=category, split=list(splits))
                      if (coll.labels(int(i)) >= 0).any()]
        if len(candidates) < shots:
            raise ValueError(f"{collection}: {len(candidates)} labelled {category} shapes in splits {list(splits)}, "
                             f"{shots} needed for --shots {shots}")
        candidates.sort(key=lambda i: (str(coll.sources[i]), str(coll.shape_ids[i])))
    order = np.random.default_rng(seed).permutation(len(candidates))[:shots]
    return np.asarray([candidates[j] for j in sorted(order)], dtype=np.int64)


def render_training_views(collection: str | os.PathLike, indices: Sequence[int], num_views: int = 10,
                          extra_views: int = 20, image_size: int = 224, seed: int = 0,
                          device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Render the chosen shapes for teacher fitting.

    Returns:
        ``images float32 [K*(V+E), 3, H, W]`` and ``label_maps int64 [K*(V+E), H, W]`` (-1 background).
    """
    from .cameras import partslip_cameras, random_cameras
    from .render import label_maps, render_record

    images, maps = [], []
    fixed = partslip_cameras(num_views, (image_size, image_size)).to(device)
    with Collection(collection) as coll:
        for j, i in enumerate(indices):
            record = coll.record(int(i))
            cams = [fixed] + ([random_cameras(extra_views, seed=seed * 100_003 + j, image_size=(image_size, image_size)).to(device)]
                              if extra_views else [])
            for c in cams:
                r = render_record(record, c)
                images.append(r.image.cpu())
                maps.append(label_maps(r, torch.as_tensor(record.labels)).cpu())
    return torch.cat(images), torch.cat(maps)


def fit_teacher(collection: str | os.PathLike, category: str, out: str | os.PathLike, shots: int = 8,
                config_path: str | os.PathLike | None = None, seed: int = 0, num_views: int = 10,
                extra_views: int = 20, image_size: int = 224, device: str | None = None,
                progress: bool = True) -> dict:
    """Choose ``shots`` labelled train shapes, render them, fit and save the few-shot teacher.

    Returns:
        the saved teacher's summary (shape keys, image count, training statistics).
    """
    from gen3d.parts import part_names

    from .teachers.fewshot import fit_fewshot, load_fewshot_config

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    idx = choose_shots(collection, category, shots, seed)
    with Collection(collection) as coll:
        names = coll.part_names.get(category) or part_names(category)
        keys = [list((str(coll.sources[i]), str(coll.provenance(int(i)).get("dataset", "")), str(coll.shape_ids[i])))
                for i in idx]
    images, maps = render_training_views(collection, idx, num_views, extra_views, image_size, seed, device)
    config = load_fewshot_config(config_path)
    teacher = fit_fewshot(images, maps, list(names), config, seed=seed, progress=progress, device=device,
                          category=category, shape_ids=["/".join(k) for k in keys])
    info = {"category": category, "shots": shots, "shape_keys": keys, "images": len(images),
            "views_per_shape": num_views + extra_views, "image_size": image_size, "seed": seed,
            "collection": str(collection)}
    out = teacher.save(Path(out))
    tmp = Path(out) / ".fit.json.tmp"
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, Path(out) / "fit.json")
    return info
