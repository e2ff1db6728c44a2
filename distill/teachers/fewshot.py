"""The few-shot P-VLM teacher: a small 2D part-segmentation network trained on K labelled shapes.

PartSLIP (Liu et al., CVPR 2023) has a few-shot setting in which K = 8 shapes per category come with
part labels; PartDistill (Umam et al., CVPR 2024, Table 3) uses it as a teacher. Here no pretrained
backbone is available, so the teacher is a compact U-Net (Ronneberger et al., MICCAI 2015) with
GroupNorm (Wu & He, ECCV 2018), trained from random initialisation on the rendered views of the K
shapes (about 80-400 images) in a few CPU minutes:

* network: :class:`PartUNet`, ``R + 1`` output classes (class 0 = background, class ``r + 1`` = part
  ``r``), a global-context branch at the bottleneck (image-level pooling, as in PSPNet / DeepLab v3's
  ASPP) so that a pixel can tell, say, a chair's back from its seat by where it lies in the object;
* data: every image is resized to ``train.image_size`` (inference resizes the same way and upsamples
  the logits back to the input size);
* augmentation (:func:`augment_batch`): random left/right flips (part semantics do not change; turn
  them off for categories whose part names say "left" / "right"), random scale, rotation and
  translation (one affine warp, white fill), colour jitter on the object (brightness, contrast,
  saturation, per-channel gain) and pixel noise;
* loss: class-weighted cross-entropy (weights ``count^-1/2``, normalised) plus, optionally, soft
  Dice (Milletari et al., 3DV 2016) over the classes;
* optimiser: AdamW with linear warm-up and cosine decay (Loshchilov & Hutter, ICLR 2017/2019).

Measured choices (procedural chairs from ``gen3d.procedural``: 8 training shapes x 10 views = 80
images of 224 x 224, 8 held-out shapes; foreground pixel accuracy on the held-out views; CPU, one
thread of a loaded 2-core machine): U-Net at 160 px (the shipped default), 600 steps: 95.4 % (1119 s);
at 128 px, 600 steps: 95.3 % (577 s) — half the time for 0.1 point, set ``train.image_size: 128`` where
time matters; at 128 px, 300 steps: 94.7 % (289 s); torchvision's ``lraspp_mobilenet_v3_large`` from
scratch at 160 px, 300 steps: 69.3 % (its BatchNorm statistics do not settle on batches of 8).

The teacher's ``probs float32 [B, R, H, W]`` are the network's softmax with the background class
dropped and the rest renormalised over the parts (equivalently, a softmax over the ``R`` part
logits), so they sum to 1 over ``R`` at every pixel; which pixels show the object is the
renderer's business (its ``index`` map), not the teacher's. The background probability is available
from :meth:`FewShotTeacher.predict_probs`.

Checkpoints (:meth:`FewShotTeacher.save` / :meth:`FewShotTeacher.load`): a folder with
``model.safetensors`` and ``config.json`` (model arguments, part names, category, the K shapes' ids,
the training config and training statistics), written under a temporary name and renamed.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gen3d.config import read_yaml_config
from gen3d.runs import warmup_cosine

from .base import TeacherOutput

#: The default config file (the repository's ``configs/distill/teacher_fewshot.yaml``).
DEFAULT_CONFIG_PATH = Path(__file__).resolve().parents[2] / "configs" / "distill" / "teacher_fewshot.yaml"

DEFAULT_MODEL: dict[str, Any] = {"widths": [16, 32, 64, 128, 192], "groups": 8, "global_context": True}
DEFAULT_TRAIN: dict[str, Any] = {
    "image_size": 160, "steps": 600, "batch_size": 8, "lr": 3.0e-3, "weight_decay": 1.0e-4,
    "warmup_steps": 30, "min_lr_ratio": 0.02, "loss": "ce_dice", "dice_weight": 1.0,
    "class_weight_power": 0.5, "grad_clip": 1.0, "inference_batch_size": 16,
}
DEFAULT_AUGMENT: dict[str, Any] = {
    "hflip": 0.5, "scale": [0.8, 1.2], "rotate_deg": 10.0, "translate": 0.08,
    "brightness": 0.25, "contrast": 0.25, "saturation": 0.3, "channel_gain": 0.08, "noise": 0.02,
}
_SECTIONS = {"model": DEFAULT_MODEL, "train": DEFAULT_TRAIN, "augment": DEFAULT_AUGMENT}
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------- config

def default_fewshot_config() -> dict[str, Any]:
    """The built-in defaults ``{"description", "model", "train", "augment"}`` (fresh copies)."""
    return {"description": "", **{k: json.loads(json.dumps(v)) for k, v in _SECTIONS.items()}}


def merge_fewshot_config(config: dict[str, Any] | None, source: str = "config") -> dict[str, Any]:
    """Fill a (possibly partial) few-shot config in with the defaults and check it.

    Args:
        config: ``{"model": {...}, "train": {...}, "augment": {...}, "description": str}``; any
            section or key may be left out. ``None`` means all defaults.
        source: named in error messages (e.g. the file the config came from).

    Returns:
        A complete config (a new dict; the input is not modified).

    Raises:
        ValueError: unknown sections or keys, or out-of-range values.
    """
    config = dict(config or {})
    unknown = set(config) - {"description", *_SECTIONS}
    if unknown:
        raise ValueError(f"{source}: unknown few-shot config sections {sorted(unknown)} "
                         f"(known: description, {', '.join(_SECTIONS)})")
    out = default_fewshot_config()
    out["description"] = str(config.get("description", ""))
    for name, defaults in _SECTIONS.items():
        section = config.get(name) or {}
        if not isinstance(section, dict):
            raise ValueError(f"{source}: section {name!r} must be a mapping, got {type(section).__name__}")
        bad = set(section) - set(defaults)
        if bad:
            raise ValueError(f"{source}: unknown {name} keys {sorted(bad)} (known: {sorted(defaults)})")
        out[name].update(json.loads(json.dumps(section)))
    m, t, a = out["model"], out["train"], out["augment"]
    if len(m["widths"]) < 2 or any(int(w) < 1 or int(w) % int(m["groups"]) for w in m["widths"]):
        raise ValueError(f"{source}: model.widths needs >= 2 levels, each a multiple of model.groups "
                         f"({m['groups']}); got {m['widths']}")
    if int(t["image_size"]) % (2 ** (len(m["widths"]) - 1)):
        raise ValueError(f"{source}: train.image_size {t['image_size']} must be a multiple of "
                         f"2^(levels-1) = {2 ** (len(m['widths']) - 1)}")
    if t["loss"] not in ("ce", "ce_dice"):
        raise ValueError(f"{source}: train.loss must be 'ce' or 'ce_dice', got {t['loss']!r}")
    for key in ("steps", "batch_size", "inference_batch_size"):
        if int(t[key]) < 1:
            raise ValueError(f"{source}: train.{key} must be >= 1, got {t[key]}")
    lo, hi = a["scale"]
    if not 0 < lo <= hi:
        raise ValueError(f"{source}: augment.scale must be [lo, hi] with 0 < lo <= hi, got {a['scale']}")
    if not 0 <= a["hflip"] <= 1:
        raise ValueError(f"{source}: augment.hflip is a probability, got {a['hflip']}")
    return out


def load_fewshot_config(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read a few-shot teacher config (YAML) and fill in the defaults.

    Args:
        path: a YAML file with sections ``model`` (:class:`PartUNet` arguments), ``train`` (see
            ``DEFAULT_TRAIN``), ``augment`` (see ``DEFAULT_AUGMENT``) and ``description``. ``None``:
            the repository's ``configs/distill/teacher_fewshot.yaml`` when it exists, else the
            built-in defaults.

    Returns:
        The complete config (see :func:`merge_fewshot_config`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: not valid YAML, unknown keys or bad values.
    """
    if path is None:
        if not DEFAULT_CONFIG_PATH.is_file():
            return default_fewshot_config()
        path = DEFAULT_CONFIG_PATH
    return merge_fewshot_config(read_yaml_config(path), source=str(path))


