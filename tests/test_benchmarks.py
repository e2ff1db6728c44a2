"""The generation benchmark scripts run end to end on the shipped checkpoints with tiny sizes and
print their tables (the numbers themselves are measured by hand; see docs/generation.md)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True,
                         text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _table(text: str, header: str) -> list[list[str]]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows


def test_bench_sampling_prints_speed_and_quality_per_scheduler():
    out = _run("bench_sampling.py", "--category", "chair", "-n", "2", "--runs",
               "ddpm:4,dpm:2,dpm:2:use_karras_sigmas=true:solver_order=1,sde-dpm:2:first_timestep=800", "--grid", "32")
    rows = _table(out, "| scheduler")
    assert [(r[0], r[1]) for r in rows] == [("ddpm", "4"), ("dpm", "2"), ("dpm use_karras_sigmas=True solver_order=1", "2"),
                                            ("sde-dpm first_timestep=800", "2")]
    for r in rows:
        assert float(r[2]) > 0 and r[4].endswith("x")
        assert 0.0 <= float(r[5]) <= 100.0 and float(r[6]) >= 0.0   # 1-NNA (%) and its standard error
    assert rows[0][4] == "1.0x"
    surface = _table(out, "| surface step")
    assert len(surface) == 1 and surface[0][1] == "32" and surface[0][3].endswith("/2")


def test_bench_sampling_keeps_samples_and_pairs_each_run_with_ddpm(tmp_path):
    args = ["--category", "chair", "-n", "3", "--chunk", "2", "--grid", "0", "--save-dir", str(tmp_path),
            "--runs", "ddpm:3,sde-dpm:2:first_timestep=800"]
    first = _run("bench_sampling.py", *args)
    from gen3d.sample import checkpoint_hash, shipped_checkpoint

    kept = tmp_path / checkpoint_hash(shipped_checkpoint("chair"))
    assert sorted(p.name for p in (kept / "ddpm-3").iterdir()) == ["00000-00001.npz", "00002-00002.npz"]
    assert sorted(p.name for p in (kept / "sde-dpm-2-first_timestep=800").iterdir()) == ["00000-00001.npz", "00002-00002.npz"]
    rows = _table(first, "| scheduler")
    assert rows[0][7] == "-"
    diff, paired_se = rows[1][7].split()
    assert float(diff) == pytest.approx(float(rows[1][5]) - float(rows[0][5]), abs=0.11)  # both rounded to 0.1
    assert float(paired_se.strip("()")) >= 0.0
    assert rows[0][8] == "-" and float(rows[1][8]) >= 0.0   # bootstrap standard error of the difference
    # a second run reads the kept batches back instead of sampling: the same table, times included
    assert _run("bench_sampling.py", *args) == first


def test_bench_sampling_rejects_unknown_runs():
    for item in ("euler:10", "dpm:0", "dpm:25:karras"):
        res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_sampling.py"), "--runs", item],
                             capture_output=True, text=True, cwd=REPO)
        assert res.returncode == 2 and f"--runs item '{item}'" in res.stderr
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_sampling.py"), "--runs", "dpm:25:karras=1"],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 2 and "DPMSolverMultistepScheduler has no setting ['karras']" in res.stderr


def test_scheduler_options_override_ours_and_keep_the_rest():
    from gen3d.sample import make_scheduler, shipped_checkpoint

    ckpt = shipped_checkpoint("chair")
    default = make_scheduler("dpm", ckpt)
    assert default.config.solver_order == 2 and default.config.thresholding and not default.config.use_karras_sigmas
    custom = make_scheduler("dpm", ckpt, use_karras_sigmas=True, solver_order=3)
    assert custom.config.use_karras_sigmas and custom.config.solver_order == 3 and custom.config.thresholding
    assert make_scheduler("ddim", ckpt, clip_sample=False).config.clip_sample is False
    with pytest.raises(ValueError, match="karras"):
        make_scheduler("dpm", ckpt, karras=True)


def test_eval_generator_compares_several_checkpoints(tmp_path, data_root):
    from gen3d.sample import shipped_checkpoint

    ckpt = str(shipped_checkpoint("chair"))
    out = _run("eval_generator.py", "--category", "chair", "-n", "2", "--steps", "2", "--checkpoint", ckpt,
               "--checkpoint", ckpt, "--data-root", str(data_root), "--json", str(tmp_path / "m.json"))
    rows = _table(out, "| checkpoint")
    assert len(rows) == 5   # 2 checkpoints x 2 references + the published row
    result = json.loads((tmp_path / "m.json").read_text())
    assert len(result["checkpoints"]) == 2
    a, b = (c["metrics"] for c in result["checkpoints"])
    assert a == b   # same weights, same noise, same references: identical metrics
    assert a["Labeled-PSB test"]["n_ref"] == 10 and a["held-out procedural (seed 1)"]["n_ref"] == 2
