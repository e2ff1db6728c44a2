"""Student network: geometry ops against brute force, the Point-M2AE encoder (permutation
equivariance, local attention, masked packing), frozen-encoder mode, save/load, strict encoder
loading, and a tiny masked-autoencoder pre-training run (loss decreases, resume, export)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from distill.geometry import chamfer_l2, gather_points, group, knn, three_nn_interpolate
from distill.pretrain import (
    PointM2AEPretrainer,
    load_pretrain_config,
    multiscale_mask,
    pretrain,
    pretraining_batch,
    pretraining_dataset,
)
from distill.student import (
    ENCODER_ARGS,
    PAPER_ENCODER,
    EncoderLoadError,
    PointM2AEEncoder,
    Student,
    _attention_mask,
    load_student_config,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "distill"
TINY = load_student_config(CONFIGS / "student_tiny.yaml")["model"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These tensors are tiny: one intra-op thread avoids thread hand-offs, which cost far more than
    the work on a shared 2-core machine (a 30-step tiny pre-training run: ~2 s vs ~30 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cloud(b: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, 3, generator=g)
    return x / x.norm(dim=-1, keepdim=True) * torch.rand(b, n, 1, generator=g) ** (1 / 3)  # in the unit ball


# ----------------------------------------------------------------------------------------------
# geometry vs brute force
# ----------------------------------------------------------------------------------------------
def _brute_knn(q: np.ndarray, r: np.ndarray, k: int):
    d = ((q[:, :, None, :] - r[:, None, :, :]) ** 2).sum(-1)
    idx = np.argsort(d, axis=-1, kind="stable")[..., :k]
    return np.take_along_axis(d, idx, -1), idx


@pytest.mark.parametrize("max_pairs", [1 << 26, 150])  # one chunk / one query per chunk
def test_knn_matches_brute_force(max_pairs):
    q, r = _cloud(3, 37, 1), _cloud(3, 101, 2)
    for k in (1, 5, 101):
        d2, idx = knn(q, r, k, max_pairs=max_pairs)
        ref_d, ref_i = _brute_knn(q.double().numpy(), r.double().numpy(), k)
        assert d2.shape == (3, 37, k) and idx.dtype == torch.int64
        np.testing.assert_array_equal(idx.numpy(), ref_i)
        np.testing.assert_allclose(d2.numpy(), ref_d, rtol=1e-5, atol=1e-6)
    # differentiable distances
    qq = q.clone().requires_grad_()
    knn(qq, r, 3).dist2.sum().backward()
    assert torch.isfinite(qq.grad).all() and qq.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="k must be"):
        knn(q, r, 102)
    with pytest.raises(ValueError, match="batch"):
        knn(q[:2], r, 3)
    with pytest.raises(ValueError, match=r"\[B, \*, 3\]"):
        knn(q[..., :2], r, 3)


def test_gather_points_and_group():
    x = torch.randn(2, 50, 4, requires_grad=True)
    idx = torch.randint(0, 50, (2, 7, 3))
    out = gather_points(x, idx)
    assert out.shape == (2, 7, 3, 4)
    for b in range(2):
        for i in range(7):
            for j in range(3):
                assert torch.equal(out[b, i, j], x[b, idx[b, i, j]])
    out.sum().backward()
    counts = torch.zeros(2, 50).scatter_add_(1, idx.reshape(2, -1), torch.ones(2, 21))
    torch.testing.assert_close(x.grad, counts[..., None].expand(-1, -1, 4))

    pts = _cloud(2, 200, 3)
    centers = pts[:, :10]
    nb, gidx = group(pts, centers, 8)
    assert nb.shape == (2, 10, 8, 3)
    np.testing.assert_array_equal(gidx.numpy(), _brute_knn(centers.double().numpy(), pts.double().numpy(), 8)[1])
    torch.testing.assert_close(nb, gather_points(pts, gidx) - centers[:, :, None])
    assert torch.equal(gidx[:, :, 0], torch.arange(10).expand(2, -1))  # a centre is its own nearest point
    assert (nb[:, :, 0] == 0).all()


@pytest.mark.parametrize("max_pairs", [1 << 26, 100])  # dense weight matrix / gathered neighbours
def test_three_nn_interpolate_matches_brute_force(max_pairs):
    tgt, src = _cloud(2, 60, 4), _cloud(2, 9, 5)
    feats = torch.randn(2, 9, 5, requires_grad=True)
    got = three_nn_interpolate(tgt, src, feats, max_pairs=max_pairs)
    ref = np.zeros((2, 60, 5))
    t, s, f = tgt.double().numpy(), src.double().numpy(), feats.detach().double().numpy()
    for b in range(2):
        for i in range(60):
            d = ((s[b] - t[b, i]) ** 2).sum(-1)
            nn3 = np.argsort(d)[:3]
            w = 1.0 / (d[nn3] + 1e-8)
            ref[b, i] = (w[:, None] * f[b, nn3]).sum(0) / w.sum()
    np.testing.assert_allclose(got.detach().numpy(), ref, rtol=1e-4, atol=1e-5)
    got.sum().backward()  # each target's weights sum to 1: d(sum)/d(feats) = total weight per source
    wsum = np.zeros((2, 9))
    for b in range(2):
        for i in range(60):
            d = ((s[b] - t[b, i]) ** 2).sum(-1)
            nn3 = np.argsort(d)[:3]
            wsum[b, nn3] += (1.0 / (d[nn3] + 1e-8)) / (1.0 / (d[nn3] + 1e-8)).sum()
    np.testing.assert_allclose(feats.grad.numpy(), np.repeat(wsum[..., None], 5, -1), rtol=1e-4, atol=1e-5)
    feats = feats.detach()
    # at the source points themselves the features come back
    torch.testing.assert_close(three_nn_interpolate(src, src, feats, max_pairs=max_pairs), feats, atol=1e-4, rtol=1e-4)
    # fewer than 3 sources: one source copies its feature everywhere
    torch.testing.assert_close(three_nn_interpolate(tgt, src[:, :1], feats[:, :1], max_pairs=max_pairs),
                               feats[:, :1].expand(-1, 60, -1))
    assert three_nn_interpolate(tgt, src[:, :2], feats[:, :2], max_pairs=max_pairs).shape == (2, 60, 5)
    with pytest.raises(ValueError, match="does not match"):
        three_nn_interpolate(tgt, src, feats[:, :4])


def test_chamfer_l2_matches_brute_force():
    x, y = _cloud(3, 40, 6), _cloud(3, 25, 7)
    got = chamfer_l2(x, y)
    d = ((x.double()[:, :, None] - y.double()[:, None]) ** 2).sum(-1)
    ref = d.min(2).values.mean(1) + d.min(1).values.mean(1)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(chamfer_l2(y, x), got)
    assert torch.allclose(chamfer_l2(x, x[:, torch.randperm(40)]), torch.zeros(3), atol=1e-7)
    xx = x.clone().requires_grad_()
    chamfer_l2(xx, y).sum().backward()
    assert torch.isfinite(xx.grad).all()


# ----------------------------------------------------------------------------------------------
# encoder and student
# ----------------------------------------------------------------------------------------------
def test_student_shapes_and_point_order_equivariance():
    torch.manual_seed(0)
    student = Student(num_parts=5, **{**TINY, "freeze_encoder": False}).eval()
    pts = _cloud(2, 256, 8)
    logits = student(pts)
    assert logits.shape == (2, 256, 5) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert student.feature_dim == 16 + 32 + 64 + 9
    # FPS starts at point 0: permuting the other points leaves the tokens unchanged (same centres,
    # same groups as sets) and permutes the per-point logits the same way
    perm = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(255, generator=torch.Generator().manual_seed(1)) + 1])
    enc_a, enc_b = student.encoder(pts), student.encoder(pts[:, perm])
    for ca, cb in zip(enc_a.tokens.centers, enc_b.tokens.centers):
        assert torch.equal(ca, cb)
    for fa, fb in zip(enc_a.features, enc_b.features):
        torch.testing.assert_close(fa, fb, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(student(pts[:, perm]), logits[:, perm], atol=1e-5, rtol=1e-5)
    # the tokens do depend on the geometry
    assert not torch.allclose(student.encoder(pts * 0.5).features[-1], enc_a.features[-1], atol=1e-3)
    with pytest.raises(ValueError, match="at least 32 points"):
        student(pts[:, :20])
    with pytest.raises(ValueError, match="num_heads"):
        Student(num_parts=2, **{**TINY, "encoder_dims": [15, 32, 64]})


def test_local_attention_ignores_tokens_outside_the_radius():
    torch.manual_seed(0)
    enc = PointM2AEEncoder(**{**{k: TINY[k] for k in ENCODER_ARGS}, "local_radius": [0.5, 1.0, 2.0]}).eval()
    centers = _cloud(1, 32, 9)
    x = torch.randn(1, 32, 16)
    pos = enc.encoder_pos_embeds[0](centers)
    mask = _attention_mask(centers, 0.5, None)
    far = (centers[0] - centers[0, 0]).norm(dim=-1) >= 0.5
    assert far.any() and not far.all()
    y = x.clone()
    y[0, far] += torch.randn(int(far.sum()), 16)  # change only tokens outside token 0's radius
    out_x, out_y = enc.encoder_blocks[0](x, pos, mask), enc.encoder_blocks[0](y, pos, mask)
    # one block: token 0 sees only its neighbours (depth 1 in the tiny config)
    torch.testing.assert_close(out_x[0, 0], out_y[0, 0])
    assert not torch.allclose(out_x[0, far], out_y[0, far])
    # without the mask token 0 does see them
    assert not torch.allclose(enc.encoder_blocks[0](x, pos)[0, 0], enc.encoder_blocks[0](y, pos)[0, 0])


def test_multiscale_mask_is_consistent_across_stages():
    enc = PointM2AEEncoder(**{k: TINY[k] for k in ENCODER_ARGS})
    tokens = enc.tokenize(_cloud(3, 256, 10))
    noise = torch.rand(3, 8, generator=torch.Generator().manual_seed(0))
    visible = multiscale_mask(tokens, 0.8, noise)
    assert [v.shape for v in visible] == [(3, 32), (3, 16), (3, 8)]
    assert (visible[-1].sum(1) == 8 - int(0.8 * 8)).all()
    assert torch.equal(visible[-1], noise >= noise.sort(1).values[:, 6:7])  # the 6 smallest masked
    for s in (2, 1):
        for b in range(3):
            members = set(tokens.idx[s][b][visible[s][b]].flatten().tolist())
            assert members == set(torch.nonzero(visible[s - 1][b]).flatten().tolist())
    with pytest.raises(ValueError, match="mask_ratio"):
        multiscale_mask(tokens, 1.0, noise)


@pytest.mark.parametrize("local", [False, True])
def test_masked_encoding_matches_per_cloud_reference(local):
    """Packed, padded encoding of the visible tokens == encoding each cloud's visible tokens alone."""
    torch.manual_seed(1)
    enc = PointM2AEEncoder(**{k: TINY[k] for k in ENCODER_ARGS}).eval()
    tokens = enc.tokenize(_cloud(3, 256, 11))
    visible = multiscale_mask(tokens, 0.8, torch.rand(3, 8, generator=torch.Generator().manual_seed(2)))
    got = enc.encode(tokens, visible, local_attention=local)
    x_full = None
    for s in range(3):
        tok = enc.token_embed[0](tokens.neighborhood) if s == 0 else enc.token_embed[s](gather_points(x_full, tokens.idx[s]))
        pos = enc.encoder_pos_embeds[s](tokens.centers[s])
        x_full = tok.clone()
        for b in range(3):
            v = visible[s][b]
            c = tokens.centers[s][b:b + 1, v]
            mask = _attention_mask(c, enc.config.local_radius[s], None) if local else None
            x_full[b, v] = enc.encoder_blocks[s](tok[b:b + 1, v], pos[b:b + 1, v], mask)[0]
            torch.testing.assert_close(got[s][b, v], enc.encoder_norms[s](x_full[b, v]), atol=1e-5, rtol=1e-5)
            assert (got[s][b, ~v] == 0).all()


