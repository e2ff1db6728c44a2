"""Pre and Pre + backward distillation on Labeled-PSB + procedural shapes, against direct voting.

Two uses (issue "Student and trainer"):

* item 8, evidence with the simulated teacher (the default ``--teacher``);
* "Done when", the few-shot teacher's knowledge on Labeled-PSB pooled with 1000 procedural shapes::

    python benchmarks/distill_evidence.py --out runs/fewshot_pre --procedural 1000 \
        --teacher "fewshot:runs/voting/{category}/teacher" --image-size 224 --rows pre_bd pre

  (the teachers fitted by ``benchmarks/voting_baseline.py``; ``{category}`` is replaced per category).

A simulated teacher (ground-truth label maps with controlled corruption: parts missed / relabelled
with probability ``p_miss`` / ``p_wrong``, confidences independent of correctness) gives knowledge
units whose corruption is known. For each category:

1. collection = Labeled-PSB meshes of the category (10 train, 10 test) + ``--procedural`` procedural
   shapes (train) + ``--procedural-test`` procedural shapes (test);
2. knowledge for every shape (``distill extract``), encoder pretraining on the train shapes;
3. Pre without and with backward distillation on the *train* shapes' knowledge;
4. reported on the *test* shapes (Labeled-PSB meshes per face, procedural shapes per point): direct
   voting vs the students; and the ROC AUC of the re-scored confidences (Eq. 4) for telling clean
   from corrupted units of the training knowledge.

    python benchmarks/distill_evidence.py --out runs/simulated [--categories chair airplane]

Numbers depend on procedural shapes (they fill the bulk-data role here); the output says so.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/simulated", type=Path)
    ap.add_argument("--categories", nargs="+", default=["chair", "airplane"])
    ap.add_argument("--procedural", type=int, default=150, help="procedural train shapes per category")
    ap.add_argument("--procedural-test", type=int, default=20, help="procedural test shapes per category")
    ap.add_argument("--teacher", default="simulated:pixel:p_miss=0.2:p_wrong=0.2",
                    help="teacher spec; {category} is replaced by the category")
    ap.add_argument("--rows", nargs="+", default=["pre", "pre_bd"], choices=["pre", "pre_bd", "pre_bd_part"],
                    help="students to train, in this order (pre_bd_part: backward distillation with "
                         "backward.normalize: part, distill/backward.py)")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--pretrain-steps", type=int, default=300)
    ap.add_argument("--views", type=int, default=10)
    ap.add_argument("--image-size", type=int, default=160)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from distill.backward import roc_auc
    from distill.extract import ExtractSettings, extract, shape_key
    from distill.predict import predict, vote_predictions
    from distill.pretrain import load_pretrain_config, pretrain
    from distill.trainer import load_config, train_distill
    from eval.experiment import Stages, score_predictions, subset_knowledge
    from gen3d.collection import Collection
    from gen3d.pool import PoolSettings, pool

    table = []
    for cat in args.categories:
        out = args.out / cat
        st = Stages(out, print)
        data = out / "shapes.h5"
        st.run("pool", lambda cat=cat, data=data: pool(data, [
            f"labeled-psb:{cat}", f"procedural:{cat}:{args.procedural}:seed=11",
            f"procedural:{cat}:{args.procedural_test}:seed=12:split=test"], PoolSettings()).total)
        with Collection(data) as c:
            keys = [shape_key(c, i) for i in range(len(c))]
            train_keys = {k for i, k in enumerate(keys) if c.splits[i] != "test"}
            test_psb = [i for i in range(len(c)) if c.splits[i] == "test" and c.sources[i] == "real"]
            test_proc = [i for i in range(len(c)) if c.splits[i] == "test" and c.sources[i] == "procedural"]
        settings = ExtractSettings(num_views=args.views, image_size=args.image_size)
        k_all = out / "knowledge.h5"
        st.run("knowledge", lambda data=data, k_all=k_all, cat=cat, settings=settings: extract(
            data, [args.teacher.format(category=cat)], k_all, settings, cat, progress=False).units)
        st.run("knowledge-train", lambda k_all=k_all, out=out, tk=train_keys: subset_knowledge(k_all, out / "k-train.h5", tk))
        pcfg = load_pretrain_config("configs/distill/pretrain_small.yaml")
        pcfg["train"]["steps"] = args.pretrain_steps
        st.run("pretrain", lambda data=data, out=out, cat=cat, pcfg=pcfg: pretrain(
            [data], out / "encoder", pcfg, category=cat, progress=False,
            resume=(out / "encoder" / "log.jsonl").exists()).get("steps"))
        st.run("vote", lambda data=data, k_all=k_all, out=out: vote_predictions(data, k_all, out / "vote.h5"))
        res = {"vote": out / "vote.h5"}
        train_seconds: dict[str, float | None] = {}
        aucs = {}
        for name in args.rows:
            bd = name.startswith("pre_bd")
            run = out / name

            def train(run=run, bd=bd, data=data, out=out, name=name):
                c = load_config("configs/distill/pre.yaml")
                c["model"].update({"config": "configs/distill/student_small.yaml",
                                   "encoder": str(out / "encoder" / "encoder")})
                c["train"]["epochs"] = args.epochs
                c["backward"]["enabled"] = bd
                if name == "pre_bd_part":
                    c["backward"]["normalize"] = "part"
                info = train_distill(data, out / "k-train.h5", c, run, resume=(run / "log.jsonl").exists(), progress=False)
                predict(run, data, out / f"{run.name}.h5")
                return {"seconds": info["timings"]["wall_seconds"]}

            info = st.run(f"train-{name}", train)
            train_seconds[name] = info.get("seconds") if isinstance(info, dict) else None
            res[name] = out / f"{name}.h5"
            z = np.load(run / "confidences.npz", allow_pickle=False)
            corrupted = z["corrupted"]
            known = corrupted >= 0
            for which in ("initial", "final"):
                s = z[which]
                ok = known & np.isfinite(s)
                aucs[f"{name}-{which}"] = roc_auc(s[ok], corrupted[ok] == 0)
        for row, pred in res.items():
            s_psb = score_predictions(data, pred, test_psb, cat)
            s_proc = score_predictions(data, pred, test_proc, cat)
            table.append({"category": cat, "row": row, "psb_face_one": s_psb["face_one"], "psb_face_skip": s_psb["face_skip"],
                          "proc_point_one": s_proc["point_one"], "proc_point_skip": s_proc["point_skip"],
                          "coverage_psb": s_psb["coverage"],
                          "auc_initial": aucs.get(f"{row}-initial"), "auc_final": aucs.get(f"{row}-final"),
                          "trigger": _trigger(out / row / "log.jsonl") if row != "vote" else None,
                          "seconds": train_seconds.get(row), "stage_seconds": st.times.get(f"train-{row}")})
    print(f"\nTeacher `{args.teacher}`; students: Pre, {args.epochs} epochs, CPU-size Point-M2AE student "
          f"(encoder pretrained {args.pretrain_steps} steps here); training knowledge: Labeled-PSB train + "
          f"{args.procedural} procedural shapes per category. Test: 10 Labeled-PSB test meshes (per face) and "
          f"{args.procedural_test} procedural test shapes (per point). mIoU in %.\n")
    print("| category | row | Labeled-PSB face mIoU (one / skip) | procedural point mIoU (one / skip) | "
          "ROC AUC of C_n, initial → re-scored | BD epoch | `distill train` time |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        auc = ("–" if r["auc_final"] is None or not np.isfinite(r["auc_final"])
               else f"{r['auc_initial']:.2f} → {r['auc_final']:.2f}")
        secs = "–" if not r["seconds"] else f"{r['seconds'] / 60:.1f} min"
        print(f"| {r['category']} | {r['row']} | {100 * r['psb_face_one']:.1f} / {100 * r['psb_face_skip']:.1f} | "
              f"{100 * r['proc_point_one']:.1f} / {100 * r['proc_point_skip']:.1f} | {auc} | {r['trigger'] or '–'} | {secs} |")
    (args.out / "summary.json").write_text(json.dumps(table, indent=2, default=float))


def _trigger(log: Path):
    if not log.exists():
        return None
    for line in log.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            if rec.get("trigger_epoch") is not None:
                return rec["trigger_epoch"]
    return None


if __name__ == "__main__":
    main()
