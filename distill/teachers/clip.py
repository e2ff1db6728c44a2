"""The CLIP teacher (P-VLM): dense MaskCLIP features of an open_clip ViT, zero-shot per pixel.

PartDistill (Umam et al., CVPR 2024) uses PointCLIP v2's CLIP as its pixel-level teacher. Here the
dense features follow MaskCLIP (Zhou, Loy and Dai, "Extract Free Dense Labels from CLIP", ECCV 2022):
the ViT runs as usual up to its last residual block; in that block the query-key attention is dropped
and every token keeps only its own *value* embedding, passed through the attention's output
projection (no residual, no MLP); then CLIP's ``ln_post`` and ``proj`` map each patch token into the
joint image-text space. Cosine similarity with the part text embeddings (averaged over
:mod:`~distill.teachers.prompts` templates), scaled by CLIP's ``logit_scale`` (or a given
temperature), upsampled bilinearly to the image size and soft-maxed over the parts gives
``probs float32 [B, R, H, W]``.

Weights come from open_clip (``open_clip_torch``): a pretrained tag (``"openai"``, downloaded by
open_clip into the Hugging Face cache) or a local checkpoint file. Only open_clip's own
``VisionTransformer`` with standard ``ResidualAttentionBlock`` blocks is supported (ViT-B/16,
ViT-L/14, ...), not timm or ResNet towers.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms.functional import normalize

from distill.teachers.base import (
    RandomWeightsWarning,
    TeacherOutput,
    TeacherWeightsError,
)
from distill.teachers.prompts import expand_prompts

log = logging.getLogger(__name__)

# A CLIP small enough for unit tests on a CPU: 64x64 images, 16x16 patches (a 4x4 grid).
TINY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 64, "layers": 2, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}

# open_clip's default normalisation (OpenAI CLIP's training statistics).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

_CHECKPOINT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin", "model.safetensors",
                     "pytorch_model.bin", "open_clip_pytorch_model.pth", "model.pth")
_CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@cache
def open_clip_bpe_tokenizer(context_length: int = 77):
    """open_clip's ``SimpleTokenizer`` (OpenAI CLIP's byte-pair encoding, shipped inside
    ``open_clip_torch`` as ``bpe_simple_vocab_16e6.txt.gz``; works offline), cached per context
    length: ``tokenizer(list[str]) -> int64 [N, context_length]`` (start 49406, end 49407, pad 0)."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer(context_length=context_length)