def test_frozen_encoder_stays_in_eval_mode_and_gets_no_gradient():
    torch.manual_seed(0)
    student = Student(num_parts=3, **TINY)  # freeze_encoder: true in the tiny config
    bns = [m for m in student.encoder.modules() if isinstance(m, torch.nn.BatchNorm1d)]
    assert bns and student.encoder_frozen
    student.train()
    assert student.training and student.head.training
    assert not any(m.training for m in student.encoder.modules())
    before = [bn.running_mean.clone() for bn in bns]
    loss = student(_cloud(2, 256, 12)).logsumexp(-1).mean()
    loss.backward()
    assert all(torch.equal(a, bn.running_mean) for a, bn in zip(before, bns))
    assert all(p.grad is None and not p.requires_grad for p in student.encoder.parameters())
    assert all(p.grad is not None for p in student.head.parameters())
    # learnable mode: the encoder trains (BatchNorm statistics move, gradients arrive)
    student.set_encoder_frozen(False)
    student.train()
    assert all(m.training for m in student.encoder.modules())
    student(_cloud(2, 256, 13)).logsumexp(-1).mean().backward()
    assert not all(torch.equal(a, bn.running_mean) for a, bn in zip(before, bns))
    assert all(p.grad is not None for p in student.encoder.parameters())
    assert student.config.freeze_encoder is False


