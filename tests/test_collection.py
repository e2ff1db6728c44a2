"""The HDF5 shape-collection format: round trips, selection, errors, crash safety."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from gen3d.collection import Collection, CollectionWriter, append_records, write_collection
from gen3d.errors import CollectionError
from gen3d.records import ShapeRecord

N = 64


def make_record(i: int, category: str = "chair", source: str = "procedural", split: str = "train",
                mesh: bool = True, n: int = N) -> ShapeRecord:
    rng = np.random.default_rng(i)
    parts = ("back", "seat", "leg", "arm") if category == "chair" else ("body", "handle")
    v = rng.random((4 + i % 3, 3)).astype(np.float32)
    f = np.array([[0, 1, 2], [0, 2, 3], [1, 2, 3]], np.int32)
    return ShapeRecord(
        shape_id=f"{category}-{i}", category=category, source=source, split=split,
        points=rng.normal(size=(n, 3)).astype(np.float32), part_names=parts,
        labels=rng.integers(-1, len(parts), n).astype(np.int16),
        normals=rng.normal(size=(n, 3)).astype(np.float32) if i % 2 else None,
        mesh_vertices=v if mesh else None, mesh_faces=f if mesh else None,
        face_labels=np.array([0, 1, -1], np.int16) if mesh else None,
        provenance={"dataset": "test", "index": i})


def assert_same(a: ShapeRecord, b: ShapeRecord) -> None:
    assert (a.shape_id, a.category, a.source, a.split) == (b.shape_id, b.category, b.source, b.split)
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert (a.normals is None) == (b.normals is None)
    if a.normals is not None:
        np.testing.assert_array_equal(a.normals, b.normals)
    assert a.has_mesh == b.has_mesh
    if a.has_mesh:
        np.testing.assert_array_equal(a.mesh_vertices, b.mesh_vertices)
        np.testing.assert_array_equal(a.mesh_faces, b.mesh_faces)
        np.testing.assert_array_equal(a.face_labels, b.face_labels)
    assert a.provenance == b.provenance
    assert a.part_names == b.part_names


def test_round_trip_in_chunks(tmp_path):
    recs = [make_record(i, mesh=i % 3 != 0) for i in range(10)] + [make_record(20 + i, "mug", "real", "test") for i in range(3)]
    path = tmp_path / "c.h5"
    assert append_records(path, recs[:4]) == 4
    assert append_records(path, recs[4:]) == len(recs)
    with Collection(path) as c:
        assert len(c) == len(recs) and c.num_points == N
        for a, b in zip(recs, c):
            assert_same(a, b)
        assert c.part_names == {"chair": ("back", "seat", "leg", "arm"), "mug": ("body", "handle")}
        np.testing.assert_array_equal(c.select(category="mug"), [10, 11, 12])
        np.testing.assert_array_equal(c.select(source="procedural", split="train"), np.arange(10))
        assert c.select(category="chair", split="test").size == 0
        assert ("mug", "real", "test", 3) in c.summary()
        with h5py.File(path) as h5:
            assert h5.attrs["schema_version"] == 1 and h5["points"].dtype == np.float32
            assert h5["labels"].dtype == np.int16 and h5["mesh/faces"].dtype == np.int32


def test_unknown_category_source_split_are_clear_errors(tmp_path):
    path = tmp_path / "c.h5"
    write_collection(path, [make_record(0)])
    with Collection(path) as c:
        with pytest.raises(CollectionError, match="category.*'table'"):
            c.select(category="table")
        with pytest.raises(CollectionError, match="source"):
            c.select(source="scanned")
        with pytest.raises(CollectionError, match="split"):
            c.select(split="holdout")


@pytest.mark.parametrize("bad,field", [
    (lambda r: setattr(r, "points", r.points[:10]), "points"),
    (lambda r: r.points.__setitem__((3, 1), np.nan), "points"),
    (lambda r: r.points.__setitem__((3, 1), np.inf), "points"),
    (lambda r: setattr(r, "labels", np.full(N, 7, np.int16)), "labels"),
    (lambda r: setattr(r, "source", "scanned"), "source"),
    (lambda r: setattr(r, "split", "holdout"), "split"),
    (lambda r: setattr(r, "category", "Chair"), "category"),
    (lambda r: setattr(r, "mesh_faces", np.array([[0, 1, 9]])), "mesh_faces"),
    (lambda r: setattr(r, "face_labels", np.zeros(7, np.int16)), "face_labels"),
])
def test_bad_records_are_rejected_and_nothing_is_written(tmp_path, bad, field):
    path = tmp_path / "c.h5"
    write_collection(path, [make_record(0)])
    before = path.read_bytes()
    rec = make_record(1)
    bad(rec)
    with pytest.raises(CollectionError, match=field) as info:
        append_records(path, [make_record(2), rec])
    assert str(path) in str(info.value) and "chair-1" in str(info.value)
    assert path.read_bytes() == before  # the transaction did not happen
    assert not list(tmp_path.glob(".c.h5.tmp-*"))


def test_conflicting_part_names_rejected(tmp_path):
    path = tmp_path / "c.h5"
    write_collection(path, [make_record(0)])
    rec = make_record(1)
    rec.part_names = ("seat", "back", "leg", "arm")
    with pytest.raises(CollectionError, match="part_names"):
        append_records(path, [rec])


def test_num_points_mismatch(tmp_path):
    path = tmp_path / "c.h5"
    write_collection(path, [make_record(0)])
    with pytest.raises(CollectionError, match="N=64"):
        append_records(path, [make_record(1, n=32)])
    with pytest.raises(CollectionError, match="num_points"):
        CollectionWriter(path, num_points=32)


def test_file_errors_name_file_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.h5"):
        Collection(tmp_path / "missing.h5")
    path = tmp_path / "c.h5"
    write_collection(path, [make_record(i) for i in range(40)])
    truncated = tmp_path / "t.h5"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    with pytest.raises(CollectionError, match="t.h5: file"):
        Collection(truncated)
    notes = tmp_path / "notes.h5"
    notes.write_text("not hdf5")
    with pytest.raises(CollectionError, match="notes.h5: file"):
        Collection(notes)
    for attr, value, match in (("schema_version", 7, "unknown schema version 7"),
                               ("schema", "other", "schema"), ("num_points", 32, "does not match N=32")):
        broken = tmp_path / f"{attr}.h5"
        broken.write_bytes(path.read_bytes())
        with h5py.File(broken, "r+") as h5:
            h5.attrs[attr] = value
        with pytest.raises(CollectionError, match=match) as info:
            Collection(broken)
        assert str(broken) in str(info.value)
    nan = tmp_path / "nan.h5"
    nan.write_bytes(path.read_bytes())
    with h5py.File(nan, "r+") as h5:
        h5["points"][5, 0, 0] = np.nan
    with Collection(nan) as c:
        c.points(4)
        with pytest.raises(CollectionError, match=r"points\[5\]"):
            c.points(5)


def test_writer_skips_duplicates_and_resumes(tmp_path):
    path = tmp_path / "c.h5"
    with CollectionWriter(path, N, commit_every=3) as w:
        assert all(w.add(make_record(i)) for i in range(5))
        assert not w.add(make_record(2))
    with CollectionWriter(path) as w:
        assert w.has(make_record(4).key)
        added = [w.add(make_record(i)) for i in range(8)]
    assert added == [False] * 5 + [True] * 3
    with Collection(path) as c:
        assert [r.shape_id for r in c] == [f"chair-{i}" for i in range(8)]


WRITER = r"""
import sys
sys.path.insert(0, {tests!r})
from test_collection import make_record
from gen3d.collection import Collection, append_records
from pathlib import Path
i = len(Collection({path!r})) if Path({path!r}).exists() else 0
while True:
    append_records({path!r}, [make_record(k) for k in range(i, i + 20)], num_points=64)
    i += 20