# ---------------------------------------------------------------------------------------- network

def _block(cin: int, cout: int, groups: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout), nn.SiLU())


class PartUNet(nn.Module):
    """A compact U-Net with GroupNorm for 2D part segmentation.

    Encoder levels of ``widths`` channels (two 3x3 conv + GroupNorm + SiLU each, 2x2 max-pooling
    between levels), an image-level context branch at the bottleneck (global average pooling, a 1x1
    conv, broadcast and fused), and a decoder of bilinear upsampling, skip concatenation and the same
    blocks; a 1x1 conv gives the logits. With the default widths ``(16, 32, 64, 128, 192)`` it has
    about 1.67 M parameters.

    Args:
        num_classes: output classes (``R + 1``: background and ``R`` parts).
        widths: channels per level, shallow to deep; ``len(widths) - 1`` poolings, so the input
            size must be a multiple of ``2 ** (len(widths) - 1)``.
        groups: GroupNorm groups (each width must be a multiple).
        global_context: add the image-level pooling branch at the bottleneck.
        in_channels: input channels (3, RGB).

    Shapes:
        ``forward(x float32 [B, in_channels, H, W]) -> logits float32 [B, num_classes, H, W]``.
    """

    def __init__(self, num_classes: int, widths: Sequence[int] = (16, 32, 64, 128, 192), groups: int = 8,
                 global_context: bool = True, in_channels: int = 3):
        super().__init__()
        widths = [int(w) for w in widths]
        self.config = {"num_classes": int(num_classes), "widths": widths, "groups": int(groups),
                       "global_context": bool(global_context), "in_channels": int(in_channels)}
        self.down = nn.ModuleList()
        cin = in_channels
        for w in widths:
            self.down.append(_block(cin, w, groups))
            cin = w
        self.context = (nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(widths[-1], widths[-1], 1), nn.SiLU())
                        if global_context else None)
        self.fuse = nn.Conv2d(2 * widths[-1], widths[-1], 1) if global_context else None
        self.up = nn.ModuleList(_block(widths[i + 1] + widths[i], widths[i], groups)
                                for i in reversed(range(len(widths) - 1)))
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``float32 [B, C, H, W]`` -> logits ``float32 [B, num_classes, H, W]``."""
        x = x * 2 - 1  # [0, 1] -> [-1, 1]
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        if self.context is not None:
            ctx = self.context(x).expand_as(x)
            x = x + self.fuse(torch.cat([x, ctx], 1))
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        return self.head(x)


def count_parameters(module: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------- augmentation

def _uniform(g: torch.Generator, n: int, lo: float, hi: float) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


def augment_batch(images: torch.Tensor, label_maps: torch.Tensor, augment: dict[str, Any],
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly flip, scale, rotate, translate and colour-jitter a batch of renders.

    Geometry is one affine warp per image (``torch.nn.functional.affine_grid`` / ``grid_sample``):
    images bilinear with a white fill, label maps nearest with background (-1) fill. Colour jitter
    (brightness and per-channel gain multiply, contrast and saturation scale around the object's
    mean / grey value) and Gaussian noise apply to the object only; background stays white.

    Args:
        images: ``float32 [B, 3, H, W]`` in [0, 1], white background.
        label_maps: ``int64 [B, H, W]``, -1 background, else the part index.
        augment: the ``augment`` section of the config (see ``DEFAULT_AUGMENT``).
        generator: a CPU ``torch.Generator``; all random draws come from it (deterministic).

    Returns:
        ``(images float32 [B, 3, H, W] in [0, 1], label_maps int64 [B, H, W])`` on the input device.
    """
    b, dev = images.shape[0], images.device
    a = {**DEFAULT_AUGMENT, **augment}
    flip = torch.where(torch.rand(b, generator=generator) < a["hflip"], -1.0, 1.0)
    angle = torch.deg2rad(_uniform(generator, b, -a["rotate_deg"], a["rotate_deg"]))
    lo, hi = a["scale"]
    zoom = torch.exp(_uniform(generator, b, math.log(lo), math.log(hi)))
    shift = _uniform(generator, 2 * b, -a["translate"], a["translate"]).view(b, 2) * 2
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    # affine_grid maps output coordinates to input ones: in = A @ out + t, A = R(angle) / zoom, then
    # the x flip of the output.
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1).to(dev, images.dtype)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images - 1, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 1
    lab = F.grid_sample((label_maps + 1).to(images.dtype)[:, None], grid, mode="nearest", padding_mode="zeros",
                        align_corners=False)[:, 0].round().long() - 1

    bright = _uniform(generator, b, 1 - a["brightness"], 1 + a["brightness"]).view(b, 1, 1, 1).to(dev)
    contrast = _uniform(generator, b, 1 - a["contrast"], 1 + a["contrast"]).view(b, 1, 1, 1).to(dev)
    sat = _uniform(generator, b, 1 - a["saturation"], 1 + a["saturation"]).view(b, 1, 1, 1).to(dev)
    gain = _uniform(generator, 3 * b, 1 - a["channel_gain"], 1 + a["channel_gain"]).view(b, 3, 1, 1).to(dev)
    noise = torch.randn(out.shape, generator=generator).to(dev) * a["noise"]
    fg = (lab >= 0)[:, None].to(out.dtype)
    mean = (out * fg).sum((1, 2, 3), keepdim=True) / (3 * fg.sum((1, 2, 3), keepdim=True)).clamp_min(1)
    jit = (out - mean) * contrast + mean
    grey = jit.mean(1, keepdim=True)
    jit = (grey + (jit - grey) * sat) * bright * gain + noise
    out = torch.where(fg > 0, jit, out).clamp(0, 1)
    return out, lab


