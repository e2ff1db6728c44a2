"""The detector teacher (B-VLM): open-vocabulary boxes with per-part scores from OWLv2.

PartDistill (Umam et al., CVPR 2024) uses GLIP as its box-level teacher; here the grounding detector
is OWLv2 (Minderer, Gritsenko and Houlsby, "Scaling Open-Vocabulary Object Detection", NeurIPS 2023)
from ``transformers`` (``Owlv2ForObjectDetection``). OWLv2 predicts one box per image patch and, per
text query, a logit for that box; the part queries are the part phrases wrapped in the
:mod:`~distill.teachers.prompts` templates, their text embeddings averaged over the templates
(prompt ensembling, as in OWL-ViT). Per image the teacher keeps the boxes whose best part score
(sigmoid of the logit) reaches ``threshold``, removes duplicates by per-part NMS (the best
part of a box is its class, as GLIP's NMS does) and caps the count at ``top_k``.

Preprocessing follows OWLv2: the image is padded to a square at the bottom and right
(``pad_value``, gray 0.5 as in the official OWLv2 code; transformers 5 pads with 0), resized to
the model's input size (bilinear, anti-aliased; the HF processor blurs then resizes) and normalised
with CLIP's statistics; predicted boxes are relative to the padded square and are mapped back to
the input image's pixels (and clipped to it).

Tokenizer: OWLv2 uses OpenAI CLIP's byte-pair encoding with a 16-token context. Pretrained folders
carry their own tokenizer files; without them (random init, or a folder saved without the
processor) :func:`clip_tokenizer_from_open_clip` builds the same ``CLIPTokenizer`` offline from
open_clip's bundled vocabulary (``bpe_simple_vocab_16e6.txt.gz``), renaming open_clip's special
tokens ``<start_of_text>`` / ``<end_of_text>`` to CLIP's ``<|startoftext|>`` / ``<|endoftext|>``
(same ids, 49406 / 49407) and padding with ``!`` (id 0) like OWLv2's tokenizer.
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

from distill.teachers.base import TeacherOutput, TeacherWeightsError
from distill.teachers.clip import (
    OPENAI_MEAN,
    OPENAI_STD,
    check_images,
    default_device,
    open_clip_bpe_tokenizer,
    require_random_flag,
    resize_images,
)
from distill.teachers.prompts import expand_prompts

log = logging.getLogger(__name__)

DEFAULT_OWLV2 = "google/owlv2-base-patch16-ensemble"

# An OWLv2 small enough for unit tests on a CPU: 64x64 inputs, 16x16 patches (16 boxes per image).
# The text vocabulary stays CLIP's (49408) so that the real tokenizer applies.
TINY_OWLV2_CONFIG: dict[str, Any] = {
    "text_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 2, "max_position_embeddings": 16},
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                      "num_attention_heads": 2, "image_size": 64, "patch_size": 16},
    "projection_dim": 32,
}


@cache
def clip_tokenizer_from_open_clip(model_max_length: int = 16):
    """A ``transformers.CLIPTokenizer`` built offline from open_clip's bundled CLIP BPE vocabulary.

    Args:
        model_max_length: context length (OWLv2: 16).

    Returns:
        A ``CLIPTokenizer`` with OpenAI CLIP's 49408-token vocabulary and merges, ``bos`` 49406,
        ``eos`` 49407 and ``pad`` ``"!"`` (id 0), as OWLv2's own tokenizer; for ordinary text it
        gives the same ids as ``open_clip.tokenizer.SimpleTokenizer``.
    """
    from transformers import CLIPTokenizer

    simple = open_clip_bpe_tokenizer()
    vocab = dict(simple.encoder)
    vocab["<|startoftext|>"] = vocab.pop("<start_of_text>")
    vocab["<|endoftext|>"] = vocab.pop("<end_of_text>")
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=model_max_length)


def boxes_to_pixels(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """OWLv2 boxes to pixel corners of the unpadded image.

    Args:
        boxes: ``[..., 4]`` ``(cx, cy, w, h)`` relative to the square the image was padded to
            (bottom/right padding, side ``max(height, width)``).
        height, width: the input image's size in pixels.

    Returns:
        ``float32 [..., 4]`` ``(x0, y0, x1, y1)`` in pixels, clipped to ``[0, width] x [0, height]``
        (so ``x0 <= x1`` and ``y0 <= y1``).
    """
    side = float(max(height, width))
    cx, cy, w, h = boxes.float().unbind(-1)
    x0 = ((cx - 0.5 * w) * side).clamp(0.0, float(width))
    x1 = ((cx + 0.5 * w) * side).clamp(0.0, float(width))
    y0 = ((cy - 0.5 * h) * side).clamp(0.0, float(height))
    y1 = ((cy + 0.5 * h) * side).clamp(0.0, float(height))
    return torch.stack([torch.minimum(x0, x1), torch.minimum(y0, y1),
                        torch.maximum(x0, x1), torch.maximum(y0, y1)], dim=-1)


def select_boxes(boxes: torch.Tensor, scores: torch.Tensor, threshold: float,
                 top_k: int | None, nms_iou: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep confident, non-duplicate boxes of one image.

    Args:
        boxes: ``float32 [P, 4]`` pixel corners. scores: ``float32 [P, R]`` in [0, 1].
        threshold: keep boxes whose best part score is ``>=`` this.
        top_k: at most this many boxes (the best first); ``None``: no cap.
        nms_iou: per-part NMS (a box's part is its best-scoring one) at this IoU; ``None``: off.

    Returns:
        ``(boxes [K, 4], scores [K, R])``, sorted by best score, descending; boxes of zero area
        are dropped.
    """
    best, label = scores.max(dim=1)
    area_ok = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    idx = torch.nonzero((best >= threshold) & area_ok).flatten()
    if nms_iou is not None and idx.numel() > 0:
        from torchvision.ops import batched_nms

        idx = idx[batched_nms(boxes[idx], best[idx], label[idx], float(nms_iou))]
    else:
        idx = idx[torch.argsort(best[idx], descending=True, stable=True)]
    if top_k is not None:
        idx = idx[:top_k]
    return boxes[idx], scores[idx]


