"""End-to-end experiments: generate, pool, teach, distil, evaluate on Labeled-PSB meshes; write RESULTS.md.

One command per category (``pdeval experiment configs/experiments/chair.yaml``), config-driven, every
stage cached under the output folder with the settings and inputs that made it, so that a re-run
resumes and a changed config is never answered from a stale cache (:class:`Stages`):

1. ``generated.h5``: ``n`` shapes from the shipped DiT-3D generator, with DPSR meshes (:mod:`gen3d.sample`).
2. ``real.h5``: the category's Labeled-PSB meshes (train and test split of ``gen3d/data/psb.yaml``).
3. ``shots.h5``: procedural labelled shapes for the second few-shot teacher.
4. ``all.h5``: generated + real pooled.
5. ``teachers/``: the 8-shot teacher fitted on Labeled-PSB *train* shapes (never evaluation shapes)
   and, separately, on procedural shapes (:mod:`distill.teacher_fit`).
6. ``knowledge/``: knowledge units of every shape for every teacher (+ one refined variant), then
   subsets per training set: generated + real train, generated only, real train only, test.
7. ``encoder/``: Point-M2AE pretraining on the unlabelled train shapes (never test shapes).
8. rows: teacher voting, TTA, Pre, Pre + BD (real / generated / both), Pre + BD with intra-set
   refinement; a ``pre`` row's ``backward_options`` override the distillation config's ``backward``
   section (e.g. ``{normalize: part}``, :func:`distill.backward.normalize_per_part`); each distillation
   row for each seed (``distill.seeds``, or the row's own ``seeds``); predictions on the Labeled-PSB *test* meshes,
   scored per face (5-NN vote) under both mIoU conventions, 2D mIoU before / after BD; a PNG per
   row and seed (``rows/<row>-<teacher>-s<seed>/sheet.png``: 6 test shapes, ground truth beside prediction).
   With ``coseg=ROOT``: the COSEG sets under ROOT pooled into ``coseg-<hash>.h5`` and every Pre row's
   student applied to the category's COSEG shapes, scored per face the same way (Table 4 setting).
9. ``results.json`` and this experiment's section of ``RESULTS.md``.

Nothing is selected on test data: epochs are fixed by the config and the last epoch is used.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

ROW_KINDS = ("vote", "tta", "pre")


# ----------------------------------------------------------------------------------------------
# config
# ----------------------------------------------------------------------------------------------
def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (over or {}).items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def load_experiment(path: str | os.PathLike, quick: bool = False) -> dict[str, Any]:
    """Read an experiment YAML (``configs/experiments/*.yaml``); ``quick`` merges its ``quick:`` section.

    Raises:
        FileNotFoundError; ValueError for a missing key or an unknown row kind / teacher.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such experiment config")
    cfg = yaml.safe_load(path.read_text()) or {}
    for key in ("name", "category", "generate", "real", "teachers", "rows", "distill", "extract", "pretrain"):
        if key not in cfg:
            raise ValueError(f"{path}: missing key {key!r}")
    quick_cfg = cfg.pop("quick", {}) or {}
    if quick:
        cfg = _merge(cfg, quick_cfg)
        cfg["name"] = f"{cfg['name']}-quick"
    cfg["quick"] = quick
    cfg["teachers"] = {k: v for k, v in cfg["teachers"].items() if v}  # quick: null drops a teacher
    for row in cfg["rows"]:
        if row.get("kind") not in ROW_KINDS:
            raise ValueError(f"{path}: row {row.get('name')!r} has kind {row.get('kind')!r}; known: {ROW_KINDS}")
        if row.get("backward_options") is not None:
            _check_backward_options(path, row)
        for t in row.get("teachers", []):
            if t not in cfg["teachers"]:
                raise ValueError(f"{path}: row {row['name']!r} names teacher {t!r}, not in teachers: {list(cfg['teachers'])}")
    return cfg


def _check_backward_options(path: Path, row: dict[str, Any]) -> None:
    """A row's ``backward_options``: a mapping of known ``backward`` keys, on a ``pre`` row (ValueError)."""
    from distill.trainer import resolve_config

    opts = row["backward_options"]
    if row["kind"] != "pre" or not isinstance(opts, dict):
        raise ValueError(f"{path}: row {row['name']!r}: backward_options must be a mapping, on a 'pre' row")
    try:
        resolve_config({"backward": opts})
    except ValueError as exc:
        raise ValueError(f"{path}: row {row['name']!r}: backward_options: {exc}") from exc


# ----------------------------------------------------------------------------------------------
# stages
# ----------------------------------------------------------------------------------------------
class StaleStageError(ValueError):
    """A cached stage was made with other settings (or from other inputs) than the current ones."""


class Stages:
    """Runs named stages once: a stage is done when its marker ``.done/<name>.json`` exists and was
    made with the same settings from the same inputs.

    Each stage states the ``settings`` that decide its output (JSON-able: config sections, resolved
    paths, weight hashes) and the stages it reads (``after``); its fingerprint, the SHA-256 of both
    (an input stage by its own fingerprint), is kept in the marker. A marker with another fingerprint
    is stale: by default :class:`StaleStageError` names the settings that changed (or the input
    stage) and the stage's outputs; with ``redo_stale`` the stage's ``outputs`` are deleted and it
    runs again, and so, through their fingerprints, do the stages that read it.

    A marker may be written by hand for a stage whose output was made by an earlier command on the
    same inputs (e.g. a teacher fitted by ``benchmarks/voting_baseline.py``): its ``result`` then carries
    ``reused_from`` (a sentence naming the command), which lands in ``results.json`` under ``reused``
    and in RESULTS.md. A marker without a fingerprint (hand-written, or from before fingerprints) is
    taken as it is.
    """

    def __init__(self, out: Path, log: Callable[[str], None], redo_stale: bool = False):
        self.out, self.log, self.redo_stale = out, log, redo_stale
        (out / ".done").mkdir(parents=True, exist_ok=True)
        self.times: dict[str, float] = {}
        self.reused: dict[str, str] = {}
        self.fingerprints: dict[str, str] = {}

    def run(self, name: str, fn: Callable[[], Any], settings: dict[str, Any] | None = None,
            after: tuple[str, ...] | list[str] = (), outputs: tuple[Path, ...] | list[Path] = ()) -> Any:
        """Return the cached result of stage ``name``, or run ``fn()`` and cache its (JSON-able) result.

        Raises:
            StaleStageError: the marker's settings or inputs differ and ``redo_stale`` is off.
            KeyError: a stage in ``after`` has not been run in this session.
        """
        marker = self.out / ".done" / f"{name.replace('/', '_')}.json"
        recorded = json.loads(json.dumps(settings or {}, sort_keys=True, default=_json))
        inputs = {a: self.fingerprints[a] for a in after}
        fingerprint = hashlib.sha256(json.dumps([recorded, inputs], sort_keys=True).encode()).hexdigest()[:16]
        if marker.exists():
            info = json.loads(marker.read_text())
            if info.get("fingerprint", fingerprint) == fingerprint:
                self.fingerprints[name] = fingerprint
                self.times[name] = info["seconds"]
                if isinstance(info["result"], dict) and info["result"].get("reused_from"):
                    self.reused[name] = info["result"]["reused_from"]
                self.log(f"[cached] {name}")
                return info["result"]
            why = _changes(info.get("settings", {}), recorded, info.get("after", {}), inputs)
            if not self.redo_stale:
                raise StaleStageError(
                    f"{marker}: stage {name!r} was made with other settings ({why}); its outputs "
                    f"({', '.join(str(o) for o in outputs) or 'none besides the marker'}) are out of date. "
                    f"Re-run with --redo-stale to make it and the stages after it again, or use another --out.")
            self.log(f"[stale] {name}: {why}; making it again")
            for o in map(Path, outputs):
                if o.is_dir():
                    shutil.rmtree(o)
                else:
                    o.unlink(missing_ok=True)
            marker.unlink()
        self.log(f"[stage] {name} ...")
        t0 = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - t0
        self.times[name] = seconds
        self.fingerprints[name] = fingerprint
        tmp = marker.with_suffix(".tmp")
        tmp.write_text(json.dumps({"seconds": seconds, "result": result, "fingerprint": fingerprint,
                                   "settings": recorded, "after": inputs}, default=_json))
        os.replace(tmp, marker)
        self.log(f"[done] {name} in {seconds:.1f} s")
        return result


def _file_digests(*paths: str | os.PathLike | None) -> dict[str, str | None]:
    """``{path: first 16 hex digits of the SHA-256 of its content}`` (None: no such file), so that a
    stage reading a config file is stale when the file changes, not only when its path does."""
    return {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16] if Path(p).is_file() else None
            for p in paths if p}


def _changes(old: dict[str, Any], new: dict[str, Any], old_after: dict[str, str], new_after: dict[str, str]) -> str:
    """What differs between two stage fingerprints, for a message: ``"generate.steps: 50 -> 25"``,
    ``"input stage 'pool' changed"``."""
    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(d, dict) and d:
            return {k: v for key, val in d.items() for k, v in flat(val, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): d}

    a, b = flat(old), flat(new)
    parts = [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(a.keys() | b.keys())
             if a.get(k, "(unset)") != b.get(k, "(unset)")]
    parts += [f"input stage {k!r} changed" for k in sorted(old_after.keys() | new_after.keys())
              if old_after.get(k) != new_after.get(k)]
    return "; ".join(parts) or "unknown change"


def generator_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """Which generator made the generated shapes of a collection, from their provenance.

    Returns:
        ``{"checkpoint_sha256": [...], "checkpoint_steps": [...], "samplers": [...]}``: the distinct
        weight hashes (:func:`gen3d.sample.checkpoint_hash`) in order of first use, the training steps
        in each checkpoint's ``training.json`` where the recorded folder still holds those same weights
        (None otherwise, e.g. after a shipped checkpoint was replaced), and the distinct samplers as
        ``"<scheduler>-<steps>"``, with ``" from t=<first_timestep>"`` where one was given (what made the shapes, even if the config changed since a cached
        ``generate`` stage).
    """
    from gen3d.collection import Collection
    from gen3d.sample import checkpoint_hash, training_info

    digests: dict[str, int | None] = {}
    samplers: dict[str, None] = {}
    with Collection(path) as col:
        for i in col.select(source="generated"):
            prov = col.provenance(int(i))
            digest = prov.get("checkpoint_sha256")
            if digest and digest not in digests:
                folder = Path(prov.get("checkpoint", ""))
                same = (folder / "training.json").is_file() and checkpoint_hash(folder) == digest
                digests[digest] = training_info(folder).get("steps") if same else None
            if prov.get("scheduler"):
                start = f" from t={prov['first_timestep']}" if prov.get("first_timestep") is not None else ""
                samplers[f"{prov['scheduler']}-{prov.get('steps')}{start}"] = None
    return {"checkpoint_sha256": list(digests), "checkpoint_steps": list(digests.values()), "samplers": list(samplers)}


def _json(o):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o))


def subset_knowledge(src: str | os.PathLike, dst: str | os.PathLike, keys: set[tuple[str, str, str]]) -> int:
    """Write the shapes of knowledge file ``src`` whose key is in ``keys`` to ``dst``; returns the count."""
    from distill.knowledge import KnowledgeFile, write_knowledge

    with KnowledgeFile(src) as kf:
        shapes = [(k, kf.units(i), kf.extras(i)) for i, k in enumerate(kf.keys()) if tuple(k) in keys]
        return write_knowledge(dst, shapes, category=kf.category, part_names=list(kf.part_names),
                               teachers=list(kf.teachers), settings=kf.settings, simulated=kf.simulated,
                               overwrite=True)


@dataclass
class ShapeGroups:
    """The shapes of one category in a pooled collection, grouped the way the experiment rows use them.

    Attributes:
        keys: ``generated`` / ``real_train`` / ``test`` / ``labelled_real`` / ``genreal`` (generated +
            real train) -> set of :func:`distill.extract.shape_key` tuples.
        test_rows: collection row indices of the ``test`` shapes, ascending.
        num_parts: number of part names of the category.
    """

    keys: dict[str, set[tuple[str, str, str]]]
    test_rows: list[int]
    num_parts: int


def shape_groups(collection: str | os.PathLike, category: str) -> ShapeGroups:
    """Group ``category``'s shapes of ``collection`` by source and split (one pass over the file).

    Real shapes of split ``test`` are the evaluation shapes; every other real shape is ``real_train``.
    """
    from distill.extract import shape_key
    from gen3d.collection import Collection

    keys: dict[str, set] = {"generated": set(), "real_train": set(), "test": set(), "labelled_real": set()}
    test_rows = []
    with Collection(collection) as c:
        for i in (int(j) for j in c.select(category=category)):
            key = shape_key(c, i)
            src, split = str(c.sources[i]), str(c.splits[i])
            if src == "generated":
                keys["generated"].add(key)
            elif src == "real" and split == "test":
                keys["test"].add(key)
                test_rows.append(i)
            elif src == "real":
                keys["real_train"].add(key)
            if src == "real":
                keys["labelled_real"].add(key)
        num_parts = len(c.part_names[category])
    keys["genreal"] = keys["generated"] | keys["real_train"]
    return ShapeGroups(keys, sorted(test_rows), num_parts)


# ----------------------------------------------------------------------------------------------
# scoring
# ----------------------------------------------------------------------------------------------
def score_predictions(collection: Path, predictions: Path, rows: list[int], category: str,
                      dataset: str = "labeled-psb") -> dict[str, Any]:
    """Per-face (5-NN vote, per-face and area-weighted) and per-point mIoU of a predictions file on
    the labelled meshes ``rows`` of ``collection``, under both conventions.

    Args:
        dataset: ``labeled-psb`` (:meth:`eval.transfer.PartMapping.labeled_psb`) or ``coseg``
            (:meth:`~eval.transfer.PartMapping.coseg` of the set recorded in each shape's provenance).
            Faces predicted as a part the data set does not label (COSEG chairs: ``arm``) count as
            wrong (``unmapped="wrong"``), so every labelled face is scored and a student that predicts
            an unlabelled part everywhere scores 0, not 1. (For Labeled-PSB chairs and airplanes every
            model part is labelled, so the choice does not matter there.)

    Raises:
        ValueError: unknown ``dataset``; COSEG shapes from sets with different part vocabularies.
    """
    from distill.extract import shape_key
    from distill.predict import read_predictions
    from gen3d.collection import Collection

    from .metrics import both_conventions
    from .transfer import PartMapping, mesh_transfer_scores

    if dataset not in ("labeled-psb", "coseg"):
        raise ValueError(f"dataset must be 'labeled-psb' or 'coseg', got {dataset!r}")
    shapes, point_preds, point_items = [], [], []
    with Collection(collection) as c, read_predictions(predictions) as p:
        for i in rows:
            rec = c.record(i)
            labels = p.labels(p.index_of(shape_key(c, i))).astype(np.int64)
            shapes.append(rec)
            point_preds.append(labels)
            point_items.append((rec.category, labels, rec.labels.astype(np.int64), len(rec.part_names)))
        names = c.part_names[category]
    if dataset == "labeled-psb":
        mapping = PartMapping.labeled_psb(category, list(names))
    else:
        maps = {s: PartMapping.coseg(s, list(names)) for s in sorted({str(r.provenance.get("set")) for r in shapes})}
        if len({m.dataset_parts for m in maps.values()}) > 1:
            raise ValueError(f"{collection}: COSEG sets {sorted(maps)} label different parts; score them separately")
        mapping = next(iter(maps.values()))
    faces = mesh_transfer_scores(shapes, point_preds, mapping, unmapped="wrong")
    points = both_conventions(point_items)
    out = {"face_one": faces["per_face"]["one"]["instance_miou"], "face_skip": faces["per_face"]["skip"]["instance_miou"],
           "area_one": faces["area_weighted"]["one"]["instance_miou"],
           "area_skip": faces["area_weighted"]["skip"]["instance_miou"],
           "point_one": points["one"]["instance_miou"], "point_skip": points["skip"]["instance_miou"],
           "coverage": float(np.mean([np.mean(x >= 0) for x in point_preds])), "shapes": len(rows),
           "mapping": faces["mappings"]}
    return out


def knowledge_2d_miou(knowledge: Path, confidences: Path | None = None) -> dict[str, float] | None:
    """Mean over labelled shapes of :func:`eval.metrics.miou_2d` of a knowledge file, with the units'
    own confidences and, given a run's ``confidences.npz``, with the re-scored ones (after BD)."""
    from distill.knowledge import KnowledgeFile

    from .metrics import miou_2d

    final: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    if confidences is not None and Path(confidences).exists():
        z = np.load(confidences, allow_pickle=False)
        keys, offs, index, conf = z["keys"], z["unit_offsets"], z["unit_index"], z["final"]
        for s in range(len(keys)):
            final[tuple(str(x) for x in keys[s])] = (index[offs[s]:offs[s + 1]], conf[offs[s]:offs[s + 1]])
    before, after = [], []
    with KnowledgeFile(knowledge) as kf:
        for i, key in enumerate(kf.keys()):
            ex = kf.extras(i)
            if "gt_label_maps" not in ex:
                continue
            units = kf.units(i)
            before.append(miou_2d(units, ex["pixel_index"], ex["gt_label_maps"], kf.num_parts)["miou"]["one"])
            if tuple(key) in final:
                idx, conf = final[tuple(key)]
                c = units.confidence.astype(np.float64).copy()
                ok = np.isfinite(conf)
                c[idx[ok]] = conf[ok]
                after.append(miou_2d(units, ex["pixel_index"], ex["gt_label_maps"], kf.num_parts,
                                     confidence=c)["miou"]["one"])
    if not before:
        return None
    return {"before": float(np.mean(before)), "after": float(np.mean(after)) if after else None, "shapes": len(before)}


# ----------------------------------------------------------------------------------------------
# the experiment
# ----------------------------------------------------------------------------------------------
def run_experiment(config_path: str | os.PathLike, out: str | os.PathLike | None = None, quick: bool = False,
                   results_md: str | os.PathLike | None = "RESULTS.md", coseg: str | os.PathLike | None = None,
                   log: Callable[[str], None] = print, redo_stale: bool = False) -> dict[str, Any]:
    """Run (or resume) one end-to-end experiment; see the module docstring.

    A stage cached in ``OUT`` is reused only if its settings (config sections, the generator's weight
    hash, the content of the config files it names) and its input stages are unchanged
    (:class:`Stages`); ``redo_stale`` makes a changed stage and those after it again instead of
    raising :class:`StaleStageError`.

    Returns:
        the content of ``OUT/results.json``.
    """
    from distill.extract import ExtractSettings, extract
    from distill.predict import predict, vote_predictions
    from distill.pretrain import load_pretrain_config, pretrain
    from distill.teacher_fit import fit_teacher
    from distill.trainer import build_model, load_config, train_distill
    from gen3d.pool import PoolSettings, pool
    from gen3d.sample import DEFAULT_SCHEDULER, DEFAULT_STEPS, checkpoint_hash, generate_collection, resolve_checkpoint

    from .sheet import comparison_sheet

    cfg = load_experiment(config_path, quick)
    cat = cfg["category"]
    out = Path(out or Path("runs") / "experiments" / cfg["name"])
    out.mkdir(parents=True, exist_ok=True)
    st = Stages(out, log, redo_stale)
    t_start = time.perf_counter()
    g = cfg["generate"]

    gen_settings = {"n": g["n"], "scheduler": g.get("scheduler", DEFAULT_SCHEDULER), "steps": g.get("steps", DEFAULT_STEPS),
                    "seed": g.get("seed", 0), "first_timestep": g.get("first_timestep")}

    def gen():
        generate_collection(cat, g["n"], out / "generated.h5", g.get("checkpoint"), gen_settings["scheduler"],
                            gen_settings["steps"], seed=gen_settings["seed"], mesh=True, progress=False,
                            first_timestep=gen_settings["first_timestep"])
        return {"n": g["n"]}

    weights = checkpoint_hash(resolve_checkpoint(cat, g.get("checkpoint")))
    st.run("generate", gen, {**gen_settings, "weights": weights}, outputs=[out / "generated.h5"])
    st.run("real", lambda: pool(out / "real.h5", [cfg["real"]], PoolSettings(), workers=1).total,
           {"source": cfg["real"]}, outputs=[out / "real.h5"])
    st.run("shots", lambda: pool(out / "shots.h5", [cfg["procedural_shots"]], PoolSettings(), workers=1).total,
           {"source": cfg["procedural_shots"]}, outputs=[out / "shots.h5"])
    st.run("pool", lambda: pool(out / "all.h5", [str(out / "generated.h5"), str(out / "real.h5")],
                                PoolSettings(), workers=1).total, after=["generate", "real"], outputs=[out / "all.h5"])
    sg = shape_groups(out / "all.h5", cat)
    groups, test_rows, num_parts = sg.keys, sg.test_rows, sg.num_parts
    coseg_file, coseg_rows = _coseg_collection(coseg, cat, out, st, log) if coseg else (None, [])

    # teachers
    tf = cfg["teacher_fit"]
    specs: dict[str, str] = {}
    for name, t in cfg["teachers"].items():
        if t["kind"] == "fewshot":
            data = out / ("real.h5" if t["fit_on"] == "real" else "shots.h5")
            st.run(f"teacher/{name}", lambda data=data, name=name: fit_teacher(
                data, cat, out / "teachers" / name, tf["shots"], tf.get("config"), tf.get("seed", 0),
                extra_views=tf.get("extra_views", 20), image_size=cfg["extract"]["image_size"], progress=False),
                {"teacher_fit": tf, "files": _file_digests(tf.get("config")), "image_size": cfg["extract"]["image_size"]},
                after=[data.stem], outputs=[out / "teachers" / name])
            specs[name] = f"fewshot:{out / 'teachers' / name}"
        else:
            specs[name] = t["spec"]

    # knowledge
    ex = cfg["extract"]
    kdir = out / "knowledge"
    subsets = {"genreal": groups["genreal"], "gen": groups["generated"], "real": groups["real_train"],
               "test": groups["test"]}
    refine_teachers = {t for row in cfg["rows"] if row.get("refine") for t in row.get("teachers", [])}
    for name, spec in specs.items():
        simulated = spec.startswith("simulated")
        variants = [("", False)] + ([("-refine", True)] if name in refine_teachers else [])
        for suffix, refine in variants:
            full = kdir / f"{name}{suffix}.h5"
            settings = ExtractSettings(num_views=ex["views"], image_size=ex["image_size"], refine=refine)
            # the simulated teacher needs labels: real shapes only
            st.run(f"knowledge/{name}{suffix}", lambda full=full, spec=spec, settings=settings, simulated=simulated: extract(
                out / ("real.h5" if simulated else "all.h5"), [spec], full, settings, cat, None,
                cache_dir=kdir / "cache", progress=False).units,
                {"spec": spec, "extract": ex, "refine": refine},
                after=["real"] if simulated else ["pool"] + ([f"teacher/{name}"] if spec.startswith("fewshot:") else []),
                outputs=[full, kdir / "cache" / settings.cache_hash([spec])])
            for sub, keys in subsets.items():
                st.run(f"knowledge/{name}{suffix}-{sub}", lambda full=full, sub=sub, keys=keys, suffix=suffix, name=name:
                       subset_knowledge(full, kdir / f"{name}{suffix}-{sub}.h5", keys),
                       after=[f"knowledge/{name}{suffix}", "pool"], outputs=[kdir / f"{name}{suffix}-{sub}.h5"])

    # encoder
    pcfg = load_pretrain_config(cfg["pretrain"]["config"])
    if cfg["pretrain"].get("steps"):
        pcfg["train"]["steps"] = cfg["pretrain"]["steps"]
    st.run("pretrain", lambda: pretrain([out / "all.h5"], out / "encoder", pcfg, category=cat, progress=False,
                                        resume=(out / "encoder" / "log.jsonl").exists()).get("steps"),
           {"pretrain": pcfg}, after=["pool"], outputs=[out / "encoder"])
    encoder = out / "encoder" / "encoder"

    # rows
    dcfg = cfg["distill"]
    results: dict[str, Any] = {}
    for row in cfg["rows"]:
        for tname in row.get("teachers", []):
            simulated = specs[tname].startswith("simulated")
            train_set = row.get("train", "genreal")
            if simulated and train_set in ("gen", "genreal") and row["kind"] == "pre":
                train_set = "real"  # the simulated teacher exists only where labels do
            ksuffix = "-refine" if row.get("refine") else ""
            seeds = row.get("seeds", dcfg["seeds"]) if row["kind"] == "pre" else [0]
            rid = f"{row['name']}|{tname}"
            per_seed = []
            for seed in seeds:
                rdir = out / "rows" / f"{row['name']}-{tname}-s{seed}"

                def run_row(row=row, tname=tname, seed=seed, rdir=rdir, train_set=train_set, ksuffix=ksuffix):
                    t0 = time.perf_counter()
                    rdir.mkdir(parents=True, exist_ok=True)
                    pred = rdir / "pred.h5"
                    extra: dict[str, Any] = {}
                    if row["kind"] == "vote":
                        vote_predictions(out / "all.h5", kdir / f"{tname}{ksuffix}-test.h5", pred)
                    elif row["kind"] == "tta":
                        c = load_config(dcfg["tta_config"])
                        c["model"].update({"config": dcfg["student"], "encoder": str(encoder)})
                        c["tta"]["steps"] = dcfg.get("tta_steps", c["tta"]["steps"])
                        model = build_model(c, num_parts)
                        info = train_distill(out / "all.h5", kdir / f"{tname}{ksuffix}-test.h5", c, rdir / "run",
                                             resume=(rdir / "run").exists(), progress=False, model=model)
                        pred = rdir / "run" / "predictions.h5"
                        extra["seconds_per_shape"] = info.get("seconds_per_shape")
                    else:
                        c = load_config(dcfg["config"])
                        c["model"].update({"config": dcfg["student"], "encoder": str(encoder)})
                        c["train"].update({"epochs": dcfg["epochs"], "seed": seed})
                        c["backward"]["enabled"] = bool(row.get("backward", True))
                        c["backward"].update(row.get("backward_options") or {})
                        kfile = kdir / f"{tname}{ksuffix}-{train_set}.h5"
                        train_distill(out / "all.h5", kfile, c, rdir / "run", resume=(rdir / "run" / "log.jsonl").exists(),
                                      progress=False)
                        predict(rdir / "run", out / "all.h5", pred, rows=test_rows)
                        if row.get("backward", True):
                            extra["miou_2d"] = knowledge_2d_miou(kfile, rdir / "run" / "confidences.npz")
                        log_lines = [json.loads(x) for x in (rdir / "run" / "log.jsonl").read_text().splitlines() if x]
                        trig = [x.get("trigger_epoch") for x in log_lines if x.get("trigger_epoch") is not None]
                        extra["trigger_epoch"] = trig[0] if trig else None
                    scores = score_predictions(out / "all.h5", pred, test_rows, cat)
                    scores.pop("mapping")
                    return {**scores, **extra, "train_set": train_set if row["kind"] == "pre" else "test",
                            "seconds": time.perf_counter() - t0}

                kname = f"knowledge/{tname}{ksuffix}-{train_set if row['kind'] == 'pre' else 'test'}"
                row_settings = {"row": {k: v for k, v in row.items() if k not in ("seeds", "teachers")},
                                "distill": {k: v for k, v in dcfg.items() if k != "seeds"}, "seed": seed, "train_set": train_set,
                                "files": _file_digests(dcfg["config"], dcfg["tta_config"], dcfg["student"])}
                per_seed.append(st.run(f"row/{row['name']}/{tname}/s{seed}", run_row, row_settings,
                                       after=["pool", kname] + (["pretrain"] if row["kind"] != "vote" else []),
                                       outputs=[rdir]))
                pred_file = rdir / ("run/predictions.h5" if row["kind"] == "tta" else "pred.h5")
                if pred_file.exists() and not (rdir / "sheet.png").exists():
                    comparison_sheet(out / "all.h5", pred_file, rdir / "sheet.png", count=6, rows=test_rows)
                if coseg_rows and row["kind"] == "pre":
                    def run_coseg(rdir=rdir):
                        pred = rdir / f"{coseg_file.stem}-pred.h5"
                        predict(rdir / "run", coseg_file, pred, rows=coseg_rows)
                        scores = score_predictions(coseg_file, pred, coseg_rows, cat, dataset="coseg")
                        scores.pop("mapping")
                        return scores

                    per_seed[-1] = {**per_seed[-1], "coseg": st.run(
                        f"{coseg_file.stem}/{row['name']}/{tname}/s{seed}", run_coseg,
                        after=[coseg_file.stem, f"row/{row['name']}/{tname}/s{seed}"],
                        outputs=[rdir / f"{coseg_file.stem}-pred.h5"])}
            results[rid] = {"row": row["name"], "kind": row["kind"], "teacher": tname, "spec": specs[tname],
                            "simulated": simulated, "seeds": seeds, "runs": per_seed}
    vote_2d = {t: knowledge_2d_miou(kdir / f"{t}-test.h5") for t in specs}
    summary = {"name": cfg["name"], "category": cat, "out": str(out), "quick": cfg["quick"], "config": str(config_path),
               "results": results, "vote_2d_test": vote_2d, "stage_seconds": st.times,
               "wall_seconds": sum(st.times.values()), "reused": st.reused, "session_seconds": time.perf_counter() - t_start,
               "hardware": hardware(), "counts": {k: len(v) for k, v in groups.items()},
               "generate": {**cfg["generate"], **generator_provenance(out / "generated.h5")},
               "distill": dcfg, "teachers": cfg["teachers"]}
    if coseg:
        summary["coseg"] = {"root": str(coseg), "collection": str(coseg_file), "shapes": len(coseg_rows)}
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2, default=_json))
    os.replace(tmp, out / "results.json")
    if results_md:
        from .report import update_results_md

        update_results_md(results_md, summary)
    return summary


def _coseg_collection(root: str | os.PathLike, category: str, out: Path, st: Stages,
                      log: Callable[[str], None]) -> tuple[Path, list[int]]:
    """Pool the COSEG sets under ``root`` (:mod:`gen3d.readers.coseg`) into ``OUT/coseg-<hash>.h5``
    (the hash of the resolved root, so another ``--coseg`` gets its own file and cache) and return
    it with the rows of ``category``. COSEG shapes are evaluation shapes only: the Pre students,
    trained without them, are applied to them (PartDistill Table 4)."""
    from gen3d.collection import Collection
    from gen3d.pool import PoolSettings, pool

    root = Path(root).resolve()
    path = out / f"coseg-{hashlib.sha1(str(root).encode()).hexdigest()[:8]}.h5"
    st.run(path.stem, lambda: pool(path, [f"coseg:{root}"], PoolSettings(), workers=1).total, {"root": str(root)},
           outputs=[path])
    with Collection(path) as c:
        rows = [int(i) for i in c.select(category=category)]
    if not rows:
        log(f"COSEG at {root}: no {category} set, no COSEG scores")
    return path, rows


def hardware() -> dict[str, Any]:
    """CPU / GPU description of this machine."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version()}
