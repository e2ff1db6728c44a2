"""Training the DiT-3D denoiser with DDPM (Ho et al. 2020) on Accelerate.

* Diffusion: diffusers ``DDPMScheduler`` (T = 1000, linear betas 1e-4 .. 0.02, epsilon prediction),
  loss = MSE between the predicted and the true noise (DiT-3D §3.1).
* Data: the shapes of one category from one or more collections, each normalised to the unit
  sphere, held in memory (``[S, N, 3]``); batches are drawn by a generator seeded with
  ``(seed, step, process)``, as are the timesteps and the noise, so a resumed run continues with
  exactly the losses an uninterrupted run would have had.
* Accelerate: device placement, mixed precision on GPU, several processes with
  ``accelerate launch --multi_gpu`` (GPUs) or ``torchrun --nproc_per_node K`` (CPU, gloo); ``save_state`` / ``load_state`` for ``--resume``. EMA weights
  (``diffusers.training_utils.EMAModel``) are checkpointed with the state.
* Output folder: ``config.yaml`` (the config used), ``log.jsonl`` (one JSON line per logged step:
  step, loss, lr, seconds), ``checkpoints/step-XXXXXXX/`` (the last ``keep_checkpoints``), and
  ``model/`` — the EMA model (``save_pretrained``: safetensors + ``config.json``), the scheduler
  config and ``training.json`` (data, steps, wall time) — rewritten at every checkpoint, so
  ``gen3d sample --checkpoint OUT/model`` works while training continues.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel

from .collection import Collection
from .config import read_yaml_config
from .dataset import normalize_unit_sphere
from .dit3d import DiT3D, count_parameters
from .runs import latest_checkpoint, resume_checkpoint, save_checkpoint, truncate_log

DEFAULT_TRAIN = {"batch_size": 16, "lr": 1e-4, "weight_decay": 0.0, "steps": 10000, "ema_decay": 0.999,
                 "checkpoint_every": 500, "log_every": 10, "keep_checkpoints": 2, "seed": 0,
                 "mixed_precision": "bf16", "grad_clip": 1.0, "lr_cooldown_steps": 0}
DEFAULT_DIFFUSION = {"num_train_timesteps": 1000, "beta_start": 1e-4, "beta_end": 0.02, "beta_schedule": "linear",
                     "prediction_type": "epsilon"}


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ``configs/gen3d/*.yaml`` file and fill in defaults.

    Keys: ``model`` (DiT3D arguments), ``train`` (see ``DEFAULT_TRAIN``; ``lr_cooldown_steps``: see
    :func:`learning_rate`), ``diffusion`` (DDPMScheduler arguments), ``num_points``.

    Raises:
        FileNotFoundError; ValueError for unknown keys.
    """
    path = Path(path)
    cfg = read_yaml_config(path, {"model", "train", "diffusion", "num_points", "description"})
    bad = set(cfg.get("train", {})) - set(DEFAULT_TRAIN)
    if bad:
        raise ValueError(f"{path}: unknown train keys {sorted(bad)} (known: {sorted(DEFAULT_TRAIN)})")
    train_cfg = {**DEFAULT_TRAIN, **cfg.get("train", {})}
    if not 0 <= train_cfg["lr_cooldown_steps"] <= train_cfg["steps"]:
        raise ValueError(f"{path}: train.lr_cooldown_steps must lie in [0, train.steps = {train_cfg['steps']}], "
                         f"got {train_cfg['lr_cooldown_steps']}")
    return {"model": dict(cfg.get("model", {})), "train": train_cfg,
            "diffusion": {**DEFAULT_DIFFUSION, **cfg.get("diffusion", {})}, "num_points": int(cfg.get("num_points", 2048)),
            "description": cfg.get("description", "")}


