"""The evaluation command line, ``pdeval`` (not ``eval``, which would shadow the shell built-in).

    pdeval score COLLECTION PRED.h5 --out DIR          part mIoU of predictions (points, and mesh faces)
    pdeval generation SAMPLES.h5 REF.h5 --out DIR      MMD-CD / COV-CD / 1-NNA-CD of generated shapes
    pdeval experiment configs/experiments/chair.yaml   the end-to-end experiment; writes RESULTS.md

Each scoring command writes ``DIR/scores.json``, ``DIR/scores.md`` and (``score``) ``DIR/sheet.png``:
ground truth beside prediction for a few shapes, parts coloured.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import click
import numpy as np

from gen3d.errors import DataFormatError

_ERRORS = (ValueError, FileExistsError, FileNotFoundError, DataFormatError, KeyError)


def _write(out: Path, name: str, text: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".{name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / name)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """Evaluate part segmentations, mesh transfer and generated shapes; run the end-to-end experiments."""


def score_collection(collection: Path, predictions: Path, split: str | None = None, category: str | None = None,
                     mapping: str = "identity") -> dict:
    """Point mIoU (both conventions) of a predictions file on the labelled shapes of a collection, and
    per-face / area-weighted mIoU on those with labelled meshes (5-NN transfer).

    Raises:
        ValueError: no labelled shape of the predictions in the collection.
    """
    from distill.extract import shape_key
    from distill.predict import read_predictions
    from gen3d.collection import Collection

    from .metrics import both_conventions
    from .transfer import PartMapping, mesh_transfer_scores

    items, meshes, mesh_preds = [], [], []
    with Collection(collection) as c, read_predictions(predictions) as p:
        keys = {tuple(k): j for j, k in enumerate(p.keys())}
        rows = c.select(category=category, split=split)
        for i in rows:
            j = keys.get(shape_key(c, int(i)))
            if j is None or (c.labels(int(i)) < 0).all():
                continue
            rec = c.record(int(i))
            labels = p.labels(j).astype(np.int64)
            items.append((rec.category, labels, rec.labels.astype(np.int64), len(rec.part_names)))
            if rec.has_mesh and rec.face_labels is not None:
                meshes.append(rec)
                mesh_preds.append(labels)
        part_names = dict(c.part_names)
    if not items:
        raise ValueError(f"{predictions}: none of its shapes is a labelled shape of {collection}"
                         f"{' in split ' + split if split else ''}")
    out = {"collection": str(collection), "predictions": str(predictions), "split": split,
           "points": both_conventions(items, part_names), "shapes": len(items)}
    if meshes:
        maps = None if mapping == "identity" else {
            cat: PartMapping.labeled_psb(cat, part_names[cat]) for cat in {m.category for m in meshes}}
        out["faces"] = mesh_transfer_scores(meshes, mesh_preds, maps)
    return out


def _markdown(scores: dict) -> str:
    lines = ["| measure | convention | instance mIoU | category mIoU | shapes |", "|---|---|---|---|---|"]

    def row(name, summ, conv):
        lines.append(f"| {name} | {conv} | {100 * summ['instance_miou']:.1f} | {100 * summ['category_miou']:.1f} | "
                     f"{summ.get('num_shapes', summ.get('shapes', ''))} |")

    for conv in ("one", "skip"):
        row("points", scores["points"][conv], conv)
    if "faces" in scores:
        for conv in ("one", "skip"):
            row("mesh faces (5-NN)", scores["faces"]["per_face"][conv], conv)
            row("mesh faces, area-weighted", scores["faces"]["area_weighted"][conv], conv)
    return ("Conventions: **one** = a part absent from both GT and prediction counts as IoU 1 (PartDistill / "
            "PointCLIP v2); **skip** = only parts present in either are averaged.\n\n" + "\n".join(lines) + "\n")


@main.command("score")
@click.argument("collection", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("predictions", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for scores.json, scores.md and sheet.png.")
@click.option("--split", type=click.Choice(["train", "val", "test", "none"]), help="Only shapes of this split.")
@click.option("--category", help="Only shapes of this category.")
@click.option("--mapping", type=click.Choice(["identity", "labeled-psb"]), default="identity", show_default=True,
              help="Model part names -> the meshes' part names (labeled-psb: gen3d/data/psb.yaml; parts the "
                   "dataset does not label are not scored).")
@click.option("--sheet-shapes", default=6, show_default=True, help="Shapes on the PNG sheet (0: none).")
def score_cmd(collection, predictions, out, split, category, mapping, sheet_shapes):
    """Part mIoU of PREDICTIONS (from `distill predict` / `distill vote`) against COLLECTION's labels."""
    try:
        scores = score_collection(collection, predictions, split, category, mapping)
    except _ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    _write(out, "scores.json", json.dumps(scores, indent=2, default=float))
    md = _markdown(scores)
    _write(out, "scores.md", md)
    if sheet_shapes:
        from .sheet import comparison_sheet

        comparison_sheet(collection, predictions, out / "sheet.png", sheet_shapes, split, category)
    click.echo(md)