def test_save_pretrained_round_trip(tmp_path):
    torch.manual_seed(3)
    student = Student(num_parts=4, **TINY).eval()
    for bn in (m for m in student.modules() if isinstance(m, torch.nn.BatchNorm1d)):
        bn.running_mean.normal_()
    student.save_pretrained(tmp_path, safe_serialization=True)
    loaded = Student.from_pretrained(tmp_path).eval()
    assert loaded.encoder_config() == student.encoder_config() and list(loaded.config.head_widths) == [32, 32, 16]
    assert loaded.encoder_frozen and not any(p.requires_grad for p in loaded.encoder.parameters())
    assert not loaded.train().encoder.training
    pts = _cloud(2, 256, 14)
    torch.testing.assert_close(loaded(pts), student(pts))


def _official_layout(encoder_state: dict) -> dict:
    """Our encoder state as an official Point-M2AE pre-training checkpoint would hold it."""
    sd = {}
    for k, v in encoder_state.items():
        if ("_conv." in k) and k.endswith("weight") and v.dim() == 2:
            v = v[..., None]  # Linear -> Conv1d(kernel 1)
        sd[f"module.h_encoder.{k}"] = v.clone()
    sd["module.mask_token"] = torch.zeros(1, 384)
    sd["module.h_decoder.0.blocks.0.norm1.weight"] = torch.ones(384)
    return {"base_model": sd, "epoch": 299}


