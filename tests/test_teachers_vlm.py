"""The two vision-language teachers (CLIP / MaskCLIP and OWLv2) and their prompts.

No pretrained weights exist on the test machines, so the teachers are built with tiny random
weights (``random_init(..., allow_random=True)``); the tests check the output contract of
``distill.teachers.base.TeacherOutput``, known-answer properties of the MaskCLIP dense path and of
the box post-processing, the offline weight-loading paths (local files written here) and the
errors a user sees without weights.
"""
from __future__ import annotations

import warnings

import pytest
import torch

from distill.teachers.base import RandomWeightsWarning, TeacherWeightsError
from distill.teachers.clip import (
    TINY_CLIP_CONFIG,
    ClipTeacher,
    open_clip_bpe_tokenizer,
)
from distill.teachers.detector import (
    DetectorTeacher,
    boxes_to_pixels,
    clip_tokenizer_from_open_clip,
    select_boxes,
)
from distill.teachers.prompts import (
    PART_TEMPLATES,
    category_part_phrases,
    expand_prompts,
    shapenetpart_prompt_table,
)
from gen3d.parts import part_names, part_prompts, shapenetpart_categories

CHAIR = list(part_prompts("chair"))  # back, seat, leg, armrest: R = 4


def _quiet(factory, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomWeightsWarning)
        return factory(*args, allow_random=True, **kwargs)


@pytest.fixture(scope="module")
def clip_teacher() -> ClipTeacher:
    return _quiet(ClipTeacher.random_init, category="chair")


@pytest.fixture(scope="module")
def detector() -> DetectorTeacher:
    return _quiet(DetectorTeacher.random_init, category="chair", threshold=0.0)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------- prompts and tokenizers
def test_prompts_cover_all_shapenetpart_categories():
    table = shapenetpart_prompt_table()
    assert list(table) == list(shapenetpart_categories()) and len(table) == 16
    for cat, entry in shapenetpart_categories().items():
        sentences = table[cat]
        assert len(sentences) == len(entry["parts"])
        for phrase, group in zip(entry["prompts"], sentences):
            assert len(group) == len(PART_TEMPLATES)
            assert all(phrase in s and entry["name"].lower() in s for s in group), group
    # the canonical part names (``_`` read as a space) work as phrases too
    for cat, sentences in shapenetpart_prompt_table(source="names").items():
        for name, group in zip(part_names(cat), sentences):
            assert all(name.replace("_", " ") in s for s in group)


def test_expand_prompts_rejects_bad_input():
    assert expand_prompts(["leg"], None, ["a {part}."]) == [["a leg."]]
    assert expand_prompts(["leg"], "03001627", ["{part} of {category}"]) == [["leg of chair"]]
    with pytest.raises(ValueError, match="at least one"):
        expand_prompts([], "chair")
    with pytest.raises(ValueError, match="{part}"):
        expand_prompts(["leg"], "chair", ["a photo of a {category}."])
    with pytest.raises(ValueError, match="source"):
        category_part_phrases("chair", source="glip")


