"""RESULTS.md: the tables of the end-to-end experiments, written by the experiment commands.

Each experiment owns one section of the file, between ``<!-- experiment:NAME -->`` and
``<!-- /experiment:NAME -->``; :func:`update_results_md` replaces that section (or appends it) and
leaves the rest of the file alone, so the chair and airplane commands can run in any order. The
file is written to a temporary name and renamed.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import numpy as np

HEADER = """# Results

Written by `pdeval experiment` (eval/experiment.py); do not edit by hand. Every number below was
measured by the command named in its section, on the hardware stated there. mIoU in %, on the
Labeled-PSB *test* meshes of the category (10 per category), per face after transferring point
predictions by a vote of the 5 nearest points (PartDistill §4.2). Two conventions: **one** = a part
absent from both ground truth and prediction counts as IoU 1 (PointCLIP v2 / PartDistill);
**skip** = only parts present in either are averaged. Distillation rows give mean ± std over seeds.
"""

# PartDistill (Umam et al., CVPR 2024): Table 4, COSEG chair; Table 5, ShapeNetPart airplane.
PAPER = {"table4_coseg_chair": {"train set": 96.4, "generated": 96.1, "train + generated": 97.4},
         "table5_airplane": {"voting": 40.2, "pre_bd": 69.3}}


def _fmt(values: list[float | None]) -> str:
    vals = [100 * v for v in values if v is not None and not np.isnan(v)]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{np.mean(vals):.1f} ± {np.std(vals):.1f}"


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(vals)) if vals else None


def _generator(generate: dict[str, Any]) -> str:
    """Which checkpoint made the generated shapes: "shipped checkpoint" or the configured folder,
    with the weight hash(es) and training steps when the experiment recorded them."""
    name = f"checkpoint `{generate['checkpoint']}`" if generate.get("checkpoint") else "shipped checkpoint"
    digests = generate.get("checkpoint_sha256") or []
    steps = generate.get("checkpoint_steps") or [None] * len(digests)
    made = [f"weights {d}" + (f", {s} training steps" if s is not None else "") for d, s in zip(digests, steps)]
    return "; ".join([name, *made])


def _sampler(generate: dict[str, Any]) -> str:
    """The sampler(s) that made the generated shapes, "<scheduler>-<steps>": from their provenance
    when recorded, else from the experiment config (results written before 2026-11-22, whose
    configs all said ddim when no scheduler was given)."""
    if generate.get("samplers"):
        return ", ".join(generate["samplers"])
    return f"{generate.get('scheduler', 'ddim')}-{generate.get('steps', 50)}"


def section(summary: dict[str, Any]) -> str:
    """The Markdown section of one experiment's ``results.json``."""
    name, cat = summary["name"], summary["category"]
    hw = summary["hardware"]
    quick = " (**quick variant**: tiny sizes for CI; these numbers say the pipeline runs, not how well it works)" \
        if summary.get("quick") else ""
    lines = [f"## {name}{quick}", "",
             f"Command: `pdeval experiment {summary['config']}{' --quick' if summary.get('quick') else ''}`; "
             f"hardware: {hw['cores']} CPU cores{', GPU ' + hw['gpu'] if hw.get('gpu') else ', no GPU'}, torch {hw['torch']}; "
             f"total stage time {summary['wall_seconds'] / 60:.1f} min.",
             f"Data: {summary['generate']['n']} generated {cat}s ({_generator(summary['generate'])}, "
             f"{_sampler(summary['generate'])}), Labeled-PSB {cat}s "
             f"({summary['counts']['real_train']} train, {summary['counts']['test']} test). "
             f"Distillation: {summary['distill']['epochs']} epochs, seeds per row in the `seeds` column (a single seed "
             f"where three did not fit the CPU time), student config "
             f"`{summary['distill']['student']}`.", ""]
    if summary.get("reused"):
        lines += ["Stages made by an earlier command on the same inputs (their time is the earlier run's): "
                  + "; ".join(f"`{k}`: {v}" for k, v in summary["reused"].items()) + ".", ""]
    teachers = summary["teachers"]
    lines += ["Teachers: " + "; ".join(
        f"**{t}** = " + (f"8-shot network fitted on {'Labeled-PSB train' if v.get('fit_on') == 'real' else 'procedural'} {cat}s"
                         if v["kind"] == "fewshot" else f"`{v['spec']}` (simulated from ground truth, controlled corruption)")
        for t, v in teachers.items()) + ".", ""]
    has_coseg = any(x.get("coseg") for r in summary["results"].values() for x in r["runs"])
    if has_coseg:
        lines += [f"COSEG: every Pre student applied to {summary['coseg']['shapes']} COSEG {cat}s "
                  f"(`--coseg {summary['coseg']['root']}`), scored per face like the Labeled-PSB meshes.", ""]
    lines += ["| row | teacher | trained on | seeds | mIoU face (one) | mIoU face (skip) | mIoU area (one) | mIoU points (one) "
              + ("| COSEG face (one / skip) " if has_coseg else "")
              + "| 2D mIoU before → after BD | BD epoch | time |",
              "|---|---|---|---|---|---|---|---|" + ("---|" if has_coseg else "") + "---|---|---|"]
    for rid, r in summary["results"].items():
        runs = r["runs"]
        two_d = [x.get("miou_2d") for x in runs if x.get("miou_2d")]
        td = "–"
        if two_d:
            td = f"{_fmt([d['before'] for d in two_d])} → {_fmt([d['after'] for d in two_d])}"
        trig = [x.get("trigger_epoch") for x in runs if x.get("trigger_epoch") is not None]
        secs = np.mean([x["seconds"] for x in runs])
        co = ""
        if has_coseg:
            cs = [x["coseg"] for x in runs if x.get("coseg")]
            co = f"{_fmt([c['face_one'] for c in cs])} / {_fmt([c['face_skip'] for c in cs])} | " if cs else "– | "
        lines.append(f"| {r['row']} | {r['teacher']} | {runs[0]['train_set']} | {len(runs)} | {_fmt([x['face_one'] for x in runs])} | "
                     f"{_fmt([x['face_skip'] for x in runs])} | {_fmt([x['area_one'] for x in runs])} | "
                     f"{_fmt([x['point_one'] for x in runs])} | {co}{td} | {','.join(map(str, trig)) or '–'} | "
                     f"{secs / 60:.1f} min |")
    if summary.get("out"):
        lines += ["", f"Pictures: `{summary['out']}/rows/<row>-<teacher>-s<seed>/sheet.png` shows 6 test shapes per "
                  "row, ground truth beside prediction (points coloured by part)."]
    lines += ["", discussion(summary), ""]
    return "\n".join(lines)