def default_device() -> torch.device:
    """``cuda`` when available, else ``cpu``."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_images(images: torch.Tensor) -> None:
    """Validate teacher input ``images float [B, 3, H, W]``.

    Raises:
        ValueError: wrong rank, channel count, dtype, or an empty batch.
    """
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor [B, 3, H, W], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [0, 1], got {images.dtype}")
    if images.shape[0] == 0:
        raise ValueError("images is an empty batch")


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize ``images [B, 3, H, W]`` to ``size = (h, w)`` bilinearly (anti-aliased when shrinking)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrink = images.shape[-2] > size[0] or images.shape[-1] > size[1]
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def require_random_flag(cls_name: str, allow_random: bool) -> None:
    """Refuse random weights unless asked for explicitly, and warn loudly when they are.

    Raises:
        ValueError: ``allow_random`` is False.
    Warns:
        RandomWeightsWarning: when ``allow_random`` is True.
    """
    if not allow_random:
        raise ValueError(
            f"{cls_name}.random_init builds a model with RANDOM weights whose part predictions are "
            f"meaningless; pass allow_random=True if that is really what you want (tests, smoke runs), "
            f"or use {cls_name}.from_pretrained(...) for real predictions")
    warnings.warn(f"{cls_name} with RANDOM weights: its part predictions are meaningless "
                  f"(use only for tests and smoke runs)", RandomWeightsWarning, stacklevel=3)


def _find_checkpoint(path: Path) -> Path:
    """A checkpoint file given as itself or as a folder holding one."""
    if path.is_file():
        return path
    for name in _CHECKPOINT_NAMES:
        if (path / name).is_file():
            return path / name
    found = sorted(p for p in path.iterdir() if p.suffix in _CHECKPOINT_SUFFIXES and p.is_file())
    if not found:
        raise FileNotFoundError(f"no CLIP checkpoint (*{', *'.join(_CHECKPOINT_SUFFIXES)}) in folder {path}")
    return found[0]


def maskclip_value(block: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """MaskCLIP's replacement of a transformer block's output: each token's value embedding.

    Args:
        block: an open_clip ``ResidualAttentionBlock`` (``ln_1``, ``attn: nn.MultiheadAttention``,
            ``ls_1``).
        x: ``[B, L, width]`` tokens entering the block (batch first).

    Returns:
        ``[B, L, width]``: ``ls_1(out_proj(v_proj(ln_1(x))))`` per token: the attention branch with
        the attention matrix replaced by the identity (Zhou et al. ECCV 2022), no residual and no MLP.
    """
    attn = block.attn
    dim = attn.embed_dim
    h = block.ln_1(x)
    if attn._qkv_same_embed_dim:
        weight = attn.in_proj_weight[2 * dim:]
    else:
        weight = attn.v_proj_weight
    bias = attn.in_proj_bias[2 * dim:] if attn.in_proj_bias is not None else None
    v = F.linear(h, weight, bias)
    return block.ls_1(attn.out_proj(v))


class ClipTeacher:
    """Zero-shot per-pixel part probabilities from an open_clip ViT (MaskCLIP dense features).

    Follows MaskCLIP (Zhou et al., ECCV 2022) as used by PointCLIP v2 / PartDistill (Umam et al.,
    CVPR 2024, P-VLM teacher). Call it like any :class:`~distill.teachers.base.Teacher`.

    Args:
        model: an open_clip ``CLIP`` whose ``visual`` is an open_clip ``VisionTransformer`` made of
            ``ResidualAttentionBlock`` blocks; put in eval mode, its parameters frozen.
        tokenizer: open_clip tokenizer: ``tokenizer(list[str]) -> int64 [N, context_length]``.
        category: default object category for the templates (overridable per call), or ``None``.
        templates: prompt templates (default :data:`~distill.teachers.prompts.PART_TEMPLATES`).
        temperature: scale of the cosine similarities before the softmax; ``None`` uses the
            model's ``logit_scale.exp()`` (100 for OpenAI CLIP).
        input_size: ``(h, w)`` (or an int) the images are resized to; ``None`` uses the model's
            own size. Another size interpolates the positional embeddings (bicubic), giving a finer
            patch grid (MaskCLIP's practice for dense prediction).
        mean, std: normalisation; ``None`` uses the model's preprocessing config (OpenAI's
            statistics when it has none).
        batch_size: images per forward pass.

    Raises:
        NotImplementedError: the vision tower is not a supported open_clip ViT.
    """

    name = "clip"
    kind = "pixel"

    def __init__(self, model: torch.nn.Module, tokenizer, *, category: str | None = None,
                 templates: Sequence[str] | None = None, temperature: float | None = None,
                 input_size: int | tuple[int, int] | None = None,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 batch_size: int = 16):
        from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

        visual = getattr(model, "visual", None)
        if not isinstance(visual, VisionTransformer):
            raise NotImplementedError(
                f"ClipTeacher needs an open_clip VisionTransformer image tower, got {type(visual).__name__}")
        if visual.attn_pool is not None or visual.proj is None:
            raise NotImplementedError("ClipTeacher does not support attention-pooled or projection-free ViTs")
        blocks = visual.transformer.resblocks
        if not all(isinstance(b, ResidualAttentionBlock) for b in blocks):
            raise NotImplementedError("ClipTeacher supports only open_clip's standard ResidualAttentionBlock "
                                      "(no custom attention blocks)")
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.category = category
        self.templates = tuple(templates) if templates is not None else None
        self.temperature = temperature
        native = tuple(int(s) for s in (visual.image_size if isinstance(visual.image_size, (tuple, list))
                                        else (visual.image_size, visual.image_size)))
        self.native_size: tuple[int, int] = native
        if input_size is None:
            input_size = native
        elif isinstance(input_size, int):
            input_size = (input_size, input_size)
        self.input_size: tuple[int, int] = (int(input_size[0]), int(input_size[1]))
        patch = visual.patch_size
        if self.input_size[0] % patch[0] or self.input_size[1] % patch[1]:
            raise ValueError(f"input_size {self.input_size} must be a multiple of the patch size {tuple(patch)}")
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        self.mean = tuple(mean if mean is not None else cfg.get("mean", OPENAI_MEAN))
        self.std = tuple(std if std is not None else cfg.get("std", OPENAI_STD))
        self.batch_size = int(batch_size)
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, model_name: str = "ViT-B-16", pretrained: str | os.PathLike = "openai", *,
                        device: str | torch.device | None = None, precision: str = "fp32",
                        quick_gelu: bool | None = None, cache_dir: str | None = None,
                        **teacher_kwargs) -> ClipTeacher:
        """Build the teacher from pretrained open_clip weights.

        Args:
            model_name: an open_clip model name (``open_clip.list_models()``), e.g. ``"ViT-B-16"``.
            pretrained: a pretrained tag of that model (``open_clip.list_pretrained_tags_by_model``;
                open_clip downloads it into the Hugging Face cache, ``HF_HOME``), or the path of a
                local checkpoint file (``.safetensors``, ``.bin``, ``.pt``, ``.pth``: an open_clip /
                OpenAI state dict) or of a folder holding one.
            device: where the model lives (default: CUDA when available, else CPU).
            precision: open_clip precision (``"fp32"``, ``"fp16"``, ``"bf16"``).
            quick_gelu: use QuickGELU (what OpenAI's weights were trained with). ``None``: taken
                from the tag's config; for a local file, True when ``"openai"`` is in its path.
            cache_dir: download cache (default: the Hugging Face cache).
            **teacher_kwargs: passed to :class:`ClipTeacher` (``category``, ``temperature``, ...).

        Raises:
            ValueError: unknown model name.
            FileNotFoundError: ``pretrained`` is neither a known tag nor an existing path (the
                message names the path and lists the tags).
            TeacherWeightsError: a tag's weights could not be downloaded (e.g. offline); the
                message says how to provide them.
        """
        import open_clip

        if model_name not in open_clip.list_models():
            raise ValueError(f"unknown open_clip model {model_name!r}; known: {', '.join(open_clip.list_models())}")
        device = torch.device(device) if device is not None else default_device()
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if isinstance(pretrained, str) and pretrained in tags:
            tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
            qg = bool(tag_cfg.get("quick_gelu", False)) if quick_gelu is None else quick_gelu
            try:
                model = open_clip.create_model(model_name, pretrained=pretrained, device=device,
                                               precision=precision, force_quick_gelu=qg, cache_dir=cache_dir)
            except Exception as err:  # network, cache and hub errors all mean: no weights here
                hub = tag_cfg.get("hf_hub", "").rstrip("/")
                where = f"Hugging Face repo {hub!r}" if hub else f"URL {tag_cfg.get('url', '?')}"
                raise TeacherWeightsError(
                    f"could not obtain the weights of open_clip {model_name!r} / {pretrained!r} "
                    f"(download from the {where} failed: {err}). This machine may have no network. "
                    f"Either (1) run once where a network exists so open_clip fills the Hugging Face cache "
                    f"(~/.cache/huggingface/hub or $HF_HOME), copy that cache here and set HF_HUB_OFFLINE=1; "
                    f"or (2) download the checkpoint file (e.g. open_clip_model.safetensors or "
                    f"open_clip_pytorch_model.bin from {where}) and pass its path: "
                    f"ClipTeacher.from_pretrained({model_name!r}, pretrained='/path/to/checkpoint', "
                    f"quick_gelu={qg})") from err
        else:
            path = Path(pretrained).expanduser()
            if not path.exists():
                raise FileNotFoundError(
                    f"CLIP checkpoint not found: {path} (pretrained must be a local .safetensors/.bin/.pt/.pth "
                    f"file or folder, or one of the tags of {model_name!r}: {', '.join(tags) or 'none'})")
            ckpt = _find_checkpoint(path)
            qg = ("openai" in str(ckpt).lower()) if quick_gelu is None else quick_gelu
            log.info("loading open_clip %s from %s (quick_gelu=%s)", model_name, ckpt, qg)
            model = open_clip.create_model(model_name, pretrained=str(ckpt), device=device,
                                           precision=precision, force_quick_gelu=qg)
        try:
            tokenizer = open_clip.get_tokenizer(model_name)
        except Exception as err:
            raise TeacherWeightsError(f"could not build the tokenizer of open_clip {model_name!r}: {err}") from err
        return cls(model, tokenizer, **teacher_kwargs)

    @classmethod
    def random_init(cls, config: str | Mapping[str, Any] = "tiny", *, allow_random: bool = False,
                    device: str | torch.device | None = None, seed: int = 0,
                    **teacher_kwargs) -> ClipTeacher:
        """Build the teacher with RANDOM weights (tests and smoke runs only).

        Args:
            config: ``"tiny"`` (:data:`TINY_CLIP_CONFIG`, 64x64 images), an open_clip model name, or
                an open_clip ``CLIP`` config dict (``embed_dim``, ``vision_cfg``, ``text_cfg``).
            allow_random: must be True.
            device: default CPU.
            seed: the weights are a function of the seed (the global RNG is left untouched).

        Raises:
            ValueError: ``allow_random`` is False, or an unknown model name.
        Warns:
            RandomWeightsWarning: always (the predictions are meaningless).
        """
        require_random_flag(cls.__name__, allow_random)
        import open_clip

        device = torch.device(device) if device is not None else torch.device("cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if isinstance(config, str) and config != "tiny":
                if config not in open_clip.list_models():
                    raise ValueError(f"unknown open_clip model {config!r}")
                model = open_clip.create_model(config, pretrained=None)
                tokenizer = open_clip.get_tokenizer(config)
            else:
                cfg = dict(TINY_CLIP_CONFIG if config == "tiny" else config)
                model = open_clip.model.CLIP(**cfg)
                context = dict(cfg.get("text_cfg", {})).get("context_length", 77)
                tokenizer = open_clip_bpe_tokenizer(int(context))
        return cls(model.to(device), tokenizer, **teacher_kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        """The device holding the model."""
        return self.model.visual.conv1.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the image tower's weights."""
        return self.model.visual.conv1.weight.dtype

    def to(self, device: str | torch.device) -> ClipTeacher:
        """Move the model to ``device`` (cached text embeddings are dropped); returns ``self``."""
        self.model.to(device)
        self._text_cache.clear()
        return self

    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid ``(gh, gw)`` at :attr:`input_size`."""
        p = self.model.visual.patch_size
        return self.input_size[0] // p[0], self.input_size[1] // p[1]

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def text_embeddings(self, part_prompts: Sequence[str], category: str | None = None) -> torch.Tensor:
        """Unit-norm text embeddings of the parts, averaged over the templates.

        Args:
            part_prompts: ``R`` part phrases.
            category: object category for the templates (default :attr:`category`).

        Returns:
            ``float32 [R, D]`` on the model's device, each row of norm 1 (mean of the unit-norm
            embeddings of the ``T`` templated sentences, re-normalised; Radford et al. 2021).
        """
        category = self.category if category is None else category
        sentences = expand_prompts(part_prompts, category, self.templates)
        flat = tuple(s for group in sentences for s in group)
        cached = self._text_cache.get(flat)
        if cached is not None:
            return cached
        tokens = self.tokenizer(list(flat)).to(self.device)
        emb = self.model.encode_text(tokens, normalize=True).float()
        emb = emb.reshape(len(sentences), len(sentences[0]), -1).mean(dim=1)
        emb = F.normalize(emb, dim=-1)
        self._text_cache[flat] = emb
        return emb

    # ------------------------------------------------------------------ image
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``images float [B, 3, H, W]`` in [0, 1] -> model input ``[B, 3, h, w]`` at
        :attr:`input_size`, normalised with :attr:`mean` / :attr:`std`, in the model's dtype/device."""
        x = resize_images(images.to(self.device, torch.float32), self.input_size)
        return normalize(x, self.mean, self.std).to(self.dtype)

    def _positional_embedding(self, grid: tuple[int, int]) -> torch.Tensor:
        """``[1 + gh*gw, width]`` positional embedding, bicubically resized from the native grid."""
        visual = self.model.visual
        pos = visual.positional_embedding
        native = tuple(visual.grid_size)
        if tuple(grid) == native:
            return pos
        cls_pos, patch_pos = pos[:1], pos[1:]
        patch_pos = patch_pos.reshape(1, native[0], native[1], -1).permute(0, 3, 1, 2).float()
        patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1).to(pos.dtype)
        return torch.cat([cls_pos, patch_pos], dim=0)

    @torch.no_grad()
    def dense_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """MaskCLIP dense features of preprocessed images.

        Args:
            pixels: ``[B, 3, h, w]`` from :meth:`preprocess` (h, w multiples of the patch size).

        Returns:
            ``float32 [B, D, gh, gw]``: per patch, ``proj(ln_post(maskclip_value(last_block, x)))``
            where ``x`` are the tokens entering the last block (not normalised).
        """
        visual = self.model.visual
        x = visual.conv1(pixels.to(self.dtype))  # [B, width, gh, gw]
        batch, _, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2)
        cls_tok = visual.class_embedding.to(x.dtype).view(1, 1, -1).expand(batch, -1, -1)
        x = torch.cat([cls_tok, x], dim=1) + self._positional_embedding((gh, gw)).to(x.dtype)
        x = visual.ln_pre(x)
        blocks = visual.transformer.resblocks
        batch_first = getattr(visual.transformer, "batch_first", True)
        if not batch_first:
            x = x.transpose(0, 1)
        for block in blocks[:-1]:
            x = block(x)
        if not batch_first:
            x = x.transpose(0, 1)
        v = maskclip_value(blocks[-1], x)  # per token, so the layout does not matter
        v = visual.ln_post(v[:, 1:]) @ visual.proj  # [B, gh*gw, D]
        return v.float().transpose(1, 2).reshape(batch, -1, gh, gw)

    @torch.no_grad()
    def patch_logits(self, images: torch.Tensor, part_prompts: Sequence[str],
                     category: str | None = None) -> torch.Tensor:
        """Scaled cosine similarities per patch: ``float32 [B, R, gh, gw]`` for ``images float
        [B, 3, H, W]`` in [0, 1] (on the model's device)."""
        text = self.text_embeddings(part_prompts, category)
        feats = F.normalize(self.dense_features(self.preprocess(images)), dim=1)
        scale = (float(self.model.logit_scale.exp().float().reshape(-1)[0])
                 if self.temperature is None else float(self.temperature))
        return scale * torch.einsum("bdhw,rd->brhw", feats, text)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, part_prompts: Sequence[str],
                 label_maps: torch.Tensor | None = None, *, category: str | None = None) -> TeacherOutput:
        """Per-pixel part probabilities.

        Args:
            images: ``float [B, 3, H, W]`` in [0, 1], any device.
            part_prompts: ``R >= 1`` part phrases (e.g. ``gen3d.parts.part_prompts(category)``).
            label_maps: ignored (only the simulated teacher reads ground truth).
            category: object category for the prompt templates (default :attr:`category`).

        Returns:
            ``TeacherOutput(kind="pixel", teacher="clip", probs=float32 [B, R, H, W])`` on the
            images' device; ``probs`` sums to 1 over R at every pixel (the softmax of the patch
            logits after bilinear upsampling to ``(H, W)``).

        Raises:
            ValueError: bad images or no prompts.
        """
        check_images(images)
        if len(part_prompts) == 0:
            raise ValueError("ClipTeacher needs at least one part prompt")
        height, width = images.shape[-2:]
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            logits = self.patch_logits(images[start:start + self.batch_size], part_prompts, category)
            logits = F.interpolate(logits, size=(height, width), mode="bilinear", align_corners=False)
            out.append(logits.softmax(dim=1).to(images.device))
        return TeacherOutput(kind=self.kind, teacher=self.name, probs=torch.cat(out, dim=0).float())

    def __repr__(self) -> str:
        return (f"ClipTeacher(input_size={self.input_size}, grid={self.grid_size}, "
                f"category={self.category!r}, device={self.device})")
