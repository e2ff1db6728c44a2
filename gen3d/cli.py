"""The ``gen3d`` command line: pool shape collections (generation commands join in later)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from .errors import DataFormatError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="partdistill")
def main() -> None:
    """gen3d: shape collections, dataset readers and (soon) 3D shape generation.

    Every stage of partdistill reads and writes shape collections (HDF5, see docs/collection.md).
    """


@main.command("pool")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("sources", nargs=-1, required=True)
@click.option("--points", "num_points", default=2048, show_default=True, type=click.IntRange(1),
              help="Points per shape (N). Meshes are sampled by area; point clouds resampled.")
@click.option("--seed", default=0, show_default=True, help="Seed for surface sampling and resampling.")
@click.option("--resample", type=click.Choice(["fps", "random"]), default="fps", show_default=True,
              help="How point clouds with more than N points are brought to N points.")
@click.option("--no-mesh", is_flag=True, help="Do not store meshes (points only).")
@click.option("--data-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              envvar="PARTDISTILL_DATA_ROOT", show_envvar=True,
              help="Shared data folder for default dataset locations [default: ../shared/data of the checkout].")
@click.option("--workers", default=min(2, os.cpu_count() or 1), show_default=True, type=click.IntRange(1),
              help="Processes for reading and sampling.")
@click.option("--commit-every", default=256, show_default=True, type=click.IntRange(1),
              help="Shapes per write transaction (an interrupted run keeps every committed shape).")
def pool_cmd(out: Path, sources: tuple[str, ...], num_points: int, seed: int, resample: str, no_mesh: bool,
             data_root: Path | None, workers: int, commit_every: int) -> None:
    """Build or extend the collection OUT from SOURCES.

    \b
    SOURCES (any mix; ':'-separated, positional arguments then key=value):
      procedural:CATEGORY:COUNT[:seed=S][:split=train]     chair, table, airplane, mug
      labeled-psb[:CATEGORIES][:split=train|test][:root=PATH][:names=shapenet|psb]
      psb[:CATEGORIES][:root=PATH]                          PSB meshes, unlabelled
      shapenetpart:ROOT[:category=C][:split=S][:layout=auto|v0|normal|hdf5][:splits=DIR]
      coseg:ROOT[:set=S][:names=shapenet|coseg][:map=YAML]
      shapenetcore:ROOT:category=C[:split_file=all.csv][:split=S]
      files:PATHS:category=C[:split=S][:source=real|generated]   meshes or point clouds
      PATH.h5[:category=C][:source=S][:split=S]             another collection

    \b
    Shapes already in OUT (same source, dataset and id) are skipped, so re-running an
    interrupted command resumes it. Example:
      gen3d pool pooled.h5 labeled-psb:all procedural:chair:1000:seed=0
    """
    from tqdm import tqdm

    from .pool import PoolSettings, format_summary, pool

    settings = PoolSettings(num_points=num_points, seed=seed, resample=resample, keep_mesh=not no_mesh)
    if data_root is not None:
        settings.data_root = data_root
    start = time.perf_counter()
    try:
        with tqdm(unit="shape", desc=f"pool -> {out.name}", file=sys.stderr, dynamic_ncols=True) as bar:
            report = pool(out, sources, settings, workers=workers, commit_every=commit_every, progress=bar.update)
    except (ValueError, DataFormatError, FileNotFoundError, KeyError) as exc:
        raise click.ClickException(str(exc)) from exc
    elapsed = time.perf_counter() - start
    for text in report.added:
        click.echo(f"{text}: added {report.added[text]}, already present {report.skipped[text]}")
    click.echo(format_summary(report.summary))
    click.echo(f"{out}: {report.total} shapes, N={num_points}, written in {elapsed:.1f} s")


def _training_collections(data: tuple[str, ...], out: Path, num_points: int, workers: int) -> list[str]:
    """Collections to train on: existing ``.h5`` files as they are; every other source
    specification is pooled (points only) into ``OUT/data.h5`` first (resumable)."""
    from .pool import PoolSettings, collections_for

    return collections_for(data, out / "data.h5", PoolSettings(num_points=num_points, keep_mesh=False), workers,
                           log=lambda m: click.echo(m, err=True))


@main.command("train")
@click.option("--category", required=True, help="Category to learn (e.g. chair, airplane).")
@click.option("--data", "data", multiple=True, required=True,
              help="Training data: collection files (.h5) or `gen3d pool` source specifications "
                   "(pooled into OUT/data.h5 first). Only the category's `train` shapes are used. Repeatable.")
@click.option("--config", "config_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Model/training config, e.g. configs/gen3d/dit3d_cpu.yaml or dit3d_s4.yaml.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Run folder: checkpoints/, log.jsonl, model/ (EMA weights for `gen3d sample --checkpoint`).")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in --out.")
@click.option("--init", "init", default=None,
              help="Start from a trained model instead of random weights: a model folder (OUT/model) or a "
                   "category with a shipped checkpoint (chair, airplane). Fresh optimizer, step 0 and the "
                   "config's learning-rate schedule; the config's model and diffusion sections must match.")
@click.option("--max-steps", type=click.IntRange(1), default=None,
              help="Stop at this step (resume later with --resume); default: the config's steps.")
@click.option("--workers", default=min(2, os.cpu_count() or 1), show_default=True, type=click.IntRange(1),
              help="Processes for pooling non-collection --data sources.")
def train_cmd(category: str, data: tuple[str, ...], config_path: Path, out: Path, resume: bool, init: str | None,
              max_steps: int | None, workers: int) -> None:
    """Train a DiT-3D point-cloud diffusion model for one category (DDPM, epsilon, MSE).

    \b
    Runs on Accelerate: the GPU and mixed precision when present; several processes with
      accelerate launch --multi_gpu --num_processes 2 -m gen3d.cli train ...   (GPUs)
      torchrun --nproc_per_node 2 -m gen3d.cli train ...                        (CPU, gloo)
    Interrupt at any time; `--resume` continues from the last checkpoint with the same loss curve.
    Example (CPU, the shipped chair checkpoint's recipe):
      gen3d train --category chair --config configs/gen3d/dit3d_cpu.yaml --out runs/chair \\
        --data procedural:chair:3000:seed=0 --data labeled-psb:chair:split=train
    Fine-tune the shipped chair checkpoint on your data (e.g. ShapeNet):
      gen3d train --category chair --init chair --config configs/gen3d/dit3d_cpu_finetune.yaml \\
        --out runs/chair-ft --data shapenetpart:PATH:category=chair:split=train
    """
    from .train import load_config, train

    try:
        config = load_config(config_path)
        collections = _training_collections(data, out, config["num_points"], workers)
        if init is not None and not Path(init).exists():
            from .sample import shipped_checkpoint

            found = shipped_checkpoint(init)
            if found is None:
                raise click.BadParameter(f"{init!r} is neither a model folder nor a category with a shipped "
                                         "checkpoint (chair, airplane)", param_hint="--init")
            init = str(found)
        info = train(config, category, collections, out, resume=resume, max_steps=max_steps, init=init)
    except (ValueError, FileExistsError, FileNotFoundError, DataFormatError) as exc:
        raise click.ClickException(str(exc)) from exc
    if int(os.environ.get("RANK", "0")) == 0:
        click.echo(f"{out}: {info['steps']} steps, {info['wall_seconds']:.0f} s, final loss {info['final_loss']:.4f}; "
                   f"model in {out / 'model'}")


@main.command("sample")
@click.option("--category", required=True, help="Category to generate (a shipped checkpoint exists for chair and airplane).")
@click.option("-n", "n", default=500, show_default=True, type=click.IntRange(1), help="Number of shapes.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Output collection [default: generated_<category>.h5]. An existing file is resumed: only missing shapes are generated.")
@click.option("--checkpoint", type=click.Path(exists=True, path_type=Path), default=None,
              help="A model folder from `gen3d train` (OUT/model or OUT) [default: the shipped checkpoint].")
@click.option("--scheduler", type=click.Choice(["ddpm", "ddim", "dpm", "sde-dpm"]), default="sde-dpm", show_default=True,
              help="ddpm: ancestral DDPM; ddim: DDIM (eta=0); dpm: DPM-Solver++(2M); sde-dpm: its stochastic "
                   "SDE variant with steps uniform in log-SNR (at 50 steps within 2.5 points of DDPM-1000's "
                   "1-NNA-CD at ~20x its speed on the shipped checkpoints, see docs/generation.md).")
@click.option("--steps", default=50, show_default=True, type=click.IntRange(1),
              help="Denoising steps (DDPM was trained with 1000; ancestral ddpm needs about 1000, at 100 it is much worse: docs/generation.md).")
@click.option("--first-timestep", type=click.IntRange(0), default=None,
              help="dpm / sde-dpm only: start the solver at this training timestep (from unit Gaussian noise), "
                   "the steps uniform in log-SNR from there [default: T - 1 = 999]. With --steps 25, 800 is the best "
                   "25-step start measured (40x fewer evaluations than DDPM-1000; its 1-NNA-CD 2.9 +- 1.6 (airplane) "
                   "and 7.6 +- 1.8 (chair) points worse: docs/generation.md); at 50 steps it is worse "
                   "than the default.")
@click.option("--seed", default=0, show_default=True, help="Shape i of seed s is always the same shape.")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1), help="Shapes per batch (and per commit).")
@click.option("--no-mesh", is_flag=True, help="Skip the surface step (points only).")
@click.option("--grid", default=128, show_default=True, type=click.IntRange(16), help="DPSR grid of the surface step.")
@click.option("--export-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also write <id>.ply (points) and <id>.obj (mesh) per shape here.")
@click.option("--split", type=click.Choice(["train", "val", "test", "none"]), default="train", show_default=True,
              help="Split recorded for the generated shapes.")
@click.option("--preview", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write a PNG contact sheet of the first 16 shapes.")
def sample_cmd(category: str, n: int, out: Path | None, checkpoint: Path | None, scheduler: str, steps: int,
               first_timestep: int | None, seed: int, batch_size: int, no_mesh: bool, grid: int,
               export_dir: Path | None, split: str, preview: Path | None) -> None:
    """Generate N shapes of a category with a DiT-3D checkpoint into a collection.

    \b
    Example: gen3d sample --category chair -n 500
    writes generated_chair.h5: 500 chairs (2048 points each) with DPSR meshes, provenance per shape.
    """
    from .sample import CheckpointNotFoundError, generate_collection

    out = out or Path(f"generated_{category}.h5")
    try:
        info = generate_collection(category, n, out, checkpoint, scheduler, steps, seed, batch_size,
                                   mesh=not no_mesh, grid=grid, export_dir=export_dir, split=split,
                                   first_timestep=first_timestep)
    except CheckpointNotFoundError as exc:
        raise click.ClickException(str(exc)) from exc
    except (ValueError, DataFormatError) as exc:
        raise click.ClickException(str(exc)) from exc
    made = info["generated"]
    if preview is not None:
        from .collection import Collection
        from .preview import contact_sheet

        with Collection(out) as c:
            idx = c.select(category=category, source="generated")[:16]
            contact_sheet([c.points(int(i)) for i in idx], preview, titles=[str(c.shape_ids[i]) for i in idx])
        click.echo(f"preview: {preview}")
    click.echo(f"{out}: generated {made} shapes ({info['skipped']} already present) with {info['checkpoint']}; "
               f"sampling {info['seconds_sampling']:.1f} s"
               + (f", meshes {info['seconds_mesh']:.1f} s ({info['seconds_mesh'] / max(made, 1):.2f} s/shape)" if not no_mesh else ""))


@main.command("reconstruct")
@click.argument("collection", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write a new collection instead of adding meshes in place.")
@click.option("--method", type=click.Choice(["dpsr", "sap"]), default="dpsr", show_default=True,
              help="dpsr: one differentiable Poisson solve + marching cubes; sap: Shape-As-Points optimisation.")
@click.option("--grid", default=128, show_default=True, type=click.IntRange(16), help="Poisson grid resolution.")
@click.option("--overwrite-meshes", is_flag=True, help="Also rebuild shapes that already have a mesh.")
def reconstruct_cmd(collection: Path, out: Path | None, method: str, grid: int, overwrite_meshes: bool) -> None:
    """Add watertight meshes to the shapes of COLLECTION (surface step of Shape As Points).

    Normals are estimated and oriented outward, a differentiable Poisson solver (DPSR) gives an
    indicator grid, marching cubes its zero level set (main component kept). Resumable.
    """
    from .surface import reconstruct_collection

    try:
        k = reconstruct_collection(collection, out, method=method, grid=grid, overwrite_meshes=overwrite_meshes)
    except (ValueError, DataFormatError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{out or collection}: {k} shapes reconstructed ({method}, grid {grid})")


if __name__ == "__main__":
    main()
