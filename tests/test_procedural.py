"""Tests of the procedural labelled shapes (gen3d.procedural) and their primitives (gen3d.primitives).

Known answers come from the construction: exact volumes of primitives, closed meshes, the part
each primitive belongs to, where parts sit (chair back above seat above legs, ...), and an
independent inside/outside oracle (generalised winding numbers in numpy, not point-cloud-utils).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import point_cloud_utils as pcu
import pytest
import trimesh
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gen3d import primitives as prim
from gen3d.parts import part_names
from gen3d.procedural import CATEGORIES, build_shape, generate, generate_many, visible_mask
from gen3d.records import ShapeRecord


@lru_cache(maxsize=None)
def _record(category: str, index: int, seed: int = 0, num_points: int = 2048) -> ShapeRecord:
    return generate(category, index, seed=seed, num_points=num_points)


def _solids_of(record: ShapeRecord) -> list[tuple[np.ndarray, np.ndarray, int]]:
    """Split a record's mesh into its closed solids ``(vertices, faces, label)`` using
    ``provenance["solid_faces"]``; vertices are re-indexed per solid."""
    out, start = [], 0
    for count in record.provenance["solid_faces"]:
        f = record.mesh_faces[start:start + count].astype(np.int64)
        used, inverse = np.unique(f, return_inverse=True)
        out.append((record.mesh_vertices[used].astype(np.float64), inverse.reshape(-1, 3),
                    int(record.face_labels[start])))
        assert np.all(record.face_labels[start:start + count] == record.face_labels[start])
        start += count
    assert start == len(record.mesh_faces)
    return out


def _winding_numbers(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Generalised winding number (Jacobson et al. 2013) of each point w.r.t. a closed mesh:
    1 inside, 0 outside (van Oosterom-Strackee solid angles)."""
    out = np.empty(len(points))
    tri = vertices[faces]
    for s in range(0, len(points), 256):
        p = points[s:s + 256, None, None, :]
        a, b, c = (tri[None, :, k, :] - p[:, :, 0, :] for k in range(3))
        la, lb, lc = (np.linalg.norm(x, axis=-1) for x in (a, b, c))
        det = np.einsum("pfi,pfi->pf", a, np.cross(b, c))
        den = (la * lb * lc + np.einsum("pfi,pfi->pf", a, b) * lc + np.einsum("pfi,pfi->pf", b, c) * la
               + np.einsum("pfi,pfi->pf", c, a) * lb)
        out[s:s + 256] = np.arctan2(det, den).sum(axis=1) / (2 * np.pi)
    return out


# ----------------------------------------------------------------------------------------------
# Primitives: closed, outward, exact volumes
# ----------------------------------------------------------------------------------------------

