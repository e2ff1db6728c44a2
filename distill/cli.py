"""The ``distill`` command line: teachers, knowledge units, the student and PartDistill training.

Typical run (one category)::

    distill teacher-fit --category chair --shots 8 --data labeled-psb:chair:split=train --out runs/teacher
    distill extract runs/pool.h5 --teacher fewshot:runs/teacher --out runs/knowledge.h5
    distill vote runs/pool.h5 runs/knowledge.h5 --out runs/vote.h5        # baseline (Table 5 row 1)
    distill pretrain runs/pool.h5 --out runs/encoder
    distill train --collection runs/pool.h5 --knowledge runs/knowledge.h5 \\
        --config configs/distill/pre.yaml --encoder runs/encoder --out runs/pre
    distill predict --run runs/pre runs/test.h5 --out runs/pred.h5
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import click

from gen3d.errors import DataFormatError

_ERRORS = (ValueError, FileExistsError, FileNotFoundError, DataFormatError, KeyError)


def _main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
def main() -> None:
    """PartDistill: distil 2D vision-language teachers into a 3D part-segmentation student."""


@main.command("teacher-fit")
@click.option("--category", required=True, help="Category, e.g. chair or airplane.")
@click.option("--shots", default=8, show_default=True, type=click.IntRange(1),
              help="K labelled shapes to fit on (PartSLIP's few-shot setting uses 8).")
@click.option("--data", "data", multiple=True, required=True,
              help="A collection (.h5) or a `gen3d pool` source spec (pooled into OUT/data.h5). Only labelled "
                   "`train` shapes are used. Repeatable.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Teacher folder to write.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Training config [default: configs/distill/teacher_fewshot.yaml as shipped].")
@click.option("--views", default=10, show_default=True, type=click.IntRange(1), help="PartSLIP views per shape.")
@click.option("--extra-views", default=20, show_default=True, type=click.IntRange(0),
              help="Additional random views per shape (augmentation).")
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(32), help="Render size in pixels.")
@click.option("--seed", default=0, show_default=True, help="Seed of the shot choice, views and training.")
def teacher_fit_cmd(category, shots, data, out, config_path, views, extra_views, image_size, seed):
    """Fit the few-shot 2D teacher on renders of K labelled shapes and save it to OUT."""
    from gen3d.pool import PoolSettings, collections_for

    from .teacher_fit import fit_teacher

    try:
        files = collections_for(data, out.with_name(out.name + ".data.h5"), PoolSettings(), 1,
                                log=lambda m: click.echo(m, err=True))
        if len(files) != 1:
            raise ValueError("teacher-fit takes one collection: pool several sources into one --data spec list")
        info = fit_teacher(files[0], category, out, shots, config_path, seed, views, extra_views, image_size)
    except _ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{out}: few-shot teacher for {category} fitted on {info['shots']} shapes ({info['images']} images)")


@main.command("extract")
@click.argument("collection", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--teacher", "teachers", required=True,
              help="Teacher spec(s), comma-separated to pool several: fewshot:DIR, clip[:MODEL][:weights=FILE], "
                   "detector[:NAME_OR_DIR], simulated[:box|pixel][:p_miss=..][:p_wrong=..][:box_enlarge=..].")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Knowledge file to write (.h5).")
@click.option("--category", help="Category to extract [default: the collection's only one].")
@click.option("--split", "splits", multiple=True, type=click.Choice(["train", "val", "test", "none"]),
              help="Splits to extract (repeatable) [default: all].")
@click.option("--views", default=10, show_default=True, type=click.IntRange(1), help="Views per shape (PartSLIP set).")
@click.option("--image-size", default=224, show_default=True, type=click.IntRange(32), help="Render size in pixels.")
@click.option("--radius", default="auto", show_default=True,
              help="Splat radius in pixels for bare point clouds, or 'auto' (from the point spacing).")
@click.option("--no-dense", is_flag=True, help="Render meshes as their collection points instead of dense samples.")
@click.option("--refine", is_flag=True, help="Intra-set label refinement (geometric consistency sets) before units are formed.")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Per-shape cache folder [default: OUT.cache]; a re-run resumes from it.")
@click.option("--device", help="torch device [default: cuda if available].")
def extract_cmd(collection, teachers, out, category, splits, views, image_size, radius, no_dense, refine, cache_dir, device):
    """Render every shape, run the teacher(s) and write knowledge units (PartDistill Eqs. 1-2).

    Resumable: finished shapes are cached; several processes (`accelerate launch` / `torchrun`)
    share the work."""
    from .extract import ExtractSettings, extract

    try:
        radius = radius if radius == "auto" else float(radius)
    except ValueError as exc:
        raise click.BadParameter(f"{radius!r} is neither 'auto' nor a number", param_hint="--radius") from exc
    settings = ExtractSettings(num_views=views, image_size=image_size, radius=radius, dense=not no_dense, refine=refine)
    try:
        rep = extract(collection, [t for t in teachers.split(",") if t.strip()], out, settings, category,
                      list(splits) or None, cache_dir, device)
    except _ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    if _main_process():
        per = ", ".join(f"{k} {v:.3f}" for k, v in rep.seconds_per_shape.items())
        click.echo(f"{out}: {rep.shapes} shapes ({rep.extracted} extracted, {rep.cached} from cache), "
                   f"{rep.units} units, {rep.seconds:.1f} s; seconds per shape: {per}")


@main.command("vote")
@click.argument("collection", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("knowledge", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Predictions file to write (.h5).")
def vote_cmd(collection, knowledge, out):
    """Direct back-projection voting of the knowledge units (the baseline, PartDistill Table 5 row 1).

    Points no unit covers are labelled -1 (uncovered); score with `pdeval score`."""
    from .predict import vote_predictions

    try:
        n = vote_predictions(collection, knowledge, out)
    except _ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{out}: voting predictions for {n} shapes")


@main.command("pretrain")
@click.argument("collections", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder; the encoder goes to OUT/encoder.")
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Pretraining config (configs/distill/pretrain_*.yaml).")
@click.option("--category", help="Only this category's shapes.")
@click.option("--resume", is_flag=True, help="Continue the run in OUT from its last checkpoint.")
@click.option("--max-steps", type=click.IntRange(1), help="Stop after this step (resumable).")
def pretrain_cmd(collections, out, config_path, category, resume, max_steps):
    """Self-supervised Point-M2AE pretraining of the student's encoder (never on test shapes)."""
    from .pretrain import load_pretrain_config, pretrain

    try:
        info = pretrain(list(collections), out, load_pretrain_config(config_path), category=category, resume=resume,
                        max_steps=max_steps)
    except _ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    if _main_process():
        click.echo(f"{out}: encoder in {out / 'encoder'} ({json.dumps(info)[:200]})")


