"""Voting baseline (PartDistill Table 5 row 1) on real Labeled-PSB meshes, per teacher.

For each category: pool the Labeled-PSB meshes (train + test), fit the 8-shot teacher on 8 of the
train shapes (``distill teacher-fit``), extract knowledge for the train and test splits
(``distill extract``) with the few-shot and the simulated teachers, vote, and score the *test*
meshes per face (5-NN transfer, both mIoU conventions). Every stage is cached in ``--out``.

    python benchmarks/voting_baseline.py --out runs/voting [--categories chair airplane]

Prints a Markdown table (the README quotes it).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/voting", type=Path)
    ap.add_argument("--categories", nargs="+", default=["chair", "airplane"])
    ap.add_argument("--data-root", type=Path, help="shared data folder [default: PARTDISTILL_DATA_ROOT or ../shared/data]")
    ap.add_argument("--teacher-config", default="configs/distill/teacher_fewshot.yaml")
    ap.add_argument("--shots", type=int, default=8)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--simulated", default="simulated:pixel:p_miss=0.2:p_wrong=0.2")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from distill.extract import ExtractSettings, extract
    from distill.predict import vote_predictions
    from distill.teacher_fit import fit_teacher
    from eval.experiment import Stages, score_predictions, shape_groups
    from gen3d.pool import PoolSettings, pool

    settings = ExtractSettings(num_views=args.views, image_size=args.image_size)
    rows = []
    for cat in args.categories:
        out = args.out / cat
        out.mkdir(parents=True, exist_ok=True)
        st = Stages(out, print)
        root = f":root={args.data_root / 'psb_labeled_kalogerakis2010' / 'LabeledDB_new.tar.xz'}" if args.data_root else ""
        st.run("real", lambda cat=cat, out=out, root=root: pool(out / "real.h5", [f"labeled-psb:{cat}{root}"], PoolSettings()).total)
        st.run("teacher", lambda cat=cat, out=out: fit_teacher(out / "real.h5", cat, out / "teacher", args.shots,
                                                               args.teacher_config, 0, args.views, 20,
                                                               args.image_size, progress=False))
        test_rows = shape_groups(out / "real.h5", cat).test_rows
        for name, spec in (("fewshot", f"fewshot:{out / 'teacher'}"), ("simulated", args.simulated)):
            k = out / f"knowledge-{name}.h5"
            t0 = time.perf_counter()
            rep = st.run(f"knowledge-{name}", lambda k=k, spec=spec, out=out, cat=cat: extract(
                out / "real.h5", [spec], k, settings, cat, ["train", "test"], progress=False).__dict__)
            pred = out / f"vote-{name}.h5"
            st.run(f"vote-{name}", lambda k=k, pred=pred, out=out: vote_predictions(out / "real.h5", k, pred))
            s = score_predictions(out / "real.h5", pred, test_rows, cat)
            rows.append((cat, name, spec, s, st.times.get(f"knowledge-{name}", time.perf_counter() - t0), rep))
    print("\n| category | teacher | mIoU face (one) | mIoU face (skip) | mIoU area (one) | mIoU points (one) | "
          "points covered | test shapes | extract s/shape |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cat, name, spec, s, secs, rep in rows:
        per = sum(rep["seconds_per_shape"].values()) if isinstance(rep, dict) and rep.get("seconds_per_shape") else float("nan")
        print(f"| {cat} | {name} (`{spec.split(':')[0]}`) | {100 * s['face_one']:.1f} | {100 * s['face_skip']:.1f} | "
              f"{100 * s['area_one']:.1f} | {100 * s['point_one']:.1f} | {100 * s['coverage']:.1f}% | {s['shapes']} | "
              f"{per:.2f} |")
    (args.out / "summary.json").write_text(json.dumps(
        [{"category": c, "teacher": n, "spec": sp, **{k: v for k, v in s.items() if k != 'mapping'}}
         for c, n, sp, s, _, _ in rows], indent=2, default=float))


if __name__ == "__main__":
    main()