class DetectorTeacher:
    """Open-vocabulary part boxes from OWLv2 (the B-VLM teacher of PartDistill, Umam et al. 2024).

    Args:
        model: a ``transformers.Owlv2ForObjectDetection`` (put in eval mode, frozen).
        tokenizer: a CLIP tokenizer (``transformers`` API) for the text queries.
        category: default object category for the templates (overridable per call), or ``None``.
        templates: prompt templates (default :data:`~distill.teachers.prompts.PART_TEMPLATES`).
        threshold: keep a box when its best part score (sigmoid) is ``>=`` this (default 0.1).
        top_k: at most this many boxes per image (default 100; ``None``: no cap).
        nms_iou: per-part NMS IoU (default 0.5; ``None``: no NMS).
        pad_value: value of the square padding in [0, 1] (default gray 0.5).
        mean, std: normalisation (default: CLIP's statistics, as OWLv2's image processor).
        batch_size: images per forward pass.
    """

    name = "detector"
    kind = "box"

    def __init__(self, model: torch.nn.Module, tokenizer, *, category: str | None = None,
                 templates: Sequence[str] | None = None, threshold: float = 0.1,
                 top_k: int | None = 100, nms_iou: float | None = 0.5, pad_value: float = 0.5,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 batch_size: int = 8):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.category = category
        self.templates = tuple(templates) if templates is not None else None
        self.threshold = float(threshold)
        self.top_k = None if top_k is None else int(top_k)
        self.nms_iou = None if nms_iou is None else float(nms_iou)
        self.pad_value = float(pad_value)
        self.mean = tuple(mean) if mean is not None else OPENAI_MEAN
        self.std = tuple(std) if std is not None else OPENAI_STD
        self.batch_size = int(batch_size)
        vcfg = model.config.vision_config
        size = vcfg.image_size
        self.input_size: tuple[int, int] = (tuple(size) if isinstance(size, (tuple, list)) else (size, size))
        self.max_text_length = int(model.config.text_config.max_position_embeddings)
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike = DEFAULT_OWLV2, *,
                        device: str | torch.device | None = None, local_files_only: bool = False,
                        cache_dir: str | None = None, dtype: torch.dtype | None = None,
                        **teacher_kwargs) -> DetectorTeacher:
        """Build the teacher from pretrained OWLv2 weights.

        Args:
            name_or_path: a Hugging Face repo id (default ``google/owlv2-base-patch16-ensemble``,
                downloaded into the Hugging Face cache) or a local folder written by
                ``Owlv2ForObjectDetection.save_pretrained`` (plus, ideally,
                ``Owlv2Processor.save_pretrained`` for the tokenizer and image statistics).
            device: where the model lives (default: CUDA when available, else CPU).
            local_files_only: never touch the network (use the cache only; fails fast offline).
            cache_dir: download cache (default: the Hugging Face cache).
            dtype: model dtype (default float32).
            **teacher_kwargs: passed to :class:`DetectorTeacher` (``threshold``, ...).

        Raises:
            FileNotFoundError: a local path that does not exist, or a folder without
                ``config.json`` (the message names the path).
            TeacherWeightsError: the weights could not be loaded from the hub or the cache (e.g.
                offline); the message says how to provide them.
        """
        from transformers import AutoTokenizer, Owlv2ForObjectDetection

        device = torch.device(device) if device is not None else default_device()
        text = str(name_or_path)
        path = Path(text).expanduser()
        looks_local = (isinstance(name_or_path, os.PathLike) or path.is_absolute() or text.startswith((".", "~"))
                       or text.count("/") != 1)
        if path.exists() or looks_local:
            if not path.exists():
                raise FileNotFoundError(f"OWLv2 weights folder not found: {path} (expected a folder written by "
                                        f"Owlv2ForObjectDetection.save_pretrained, or a Hugging Face repo id "
                                        f"such as {DEFAULT_OWLV2!r})")
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"{path / 'config.json'} not found: {path} is not a folder written by "
                                        f"Owlv2ForObjectDetection.save_pretrained")
            source, offline = str(path), True
        else:
            source, offline = text, local_files_only
        load_kw: dict[str, Any] = {"local_files_only": offline, "cache_dir": cache_dir}
        if dtype is not None:
            load_kw["dtype"] = dtype
        try:
            model = Owlv2ForObjectDetection.from_pretrained(source, **load_kw)
        except Exception as err:  # OSError offline, HTTP errors, missing files in the cache
            raise TeacherWeightsError(
                f"could not load OWLv2 weights {source!r}: {str(err).rstrip('.')}. This machine may have no network. "
                f"On a machine with network run:\n"
                f"  from transformers import Owlv2ForObjectDetection, Owlv2Processor\n"
                f"  Owlv2ForObjectDetection.from_pretrained({text!r}).save_pretrained('owlv2')\n"
                f"  Owlv2Processor.from_pretrained({text!r}).save_pretrained('owlv2')\n"
                f"copy the folder here and call DetectorTeacher.from_pretrained('/path/to/owlv2'); "
                f"or copy a filled Hugging Face cache (~/.cache/huggingface/hub or $HF_HOME) and pass "
                f"local_files_only=True") from err
        vocab_size = int(model.config.text_config.vocab_size)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=offline, cache_dir=cache_dir)
            # transformers 5 builds an (almost) empty CLIPTokenizer when the vocabulary files are
            # missing instead of failing: check the vocabulary really is there
            if len(tokenizer) != vocab_size:
                raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the model {vocab_size}")
        except Exception as err:
            log.warning("no usable tokenizer with %s (%s); using CLIP's BPE vocabulary bundled with open_clip",
                        source, err)
            tokenizer = clip_tokenizer_from_open_clip(int(model.config.text_config.max_position_embeddings))
            if len(tokenizer) != vocab_size:
                raise TeacherWeightsError(
                    f"{source!r} has no tokenizer files and its text vocabulary ({vocab_size} tokens) is not "
                    f"CLIP's ({len(tokenizer)}): save the model's tokenizer into the folder "
                    f"(Owlv2Processor.save_pretrained)") from err
        if "mean" not in teacher_kwargs or "std" not in teacher_kwargs:
            try:
                from transformers import AutoImageProcessor

                processor = AutoImageProcessor.from_pretrained(source, local_files_only=offline, cache_dir=cache_dir)
                teacher_kwargs.setdefault("mean", tuple(processor.image_mean))
                teacher_kwargs.setdefault("std", tuple(processor.image_std))
            except (OSError, ValueError, KeyError) as err:  # no preprocessor_config.json: CLIP's statistics
                log.info("no image processor config with %s (%s); using CLIP's mean/std", source, err)
        return cls(model.to(device), tokenizer, **teacher_kwargs)

    @classmethod
    def random_init(cls, config: Mapping[str, Any] | Any = "tiny", *, allow_random: bool = False,
                    device: str | torch.device | None = None, seed: int = 0,
                    **teacher_kwargs) -> DetectorTeacher:
        """Build the teacher with RANDOM weights (tests and smoke runs only).

        Args:
            config: ``"tiny"`` (:data:`TINY_OWLV2_CONFIG`, 64x64 inputs), a ``transformers.Owlv2Config``
                or the keyword dict of one. The text vocabulary must be CLIP's (49408 tokens).
            allow_random: must be True.
            device: default CPU.
            seed: the weights are a function of the seed (the global RNG is left untouched).

        Raises:
            ValueError: ``allow_random`` is False.
        Warns:
            RandomWeightsWarning: always (the predictions are meaningless).
        """
        require_random_flag(cls.__name__, allow_random)
        from transformers import Owlv2Config, Owlv2ForObjectDetection

        if isinstance(config, str):
            if config != "tiny":
                raise ValueError(f"config must be 'tiny', an Owlv2Config or a dict, got {config!r}")
            config = TINY_OWLV2_CONFIG
        if isinstance(config, Mapping):
            config = Owlv2Config(**{k: (dict(v) if isinstance(v, Mapping) else v) for k, v in config.items()})
        device = torch.device(device) if device is not None else torch.device("cpu")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Owlv2ForObjectDetection(config)
        tokenizer = clip_tokenizer_from_open_clip(int(config.text_config.max_position_embeddings))
        return cls(model.to(device), tokenizer, **teacher_kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        """The device holding the model."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's weights."""
        return next(self.model.parameters()).dtype

    def to(self, device: str | torch.device) -> DetectorTeacher:
        """Move the model to ``device`` (cached text embeddings are dropped); returns ``self``."""
        self.model.to(device)
        self._text_cache.clear()
        return self

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def text_embeddings(self, part_prompts: Sequence[str], category: str | None = None) -> torch.Tensor:
        """Unit-norm OWLv2 query embeddings of the parts, averaged over the templates.

        Returns:
            ``float32 [R, P]`` on the model's device (``P`` = the projection size).

        Warns:
            UserWarning: a templated prompt is longer than the text context (16 tokens) and was cut.
        """
        category = self.category if category is None else category
        sentences = expand_prompts(part_prompts, category, self.templates)
        flat = tuple(s for group in sentences for s in group)
        cached = self._text_cache.get(flat)
        if cached is not None:
            return cached
        full = self.tokenizer(list(flat))["input_ids"]
        too_long = [s for s, ids in zip(flat, full) if len(ids) > self.max_text_length]
        if too_long:
            warnings.warn(f"prompts longer than OWLv2's {self.max_text_length} tokens were cut: {too_long}",
                          stacklevel=3)
        enc = self.tokenizer(list(flat), padding="max_length", truncation=True,
                             max_length=self.max_text_length, return_tensors="pt")
        out = self.model.owlv2.get_text_features(input_ids=enc["input_ids"].to(self.device),
                                                 attention_mask=enc["attention_mask"].to(self.device))
        emb = F.normalize(out.pooler_output.float(), dim=-1)
        emb = F.normalize(emb.reshape(len(sentences), len(sentences[0]), -1).mean(dim=1), dim=-1)
        self._text_cache[flat] = emb
        return emb

    # ------------------------------------------------------------------ image
    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``images float [B, 3, H, W]`` in [0, 1] -> ``[B, 3, S, S]`` OWLv2 input: padded to a square
        at the bottom/right with :attr:`pad_value`, resized to :attr:`input_size`, normalised."""
        x = images.to(self.device, torch.float32)
        height, width = x.shape[-2:]
        side = max(height, width)
        if height != width:
            x = F.pad(x, (0, side - width, 0, side - height), value=self.pad_value)
        x = resize_images(x, self.input_size)
        return normalize(x, self.mean, self.std).to(self.dtype)

    @torch.no_grad()
    def raw_predictions(self, images: torch.Tensor, part_prompts: Sequence[str],
                        category: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """All of OWLv2's boxes, before selection.

        Args:
            images: ``float [B, 3, H, W]`` in [0, 1].

        Returns:
            ``boxes float32 [B, P, 4]`` pixel corners in the input image (one box per patch) and
            ``scores float32 [B, P, R]`` sigmoid part scores, on the model's device.
        """
        height, width = images.shape[-2:]
        queries = self.text_embeddings(part_prompts, category)
        feature_map, _ = self.model.image_embedder(pixel_values=self.preprocess(images))
        batch = feature_map.shape[0]
        feats = feature_map.reshape(batch, -1, feature_map.shape[-1])
        query = queries.to(feats.dtype).unsqueeze(0).expand(batch, -1, -1)
        logits, _ = self.model.class_predictor(feats, query, None)
        boxes = self.model.box_predictor(feats, feature_map)
        return boxes_to_pixels(boxes, height, width), logits.float().sigmoid()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, part_prompts: Sequence[str],
                 label_maps: torch.Tensor | None = None, *, category: str | None = None) -> TeacherOutput:
        """Part boxes per image.

        Args:
            images: ``float [B, 3, H, W]`` in [0, 1], any device.
            part_prompts: ``R >= 1`` part phrases (e.g. ``gen3d.parts.part_prompts(category)``).
            label_maps: ignored (only the simulated teacher reads ground truth).
            category: object category for the prompt templates (default :attr:`category`).

        Returns:
            ``TeacherOutput(kind="box", teacher="detector")`` with ``boxes list[B] of float32
            [K_b, 4]`` ``(x0, y0, x1, y1)`` pixels inside the image and ``box_probs list[B] of
            float32 [K_b, R]`` sigmoid scores, on the images' device; boxes sorted by best score.

        Raises:
            ValueError: bad images or no prompts.
        """
        check_images(images)
        if len(part_prompts) == 0:
            raise ValueError("DetectorTeacher needs at least one part prompt")
        boxes_out, probs_out = [], []
        for start in range(0, images.shape[0], self.batch_size):
            boxes, scores = self.raw_predictions(images[start:start + self.batch_size], part_prompts, category)
            for b in range(boxes.shape[0]):
                kept_boxes, kept_scores = select_boxes(boxes[b], scores[b], self.threshold,
                                                       self.top_k, self.nms_iou)
                boxes_out.append(kept_boxes.to(images.device))
                probs_out.append(kept_scores.to(images.device))
        return TeacherOutput(kind=self.kind, teacher=self.name, boxes=boxes_out, box_probs=probs_out)

    def __repr__(self) -> str:
        return (f"DetectorTeacher(input_size={self.input_size}, threshold={self.threshold}, "
                f"top_k={self.top_k}, nms_iou={self.nms_iou}, category={self.category!r}, device={self.device})")
