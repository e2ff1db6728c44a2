"""Sampling shapes from a trained DiT-3D generator (``gen3d sample``).

* Schedulers (diffusers), built from the training scheduler's config: ``ddpm``
  (``DDPMScheduler``, ancestral), ``ddim`` (``DDIMScheduler``, eta = 0),
  ``dpm`` (``DPMSolverMultistepScheduler``, DPM-Solver++(2M), Lu et al. 2022) and ``sde-dpm``
  (the same class with ``algorithm_type="sde-dpmsolver++"``: the stochastic SDE-DPM-Solver++(2M),
  Lu et al. 2022 §5, whose per-step noise comes from each shape's own generator, with steps uniform
  in log-SNR, diffusers' ``use_lu_lambdas``), at any step count. ``sde-dpm`` with 50 steps is the
  default (:data:`DEFAULT_SCHEDULER`, :data:`DEFAULT_STEPS`): on both shipped checkpoints it is
  within 2.5 points of DDPM-1000's 1-NNA-CD at about 20x its speed, where DDIM-50 and
  DPM-Solver++ are 21-38 points worse (docs/generation.md).
  Every scheduler clips the predicted clean cloud to [-1, 1] (the training clouds lie in the unit
  sphere). DDIM keeps the model's epsilon after clipping; DPM-Solver++ re-derives it from the
  clipped x0, which on our CPU-trained checkpoints drifts points towards the clipping box; the
  SDE variant's injected noise washes that drift out (see ``benchmarks/bench_sampling.py`` for the
  measured effect).
* Determinism: shape ``i`` of seed ``s`` starts from noise drawn from its own generator seeded by
  ``(s, i)``, and DDPM's per-step noise comes from the same generator, so a shape does not depend on
  which other shapes share its batch (up to float rounding of batched matrix products).
* Output: a collection (``source="generated"``) written with :class:`gen3d.collection.CollectionWriter`
  batch by batch; re-running on an interrupted output generates only the missing shapes, and
  refuses to if the shapes already there came from another sampler (:func:`check_resume`). Every
  shape's provenance records the checkpoint (path and SHA-256 of its weights), scheduler, its
  settings (:func:`scheduler_settings`), steps, seed and index. Meshes come from the surface step
  (:mod:`gen3d.surface`) unless disabled.
* Checkpoints: ``--checkpoint`` (a ``model/`` folder written by ``gen3d train``, or the run folder),
  else the checkpoint shipped for the category in ``gen3d/checkpoints/<category>/``.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from .collection import Collection, CollectionWriter
from .dit3d import DiT3D
from .parts import part_names
from .records import ShapeRecord

SCHEDULERS = ("ddpm", "ddim", "dpm", "sde-dpm")
DEFAULT_SCHEDULER, DEFAULT_STEPS = "sde-dpm", 50


class CheckpointNotFoundError(FileNotFoundError):
    """No generator checkpoint for a category; the message says how to train one."""


def shipped_checkpoint(category: str) -> Path | None:
    """The checkpoint folder shipped in the package for ``category``, or None."""
    path = Path(str(resources.files("gen3d").joinpath("checkpoints", category)))
    return path if (path / "config.json").exists() else None


def resolve_checkpoint(category: str, checkpoint: str | os.PathLike | None = None) -> Path:
    """The model folder to sample from.

    Raises:
        CheckpointNotFoundError: no ``--checkpoint`` given and none shipped for the category, or
            the given path holds no model.
    """
    if checkpoint is not None:
        path = Path(checkpoint)
        for cand in (path, path / "model"):
            if (cand / "config.json").exists():
                return cand
        raise CheckpointNotFoundError(f"{path}: no generator checkpoint here (expected config.json and "
                                      "diffusion_pytorch_model.safetensors, as written by `gen3d train` into OUT/model)")
    found = shipped_checkpoint(category)
    if found is None:
        raise CheckpointNotFoundError(
            f"no generator checkpoint is shipped for category {category!r}. Train one, e.g.\n"
            f"  gen3d train --category {category} --config configs/gen3d/dit3d_cpu.yaml --out runs/{category} "
            f"--data procedural:{category}:3000:seed=0   (or your own collections / dataset sources)\n"
            f"then sample with --checkpoint runs/{category}/model")
    return found


def checkpoint_hash(model_dir: Path) -> str:
    """First 16 hex digits of the SHA-256 of the checkpoint's weights file."""
    weights = next(model_dir.glob("*.safetensors"))
    return hashlib.sha256(weights.read_bytes()).hexdigest()[:16]


