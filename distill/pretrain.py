"""Self-supervised pre-training of the student's encoder: Point-M2AE multi-scale masked autoencoding
(Zhang et al., NeurIPS 2022, §3.1-3.3) on Accelerate.

Model (:class:`PointM2AEPretrainer`):

* **Multi-scale masking** (:func:`multiscale_mask`, the paper's §3.2 and the official
  ``H_Encoder.forward``): a random ``mask_ratio`` (0.8) of the *coarsest* stage's tokens is masked;
  a token of stage s-1 is visible iff it belongs to the kNN group of a visible stage-s token, so the
  visible regions are consistent across scales. (The official code also marks point 0 of the batch
  visible through an indexing slip; we do not.)
* **Encoder** (:class:`distill.student.PointM2AEEncoder`) on the visible tokens only, packed per
  cloud; like the official pre-training, local attention radii are not applied (global attention
  among visible tokens, ``local_attention_in_pretraining: false``).
* **Light hierarchical decoder** — a faithful-enough simplification of the official one: the
  coarsest stage's visible encoder tokens plus a shared learned mask token at masked positions,
  with positional embeddings, go through ``decoder_depths[0]`` transformer blocks; then, for every
  finer stage down to stage 1, the decoder tokens are propagated to that stage's centres by 3-NN
  interpolation, concatenated with the stage's encoder tokens (zero where masked; the paper's
  skip connections) and fused by ``Linear-LayerNorm-GELU-Linear`` (the official code uses a
  BatchNorm residual MLP), followed by ``decoder_depths[j]`` blocks. The official model decodes two
  stages and predicts the stage-2 groups; here all stages are decoded and a linear head predicts the
  ``group_sizes[0]`` point coordinates (relative to the centre) of every *masked stage-1 group*.
* **Loss**: Chamfer-L2 (:func:`distill.geometry.chamfer_l2`, squared distances, both directions)
  between predicted and true masked groups, averaged over the masked groups of the batch.

Training (:func:`pretrain`): shapes from :class:`gen3d.dataset.ShapeDataset` (unit-sphere normalised,
``num_points`` each) of the ``train`` / ``val`` / ``none`` splits — test shapes are never used; the
batch of step t (shape choice, Point-M2AE's scale-and-translate augmentation, the masking noise) is a
function of ``(seed, t, process)``, and dropout / stochastic-depth RNG states are checkpointed, so
a resumed run logs exactly the losses an uninterrupted run would. AdamW with linear warm-up and a
cosine decay (official: lr 1e-3, weight decay 0.05).

Output folder: ``config.yaml``, ``log.jsonl`` (one line per logged step: step, loss, lr, visible
fraction of stage-1 tokens, seconds), ``checkpoints/step-XXXXXXX/`` (Accelerate state + ``meta.json``,
written under a temporary name and renamed; the last ``keep_checkpoints`` kept), and ``encoder/``
(``PointM2AEEncoder.save_pretrained``: safetensors + ``config.json``, plus ``pretraining.json``),
rewritten at every checkpoint and loadable by :meth:`distill.student.Student.load_encoder`.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.utils.data import ConcatDataset

from gen3d.collection import Collection
from gen3d.config import read_yaml_config
from gen3d.dataset import ShapeDataset
from gen3d.runs import resume_checkpoint, save_checkpoint, truncate_log, warmup_cosine

from .geometry import chamfer_l2, three_nn_interpolate
from .student import (
    ENCODER_ARGS,
    PAPER_ENCODER,
    BlockStack,
    PointM2AEEncoder,
    Tokenization,
    _check_encoder_sizes,
    _init_weights,
    _pos_embed,
    count_parameters,
    load_student_config,
)

DEFAULT_TRAIN = {"batch_size": 16, "lr": 1e-3, "min_lr": 1e-6, "weight_decay": 0.05, "warmup_steps": 500,
                 "steps": 20000, "checkpoint_every": 500, "log_every": 10, "keep_checkpoints": 2, "seed": 0,
                 "mixed_precision": "bf16", "grad_clip": 0.0, "augment": True, "sampling": "random"}
DEFAULT_DECODER = {"decoder_dims": [384, 192, 96], "decoder_depths": [1, 1, 1], "mask_ratio": 0.8,
                   "local_attention_in_pretraining": False}
#: splits pre-training may read; ``test`` is refused
ALLOWED_SPLITS = ("train", "val", "none")


# ----------------------------------------------------------------------------------------------
# Masking
# ----------------------------------------------------------------------------------------------
def multiscale_mask(tokens: Tokenization, mask_ratio: float, noise: torch.Tensor) -> list[torch.Tensor]:
    """Point-M2AE multi-scale masking: visible tokens of every stage.

    Args:
        tokens: multi-scale groups (:meth:`PointM2AEEncoder.tokenize`).
        mask_ratio: fraction of the coarsest stage's G_S tokens to mask (``int(ratio * G_S)`` of them,
            as the official code; at least one token stays visible).
        noise: ``float [B, G_S]``; the ``int(ratio * G_S)`` smallest entries of each row are masked.

    Returns:
        per stage ``bool [B, G_s]`` (True = visible): stage S from ``noise``, and stage s-1 token j
        visible iff j is in the group ``tokens.idx[s]`` of some visible stage-s token.

    Raises:
        ValueError: ``mask_ratio`` outside [0, 1) or ``noise`` of the wrong shape.
    """
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    b, g, _ = tokens.centers[-1].shape
    if noise.shape != (b, g):
        raise ValueError(f"noise must be [{b}, {g}], got {tuple(noise.shape)}")
    num_mask = min(int(mask_ratio * g), g - 1)
    rank = noise.argsort(1).argsort(1)
    visible = [rank >= num_mask]
    for s in range(len(tokens.centers) - 1, 0, -1):
        idx = tokens.idx[s]  # [B, G_s, K_s] into stage s-1
        hits = torch.zeros(b, tokens.centers[s - 1].shape[1], device=idx.device)
        hits.scatter_add_(1, idx.reshape(b, -1), visible[0][..., None].expand_as(idx).reshape(b, -1).float())
        visible.insert(0, hits > 0)
    return visible


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
@dataclass
class PretrainOutput:
    """Output of :class:`PointM2AEPretrainer`.

    Attributes:
        loss: scalar Chamfer-L2, mean over the masked stage-1 groups of the batch.
        reconstruction: ``float [L, K_1, 3]`` predicted coordinates of the L masked stage-1 groups
            (relative to their centres).
        target: ``float [L, K_1, 3]`` their true coordinates.
        visible: per stage ``bool [B, G_s]``.
    """

    loss: torch.Tensor
    reconstruction: torch.Tensor
    target: torch.Tensor
    visible: list[torch.Tensor]


class PointM2AEPretrainer(ModelMixin, ConfigMixin):
    """Point-M2AE encoder + light hierarchical decoder for masked autoencoding (module docstring).

    Args:
        num_groups, group_sizes, encoder_dims, encoder_depths, num_heads, local_radius, embed_hidden,
            mlp_ratio, drop_path_rate: the encoder, as :class:`distill.student.PointM2AEEncoder`.
        decoder_dims: decoder width per stage, coarsest first (one per stage; divisible by ``num_heads``).
        decoder_depths: transformer blocks per decoder stage, coarsest first.
        mask_ratio: masked fraction of the coarsest tokens (paper: 0.8).
        local_attention_in_pretraining: apply the encoder's local attention radii (official: no).

    ``forward(points float [B, N, 3], noise float [B, G_S] | None) -> PretrainOutput``.

    Raises:
        ValueError: inconsistent sizes.
    """

    @register_to_config
    def __init__(self, num_groups: Sequence[int] = (512, 256, 64), group_sizes: Sequence[int] = (16, 8, 8),
                 encoder_dims: Sequence[int] = (96, 192, 384), encoder_depths: Sequence[int] = (5, 5, 5),
                 num_heads: int = 6, local_radius: Sequence[float] = (0.32, 0.64, 1.28),
                 embed_hidden: Sequence[int] = (128, 256, 512), mlp_ratio: float = 4.0, drop_path_rate: float = 0.1,
                 decoder_dims: Sequence[int] = (384, 192, 96), decoder_depths: Sequence[int] = (1, 1, 1),
                 mask_ratio: float = 0.8, local_attention_in_pretraining: bool = False):
        super().__init__()
        stages = len(num_groups)
        if len(decoder_dims) != stages or len(decoder_depths) != stages:
            raise ValueError(f"decoder_dims and decoder_depths need one entry per stage ({stages}), "
                             f"got {list(decoder_dims)} and {list(decoder_depths)}")
        bad = [d for d in decoder_dims if d % num_heads]
        if bad:
            raise ValueError(f"decoder_dims {bad} are not divisible by num_heads={num_heads}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.encoder = PointM2AEEncoder(**{k: _as_list(self.config[k]) for k in ENCODER_ARGS})
        enc = list(encoder_dims)[::-1]  # coarsest first, like the decoder
        dec = list(decoder_dims)
        self.decoder_embed = nn.Linear(enc[0], dec[0])
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec[0]))
        self.decoder_pos_embeds = nn.ModuleList(_pos_embed(d) for d in dec)
        self.token_prop = nn.ModuleList(
            nn.Sequential(nn.Linear(dec[j - 1] + enc[j], dec[j]), nn.LayerNorm(dec[j]), nn.GELU(), nn.Linear(dec[j], dec[j]))
            for j in range(1, stages))
        self.h_decoder = nn.ModuleList(BlockStack(d, n, num_heads, mlp_ratio, [0.0] * n)
                                       for d, n in zip(dec, decoder_depths))
        self.decoder_norm = nn.LayerNorm(dec[-1])
        self.rec_head = nn.Linear(dec[-1], 3 * group_sizes[0])
        for module in (self.decoder_embed, self.decoder_pos_embeds, self.token_prop, self.h_decoder,
                       self.decoder_norm, self.rec_head):
            module.apply(_init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(self, points: torch.Tensor, noise: torch.Tensor | None = None,
                generator: torch.Generator | None = None) -> PretrainOutput:
        """Mask, encode, decode and score one batch.

        Args:
            points: ``float [B, N, 3]`` unit-sphere clouds.
            noise: ``float [B, G_S]`` masking noise (see :func:`multiscale_mask`); drawn from
                ``generator`` (on the CPU) when None.
            generator: a ``torch.Generator`` for the noise.

        Returns:
            :class:`PretrainOutput`.
        """
        enc = self.encoder
        tokens = enc.tokenize(points)
        if noise is None:
            b, g = points.shape[0], self.config.num_groups[-1]
            noise = torch.rand(b, g, generator=generator).to(points.device)
        visible = multiscale_mask(tokens, self.config.mask_ratio, noise.to(points.device))
        feats = enc.encode(tokens, visible, local_attention=self.config.local_attention_in_pretraining)
        feats, centers, visible_c = feats[::-1], tokens.centers[::-1], visible[::-1]
        vis0 = visible_c[0][..., None]
        x = torch.where(vis0, self.decoder_embed(feats[0]), self.mask_token.to(feats[0].dtype))
        x = self.h_decoder[0](x, self.decoder_pos_embeds[0](centers[0]))
        for j in range(1, len(centers)):
            up = three_nn_interpolate(centers[j], centers[j - 1], x)
            x = self.token_prop[j - 1](torch.cat([up, feats[j]], -1))
            x = self.h_decoder[j](x, self.decoder_pos_embeds[j](centers[j]))
        x = self.decoder_norm(x)
        masked = ~visible[0]
        target = tokens.neighborhood[masked]  # [L, K1, 3]
        rec = self.rec_head(x[masked]).view(target.shape[0], -1, 3)
        if target.shape[0] == 0:  # everything visible (tiny configs): nothing to reconstruct
            loss = x.sum() * 0.0
        else:
            loss = chamfer_l2(rec.float(), target.float()).mean()
        return PretrainOutput(loss, rec, target, visible)


def _as_list(value: Any) -> Any:
    return list(value) if isinstance(value, (list, tuple)) else value


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------
def load_pretrain_config(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read a ``configs/distill/pretrain_*.yaml`` file and fill in defaults (None: all defaults,
    i.e. the paper-size encoder of ``PAPER_ENCODER``, ``DEFAULT_DECODER``, ``DEFAULT_TRAIN``).

    Keys: ``student`` (a student config, relative to this file's folder, whose encoder sizes are
    used, so that the exported encoder loads into that student) and/or ``encoder`` (encoder
    arguments, overriding the student's), ``decoder`` (see ``DEFAULT_DECODER``), ``train`` (see
    ``DEFAULT_TRAIN``), ``num_points``, ``description``.

    Returns:
        ``{"model": PointM2AEPretrainer arguments, "train": {...}, "num_points": int,
        "description": str, "student": str | None}``.

    Raises:
        FileNotFoundError; ValueError: not YAML, unknown keys, inconsistent sizes.
    """
    if path is None:
        path, cfg = Path("<defaults>"), {}
    else:
        path = Path(path)
        cfg = read_yaml_config(path, {"student", "encoder", "decoder", "train", "num_points", "description"})
    encoder = dict(PAPER_ENCODER)
    student = None
    if cfg.get("student"):
        student = (path.parent / cfg["student"]).resolve()
        scfg = load_student_config(student)
        encoder.update({k: v for k, v in scfg["model"].items() if k in ENCODER_ARGS})
    bad = set(cfg.get("encoder") or {}) - set(ENCODER_ARGS)
    if bad:
        raise ValueError(f"{path}: unknown encoder keys {sorted(bad)} (known: {list(ENCODER_ARGS)})")
    encoder.update(cfg.get("encoder") or {})
    bad = set(cfg.get("decoder") or {}) - set(DEFAULT_DECODER)
    if bad:
        raise ValueError(f"{path}: unknown decoder keys {sorted(bad)} (known: {sorted(DEFAULT_DECODER)})")
    bad = set(cfg.get("train") or {}) - set(DEFAULT_TRAIN)
    if bad:
        raise ValueError(f"{path}: unknown train keys {sorted(bad)} (known: {sorted(DEFAULT_TRAIN)})")
    model = {**{k: _as_list(v) for k, v in encoder.items()}, **DEFAULT_DECODER, **(cfg.get("decoder") or {})}
    _check_encoder_sizes(model["num_groups"], model["group_sizes"], model["encoder_dims"], model["encoder_depths"],
                         model["num_heads"], model["local_radius"], model["embed_hidden"])
    train = {**DEFAULT_TRAIN, **(cfg.get("train") or {})}
    if train["sampling"] not in ("fps", "random"):
        raise ValueError(f"{path}: train.sampling must be 'fps' or 'random', got {train['sampling']!r}")
    return {"model": model, "train": train, "num_points": int(cfg.get("num_points", 2048)),
            "description": cfg.get("description", ""), "student": None if student is None else str(student)}


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------
def pretraining_dataset(collections: Sequence[str | os.PathLike], num_points: int, category: str | None = None,
                        splits: Sequence[str] = ALLOWED_SPLITS, sampling: str = "random",
                        seed: int = 0) -> tuple[ConcatDataset, list[dict]]:
    """The shapes pre-training reads: a ``ConcatDataset`` of :class:`gen3d.dataset.ShapeDataset`
    (unit-sphere normalised, ``num_points`` each) and a summary per collection.

    Args:
        collections: collection files.
        num_points: points per shape (each collection must store at least this many).
        category: only this category (collections without it are skipped); None = all.
        splits: splits to read; ``test`` is refused.
        sampling, seed: see :class:`gen3d.dataset.ShapeDataset`.

    Raises:
        ValueError: ``test`` (or an unknown split) in ``splits``, a collection storing fewer than
        ``num_points`` points, or no shape at all.
    """
    splits = (splits,) if isinstance(splits, str) else tuple(splits)
    bad = set(splits) - set(ALLOWED_SPLITS)
    if bad:
        raise ValueError(f"pre-training never reads {sorted(bad)} shapes; allowed splits: {list(ALLOWED_SPLITS)}")
    parts, sources = [], []
    for path in collections:
        with Collection(path) as c:
            if category is not None and category not in c.part_names:
                continue
            if c.num_points < num_points:
                raise ValueError(f"{path}: stores N={c.num_points} < num_points={num_points}")
            idx = c.select(category=category, split=list(splits))
            counts: dict[str, int] = {}
            for i in idx:
                key = f"{c.categories[i]}:{c.sources[i]}:{c.splits[i]}"
                counts[key] = counts.get(key, 0) + 1
        if len(idx) == 0:
            continue
        parts.append(ShapeDataset(path, category=category, split=list(splits), num_points=num_points,
                                  sampling=sampling, seed=seed))
        sources.append({"collection": str(path), "shapes": len(idx), "by_category_source_split": counts})
    if not parts:
        raise ValueError(f"no shapes of category {category!r} and splits {list(splits)} in "
                         f"{[str(p) for p in collections]}")
    return ConcatDataset(parts), sources


