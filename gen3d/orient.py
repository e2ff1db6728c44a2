"""Canonical pose of labelled meshes: ShapeNet's axis convention, which the procedural shapes share.

Convention (ShapeNetCore / ShapeNetPart, and :mod:`gen3d.procedural`): +y is up; a chair's back is at
-z (it faces +z); an airplane's nose points to +z (tail at -z) with its wings along x; a table's top
is at +y with its longer side along x.

Real collections such as Labeled-PSB are not consistently oriented (docs/datasets.md: chairs 104-106
are z-up, the airplanes lie along different axes), which hurts every stage that pools them with
generated or procedural shapes (a student trained on one pose fails on another). The rules below
pick, from the *labelled parts* of a mesh, the proper rotation among the 24 axis-aligned ones
(signed permutations with determinant +1) that brings it into the convention; they need only
part centroids and extents, which the part labels give exactly:

* chair: up = the axis nearest (back - leg) (the seat if there are no legs); rear = the axis nearest
  the horizontal part of (back - seat).
* airplane: rear = the axis nearest (tail - body); up = the thinner of the two remaining axes (the
  vertical extent of an airplane is its smallest), signed so that the tail sticks out further
  upwards than downwards (the vertical fin).
* table: up = the axis nearest (top - leg); x = the longer remaining axis.

Other categories (and shapes missing the parts a rule needs) are left as they are.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RULES = ("chair", "airplane", "table")

_X, _Y, _Z = np.eye(3)


def _axis(v: np.ndarray, exclude: Sequence[int] = ()) -> np.ndarray:
    """The signed coordinate axis nearest to ``v`` (ignoring axes ``exclude``)."""
    w = np.abs(np.asarray(v, np.float64)).copy()
    w[list(exclude)] = -1.0
    k = int(np.argmax(w))
    e = np.zeros(3)
    e[k] = 1.0 if v[k] >= 0 else -1.0
    return e


def _rotation(src_a: np.ndarray, dst_a: np.ndarray, src_b: np.ndarray, dst_b: np.ndarray) -> np.ndarray:
    """The rotation R (``R @ src = dst``) taking orthonormal axes ``src_a -> dst_a``, ``src_b -> dst_b``."""
    src = np.stack([src_a, src_b, np.cross(src_a, src_b)], 1)
    dst = np.stack([dst_a, dst_b, np.cross(dst_a, dst_b)], 1)
    return dst @ src.T


def _index(e: np.ndarray) -> int:
    return int(np.argmax(np.abs(e)))


def canonical_rotation(category: str, vertices: np.ndarray, faces: np.ndarray, face_labels: np.ndarray,
                       part_names: Sequence[str]) -> np.ndarray | None:
    """The axis-aligned rotation that puts a labelled mesh in ShapeNet's pose (module docstring).

    Args:
        category: ShapeNetPart category name (``chair``, ``airplane``, ``table``; others give None).
        vertices: ``float [V, 3]``; faces: ``int [F, 3]``.
        face_labels: ``int [F]`` index into ``part_names`` per face (-1 = unlabelled).
        part_names: ShapeNetPart part names of the labels (``back``, ``seat``, ``leg``, ``body``,
            ``tail``, ``top`` ... as :mod:`gen3d.parts` names them).

    Returns:
        ``float64 [3, 3]`` rotation R, a signed permutation with det +1 (apply as ``vertices @ R.T``),
        or None when the category has no rule or the mesh lacks the parts the rule needs.
    """
    if category not in RULES:
        return None
    v = np.asarray(vertices, np.float64)
    f = np.asarray(faces, np.int64)
    labels = np.asarray(face_labels)
    tri = v[f]
    centre = tri.mean(1)
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    names = list(part_names)

    def mask(part: str) -> np.ndarray | None:
        if part not in names:
            return None
        m = labels == names.index(part)
        return m if area[m].sum() > 0 else None

    def centroid(part: str) -> np.ndarray | None:
        m = mask(part)
        return None if m is None else (centre[m] * area[m, None]).sum(0) / area[m].sum()

    if category == "chair":
        back, seat, leg = centroid("back"), centroid("seat"), centroid("leg")
        if back is None or seat is None:
            return None
        up = _axis(back - (leg if leg is not None else seat))
        rear = _axis(back - seat, exclude=[_index(up)])
        return _rotation(up, _Y, rear, -_Z)
    if category == "airplane":
        body, tail, tail_mask = centroid("body"), centroid("tail"), mask("tail")
        if body is None or tail is None:
            return None
        rear = _axis(tail - body)
        others = [k for k in range(3) if k != _index(rear)]
        extent = v.max(0) - v.min(0)
        k = min(others, key=lambda i: extent[i])
        offset = centre[tail_mask, k] - body[k]
        up = np.eye(3)[k] * (1.0 if offset.max() >= -offset.min() else -1.0)
        return _rotation(rear, -_Z, up, _Y)
    top, leg = centroid("top"), centroid("leg")
    if top is None or leg is None:
        return None
    up = _axis(top - leg)
    others = [k for k in range(3) if k != _index(up)]
    extent = v.max(0) - v.min(0)
    side = np.eye(3)[max(others, key=lambda i: extent[i])]
    return _rotation(up, _Y, side, _X)
