"""The few-shot teacher (distill.teachers.fewshot) and the simulated teacher (distill.teachers.simulated).

Few-shot: a short schedule on synthetic "figures" (a top bar, a body and two legs in three grey levels on
white) must reach high foreground pixel accuracy on held-out figures; checkpoints round-trip exactly.
Simulated: clean settings reproduce the ground truth; corruption rates, confidences and determinism
follow the documented model, checked against slow numpy references.
"""
from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch
from scipy import ndimage

from distill.teachers.base import TeacherOutput
from distill.teachers.fewshot import (DEFAULT_CONFIG_PATH, FewShotTeacher, PartUNet, augment_batch,
                                      default_fewshot_config, fit_fewshot, load_fewshot_config,
                                      merge_fewshot_config)
from distill.teachers.simulated import SimulatedTeacher

PARTS = ["top", "body", "legs"]
GREYS = (0.3, 0.6, 0.3)  # top and legs share a grey: telling them apart needs context
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def figures(n: int, size: int = 64, seed: int = 0, noise: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` synthetic renders ``float32 [n, 3, size, size]`` and label maps ``int64 [n, size, size]``:
    a top bar (part 0), a body (part 1) and two legs (part 2) at random positions and sizes."""
    rng = np.random.default_rng(seed)
    images = np.ones((n, 3, size, size), np.float32)
    labels = np.full((n, size, size), -1, np.int64)
    for i in range(n):
        bw, bh = rng.uniform(0.22, 0.36) * size, rng.uniform(0.18, 0.28) * size
        cx, top = rng.uniform(0.38, 0.62) * size, rng.uniform(0.12, 0.25) * size
        th, tw = rng.uniform(0.08, 0.13) * size, bw * rng.uniform(1.1, 1.5)
        lw, lh = rng.uniform(0.05, 0.08) * size, rng.uniform(0.15, 0.25) * size
        rects = [(0, cx - tw / 2, top, cx + tw / 2, top + th),
                 (1, cx - bw / 2, top + th, cx + bw / 2, top + th + bh),
                 (2, cx - bw / 2, top + th + bh, cx - bw / 2 + lw, top + th + bh + lh),
                 (2, cx + bw / 2 - lw, top + th + bh, cx + bw / 2, top + th + bh + lh)]
        shade = rng.uniform(-0.05, 0.05)
        for part, x0, y0, x1, y1 in rects:
            ys, xs = slice(round(y0), round(y1)), slice(round(x0), round(x1))
            labels[i, ys, xs] = part
            images[i, :, ys, xs] = GREYS[part] + shade
    images = np.where(labels[:, None] >= 0, images + rng.normal(0, noise, images.shape), images)
    return torch.from_numpy(np.clip(images, 0, 1).astype(np.float32)), torch.from_numpy(labels)


def small_config(steps: int = 60) -> dict:
    return merge_fewshot_config({"model": {"widths": [16, 32, 48, 64], "groups": 8},
                                 "train": {"image_size": 64, "steps": steps, "batch_size": 8, "lr": 4e-3,
                                           "warmup_steps": 10}})


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run torch on one thread in this module: on a small machine shared by several jobs, oversubscribed
    intra-op threads spin and make these tiny convolutions up to ~10x slower (measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained():
    """A teacher trained on 48 figures (short schedule) and its training time in seconds."""
    images, labels = figures(48, seed=1)
    start = time.perf_counter()
    teacher = fit_fewshot(images, labels, PARTS, small_config(), seed=0, progress=False, device="cpu",
                          category="figure", shape_ids=[f"fig{i}" for i in range(6)])
    return teacher, time.perf_counter() - start


# --------------------------------------------------------------------------------------- few-shot

def test_fewshot_learns_held_out_figures(trained):
    teacher, seconds = trained
    images, labels = figures(24, seed=99)
    out = teacher(images, PARTS)
    assert isinstance(out, TeacherOutput) and out.kind == "pixel" and out.teacher == "fewshot"
    assert not out.simulated and out.corrupted is None
    assert out.probs.shape == (24, 3, 64, 64) and out.probs.dtype == torch.float32
    torch.testing.assert_close(out.probs.sum(1), torch.ones(24, 64, 64))
    fg = labels >= 0
    acc = (out.probs.argmax(1)[fg] == labels[fg]).float().mean().item()
    assert acc > 0.9, f"held-out foreground accuracy {acc:.3f} after {seconds:.1f} s of training"
    # The background class is learnt too (predict_labels: -1 = background).
    pred = teacher.predict_labels(images)
    assert (pred == labels).float().mean().item() > 0.9
    assert teacher.stats["train_foreground_accuracy"] > 0.9 and teacher.stats["steps"] == 60
    assert teacher.stats["pixel_counts"]["background"] > 0 and not teacher.training


def test_fewshot_resizes_inputs(trained):
    """Images of another size are resized to the network's size and the probabilities come back at
    the input size: a 96 x 96 render of the same figures is segmented about as well."""
    teacher, _ = trained
    images, labels = figures(8, size=96, seed=7)
    out = teacher(images, PARTS)
    assert out.probs.shape == (8, 3, 96, 96)
    fg = labels >= 0
    assert (out.probs.argmax(1)[fg] == labels[fg]).float().mean().item() > 0.85


def test_fewshot_wrong_prompt_count(trained):
    teacher, _ = trained
    images, _ = figures(2)
    with pytest.raises(ValueError, match="R = 3"):
        teacher(images, ["top", "body"])
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        teacher(images[:, 0], PARTS)


def test_fewshot_save_load_round_trip(trained, tmp_path):
    teacher, _ = trained
    images, _ = figures(5, seed=3)
    folder = teacher.save(tmp_path / "teacher")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["teacher"]  # no temporary folders left
    meta = json.loads((folder / "config.json").read_text())
    assert meta["part_names"] == PARTS and meta["category"] == "figure" and meta["shape_ids"][0] == "fig0"
    assert meta["stats"]["steps"] == 60 and meta["config"]["train"]["image_size"] == 64
    loaded = FewShotTeacher.load(folder)
    assert loaded.part_names == PARTS and loaded.shape_ids == teacher.shape_ids
    assert torch.equal(loaded(images, PARTS).probs, teacher(images, PARTS).probs)
    teacher.save(folder)  # overwriting an existing folder works and leaves nothing else behind
    assert [p.name for p in tmp_path.iterdir()] == ["teacher"]


def test_fewshot_load_errors(trained, tmp_path):
    teacher, _ = trained
    with pytest.raises(FileNotFoundError, match="config.json"):
        FewShotTeacher.load(tmp_path / "nothing")
    folder = teacher.save(tmp_path / "t")
    (folder / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="model.safetensors"):
        FewShotTeacher.load(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        FewShotTeacher.load(folder)
    folder = teacher.save(tmp_path / "t")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        FewShotTeacher.load(folder)
    # Weights that do not fit the model described in config.json.
    folder = teacher.save(tmp_path / "t")
    meta = json.loads((folder / "config.json").read_text())
    meta["model"]["widths"] = [8, 16, 32, 64]
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="model.safetensors"):
        FewShotTeacher.load(folder)


def test_fewshot_training_is_deterministic():
    images, labels = figures(8, seed=5)
    cfg = small_config(steps=3)
    state = torch.get_rng_state()
    a = fit_fewshot(images, labels, PARTS, cfg, seed=4, progress=False, device="cpu")
    b = fit_fewshot(images, labels, PARTS, cfg, seed=4, progress=False, device="cpu")
    c = fit_fewshot(images, labels, PARTS, cfg, seed=5, progress=False, device="cpu")
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    sa, sb, sc = a.net.state_dict(), b.net.state_dict(), c.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_fewshot_input_validation():
    images, labels = figures(4)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        fit_fewshot(images, labels, PARTS[:2], small_config(1), progress=False)
    with pytest.raises(ValueError, match="label_maps"):
        fit_fewshot(images, labels[:, :10], PARTS, small_config(1), progress=False)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fit_fewshot(images * 3, labels, PARTS, small_config(1), progress=False)


def test_augment_keeps_images_and_labels_aligned():
    """After a random flip / scale / rotation / shift (no colour jitter), pixels labelled part r still
    show part r's grey (away from edges, where bilinear sampling blends), and unlabelled ones are white."""
    images, labels = figures(16, seed=2, noise=0.0)
    greys = torch.tensor([*GREYS, 1.0])
    aug = {"hflip": 0.5, "scale": [0.7, 1.3], "rotate_deg": 20, "translate": 0.1, "brightness": 0,
           "contrast": 0, "saturation": 0, "channel_gain": 0, "noise": 0}
    out, lab = augment_batch(images, labels, aug, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and lab.dtype == torch.int64
    assert not torch.equal(lab, labels)
    lab_np = lab.numpy()
    inside = np.zeros(lab_np.shape, bool)  # pixels whose 3x3 neighbourhood has one label
    for i in range(len(lab_np)):
        for c in range(-1, 3):
            inside[i] |= ndimage.binary_erosion(lab_np[i] == c, np.ones((3, 3)))
    inside = torch.from_numpy(inside)
    expected = greys[(lab + 4) % 4]  # -1 -> white
    grey = out.mean(1)
    err = (grey - expected).abs()[inside]
    assert (err < 0.08).float().mean() > 0.97  # per-image shading is within +-0.05
    # A pure flip is exact.
    flip = {**aug, "hflip": 1.0, "scale": [1, 1], "rotate_deg": 0, "translate": 0}
    out, lab = augment_batch(images, labels, flip, torch.Generator().manual_seed(0))
    assert torch.equal(lab, labels.flip(-1))
    torch.testing.assert_close(out, images.flip(-1), atol=1e-5, rtol=0)


def test_augment_colour_jitter_leaves_background_white():
    images, labels = figures(8, seed=4)
    out, lab = augment_batch(images, labels, {"rotate_deg": 0, "scale": [1, 1], "translate": 0, "hflip": 0},
                             torch.Generator().manual_seed(1))
    assert torch.equal(lab, labels)
    bg = (lab < 0)[:, None].expand_as(out)
    torch.testing.assert_close(out[bg], images[bg], atol=1e-5, rtol=0)
    assert not torch.allclose(out[~bg], images[~bg], atol=0.01)
    assert out.min() >= 0 and out.max() <= 1


def test_fewshot_config_file_and_errors(tmp_path):
    cfg = load_fewshot_config()
    assert DEFAULT_CONFIG_PATH.is_file()
    defaults = default_fewshot_config()
    assert {k: cfg[k] for k in ("model", "train", "augment")} == {k: defaults[k] for k in ("model", "train", "augment")}
    net = PartUNet(5, cfg["model"]["widths"], cfg["model"]["groups"], cfg["model"]["global_context"])
    assert 1_000_000 <= sum(p.numel() for p in net.parameters()) <= 2_000_000
    x = torch.rand(2, 3, cfg["train"]["image_size"], cfg["train"]["image_size"])
    assert net(x).shape == (2, 5, *x.shape[-2:])
    with pytest.raises(FileNotFoundError):
        load_fewshot_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {stepz: 3}\n")
    with pytest.raises(ValueError, match="stepz"):
        load_fewshot_config(bad)
    with pytest.raises(ValueError, match="image_size"):
        merge_fewshot_config({"train": {"image_size": 100}})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fewshot_cuda(trained):
    teacher, _ = trained
    images, labels = figures(4, seed=11)
    cpu = teacher(images, PARTS).probs
    teacher.to("cuda")
    try:
        out = teacher(images.cuda(), PARTS)
        assert out.probs.device.type == "cuda"
        torch.testing.assert_close(out.probs.cpu(), cpu, atol=1e-4, rtol=0)
        small = fit_fewshot(images.cuda(), labels.cuda(), PARTS, small_config(2), progress=False, device="cuda")
        assert small.device.type == "cuda"
    finally:
        teacher.to("cpu")


# -------------------------------------------------------------------------------------- simulated

def layout(n: int, size: int = 48, seed: int = 0, num_parts: int = 4) -> torch.Tensor:
    """Random label maps ``int64 [n, size, size]``: 3-6 rectangles of random parts (later ones on top)."""
    rng = np.random.default_rng(seed)
    lab = np.full((n, size, size), -1, np.int64)
    for i in range(n):
        for _ in range(rng.integers(3, 7)):
            x0, y0 = rng.integers(0, size - 6, 2)
            w, h = rng.integers(4, 16, 2)
            lab[i, y0:y0 + h, x0:x0 + w] = rng.integers(num_parts)
    return torch.from_numpy(lab)


def clean_layout() -> tuple[torch.Tensor, list[dict]]:
    """Two label maps of separated rectangles, each part one rectangle; returns the maps and the
    expected (part, box) per image."""
    lab = torch.full((2, 40, 50), -1, dtype=torch.long)
    boxes = [{0: (3, 2, 20, 10), 1: (5, 12, 15, 30), 2: (30, 5, 48, 39)}, {2: (0, 0, 50, 3), 1: (10, 20, 11, 21)}]
    for b, parts in enumerate(boxes):
        for p, (x0, y0, x1, y1) in parts.items():
            lab[b, y0:y1, x0:x1] = p
    return lab, boxes


def images_for(lab: torch.Tensor) -> torch.Tensor:
    return torch.ones(lab.shape[0], 3, *lab.shape[1:])


@pytest.mark.parametrize("device", DEVICES)
def test_simulated_clean_boxes_are_tight_ground_truth(device):
    lab, expected = clean_layout()
    teacher = SimulatedTeacher("box", p_miss=0, p_wrong=0, box_enlarge=0, min_region_pixels=1)
    out = teacher(images_for(lab).to(device), PARTS, lab.to(device))
    assert out.kind == "box" and out.simulated and out.teacher == "simulated"
    for b in range(2):
        assert out.boxes[b].device.type == device
        got = {int(s.argmax()): tuple(box.tolist()) for box, s in zip(out.boxes[b].cpu(), out.box_probs[b].cpu())}
        assert got == {p: tuple(float(v) for v in box) for p, box in expected[b].items()}
        conf = out.box_probs[b].max(1).values
        assert ((conf >= 0.5) & (conf <= 1.0)).all()
        torch.testing.assert_close(out.box_probs[b].sum(1), torch.ones(len(conf), device=device))
        assert out.corrupted[b].dtype == torch.bool and not out.corrupted[b].any()


@pytest.mark.parametrize("device", DEVICES)
def test_simulated_clean_pixels_are_ground_truth(device):
    lab = layout(6, seed=3)
    out = SimulatedTeacher("pixel", p_miss=0, p_wrong=0)(images_for(lab).to(device), PARTS + ["x"], lab.to(device))
    assert out.kind == "pixel" and out.simulated and out.probs.shape == (6, 4, 48, 48)
    assert out.probs.device.type == device
    probs = out.probs.cpu()
    fg = lab >= 0
    assert torch.equal(probs.argmax(1)[fg], lab[fg])
    torch.testing.assert_close(probs.sum(1), torch.ones(6, 48, 48))
    assert out.corrupted.dtype == torch.bool and not out.corrupted.any()
    conf = probs.max(1).values[fg]
    assert conf.min() >= 0.5 and conf.max() <= 1.0
    torch.testing.assert_close(probs[:, :, ~fg[0]][0], torch.full_like(probs[:, :, ~fg[0]][0], 0.25))


def tight_regions(label_map: np.ndarray) -> list[tuple[int, tuple[int, int, int, int]]]:
    """Slow reference: (part, tight box in pixel edges) of every 8-connected region."""
    out = []
    for p in np.unique(label_map[label_map >= 0]):
        comp, n = ndimage.label(label_map == p, structure=np.ones((3, 3)))
        for r in range(1, n + 1):
            ys, xs = np.nonzero(comp == r)
            out.append((int(p), (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)))
    return out


def test_simulated_box_enlarge_and_regions():
    lab = layout(5, seed=8)
    e = 0.25
    teacher = SimulatedTeacher("box", p_miss=0, p_wrong=0, box_enlarge=e, min_region_pixels=1)
    out = teacher(images_for(lab), PARTS + ["x"], lab)
    for b in range(5):
        ref = sorted((p, (max(0, x0 - e * (x1 - x0)), max(0, y0 - e * (y1 - y0)),
                          min(48, x1 + e * (x1 - x0)), min(48, y1 + e * (y1 - y0))))
                     for p, (x0, y0, x1, y1) in tight_regions(lab[b].numpy()))
        got = sorted((int(s.argmax()), tuple(box.tolist())) for box, s in zip(out.boxes[b], out.box_probs[b]))
        assert [p for p, _ in got] == [p for p, _ in ref]
        np.testing.assert_allclose(np.array([bx for _, bx in got]), np.array([bx for _, bx in ref]), atol=1e-4)
    # units="part": one box per part present, covering all its regions.
    out = SimulatedTeacher("box", p_miss=0, p_wrong=0, box_enlarge=0, units="part", min_region_pixels=1)(
        images_for(lab), PARTS + ["x"], lab)
    for b in range(5):
        parts = sorted(int(s.argmax()) for s in out.box_probs[b])
        assert parts == sorted(set(lab[b][lab[b] >= 0].tolist()))


def test_simulated_p_wrong_one_corrupts_everything():
    lab = layout(10, seed=4)
    names = PARTS + ["x"]
    teacher = SimulatedTeacher("box", p_miss=0, p_wrong=1, box_enlarge=0, min_region_pixels=1)
    box = teacher(images_for(lab), names, lab, key=1)
    for b, units in enumerate(teacher.plan(lab, 4, key=1)):
        assert units.wrong.all() and (units.label != units.part).all()
        assert len(box.boxes[b]) == len(tight_regions(lab[b].numpy())) == units.num_units
        assert box.corrupted[b].all()
        assert sorted(box.box_probs[b].argmax(1).tolist()) == sorted(units.label.tolist())
    pix = SimulatedTeacher("pixel", p_miss=0, p_wrong=1)(images_for(lab), names, lab, key=1)
    fg = lab >= 0
    assert torch.equal(pix.corrupted, fg)
    assert (pix.probs.argmax(1)[fg] != lab[fg]).all()


def test_simulated_missed_pixels_take_nearest_other_part():
    lab = layout(4, size=32, seed=6)
    teacher = SimulatedTeacher("pixel", p_miss=0.5, p_wrong=0.0, seed=3)
    out = teacher(images_for(lab), PARTS + ["x"], lab, key=2)
    plans = teacher.plan(lab, 4, key=2)
    pred = out.probs.argmax(1)
    assert sum(int(u.missed.sum()) for u in plans) >= 4
    for b in range(4):
        units, l = plans[b], lab[b].numpy()
        missed = (units.unit_map >= 0) & units.missed[np.maximum(units.unit_map, 0)]
        assert np.array_equal(out.corrupted[b].numpy(), missed)
        assert np.array_equal(pred[b].numpy()[~missed & (l >= 0)], l[~missed & (l >= 0)])
        ys, xs = np.nonzero(l >= 0)
        for y, x in zip(*np.nonzero(missed)):
            other = l[ys, xs] != l[y, x]
            if not other.any():
                continue
            d = (ys[other] - y) ** 2 + (xs[other] - x) ** 2
            nearest = set(l[ys[other][d == d.min()], xs[other][d == d.min()]].tolist())
            assert int(pred[b, y, x]) in nearest  # ties may go either way
    # Box kind: missed units leave no box.
    boxes = SimulatedTeacher("box", p_miss=1.0, p_wrong=0.0)(images_for(lab), PARTS + ["x"], lab)
    assert all(len(b) == 0 and b.shape == (0, 4) for b in boxes.boxes)


def test_simulated_rates_and_confidence_independence():
    lab = layout(150, seed=10)
    names = PARTS + ["x"]
    p_miss, p_wrong = 0.3, 0.25
    teacher = SimulatedTeacher("box", p_miss=p_miss, p_wrong=p_wrong, conf_range=(0.4, 0.9), min_region_pixels=1,
                               seed=1)
    units = teacher.plan(lab, 4, key=0)
    n_units = sum(u.num_units for u in units)
    assert n_units > 600
    out = teacher(images_for(lab), names, lab, key=0)
    n_boxes = sum(len(b) for b in out.boxes)
    assert abs(1 - n_boxes / n_units - p_miss) < 0.06
    corrupted = torch.cat(out.corrupted)
    assert abs(corrupted.float().mean().item() - p_wrong) < 0.06
    conf = torch.cat(out.box_probs).max(1).values
    assert conf.min() >= 0.4 and conf.max() <= 0.9
    assert abs(conf[corrupted].mean() - conf[~corrupted].mean()) < 0.05
    assert abs(conf.mean() - 0.65) < 0.03
    # Pixel kind: fraction of corrupted units = p_miss + (1 - p_miss) p_wrong; confidence per unit
    # independent of corruption too.
    pix_teacher = SimulatedTeacher("pixel", p_miss=p_miss, p_wrong=p_wrong, seed=1)
    pix = pix_teacher(images_for(lab), names, lab, key=0)
    plans = pix_teacher.plan(lab, 4, key=0)
    flags = np.concatenate([u.corrupted for u in plans])
    assert abs(flags.mean() - (p_miss + (1 - p_miss) * p_wrong)) < 0.06
    unit_conf = np.concatenate([u.confidence for u in plans])
    assert abs(unit_conf[flags].mean() - unit_conf[~flags].mean()) < 0.05
    # The per-pixel mask agrees with the per-unit decisions and with the arg-max differing from GT.
    fg = lab >= 0
    assert torch.equal(pix.corrupted, fg & (pix.probs.argmax(1) != lab))
    for b in (0, 1, 2):
        u = plans[b]
        ref = (u.unit_map >= 0) & u.corrupted[np.maximum(u.unit_map, 0)]
        assert np.array_equal(pix.corrupted[b].numpy(), ref)


def test_simulated_determinism_by_key():
    lab = layout(6, seed=12)
    names = PARTS + ["x"]
    for kind in ("box", "pixel"):
        a = SimulatedTeacher(kind, seed=7)
        b = SimulatedTeacher(kind, seed=7)
        a(images_for(lab), names, lab, key=1)
        a(images_for(lab), names, lab)  # other calls in between do not matter
        out_a = a(images_for(lab), names, lab, key=5)
        out_b = b(images_for(lab), names, lab, key=5)
        other = b(images_for(lab), names, lab, key=6)
        if kind == "pixel":
            assert torch.equal(out_a.probs, out_b.probs) and torch.equal(out_a.corrupted, out_b.corrupted)
            assert not torch.equal(out_a.probs, other.probs)
        else:
            assert all(torch.equal(x, y) for x, y in zip(out_a.boxes, out_b.boxes))
            assert all(torch.equal(x, y) for x, y in zip(out_a.box_probs, out_b.box_probs))
            assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(out_a.box_probs, other.box_probs))
        # Per-image keys: the same image gets the same corruption in any batch order.
        perm = [3, 0, 5, 1, 4, 2]
        keys = [10 + i for i in range(6)]
        out1 = a(images_for(lab), names, lab, key=keys)
        out2 = b(images_for(lab[perm]), names, lab[perm], key=[keys[i] for i in perm])
        if kind == "pixel":
            assert torch.equal(out1.probs[perm], out2.probs)
        else:
            assert all(torch.equal(out1.box_probs[i], out2.box_probs[j]) for j, i in enumerate(perm))
        # key=None: an internal counter; a fresh teacher repeats the same sequence of calls.
        c, d = SimulatedTeacher(kind, seed=7), SimulatedTeacher(kind, seed=7)
        seq_c = [c(images_for(lab), names, lab) for _ in range(2)]
        seq_d = [d(images_for(lab), names, lab) for _ in range(2)]
        if kind == "pixel":
            assert torch.equal(seq_c[1].probs, seq_d[1].probs) and not torch.equal(seq_c[0].probs, seq_c[1].probs)


def test_simulated_errors():
    lab = layout(2, seed=1)
    t = SimulatedTeacher("pixel")
    with pytest.raises(ValueError, match="needs label_maps"):
        t(images_for(lab), PARTS + ["x"])
    with pytest.raises(ValueError, match=r"\[-1, 2\]"):
        t(images_for(lab), PARTS, lab)  # layout has 4 parts
    with pytest.raises(ValueError, match="1/R"):
        SimulatedTeacher("box", conf_range=(0.1, 0.9))(images_for(lab), PARTS + ["x"], lab)
    with pytest.raises(ValueError, match="disagree"):
        t(images_for(lab)[:1], PARTS + ["x"], lab)
    with pytest.raises(ValueError, match="one per image"):
        t(images_for(lab), PARTS + ["x"], lab, key=[1, 2, 3])
    for kwargs in ({"kind": "mask"}, {"p_miss": 1.5}, {"conf_range": (0.9, 0.5)}, {"units": "blob"}):
        with pytest.raises(ValueError):
            SimulatedTeacher(**kwargs)
