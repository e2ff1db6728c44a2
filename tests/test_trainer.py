"""The PartDistill trainer on procedural chairs with knowledge units made from the ground truth,
some of them corrupted (wrong label, known flag): training learns, backward distillation scores the
corrupted units below the clean ones, resume reproduces the log, two CPU processes work, TTA and
few-shot run, and predictions (with per-face labels) round-trip.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from distill.backward import rescore
from distill.knowledge import KnowledgeUnits
from distill.predict import load_model, predict, read_predictions
from distill.trainer import (
    DistillDataset,
    load_config,
    resolve_config,
    shape_miou,
    train_distill,
    tta_predict,
)
from gen3d.collection import Collection, write_collection
from gen3d.procedural import generate_many
from gen3d.surface import vote_face_labels

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "distill" / "tiny.yaml"
N_POINTS = 256
R = 4


class TinyPointMLP(ModelMixin, ConfigMixin):
    """Stand-in student: a per-point MLP on xyz, ``[B,N,3] -> [B,N,R]``, with ``encoder`` and ``head``."""

    @register_to_config
    def __init__(self, num_parts: int = 4, hidden: int = 32):
        super().__init__()
        self.encoder = torch.nn.Sequential(torch.nn.Linear(3, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                                           torch.nn.ReLU())
        self.head = torch.nn.Linear(hidden, num_parts)

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(points))


def fresh_model(seed: int = 0) -> TinyPointMLP:
    torch.manual_seed(seed)
    return TinyPointMLP(R, 32)


class OracleModel(torch.nn.Module):
    """Logits = one-hot of the label of the nearest reference point; records how it was called."""

    def __init__(self, points: torch.Tensor, labels: torch.Tensor):
        super().__init__()
        self.register_buffer("ref", points.reshape(-1, 3))
        self.register_buffer("lab", labels.reshape(-1))
        self.dummy = torch.nn.Parameter(torch.zeros(()))
        self.calls: list[tuple[bool, bool]] = []

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled()))
        nearest = torch.cdist(points.reshape(-1, 3), self.ref).argmin(1)
        onehot = torch.nn.functional.one_hot(self.lab[nearest].clamp(min=0), R).float()
        return (onehot * 10 + self.dummy).reshape(*points.shape[:2], R)


class MemoryKnowledge:
    """In-memory stand-in for a knowledge file."""

    def __init__(self, keys, units, category="chair", part_names=("back", "seat", "leg", "arm")):
        self._keys, self._units = list(keys), list(units)
        self.category, self.part_names, self.teachers, self.simulated = category, tuple(part_names), ("gt",), True

    def __len__(self):
        return len(self._keys)

    def keys(self):
        return list(self._keys)

    def units(self, i):
        return self._units[i]


def gt_units(labels: np.ndarray, rng: np.random.Generator, n_units: int = 14, corrupt: float = 0.3) -> KnowledgeUnits:
    """Units of one shape: each a random 30-70 % of one part's points, labelled with that part or,
    with probability ``corrupt``, with another part present in the shape (``corrupted = 1``)."""
    present = np.unique(labels[labels >= 0])
    masks, probs, flags = [], [], []
    for _ in range(n_units):
        part = rng.choice(present)
        pts = np.flatnonzero(labels == part)
        masks.append(np.sort(rng.choice(pts, max(3, int(len(pts) * rng.uniform(0.3, 0.7))), replace=False)))
        bad = rng.random() < corrupt and len(present) > 1
        label = rng.choice(present[present != part]) if bad else part
        c = rng.uniform(0.55, 0.95)
        y = np.full(R, (1 - c) / (R - 1))
        y[label] = c
        probs.append(y)
        flags.append(int(bad))
    sizes = [len(m) for m in masks]
    up = np.asarray(probs, np.float32)
    return KnowledgeUnits(offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64),
                          point_index=np.concatenate(masks).astype(np.int64),
                          point_probs=np.repeat(up, sizes, axis=0), unit_probs=up,
                          confidence=up.max(1), view=np.zeros(n_units, np.int16), teacher=np.zeros(n_units, np.int16),
                          corrupted=np.asarray(flags, np.int8))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The CPU is shared: one intra-op thread avoids spinning thread pools (100x slower tiny steps)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """12 train chairs with knowledge, 3 val chairs (labelled, one without a mesh), 2 test chairs with knowledge."""
    root = tmp_path_factory.mktemp("distill")
    records = list(generate_many("chair", 12, num_points=N_POINTS))
    records += list(generate_many("chair", 3, num_points=N_POINTS, split="val", start=12))
    records += list(generate_many("chair", 2, num_points=N_POINTS, split="test", start=15))
    records[12].mesh_vertices = records[12].mesh_faces = records[12].face_labels = None
    path = root / "chairs.h5"
    write_collection(path, records)
    rng = np.random.default_rng(0)
    with_knowledge = [r for r in records if r.split != "val"]
    knowledge = MemoryKnowledge([r.key for r in with_knowledge], [gt_units(r.labels, rng) for r in with_knowledge])
    return {"collection": path, "knowledge": knowledge, "records": records, "root": root}


def tiny(**sections) -> dict:
    cfg = yaml.safe_load(TINY.read_text())
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(data):
    run = data["root"] / "run"
    info = train_distill(data["collection"], data["knowledge"], tiny(train={"epochs": 15}), run, progress=False,
                         model=fresh_model())
    return run, info


def auc_numpy(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC with numpy ranks (average ranks for ties)."""
    order = np.argsort(scores, kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for v in np.unique(scores):
        tie = scores == v
        ranks[tie] = ranks[tie].mean()
    n_pos, n_neg = positive.sum(), (~positive).sum()
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def test_training_learns_and_backward_distillation_finds_corrupted_units(data, trained):
    run, info = trained
    log = read_log(run)
    losses = [e["loss"] for e in log]
    assert [e["epoch"] for e in log] == list(range(1, 16))
    assert np.mean(losses[-3:]) < 0.7 * losses[0]
    assert info["data"]["train_shapes"] == 14 and info["data"]["val_shapes"] == 3
    assert info["data"]["val_from"] == "split 'val'"
    # the trigger fired once and the confidences were replaced
    fired = [e for e in log if e.get("rescored")]
    assert len(fired) == 1 and info["trigger_epoch"] == fired[0]["epoch"] >= 3
    assert fired[0]["unit_scores"]["clean_vs_corrupted_auc"] > 0.8
    # validation mIoU on held-out shapes beats chance (uniform random labels)
    val = log[-1]["val_miou"]
    with Collection(data["collection"]) as c:
        val_rows = c.select(split="val")
        gt = np.stack([c.labels(int(r)) for r in val_rows])
    chance = shape_miou(np.random.default_rng(0).integers(0, R, gt.shape), gt, R).mean()
    assert val > chance + 0.2, (val, chance)
    # the student's scores of the units (Eq. 4), AUC with numpy ranks
    model, meta = load_model(run)
    assert meta["part_names"] == ["back", "seat", "leg", "arm"] and meta["class"] == "test_trainer:TinyPointMLP"
    ds = DistillDataset(data["collection"], data["knowledge"])
    scores = np.concatenate(rescore(model, ds))
    assert auc_numpy(scores, ds.corrupted == 0) > 0.8
    assert (run / "run.json").exists() and (run / "model" / "config.json").exists()
    with np.load(run / "confidences.npz") as z:
        assert z["keys"].shape == (14, 3) and len(z["final"]) == len(z["initial"]) == ds.num_units_total
        # C_n replaced by the agreement at the trigger epoch: fractions in [0, 1] that rank clean above corrupted
        assert not np.allclose(z["final"], z["initial"]) and z["final"].min() >= 0 and z["final"].max() <= 1
        assert auc_numpy(z["final"], z["corrupted"] == 0) > 0.8

    assert len(list((run / "checkpoints").glob("epoch-*"))) == 2
    with pytest.raises(FileExistsError, match="resume"):
        train_distill(data["collection"], data["knowledge"], tiny(), run, progress=False, model=fresh_model())


def test_rescore_known_answer_with_an_oracle(data):
    ds = DistillDataset(data["collection"], data["knowledge"])
    oracle = OracleModel(torch.from_numpy(ds.points), torch.from_numpy(ds.labels.astype(np.int64)))
    oracle.train()
    scores = rescore(oracle, ds, batch_size=5)
    # expected: the fraction of each unit's points whose GT label is the unit's label
    for i, s in enumerate(scores):
        u = ds.units[i]
        hit = ds.labels[i][u.point_index] == u.unit_probs.argmax(1)[u.unit_of_entry]
        expected = np.bincount(u.unit_of_entry, hit, minlength=u.num_units) / np.diff(u.offsets)
        np.testing.assert_allclose(s, expected, rtol=1e-6)
    flat = np.concatenate(scores)
    assert np.all(flat[ds.corrupted == 0] == 1.0) and np.all(flat[ds.corrupted == 1] == 0.0)
    # eval mode, no gradients, and the mode is restored
    assert oracle.calls and all(call == (False, False) for call in oracle.calls) and oracle.training


def test_resumed_run_writes_the_same_log(data):
    cfg = tiny(train={"epochs": 6}, backward={"tau": 10.0, "window": 2, "rescore_every": 2})
    ref, run = data["root"] / "ref", data["root"] / "resumed"
    train_distill(data["collection"], data["knowledge"], cfg, ref, progress=False, model=fresh_model())
    first = train_distill(data["collection"], data["knowledge"], cfg, run, progress=False, max_epochs=3,
                          model=fresh_model())
    assert first["epochs_done"] == 3
    # a torn line left by a kill is dropped on resume
    with open(run / "log.jsonl", "a") as fh:
        fh.write('{"epoch": 4, "lo')
    train_distill(data["collection"], data["knowledge"], cfg, run, resume=True, progress=False,
                  model=fresh_model())
    strip = lambda log: [{k: v for k, v in e.items() if k != "seconds"} for e in log]
    a, b = strip(read_log(ref)), strip(read_log(run))
    assert [e["epoch"] for e in b] == list(range(1, 7))
    assert [e["rescored"] for e in a] == [False, True, False, True, False, True]
    assert a == b


def test_backward_distillation_with_per_part_normalisation(data):
    """``backward.normalize: part``: the Eq. 4 scores are logged, then each part's units are rescaled so
    its 90th percentile is 1; the corrupted units still rank below the clean ones."""
    cfg = tiny(train={"epochs": 6}, backward={"tau": 10.0, "window": 3, "normalize": "part"})
    run = data["root"] / "per_part"
    train_distill(data["collection"], data["knowledge"], cfg, run, progress=False, model=fresh_model())
    fired = [e for e in read_log(run) if e.get("rescored")]
    assert len(fired) == 1 and "unit_scores_eq4" in fired[0] and "unit_scores" in fired[0]
    ds = DistillDataset(data["collection"], data["knowledge"])
    with np.load(run / "confidences.npz") as z:
        final, initial = z["final"], z["initial"]
    assert not np.allclose(final, initial) and final.max() <= 1.0
    assert fired[0]["unit_scores"]["clean_vs_corrupted_auc"] > 0.8
    judged = 0
    for r in np.unique(ds.unit_label):
        f, i = final[ds.unit_label == r], initial[ds.unit_label == r]
        if np.array_equal(f, i):   # the student predicts the part nowhere: its units keep their C_n
            continue
        judged += 1                # otherwise the part keeps at least its top 10 % of units at full weight
        assert (f == 1.0).mean() >= 0.1 - 1e-9, r
    assert judged >= 3
    with pytest.raises(ValueError, match="backward.normalize"):
        resolve_config({"backward": {"normalize": "class"}})


def test_two_process_torchrun(data):
    from distill.knowledge import write_knowledge

    kpath = data["root"] / "knowledge.h5"
    k = data["knowledge"]
    write_knowledge(kpath, [(key, k.units(i), None) for i, key in enumerate(k.keys())], category="chair",
                    part_names=k.part_names, teachers=["gt"], settings={}, simulated=True, num_points=N_POINTS,
                    overwrite=True)
    cfg_path = data["root"] / "ddp.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny(train={"epochs": 3}, backward={"tau": 10.0, "window": 2})))
    out = data["root"] / "ddp"
    script = data["root"] / "ddp_run.py"
    script.write_text("import sys, json\nfrom distill.trainer import load_config, train_distill\n"
                      "info = train_distill(sys.argv[1], sys.argv[2], load_config(sys.argv[3]), sys.argv[4], progress=False)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
           str(data["collection"]), str(kpath), str(cfg_path), str(out)]
    res = subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads((out / "run.json").read_text())
    assert info["processes"] == 2 and info["epochs_done"] == 3 and info["trigger_epoch"] == 2
    assert info["data"]["knowledge"] == str(kpath)
    log = read_log(out)
    assert [e["epoch"] for e in log] == [1, 2, 3] and all(np.isfinite(e["loss"]) for e in log)
    assert log[1]["unit_scores"]["count"] == k_units(data)


def k_units(data) -> int:
    return sum(data["knowledge"].units(i).num_units for i in range(len(data["knowledge"])))


def test_predict_round_trip_with_face_labels(data, trained, tmp_path):
    run, _ = trained
    out = tmp_path / "pred.h5"
    predict(run, data["collection"], out, batch_size=4, sheet=tmp_path / "sheet.png", sheet_shapes=4)
    model, _ = load_model(run)
    with read_predictions(out) as p, Collection(data["collection"]) as c:
        assert len(p) == len(c) and p.part_names == ("back", "seat", "leg", "arm") and p.category == "chair"
        assert p.keys() == [r.key for r in data["records"]]
        for i in (0, 12):
            probs = p.probs(i)
            assert probs.dtype == np.float16 and probs.shape == (N_POINTS, R)
            assert np.allclose(probs.astype(np.float32).sum(1), 1, atol=1e-2)
            from gen3d.dataset import normalize_unit_sphere

            with torch.no_grad():
                ref = torch.softmax(model(torch.from_numpy(normalize_unit_sphere(c.points(i))[0])[None]), -1)[0]
            np.testing.assert_allclose(probs.astype(np.float32), ref.numpy(), atol=2e-3)
            assert p.labels(i).dtype == np.int16 and np.array_equal(p.labels(i), ref.numpy().argmax(1))
        mesh = c.mesh(0)
        assert np.array_equal(p.face_labels(0), vote_face_labels(c.points(0), p.labels(0), mesh[0], mesh[1], 5))
        assert len(p.face_labels(0)) == len(mesh[1])
        assert p.face_labels(12) is None   # the val shape without a mesh
        assert p.index_of(data["records"][3].key) == 3
    from PIL import Image

    assert Image.open(tmp_path / "sheet.png").size == (4 * 256, 256)


def test_predict_inputs_from_mesh_files_and_the_voting_baseline(data, trained, tmp_path):
    from distill.predict import predict_inputs, vote_predictions
    from distill.voting import vote

    run, _ = trained
    folder = tmp_path / "meshes"
    folder.mkdir()
    for r in data["records"][:2]:
        v, f = r.mesh_vertices, r.mesh_faces
        lines = ["OFF", f"{len(v)} {len(f)} 0"] + [" ".join(map(str, x)) for x in v] + [f"3 {a} {b} {c}" for a, b, c in f]
        (folder / f"{r.shape_id}.off").write_text("\n".join(lines) + "\n")
    n = predict_inputs(run, [folder], tmp_path / "files.h5", num_points=N_POINTS)
    with read_predictions(tmp_path / "files.h5") as p:
        assert n == 2 == len(p) and p.category == "chair" and p.probs(0).shape == (N_POINTS, R)
        assert len(p.face_labels(1)) == len(data["records"][1].mesh_faces)
    assert predict_inputs(run, [data["collection"]], tmp_path / "coll.h5") == len(data["records"])
    # voting baseline: labels from distill.voting.vote, -1 where no unit covers a point
    k = data["knowledge"]
    assert vote_predictions(data["collection"], k, tmp_path / "vote.h5") == len(k)
    with read_predictions(tmp_path / "vote.h5") as p:
        assert p.keys() == k.keys()
        expected, _ = vote(k.units(0), N_POINTS, R)
        assert np.array_equal(p.labels(0), expected) and (expected == -1).any()
        assert np.all(p.probs(0)[expected == -1] == 0)


def test_tta_aligns_each_shape_and_reports_seconds(data, trained, tmp_path):
    run, _ = trained
    model, _ = load_model(run)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    test_keys = [r.key for r in data["records"] if r.split == "test"]
    ds = DistillDataset(data["collection"], data["knowledge"], keys=test_keys)
    cfg = resolve_config({"mode": "tta", "tta": {"steps": 30, "lr": 1e-2}, "train": {"augment": None}})
    res = tta_predict(model, ds, cfg)
    assert len(res["probs"]) == 2 and res["probs"][0].shape == (N_POINTS, R) and all(s > 0 for s in res["seconds"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())   # the pre-trained model is untouched
    # aligning to a shape's own units lowers its Eq. 3 loss
    from distill.losses import class_weights, distill_loss

    batch = ds.collate([ds[0]])
    cw = class_weights(batch["units"], R)
    with torch.no_grad():
        loss0 = distill_loss(model(batch["points"]), batch["units"], class_weights=cw).item()
    assert res["loss"][0] < loss0
    # the mode=tta entry point: predictions file + seconds per shape
    out = tmp_path / "tta"
    ttacfg = yaml.safe_load((REPO / "configs" / "distill" / "tta.yaml").read_text())
    ttacfg["tta"].update({"init": str(run), "steps": 5})
    knowledge = MemoryKnowledge(test_keys, [data["knowledge"].units(data["knowledge"].keys().index(k)) for k in test_keys])
    info = train_distill(data["collection"], knowledge, ttacfg, out, progress=False)
    assert info["shapes"] == 2 and info["timings"]["seconds_per_shape_mean"] > 0
    with read_predictions(out / "predictions.h5") as p:
        assert p.keys() == test_keys and p.face_labels(0) is not None


def test_fewshot_mode_and_validation_guards(data, tmp_path):
    cfg = tiny(mode="fewshot", train={"epochs": 2}, fewshot={"count": 2, "weight": 0.5}, backward={"enabled": False},
               loss={"target": "soft", "class_balance": "inverse", "normalize": "point"})
    info = train_distill(data["collection"], data["knowledge"], cfg, tmp_path / "fs", progress=False,
                         model=fresh_model())
    keys = info["data"]["fewshot"]["keys"]
    assert len(keys) == 2 and all(k[0] == "procedural" for k in keys)
    train_ids = {r.shape_id for r in data["records"] if r.split == "train"}
    assert all(k[2] in train_ids for k in keys)
    assert all("fewshot_loss" in e for e in read_log(tmp_path / "fs"))
    val_key = [list(r.key) for r in data["records"] if r.split == "val"][:1]
    with pytest.raises(ValueError, match="validation shape"):
        train_distill(data["collection"], data["knowledge"], tiny(mode="fewshot", fewshot={"keys": val_key}),
                      tmp_path / "bad", progress=False, model=fresh_model())
    with pytest.raises(ValueError, match="test split"):
        resolve_config({"val": {"split": "test"}})
    # val carved from the training shapes when the collection has no val shape of the category
    cfg = tiny(train={"epochs": 1, "select": "best_val"}, val={"split": None, "fraction": 0.25}, backward={"enabled": False})
    info = train_distill(data["collection"], data["knowledge"], cfg, tmp_path / "carved", progress=False,
                         model=fresh_model())
    assert info["data"]["val_shapes"] == 4 and info["data"]["train_shapes"] == 10   # round(0.25 * 14) = 4
    assert info["best_val"]["epoch"] == 1 and (tmp_path / "carved" / "model" / "partdistill.json").exists()


def test_shipped_configs_load():
    for name in ("pre", "tta", "fewshot", "tiny"):
        cfg = load_config(REPO / "configs" / "distill" / f"{name}.yaml")
        assert cfg["mode"] in ("pre", "tta", "fewshot")
    pre = load_config(REPO / "configs" / "distill" / "pre.yaml")
    assert (pre["train"]["lr"], pre["train"]["batch_size"], pre["train"]["epochs"]) == (1e-3, 16, 25)
    with pytest.raises(ValueError, match="unknown train keys"):
        resolve_config({"train": {"epoch": 3}})