def discussion(summary: dict[str, Any]) -> str:
    """A paragraph comparing this experiment's rows with each other and with the paper's Tables 4-5,
    computed from the numbers (not written by hand)."""
    res = summary["results"]

    def get(row: str, teacher: str, coseg: bool = False) -> float | None:
        r = res.get(f"{row}|{teacher}")
        if not r:
            return None
        return _mean([x["coseg"]["face_one"] for x in r["runs"] if x.get("coseg")] if coseg
                     else [x["face_one"] for x in r["runs"]])

    sentences = []
    teachers = sorted({r["teacher"] for r in res.values()})
    for t in teachers:
        vote, pre, bd = get("voting", t), get("pre", t), get("pre_bd", t)
        gen, both, real = get("pre_bd_generated", t), get("pre_bd", t), get("pre_bd_real", t)
        parts = []
        if vote is not None and bd is not None:
            parts.append(f"Pre + BD {'beats' if bd > vote else 'does not beat'} direct voting "
                         f"({100 * bd:.1f} vs {100 * vote:.1f}; the paper's airplane Table 5: "
                         f"{PAPER['table5_airplane']['pre_bd']} vs {PAPER['table5_airplane']['voting']})")
        if pre is not None and bd is not None:
            parts.append(f"backward distillation {'raises' if bd > pre else 'does not raise'} mIoU over Pre alone "
                         f"({100 * bd:.1f} vs {100 * pre:.1f})")
        if gen is not None and both is not None and real is not None:
            parts.append(f"training on generated + real gives {100 * both:.1f}, generated only {100 * gen:.1f}, "
                         f"real train only {100 * real:.1f} (paper, COSEG chair Table 4: "
                         f"{PAPER['table4_coseg_chair']['train + generated']} / {PAPER['table4_coseg_chair']['generated']} / "
                         f"{PAPER['table4_coseg_chair']['train set']})")
        tta, refine = get("tta", t), get("pre_bd_refine", t)
        if tta is not None and vote is not None:
            parts.append(f"test-time adaptation (a head fitted on each test shape's own units) gives {100 * tta:.1f} "
                         f"against voting's {100 * vote:.1f}")
        if refine is not None and bd is not None:
            parts.append(f"intra-set refinement of the knowledge {'raises' if refine > bd else 'does not raise'} "
                         f"Pre + BD ({100 * refine:.1f} vs {100 * bd:.1f})")
        part = get("pre_bd_part", t)
        if part is not None and bd is not None:
            parts.append(f"per-part normalised re-scoring (`backward.normalize: part`, ours) "
                         f"{'raises' if part > bd else 'does not raise'} Pre + BD ({100 * part:.1f} vs {100 * bd:.1f})")
        main = res.get(f"pre_bd|{t}")
        two_d = [x["miou_2d"] for x in main["runs"] if x.get("miou_2d") and x["miou_2d"].get("after") is not None] \
            if main else []
        if two_d:
            b, a = _mean([d["before"] for d in two_d]), _mean([d["after"] for d in two_d])
            parts.append(f"re-scoring the units with the student (BD) moves the confidence-weighted 2D mIoU of the "
                         f"labelled training shapes' knowledge from {100 * b:.1f} to {100 * a:.1f}"
                         + (" (the student's agreement tracks the units' correctness)" if a > b else
                            " (the student's agreement down-weights correct units too)"))
        if main and len(main["runs"]) > 1:
            vals = [100 * x["face_one"] for x in main["runs"]]
            parts.append(f"over {len(vals)} seeds Pre + BD ranges {min(vals):.1f}-{max(vals):.1f}")
        cgen, cboth, creal = (get(n, t, coseg=True) for n in ("pre_bd_generated", "pre_bd", "pre_bd_real"))
        if cgen is not None and cboth is not None and creal is not None:
            parts.append(f"on COSEG, generated + real gives {100 * cboth:.1f}, generated only {100 * cgen:.1f}, "
                         f"real train only {100 * creal:.1f} (paper Table 4: "
                         f"{PAPER['table4_coseg_chair']['train + generated']} / {PAPER['table4_coseg_chair']['generated']} / "
                         f"{PAPER['table4_coseg_chair']['train set']})")
        if parts:
            sentences.append(f"With the **{t}** teacher, " + "; ".join(parts) + ".")
    if not summary.get("quick"):
        best = max(((get(r["row"], r["teacher"]), r["row"], r["teacher"]) for r in res.values() if not r["simulated"]
                    and get(r["row"], r["teacher"]) is not None), default=None)
        if best:
            sentences.append(f"The best row with a real teacher (not simulated from ground truth) is **{best[1]}** with "
                             f"**{best[2]}** ({100 * best[0]:.1f} mIoU per face).")
    caveats = ("Why numbers differ from the paper: the teachers here are an 8-shot 2D network trained from scratch "
               "on renders (no pretrained GLIP / CLIP weights are available on this machine) and a simulated teacher; "
               "the Labeled-PSB test sets have 10 shapes per category with a different part vocabulary than "
               "ShapeNetPart/COSEG (parts the dataset does not label are not scored); the student is the CPU-size "
               "Point-M2AE configuration with an encoder pretrained here on a few hundred shapes, not the official "
               "ShapeNet-pretrained one; the generator is a short CPU training (see the README).")
    if summary.get("quick"):
        caveats = ("This is the quick variant (a handful of shapes, epochs and steps): it checks that every stage "
                   "runs and is scored; its numbers are not evidence about the method. " + caveats)
    return " ".join(sentences + [caveats])


def update_results_md(path: str | os.PathLike, summary: dict[str, Any]) -> Path:
    """Replace (or add) the experiment's section of ``path`` (see the module docstring)."""
    path = Path(path)
    text = path.read_text() if path.exists() else HEADER
    name = summary["name"]
    begin, end = f"<!-- experiment:{name} -->", f"<!-- /experiment:{name} -->"
    block = f"{begin}\n{section(summary)}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path
