"""Sampling speed and quality per scheduler, and the surface step's speed.

    python benchmarks/bench_sampling.py [--category chair] [--checkpoint DIR] [-n 32] [--grid 128]
        [--runs ddpm:1000,dpm:25,sde-dpm:25]

For DDPM-1000, DDIM-50, DPM-Solver++-25/50 and SDE-DPM-Solver++-25/35/50 (``sde-dpm``: steps uniform
in log-SNR; ``sde-dpm:50`` is ``gen3d sample``'s default; at 25 steps also started at t = 800,
``first_timestep=800``, the best 25-step spacing measured, docs/generation.md) (or the --runs given)
on the same checkpoint and the same initial noise (shape i of seed 0), prints shapes per second and
1-NNA-CD against n held-out procedural shapes (seed 1), then the seconds per shape of the surface
step (DPSR + marching cubes) at --grid, on the default sampler's shapes (the first run's if it was
not run).
Goal (issue): DPM-Solver-25 >= 20x faster than DDPM-1000 with 1-NNA-CD within 2 points.
With small n (CPU), 1-NNA has a standard error of several points (the "+-" column: the binomial
standard error sqrt(p (1 - p) / 2n) of a 2n-cloud leave-one-out accuracy); read differences accordingly.
Every sampler starts from the same noise and meets the same reference, so the column "minus DDPM's"
pairs the clouds: its "+-" is std(c - c_DDPM) / sqrt(2n) over the 2n per-cloud correctness
indicators c (eval.generation.mmd_cov_1nna(per_cloud=True)), which ignores, as the binomial one does,
the dependence between clouds (one cloud is the nearest neighbour of many); the column "bootstrap +-"
does not: the standard deviation of the difference over --bootstrap paired resamplings of shapes
and references (eval.generation.bootstrap_1nna, which leaves out every copy of a cloud). --save-dir keeps the samples, so a long run (DDPM-1000 at large n)
resumes after an interruption and another table on the same samples costs only the metrics.
"""
from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

import numpy as np
import torch

from eval.generation import bootstrap_1nna, mmd_cov_1nna, normalize_clouds
from gen3d.procedural import generate
from gen3d.sample import (DEFAULT_SCHEDULER, DEFAULT_STEPS, checkpoint_hash, load_generator, resolve_checkpoint,
                          sample_clouds, sampling_scheduler)

RUNS = "ddpm:1000,ddim:50,dpm:25,dpm:50,sde-dpm:25,sde-dpm:25:first_timestep=800,sde-dpm:35,sde-dpm:50"


def parse_runs(text: str) -> list[tuple[str, int, dict]]:
    """``"ddpm:1000,dpm:25:use_karras_sigmas=true"`` ->
    ``[("ddpm", 1000, {}), ("dpm", 25, {"use_karras_sigmas": True})]``.

    Items are ``SCHEDULER:STEPS[:KEY=VALUE...]``; KEY=VALUE pairs are diffusers scheduler settings or
    ``log_snr_power`` / ``first_timestep`` passed to :func:`gen3d.sample.sampling_scheduler` (values
    read as YAML scalars).

    Raises:
        argparse.ArgumentTypeError: an item that is not of that form or names an unknown scheduler.
    """
    import yaml

    from gen3d.sample import SCHEDULERS

    runs = []
    for item in text.split(","):
        kind, steps, *pairs = item.strip().split(":")
        if kind not in SCHEDULERS or not steps.isdigit() or int(steps) < 1 or not all("=" in kv for kv in pairs):
            raise argparse.ArgumentTypeError(f"--runs item {item!r}: expected SCHEDULER:STEPS[:KEY=VALUE...] with "
                                             f"SCHEDULER in {list(SCHEDULERS)} and STEPS >= 1")
        options = {k: yaml.safe_load(v) for k, v in (kv.split("=", 1) for kv in pairs)}
        runs.append((kind, int(steps), options))
    return runs