@main.command("generation")
@click.argument("samples", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("reference", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for scores.json and scores.md.")
@click.option("--category", help="Category to compare [default: all].")
@click.option("--ref-split", type=click.Choice(["train", "val", "test", "none"]), help="Reference split, e.g. test.")
@click.option("--max-shapes", type=click.IntRange(1), help="Cap on shapes per set (seeded choice).")
@click.option("--seed", default=0, show_default=True)
def generation_cmd(samples, reference, out, category, ref_split, max_shapes, seed):
    """MMD-CD, COV-CD and 1-NNA-CD (PointFlow protocol) of SAMPLES against REFERENCE, on normalised
    2048-point clouds."""
    from .generation import evaluate_collections

    try:
        res = evaluate_collections(samples, reference, category, ref_split, max_shapes=max_shapes, seed=seed,
                                   progress=True)
    except _ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    _write(out, "scores.json", json.dumps(res, indent=2, default=float))
    keys = [k for k in ("mmd_cd", "cov_cd", "1nna_cd") if k in res]
    md = "| " + " | ".join(keys) + " |\n|" + "---|" * len(keys) + "\n| " + " | ".join(
        f"{res[k]:.5g}" for k in keys) + " |\n"
    _write(out, "scores.md", md)
    click.echo(md)


@main.command("experiment")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--quick", is_flag=True, help="The small variant (minutes, for CI): tiny sizes, its numbers only show the pipeline runs.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Experiment folder [default: runs/experiments/NAME]; a re-run resumes from its cached stages "
                   "(those made with the same settings from the same inputs).")
@click.option("--redo-stale", is_flag=True,
              help="Where a cached stage was made with other settings (the config changed, or the shipped "
                   "generator), delete its outputs and make it and the stages after it again, instead of stopping "
                   "with an error that names what changed.")
@click.option("--results", default="RESULTS.md", show_default=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Markdown file whose section for this experiment is (re)written.")
@click.option("--coseg", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="COSEG root folder (<set>/shapes/*.off + <set>/gt/*.seg): also apply every Pre student to the "
                   "category's COSEG shapes and score them per face (PartDistill Table 4).")
def experiment_cmd(config, quick, out, redo_stale, results, coseg):
    """Run an end-to-end experiment (generate -> pool -> teachers -> knowledge -> distil -> evaluate)."""
    from .experiment import run_experiment

    try:
        summary = run_experiment(config, out, quick, results, coseg, log=lambda m: click.echo(m, err=True),
                                 redo_stale=redo_stale)
    except _ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{summary['name']}: {len(summary['results'])} rows in {summary['wall_seconds'] / 60:.1f} min; "
               f"results in {results}")


if __name__ == "__main__":
    main()