def test_load_encoder_strict(tmp_path):
    torch.manual_seed(4)
    source = PointM2AEEncoder(**{k: TINY[k] for k in ENCODER_ARGS})
    for p in source.parameters():
        p.data.normal_()
    state = source.state_dict()

    # our export folder (what pretraining writes)
    source.save_pretrained(tmp_path / "enc", safe_serialization=True)
    student = Student(num_parts=2, **TINY)
    report = student.load_encoder(tmp_path / "enc")
    assert report.format == "pretrained-folder" and report.loaded == len(state)
    for k, v in student.encoder.state_dict().items():
        assert torch.equal(v, state[k]), k

    # official .pth layout: module. + h_encoder. prefixes, Conv1d weights; decoder keys reported, not loaded
    torch.save(_official_layout(state), tmp_path / "official.pth")
    student = Student(num_parts=2, **TINY)
    report = student.load_encoder(tmp_path / "official.pth")
    assert report.prefix == "h_encoder." and set(report.ignored) == {"mask_token", "h_decoder.0.blocks.0.norm1.weight"}
    for k, v in student.encoder.state_dict().items():
        assert torch.equal(v, state[k]), k

    # a wrong key set: every missing and unexpected key is named, and nothing is loaded
    bad = {k: v for k, v in state.items() if k != "encoder_norms.2.weight"}
    bad["encoder_blocks.0.blocks.7.attn.qkv.weight"] = torch.zeros(48, 16)
    save_file(bad, str(tmp_path / "bad.safetensors"))
    student = Student(num_parts=2, **TINY)
    before = {k: v.clone() for k, v in student.encoder.state_dict().items()}
    with pytest.raises(EncoderLoadError) as err:
        student.load_encoder(tmp_path / "bad.safetensors")
    msg = str(err.value)
    assert "missing keys (1): encoder_norms.2.weight" in msg
    assert "unexpected keys (1): encoder_blocks.0.blocks.7.attn.qkv.weight" in msg
    assert all(torch.equal(v, before[k]) for k, v in student.encoder.state_dict().items())

    # wrong shapes, a different encoder config, no encoder keys at all
    wrong = dict(state)
    wrong["encoder_norms.0.weight"] = torch.ones(17)
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(EncoderLoadError, match=r"shape mismatches \(1\): encoder_norms.0.weight"):
        student.load_encoder(tmp_path / "wrong.safetensors")
    other = Student(num_parts=2, **{**TINY, "local_radius": [0.3, 0.6, 1.2]})
    with pytest.raises(EncoderLoadError, match="local_radius"):
        other.load_encoder(tmp_path / "enc")
    torch.save({"model": {"fc1.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    with pytest.raises(EncoderLoadError, match="no encoder weights"):
        student.load_encoder(tmp_path / "other.pth")
    with pytest.raises(FileNotFoundError):
        student.load_encoder(tmp_path / "missing.pth")


def test_configs():
    full = load_student_config(CONFIGS / "student_m2ae.yaml")
    assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in PAPER_ENCODER.items()} == \
        {k: full["model"][k] for k in ENCODER_ARGS}
    assert Student(num_parts=4, **full["model"]).feature_dim == 681  # the official head width
    small = Student(num_parts=4, **load_student_config(CONFIGS / "student_small.yaml")["model"])
    assert small.feature_dim == 64 + 128 + 256 + 9
    assert load_pretrain_config()["model"]["num_groups"] == [512, 256, 64]  # defaults: paper sizes
    # each pretraining config takes its encoder from a student config, so its export loads there
    for size in ("tiny", "small", "m2ae"):
        pcfg = load_pretrain_config(CONFIGS / f"pretrain_{size}.yaml")
        scfg = load_student_config(CONFIGS / f"student_{size}.yaml")
        assert {k: pcfg["model"][k] for k in ENCODER_ARGS} == {k: scfg["model"][k] for k in ENCODER_ARGS}


# ----------------------------------------------------------------------------------------------
# pre-training
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chairs(tmp_path_factory) -> Path:
    from gen3d.collection import write_collection
    from gen3d.procedural import generate, generate_many

    records = list(generate_many("chair", 8, num_points=320))
    records += [generate("chair", 8, num_points=320, split="test"), generate("chair", 9, num_points=320, split="val")]
    path = tmp_path_factory.mktemp("chairs") / "chairs.h5"
    write_collection(path, records)
    return path


def _losses(out: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["loss"], r["lr"]) for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())]


