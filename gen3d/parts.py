"""Part-name tables: ShapeNetPart's 16 categories, Labeled-PSB and COSEG mappings.

The tables live in YAML files shipped with the package (``gen3d/data/*.yaml``) so that they can
be read and cited without running code. Functions here only load and look them up.

Raises:
    KeyError: with the known names listed, for an unknown category.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import resources
from typing import Any

import yaml


@lru_cache(maxsize=None)
def load_table(name: str) -> dict[str, Any]:
    """Load one of the shipped tables: ``"shapenetpart"``, ``"psb"`` or ``"coseg"``."""
    text = resources.files("gen3d").joinpath("data", f"{name}.yaml").read_text()
    return yaml.safe_load(text)


def shapenetpart_categories() -> dict[str, dict[str, Any]]:
    """ShapeNetPart categories keyed by lower-case name (``airplane`` ... ``table``), in the
    dataset's category order (alphabetical by name = by synset), which is also the order of the
    ``label`` field of the HDF5 release."""
    return load_table("shapenetpart")["categories"]


def shapenetpart_category(name_or_synset: str) -> tuple[str, dict[str, Any]]:
    """Look a ShapeNetPart category up by name (any case) or synset; returns ``(name, entry)``."""
    cats = shapenetpart_categories()
    key = name_or_synset.strip().lower()
    if key in cats:
        return key, cats[key]
    for name, entry in cats.items():
        if entry["synset"] == name_or_synset.strip():
            return name, entry
    raise KeyError(f"unknown ShapeNetPart category {name_or_synset!r}; known: {', '.join(cats)}")


def part_names(category: str) -> tuple[str, ...]:
    """Canonical part names of a ShapeNetPart category (e.g. ``chair`` -> back, seat, leg, arm)."""
    return tuple(shapenetpart_category(category)[1]["parts"])


def part_prompts(category: str) -> tuple[str, ...]:
    """PartDistill's text prompts for the parts of a ShapeNetPart category, in part order."""
    return tuple(shapenetpart_category(category)[1]["prompts"])


def global_part_offset(category: str) -> int:
    """First global part id of the category in ShapeNetPart's 50-part scheme."""
    return int(shapenetpart_category(category)[1]["pid_start"])