def test_bpe_tokenizers_work_offline_and_agree():
    import open_clip

    prompts = [s for group in expand_prompts(CHAIR, "chair") for s in group] + ["the gas tank of a motorbike."]
    simple = open_clip.get_tokenizer("ViT-B-16")  # open_clip's bundled BPE: no download
    ids = simple(prompts)
    assert ids.shape == (len(prompts), 77) and bool((ids[:, 0] == 49406).all())
    hf = clip_tokenizer_from_open_clip(16)
    enc = hf(prompts, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    assert torch.equal(enc["input_ids"], open_clip_bpe_tokenizer(16)(prompts))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (49406, 49407, 0)


def test_every_shapenetpart_prompt_fits_owlv2_context():
    tok = open_clip_bpe_tokenizer()
    for source in ("partdistill", "names"):
        for cat, sentences in shapenetpart_prompt_table(source=source).items():
            for s in (s for group in sentences for s in group):
                assert len(tok.encode(s)) + 2 <= 16, (cat, s)


# ---------------------------------------------------------------- CLIP teacher
def test_clip_output_contract(clip_teacher, images):
    out = clip_teacher(images, CHAIR)
    assert (out.kind, out.teacher, out.simulated) == ("pixel", "clip", False)
    assert out.boxes is None and out.corrupted is None
    assert out.probs.shape == (2, 4, 64, 64) and out.probs.dtype == torch.float32
    assert out.probs.device == images.device
    assert bool((out.probs >= 0).all()) and bool((out.probs <= 1).all())
    torch.testing.assert_close(out.probs.sum(dim=1), torch.ones(2, 64, 64), atol=1e-5, rtol=0)
    # any image size comes back at its own size
    odd = clip_teacher(torch.rand(3, 3, 48, 80), CHAIR[:2])
    assert odd.probs.shape == (3, 2, 48, 80)
    torch.testing.assert_close(odd.probs.sum(dim=1), torch.ones(3, 48, 80), atol=1e-5, rtol=0)


def test_clip_is_deterministic_and_seeded(clip_teacher, images):
    first = clip_teacher(images, CHAIR).probs
    assert torch.equal(first, clip_teacher(images, CHAIR).probs)
    # batching does not change the answer
    one_by_one = torch.cat([clip_teacher(images[i:i + 1], CHAIR).probs for i in range(2)])
    torch.testing.assert_close(one_by_one, first, atol=1e-5, rtol=0)
    rng = torch.get_rng_state()
    again = _quiet(ClipTeacher.random_init, category="chair")
    assert torch.equal(torch.get_rng_state(), rng), "random_init must not move the global RNG"
    assert torch.equal(again(images, CHAIR).probs, first)
    other = _quiet(ClipTeacher.random_init, category="chair", seed=1)
    assert not torch.allclose(other(images, CHAIR).probs, first)


def test_clip_text_embeddings_average_templates(clip_teacher):
    emb = clip_teacher.text_embeddings(CHAIR)
    assert emb.shape == (4, TINY_CLIP_CONFIG["embed_dim"]) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    model, tok = clip_teacher.model, clip_teacher.tokenizer
    with torch.no_grad():
        per_template = model.encode_text(tok(expand_prompts(CHAIR[1:2], "chair")[0]), normalize=True)
    expected = torch.nn.functional.normalize(per_template.mean(0), dim=0)
    torch.testing.assert_close(emb[1], expected, atol=1e-6, rtol=0)


def test_maskclip_dense_features_match_reference(clip_teacher, images):
    """Reference: open_clip's own forward up to the last block, then the last block's attention
    run on each token alone (a length-1 sequence attends only to itself, so attention = value)."""
    visual = clip_teacher.model.visual
    pixels = clip_teacher.preprocess(images)
    n_blocks = len(visual.transformer.resblocks)
    with torch.no_grad():
        tokens = visual.forward_intermediates(pixels, indices=[n_blocks - 2], output_fmt="NLC",
                                              intermediates_only=True)["image_intermediates"][0]
        last = visual.transformer.resblocks[-1]
        single = last.ln_1(tokens.reshape(-1, 1, tokens.shape[-1]))
        attended = last.ls_1(last.attn(single, single, single, need_weights=False)[0])
        ref = visual.ln_post(attended.reshape(tokens.shape)) @ visual.proj  # [B, gh*gw, D]
    dense = clip_teacher.dense_features(pixels)
    assert dense.shape == (2, TINY_CLIP_CONFIG["embed_dim"], 4, 4)
    torch.testing.assert_close(dense.flatten(2).transpose(1, 2), ref, atol=1e-5, rtol=1e-5)


def test_maskclip_identical_patches_give_identical_predictions(images):
    """Without positional embeddings, an image tiled with one patch has identical tokens at every
    layer, so every patch (and, after upsampling, every pixel) gets the same probabilities."""
    teacher = _quiet(ClipTeacher.random_init, seed=3)
    teacher.model.visual.positional_embedding.data.zero_()
    tile = images[:1, :, :16, :16]
    tiled = tile.repeat(1, 1, 4, 4)  # 64x64 = the model's input size: no resampling
    logits = teacher.patch_logits(tiled, CHAIR)
    torch.testing.assert_close(logits, logits[:, :, :1, :1].expand_as(logits), atol=1e-5, rtol=0)
    probs = teacher(tiled, CHAIR).probs
    torch.testing.assert_close(probs, probs[:, :, :1, :1].expand_as(probs), atol=1e-5, rtol=0)
    assert not torch.allclose(probs[0, :, 0, 0], torch.full((4,), 0.25), atol=1e-3)


def test_maskclip_last_block_does_not_mix_patches(images):
    """With one transformer block, a MaskCLIP patch feature depends on its own patch only; the
    ordinary CLIP output of that block (full attention) mixes patches."""
    cfg = {**TINY_CLIP_CONFIG, "vision_cfg": {**TINY_CLIP_CONFIG["vision_cfg"], "layers": 1}}
    teacher = _quiet(ClipTeacher.random_init, cfg, seed=2)
    edited = images[:1].clone()
    edited[:, :, :16, :16] = 1.0 - edited[:, :, :16, :16]  # patch (0, 0) only
    before, after = teacher.patch_logits(images[:1], CHAIR), teacher.patch_logits(edited, CHAIR)
    changed = (before - after).abs().amax(dim=1)[0]  # [4, 4]
    assert changed[0, 0] > 1e-3
    changed[0, 0] = 0
    assert float(changed.max()) < 1e-5
    with torch.no_grad():  # the full block does mix: other patches move
        full = [teacher.model.visual.forward_intermediates(teacher.preprocess(x), indices=[0], output_fmt="NLC",
                                                           intermediates_only=True)["image_intermediates"][0]
                for x in (images[:1], edited)]
    assert float((full[0] - full[1])[:, 1:].abs().max()) > 1e-3


def test_clip_temperature_sharpens(clip_teacher, images):
    soft = ClipTeacher(clip_teacher.model, clip_teacher.tokenizer, category="chair", temperature=1.0)
    sharp = ClipTeacher(clip_teacher.model, clip_teacher.tokenizer, category="chair", temperature=50.0)
    p_soft, p_sharp = soft(images, CHAIR).probs, sharp(images, CHAIR).probs
    assert torch.equal(p_soft.argmax(1), p_sharp.argmax(1))
    assert bool((p_sharp.amax(1) >= p_soft.amax(1) - 1e-6).all())


def test_clip_input_size_interpolates_positions(clip_teacher, images):
    fine = ClipTeacher(clip_teacher.model, clip_teacher.tokenizer, input_size=96)
    assert fine.grid_size == (6, 6)
    assert fine.dense_features(fine.preprocess(images)).shape[-2:] == (6, 6)
    assert fine(images, CHAIR).probs.shape == (2, 4, 64, 64)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ClipTeacher(clip_teacher.model, clip_teacher.tokenizer, input_size=70)


def test_clip_from_local_checkpoint(clip_teacher, images, tmp_path, monkeypatch):
    import open_clip
    from safetensors.torch import save_file

    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS, "partdistill-tiny", TINY_CLIP_CONFIG)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in clip_teacher.model.state_dict().items()}, str(path))
    loaded = ClipTeacher.from_pretrained("partdistill-tiny", str(path), device="cpu", category="chair")
    torch.testing.assert_close(loaded(images, CHAIR).probs, clip_teacher(images, CHAIR).probs)
    # a folder holding the file works too
    assert ClipTeacher.from_pretrained("partdistill-tiny", tmp_path, device="cpu").grid_size == (4, 4)


