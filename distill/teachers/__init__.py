"""2D teachers: one interface (:class:`~distill.teachers.base.Teacher`), four implementations.

========== ====== =================================================================================
name       kind   what it is
========== ====== =================================================================================
clip       pixel  open_clip dense patch features vs part prompts (MaskCLIP / PointCLIP v2 style)
detector   box    open-vocabulary grounding detector from transformers (OWLv2), queried by part
fewshot    pixel  a 2D segmentation network fitted here on renders of K labelled shapes (PartSLIP)
simulated  box or pixel  ground-truth label maps with controlled corruption (experiments and tests)
========== ====== =================================================================================

Teachers are named on the command line by a *teacher spec* (see :func:`parse_teacher_spec`), and
several specs separated by commas give several teachers whose units are pooled.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .base import KINDS, Teacher, TeacherOutput

__all__ = ["KINDS", "Teacher", "TeacherOutput", "TeacherSpec", "load_teacher", "parse_teacher_spec",
           "teacher_fingerprint"]

NAMES = ("clip", "detector", "fewshot", "simulated")


@dataclass
class TeacherSpec:
    """A parsed teacher spec.

    Grammar (``:``-separated, positional value first, then ``key=value`` options)::

        fewshot:PATH                         a folder written by `distill teacher-fit`
        clip[:MODEL][:weights=TAG|FILE][:allow_random=1]
        detector[:NAME_OR_FOLDER][:threshold=0.1][:allow_random=1]
        simulated[:box|pixel][:p_miss=0.2][:p_wrong=0.2][:box_enlarge=0.15][:seed=0]
    """

    name: str
    arg: str | None = None
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        parts = [self.name] + ([self.arg] if self.arg else []) + [f"{k}={v}" for k, v in sorted(self.options.items())]
        return ":".join(parts)


def parse_teacher_spec(text: str) -> TeacherSpec:
    """Parse one teacher spec (see :class:`TeacherSpec`).

    Raises:
        ValueError: unknown teacher name, or a malformed option.
    """
    fields = [f for f in text.strip().split(":")]
    name = fields[0].strip().lower()
    if name not in NAMES:
        raise ValueError(f"unknown teacher {fields[0]!r} in {text!r}; known: {', '.join(NAMES)}")
    arg, options = None, {}
    for f in fields[1:]:
        if "=" in f:
            k, v = f.split("=", 1)
            options[k.strip()] = v.strip()
        elif arg is None:
            arg = f
        else:
            raise ValueError(f"teacher spec {text!r}: more than one positional value ({arg!r}, {f!r})")
    if name == "fewshot" and not arg:
        raise ValueError(f"teacher spec {text!r}: fewshot needs the folder of `distill teacher-fit`, e.g. fewshot:runs/teacher")
    return TeacherSpec(name, arg, options)


def _flag(options: dict[str, str], key: str) -> bool:
    return options.get(key, "0").lower() in ("1", "true", "yes")


def load_teacher(spec: str | TeacherSpec, device: Any = "cpu") -> Teacher:
    """Build the teacher a spec names (weights from local paths or the library's own download).

    Raises:
        ValueError: bad spec. FileNotFoundError / RuntimeError: weights that cannot be found (the
        message says how to get them).
    """
    spec = parse_teacher_spec(spec) if isinstance(spec, str) else spec
    o = spec.options
    if spec.name == "fewshot":
        from .fewshot import FewShotTeacher

        return FewShotTeacher.load(spec.arg).to(device)
    if spec.name == "simulated":
        from .simulated import SimulatedTeacher

        kw: dict[str, Any] = {k: float(o[k]) for k in ("p_miss", "p_wrong", "box_enlarge") if k in o}
        if "seed" in o:
            kw["seed"] = int(o["seed"])
        return SimulatedTeacher(kind=spec.arg or "box", **kw)
    if spec.name == "clip":
        from .clip import ClipTeacher

        model = spec.arg or "ViT-B-16"
        if _flag(o, "allow_random"):
            return ClipTeacher.random_init(model, allow_random=True, device=device)
        return ClipTeacher.from_pretrained(model, o.get("weights", "openai"), device=device)
    from .detector import DetectorTeacher

    kw = {"threshold": float(o["threshold"])} if "threshold" in o else {}
    if _flag(o, "allow_random"):
        return DetectorTeacher.random_init(allow_random=True, device=device, **kw)
    return DetectorTeacher.from_pretrained(spec.arg or "google/owlv2-base-patch16-ensemble", device=device, **kw)


def teacher_fingerprint(spec: str | TeacherSpec) -> str:
    """A short hash identifying a teacher: its spec, plus size and mtime of every weight file it
    names, so that refitting a few-shot teacher invalidates cached knowledge."""
    spec = parse_teacher_spec(spec) if isinstance(spec, str) else spec
    items: list[Any] = [str(spec)]
    for value in [spec.arg, spec.options.get("weights")]:
        if value and Path(value).exists():
            p = Path(value)
            files = sorted(p.rglob("*")) if p.is_dir() else [p]
            items += [(str(f.relative_to(p) if p.is_dir() else f.name), f.stat().st_size, f.stat().st_mtime_ns)
                      for f in files if f.is_file()]
    return hashlib.sha1(json.dumps(items, default=str).encode()).hexdigest()[:12]