def _assert_closed_outward(solid: prim.Solid) -> None:
    mesh = trimesh.Trimesh(solid.vertices, solid.faces, process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume > 0
    assert mesh.volume == pytest.approx(solid.volume, rel=1e-9)


def _regular_polygon_area(radius: float, segments: int) -> float:
    return 0.5 * segments * radius**2 * np.sin(2 * np.pi / segments)


def test_box_and_mirrored_hexahedron_are_outward_with_exact_volume():
    b = prim.box([0.1, 0.2, 0.3], [1.0, 2.0, 3.0])
    _assert_closed_outward(b)
    assert b.volume == pytest.approx(6.0)
    mirrored = prim.hexahedron(b.vertices * np.array([-1.0, 1.0, 1.0]))  # left-handed corner frame
    _assert_closed_outward(mirrored)
    assert mirrored.volume == pytest.approx(6.0)


def test_cylinder_volume_is_that_of_the_polygonal_prism():
    c = prim.cylinder([0, 0, 0], [0.3, 0.4, 0.0], 0.2, segments=24)  # length 0.5, oblique axis
    _assert_closed_outward(c)
    assert c.volume == pytest.approx(_regular_polygon_area(0.2, 24) * 0.5, rel=1e-9)


def test_lathe_with_cavity_has_outer_minus_inner_volume():
    r, w, h, b, s = 0.4, 0.05, 1.0, 0.1, 32
    cup = prim.lathe([0, 0, 0], [0, 1, 0], [(0, 0), (r, 0), (r, h), (r - w, h), (r - w, b), (0, b)], s)
    _assert_closed_outward(cup)
    expected = _regular_polygon_area(r, s) * h - _regular_polygon_area(r - w, s) * (h - b)
    assert cup.volume == pytest.approx(expected, rel=1e-9)
    # The cavity is outside the solid, the wall inside.
    w_num = _winding_numbers(np.array([[0, 0.5, 0], [r - w / 2, 0.5, 0], [0, 0.05, 0]]), cup.vertices, cup.faces)
    np.testing.assert_allclose(w_num, [0, 1, 1], atol=1e-6)


def test_arc_tube_is_closed_with_pappus_volume():
    t = prim.arc_tube([0, 0, 0], [1, 0, 0], [0, 1, 0], 0.3, -1.2, 1.4, 0.04, stations=64, segments=32)
    _assert_closed_outward(t)
    assert t.volume == pytest.approx(_regular_polygon_area(0.04, 32) * 0.3 * 2.6, rel=1e-3)


def test_lathe_rejects_profile_off_axis():
    with pytest.raises(ValueError):
        prim.lathe([0, 0, 0], [0, 1, 0], [(0.1, 0), (0.2, 1), (0, 1)])


def test_visible_mask_known_answer():
    a, b = prim.box([0, 0, 0], [1, 1, 1]), prim.box([0.5, 0, 0], [1, 0.5, 0.5])
    pts = np.array([[0.5, 0.0, 0.0],    # on a's +x face, strictly inside b -> hidden
                    [0.5, 0.4, 0.0],    # on a's +x face, outside b -> visible
                    [0.0, 0.25, 0.0],   # on b's top face, inside a -> hidden
                    [0.9, 0.25, 0.0]])  # on b's top face, outside a -> visible
    np.testing.assert_array_equal(visible_mask(pts, np.array([0, 0, 1, 1]), [a, b]), [False, True, False, True])


# ----------------------------------------------------------------------------------------------
# Records: API, fields, determinism
# ----------------------------------------------------------------------------------------------

def test_unknown_category_raises_listing_known():
    with pytest.raises(ValueError, match="chair.*table.*airplane.*mug"):
        generate("lamp", 0)
    with pytest.raises(ValueError, match="known"):
        generate_many("lamp", 3)  # raised at the call, before iterating
    with pytest.raises(ValueError):
        generate("chair", 0, split="dev")
    with pytest.raises(ValueError):
        generate("chair", -1)


@pytest.mark.parametrize("category", CATEGORIES)
def test_record_fields(category):
    r = _record(category, 1, seed=4, num_points=1000)
    assert r.shape_id == f"{category}-s4-000001"
    assert (r.category, r.source, r.split) == (category, "procedural", "train")
    assert r.part_names == part_names(category)
    assert r.points.shape == (1000, 3) and r.points.dtype == np.float32
    assert r.normals.shape == (1000, 3) and r.normals.dtype == np.float32
    assert r.labels.shape == (1000,) and r.labels.dtype == np.int16
    assert r.mesh_vertices.dtype == np.float32 and r.mesh_faces.dtype == np.int32
    assert r.face_labels.shape == (len(r.mesh_faces),) and r.face_labels.dtype == np.int16
    assert sum(r.provenance["solid_faces"]) == len(r.mesh_faces)
    np.testing.assert_allclose(np.linalg.norm(r.normals, axis=1), 1.0, atol=1e-5)
    prov = r.provenance
    assert {k: prov[k] for k in ("dataset", "generator", "version", "category", "seed", "index")} == {
        "dataset": "procedural", "generator": "gen3d.procedural", "version": 1, "category": category,
        "seed": 4, "index": 1}
    assert isinstance(prov["style"], dict) and prov["style"]
    lo, hi = r.mesh_vertices.min(0), r.mesh_vertices.max(0)
    assert 0.8 <= (hi - lo).max() <= 1.0
    np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-5)
    assert np.all(np.abs(r.points) <= 0.5)