# --------------------------------------------------------------------------------------- teacher

class FewShotTeacher(nn.Module):
    """The few-shot P-VLM teacher (name ``"fewshot"``, kind ``"pixel"``): a trained :class:`PartUNet`.

    Build one with :func:`fit_fewshot` or :meth:`load`. Calling it follows
    :class:`distill.teachers.base.Teacher`: ``teacher(images, part_prompts) -> TeacherOutput`` with
    ``probs float32 [B, R, H, W]`` (softmax over the part logits; background dropped and the parts
    renormalised), computed in eval mode without gradients, in chunks of
    ``train.inference_batch_size`` images, on the network's device; the result is returned on the
    images' device. ``part_prompts`` are matched to the trained parts by position (only their number
    is checked).

    Args:
        net: the trained network (``R + 1`` classes).
        part_names: the ``R`` part names it was trained for.
        config: the complete few-shot config it was trained with (``train.image_size`` is used).
        category: the object category, or ``""``.
        shape_ids: the ids of the K labelled training shapes, if known.
        stats: training statistics (JSON-serialisable).
    """

    name = "fewshot"
    kind = "pixel"

    def __init__(self, net: PartUNet, part_names: Sequence[str], config: dict[str, Any], category: str = "",
                 shape_ids: Sequence[str] | None = None, stats: dict[str, Any] | None = None):
        super().__init__()
        if net.config["num_classes"] != len(part_names) + 1:
            raise ValueError(f"network has {net.config['num_classes']} classes, expected R + 1 = "
                             f"{len(part_names) + 1} for parts {list(part_names)}")
        self.net = net
        self.part_names = [str(p) for p in part_names]
        self.config = merge_fewshot_config(config)
        self.category = str(category)
        self.shape_ids = [str(s) for s in shape_ids] if shape_ids is not None else None
        self.stats = dict(stats or {})

    @property
    def num_parts(self) -> int:
        """R, the number of parts the teacher predicts."""
        return len(self.part_names)

    @property
    def device(self) -> torch.device:
        return self.net.head.weight.device

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be float [B, 3, H, W], got {getattr(images, 'shape', type(images))}")

    @torch.no_grad()
    def predict_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Network logits ``float32 [B, R + 1, H, W]`` (class 0 background) for ``images float32
        [B, 3, H, W]`` in [0, 1], at the images' size, on the network's device (eval mode, no grad).

        Raises:
            ValueError: ``images`` is not ``[B, 3, H, W]``.
        """
        self._check_images(images)
        was_training = self.net.training
        self.net.eval()
        size = int(self.config["train"]["image_size"])
        chunk = int(self.config["train"]["inference_batch_size"])
        out = []
        try:
            for start in range(0, images.shape[0], chunk):
                x = images[start:start + chunk].to(self.device, torch.float32)
                h, w = x.shape[-2:]
                if (h, w) != (size, size):
                    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
                logits = self.net(x)
                if (h, w) != (size, size):
                    logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
                out.append(logits.float())
        finally:
            self.net.train(was_training)
        if not out:
            return torch.zeros(0, self.num_parts + 1, *images.shape[-2:], device=self.device)
        return torch.cat(out)

    @torch.no_grad()
    def predict_probs(self, images: torch.Tensor) -> torch.Tensor:
        """Softmax over background and parts, ``float32 [B, R + 1, H, W]`` (class 0 background), on
        the network's device. Raises ValueError for bad ``images``."""
        return self.predict_logits(images).softmax(1)

    @torch.no_grad()
    def predict_labels(self, images: torch.Tensor) -> torch.Tensor:
        """Arg-max labels ``int64 [B, H, W]``: -1 background, else the part index (network's device)."""
        return self.predict_logits(images).argmax(1) - 1

    def forward(self, images: torch.Tensor, part_prompts: Sequence[str],
                label_maps: torch.Tensor | None = None) -> TeacherOutput:
        """Part probabilities for ``images float32 [B, 3, H, W]`` in [0, 1].

        Args:
            images: rendered views, white background.
            part_prompts: ``R`` part prompts, in the order of the trained parts (:attr:`part_names`).
            label_maps: ignored (the protocol passes it to every teacher).

        Returns:
            ``TeacherOutput(kind="pixel", teacher="fewshot", probs=float32 [B, R, H, W])`` on the
            images' device; ``probs`` sums to 1 over ``R`` at every pixel.

        Raises:
            ValueError: ``len(part_prompts) != R`` or ``images`` is not ``[B, 3, H, W]``.
        """
        if len(part_prompts) != self.num_parts:
            raise ValueError(f"the few-shot teacher was trained for R = {self.num_parts} parts "
                             f"{self.part_names}, got {len(part_prompts)} prompts {list(part_prompts)}")
        logits = self.predict_logits(images)
        probs = logits[:, 1:].softmax(1)
        return TeacherOutput(kind="pixel", teacher=self.name, probs=probs.to(images.device))

    # ------------------------------------------------------------------------------------ I/O
    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``model.safetensors`` and ``config.json`` into ``directory`` (created; replaced if
        it exists). Written to a temporary sibling folder, then renamed.

        Returns:
            The folder's path.
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
        old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            state = {k: v.detach().to("cpu").contiguous() for k, v in self.net.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "partdistill-fewshot-teacher"})
            meta = {"format_version": FORMAT_VERSION, "teacher": self.name, "model": self.net.config,
                    "part_names": self.part_names, "category": self.category, "shape_ids": self.shape_ids,
                    "config": self.config, "stats": self.stats}
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
            if directory.exists():
                os.replace(directory, old)
            os.replace(tmp, directory)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.rmtree(old, ignore_errors=True)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, device: str | torch.device | None = None) -> FewShotTeacher:
        """Read a teacher written by :meth:`save`.

        Args:
            directory: the folder with ``config.json`` and ``model.safetensors``.
            device: where to put the network (default CPU).

        Raises:
            FileNotFoundError: the folder or one of its files is missing (the message names it).
            ValueError: ``config.json`` or ``model.safetensors`` is corrupt or does not match
                (the message names the file).
        """
        from safetensors.torch import load_file

        directory = Path(directory)
        cfg_path, w_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for p in (cfg_path, w_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p}: missing (not a few-shot teacher folder written by FewShotTeacher.save)")
        try:
            meta = json.loads(cfg_path.read_text())
            model_cfg = dict(meta["model"])
            part_names = list(meta["part_names"])
            config = meta["config"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{cfg_path}: corrupt few-shot teacher config ({type(exc).__name__}: {exc})") from exc
        if meta.get("teacher") != cls.name:
            raise ValueError(f"{cfg_path}: written by teacher {meta.get('teacher')!r}, not {cls.name!r}")
        try:
            state = load_file(str(w_path))
        except Exception as exc:  # safetensors raises its own SafetensorError / OSError
            raise ValueError(f"{w_path}: cannot read the weights ({type(exc).__name__}: {exc})") from exc
        try:
            net = PartUNet(**model_cfg)
            net.load_state_dict(state, strict=True)
        except (TypeError, RuntimeError) as exc:
            raise ValueError(f"{w_path}: weights do not match the model in {cfg_path.name} ({exc})") from exc
        teacher = cls(net, part_names, config, category=meta.get("category", ""), shape_ids=meta.get("shape_ids"),
                      stats=meta.get("stats"))
        return teacher.to(device if device is not None else "cpu").eval()


# -------------------------------------------------------------------------------------- training

def _dice_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss, mean over the classes present in the batch (target or prediction)."""
    probs = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(probs.dtype)
    inter = (probs * onehot).sum((0, 2, 3))
    denom = probs.sum((0, 2, 3)) + onehot.sum((0, 2, 3))
    present = onehot.sum((0, 2, 3)) > 0
    dice = 1 - (2 * inter + 1) / (denom + 1)
    return dice[present].mean()


def _validate_training_data(images: torch.Tensor, label_maps: torch.Tensor, num_parts: int) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be float32 [N, 3, H, W], got {getattr(images, 'shape', type(images))}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")
    if not isinstance(label_maps, torch.Tensor) or label_maps.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"label_maps must be int64 [N, H, W] = {[images.shape[0], *images.shape[2:]]}, "
                         f"got {getattr(label_maps, 'shape', type(label_maps))}")
    if label_maps.is_floating_point() or label_maps.dtype == torch.bool:
        raise ValueError(f"label_maps must be an integer tensor, got {label_maps.dtype}")
    if images.shape[0] == 0:
        raise ValueError("no training images")
    if num_parts < 1:
        raise ValueError("part_names is empty")
    lo, hi = int(label_maps.min()), int(label_maps.max())
    if lo < -1 or hi >= num_parts:
        raise ValueError(f"label_maps values must lie in [-1, {num_parts - 1}] (R = {num_parts}), got [{lo}, {hi}]")
    if float(images.min()) < -1e-3 or float(images.max()) > 1 + 1e-3:
        raise ValueError(f"images must lie in [0, 1], got [{float(images.min()):.3f}, {float(images.max()):.3f}]")


def fit_fewshot(images: torch.Tensor, label_maps: torch.Tensor, part_names: Sequence[str],
                config: dict[str, Any] | None = None, seed: int = 0, progress: bool = True,
                device: str | torch.device | None = None, category: str = "",
                shape_ids: Sequence[str] | None = None) -> FewShotTeacher:
    """Train the few-shot teacher on the labelled renders of K shapes (PartSLIP's few-shot setting).

    Images are resized to ``train.image_size`` (bilinear, antialiased; label maps nearest). Each step
    draws ``train.batch_size`` images with replacement, augments them (:func:`augment_batch`) and
    takes an AdamW step on class-weighted cross-entropy (weights ``count_c ** -class_weight_power``
    over the training pixels, normalised to a pixel-weighted mean of 1) plus ``dice_weight`` x soft
    Dice when ``train.loss == "ce_dice"``; the learning rate warms up linearly and decays with a
    cosine to ``min_lr_ratio * lr``.

    Determinism: the initial weights, batches and augmentations are functions of ``seed`` alone
    (CPU generators; the global RNG is left untouched), so two runs on the CPU give identical
    weights. On CUDA, ``grid_sample``'s backward pass is not bitwise deterministic.

    Args:
        images: ``float32 [N, 3, H, W]`` in [0, 1], white background (e.g. K = 8 shapes x 10 views).
        label_maps: ``int64 [N, H, W]``, -1 background, else the part index in ``[0, R)``.
        part_names: the ``R`` part names.
        config: a config from :func:`load_fewshot_config` (partial dicts are filled with defaults;
            ``None`` = :func:`load_fewshot_config` ()).
        seed: random seed.
        progress: show a tqdm progress bar.
        device: where to train (default: CUDA if available, else CPU).
        category: stored with the teacher.
        shape_ids: the K labelled shapes' ids, stored with the teacher.

    Returns:
        The trained :class:`FewShotTeacher` (eval mode, on ``device``); ``stats`` holds steps,
        seconds, parameter count, pixel counts per class, the mean loss of the last 10% of steps and
        the pixel accuracy on the (un-augmented) training images (all pixels and foreground only).

    Raises:
        ValueError: bad shapes, dtypes or value ranges, or a bad config.
    """
    from tqdm.auto import tqdm

    cfg = merge_fewshot_config(config if config is not None else load_fewshot_config())
    part_names = [str(p) for p in part_names]
    num_parts = len(part_names)
    _validate_training_data(images, label_maps, num_parts)
    tc, mc = cfg["train"], cfg["model"]
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    size = int(tc["image_size"])

    x = images.detach().to(dev, torch.float32)
    y = label_maps.detach().to(dev, torch.long)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
        y = F.interpolate(y[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()

    counts = torch.bincount((y + 1).flatten(), minlength=num_parts + 1).double()
    weights = torch.where(counts > 0, counts.clamp_min(1) ** -float(tc["class_weight_power"]), torch.zeros_like(counts))
    weights = weights * counts.sum() / (weights * counts).sum()
    weights = weights.float().to(dev)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = PartUNet(num_parts + 1, widths=mc["widths"], groups=mc["groups"], global_context=mc["global_context"])
    net.to(dev).train()
    opt = torch.optim.AdamW(net.parameters(), lr=float(tc["lr"]), weight_decay=float(tc["weight_decay"]))
    steps, warmup = int(tc["steps"]), int(tc["warmup_steps"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, steps, warmup, float(tc["min_lr_ratio"])))
    g = torch.Generator().manual_seed(int(seed))
    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="fewshot teacher", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(0, x.shape[0], (int(tc["batch_size"]),), generator=g).to(dev)
        xb, yb = augment_batch(x[idx], y[idx], cfg["augment"], g)
        target = yb + 1
        logits = net(xb)
        loss = F.cross_entropy(logits, target, weight=weights)
        if tc["loss"] == "ce_dice":
            loss = loss + float(tc["dice_weight"]) * _dice_loss(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if tc["grad_clip"]:
            nn.utils.clip_grad_norm_(net.parameters(), float(tc["grad_clip"]))
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    seconds = time.perf_counter() - start

    teacher = FewShotTeacher(net, part_names, cfg, category=category, shape_ids=shape_ids).eval()
    pred = teacher.predict_labels(x)
    fg = y >= 0
    tail = losses[-max(1, steps // 10):]
    teacher.stats = {
        "steps": steps, "seconds": round(seconds, 2), "seed": int(seed), "num_images": int(x.shape[0]),
        "device": str(dev), "parameters": count_parameters(net),
        "pixel_counts": {"background": int(counts[0]), **{p: int(c) for p, c in zip(part_names, counts[1:].tolist())}},
        "final_loss": float(sum(tail) / len(tail)),
        "train_accuracy": float((pred == y).float().mean()),
        "train_foreground_accuracy": float((pred[fg] == y[fg]).float().mean()) if bool(fg.any()) else float("nan"),
    }
    return teacher