def learning_rate(train_config: dict[str, Any], step: int) -> float:
    """Learning rate of the optimiser step taken at 0-based ``step``: ``lr`` held constant, then,
    over the last ``lr_cooldown_steps`` of the config's ``steps``, decayed linearly towards 0 (the
    last step uses ``lr / lr_cooldown_steps``) — the warmup-stable-decay schedule's cooldown
    (Hägele et al. 2024, "Scaling Laws and Compute-Optimal Training beyond Fixed Training Durations").

    A pure function of the step, so ``--resume`` continues the same schedule with no saved state;
    ``--max-steps`` pauses a run without moving its cooldown. ``lr_cooldown_steps = 0``: constant.
    """
    lr, steps, cooldown = train_config["lr"], train_config["steps"], train_config["lr_cooldown_steps"]
    return lr if cooldown <= 0 else lr * min(1.0, (steps - step) / cooldown)


def load_training_clouds(collections: list[str | os.PathLike], category: str, num_points: int,
                         splits: tuple[str, ...] = ("train",)) -> tuple[torch.Tensor, list[dict]]:
    """Unit-sphere-normalised clouds ``float32 [S, num_points, 3]`` of ``category`` and ``split``
    from collections, and a list of where they came from.

    Raises:
        ValueError: no shape of the category / split, or a collection with N < num_points.
    """
    clouds, sources = [], []
    for path in collections:
        with Collection(path) as c:
            if category not in c.part_names:
                continue
            if c.num_points < num_points:
                raise ValueError(f"{path}: stores N={c.num_points} < num_points={num_points}")
            idx = c.select(category=category, split=list(splits))
            for i in idx:
                pts = c.points(int(i))
                if c.num_points > num_points:
                    pts = pts[np.random.default_rng(int(i)).choice(c.num_points, num_points, replace=False)]
                clouds.append(normalize_unit_sphere(pts)[0])
            counts: dict[str, int] = {}
            for i in idx:
                key = f"{c.sources[i]}:{c.provenance(int(i)).get('dataset', '')}"
                counts[key] = counts.get(key, 0) + 1
            sources.append({"collection": str(path), "shapes": int(len(idx)), "by_source": counts})
    if not clouds:
        raise ValueError(f"no {category!r} shapes of split {splits} in {[str(p) for p in collections]}")
    return torch.from_numpy(np.stack(clouds)), sources


def _step_generator(seed: int, step: int, process: int, device: torch.device) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(np.random.SeedSequence([seed, step, process]).generate_state(1)[0]))
    return g


