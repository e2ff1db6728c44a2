"""Training (DDPM on Accelerate, resume after a kill) and sampling (schedulers, determinism, resume)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from gen3d.cli import main
from gen3d.collection import Collection, append_records
from gen3d.pool import PoolSettings, pool
from gen3d.runs import latest_checkpoint
from gen3d.sample import CheckpointNotFoundError, generate_collection, load_generator, resolve_checkpoint, sample_clouds
from gen3d.train import load_config, train

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "gen3d" / "dit3d_tiny.yaml"


@pytest.fixture(scope="module")
def mug_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "mugs.h5"
    pool(path, ["procedural:mug:12:seed=0"], PoolSettings(num_points=256, keep_mesh=False))
    return path


def tiny_config(tmp_path, **train):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["num_points"] = 256
    cfg["train"].update(train)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def read_log(run: Path) -> list[tuple[int, float]]:
    return [(d["step"], d["loss"]) for d in map(json.loads, (run / "log.jsonl").read_text().splitlines())]


def test_tiny_training_learns(tmp_path, mug_data):
    cfg = load_config(tiny_config(tmp_path, steps=150, lr=3e-3, batch_size=8, checkpoint_every=150, log_every=1))
    info = train(cfg, "mug", [mug_data], tmp_path / "run", progress=False)
    losses = [loss for _, loss in read_log(tmp_path / "run")]
    assert info["steps"] == 150 and len(losses) == 150
    assert np.mean(losses[-30:]) < 0.8 * np.mean(losses[:10])  # epsilon-MSE starts near 1
    assert (tmp_path / "run" / "model" / "diffusion_pytorch_model.safetensors").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        train(cfg, "mug", [mug_data], tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match="no 'chair' shapes"):
        train(cfg, "chair", [mug_data], tmp_path / "other", progress=False)


def test_killed_training_resumes_with_the_same_loss_curve(tmp_path, mug_data):
    steps = 200  # long enough that a fast machine cannot finish between two polls
    config = tiny_config(tmp_path, steps=steps, checkpoint_every=5, log_every=1)
    ref = tmp_path / "ref"
    train(load_config(config), "mug", [mug_data], ref, progress=False)
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "gen3d.cli", "train", "--category", "mug", "--config", str(config),
           "--out", str(run), "--data", str(mug_data)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})

    def past_step_10() -> bool:  # old checkpoints are rotated away: ask for the newest complete one
        ckpt = latest_checkpoint(run)
        return ckpt is not None and ckpt.name >= "step-0000010"

    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not past_step_10():
        time.sleep(0.01)
    proc.kill()  # SIGKILL; a no-op if the run already ended (then the assertion below says so)
    proc.wait()
    done = read_log(run)
    assert 10 <= done[-1][0] < steps, "the kill must interrupt the run"
    res = CliRunner().invoke(main, ["train", "--category", "mug", "--config", str(config), "--out", str(run),
                                    "--data", str(mug_data), "--resume"])
    assert res.exit_code == 0, res.output
    resumed, reference = read_log(run), read_log(ref)
    assert [s for s, _ in resumed] == list(range(1, steps + 1))
    np.testing.assert_allclose([l for _, l in resumed], [l for _, l in reference], rtol=1e-5)


def test_resume_skips_a_half_written_checkpoint_and_a_torn_log_line(tmp_path, mug_data):
    # with a learning-rate cooldown over the last 6 steps: the pause at step 5 falls inside it
    config = tiny_config(tmp_path, steps=10, checkpoint_every=5, log_every=1, lr=1e-3, lr_cooldown_steps=6)
    ref = tmp_path / "ref"
    train(load_config(config), "mug", [mug_data], ref, progress=False)
    run = tmp_path / "run"
    train(load_config(config), "mug", [mug_data], run, max_steps=5, progress=False)
    # What a kill during the step-8 save and a log write leaves behind.
    (run / "checkpoints" / ".step-0000008.tmp").mkdir()
    (run / "checkpoints" / "step-0000008").mkdir()
    (run / "checkpoints" / "step-0000008" / "model.safetensors").write_bytes(b"\0" * 10)
    with open(run / "log.jsonl", "a") as fh:
        fh.write('{"step": 6, "loss": 0.5}\n{"step": 7, "lo')
    train(load_config(config), "mug", [mug_data], run, resume=True, progress=False)
    resumed, reference = read_log(run), read_log(ref)
    assert [s for s, _ in resumed] == list(range(1, 11))
    np.testing.assert_allclose([l for _, l in resumed], [l for _, l in reference], rtol=1e-5)
    lrs = [json.loads(line)["lr"] for line in (run / "log.jsonl").read_text().splitlines()]
    np.testing.assert_allclose(lrs, 1e-3 * np.array([1, 1, 1, 1, 6, 5, 4, 3, 2, 1]) / np.array([1, 1, 1, 1, 6, 6, 6, 6, 6, 6]))


def test_lr_cooldown_longer_than_the_run_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match="lr_cooldown_steps"):
        load_config(tiny_config(tmp_path, steps=10, lr_cooldown_steps=11))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, mug_data):
    run = tmp_path_factory.mktemp("run")
    cfg = load_config(tiny_config(run, steps=20, checkpoint_every=20))
    train(cfg, "mug", [mug_data], run / "out", progress=False)
    return run / "out" / "model"


@pytest.mark.parametrize("scheduler,steps", [("ddpm", 30), ("ddim", 10), ("dpm", 5), ("sde-dpm", 5)])
def test_sampling_is_deterministic_and_batch_independent(tmp_path, tiny_model, scheduler, steps):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    generate_collection("mug", 5, a, tiny_model, scheduler, steps, seed=3, batch_size=5, mesh=False, progress=False)
    generate_collection("mug", 5, b, tiny_model, scheduler, steps, seed=3, batch_size=2, mesh=False, progress=False)
    with Collection(a) as ca, Collection(b) as cb:
        assert len(ca) == 5
        for i in range(5):
            np.testing.assert_allclose(ca.points(i), cb.points(i), atol=1e-4)
        assert not np.allclose(ca.points(0), ca.points(1))
        prov = ca.provenance(2)
        assert prov["scheduler"] == scheduler and prov["steps"] == steps and prov["seed"] == 3 and prov["index"] == 2
        assert len(prov["checkpoint_sha256"]) == 16 and ca.sources[0] == "generated"


def test_sampling_resumes_and_writes_meshes_and_exports(tmp_path, tiny_model):
    out = tmp_path / "g.h5"
    first = generate_collection("mug", 2, out, tiny_model, "dpm", 4, batch_size=2, mesh=False, progress=False)
    assert first["generated"] == 2
    more = generate_collection("mug", 3, out, tiny_model, "dpm", 4, batch_size=2, mesh=True, grid=32,
                               export_dir=tmp_path / "export", progress=False)
    assert (more["generated"], more["skipped"]) == (1, 2)
    with Collection(out) as c:
        assert [str(s) for s in c.shape_ids] == [f"mug-gen-s0-{i:06d}" for i in range(3)]
        assert c.mesh(2) is not None and c.provenance(2)["surface"]["grid"] == 32
    assert (tmp_path / "export" / "mug-gen-s0-000002.ply").exists()
    assert (tmp_path / "export" / "mug-gen-s0-000002.obj").exists()


def test_missing_checkpoint_is_a_clear_message(tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="gen3d train --category mug"):
        resolve_checkpoint("mug")
    with pytest.raises(CheckpointNotFoundError, match="no generator checkpoint here"):
        resolve_checkpoint("mug", tmp_path)
    res = CliRunner().invoke(main, ["sample", "--category", "mug", "-n", "2", "--out", str(tmp_path / "x.h5")])
    assert res.exit_code != 0 and "Train one" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x.h5").exists()


def test_two_process_cpu_training(tmp_path, mug_data):
    config = tiny_config(tmp_path, steps=6, checkpoint_every=3, log_every=1)
    # CPU multi-process training: torchrun starts the processes, accelerate joins them with gloo
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "gen3d.cli", "train", "--category", "mug",
           "--config", str(config), "--out", str(tmp_path / "run"), "--data", str(mug_data)]
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    info = json.loads((tmp_path / "run" / "model" / "training.json").read_text())
    assert info["processes"] == 2 and info["steps"] == 6
    assert [s for s, _ in read_log(tmp_path / "run")] == list(range(1, 7))


def test_export_model_half_precision_round_trip(tmp_path, tiny_model):
    from gen3d.sample import load_generator
    from gen3d.train import export_model

    dest = export_model(tiny_model, tmp_path / "shipped")
    assert (dest / "scheduler_config.json").exists() and (dest / "training.json").exists()
    full, half = load_generator(tiny_model), load_generator(dest)
    assert next(half.parameters()).dtype == next(full.parameters()).dtype
    for a, b in zip(full.parameters(), half.parameters()):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), atol=2e-3, rtol=2e-3)


def test_init_starts_from_the_given_weights_and_records_them(tmp_path, mug_data, tiny_model):
    from gen3d.sample import checkpoint_hash

    # lr 0: the run keeps the --init weights, so its exported EMA model is the init model itself (a
    # randomly initialised one differs from the 20-step tiny model by ~1e-3)
    config = tiny_config(tmp_path, steps=4, checkpoint_every=2, lr=0.0)
    run = tmp_path / "ft"
    train(load_config(config), "mug", [mug_data], run, max_steps=2, progress=False, init=tiny_model)
    # resumed without --init: the weights come from the checkpoint, and the init is still recorded
    info = train(load_config(config), "mug", [mug_data], run, resume=True, progress=False)
    before = json.loads((tiny_model / "training.json").read_text())
    assert info["init"] == {"path": str(tiny_model), "weights_sha256": checkpoint_hash(tiny_model),
                            "steps": before["steps"], "wall_seconds": before["wall_seconds"]}
    assert json.loads((run / "model" / "training.json").read_text())["init"] == info["init"]
    for a, b in zip(load_generator(tiny_model).parameters(), load_generator(run / "model").parameters()):
        np.testing.assert_allclose(a.detach().numpy(), b.detach().numpy(), atol=1e-6)


def test_init_with_another_model_config_is_refused_naming_the_setting(tmp_path, mug_data, tiny_model):
    cfg = load_config(tiny_config(tmp_path, steps=2))
    cfg["model"]["hidden_size"] *= 2
    with pytest.raises(ValueError, match=r"config\.json: model settings differ.*hidden_size"):
        train(cfg, "mug", [mug_data], tmp_path / "a", progress=False, init=tiny_model)
    cfg = load_config(tiny_config(tmp_path, steps=2))
    cfg["diffusion"]["beta_end"] = 0.01
    with pytest.raises(ValueError, match=r"scheduler_config\.json: diffusion settings differ.*beta_end"):
        train(cfg, "mug", [mug_data], tmp_path / "b", progress=False, init=tiny_model)
    with pytest.raises(FileNotFoundError, match="--init .*no generator checkpoint here"):
        train(load_config(tiny_config(tmp_path, steps=2)), "mug", [mug_data], tmp_path / "c", progress=False,
              init=tmp_path)


def test_cli_init_takes_a_shipped_category_and_refuses_an_unknown_one(tmp_path, mug_data):
    config = tiny_config(tmp_path, steps=1)
    res = CliRunner().invoke(main, ["train", "--category", "mug", "--config", str(config), "--out", str(tmp_path / "a"),
                                    "--data", str(mug_data), "--init", "no-such-category"])
    assert res.exit_code != 0 and "neither a model folder nor a category with a shipped checkpoint" in res.output
    # the shipped chair checkpoint is a dit3d_cpu model: a tiny config does not fit it
    res = CliRunner().invoke(main, ["train", "--category", "mug", "--config", str(config), "--out", str(tmp_path / "b"),
                                    "--data", str(mug_data), "--init", "chair"])
    assert res.exit_code != 0 and "gen3d/checkpoints/chair/config.json: model settings differ" in res.output


def test_training_info_reads_absent_and_broken_files(tmp_path, tiny_model):
    from gen3d.sample import training_info

    info = training_info(tiny_model)
    assert info == json.loads((tiny_model / "training.json").read_text()) and info["steps"] > 0
    assert training_info(tmp_path) == {}
    (tmp_path / "training.json").write_text('{"steps": 3')
    with pytest.raises(ValueError, match="training.json"):
        training_info(tmp_path)


@pytest.mark.parametrize("category", ["chair", "airplane"])
def test_shipped_checkpoints_load_and_sample(tmp_path, category):
    from gen3d.sample import shipped_checkpoint

    model_dir = shipped_checkpoint(category)
    assert model_dir is not None, f"no shipped {category} checkpoint"
    weights = next(model_dir.glob("*.safetensors"))
    assert weights.stat().st_size <= 25 * 2**20
    info = json.loads((model_dir / "training.json").read_text())
    assert info["category"] == category and info["steps"] > 0
    out = tmp_path / "g.h5"
    res = CliRunner().invoke(main, ["sample", "--category", category, "-n", "2", "--steps", "2", "--no-mesh",
                                    "--out", str(out)])
    assert res.exit_code == 0, res.output
    with Collection(out) as c:
        assert len(c) == 2 and c.points(0).shape == (2048, 3) and np.isfinite(c.points(1)).all()


def test_preview_png(tmp_path, tiny_model):
    from PIL import Image

    out = tmp_path / "g.h5"
    res = CliRunner().invoke(main, ["sample", "--category", "mug", "-n", "3", "--steps", "2", "--no-mesh", "--out", str(out),
                                    "--checkpoint", str(tiny_model), "--preview", str(tmp_path / "p.png")])
    assert res.exit_code == 0, res.output
    img = Image.open(tmp_path / "p.png")
    assert img.size == (3 * 192, 192 + 14)
    arr = np.asarray(img)
    assert (arr < 250).any(axis=-1).sum() > 100  # points were drawn on the white sheet


def test_cli_reconstruct_adds_watertight_meshes(tmp_path):
    import trimesh

    path = tmp_path / "c.h5"
    pool(path, ["procedural:table:2:seed=5"], PoolSettings(num_points=2048, keep_mesh=False))
    res = CliRunner().invoke(main, ["reconstruct", str(path), "--grid", "64"])
    assert res.exit_code == 0, res.output
    with Collection(path) as c:
        for i in range(2):
            v, f, labels = c.mesh(i)
            assert trimesh.Trimesh(v, f, process=False).is_watertight
            assert set(np.unique(labels)) <= {0, 1} and (labels >= 0).all()  # top / leg voted from points


def test_cli_offers_every_scheduler():
    from gen3d.cli import main as gen3d_main
    from gen3d.sample import SCHEDULERS

    option = next(p for p in gen3d_main.commands["sample"].params if p.name == "scheduler")
    assert tuple(option.type.choices) == SCHEDULERS


def test_cli_defaults_are_the_library_defaults():
    from gen3d.cli import main as gen3d_main
    from gen3d.sample import DEFAULT_SCHEDULER, DEFAULT_STEPS

    params = {p.name: p for p in gen3d_main.commands["sample"].params}
    assert (params["scheduler"].default, params["steps"].default) == (DEFAULT_SCHEDULER, DEFAULT_STEPS)


def test_sde_dpm_steps_are_uniform_in_log_snr(tiny_model):
    """sde-dpm spaces its steps uniformly in lambda = log(alpha / sigma) (Lu et al. 2022), dpm uniformly in t."""
    import torch

    from gen3d.sample import make_scheduler

    def lambdas(kind):
        s = make_scheduler(kind, tiny_model)
        s.set_timesteps(25)
        a = s.alphas_cumprod[s.timesteps.long()]
        return s.timesteps.numpy(), (0.5 * torch.log(a / (1 - a))).numpy()

    t, lam = lambdas("sde-dpm")
    assert len(t) == 25 and (np.diff(t) < 0).all()
    steps = np.diff(lam)
    # integer timesteps round lambda; away from t = 0 (where lambda is steep in t) the spacing is even
    assert (steps > 0).all() and np.ptp(steps[:-3]) < 0.2 * steps[:-3].mean()  # 0.09 here; uniform t: 0.68
    t_dpm, lam_dpm = lambdas("dpm")
    assert np.ptp(np.diff(t_dpm)) <= 1 and np.ptp(np.diff(lam_dpm)) > 0.5 * np.diff(lam_dpm).mean()


def test_log_snr_power_spacing(tiny_model):
    """log_snr_timesteps: power 1 is uniform in log-SNR; power < 1 moves steps towards the
    data; always exactly `steps` distinct decreasing timesteps from T - 1 (or first_timestep);
    sampling_scheduler uses them."""
    import torch

    from gen3d.sample import log_snr_timesteps, make_scheduler, sample_clouds, sampling_scheduler

    a = make_scheduler("sde-dpm", tiny_model).alphas_cumprod

    def lam(ts):
        x = a[torch.tensor(ts)].double()
        return (0.5 * torch.log(x / (1 - x))).numpy()

    even = np.diff(lam(log_snr_timesteps(a, 25, 1.0)))   # rounding to integer t aside, uniform in lambda
    assert (even > 0).all() and np.ptp(even[:-3]) < 0.1 * even[:-3].mean()
    assert abs(even[:-3].mean() - (lam([0]) - lam([999]))[0] / 25) < 0.02

    for steps in (1, 25, 200, 1000):
        for power in (0.3, 0.65, 1.0, 2.0):
            ts = log_snr_timesteps(a, steps, power)
            assert len(ts) == steps and ts[0] == 999 and min(ts) >= 0 and (np.diff(ts) < 0).all()
    flat, warped = np.diff(lam(log_snr_timesteps(a, 25, 1.0))), np.diff(lam(log_snr_timesteps(a, 25, 0.65)))
    assert warped[0] > 1.5 * flat[0] and warped[15] < flat[15]   # bigger steps at high noise, smaller later
    assert lam(log_snr_timesteps(a, 25, 0.65))[12] > lam(log_snr_timesteps(a, 25, 1.0))[12]
    with pytest.raises(ValueError, match="steps"):
        log_snr_timesteps(a, 1001)
    with pytest.raises(ValueError, match="power"):
        log_snr_timesteps(a, 10, 0.0)

    late = log_snr_timesteps(a, 25, 1.0, first_timestep=800)   # a lower start: uniform from lambda(800)
    assert late[0] == 800 and len(set(late)) == 25 and (np.diff(late) < 0).all() and min(late) >= 0
    step = np.diff(lam(late))
    assert abs(step[:-3].mean() - (lam([0]) - lam([800]))[0] / 25) < 0.02 and step[0] < even[0]
    assert log_snr_timesteps(a, 801, 1.0, first_timestep=800) == list(range(800, -1, -1))
    for bad in (-1, 1000):
        with pytest.raises(ValueError, match="first_timestep"):
            log_snr_timesteps(a, 10, first_timestep=bad)
    with pytest.raises(ValueError, match="steps"):
        log_snr_timesteps(a, 802, first_timestep=800)

    sched = sampling_scheduler("sde-dpm", tiny_model, 10, first_timestep=800)
    assert sched.timesteps.tolist() == log_snr_timesteps(a, 10, 1.0, 800)
    with pytest.raises(ValueError, match="first_timestep"):
        sampling_scheduler("ddpm", tiny_model, 10, first_timestep=800)
    sched = sampling_scheduler("sde-dpm", tiny_model, 10, log_snr_power=0.65)
    assert sched.timesteps.tolist() == log_snr_timesteps(a, 10, 0.65) and sched.config.use_lu_lambdas is False
    with pytest.raises(ValueError, match="log_snr_power"):
        sampling_scheduler("ddim", tiny_model, 10, log_snr_power=0.65)
    with pytest.raises(ValueError, match="no setting"):
        sampling_scheduler("dpm", tiny_model, 10, karras=True)
    pts = sample_clouds(load_generator(tiny_model, "cpu"), tiny_model, [0, 1], 256, "sde-dpm", 4,
                        scheduler_options={"log_snr_power": 0.65})
    assert pts.shape == (2, 256, 3) and np.isfinite(pts).all()


def test_resuming_with_another_sampler_is_refused(tmp_path, tiny_model):
    out = tmp_path / "g.h5"
    generate_collection("mug", 2, out, tiny_model, "sde-dpm", 3, batch_size=2, mesh=False, progress=False)
    with Collection(out) as c:
        assert c.provenance(0)["scheduler_settings"]["use_lu_lambdas"] is True
    for scheduler, steps in [("sde-dpm", 4), ("dpm", 3)]:
        with pytest.raises(ValueError, match="another sampler") as err:
            generate_collection("mug", 3, out, tiny_model, scheduler, steps, batch_size=2, mesh=False, progress=False)
        assert str(out) in str(err.value)
    # a shape written when the sampler's definition was different (here: another spacing) is refused too
    with Collection(out) as c:
        record = c.record(0)
    record.shape_id = "mug-gen-s0-000002"
    record.provenance["scheduler_settings"]["use_lu_lambdas"] = False
    append_records(out, [record])
    with pytest.raises(ValueError, match="scheduler_settings"):
        generate_collection("mug", 4, out, tiny_model, "sde-dpm", 3, batch_size=2, mesh=False, progress=False)
    with Collection(out) as c:
        assert len(c) == 3, "a refused resume writes nothing"
    # another seed has other ids, so it may share the file
    res = CliRunner().invoke(main, ["sample", "--category", "mug", "-n", "3", "--checkpoint", str(tiny_model),
                                    "--scheduler", "ddim", "--steps", "3", "--out", str(out), "--no-mesh"])
    assert res.exit_code != 0 and "another sampler" in res.output and "Traceback" not in res.output
    assert generate_collection("mug", 1, out, tiny_model, "ddim", 3, seed=1, mesh=False, progress=False)["generated"] == 1


def test_first_timestep_reaches_the_solver_and_the_provenance(tmp_path, tiny_model):
    out = tmp_path / "g.h5"
    generate_collection("mug", 2, out, tiny_model, "sde-dpm", 3, batch_size=2, mesh=False, progress=False,
                        first_timestep=800)
    with Collection(out) as c:
        num_points = len(c.points(0))
    model = load_generator(tiny_model, "cpu")
    direct = sample_clouds(model, tiny_model, [0, 1], num_points, "sde-dpm", 3, scheduler_options={"first_timestep": 800})
    default = sample_clouds(model, tiny_model, [0, 1], num_points, "sde-dpm", 3)
    with Collection(out) as c:
        assert c.provenance(0)["first_timestep"] == 800
        np.testing.assert_allclose(np.stack([c.points(0), c.points(1)]), direct, atol=1e-5)
        assert not np.allclose(c.points(0), default[0], atol=1e-3)
    with pytest.raises(ValueError, match="first_timestep: stored 800, asked None"):
        generate_collection("mug", 3, out, tiny_model, "sde-dpm", 3, batch_size=2, mesh=False, progress=False)
    # a shape from before the field existed counts as started at the default
    old = tmp_path / "old.h5"
    generate_collection("mug", 1, old, tiny_model, "sde-dpm", 3, mesh=False, progress=False)
    with Collection(old) as c:
        record = c.record(0)
    record.shape_id = "mug-gen-s0-000001"
    del record.provenance["first_timestep"]
    append_records(old, [record])
    assert generate_collection("mug", 3, old, tiny_model, "sde-dpm", 3, mesh=False, progress=False)["generated"] == 1
    res = CliRunner().invoke(main, ["sample", "--category", "mug", "-n", "1", "--checkpoint", str(tiny_model),
                                    "--scheduler", "ddim", "--steps", "3", "--first-timestep", "800",
                                    "--out", str(tmp_path / "d.h5"), "--no-mesh"])
    assert res.exit_code != 0 and "applies to dpm and sde-dpm" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["sample", "--category", "mug", "-n", "1", "--checkpoint", str(tiny_model),
                                    "--steps", "3", "--first-timestep", "1000", "--out", str(tmp_path / "d.h5"), "--no-mesh"])
    assert res.exit_code != 0 and "first_timestep must be in 0..999" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "d.h5").exists()
