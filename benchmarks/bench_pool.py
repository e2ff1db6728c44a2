"""Benchmark: pool all 380 Labeled-PSB meshes + N procedural chairs into one collection, then
check that it reads back identically to what the readers / generator produce directly.

    python benchmarks/bench_pool.py [--chairs 1000] [--points 2048] [--workers 2] [--out /tmp/pool.h5]

Prints a table: wall time of ``gen3d pool``, shapes, file size, and the read-back check.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from gen3d.collection import Collection
from gen3d.procedural import generate
from gen3d.readers import default_data_root
from gen3d.readers.psb import read_labeled_psb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chairs", type=int, default=1000)
    ap.add_argument("--points", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp()) / "pool.h5")
    ap.add_argument("--data-root", type=Path, default=default_data_root())
    args = ap.parse_args()
    args.out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "gen3d.cli", "pool", str(args.out), "labeled-psb:all",
           f"procedural:chair:{args.chairs}:seed=0", "--points", str(args.points), "--workers", str(args.workers),
           "--data-root", str(args.data_root)]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start

    start = time.perf_counter()
    archive = args.data_root / "psb_labeled_kalogerakis2010" / "LabeledDB_new.tar.xz"
    expected = list(read_labeled_psb(archive, num_points=args.points))
    mismatches = 0
    with Collection(args.out) as c:
        n = len(c)
        for k in range(n):
            got = c.record(k)
            want = expected[k] if k < len(expected) else generate("chair", k - len(expected), 0, args.points)
            same = (got.shape_id == want.shape_id and np.array_equal(got.points, want.points)
                    and np.array_equal(got.labels, want.labels) and np.array_equal(got.mesh_faces, want.mesh_faces)
                    and np.array_equal(got.mesh_vertices, want.mesh_vertices)
                    and np.array_equal(got.face_labels, want.face_labels))
            mismatches += not same
    check = time.perf_counter() - start
    print("| what | value |\n|---|---|")
    print(f"| command | `gen3d pool OUT labeled-psb:all procedural:chair:{args.chairs}:seed=0 --points {args.points} --workers {args.workers}` |")
    print(f"| wall time of gen3d pool | {wall:.1f} s |")
    print(f"| shapes | {n} (expected {len(expected) + args.chairs}) |")
    print(f"| file size | {args.out.stat().st_size / 2**20:.0f} MiB |")
    print(f"| read-back check | {n - mismatches}/{n} shapes identical ({check:.1f} s) |")
    sys.exit(1 if mismatches or n != len(expected) + args.chairs else 0)


if __name__ == "__main__":
    main()
