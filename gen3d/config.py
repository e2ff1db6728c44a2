"""Reading the YAML configs under ``configs/`` (one reader for every ``load_*config`` of the toolkit)."""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml


def read_yaml_config(path: str | os.PathLike, allowed: Iterable[str] | None = None) -> dict[str, Any]:
    """The top-level mapping of a YAML config file (an empty file gives ``{}``).

    Args:
        path: the ``.yaml`` file.
        allowed: the top-level keys it may have (None: any).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not valid YAML, not a mapping, or a key outside ``allowed`` (the message names
            the file and the keys).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such config")
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(cfg, dict):  # noqa: TRY004 - bad config content is a ValueError, as documented
        raise ValueError(f"{path}: expected a mapping of config keys, got {type(cfg).__name__}")
    if allowed is not None:
        unknown = set(cfg) - set(allowed)
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)} (known: {sorted(allowed)})")
    return cfg
