"""The end-to-end experiment, quick variant, on the real Labeled-PSB chairs (runs in CI)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from eval.cli import main
from eval.experiment import load_experiment
from eval.report import update_results_md


def _write_coseg_chairs(root, count=3):
    """Procedural chairs without arms in COSEG's layout (Large_Chairs/shapes/<i>.off, gt/<i>.seg with
    back = 1, seat = 2, legs = 3 per face, as gen3d/data/coseg.yaml says); returns the root."""
    from gen3d.procedural import generate

    set_dir = root / "Large_Chairs"
    (set_dir / "shapes").mkdir(parents=True)
    (set_dir / "gt").mkdir()
    index = written = 0
    while written < count:
        r = generate("chair", index, seed=77)
        index += 1
        if "arm" in {r.part_names[k] for k in np.unique(r.face_labels)}:
            continue
        written += 1
        v, f = r.mesh_vertices, r.mesh_faces
        lines = ["OFF", f"{len(v)} {len(f)} 0", *(f"{a:.6f} {b:.6f} {c:.6f}" for a, b, c in v),
                 *(f"3 {a} {b} {c}" for a, b, c in f)]
        (set_dir / "shapes" / f"{written}.off").write_text("\n".join(lines) + "\n")
        coseg_label = {"back": 1, "seat": 2, "leg": 3}
        (set_dir / "gt" / f"{written}.seg").write_text(
            "".join(f"{coseg_label[r.part_names[k]]}\n" for k in r.face_labels))
    return root


def test_quick_chair_experiment_runs_every_stage_scores_and_resumes(tmp_path):
    out, md = tmp_path / "chair", tmp_path / "RESULTS.md"
    md.write_text("# Results\n\nkept text\n")
    coseg = _write_coseg_chairs(tmp_path / "COSEG")
    args = ["experiment", "configs/experiments/chair.yaml", "--quick", "--out", str(out), "--results", str(md),
            "--coseg", str(coseg)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "results.json").read_text())
    cfg = load_experiment("configs/experiments/chair.yaml", quick=True)
    expected = {f"{r['name']}|{t}" for r in cfg["rows"] for t in r["teachers"]}
    assert set(summary["results"]) == expected
    assert summary["counts"]["test"] == 10 and summary["counts"]["real_train"] == 10
    for r in summary["results"].values():
        for run in r["runs"]:
            assert run["shapes"] == 10
            for k in ("face_one", "face_skip", "area_one", "point_one"):
                assert 0.0 <= run[k] <= 1.0
            # the "one" convention never scores below "skip" (it adds parts counted as 1)
            assert run["face_one"] >= run["face_skip"] - 1e-9
    # voting covers points, and an uncorrupted part of the pipeline is scored on real meshes
    assert summary["results"]["voting|simulated"]["runs"][0]["coverage"] > 0.5
    assert summary["results"]["voting|simulated"]["runs"][0]["face_one"] > 0.3
    # COSEG: every Pre row's student is applied to the 3 COSEG chairs and scored per face; other rows are not
    assert summary["coseg"]["shapes"] == 3
    for r in summary["results"].values():
        for run in r["runs"]:
            if r["kind"] == "pre":
                assert run["coseg"]["shapes"] == 3 and 0.0 <= run["coseg"]["face_skip"] <= run["coseg"]["face_one"] <= 1.0
            else:
                assert "coseg" not in run
    # a row's backward_options reach the trainer: per-part normalised re-scoring ran and was logged
    part_run = out / "rows" / "pre_bd_part-simulated-s0" / "run"
    assert yaml.safe_load((part_run / "config.yaml").read_text())["backward"]["normalize"] == "part"
    assert any("unit_scores_eq4" in json.loads(x) for x in (part_run / "log.jsonl").read_text().splitlines())
    for rdir in (out / "rows").iterdir():   # ground truth beside prediction, 6 test shapes: 3 rows of 4 tiles
        from PIL import Image

        assert Image.open(rdir / "sheet.png").size == (4 * 256, 3 * 256), rdir
    text = md.read_text()
    assert "COSEG face (one / skip)" in text and "sheet.png" in text
    # the report names the weights that made the generated shapes, and their training steps
    from gen3d.sample import checkpoint_hash, shipped_checkpoint

    shipped = shipped_checkpoint("chair")
    steps = json.loads((shipped / "training.json").read_text())["steps"]
    assert summary["generate"]["checkpoint_sha256"] == [checkpoint_hash(shipped)]
    assert summary["generate"]["checkpoint_steps"] == [steps]
    assert f"weights {checkpoint_hash(shipped)}, {steps} training steps" in text
    assert "kept text" in text and "<!-- experiment:chair-quick -->" in text and "| voting | simulated |" in text
    # a re-run resumes from cached stages and rewrites the section in place (not appended twice)
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "[cached] row/voting/simulated/s0" in res.output and "[stage]" not in res.output
    assert md.read_text().count("<!-- experiment:chair-quick -->") == 1
    # a changed setting is not answered from the cache: the command stops, naming stage and setting
    changed = yaml.safe_load(open("configs/experiments/chair.yaml"))
    changed["quick"]["generate"]["steps"] = 12
    (tmp_path / "changed.yaml").write_text(yaml.safe_dump(changed))
    res = CliRunner().invoke(main, [*args[:1], str(tmp_path / "changed.yaml"), *args[2:]])
    assert res.exit_code != 0 and "stage 'generate'" in res.output and "steps: 10 -> 12" in res.output, res.output
    assert "--redo-stale" in res.output and "[stage]" not in res.output


def test_experiment_config_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ncategory: chair\n")
    with pytest.raises(ValueError, match="missing key"):
        load_experiment(bad)
    with pytest.raises(FileNotFoundError):
        load_experiment(tmp_path / "none.yaml")
    good = load_experiment("configs/experiments/chair.yaml")
    for opts, msg in (({"normalise": "part"}, "unknown backward keys"), ({"normalize": "unit"}, "must be 'none' or 'part'")):
        cfg = {k: v for k, v in good.items() if k != "quick"}
        cfg["rows"] = [{"name": "r", "kind": "pre", "teachers": ["simulated"], "backward_options": opts}]
        bad.write_text(yaml.safe_dump(cfg))
        with pytest.raises(ValueError, match=f"row 'r': backward_options: .*{msg}"):
            load_experiment(bad)
    cfg["rows"] = [{"name": "v", "kind": "vote", "teachers": ["simulated"], "backward_options": {"normalize": "part"}}]
    bad.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="on a 'pre' row"):
        load_experiment(bad)


def test_results_md_sections_are_replaced_not_duplicated(tmp_path):
    summary = {"name": "t", "category": "chair", "quick": True, "config": "c.yaml", "wall_seconds": 60.0,
               "hardware": {"cores": 2, "gpu": None, "torch": "x"}, "generate": {"n": 1},
               "counts": {"real_train": 1, "test": 1}, "distill": {"epochs": 1, "seeds": [0], "student": "s"},
               "teachers": {"sim": {"kind": "simulated", "spec": "simulated"}},
               "results": {"voting|sim": {"row": "voting", "teacher": "sim", "runs": [
                   {"train_set": "test", "face_one": 0.5, "face_skip": 0.4, "area_one": 0.5, "point_one": 0.5,
                    "seconds": 1.0}]}}}
    md = tmp_path / "R.md"
    update_results_md(md, summary)
    summary["results"]["voting|sim"]["runs"][0]["face_one"] = 0.25
    update_results_md(md, summary)
    text = md.read_text()
    assert text.count("## t") == 1 and "| 25.0 |" in text and "| 50.0 | 40.0 |" not in text


def test_shape_groups_split_pooled_shapes_by_source_and_split(tmp_path):
    """20 Labeled-PSB chairs (10 train / 10 test), airplanes and procedural chairs pooled together:
    only the chairs of source ``real`` are grouped, test rows are exactly the real chair test rows."""
    from distill.extract import shape_key
    from eval.experiment import shape_groups
    from gen3d.collection import Collection
    from gen3d.pool import PoolSettings, pool

    path = tmp_path / "all.h5"
    pool(path, ["labeled-psb:chair", "labeled-psb:airplane", "procedural:chair:2:seed=0"], PoolSettings(keep_mesh=False))
    g = shape_groups(path, "chair")
    assert len(g.keys["test"]) == 10 and len(g.keys["real_train"]) == 10 and not g.keys["generated"]
    assert g.keys["labelled_real"] == g.keys["test"] | g.keys["real_train"]
    assert g.keys["genreal"] == g.keys["real_train"]
    with Collection(path) as c:
        expected = [i for i in range(len(c)) if c.categories[i] == "chair" and c.sources[i] == "real"
                    and c.splits[i] == "test"]
        assert g.test_rows == expected
        assert {shape_key(c, i) for i in expected} == g.keys["test"]
        assert g.num_parts == len(c.part_names["chair"])
        procedural = {shape_key(c, i) for i in range(len(c)) if c.sources[i] == "procedural"}
    assert len(procedural) == 2 and not procedural & (g.keys["labelled_real"] | g.keys["generated"])


def test_stage_markers_written_by_hand_are_reported_as_reused(tmp_path):
    """A stage whose marker says ``reused_from`` is not run, keeps the recorded time and is listed."""
    import json as _json

    from eval.experiment import Stages
    from eval.report import section

    (tmp_path / ".done").mkdir()
    (tmp_path / ".done" / "teacher_a.json").write_text(
        _json.dumps({"seconds": 700.0, "result": {"shots": 8, "reused_from": "runs/voting/chair/teacher"}}))
    st = Stages(tmp_path, lambda _: None)
    calls = []
    assert st.run("teacher/a", lambda: calls.append(1))["shots"] == 8
    assert st.run("teacher/b", lambda: calls.append(1) or {"shots": 8}) == {"shots": 8}
    assert calls == [1] and st.times["teacher/a"] == 700.0
    assert st.reused == {"teacher/a": "runs/voting/chair/teacher"}
    summary = {"name": "t", "category": "chair", "quick": False, "config": "c.yaml", "wall_seconds": 60.0,
               "hardware": {"cores": 2, "gpu": None, "torch": "x"}, "generate": {"n": 1}, "reused": st.reused,
               "counts": {"real_train": 1, "test": 1}, "distill": {"epochs": 1, "seeds": [0], "student": "s"},
               "teachers": {}, "results": {}}
    assert "`teacher/a`: runs/voting/chair/teacher" in section(summary)


def test_stages_are_cached_by_settings_and_inputs_and_stale_ones_named_or_redone(tmp_path):
    """A changed setting (or a changed input stage) is never read from the cache: it is an error naming
    the setting, or with redo_stale the stage's outputs are deleted and it and its dependants run again."""
    from eval.experiment import Stages, StaleStageError

    calls = []

    def chain(st, steps, rows_epochs=5):
        def gen():
            calls.append("gen")
            (tmp_path / "generated.h5").write_text(f"steps {steps}")
            (tmp_path / "meshes").mkdir(exist_ok=True)
            (tmp_path / "meshes" / f"{steps}.obj").write_text("")
            return steps
        st.run("generate", gen, {"generate": {"n": 4, "steps": steps}},
               outputs=[tmp_path / "generated.h5", tmp_path / "meshes"])
        st.run("pool", lambda: calls.append("pool") or 1, after=["generate"])
        st.run("real", lambda: calls.append("real") or 2, {"source": "labeled-psb:chair"})
        return st.run("row/pre", lambda: calls.append("row") or rows_epochs, {"epochs": rows_epochs},
                      after=["pool", "real"])

    log = []
    assert chain(Stages(tmp_path, log.append), 50) == 5
    assert calls == ["gen", "pool", "real", "row"]
    calls.clear()
    assert chain(Stages(tmp_path, log.append), 50) == 5 and calls == []   # same settings: all cached
    with pytest.raises(StaleStageError, match=r"'generate'.*generate\.steps: 50 -> 25.*generated\.h5.*--redo-stale"):
        chain(Stages(tmp_path, log.append), 25)
    assert calls == [] and (tmp_path / "generated.h5").read_text() == "steps 50"   # nothing touched
    # only the row changed: the upstream stages stay cached
    with pytest.raises(StaleStageError, match=r"'row/pre'.*epochs: 5 -> 7"):
        chain(Stages(tmp_path, log.append), 50, rows_epochs=7)
    assert calls == []
    # redo: generate is made again (its old output deleted first), pool because its input changed,
    # the row because pool did; real is unchanged and stays cached
    assert chain(Stages(tmp_path, log.append, redo_stale=True), 25) == 5
    assert calls == ["gen", "pool", "row"] and (tmp_path / "generated.h5").read_text() == "steps 25"
    assert [p.name for p in (tmp_path / "meshes").iterdir()] == ["25.obj"]   # the old outputs were deleted
    assert any(m.startswith("[stale] pool: input stage 'generate' changed") for m in log)
    calls.clear()
    assert chain(Stages(tmp_path, log.append), 25) == 5 and calls == []
    # a marker without a fingerprint (hand-written or older) is taken as it is
    (tmp_path / ".done" / "real.json").write_text('{"seconds": 1.0, "result": 9}')
    assert Stages(tmp_path, log.append).run("real", lambda: calls.append("real"), {"source": "other"}) == 9
    assert calls == []