@pytest.mark.parametrize("category", CATEGORIES)
def test_deterministic_and_independent_of_generation_order(category):
    a = generate(category, 7, seed=3, num_points=512)
    b = list(generate_many(category, 3, seed=3, num_points=512, start=5))[2]
    assert b.shape_id == a.shape_id
    for field in ("points", "normals", "labels", "mesh_vertices", "mesh_faces", "face_labels"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.provenance == b.provenance
    # The geometry does not depend on the number of sampled points.
    c = generate(category, 7, seed=3, num_points=100)
    np.testing.assert_array_equal(a.mesh_vertices, c.mesh_vertices)


@pytest.mark.parametrize("category", CATEGORIES)
def test_different_indices_and_seeds_differ(category):
    base = _record(category, 0)
    for other in (_record(category, 1), _record(category, 0, seed=1)):
        same_mesh = (other.mesh_vertices.shape == base.mesh_vertices.shape
                     and np.allclose(other.mesh_vertices, base.mesh_vertices))
        assert not same_mesh
        assert not np.allclose(other.points, base.points)


# ----------------------------------------------------------------------------------------------
# Geometry: closed parts, exact labels, hidden surfaces removed
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("category", CATEGORIES)
def test_every_solid_of_every_shape_is_watertight_and_outward(category):
    for index in range(12):
        for v, f, _ in _solids_of(_record(category, index)):
            mesh = trimesh.Trimesh(v, f, process=False)
            assert mesh.is_watertight and mesh.is_winding_consistent
            assert mesh.volume > 0


def _label_sets(category: str, count: int) -> list[tuple[set[str], set[str]]]:
    out = []
    for i in range(count):
        r = _record(category, i, num_points=1024)
        names = r.part_names
        out.append(({names[k] for k in np.unique(r.labels)}, {names[k] for k in np.unique(r.face_labels)}))
    return out


def test_label_sets_per_category():
    chairs = _label_sets("chair", 40)
    assert all({"back", "seat", "leg"} <= pts for pts, _ in chairs)
    with_arms = sum("arm" in faces for _, faces in chairs)
    assert 0 < with_arms < 40
    assert all(pts == faces for pts, faces in chairs)
    planes = _label_sets("airplane", 30)
    assert all({"body", "wing", "tail"} <= pts for pts, _ in planes)
    assert 0 < sum("engine" in pts for pts, _ in planes) < 30
    assert all(pts == {"handle", "body"} for pts, _ in _label_sets("mug", 12))
    assert all(pts == faces == {"top", "leg"} for pts, faces in _label_sets("table", 20))


@pytest.mark.parametrize("category", CATEGORIES)
def test_point_labels_are_those_of_the_nearest_face(category):
    for index in (0, 1, 2):
        r = _record(category, index)
        v, f = r.mesh_vertices.astype(np.float64), r.mesh_faces.astype(np.int64)
        pts = r.points.astype(np.float64)
        dist, fid, _ = pcu.closest_points_on_mesh(pts, v, f)
        assert dist.max() < 1e-5  # on the surface
        mismatch = np.flatnonzero(r.face_labels[fid] != r.labels)
        # Only exact ties (a point on the intersection curve of two parts) may disagree.
        assert len(mismatch) <= 0.002 * len(pts)
        for label in np.unique(r.labels[mismatch]):
            idx = mismatch[r.labels[mismatch] == label]
            query = np.repeat(pts[idx], 2, axis=0)  # pcu 0.34 mishandles a single query point
            d_own = pcu.closest_points_on_mesh(query, v, f[r.face_labels == label])[0][::2]
            assert np.all(d_own <= dist[idx] + 1e-6)


@pytest.mark.parametrize("category", CATEGORIES)
def test_no_point_lies_inside_another_part(category):
    for index in (0, 1, 2, 3):
        r = _record(category, index)
        pts = r.points.astype(np.float64)
        for v, f, _ in _solids_of(r):
            lo, hi = v.min(0), v.max(0)
            near = np.flatnonzero(np.all((pts > lo - 1e-3) & (pts < hi + 1e-3), axis=1))
            if not len(near):
                continue
            inside = near[_winding_numbers(pts[near], v, f) > 0.5]
            if len(inside):  # only points on this solid's own surface may count as inside
                on_surface = pcu.closest_points_on_mesh(np.repeat(pts[inside], 2, axis=0), v, f)[0]
                assert on_surface.max() < 1e-4


@pytest.mark.parametrize("category", CATEGORIES)
def test_different_parts_do_not_share_surface(category):
    """No coplanar overlap of differently labelled surfaces: almost no point lies on a part
    other than its own (only intersection curves, of zero area, may)."""
    for index in (0, 1, 2):
        r = _record(category, index)
        v, f = r.mesh_vertices.astype(np.float64), r.mesh_faces.astype(np.int64)
        shared = 0
        for label in np.unique(r.labels):
            pts = r.points[r.labels == label].astype(np.float64)
            d = pcu.closest_points_on_mesh(np.repeat(pts, 2, axis=0), v, f[r.face_labels != label])[0]
            shared += int(np.sum(d < 2e-7)) // 2  # float32 rounding of the points is < 1e-7
        assert shared <= 0.002 * r.num_points


# ----------------------------------------------------------------------------------------------
# Known-answer layout
# ----------------------------------------------------------------------------------------------

def _mean_by_part(r: ShapeRecord, fn) -> dict[str, float]:
    return {name: float(fn(r.points[r.labels == k]).mean()) for k, name in enumerate(r.part_names)
            if np.any(r.labels == k)}


def test_chair_back_above_seat_above_legs_and_back_at_rear():
    for i in range(10):
        r = _record("chair", i)
        y = _mean_by_part(r, lambda p: p[:, 1])
        z = _mean_by_part(r, lambda p: p[:, 2])
        assert y["back"] > y["seat"] > y["leg"], r.provenance["style"]
        assert z["back"] < z["seat"]


def test_table_top_above_legs():
    for i in range(8):
        y = _mean_by_part(_record("table", i), lambda p: p[:, 1])
        assert y["top"] > y["leg"]


def test_airplane_wings_spread_in_x_body_along_z():
    for i in range(8):
        r = _record("airplane", i)
        absx = _mean_by_part(r, lambda p: np.abs(p[:, 0]))
        assert absx["wing"] > 3 * absx["body"]
        body = r.points[r.labels == r.part_names.index("body")]
        extent = body.max(0) - body.min(0)
        assert extent[2] > 4 * max(extent[0], extent[1])
        z = _mean_by_part(r, lambda p: p[:, 2])
        assert z["tail"] < z["wing"]  # tail at the rear (-z), nose at +z


def test_mug_handle_farther_from_axis_than_body():
    for i in range(8):
        r = _record("mug", i)
        radial = _mean_by_part(r, lambda p: np.hypot(p[:, 0], p[:, 2]))
        assert radial["handle"] > radial["body"]
        handle = r.points[r.labels == r.part_names.index("handle")]
        assert handle[:, 0].mean() > 0  # handle on +x


# ----------------------------------------------------------------------------------------------
# Properties over random arguments
# ----------------------------------------------------------------------------------------------

@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(category=st.sampled_from(CATEGORIES), seed=st.integers(0, 2**31), index=st.integers(0, 10**6),
       num_points=st.integers(1, 700))
def test_random_arguments_give_valid_records(category, seed, index, num_points):
    r = generate(category, index, seed=seed, num_points=num_points, split="test")
    assert r.points.shape == (num_points, 3) and r.labels.shape == (num_points,)
    assert np.isfinite(r.points).all() and np.isfinite(r.normals).all()
    assert set(np.unique(r.labels)) <= set(np.unique(r.face_labels))
    assert r.face_labels.min() >= 0 and r.face_labels.max() < len(r.part_names)
    assert np.all(np.abs(r.mesh_vertices) <= 0.5)
    shape = build_shape(category, index, seed)
    assert all(s.volume > 0 for s in shape.solids)
    np.testing.assert_array_equal(shape.mesh()[2], r.face_labels)