def training_info(model_dir: Path) -> dict:
    """The model folder's ``training.json`` (steps, wall time, data, config, final loss; written by
    :func:`gen3d.train.train`), or ``{}`` when the folder has none (e.g. weights saved by hand).

    Raises:
        ValueError: ``training.json`` exists but is not valid JSON (names the file).
    """
    path = Path(model_dir) / "training.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def load_generator(model_dir: Path, device: str | torch.device = "cpu") -> DiT3D:
    """Load a DiT-3D model folder (weights may be stored in float16) as float32, in eval mode."""
    model = DiT3D.from_pretrained(str(model_dir), torch_dtype=torch.float32)
    return model.to(device).eval()


def scheduler_settings(kind: str) -> tuple[type, dict]:
    """The diffusers scheduler class of ``kind`` and the settings we give it on top of the
    training scheduler's config (recorded in every generated shape's provenance).

    Raises:
        ValueError: unknown kind.
    """
    # Training clouds lie in the unit sphere, so every scheduler clips the predicted clean cloud to
    # [-1, 1] at each step (DDPM's default clip_sample). Without it, DPM-Solver++'s data prediction
    # x0 = (x - sigma * eps) / alpha amplifies eps errors ~150x at t = 999 and diverges.
    if kind == "ddpm":
        return DDPMScheduler, {}
    if kind == "ddim":
        return DDIMScheduler, {"clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": False}
    if kind in ("dpm", "sde-dpm"):
        # sde-dpm steps uniformly in log-SNR (Lu et al. 2022's own spacing): on the shipped checkpoints
        # it took SDE-DPM-Solver++-25's 1-NNA-CD from 94.5 to 81.2 (chair), see docs/generation.md.
        return DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++" if kind == "dpm" else "sde-dpmsolver++",
                                             "solver_order": 2, "thresholding": True, "sample_max_value": 1.0,
                                             "use_lu_lambdas": kind == "sde-dpm"}
    raise ValueError(f"unknown scheduler {kind!r}; choose one of {SCHEDULERS}")


def make_scheduler(kind: str, model_dir: Path, **options):
    """A fresh diffusers scheduler of ``kind`` from the training scheduler's config.

    Args:
        kind: one of :data:`SCHEDULERS`.
        model_dir: a model folder with ``scheduler_config.json``.
        **options: extra keyword arguments for the diffusers scheduler's ``from_config`` that
            override ours (e.g. ``use_karras_sigmas=True``, ``solver_order=3``), for experiments.

    Raises:
        ValueError: unknown kind, or an option the diffusers scheduler does not have.
    """
    config = DDPMScheduler.load_config(str(model_dir))
    cls, ours = scheduler_settings(kind)
    sched = cls.from_config(config, **{**ours, **options})
    unknown = sorted(set(options) - set(sched.config))
    if unknown:
        raise ValueError(f"{cls.__name__} has no setting {unknown}; see its diffusers documentation")
    return sched


