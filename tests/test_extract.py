"""distill extract / vote and pdeval score on procedural and real Labeled-PSB chairs."""
from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from distill.cli import main as distill_main
from distill.extract import ExtractSettings, extract, shape_key
from distill.knowledge import KnowledgeFile
from distill.teachers import parse_teacher_spec
from eval.cli import main as pdeval_main
from gen3d.collection import Collection
from gen3d.pool import PoolSettings, pool

SIM = "simulated:pixel:p_miss=0.2:p_wrong=0.2:seed=3"
FAST = ExtractSettings(num_views=4, image_size=96, dense_samples=20_000)


@pytest.fixture(scope="module")
def chairs(tmp_path_factory, labeled_psb_archive):
    path = tmp_path_factory.mktemp("extract") / "chairs.h5"
    pool(path, ["procedural:chair:3:seed=0", f"labeled-psb:chair:split=test:root={labeled_psb_archive}"],
         PoolSettings(num_points=1024))
    return path


def test_extract_writes_units_for_every_shape_and_resumes_from_cache(tmp_path, chairs):
    out = tmp_path / "k.h5"
    rep = extract(chairs, [SIM], out, FAST, progress=False)
    with Collection(chairs) as c:
        assert rep.shapes == len(c) == 13 and rep.extracted == 13
        keys = [shape_key(c, i) for i in range(len(c))]
        labels = [c.labels(i) for i in range(len(c))]
    agree_clean, agree_corrupt = [], []
    with KnowledgeFile(out) as kf:
        assert kf.simulated and list(kf.teachers) == [SIM]
        assert [tuple(k) for k in kf.keys()] == keys
        for i in range(len(kf)):
            u = kf.units(i)
            assert u.num_units > 0
            assert ((u.point_index >= 0) & (u.point_index < 1024)).all()
            np.testing.assert_allclose(u.confidence, u.unit_probs.max(1), rtol=1e-6)
            assert set(np.unique(u.corrupted)) <= {0, 1}
            # clean units label their points with the ground truth far more often than corrupted ones
            # (not always: a clean component can absorb a few pixels of a missed neighbouring part)
            entry_corrupt = u.corrupted[u.unit_of_entry] == 1
            agree = u.point_probs.argmax(1) == labels[i][u.point_index]
            agree_clean.append(agree[~entry_corrupt])
            agree_corrupt.append(agree[entry_corrupt])
            ex = kf.extras(i)
            assert ex["gt_label_maps"].shape == (4, 96, 96) and ex["pixel_index"].shape == (4, 96, 96)
    clean, corrupt = np.concatenate(agree_clean).mean(), np.concatenate(agree_corrupt).mean()
    assert clean > 0.8 and corrupt < clean - 0.3, (clean, corrupt)
    first = out.read_bytes()
    rep2 = extract(chairs, [SIM], out, FAST, progress=False)
    assert rep2.extracted == 0 and rep2.cached == 13
    with KnowledgeFile(out) as a:
        n_units = [a.units(i).num_units for i in range(len(a))]
    assert sum(n_units) == rep.units and len(first) > 0
    # the same keys with other geometry (pooled again with another point count) are extracted again,
    # into the same cache folder, not read back stale
    other = tmp_path / "chairs_512.h5"
    pool(other, ["procedural:chair:3:seed=0"], PoolSettings(num_points=512))
    rep3 = extract(other, [SIM], tmp_path / "k512.h5", FAST, cache_dir=out.with_name(out.name + ".cache"),
                   progress=False)
    assert rep3.extracted == 3 and rep3.cached == 0
    with KnowledgeFile(tmp_path / "k512.h5") as kf:
        assert all(kf.units(i).point_index.max() < 512 for i in range(len(kf)))


def test_uncorrupted_simulated_teacher_gives_units_that_agree_exactly_with_ground_truth(tmp_path, chairs):
    """Render, label maps and extraction are consistent: every masked point gets its own GT part."""
    out = tmp_path / "exact.h5"
    extract(chairs, ["simulated:pixel:p_miss=0:p_wrong=0"], out, FAST, progress=False)
    with KnowledgeFile(out) as kf, Collection(chairs) as c:
        for i in range(len(kf)):
            u = kf.units(i)
            np.testing.assert_array_equal(u.point_probs.argmax(1), c.labels(i)[u.point_index])
            assert (u.corrupted == 0).all()


def test_several_teachers_are_pooled_and_tagged(tmp_path, chairs):
    out = tmp_path / "k2.h5"
    specs = [SIM, "simulated:box:p_miss=0:p_wrong=0:box_enlarge=0"]
    extract(chairs, specs, out, FAST, splits=["test"], progress=False)
    with KnowledgeFile(out) as kf:
        assert len(kf) == 10 and list(kf.teachers) == [str(parse_teacher_spec(s)) for s in specs]
        u = kf.units(0)
        assert set(np.unique(u.teacher)) == {0, 1}
        # the uncorrupted box teacher's units are all clean
        assert (u.corrupted[u.teacher == 1] == 0).all()


def test_extract_errors_are_clear(tmp_path, chairs):
    with pytest.raises(ValueError, match="unknown teacher"):
        extract(chairs, ["glip"], tmp_path / "x.h5", FAST, progress=False)
    res = CliRunner().invoke(distill_main, ["extract", str(chairs), "--teacher", "fewshot:/no/such/teacher",
                                            "--out", str(tmp_path / "x.h5")])
    assert res.exit_code != 0 and "/no/such/teacher" in res.output
    assert not (tmp_path / "x.h5").exists()


def test_vote_and_score_cli_on_real_test_meshes(tmp_path, chairs):
    k, vote, score = tmp_path / "k.h5", tmp_path / "vote.h5", tmp_path / "score"
    r = CliRunner()
    res = r.invoke(distill_main, ["extract", str(chairs), "--teacher", "simulated:pixel:p_miss=0:p_wrong=0",
                                  "--out", str(k), "--views", "4", "--image-size", "96", "--split", "test"])
    assert res.exit_code == 0, res.output
    res = r.invoke(distill_main, ["vote", str(chairs), str(k), "--out", str(vote)])
    assert res.exit_code == 0, res.output
    res = r.invoke(pdeval_main, ["score", str(chairs), str(vote), "--out", str(score), "--split", "test"])
    assert res.exit_code == 0, res.output
    import json

    s = json.loads((score / "scores.json").read_text())
    # an uncorrupted simulated teacher: voting recovers most of the ground truth on covered points
    assert s["shapes"] == 10
    assert s["points"]["one"]["instance_miou"] > 0.6
    assert s["faces"]["per_face"]["one"]["instance_miou"] > 0.6
    assert (score / "sheet.png").stat().st_size > 1000 and (score / "scores.md").exists()
