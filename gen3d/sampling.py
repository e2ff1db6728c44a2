"""Point sampling: area-weighted surface sampling of meshes, farthest point sampling, resampling.

* :func:`sample_surface` follows point-cloud-utils (``pcu.sample_mesh_random``: uniform in area,
  barycentric coordinates per sample) and carries each sample's face index, hence its face label.
* :func:`farthest_point_sample` is the iterative farthest point sampling of PointNet++ (Qi et al.
  2017), batched in torch (CPU or CUDA), since pytorch3d / pointnet2_ops have no wheels here.
* :func:`resample_indices` brings a cloud to a fixed size by FPS or by seeded random choice.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import point_cloud_utils as pcu
import torch


@dataclass
class SurfaceSample:
    """Points sampled on a mesh surface.

    Attributes:
        points: ``float32 [N, 3]``.
        normals: ``float32 [N, 3]`` unit normals of the faces the points lie on (zero for
            degenerate faces).
        face_index: ``int64 [N]`` the face each point lies on.
        labels: ``int16 [N]`` the face label of each point, or ``None`` without face labels.
    """

    points: np.ndarray
    normals: np.ndarray
    face_index: np.ndarray
    labels: np.ndarray | None


def face_normals(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Unit face normals ``float32 [F, 3]`` (right-hand rule on ``faces`` order; 0 if degenerate)."""
    v = vertices[faces].astype(np.float64)
    n = np.cross(v[:, 1] - v[:, 0], v[:, 2] - v[:, 0])
    norm = np.linalg.norm(n, axis=1, keepdims=True)
    return np.divide(n, norm, out=np.zeros_like(n), where=norm > 0).astype(np.float32)


def sample_surface(vertices: np.ndarray, faces: np.ndarray, num_points: int, seed: int = 0,
                   face_labels: np.ndarray | None = None) -> SurfaceSample:
    """Sample ``num_points`` points uniformly by area on a triangle mesh.

    Args:
        vertices: ``[V, 3]`` float vertex positions.
        faces: ``[F, 3]`` integer vertex indices (0-based).
        num_points: number of samples N.
        seed: any integer; the same seed gives the same samples.
        face_labels: optional ``[F]`` integer label per face; carried to each sample.

    Returns:
        :class:`SurfaceSample`.

    Raises:
        ValueError: for an empty mesh, out-of-range faces, or a mesh of zero area.
    """
    vertices = np.ascontiguousarray(vertices, dtype=np.float64)
    faces = np.ascontiguousarray(faces, dtype=np.int64)
    if len(faces) == 0 or len(vertices) == 0:
        raise ValueError("cannot sample an empty mesh")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise ValueError(f"face indices out of range [0, {len(vertices)})")
    normals = face_normals(vertices, faces)
    if not np.any(normals):
        raise ValueError("cannot sample a mesh of zero area")
    # pcu treats seed 0 as "use the clock"; map every seed to a positive 31-bit value instead.
    pcu_seed = int(np.random.SeedSequence(seed).generate_state(1)[0] % (2**31 - 2)) + 1
    fid, bc = pcu.sample_mesh_random(vertices, faces, int(num_points), random_seed=pcu_seed)
    fid = np.asarray(fid, dtype=np.int64)
    points = pcu.interpolate_barycentric_coords(faces, fid, np.asarray(bc), vertices)
    labels = None if face_labels is None else np.asarray(face_labels, dtype=np.int16)[fid]
    return SurfaceSample(points.astype(np.float32), normals[fid], fid, labels)


def farthest_point_sample(points: torch.Tensor, k: int, start: torch.Tensor | int = 0) -> torch.Tensor:
    """Iterative farthest point sampling (PointNet++, Qi et al. 2017), batched.

    Args:
        points: ``float [B, N, 3]`` or ``[N, 3]`` (any float dtype, CPU or CUDA).
        k: number of points to select, ``1 <= k <= N``.
        start: index of the first selected point, an int or a ``long [B]`` tensor.

    Returns:
        ``long [B, k]`` (or ``[k]`` for unbatched input) indices into N; the first is ``start``.

    Raises:
        ValueError: if ``k`` is out of range.
    """
    squeeze = points.dim() == 2
    pts = points.unsqueeze(0) if squeeze else points
    b, n, _ = pts.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    idx = torch.empty(b, k, dtype=torch.long, device=pts.device)
    cur = (start if isinstance(start, torch.Tensor) else torch.full((b,), int(start))).to(pts.device).long()
    dist = torch.full((b, n), float("inf"), dtype=pts.dtype, device=pts.device)
    batch = torch.arange(b, device=pts.device)
    for i in range(k):
        idx[:, i] = cur
        d = ((pts - pts[batch, cur].unsqueeze(1)) ** 2).sum(-1)
        dist = torch.minimum(dist, d)
        cur = dist.argmax(-1)
    return idx[0] if squeeze else idx


def resample_indices(points: np.ndarray, k: int, method: str = "fps", seed: int = 0) -> np.ndarray:
    """Indices ``int64 [k]`` that bring a cloud of N points to exactly k points.

    ``method="fps"``: farthest point sampling started at a seeded random point (k <= N), which
    covers the shape evenly; ``"random"``: a seeded uniform choice without replacement.
    When k > N both methods keep every point once and fill up with a seeded choice with
    replacement (duplicates), so that collections have a fixed N.

    Raises:
        ValueError: for an unknown method or an empty cloud.
    """
    n = len(points)
    if n == 0:
        raise ValueError("cannot resample an empty point cloud")
    if method not in ("fps", "random"):
        raise ValueError(f"unknown resampling method {method!r} (fps | random)")
    rng = np.random.default_rng(seed)
    if k > n:
        return np.concatenate([np.arange(n), rng.choice(n, k - n, replace=True)])
    if method == "random":
        return np.sort(rng.choice(n, k, replace=False))
    start = int(rng.integers(n))
    return farthest_point_sample(torch.from_numpy(np.asarray(points, dtype=np.float32)), k, start).numpy()