def test_clip_weight_errors(tmp_path, monkeypatch):
    import open_clip

    missing = tmp_path / "nowhere" / "ViT-B-16.safetensors"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ClipTeacher.from_pretrained("ViT-B-16", str(missing))
    with pytest.raises(FileNotFoundError, match="no CLIP checkpoint"):
        ClipTeacher.from_pretrained("ViT-B-16", tmp_path)
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ClipTeacher.from_pretrained("ViT-Nope", "openai")

    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(TeacherWeightsError) as info:
        ClipTeacher.from_pretrained("ViT-B-16", "openai", device="cpu")
    message = str(info.value)
    assert "Name or service not known" in message and "HF_HUB_OFFLINE" in message
    assert "pretrained='/path/to/checkpoint'" in message and "quick_gelu=True" in message


def test_clip_random_init_needs_the_flag():
    with pytest.raises(ValueError, match="allow_random=True"):
        ClipTeacher.random_init()
    with pytest.warns(RandomWeightsWarning, match="meaningless"):
        ClipTeacher.random_init(allow_random=True)


# ---------------------------------------------------------------- detector teacher
def test_detector_output_contract(detector, images):
    out = detector(images, CHAIR)
    assert (out.kind, out.teacher, out.simulated) == ("box", "detector", False)
    assert out.probs is None and out.corrupted is None
    assert len(out.boxes) == len(out.box_probs) == 2
    for boxes, probs in zip(out.boxes, out.box_probs):
        assert boxes.dtype == probs.dtype == torch.float32
        assert boxes.ndim == 2 and boxes.shape[1] == 4 and probs.shape == (boxes.shape[0], 4)
        assert 1 <= boxes.shape[0] <= 16  # one box per 16x16 patch at most
        assert bool((boxes[:, 0] < boxes[:, 2]).all()) and bool((boxes[:, 1] < boxes[:, 3]).all())
        assert bool((boxes >= 0).all()) and bool((boxes <= 64).all())  # 64x64 images
        assert bool((probs >= 0).all()) and bool((probs <= 1).all())
        best = probs.max(dim=1).values
        assert bool((best[:-1] >= best[1:]).all()), "boxes are sorted by their best score"