def _eval_loss(model: PointM2AEPretrainer, data) -> float:
    model.eval()
    with torch.no_grad():
        return float(np.mean([model(*pretraining_batch(data, 8, 8, seed=123, step=s, augment=False)).loss.item()
                              for s in range(4)]))


def test_pretraining_decreases_loss_resumes_and_exports(chairs, tmp_path):
    config = load_pretrain_config(CONFIGS / "pretrain_tiny.yaml")
    with pytest.raises(ValueError, match="never reads"):
        pretraining_dataset([chairs], 256, splits=("train", "test"))
    data, sources = pretraining_dataset([chairs], 256, category="chair")
    assert len(data) == 9 and sum(s["shapes"] for s in sources) == 9  # 8 train + 1 val, never the test chair

    full = tmp_path / "full"
    info = pretrain([chairs], full, config, category="chair", progress=False)
    log = _losses(full)
    assert [s for s, _, _ in log] == list(range(1, 31)) and info["steps"] == 30 and info["shapes"] == 9
    # the Chamfer loss on fixed held-out masks (no augmentation, eval mode) drops well below that
    # of the freshly initialised model (single-batch training losses are too noisy to compare)
    trained = PointM2AEPretrainer(**config["model"])
    trained.load_state_dict(load_file(str(full / "checkpoints" / "step-0000030" / "model.safetensors")))
    torch.manual_seed(0)
    before, after = _eval_loss(PointM2AEPretrainer(**config["model"]), data), _eval_loss(trained, data)
    assert after < 0.75 * before, (before, after)
    with pytest.raises(FileExistsError):
        pretrain([chairs], full, config, progress=False)

    # interrupted after step 17 (last complete checkpoint: step 10; the log has a torn last line)
    part = tmp_path / "part"
    pretrain([chairs], part, config, category="chair", max_steps=17, progress=False)
    shutil.rmtree(part / "checkpoints" / "step-0000017")
    with open(part / "log.jsonl", "a") as fh:
        fh.write('{"step": 18, "lo')
    pretrain([chairs], part, config, category="chair", resume=True, progress=False)
    assert _losses(part) == log

    # the exported encoder loads into the matching student and equals the pretrained encoder
    student = Student(num_parts=4, **TINY)
    report = student.load_encoder(full)
    assert report.format == "pretrained-folder"
    for k, v in student.encoder.state_dict().items():
        assert torch.equal(v, trained.encoder.state_dict()[k]), k
    assert json.loads((full / "encoder" / "pretraining.json").read_text())["steps"] == 30