def log_snr_timesteps(alphas_cumprod: torch.Tensor, steps: int, power: float = 1.0,
                      first_timestep: int | None = None) -> list[int]:
    """Training timesteps for ``steps`` solver steps spaced by a power of the log-SNR.

    The log-SNR lambda(t) = log(alpha_t / sigma_t) of step k runs from lambda(t_1) (most noise;
    t_1 = ``first_timestep``, by default T - 1) to lambda(0) as
    ``lambda_min + (lambda_max - lambda_min) * u_k ** power`` with u_k = k / steps, k = 0 .. steps - 1,
    and the solver's last step goes on to sigma = 0. ``power = 1`` is Lu et al.
    (2022)'s uniform log-SNR spacing (diffusers' ``use_lu_lambdas`` spaces ``steps`` lambdas up to and
    including lambda(0), so its last network evaluation is at t = 0; this one spends it higher up);
    ``power < 1`` takes larger steps at high noise and smaller ones near the data. Each lambda is
    rounded to the nearest integer t; where rounding makes two steps collide (near t = 0, where
    lambda changes fastest) the earlier one moves up by one (and none above t_1 - k), so there are
    exactly ``steps`` distinct timesteps.

    ``first_timestep`` < T - 1 starts the solver lower, still from unit Gaussian noise: with the
    linear betas at t = 800, alpha_bar = 1.5e-3, so the clean cloud's share of x_t has RMS 0.012
    (unit-sphere clouds) against noise of RMS 0.9992, a negligible change of the initial
    distribution, while the network evaluations at t > 800, where an error e in the predicted noise
    becomes an error of up to 157 e in the predicted clean cloud, are skipped (docs/generation.md).

    Args:
        alphas_cumprod: ``float [T]`` cumulative alphas of the training scheduler.
        steps: number of solver steps, 1 .. t_1 + 1.
        power: exponent of the spacing, > 0.
        first_timestep: t_1, the first (noisiest) timestep, in [0, T - 1]; default T - 1.

    Returns:
        ``steps`` strictly decreasing ints in [0, t_1], the first t_1.

    Raises:
        ValueError: ``first_timestep`` outside 0 .. T - 1, ``steps`` outside 1 .. t_1 + 1, or
            ``power`` <= 0.
    """
    a = alphas_cumprod.double().cpu().numpy()
    if first_timestep is not None:
        if not 0 <= first_timestep < len(a):
            raise ValueError(f"first_timestep must be in 0..{len(a) - 1}, got {first_timestep}")
        a = a[: first_timestep + 1]
    if not 1 <= steps <= len(a):
        raise ValueError(f"steps must be in 1..{len(a)}, got {steps}")
    if not power > 0:
        raise ValueError(f"log_snr_power must be > 0, got {power}")
    lam = 0.5 * np.log(a / (1 - a))   # decreasing in t
    target = lam[-1] + (lam[0] - lam[-1]) * (np.arange(steps) / steps) ** power
    ts = np.abs(lam[None, :] - target[:, None]).argmin(axis=1)   # the nearest integer t
    for k in range(steps - 2, -1, -1):
        ts[k] = max(ts[k], ts[k + 1] + 1)
    ts = np.minimum(ts, len(a) - 1 - np.arange(steps))   # still strictly decreasing, now within [0, T - 1]
    return [int(t) for t in ts]


def sampling_scheduler(kind: str, model_dir: Path, steps: int, **options):
    """:func:`make_scheduler` with its timesteps set for ``steps`` steps.

    ``options`` are diffusers settings, plus ours (``dpm`` / ``sde-dpm`` only, for experiments):
    ``log_snr_power=P`` and ``first_timestep=t`` space the steps with :func:`log_snr_timesteps`
    (instead of ``use_lu_lambdas``; the one not given takes that function's default).

    Raises:
        ValueError: as :func:`make_scheduler`; ``log_snr_power`` / ``first_timestep`` with another
            kind, or out of range.
    """
    options = dict(options)
    ours = {k: options.pop(k) for k in ("log_snr_power", "first_timestep") if k in options}
    if ours:
        if kind not in ("dpm", "sde-dpm"):
            raise ValueError(f"{', '.join(ours)} applies to dpm and sde-dpm, not {kind!r}")
        options["use_lu_lambdas"] = False
    sched = make_scheduler(kind, model_dir, **options)
    if not ours:
        sched.set_timesteps(steps)
    else:
        first = ours.get("first_timestep")
        sched.set_timesteps(timesteps=log_snr_timesteps(sched.alphas_cumprod, steps, float(ours.get("log_snr_power", 1.0)),
                                                        None if first is None else int(first)))
    return sched