def test_detector_boxes_stay_inside_non_square_images(detector):
    images = torch.rand(2, 3, 40, 64, generator=torch.Generator().manual_seed(1))
    raw, scores = detector.raw_predictions(images, CHAIR)
    assert raw.shape == (2, 16, 4) and scores.shape == (2, 16, 4)
    out = detector(images, CHAIR)
    for boxes in out.boxes:
        assert bool((boxes[:, [1, 3]] <= 40).all()) and bool((boxes[:, [0, 2]] <= 64).all())
        assert bool((boxes >= 0).all())


def test_detector_is_deterministic_and_thresholds(detector, images):
    a, b = detector(images, CHAIR), detector(images, CHAIR)
    for x, y in zip(a.boxes + a.box_probs, b.boxes + b.box_probs):
        assert torch.equal(x, y)
    raw, _ = detector.raw_predictions(images, CHAIR)
    everything = DetectorTeacher(detector.model, detector.tokenizer, category="chair", threshold=0.0,
                                 nms_iou=None, top_k=None)(images, CHAIR)
    for i in range(2):
        positive = ((raw[i, :, 2] > raw[i, :, 0]) & (raw[i, :, 3] > raw[i, :, 1])).sum()
        assert everything.boxes[i].shape[0] == int(positive)
    none = DetectorTeacher(detector.model, detector.tokenizer, threshold=1.01)(images, CHAIR)
    assert [tuple(x.shape) for x in none.boxes] == [(0, 4), (0, 4)]
    assert [tuple(x.shape) for x in none.box_probs] == [(0, 4), (0, 4)]
    capped = DetectorTeacher(detector.model, detector.tokenizer, threshold=0.0, top_k=2)(images, CHAIR)
    assert all(x.shape[0] <= 2 for x in capped.boxes)


def test_boxes_to_pixels_known_answers():
    boxes = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.25, 0.25, 0.5, 0.5], [1.0, 1.0, 0.5, 0.5]])
    square = boxes_to_pixels(boxes, 64, 64)
    torch.testing.assert_close(square, torch.tensor([[0.0, 0, 64, 64], [0, 0, 32, 32], [48, 48, 64, 64]]))
    # a 32x64 image was padded at the bottom to 64x64: boxes are clipped to its 32 rows
    wide = boxes_to_pixels(boxes, 32, 64)
    torch.testing.assert_close(wide, torch.tensor([[0.0, 0, 64, 32], [0, 0, 32, 32], [48, 32, 64, 32]]))