def test_discussion_is_computed_from_the_numbers():
    """The RESULTS.md paragraph states each comparison the way the numbers go."""
    from eval.report import discussion

    def run(v, **kw):
        return {"face_one": v, **kw}

    res = {"voting|t": {"row": "voting", "teacher": "t", "simulated": False, "runs": [run(0.60)]},
           "tta|t": {"row": "tta", "teacher": "t", "simulated": False, "runs": [run(0.55)]},
           "pre|t": {"row": "pre", "teacher": "t", "simulated": False, "runs": [run(0.70)]},
           "pre_bd|t": {"row": "pre_bd", "teacher": "t", "simulated": False,
                        "runs": [run(0.64, miou_2d={"before": 0.5, "after": 0.6}), run(0.66), run(0.65)]},
           "pre_bd_refine|t": {"row": "pre_bd_refine", "teacher": "t", "simulated": False, "runs": [run(0.68)]},
           "pre_bd_part|t": {"row": "pre_bd_part", "teacher": "t", "simulated": False, "runs": [run(0.62)]},
           "voting|s": {"row": "voting", "teacher": "s", "simulated": True, "runs": [run(0.90)]}}
    text = discussion({"quick": False, "results": res})
    assert "Pre + BD beats direct voting (65.0 vs 60.0" in text
    assert "backward distillation does not raise mIoU over Pre alone (65.0 vs 70.0)" in text
    assert "gives 55.0 against voting's 60.0" in text
    assert "intra-set refinement of the knowledge raises Pre + BD (68.0 vs 65.0)" in text
    assert "from 50.0 to 60.0 (the student's agreement tracks" in text
    assert "over 3 seeds Pre + BD ranges 64.0-66.0" in text
    assert "re-scoring (`backward.normalize: part`, ours) does not raise Pre + BD (62.0 vs 65.0)" in text
    # the simulated teacher's 90.0 is not the best "real teacher" row
    assert "best row with a real teacher (not simulated from ground truth) is **pre** with **t** (70.0" in text