"""


def test_killed_writer_leaves_every_committed_shape_readable(tmp_path):
    """Kill a process that appends 20 shapes per transaction, at three moments; each time the file
    must open and hold whole transactions only, every shape intact (shape k == make_record(k))."""
    path = tmp_path / "c.h5"
    script = WRITER.format(tests=str(Path(__file__).parent), path=str(path))
    sizes = []
    for delay in (2.0, 1.3, 1.7):
        proc = subprocess.Popen([sys.executable, "-c", script])
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        with Collection(path) as c:
            n = len(c)
            assert n % 20 == 0
            for k in range(n):
                assert_same(make_record(k), c.record(k))
        sizes.append(n)
    assert sizes[-1] > 0 and sizes == sorted(sizes)
    # the next writer removes a killed writer's temporary file and appends
    (tmp_path / ".c.h5.tmp-999999").write_bytes(b"partial")
    assert append_records(path, [make_record(sizes[-1])]) == sizes[-1] + 1
    assert not list(tmp_path.glob(".c.h5.tmp-*"))


def test_errors_survive_pickling():
    """Worker processes send errors back pickled; a custom __init__ must not break that."""
    import pickle

    from gen3d.errors import DataFormatError

    for cls in (DataFormatError, CollectionError):
        err = pickle.loads(pickle.dumps(cls("a.off", "faces", "bad index")))
        assert type(err) is cls and str(err) == "a.off: faces: bad index" and err.field == "faces"
