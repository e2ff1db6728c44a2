"""Speed of the view pipeline: rendering (and, later, teachers and knowledge extraction).

    python benchmarks/bench_views.py [--device cpu|cuda] [--repeats 20] [--threads N] [--visibility]

Prints a Markdown table with one row per function in ``ROWS`` (add a row: write a function
``row_xxx(ctx) -> Row`` and append it). Every rendering row renders the 10 PartSLIP views at 224x224
of the procedural chair 0 (unit sphere); times are wall-clock per call, median and minimum over
``--repeats`` calls after two warm-up calls (CUDA synchronised). Goal (issue): 10 views of a
2048-point cloud in under 50 ms on a 2-core CPU.

``--visibility`` adds a table comparing the ``visible`` flags of mesh and point-cloud renders with
exact ray casting (the reference for choosing ``radius`` and the visibility slack).
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from distill.cameras import partslip_cameras
from distill.render import (
    _zbuffer,
    ray_visibility,
    render_mesh,
    render_points,
    render_record,
)
from gen3d.dataset import normalize_unit_sphere
from gen3d.procedural import generate
from gen3d.sampling import sample_surface


@dataclass
class Row:
    name: str
    times_s: list[float]
    note: str = ""


@dataclass
class Context:
    device: torch.device
    repeats: int
    cameras: object
    record: object
    points: torch.Tensor
    normals: torch.Tensor
    vertices: np.ndarray


def timed(ctx: Context, fn: Callable[[], object], repeats: int | None = None) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn`` after two warm-up calls."""
    sync = torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)
    for _ in range(2):
        fn()
    sync()
    out = []
    for _ in range(repeats or ctx.repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def row_points_2048(ctx: Context) -> Row:
    t = timed(ctx, lambda: render_points(ctx.points, ctx.cameras, normals=ctx.normals, radius=1.5))
    return Row("render_points, 2048 points, radius 1.5 px, Lambert", t)


def row_points_2048_auto(ctx: Context) -> Row:
    t = timed(ctx, lambda: render_points(ctx.points, ctx.cameras, normals=ctx.normals, radius="auto"))
    return Row('render_points, 2048 points, radius "auto"', t, "includes the kNN spacing (cKDTree, CPU)")


def row_splat_100k(ctx: Context) -> Row:
    s = sample_surface(ctx.vertices, ctx.record.mesh_faces, 100_000, seed=0)
    dense = torch.from_numpy(s.points).to(ctx.device)
    t = timed(ctx, lambda: _zbuffer(dense, ctx.cameras, radius=1.0))
    return Row("z-buffer only, 100k dense samples, radius 1 px", t)


def row_mesh_100k(ctx: Context) -> Row:
    faces = ctx.record.mesh_faces
    t = timed(ctx, lambda: render_mesh(ctx.vertices, faces, ctx.points, ctx.cameras, normals=ctx.normals,
                                       num_samples=100_000), repeats=max(3, ctx.repeats // 4))
    return Row('render_mesh, 100k samples, radius "auto"', t,
               "sampling (point-cloud-utils) + splat + kNN of drawn samples (cKDTree), CPU parts included")


def _teacher_row(ctx: Context, name: str, build: Callable[[], object], note: str) -> Row:
    """10 views through a teacher; the row's time is per call of 10 images."""
    import warnings

    from gen3d.parts import part_prompts

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random-init warnings: speed only
        teacher = build()
    r = render_points(ctx.points, ctx.cameras, normals=ctx.normals, radius="auto")
    from distill.render import label_maps

    gt = label_maps(r, torch.as_tensor(ctx.record.labels).to(ctx.device))
    prompts = list(part_prompts("chair"))
    extra = {"label_maps": gt} if name == "simulated" else {}
    with torch.no_grad():
        t = timed(ctx, lambda: teacher(r.image, prompts, **extra), repeats=max(3, ctx.repeats // 4))
    return Row(f"teacher {name}, 10 images", t, note)


def row_teacher_fewshot(ctx: Context) -> Row:
    from distill.teachers.fewshot import FewShotTeacher, PartUNet, load_fewshot_config

    cfg = load_fewshot_config("configs/distill/teacher_fewshot.yaml")
    mc = cfg["model"]
    net = PartUNet(5, widths=mc["widths"], groups=mc["groups"], global_context=mc["global_context"])
    return _teacher_row(ctx, "fewshot", lambda: FewShotTeacher(net, ["back", "seat", "leg", "arm"], cfg).to(ctx.device).eval(),
                        "the shipped few-shot U-Net config (untrained weights: same cost)")


def row_teacher_simulated(ctx: Context) -> Row:
    from distill.teachers.simulated import SimulatedTeacher

    return _teacher_row(ctx, "simulated", lambda: SimulatedTeacher(kind="pixel"), "pixel kind, from GT label maps")


def row_teacher_clip(ctx: Context) -> Row:
    from distill.teachers.clip import ClipTeacher

    return _teacher_row(ctx, "clip", lambda: ClipTeacher.random_init("ViT-B-16", allow_random=True, device=ctx.device),
                        "ViT-B/16 at 224 (random weights: the real model's cost)")


def row_teacher_detector(ctx: Context) -> Row:
    from distill.teachers.detector import DetectorTeacher

    return _teacher_row(ctx, "detector", lambda: DetectorTeacher.random_init(allow_random=True, device=ctx.device),
                        "tiny random OWLv2 (no real weights here): a lower bound of OWLv2-B/16's cost")


def row_extract(ctx: Context) -> Row:
    from distill.extract import ExtractSettings, extract_shape
    from distill.teachers.simulated import SimulatedTeacher

    teacher, settings = SimulatedTeacher(kind="pixel"), ExtractSettings()
    t = timed(ctx, lambda: extract_shape(ctx.record, [teacher], settings, ctx.cameras, device=ctx.device),
              repeats=max(3, ctx.repeats // 4))
    return Row("extract one shape: mesh render + simulated teacher + units (Eq. 2)", t,
               "renders/s column = shapes per second")


ROWS: list[Callable[[Context], Row]] = [row_points_2048, row_points_2048_auto, row_splat_100k, row_mesh_100k,
                                        row_teacher_fewshot, row_teacher_simulated, row_teacher_clip,
                                        row_teacher_detector, row_extract]


def visibility_table(device: torch.device) -> None:
    """Agreement of the renderers' ``visible`` with exact ray casting, over six procedural shapes."""
    cams = partslip_cameras().to(device)
    shapes = [generate("chair", 0), generate("chair", 3), generate("airplane", 0), generate("mug", 1),
              generate("table", 2), generate("airplane", 5)]
    runs = [("render_mesh, 100k samples, radius auto", {"dense": True}, True),
            ("render_points, radius 1.5 px", {"dense": False, "radius": 1.5}, False),
            ("render_points, radius 1.5 px", {"dense": False, "radius": 1.5}, True),
            ("render_points, radius 2.5 px", {"dense": False, "radius": 2.5}, True),
            ("render_points, radius auto", {"dense": False, "radius": "auto"}, False),
            ("render_points, radius auto", {"dense": False, "radius": "auto"}, True)]
    truths = []
    for rec in shapes:
        pts, centre, scale = normalize_unit_sphere(rec.points)
        truths.append(ray_visibility((rec.mesh_vertices - centre) / scale, rec.mesh_faces, pts, cams).to(device))
    print("\n| renderer | normals | visible / truly visible | false visible | missed |")
    print("|---|---|---|---|---|")
    for name, kwargs, use_normals in runs:
        fp, fn, ratio = [], [], []
        for rec, truth in zip(shapes, truths):
            if not use_normals:
                rec = dataclasses.replace(rec, normals=None)
            vis = render_record(rec, cams, **kwargs).visible
            fp.append(float((vis & ~truth).sum() / vis.sum()))
            fn.append(float((~vis & truth).sum() / truth.sum()))
            ratio.append(float(vis.sum() / truth.sum()))
        print(f"| {name} | {'yes' if use_normals else 'no'} | {np.mean(ratio):.2f} | "
              f"{100 * np.mean(fp):.1f}% | {100 * np.mean(fn):.1f}% |")
    print("\nTruth: ray casting to each of the 2048 collection points (distill.render.ray_visibility). "
          "False visible: share of the points flagged visible that are hidden; missed: share of the "
          "visible points not flagged. Mean over chair 0, chair 3, airplane 0, mug 1, table 2, airplane 5.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per row")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--visibility", action="store_true", help="also print the visibility-agreement table")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rec = generate("chair", 0)
    pts, centre, scale = normalize_unit_sphere(rec.points)
    ctx = Context(device, args.repeats, partslip_cameras().to(device), rec, torch.from_numpy(pts).to(device),
                  torch.from_numpy(rec.normals).to(device), (rec.mesh_vertices - centre) / scale)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} torch threads"
    print(f"device: {name}; 10 PartSLIP views at 224x224; procedural chair 0; times in ms (median / min of calls)")
    print("\n| row | median ms | min ms | renders/s (10 views) | note |")
    print("|---|---|---|---|---|")
    for fn in ROWS:
        row = fn(ctx)
        med, best = statistics.median(row.times_s), min(row.times_s)
        print(f"| {row.name} | {1e3 * med:.1f} | {1e3 * best:.1f} | {1 / med:.1f} | {row.note} |")
    if args.visibility:
        visibility_table(device)


if __name__ == "__main__":
    main()