@main.command("train")
@click.option("--collection", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Shapes to distil on (their knowledge must be in --knowledge).")
@click.option("--knowledge", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Knowledge file from `distill extract`.")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Distillation config, e.g. configs/distill/pre.yaml.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder.")
@click.option("--encoder", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Pretrained encoder folder (from `distill pretrain`) to start from.")
@click.option("--student", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Student config (configs/distill/student_*.yaml) overriding the config's model.config; it must "
                   "match the --encoder's sizes (e.g. student_small.yaml with pretrain_small.yaml).")
@click.option("--resume", is_flag=True, help="Continue the run in OUT from its last checkpoint.")
@click.option("--max-epochs", type=click.IntRange(1), help="Stop after this epoch (resumable).")
def train_cmd(collection, knowledge, config_path, out, encoder, student, resume, max_epochs):
    """Distil the knowledge units into the student: forward and backward distillation, Eqs. 3-4."""
    from .trainer import load_distill_config, train_distill

    try:
        config = load_distill_config(config_path)
        if encoder:
            config.setdefault("model", {})["encoder"] = str(encoder)
        if student:
            config.setdefault("model", {})["config"] = str(student)
        info = train_distill(collection, knowledge, config, out, resume=resume, max_epochs=max_epochs)
    except _ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    if _main_process():
        click.echo(f"{out}: model in {out / 'model'}; {json.dumps({k: info[k] for k in list(info)[:6]}, default=str)}")


@main.command("predict")
@click.option("--run", "run_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A run folder of `distill train` (or its model/ folder).")
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="Predictions file to write (.h5).")
@click.option("--category", help="Category of mesh/point files given as INPUTS [default: the run's].")
@click.option("--png", type=click.Path(dir_okay=False, path_type=Path), help="Also write a PNG sheet of a few shapes, parts coloured.")
def predict_cmd(run_dir, inputs, out, category, png):
    """Per-point part probabilities and labels for a collection or mesh files; per-face labels for
    meshes by voting of the 5 nearest points (PartDistill §4.2)."""
    from .predict import predict_inputs

    try:
        n = predict_inputs(run_dir, list(inputs), out, category=category, png=png)
    except _ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{out}: predictions for {n} shapes")


if __name__ == "__main__":
    main()
