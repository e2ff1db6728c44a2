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


if __name__ == "__main__":
    main()
