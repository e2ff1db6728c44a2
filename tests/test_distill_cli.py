"""The README's hand-run distillation commands, at tiny sizes: pretrain -> train -> predict -> score."""
from __future__ import annotations

import json

from click.testing import CliRunner

from distill.cli import main as distill
from distill.predict import read_predictions
from eval.cli import main as pdeval
from gen3d.collection import Collection
from gen3d.pool import PoolSettings, pool


def test_pretrain_train_predict_score_from_the_command_line(tmp_path):
    data = tmp_path / "chairs.h5"
    pool(data, ["procedural:chair:6:seed=0", "procedural:chair:2:seed=5:split=test"], PoolSettings(num_points=512))
    r = CliRunner()

    def ok(cli, args):
        res = r.invoke(cli, [str(a) for a in args])
        assert res.exit_code == 0, res.output
        return res.output

    k = tmp_path / "k.h5"
    ok(distill, ["extract", data, "--teacher", "simulated:pixel:p_miss=0.1:p_wrong=0.1", "--out", k,
                 "--views", 4, "--image-size", 64, "--split", "train"])
    ok(distill, ["pretrain", data, "--config", "configs/distill/pretrain_tiny.yaml", "--out", tmp_path / "enc",
                 "--max-steps", 3])
    ok(distill, ["train", "--collection", data, "--knowledge", k, "--config", "configs/distill/pre.yaml",
                 "--student", "configs/distill/student_tiny.yaml", "--encoder", tmp_path / "enc" / "encoder",
                 "--out", tmp_path / "run", "--max-epochs", 1])
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["epochs_done"] == 1
    ok(distill, ["predict", "--run", tmp_path / "run", data, "--out", tmp_path / "pred.h5", "--png", tmp_path / "p.png"])
    with read_predictions(tmp_path / "pred.h5") as p, Collection(data) as c:
        assert len(p) == len(c) == 8
        assert p.probs(0).shape == (512, 4) and p.labels(0).shape == (512,)
    assert (tmp_path / "p.png").stat().st_size > 1000
    out = ok(pdeval, ["score", data, tmp_path / "pred.h5", "--split", "test", "--out", tmp_path / "score"])
    assert "| points | one |" in out
    scores = json.loads((tmp_path / "score" / "scores.json").read_text())
    assert scores["shapes"] == 2
    # mismatched student / encoder sizes give a clear error, not a traceback
    res = r.invoke(distill, [str(a) for a in ["train", "--collection", data, "--knowledge", k, "--config",
                                              "configs/distill/pre.yaml", "--student", "configs/distill/student_small.yaml",
                                              "--encoder", tmp_path / "enc" / "encoder", "--out", tmp_path / "run2",
                                              "--max-epochs", 1]])
    assert res.exit_code != 0 and "Traceback" not in res.output and res.output.strip()