def test_select_boxes_known_answers():
    boxes = torch.tensor([[0.0, 0, 10, 10], [0, 0, 10, 9], [0, 0, 10, 9], [20, 20, 30, 30], [5, 5, 5, 8]])
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.1, 0.7], [0.05, 0.3], [0.99, 0.0]])
    kept, probs = select_boxes(boxes, scores, threshold=0.2, top_k=None, nms_iou=0.5)
    # box 1 duplicates box 0 (same part) and goes; box 2 overlaps too but is another part; box 3
    # scores 0.3 >= 0.2; box 4 has zero width
    torch.testing.assert_close(kept, boxes[[0, 2, 3]])
    torch.testing.assert_close(probs, scores[[0, 2, 3]])
    kept, _ = select_boxes(boxes, scores, threshold=0.0, top_k=2, nms_iou=None)
    torch.testing.assert_close(kept, boxes[[0, 1]])


def test_detector_text_queries_average_templates(detector):
    emb = detector.text_embeddings(CHAIR)
    assert emb.shape == (4, 32) and emb.dtype == torch.float32
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(4))
    assert not torch.allclose(emb[0], emb[1])


def test_detector_from_saved_folder(detector, images, tmp_path):
    folder = tmp_path / "owlv2"
    detector.model.save_pretrained(folder)
    # without tokenizer files the bundled CLIP BPE is used (same ids as OWLv2's own tokenizer)
    plain = DetectorTeacher.from_pretrained(folder, device="cpu", category="chair", threshold=0.0)
    detector.tokenizer.save_pretrained(folder)
    full = DetectorTeacher.from_pretrained(str(folder), device="cpu", category="chair", threshold=0.0)
    ref = detector(images, CHAIR)
    for loaded in (plain, full):
        out = loaded(images, CHAIR)
        for x, y in zip(out.boxes + out.box_probs, ref.boxes + ref.box_probs):
            torch.testing.assert_close(x, y)


def test_detector_weight_errors(tmp_path):
    missing = tmp_path / "no-owlv2-here"
    with pytest.raises(FileNotFoundError, match="no-owlv2-here"):
        DetectorTeacher.from_pretrained(missing)
    with pytest.raises(FileNotFoundError, match="config.json"):
        DetectorTeacher.from_pretrained(tmp_path)
    with pytest.raises(TeacherWeightsError) as info:
        DetectorTeacher.from_pretrained("partdistill-tests/no-such-owlv2", local_files_only=True, device="cpu")
    assert "save_pretrained" in str(info.value) and "partdistill-tests/no-such-owlv2" in str(info.value)


def test_detector_random_init_needs_the_flag():
    with pytest.raises(ValueError, match="allow_random=True"):
        DetectorTeacher.random_init()
    with pytest.warns(RandomWeightsWarning, match="meaningless"):
        DetectorTeacher.random_init(allow_random=True)


# ---------------------------------------------------------------- CUDA
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_teachers_on_cuda_match_cpu(clip_teacher, detector, images):
    cuda = images.cuda()
    clip_gpu = _quiet(ClipTeacher.random_init, category="chair", device="cuda")
    out = clip_gpu(cuda, CHAIR)
    assert out.probs.device.type == "cuda"
    torch.testing.assert_close(out.probs.cpu(), clip_teacher(images, CHAIR).probs, atol=1e-3, rtol=0)
    det_gpu = _quiet(DetectorTeacher.random_init, category="chair", threshold=0.0, device="cuda")
    raw_gpu, scores_gpu = det_gpu.raw_predictions(cuda, CHAIR)
    raw_cpu, scores_cpu = detector.raw_predictions(images, CHAIR)
    torch.testing.assert_close(raw_gpu.cpu(), raw_cpu, atol=1e-2, rtol=0)
    torch.testing.assert_close(scores_gpu.cpu(), scores_cpu, atol=1e-3, rtol=0)
    assert all(b.device.type == "cuda" for b in det_gpu(cuda, CHAIR).boxes)