def shape_generator(seed: int, index: int) -> torch.Generator:
    """The generator of shape ``index`` of seed ``seed``."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
    return g


@torch.no_grad()
def sample_clouds(model: DiT3D, model_dir: Path, indices: list[int], num_points: int = 2048,
                  scheduler: str = DEFAULT_SCHEDULER, steps: int = DEFAULT_STEPS, seed: int = 0, step_callback: Callable[[], None] | None = None,
                  scheduler_options: dict | None = None) -> np.ndarray:
    """Generate the shapes ``indices`` of seed ``seed`` as one batch.

    ``scheduler_options`` are passed to :func:`sampling_scheduler` (diffusers settings,
    ``log_snr_power`` and ``first_timestep``; experiments only).

    Returns:
        ``float32 [len(indices), num_points, 3]`` point clouds (the generator's unit-sphere scale).
    """
    device = next(model.parameters()).device
    sched = sampling_scheduler(scheduler, model_dir, steps, **(scheduler_options or {}))
    gens = [shape_generator(seed, i) for i in indices]
    x = torch.stack([torch.randn(num_points, 3, generator=g) for g in gens]).to(device) * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = model(sched.scale_model_input(x, t), t).sample
        x = sched.step(eps, t, x, generator=gens).prev_sample
        if step_callback:
            step_callback()
    return x.float().cpu().numpy()


def _export(record: ShapeRecord, export_dir: Path) -> None:
    import trimesh

    export_dir.mkdir(parents=True, exist_ok=True)
    trimesh.PointCloud(record.points).export(export_dir / f"{record.shape_id}.ply")
    if record.has_mesh:
        trimesh.Trimesh(record.mesh_vertices, record.mesh_faces, process=False).export(export_dir / f"{record.shape_id}.obj")


def generate_collection(category: str, n: int, out: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                        scheduler: str = DEFAULT_SCHEDULER, steps: int = DEFAULT_STEPS, seed: int = 0, batch_size: int = 32,
                        mesh: bool = True, grid: int = 128, export_dir: str | os.PathLike | None = None,
                        split: str = "train", device: str | None = None, progress: bool = True,
                        first_timestep: int | None = None) -> dict:
    """Generate ``n`` shapes of ``category`` into the collection ``out`` (resumable).

    ``first_timestep`` (``dpm`` / ``sde-dpm`` only) starts the solver at that training timestep, from
    unit Gaussian noise, with the steps uniform in log-SNR from there (:func:`log_snr_timesteps`); it
    is recorded in every shape's provenance. ``sde-dpm`` at 25 steps from t = 800 is the best 25-step
    sampler measured on the shipped checkpoints (docs/generation.md).

    Returns:
        ``{"generated": k, "skipped": n - k, "checkpoint": path, "seconds_sampling": s, "seconds_mesh": s}``.

    Raises:
        CheckpointNotFoundError, ValueError (bad scheduler / steps).
    """
    import time

    from tqdm import tqdm

    if steps < 1:
        raise ValueError("steps must be >= 1")
    model_dir = resolve_checkpoint(category, checkpoint)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = load_generator(model_dir, device)
    options = {} if first_timestep is None else {"first_timestep": int(first_timestep)}
    sampling_scheduler(scheduler, model_dir, steps, **options)  # validates name, steps and start before any work
    info = training_info(model_dir)
    num_points = int(info.get("config", {}).get("num_points", 2048))
    digest = checkpoint_hash(model_dir)
    names = part_names(category) if _has_parts(category) else ()
    if mesh:
        from . import surface

    ids = [f"{category}-gen-s{seed}-{i:06d}" for i in range(n)]
    sampler = {"checkpoint_sha256": digest, "scheduler": scheduler, "steps": steps,
               "scheduler_settings": scheduler_settings(scheduler)[1], "first_timestep": options.get("first_timestep")}
    check_resume(out, ids, sampler)
    timing = {"seconds_sampling": 0.0, "seconds_mesh": 0.0}
    with CollectionWriter(out, num_points, commit_every=batch_size) as writer:
        todo = [i for i in range(n) if not writer.has(("generated", "gen3d", ids[i]))]
        bar = tqdm(total=len(todo) * steps, unit="step", desc=f"sample {category} ({scheduler}-{steps})",
                   disable=not progress)
        for start in range(0, len(todo), batch_size):
            batch = todo[start:start + batch_size]
            t0 = time.perf_counter()
            clouds = sample_clouds(model, model_dir, batch, num_points, scheduler, steps, seed,
                                   step_callback=lambda: bar.update(len(batch)), scheduler_options=options)
            timing["seconds_sampling"] += time.perf_counter() - t0
            for i, pts in zip(batch, clouds):
                record = ShapeRecord(
                    shape_id=ids[i], category=category, source="generated", split=split, points=pts,
                    part_names=names, provenance={
                        "dataset": "gen3d", "checkpoint": str(model_dir), **sampler, "seed": seed, "index": i})
                if mesh:
                    t0 = time.perf_counter()
                    res = surface.reconstruct(pts, method="dpsr", grid=grid)
                    timing["seconds_mesh"] += time.perf_counter() - t0
                    record.mesh_vertices, record.mesh_faces = res.vertices, res.faces
                    record.provenance["surface"] = {"method": "dpsr", "grid": grid}
                if export_dir is not None:
                    _export(record, Path(export_dir))
                writer.add(record)
            writer.commit()
        bar.close()
    return {"generated": len(todo), "skipped": n - len(todo), "checkpoint": str(model_dir), **timing}


def check_resume(out: str | os.PathLike, ids: list[str], sampler: dict) -> None:
    """Refuse to continue a collection whose generated shapes ``ids`` came from another sampler.

    Resuming skips the shapes already in ``out`` by id (category, seed, index), so a re-run with
    another checkpoint, scheduler, step count or scheduler definition would silently mix two
    generators in one collection.

    Args:
        out: the collection being continued (nothing is checked if it does not exist yet).
        ids: the shape ids this run generates.
        sampler: the provenance fields that define the sampler (``checkpoint_sha256``, ``scheduler``,
            ``steps``, ``scheduler_settings``, ``first_timestep``; a field a stored shape lacks counts
            as None, so collections made before ``first_timestep`` existed resume without it).

    Raises:
        ValueError: a shape of ``ids`` in ``out`` records different sampler fields (named in the message).
    """
    out = Path(out)
    if not out.exists():
        return
    wanted = set(ids)
    with Collection(out) as c:
        for index in np.flatnonzero(c.sources == "generated"):
            if str(c.shape_ids[index]) not in wanted:
                continue
            prov = c.provenance(int(index))
            differ = {k: (prov.get(k), v) for k, v in sampler.items() if prov.get(k) != v}
            if differ:
                said = "; ".join(f"{k}: stored {old!r}, asked {new!r}" for k, (old, new) in differ.items())
                raise ValueError(f"{out}: shape {c.shape_ids[index]} was generated by another sampler ({said}). "
                                 "Resuming would mix two generators in one collection: give a new --out, "
                                 "or the same checkpoint, --scheduler, --steps and --first-timestep as before.")


def _has_parts(category: str) -> bool:
    try:
        part_names(category)
        return True
    except KeyError:
        return False