def test_generator_provenance_drops_steps_when_the_checkpoint_folder_changed(tmp_path):
    """Steps are read from the recorded checkpoint folder only while it holds the recorded weights."""
    import shutil

    from eval.experiment import generator_provenance
    from gen3d.sample import checkpoint_hash, generate_collection, shipped_checkpoint

    ckpt = tmp_path / "ckpt"
    shutil.copytree(shipped_checkpoint("airplane"), ckpt)
    generate_collection("airplane", 2, tmp_path / "gen.h5", ckpt, "ddim", 2, seed=0, mesh=False, progress=False)
    digest = checkpoint_hash(ckpt)
    steps = json.loads((ckpt / "training.json").read_text())["steps"]
    assert generator_provenance(tmp_path / "gen.h5") == {"checkpoint_sha256": [digest], "checkpoint_steps": [steps],
                                                         "samplers": ["ddim-2"]}
    weights = next(ckpt.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b" ")   # the folder now holds other weights
    assert generator_provenance(tmp_path / "gen.h5") == {"checkpoint_sha256": [digest], "checkpoint_steps": [None],
                                                         "samplers": ["ddim-2"]}
    # a later batch with another start in the same file is named apart
    generate_collection("airplane", 1, tmp_path / "gen.h5", None, "sde-dpm", 2, seed=1, mesh=False, progress=False,
                        first_timestep=800)
    assert generator_provenance(tmp_path / "gen.h5")["samplers"] == ["ddim-2", "sde-dpm-2 from t=800"]