def sample_run(model, model_dir: Path, kind: str, steps: int, options: dict, n: int, chunk: int,
               save_dir: Path | None) -> tuple[np.ndarray, float]:
    """Shapes 0..n-1 of seed 0 with one sampler, in batches of ``chunk`` shapes.

    With ``save_dir``, each batch is kept as ``save_dir/<checkpoint hash>/<run>/<first>-<last>.npz``
    (points and seconds; written to a temporary name, then renamed) and read back instead of sampled
    again, so an interrupted benchmark continues where it stopped and a later one with larger n only
    samples the new shapes of the same chunking.

    Returns:
        ``float32 (n, 2048, 3)`` clouds and the seconds spent sampling them (those of the runs that
        made the kept batches, for batches read back).
    """
    run = re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{kind}-{steps}" + "".join(f"-{k}={v}" for k, v in sorted(options.items())))
    folder = save_dir / checkpoint_hash(model_dir) / run if save_dir else None
    parts, seconds = [], 0.0
    for start in range(0, n, chunk):
        indices = list(range(start, min(n, start + chunk)))
        path = folder / f"{indices[0]:05d}-{indices[-1]:05d}.npz" if folder else None
        if path is not None and path.exists():
            with np.load(path) as kept:
                parts.append(kept["points"])
                seconds += float(kept["seconds"])
            continue
        t0 = time.perf_counter()
        pts = sample_clouds(model, model_dir, indices, 2048, kind, steps, seed=0, scheduler_options=options)
        sec = time.perf_counter() - t0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.stem + ".tmp.npz")
            np.savez(tmp, points=pts, seconds=sec)
            os.replace(tmp, path)
        parts.append(pts)
        seconds += sec
    return np.concatenate(parts), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--category", default="chair")
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=64, help="shapes per sampling batch [default: 64]")
    ap.add_argument("--save-dir", type=Path, default=None,
                    help="keep each batch of samples here and reuse it on the next run (resumes an "
                         "interrupted benchmark; a different checkpoint gets its own folder)")
    ap.add_argument("--bootstrap", type=int, default=2000,
                    help="paired bootstrap replicates for the 'bootstrap +-' column [default: 2000]")
    ap.add_argument("--grid", type=int, default=128, help="grid of the surface step; 0 skips it")
    ap.add_argument("--runs", type=parse_runs, default=parse_runs(RUNS),
                    help=f"comma-separated SCHEDULER:STEPS[:KEY=VALUE...] to compare, KEY=VALUE being diffusers "
                         f"scheduler settings, e.g. dpm:25:use_karras_sigmas=true, or log_snr_power=P / first_timestep=T "
                         f"(gen3d.sample.log_snr_timesteps), e.g. sde-dpm:25:first_timestep=800; leave out ddpm:1000 to skip the slow "
                         f"baseline [default: {RUNS}]")
    args = ap.parse_args()
    model_dir = resolve_checkpoint(args.category, args.checkpoint)
    for kind, steps, options in args.runs:   # unknown settings fail here, before any sampling
        try:
            sampling_scheduler(kind, model_dir, steps, **options)
        except ValueError as e:
            ap.error(f"--runs: {e}")
    model = load_generator(model_dir, "cuda" if torch.cuda.is_available() else "cpu")
    ref = torch.from_numpy(np.stack([generate(args.category, i, seed=1).points for i in range(args.n)]))
    ref = normalize_clouds(ref)
    rows, clouds, correct, distances = [], {}, {}, {}
    for kind, steps, options in args.runs:
        pts, sec = sample_run(model, model_dir, kind, steps, options, args.n, args.chunk, args.save_dir)
        if not options:
            clouds[(kind, steps)] = pts
        name = kind + "".join(f" {k}={v}" for k, v in options.items())
        m = mmd_cov_1nna(normalize_clouds(torch.from_numpy(pts)), ref, per_cloud=True)
        correct[(name, steps)] = m["1-NNA-CD correct"].astype(np.float64)
        distances[(name, steps)] = m["1-NNA-CD distances"]
        rows.append((name, steps, args.n / sec, sec, 100 * m["1-NNA-CD"], 1e3 * m["MMD-CD"], 100 * m["COV-CD"]))
    print(f"checkpoint {model_dir}; n = {args.n} shapes of 2048 points; reference: {args.n} procedural (seed 1)")
    base_row = next((r for r in rows if r[0] == "ddpm"), None)
    base = base_row[3] if base_row else None
    base_correct = correct[(base_row[0], base_row[1])] if base_row else None
    replicates = bootstrap_1nna(list(distances.values()), args.n, args.bootstrap) if base_row and args.bootstrap else None
    keys = list(distances)
    print(f"| scheduler | steps | shapes/s | seconds | speed-up vs DDPM-{base_row[1] if base_row else 1000} | "
          "1-NNA-CD (%) | +- | minus DDPM's (paired +-) | bootstrap +- | MMD-CD (x10^3) | COV-CD (%) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, steps, sps, sec, nna, mmd, cov in rows:
        speed = f"{base / sec:.1f}x" if base else "-"
        se = 100 * np.sqrt(nna / 100 * (1 - nna / 100) / (2 * args.n))
        diff = boot = "-"
        if base_correct is not None and (kind, steps) != base_row[:2]:
            d = correct[(kind, steps)] - base_correct
            diff = f"{100 * d.mean():+.1f} ({100 * d.std(ddof=1) / np.sqrt(d.size):.1f})"
            if replicates is not None:
                b = replicates[:, keys.index((kind, steps))] - replicates[:, keys.index(base_row[:2])]
                boot = f"{100 * b.std(ddof=1):.1f}"
        print(f"| {kind} | {steps} | {sps:.2f} | {sec:.1f} | {speed} | {nna:.1f} | {se:.1f} | {diff} | {boot} | {mmd:.2f} | {cov:.1f} |")
    import trimesh

    from gen3d.surface import reconstruct

    if args.grid == 0 or not clouds:
        return
    source = (DEFAULT_SCHEDULER, DEFAULT_STEPS) if (DEFAULT_SCHEDULER, DEFAULT_STEPS) in clouds else next(iter(clouds))
    pts = clouds[source]
    t0 = time.perf_counter()
    watertight = 0
    for p in pts:
        res = reconstruct(p, method="dpsr", grid=args.grid)
        watertight += trimesh.Trimesh(res.vertices, res.faces, process=False).is_watertight
    per = (time.perf_counter() - t0) / len(pts)
    print(f"\n| surface step | grid | seconds per shape | watertight |\n|---|---|---|---|\n"
          f"| DPSR + marching cubes (normals estimated), on the {source[0]}-{source[1]} samples | {args.grid} | {per:.2f} | {watertight}/{len(pts)} |")


if __name__ == "__main__":
    main()