def _step_generator(seed: int, step: int, process: int) -> torch.Generator:
    g = torch.Generator(device="cpu")
    g.manual_seed(int(np.random.SeedSequence([seed, step, process, 0x4D32]).generate_state(1)[0]))
    return g


def pretraining_batch(data: ConcatDataset, batch_size: int, num_coarse: int, seed: int, step: int, process: int = 0,
                      augment: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of step ``step`` (0-based), a deterministic function of ``(seed, step, process)``.

    Shapes are drawn uniformly with replacement; each shape's subsample is redrawn every pass over
    the data (``ShapeDataset.set_epoch``). Augmentation (Point-M2AE's ``PointcloudScaleAndTranslate``):
    per-axis scale in [2/3, 3/2], per-axis shift in [-0.2, 0.2].

    Returns:
        ``(points float32 [B, N, 3], noise float32 [B, num_coarse])`` on the CPU.
    """
    g = _step_generator(seed, step, process)
    epoch = step * batch_size // max(1, len(data))
    for ds in data.datasets:
        ds.set_epoch(epoch)
    idx = torch.randint(0, len(data), (batch_size,), generator=g)
    points = torch.stack([data[int(i)]["points"] for i in idx])
    if augment:
        scale = torch.empty(batch_size, 1, 3).uniform_(2.0 / 3.0, 1.5, generator=g)
        shift = torch.empty(batch_size, 1, 3).uniform_(-0.2, 0.2, generator=g)
        points = points * scale + shift
    noise = torch.rand(batch_size, num_coarse, generator=g)
    return points, noise


def learning_rate(step: int, train: dict[str, Any]) -> float:
    """Linear warm-up over ``warmup_steps`` then cosine decay to ``min_lr`` at ``steps`` (step is 0-based)."""
    lr = train["lr"]
    return lr * warmup_cosine(step, train["steps"], train["warmup_steps"], train["min_lr"] / lr if lr else 0.0)


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------
def _replace_dir(tmp: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def export_encoder(model: PointM2AEPretrainer, dest: str | os.PathLike, info: dict | None = None) -> Path:
    """Write the pretrainer's encoder to ``dest`` (``save_pretrained``: safetensors + ``config.json``,
    plus ``pretraining.json`` from ``info``) under a temporary name, then rename. Returns ``dest``."""
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.encoder.save_pretrained(tmp, safe_serialization=True)
    if info is not None:
        (tmp / "pretraining.json").write_text(json.dumps(info, indent=2))
    _replace_dir(tmp, dest)
    return dest


def pretrain(collections: Sequence[str | os.PathLike], out: str | os.PathLike, config: dict[str, Any] | str | os.PathLike,
             category: str | None = None, resume: bool = False, max_steps: int | None = None, progress: bool = True,
             splits: Sequence[str] = ALLOWED_SPLITS) -> dict[str, Any]:
    """Pre-train (or resume pre-training) a Point-M2AE encoder by masked autoencoding.

    Args:
        collections: collection files to read shapes from.
        out: output folder (see the module docstring).
        config: from :func:`load_pretrain_config`, or the path of a ``pretrain_*.yaml``.
        category: only this category's shapes (None = every category).
        resume: continue from the latest complete checkpoint in ``out`` (error if ``out`` holds a run
            and ``resume`` is False).
        max_steps: stop after this step even if the config asks for more (the run can be resumed;
            the schedule still follows ``train.steps``).
        progress: show a progress bar.
        splits: splits to read (default train, val, none); ``test`` is refused.

    Returns:
        ``encoder/pretraining.json``'s content: steps, wall time, final loss, data, config.

    Raises:
        FileExistsError: ``out`` holds a run and ``resume`` is False.
        ValueError: ``test`` in ``splits``, no shapes, bad config.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm import tqdm

    if not isinstance(config, dict):
        config = load_pretrain_config(config)
    out = Path(out)
    tc, n_points = config["train"], config["num_points"]
    if (out / "log.jsonl").exists() and not resume:
        raise FileExistsError(f"{out}: holds a pre-training run; pass --resume to continue it or choose another --out")
    data, sources = pretraining_dataset(collections, n_points, category, splits, tc["sampling"], tc["seed"])
    out.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(mixed_precision=tc["mixed_precision"] if torch.cuda.is_available() else "no",
                              cpu=not torch.cuda.is_available())
    set_seed(tc["seed"])
    model = PointM2AEPretrainer(**config["model"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc["lr"], weight_decay=tc["weight_decay"])
    model, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(model)
    step, wall = 0, 0.0
    ckpt, meta = resume_checkpoint(accelerator, out) if resume else (None, {})
    if ckpt is not None:
        step, wall = meta["step"], meta["wall_seconds"]
    if accelerator.is_main_process:
        truncate_log(out / "log.jsonl", "step", step)
        plain = json.loads(json.dumps(config))  # tuples -> lists for YAML
        (out / "config.yaml").write_text(yaml.safe_dump({**plain, "category": category, "splits": list(splits),
                                                         "collections": [str(c) for c in collections]}))
    total = min(tc["steps"], max_steps) if max_steps is not None else tc["steps"]
    info: dict[str, Any] = {}
    last_loss = float("nan")
    bar = tqdm(total=total, initial=step, desc="pretrain", disable=not (progress and accelerator.is_main_process))
    t0 = time.perf_counter()
    g_coarse = unwrapped.config.num_groups[-1]
    while step < total:
        model.train()
        lr = learning_rate(step, tc)
        for group in optimizer.param_groups:
            group["lr"] = lr
        points, noise = pretraining_batch(data, tc["batch_size"], g_coarse, tc["seed"], step,
                                          accelerator.process_index, tc["augment"])
        with accelerator.autocast():
            result = model(points.to(accelerator.device), noise.to(accelerator.device))
        accelerator.backward(result.loss)
        if tc["grad_clip"]:
            accelerator.clip_grad_norm_(model.parameters(), tc["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        last_loss = accelerator.gather(result.loss.detach().float()[None]).mean().item()
        visible1 = result.visible[0].float().mean().item()
        bar.update(1)
        bar.set_postfix(loss=f"{last_loss:.5f}")
        if accelerator.is_main_process and (step % tc["log_every"] == 0 or step == total):
            with open(out / "log.jsonl", "a") as fh:
                fh.write(json.dumps({"step": step, "loss": last_loss, "lr": lr, "visible_stage1": round(visible1, 4),
                                     "seconds": round(wall + time.perf_counter() - t0, 2)}) + "\n")
        if step % tc["checkpoint_every"] == 0 or step == total:
            info = {"steps": step, "wall_seconds": round(wall + time.perf_counter() - t0, 1), "final_loss": last_loss,
                    "parameters": count_parameters(unwrapped), "encoder_parameters": count_parameters(unwrapped.encoder),
                    "shapes": len(data), "data": sources, "category": category, "splits": list(splits),
                    "config": config, "device": str(accelerator.device), "processes": accelerator.num_processes,
                    "torch": torch.__version__}
            _checkpoint(accelerator, out, step, wall + time.perf_counter() - t0, unwrapped, info,
                        tc["keep_checkpoints"])
    bar.close()
    return info or json.loads((out / "encoder" / "pretraining.json").read_text())


def _checkpoint(accelerator, out: Path, step: int, wall: float, model: PointM2AEPretrainer, info: dict,
                keep: int) -> None:
    save_checkpoint(accelerator, out / "checkpoints" / f"step-{step:07d}", {"step": step, "wall_seconds": wall}, keep)
    if accelerator.is_main_process:
        export_encoder(model, out / "encoder", info)
    accelerator.wait_for_everyone()


__all__ = [
    "ALLOWED_SPLITS",
    "DEFAULT_DECODER",
    "DEFAULT_TRAIN",
    "PointM2AEPretrainer",
    "PretrainOutput",
    "export_encoder",
    "learning_rate",
    "load_pretrain_config",
    "multiscale_mask",
    "pretrain",
    "pretraining_batch",
    "pretraining_dataset",
]
