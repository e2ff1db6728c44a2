"""Text prompts for the vision-language teachers: part phrases and sentence templates.

PartDistill (Umam et al., CVPR 2024) queries its teachers with one short phrase per part (the
``prompts`` column of ``gen3d/data/shapenetpart.yaml``, taken from PartDistill's
``shapenet-part-order_meta.json``; e.g. ``armrest`` for the chair part ``arm``). The CLIP and
detector teachers wrap every phrase in a few sentence templates and average the text embeddings
over the templates (prompt ensembling, Radford et al. 2021 §3.1.4; OWL-ViT, Minderer et al. 2022,
does the same), so one part gets one embedding.

Templates are short on purpose: OWLv2's text tower reads at most 16 tokens (start and end tokens
included), and every template below filled with the longest ShapeNetPart phrase stays under that.
"""
from __future__ import annotations

from collections.abc import Sequence

from gen3d.parts import (
    part_names,
    part_prompts,
    shapenetpart_categories,
    shapenetpart_category,
)

# Templates used when the object category is known: ``{part}`` is the part phrase, ``{category}``
# the lower-case category name (``chair``).
PART_TEMPLATES: tuple[str, ...] = (
    "a photo of the {part} of a {category}.",
    "a rendering of the {part} of a {category}.",
    "a 3d model of the {part} of a {category}.",
    "the {part} of a {category}.",
)

# Templates used without a category.
PART_TEMPLATES_NO_CATEGORY: tuple[str, ...] = (
    "a photo of a {part}.",
    "a rendering of a {part}.",
    "a 3d model of a {part}.",
    "a {part}.",
)

PROMPT_SOURCES = ("partdistill", "names")


def category_display_name(category: str) -> str:
    """The lower-case name used inside sentences for a ShapeNetPart category (name or synset),
    e.g. ``"03001627"`` -> ``"chair"``.

    Raises:
        KeyError: for an unknown category (the known ones are listed).
    """
    _, entry = shapenetpart_category(category)
    return str(entry["name"]).lower()


def category_part_phrases(category: str, source: str = "partdistill") -> tuple[str, ...]:
    """One phrase per part of a ShapeNetPart category, in the dataset's part order.

    Args:
        category: a ShapeNetPart category name (any case) or synset.
        source: ``"partdistill"`` for PartDistill's prompts (``armrest``, ``wheel or tire``) or
            ``"names"`` for the canonical part names with ``_`` read as a space (``gas tank``).

    Raises:
        KeyError: unknown category. ValueError: unknown ``source``.
    """
    if source == "partdistill":
        return part_prompts(category)
    if source == "names":
        return tuple(name.replace("_", " ") for name in part_names(category))
    raise ValueError(f"source must be one of {PROMPT_SOURCES}, got {source!r}")


def expand_prompts(phrases: Sequence[str], category: str | None = None,
                   templates: Sequence[str] | None = None) -> list[list[str]]:
    """Fill the templates with every part phrase.

    Args:
        phrases: ``R`` part phrases (e.g. :func:`category_part_phrases`).
        category: a ShapeNetPart category (name or synset) or any free object name, or ``None``.
            A ShapeNetPart category is written with its display name.
        templates: ``T`` templates with ``{part}`` (and ``{category}`` when a category is given);
            default :data:`PART_TEMPLATES` or :data:`PART_TEMPLATES_NO_CATEGORY`.

    Returns:
        ``R`` lists of ``T`` sentences, in the order of ``phrases``.

    Raises:
        ValueError: no phrases, an empty phrase, no templates, or a template without ``{part}``.
    """
    if len(phrases) == 0:
        raise ValueError("expand_prompts needs at least one part phrase")
    if templates is None:
        templates = PART_TEMPLATES if category is not None else PART_TEMPLATES_NO_CATEGORY
    if len(templates) == 0:
        raise ValueError("expand_prompts needs at least one template")
    for template in templates:
        if "{part}" not in template:
            raise ValueError(f"template {template!r} has no '{{part}}' field")
    name = None
    if category is not None:
        try:
            name = category_display_name(category)
        except KeyError:
            name = category.strip().lower()
    out = []
    for phrase in phrases:
        phrase = str(phrase).strip()
        if not phrase:
            raise ValueError(f"empty part phrase in {list(phrases)!r}")
        out.append([t.format(part=phrase, category=name) for t in templates])
    return out


def shapenetpart_prompt_table(source: str = "partdistill",
                              templates: Sequence[str] | None = None) -> dict[str, list[list[str]]]:
    """Templated prompts for all 16 ShapeNetPart categories: ``{category: R lists of T sentences}``,
    categories in the dataset's order and parts in part order."""
    return {cat: expand_prompts(category_part_phrases(cat, source), cat, templates)
            for cat in shapenetpart_categories()}
