"""``gen3d pool``: source specs, pooling real + procedural + files + collections, resume, CLI."""
from __future__ import annotations

import numpy as np
import pytest
import trimesh
from click.testing import CliRunner

from gen3d.cli import main
from gen3d.collection import Collection
from gen3d.pool import PoolSettings, parse_source, pool
from gen3d.readers.psb import read_labeled_psb


def test_parse_source():
    s = parse_source("procedural:chair:1000:seed=3:split=val")
    assert (s.kind, s.args, s.options) == ("procedural", ["chair", "1000"], {"seed": "3", "split": "val"})
    assert parse_source("gen/chairs.h5:source=generated").kind == "collection"
    for bad in ("pointnet:chair", "procedural:chair:seed=1:10", "labeled-psb:=x"):
        with pytest.raises(ValueError, match="source"):
            parse_source(bad)


def test_pool_mix_resume_and_reads_back_identically(tmp_path, data_root):
    settings = PoolSettings(num_points=256, data_root=data_root)
    gen = tmp_path / "generated.h5"
    trimesh.creation.icosphere(2).export(tmp_path / "blob.obj")
    pool(gen, [f"files:{tmp_path / 'blob.obj'}:category=mug:source=generated"], settings)
    out = tmp_path / "pooled.h5"
    sources = ["labeled-psb:cup", "procedural:mug:6:seed=4", f"{gen}:source=generated"]
    report = pool(out, sources, settings, workers=2, commit_every=7)
    assert report.total == 27 and report.added == {sources[0]: 20, sources[1]: 6, sources[2]: 1}
    assert ("mug", "real", "train", 10) in report.summary and ("mug", "generated", "none", 1) in report.summary
    again = pool(out, sources + ["procedural:mug:8:seed=4"], settings, workers=1)
    assert again.total == 29 and again.skipped[sources[0]] == 20 and again.added["procedural:mug:8:seed=4"] == 2
    # the collection equals what the readers produce directly (same seeds, any worker count)
    direct = list(read_labeled_psb(data_root / "psb_labeled_kalogerakis2010" / "LabeledDB_new.tar.xz",
                                   ["cup"], num_points=256))
    with Collection(out) as c:
        for k, r in enumerate(direct):
            got = c.record(k)
            assert got.shape_id == r.shape_id and got.category == "mug"
            np.testing.assert_array_equal(got.points, r.points)
            np.testing.assert_array_equal(got.labels, r.labels)
            np.testing.assert_array_equal(got.mesh_faces, r.mesh_faces)
            np.testing.assert_array_equal(got.face_labels, r.face_labels)


def test_collection_source_resamples_to_new_n(tmp_path, data_root):
    src = tmp_path / "a.h5"
    pool(src, ["labeled-psb:cup:split=test"], PoolSettings(num_points=512, data_root=data_root))
    out = tmp_path / "b.h5"
    rep = pool(out, [f"{src}:split=test"], PoolSettings(num_points=128, keep_mesh=False, data_root=data_root))
    assert rep.total == 10
    with Collection(out) as c, Collection(src) as a:
        r, big = c.record(0), a.record(0)
        assert r.points.shape == (128, 3) and not r.has_mesh
        rows = {tuple(p): lab for p, lab in zip(big.points, big.labels)}
        assert all(rows[tuple(p)] == lab for p, lab in zip(r.points, r.labels))


def test_cli_pool_and_errors(tmp_path, data_root):
    runner = CliRunner()
    out = tmp_path / "c.h5"
    res = runner.invoke(main, ["pool", str(out), "labeled-psb:table:split=test", "--points", "128",
                               "--data-root", str(data_root), "--workers", "1"])
    assert res.exit_code == 0, res.output
    assert "| table | real | test | 10 |" in res.output and "10 shapes" in res.output
    res = runner.invoke(main, ["pool", str(out), "pointnet:chair"])
    assert res.exit_code != 0 and "unknown source" in res.output and "Traceback" not in res.output
    bad = tmp_path / "bad.off"
    bad.write_text("OFF\n3 1 0\n0 0 0\n1 0 0\n")
    res = runner.invoke(main, ["pool", str(tmp_path / "d.h5"), f"files:{bad}:category=chair"])
    assert res.exit_code != 0 and "bad.off: vertices" in res.output
    assert not (tmp_path / "d.h5").exists()
    res = runner.invoke(main, ["pool", "--help"])
    assert res.exit_code == 0 and "labeled-psb" in res.output and "procedural:CATEGORY:COUNT" in res.output