def training_batch(data: torch.Tensor, scheduler: DDPMScheduler, batch_size: int, seed: int, step: int,
                   process: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch of step ``step``: ``(noisy [B,N,3], timesteps long [B], noise [B,N,3])``,
    a deterministic function of ``(seed, step, process)``."""
    g = _step_generator(seed, step, process, data.device)
    idx = torch.randint(0, len(data), (batch_size,), generator=g)
    x0 = data[idx]
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=g)
    return scheduler.add_noise(x0, noise, t), t, noise


def _write_model(out: Path, ema: EMAModel, model: DiT3D, scheduler: DDPMScheduler, info: dict) -> None:
    """Write the EMA weights as a diffusers model folder (temporary name, then rename)."""
    export = copy.deepcopy(model)
    ema.copy_to(export.parameters())
    tmp = out / ".model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    export.save_pretrained(tmp, safe_serialization=True)
    scheduler.save_config(tmp)
    (tmp / "training.json").write_text(json.dumps(info, indent=2))
    final, old = out / "model", out / ".model.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def init_from(model: DiT3D, init: str | os.PathLike, config: dict[str, Any]) -> dict[str, Any]:
    """Load the weights of a trained model folder into ``model`` (the start of a fine-tuning or
    continued run: ``gen3d train --init``).

    Args:
        model: the freshly built model, of ``config["model"]``.
        init: a model folder (``OUT/model`` of ``gen3d train``, a shipped checkpoint) or a run
            folder holding ``model/``; weights stored in float16 are loaded as float32.
        config: the run's config; its ``model`` and ``diffusion`` sections must match the folder's
            ``config.json`` and ``scheduler_config.json``.

    Returns:
        What the run records as ``init`` in ``training.json``: the folder, the first 16 hex digits
        of its weights' SHA-256, and its own ``steps`` and ``wall_seconds`` (None if unknown).

    Raises:
        FileNotFoundError: no model in ``init``.
        ValueError: a ``model`` or ``diffusion`` setting differs (names the file and the setting).
    """
    from .sample import CheckpointNotFoundError, checkpoint_hash, resolve_checkpoint, training_info

    try:
        folder = resolve_checkpoint("", init)
    except CheckpointNotFoundError as e:
        raise FileNotFoundError(f"--init {e}") from None
    source = DiT3D.from_pretrained(str(folder), torch_dtype=torch.float32)
    ours = {"model": {k: v for k, v in model.config.items() if not k.startswith("_")}, "diffusion": config["diffusion"]}
    for section, saved, name in (("model", source.config, "config.json"),
                                 ("diffusion", DDPMScheduler.load_config(str(folder)), "scheduler_config.json")):
        differ = {k: (saved.get(k), v) for k, v in ours[section].items() if _plain(saved.get(k)) != _plain(v)}
        if differ:
            raise ValueError(f"--init {folder / name}: {section} settings differ from the config's: " +
                             ", ".join(f"{k} = {a!r} there, {b!r} in the config" for k, (a, b) in differ.items()))
    model.load_state_dict(source.state_dict())
    before = training_info(folder)
    return {"path": str(folder), "weights_sha256": checkpoint_hash(folder), "steps": before.get("steps"),
            "wall_seconds": before.get("wall_seconds")}


def train(config: dict[str, Any], category: str, collections: list[str | os.PathLike], out: str | os.PathLike,
          resume: bool = False, max_steps: int | None = None, progress: bool = True,
          init: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train (or resume training) a DiT-3D generator for one category.

    Args:
        config: from :func:`load_config`.
        category: the category to learn (shapes of other categories are ignored).
        collections: collection files to take the category's ``train`` shapes from.
        out: output folder (see the module docstring).
        resume: continue from the latest checkpoint in ``out`` (error if ``out`` has a run and
            ``resume`` is False).
        max_steps: stop after this step even if the config asks for more (the run can be resumed).
        progress: show a progress bar.
        init: start from the weights of this model folder (:func:`init_from`; the EMA starts there
            too) instead of a random initialisation, with a fresh optimizer, step 0 and the config's
            learning-rate schedule: fine-tuning a shipped checkpoint on other data, or continuing
            one with a new cooldown. Recorded as ``init`` in ``training.json`` (also when the run
            is resumed; a resumed run's weights come from its checkpoint).

    Returns:
        ``training.json``'s content: steps, wall time, data, config, final loss.

    Raises:
        FileExistsError: ``out`` holds a run and ``resume`` is False.
        FileNotFoundError, ValueError: as :func:`init_from`.
        ValueError: no training shapes.
    """
    from tqdm import tqdm

    out = Path(out)
    tc, n_points = config["train"], config["num_points"]
    if (out / "log.jsonl").exists() and not resume:
        raise FileExistsError(f"{out}: holds a training run; pass --resume to continue it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    # cpu=True without CUDA: accelerate only sets up multi-process (gloo) CPU training when asked to.
    accelerator = Accelerator(mixed_precision=tc["mixed_precision"] if torch.cuda.is_available() else "no",
                              cpu=not torch.cuda.is_available())
    set_seed(tc["seed"])
    data, sources = load_training_clouds(list(collections), category, n_points)
    scheduler = DDPMScheduler(**config["diffusion"])
    model = DiT3D(**config["model"])
    init_info = _init(model, init, config, out, resume)
    ema = EMAModel(model.parameters(), decay=tc["ema_decay"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"])
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(ema)
    step, wall = 0, 0.0
    ckpt, meta = resume_checkpoint(accelerator, out) if resume else (None, {})
    if ckpt is not None:
        step, wall = meta["step"], meta["wall_seconds"]
        truncate_log(out / "log.jsonl", "step", step)
    if accelerator.is_main_process:
        (out / "config.yaml").write_text(yaml.safe_dump({**config, "category": category,
                                                          "collections": [str(c) for c in collections]}))
    total = min(tc["steps"], max_steps) if max_steps is not None else tc["steps"]
    ema.to(accelerator.device)
    data = data.to(accelerator.device)
    unwrapped = accelerator.unwrap_model(model)
    info: dict[str, Any] = {}
    bar = tqdm(total=total, initial=step, desc=f"train {category}", disable=not (progress and accelerator.is_main_process))
    last_loss = float("nan")
    t0 = time.perf_counter()
    while step < total:
        model.train()
        noisy, t, noise = training_batch(data.cpu(), scheduler, tc["batch_size"], tc["seed"], step, accelerator.process_index)
        noisy, t, noise = noisy.to(accelerator.device), t.to(accelerator.device), noise.to(accelerator.device)
        with accelerator.autocast():
            pred = model(noisy, t).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise)
        accelerator.backward(loss)
        if tc["grad_clip"]:
            accelerator.clip_grad_norm_(model.parameters(), tc["grad_clip"])
        lr = learning_rate(tc, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(unwrapped.parameters())
        step += 1
        last_loss = accelerator.gather(loss.detach()[None]).mean().item()
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.4f}")
        if accelerator.is_main_process and (step % tc["log_every"] == 0 or step == total):
            with open(out / "log.jsonl", "a") as fh:
                fh.write(json.dumps({"step": step, "loss": last_loss, "lr": lr,
                                     "seconds": round(wall + time.perf_counter() - t0, 2)}) + "\n")
        if step % tc["checkpoint_every"] == 0 or step == total:
            info = _checkpoint(accelerator, out, step, wall + time.perf_counter() - t0, ema, unwrapped, scheduler,
                               config, category, sources, last_loss, len(data), init_info)
    bar.close()
    return info or json.loads((out / "model" / "training.json").read_text())


def _plain(value: Any) -> Any:
    """Tuples as lists, so that a setting read from JSON compares equal to the same one from YAML."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _init(model: DiT3D, init: str | os.PathLike | None, config: dict, out: Path, resume: bool) -> dict | None:
    """Apply ``--init`` and remember it in ``OUT/init.json``, so that a resumed run records it too
    (and, resumed before its first checkpoint, starts from the same weights without ``--init``)."""
    record = out / "init.json"
    recorded = json.loads(record.read_text()) if resume and record.exists() else None
    if init is None and recorded is not None and latest_checkpoint(out) is None:
        init = recorded["path"]
    if init is None:
        return recorded
    info = init_from(model, init, config)
    if recorded is None and int(os.environ.get("RANK", "0")) == 0:
        tmp = record.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2))
        os.replace(tmp, record)
    return recorded or info


def _checkpoint(accelerator: Accelerator, out: Path, step: int, wall: float, ema: EMAModel, model: DiT3D,
                scheduler: DDPMScheduler, config: dict, category: str, sources: list, loss: float, n_shapes: int,
                init_info: dict | None = None) -> dict:
    info = {"category": category, "steps": step, "wall_seconds": round(wall, 1), "final_loss": loss,
            "parameters": count_parameters(model), "training_shapes": n_shapes, "data": sources,
            "config": config, "device": str(accelerator.device), "processes": accelerator.num_processes,
            "torch": torch.__version__}
    if init_info is not None:
        info["init"] = init_info
    save_checkpoint(accelerator, out / "checkpoints" / f"step-{step:07d}", {"step": step, "wall_seconds": wall},
                    config["train"]["keep_checkpoints"])
    if accelerator.is_main_process:
        _write_model(out, ema, model, scheduler, info)
    accelerator.wait_for_everyone()
    return info


def export_model(model_dir: str | os.PathLike, dest: str | os.PathLike, half: bool = True) -> Path:
    """Copy a trained model folder to ``dest`` for shipping: weights in float16 (``half``;
    sampling loads them as float32), ``config.json``, the scheduler config and ``training.json``.

    Returns:
        ``dest``. Raises FileNotFoundError if ``model_dir`` holds no model.
    """
    model_dir, dest = Path(model_dir), Path(dest)
    if not (model_dir / "config.json").exists():
        raise FileNotFoundError(f"{model_dir}: no model (config.json) here")
    model = DiT3D.from_pretrained(str(model_dir))
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (model.half() if half else model).save_pretrained(tmp, safe_serialization=True)
    for name in ("scheduler_config.json", "training.json"):
        if (model_dir / name).exists():
            shutil.copy(model_dir / name, tmp / name)
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    return dest
