"""The teacher interface: 2D part predictions on rendered views.

A teacher is any callable ``teacher(images, part_prompts, label_maps=None) -> TeacherOutput``.
PartDistill (Umam et al., CVPR 2024, §3.2) distinguishes *B-VLM* teachers, which return boxes with
per-part scores (GLIP; here :mod:`distill.teachers.detector`), and *P-VLM* teachers, which return
per-pixel part probabilities (PointCLIP v2 / MaskCLIP style CLIP; here :mod:`distill.teachers.clip`,
the few-shot network of :mod:`distill.teachers.fewshot` and :mod:`distill.teachers.simulated`).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

KINDS = ("box", "pixel")


@dataclass
class TeacherOutput:
    """Predictions of one teacher on ``B`` images for ``R`` parts.

    Attributes:
        kind: ``"box"`` (B-VLM) or ``"pixel"`` (P-VLM).
        teacher: the teacher's name (``"clip"``, ``"detector"``, ``"fewshot"``, ``"simulated"``).
        boxes: box kind: ``list[B]`` of ``float32 [K_b, 4]`` boxes ``(x0, y0, x1, y1)`` in pixels.
        box_probs: box kind: ``list[B]`` of ``float32 [K_b, R]`` part scores in [0, 1] per box.
        probs: pixel kind: ``float32 [B, R, H, W]`` part probabilities (sum to 1 over R).
        corrupted: simulated teacher only: ``list[B]`` of ``bool [K_b]`` (box kind) or
            ``bool [B, H, W]`` (pixel kind); ``None`` for real teachers.
        simulated: True for the simulated teacher (outputs must say so).
    """

    kind: str
    teacher: str
    boxes: list[torch.Tensor] | None = None
    box_probs: list[torch.Tensor] | None = None
    probs: torch.Tensor | None = None
    corrupted: list[torch.Tensor] | torch.Tensor | None = None
    simulated: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"TeacherOutput.kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "box" and (self.boxes is None or self.box_probs is None):
            raise ValueError("a box TeacherOutput needs boxes and box_probs")
        if self.kind == "pixel" and self.probs is None:
            raise ValueError("a pixel TeacherOutput needs probs")


class Teacher(Protocol):
    """What every teacher provides."""

    name: str
    kind: str

    def __call__(self, images: torch.Tensor, part_prompts: Sequence[str],
                 label_maps: torch.Tensor | None = None) -> TeacherOutput:
        """Predict parts on ``images float32 [B, 3, H, W]`` in [0, 1] for ``R = len(part_prompts)``
        parts. ``label_maps int64 [B, H, W]`` (ground-truth part per pixel, -1 background) is only
        used by the simulated teacher."""
        ...


class TeacherWeightsError(RuntimeError):
    """The pretrained weights of a teacher could not be obtained (no network and no local copy).
    The message says where the weights come from and how to provide them offline."""


class RandomWeightsWarning(UserWarning):
    """A teacher was built with random weights: its predictions are meaningless."""
