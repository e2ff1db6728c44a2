"""Run folders of resumable training jobs (``gen3d train``, ``distill pretrain``, ``distill train``).

A run folder holds ``checkpoints/<prefix>-NNNN/`` (accelerate ``save_state`` plus ``meta.json``) and a
JSON-lines ``log.jsonl``. Checkpoints are written under a temporary name and renamed once complete,
so a job killed mid-save resumes from the previous checkpoint; a resumed job drops the log lines
after its checkpoint (they are written again).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def latest_checkpoint(out: str | os.PathLike, prefix: str = "step") -> Path | None:
    """The newest complete checkpoint ``OUT/checkpoints/<prefix>-*`` (one with ``meta.json``), or None."""
    ckpts = sorted(p for p in (Path(out) / "checkpoints").glob(f"{prefix}-*") if (p / "meta.json").is_file())
    return ckpts[-1] if ckpts else None


def resume_checkpoint(accelerator, out: str | os.PathLike, prefix: str = "step") -> tuple[Path | None, dict[str, Any]]:
    """Load the newest complete checkpoint (:func:`latest_checkpoint`) into ``accelerator``
    (``accelerator.load_state``: models, optimizers, registered objects, RNG states).

    Returns:
        ``(folder, meta)`` with ``meta`` its ``meta.json``, or ``(None, {})`` when there is none.
    """
    ckpt = latest_checkpoint(out, prefix)
    if ckpt is None:
        return None, {}
    accelerator.load_state(str(ckpt))
    return ckpt, json.loads((ckpt / "meta.json").read_text())


def warmup_cosine(step: int, total: int, warmup: int = 0, min_ratio: float = 0.0) -> float:
    """Learning-rate factor of 0-based ``step``: linear warm-up ``(step + 1) / warmup`` over the first
    ``warmup`` steps, then cosine decay from 1 to ``min_ratio`` over the remaining ``total - warmup``
    (SGDR's schedule without restarts, Loshchilov & Hutter, ICLR 2017), held at ``min_ratio`` after
    ``total``. Multiply by the base learning rate."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def save_checkpoint(accelerator, ckpt: Path, meta: dict[str, Any], keep: int,
                    write_extra: Callable[[Path], None] | None = None) -> None:
    """``accelerator.save_state`` into ``ckpt`` atomically, with ``meta.json`` (and whatever
    ``write_extra(folder)`` adds, main process only), then keep the newest ``keep`` checkpoints with
    the same name prefix. Every process must call it."""
    tmp = ckpt.with_name(f".{ckpt.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if write_extra is not None:
            write_extra(tmp)
        (tmp / "meta.json").write_text(json.dumps(meta, default=_json_default))
        shutil.rmtree(ckpt, ignore_errors=True)
        os.replace(tmp, ckpt)
        prefix = ckpt.name.rsplit("-", 1)[0]
        for old in sorted(ckpt.parent.glob(f"{prefix}-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def truncate_log(log: str | os.PathLike, field: str, last: int) -> None:
    """Keep the lines of a JSON-lines log whose ``field`` is ``<= last``; stop at a line cut off by a kill."""
    log = Path(log)
    if log.exists():
        kept = []
        for line in log.read_text().splitlines():
            try:
                if json.loads(line)[field] <= last:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                break  # a line cut off by the kill: everything after it is redone
        log.write_text("".join(kept))


def _json_default(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
