"""Closed, outward-oriented triangle-mesh primitives for the procedural shapes.

Every constructor returns a :class:`Solid`: a closed triangle mesh in which every edge is shared by
exactly two faces, wound so that face normals (right-hand rule) point outwards, i.e. with a
positive signed volume. Two building blocks cover everything :mod:`gen3d.procedural` needs:

* :func:`hexahedron`: 8 arbitrary corners (boxes, beams, tapered and swept wings, slanted slabs);
* :func:`sweep`: a closed cross-section (circle, super-ellipse) placed at a sequence of stations
  and closed by a fan at each end (surfaces of revolution, prisms, tubes along arcs).

:func:`box`, :func:`beam`, :func:`lathe`, :func:`cylinder`, :func:`prism`, :func:`tube` and
:func:`arc_tube` are thin wrappers. Orientation is fixed once, at the end, by the sign of the
enclosed volume, so any corner order or mirrored (left-handed) frame gives an outward mesh. Units
are those of the inputs.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Outward faces of the unit cube whose corner ``i`` is at bits (x, y, z) = (i & 1, i >> 1 & 1, i >> 2).
_HEX_FACES = np.array([
    [0, 4, 6], [0, 6, 2],  # -x
    [1, 3, 7], [1, 7, 5],  # +x
    [0, 1, 5], [0, 5, 4],  # -y
    [2, 6, 7], [2, 7, 3],  # +y
    [0, 2, 3], [0, 3, 1],  # -z
    [4, 5, 7], [4, 7, 6],  # +z
], dtype=np.int64)
#: ``float64 [8, 3]``: the (x, y, z) bits of unit-cube corner ``i``, the corner order of :func:`hexahedron`.
CUBE_BITS = np.array([[i & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], dtype=np.float64)


@dataclass(frozen=True)
class Solid:
    """A closed triangle mesh.

    Attributes:
        vertices: ``float64 [V, 3]``.
        faces: ``int64 [F, 3]`` 0-based, outward-oriented (positive :attr:`volume`).
    """

    vertices: np.ndarray
    faces: np.ndarray

    @property
    def volume(self) -> float:
        """Signed enclosed volume (positive for an outward-oriented closed mesh)."""
        return signed_volume(self.vertices, self.faces)

    @property
    def bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Axis-aligned bounding box ``(lo [3], hi [3])``."""
        return self.vertices.min(axis=0), self.vertices.max(axis=0)

    def transformed(self, scale: float, offset: np.ndarray) -> "Solid":
        """The solid mapped by ``x -> scale * x + offset`` (``scale > 0`` keeps the orientation)."""
        return Solid(self.vertices * float(scale) + np.asarray(offset, dtype=np.float64), self.faces)


def signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Signed volume enclosed by a closed triangle mesh (divergence theorem); ``> 0`` if outward."""
    v = np.asarray(vertices, dtype=np.float64)[faces]
    return float(np.einsum("ij,ij->i", v[:, 0], np.cross(v[:, 1], v[:, 2])).sum() / 6.0)


def _oriented(vertices: np.ndarray, faces: np.ndarray) -> Solid:
    """Build a :class:`Solid`, reversing every face if the consistently wound mesh is inside out."""
    vertices = np.asarray(vertices, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    if signed_volume(vertices, faces) < 0:
        faces = faces[:, ::-1].copy()
    return Solid(vertices, faces)


def _unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    n = np.linalg.norm(v)
    if n == 0:
        raise ValueError("zero-length direction")
    return v / n


def _perpendicular_frame(axis: np.ndarray, hint: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors ``(e1, e2)`` with ``(e1, e2, axis)`` right-handed and orthonormal.

    ``e2`` is as close as possible to ``hint`` (default: whichever of y or x is less parallel).
    """
    axis = _unit(axis)
    if hint is None:
        hint = np.array([0.0, 1.0, 0.0]) if abs(axis[1]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e2 = np.asarray(hint, dtype=np.float64) - np.dot(hint, axis) * axis
    e2 = _unit(e2)
    e1 = np.cross(e2, axis)
    return e1, e2


def hexahedron(corners: np.ndarray) -> Solid:
    """A closed 12-triangle hexahedron from 8 corners.

    Args:
        corners: ``[8, 3]``; corner ``i`` plays the role of the unit-cube corner with bits
            ``(i & 1, i >> 1 & 1, i >> 2 & 1)`` along three local axes (u, v, w). Faces may be
            non-planar (each quad is split into two triangles); the local frame may be left-handed.

    Returns:
        :class:`Solid` with 8 vertices and 12 faces.

    Raises:
        ValueError: if ``corners`` is not ``[8, 3]``.
    """
    corners = np.asarray(corners, dtype=np.float64)
    if corners.shape != (8, 3):
        raise ValueError(f"hexahedron needs [8, 3] corners, got {corners.shape}")
    return _oriented(corners, _HEX_FACES)


def box(center, size) -> Solid:
    """Axis-aligned box: ``center [3]``, full side lengths ``size [3]`` (all > 0)."""
    center = np.asarray(center, dtype=np.float64)
    size = np.asarray(size, dtype=np.float64)
    return hexahedron(center + (CUBE_BITS - 0.5) * size)


def beam(p0, p1, width: float, height: float, up=(0.0, 1.0, 0.0)) -> Solid:
    """Rectangular bar from point ``p0`` to ``p1`` (ends are the bar's end faces).

    The cross-section is ``width`` across and ``height`` along the direction closest to ``up``
    (which must not be parallel to ``p1 - p0``).
    """
    p0 = np.asarray(p0, dtype=np.float64)
    p1 = np.asarray(p1, dtype=np.float64)
    side, upv = _perpendicular_frame(p1 - p0, np.asarray(up, dtype=np.float64))
    b = CUBE_BITS
    corners = (p0 + b[:, 2:3] * (p1 - p0) + (b[:, 0:1] - 0.5) * width * side
               + (b[:, 1:2] - 0.5) * height * upv)
    return hexahedron(corners)


def circle_section(segments: int) -> np.ndarray:
    """``[S, 2]`` unit circle, counter-clockwise, starting at angle 0."""
    t = np.linspace(0.0, 2.0 * np.pi, int(segments), endpoint=False)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def superellipse_section(segments: int, exponent: float) -> np.ndarray:
    """``[S, 2]`` unit super-ellipse ``|x|^n + |y|^n = 1`` (``n = exponent >= 2``: 2 is a circle,
    larger values approach a square with rounded corners), counter-clockwise."""
    c = circle_section(segments)
    return np.sign(c) * np.abs(c) ** (2.0 / float(exponent))


def sweep(centers: np.ndarray, axis_u: np.ndarray, axis_v: np.ndarray, section: np.ndarray,
          start_cap: np.ndarray, end_cap: np.ndarray) -> Solid:
    """A closed solid from a cross-section placed at M stations, closed by a fan at each end.

    Ring ``k`` has vertices ``centers[k] + section[s, 0] * axis_u[k] + section[s, 1] * axis_v[k]``
    (the axes carry the ring's scale); the first ring is joined to the point ``start_cap`` and the
    last to ``end_cap`` by triangle fans. Rings must not collapse to a point and the section must
    be star-shaped about the origin for the fans to be valid.

    Args:
        centers, axis_u, axis_v: ``[M, 3]`` each, ``M >= 1``.
        section: ``[S, 2]`` closed polygon (``S >= 3``), without repeating the first point.
        start_cap, end_cap: ``[3]`` fan apexes.

    Returns:
        :class:`Solid` with ``M * S + 2`` vertices and ``2 * M * S`` faces.
    """
    centers, axis_u, axis_v = (np.asarray(a, dtype=np.float64).reshape(-1, 3) for a in (centers, axis_u, axis_v))
    section = np.asarray(section, dtype=np.float64)
    m, s = len(centers), len(section)
    rings = (centers[:, None] + section[None, :, 0:1] * axis_u[:, None]
             + section[None, :, 1:2] * axis_v[:, None]).reshape(-1, 3)
    a, b = m * s, m * s + 1  # cap vertices
    j = np.arange(s)
    jn = (j + 1) % s
    k = np.arange(m - 1)[:, None]
    r0, r0n, r1, r1n = k * s + j, k * s + jn, (k + 1) * s + j, (k + 1) * s + jn
    quads = np.concatenate([np.stack([r0, r0n, r1n], -1), np.stack([r0, r1n, r1], -1)], axis=1)
    start = np.stack([np.full(s, a), jn, j], axis=1)
    end = np.stack([np.full(s, b), (m - 1) * s + j, (m - 1) * s + jn], axis=1)
    faces = np.concatenate([start, quads.reshape(-1, 3), end])
    vertices = np.concatenate([rings, np.asarray(start_cap, np.float64)[None], np.asarray(end_cap, np.float64)[None]])
    return _oriented(vertices, faces)


def lathe(origin, axis, profile, segments: int = 28) -> Solid:
    """Surface of revolution of an ``(r, h)`` polyline about the line ``origin + h * axis``.

    Args:
        origin: ``[3]`` point on the axis (``h = 0``).
        axis: ``[3]`` axis direction (normalised here).
        profile: ``[P, 2]`` rows ``(r, h)``, ``P >= 3``; the first and last rows must have
            ``r == 0`` (start and end on the axis), all others ``r > 0``. The polyline may go back
            and forth along the axis, e.g. a cup: bottom centre, outer wall, rim, inner wall,
            inner bottom, axis. It must not cross itself.
        segments: number of angular segments.

    Returns:
        :class:`Solid`.

    Raises:
        ValueError: if the profile does not start and end on the axis or touches it in between.
    """
    profile = np.asarray(profile, dtype=np.float64)
    if len(profile) < 3 or profile[0, 0] != 0 or profile[-1, 0] != 0 or np.any(profile[1:-1, 0] <= 0):
        raise ValueError("lathe profile must start and end on the axis (r = 0) and stay off it in between")
    origin = np.asarray(origin, dtype=np.float64)
    axis = _unit(axis)
    e1, e2 = _perpendicular_frame(axis)
    inner = profile[1:-1]
    centers = origin + inner[:, 1:2] * axis
    return sweep(centers, inner[:, 0:1] * e1, inner[:, 0:1] * e2, circle_section(segments),
                 origin + profile[0, 1] * axis, origin + profile[-1, 1] * axis)


def cylinder(p0, p1, radius: float, radius1: float | None = None, segments: int = 24) -> Solid:
    """Closed cylinder (or cone frustum when ``radius1`` differs) from ``p0`` to ``p1``."""
    p0 = np.asarray(p0, dtype=np.float64)
    d = np.asarray(p1, dtype=np.float64) - p0
    length = float(np.linalg.norm(d))
    r1 = radius if radius1 is None else radius1
    return lathe(p0, d, [(0.0, 0.0), (radius, 0.0), (r1, length), (0.0, length)], segments)


def prism(center, axis, half_u: float, half_v: float, length: float, section: np.ndarray,
          hint=None) -> Solid:
    """Straight extrusion of ``section`` (scaled by ``half_u``, ``half_v``) along ``axis``,
    centred on ``center`` with total ``length``; ``hint`` orients the section's v axis."""
    center = np.asarray(center, dtype=np.float64)
    axis = _unit(axis)
    e1, e2 = _perpendicular_frame(axis, None if hint is None else np.asarray(hint, dtype=np.float64))
    ends = center + np.array([[-0.5], [0.5]]) * length * axis
    return sweep(ends, np.tile(e1 * half_u, (2, 1)), np.tile(e2 * half_v, (2, 1)), section, ends[0], ends[1])


def tube(path: np.ndarray, tangents: np.ndarray, plane_normal, radius: float, segments: int = 12) -> Solid:
    """Round tube along a planar curve, with flat end caps.

    Args:
        path: ``[M, 3]`` points of the curve (``M >= 2``), all in one plane.
        tangents: ``[M, 3]`` tangent directions of the curve at those points (any length > 0);
            each ring of the tube lies in the plane perpendicular to its tangent, so the end caps
            are perpendicular to the curve's end tangents.
        plane_normal: ``[3]`` normal of the curve's plane.
        radius: tube radius; it should stay below the curve's radius of curvature.
        segments: vertices per ring.

    Returns:
        :class:`Solid`.
    """
    path = np.asarray(path, dtype=np.float64)
    t = np.asarray(tangents, dtype=np.float64)
    n = _unit(plane_normal)
    side = np.cross(n, t)
    side /= np.linalg.norm(side, axis=1, keepdims=True)
    return sweep(path, radius * side, np.tile(radius * n, (len(path), 1)), circle_section(segments),
                 path[0], path[-1])


def arc_tube(center, u, v, radius: float, angle0: float, angle1: float, tube_radius: float,
             stations: int = 12, segments: int = 12) -> Solid:
    """Round tube swept along the circular arc ``center + radius * (cos(a) u + sin(a) v)`` for
    ``a`` from ``angle0`` to ``angle1`` (radians), with flat end caps; ``u`` and ``v`` are
    orthonormalised here. See :func:`tube`."""
    center = np.asarray(center, dtype=np.float64)
    u = _unit(u)
    v = _unit(np.asarray(v, dtype=np.float64) - np.dot(v, u) * u)
    a = np.linspace(angle0, angle1, int(stations))[:, None]
    path = center + radius * (np.cos(a) * u + np.sin(a) * v)
    return tube(path, -np.sin(a) * u + np.cos(a) * v, np.cross(u, v), tube_radius, segments)


def concatenate(solids: list[Solid]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate solids into one mesh ``(vertices float64 [V, 3], faces int64 [F, 3])``."""
    offsets = np.cumsum([0] + [len(s.vertices) for s in solids[:-1]])
    vertices = np.concatenate([s.vertices for s in solids])
    faces = np.concatenate([s.faces + o for s, o in zip(solids, offsets)])
    return vertices, faces
