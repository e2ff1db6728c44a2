"""Watertight triangle meshes from point clouds: normals, DPSR (Shape As Points), marching cubes.

Generated shapes are bare point clouds (N = 2048 points, roughly unit-sphere normalised, no
normals). Like PartDistill / DiT-3D, we turn them into meshes with the differentiable Poisson
solver of *Shape As Points* (SAP; Peng, Jiang, Liao, Niemeyer, Pollefeys, Geiger, "Shape As Points:
A Differentiable Poisson Solver", NeurIPS 2021):

1. :func:`estimate_normals`: PCA normals of the k nearest neighbours (point-cloud-utils), oriented
   outwards by the gradient of a coarse signed distance to the space outside the shape (voxels
   not near any point, flood-filled from the border), which also separates the two sides of
   thin parts.
2. :func:`dpsr_indicator`: SAP's DPSR. Normals are splatted trilinearly onto a periodic grid,
   Fourier-transformed, smoothed by SAP's spectral Gaussian, integrated by solving the Poisson
   equation spectrally, transformed back, shifted to be zero at the points on average and scaled
   so that the grid corner (far outside) is +0.5. Batched, pure torch, CPU or CUDA, differentiable.
3. :func:`reconstruct`: normalisation into the unit cube with a margin, DPSR, marching cubes at
   level 0 (scikit-image, :func:`extract_surface`), small floating components dropped, outward
   faces, back to the input coordinates. ``method="sap"`` additionally optimises points and
   normals (SAP's optimisation mode) against a Chamfer distance to the input points.
4. :func:`reconstruct_collection`: adds meshes (with per-face part labels voted by the 5 nearest
   points, :func:`vote_face_labels`) to the shapes of a collection, in batches, resumably.

Conventions: the indicator follows SAP's sign, **negative inside, positive outside**, about
-0.5 deep inside and exactly +0.5 at the grid corner; the surface is its zero level set. See
``docs/surface.md`` for the method in words, timings and measured accuracy.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field as dataclass_field
from pathlib import Path

import numpy as np
import point_cloud_utils as pcu
import torch
from scipy import ndimage, sparse
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree
from skimage.measure import marching_cubes

# _writer_lock: the in-place update replaces the input under the same lock as its writers.
from .collection import Collection, _writer_lock, append_records
from .errors import CollectionError
from .records import ShapeRecord

#: Reconstruction methods of :func:`reconstruct`.
METHODS: tuple[str, ...] = ("dpsr", "sap")
#: Fraction of the unit cube the largest bounding-box side of a shape is scaled to (the rest is
#: margin, so that the surface never reaches the border of the periodic grid).
DEFAULT_FILL = 0.9
#: Connected components of the mesh with fewer faces than this fraction of the largest one are
#: dropped (floaters). ``None`` keeps the largest component only; that lost whole parts whose thin
#: connections the 2048 points do not resolve (the back of Labeled-PSB chair 101, sled runners,
#: T-tails), see docs/surface.md.
DEFAULT_MIN_COMPONENT = 0.01
#: Neighbours voting for each face label in :func:`vote_face_labels`.
LABEL_NEIGHBOURS = 5


@dataclass
class SurfaceResult:
    """A reconstructed surface.

    Attributes:
        vertices: ``float32 [V, 3]`` in the coordinates of the input points.
        faces: ``int32 [F, 3]`` 0-based vertex indices, wound so that normals (right-hand rule)
            point outwards; the mesh is closed (every edge shared by exactly two faces).
        seconds: wall-clock time of the reconstruction (normal estimation included).
        method: ``"dpsr"`` or ``"sap"``.
        grid: resolution of the (final) DPSR grid.
        stats: settings and diagnostics (``sigma``, ``fill``; for ``sap`` also ``stages``,
            ``steps``, ``losses`` and ``chamfer_initial`` / ``chamfer_final``: Chamfer distance of
            the initial DPSR mesh and of the result to the input points, in input units).
    """

    vertices: np.ndarray
    faces: np.ndarray
    seconds: float
    method: str
    grid: int
    stats: dict = dataclass_field(default_factory=dict)


# ----------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------
def _check_points(points: np.ndarray, name: str = "points", min_points: int = 1) -> np.ndarray:
    arr = np.asarray(points)
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"{name} must have shape [N, 3], got {arr.shape}")
    if len(arr) < min_points:
        raise ValueError(f"{name} is empty or too small: {len(arr)} points, need at least {min_points}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf coordinates ({int((~np.isfinite(arr)).any(1).sum())} rows)")
    return np.ascontiguousarray(arr, dtype=np.float64)


def _check_normals(normals: np.ndarray, n: int) -> np.ndarray:
    arr = np.asarray(normals, dtype=np.float64)
    if arr.shape != (n, 3):
        raise ValueError(f"normals must have shape ({n}, 3) like the points, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("normals contain NaN or inf values")
    norm = np.linalg.norm(arr, axis=1, keepdims=True)
    if np.any(norm == 0):
        raise ValueError(f"{int((norm == 0).sum())} normals are zero vectors")
    return arr / norm


# ----------------------------------------------------------------------------------------------
# Normals
# ----------------------------------------------------------------------------------------------
def estimate_normals(points: np.ndarray, k: int = 20, resolution: int = 64, seal: float = 1.5,
                     min_agreement: float = 0.5) -> np.ndarray:
    """Unit normals of a point cloud, consistently oriented outwards.

    1. Unoriented normals: the smallest principal axis of the ``k`` nearest neighbours of each
       point (``pcu.estimate_point_cloud_normals_knn``).
    2. An *outside field*: the points are voxelised on a ``resolution^3`` grid around their
       bounding box; every voxel farther than ``seal`` times the mean distance to the 8th nearest
       neighbour from all points is free; the free voxels connected to the border of the grid
       (flood fill) are *outside*. ``F`` is the signed distance to the boundary of the outside
       region (positive outside), lightly smoothed; its gradient at a point points to the
       nearest outside space, which is the outward direction on either side of a thin sheet
       as well as on thick, closed parts.
    3. Each PCA normal is flipped to agree with the gradient of ``F``; where the two are less
       than ``min_agreement`` (cosine) aligned, the PCA normal is unreliable (a neighbourhood that
       wraps around a thin leg, an edge) and the normalised gradient is used instead.

    Hoppe et al.'s orientation by propagation along a minimum spanning tree of the kNN graph
    (SIGGRAPH 1992) was tried first and rejected: on 2048-point procedural shapes with thin legs,
    wings and mug walls, only 33-78 % of its normals agreed with the truth (the tree jumps
    between the two sides of thin parts), against at least 91 % here (see docs/surface.md).

    Args:
        points: ``float [N, 3]`` (any units), ``N >= 10``.
        k: neighbours for the PCA normals (clipped to ``N - 1``).
        resolution: voxels along the longest side of the outside field.
        seal: gap-closing radius in units of the mean 8-NN distance; too small lets the flood
            fill leak into closed parts (wrong orientation there), too large fills concavities.
        min_agreement: cosine between PCA normal and field gradient below which the gradient
            direction replaces the PCA normal.

    Returns:
        ``float32 [N, 3]`` unit normals.

    Raises:
        ValueError: fewer than 10 points, wrong shape, NaN / inf coordinates, or all points equal.
    """
    pts = _check_points(points, min_points=10)
    n = len(pts)
    if not np.ptp(pts, axis=0).max() > 0:
        raise ValueError("all points coincide: normals are undefined")
    k = int(max(3, min(k, n - 1)))
    idx, est = pcu.estimate_point_cloud_normals_knn(pts, k)
    pca = np.zeros((n, 3))
    pca[np.asarray(idx).reshape(-1)] = est
    grad = _outside_gradient(pts, resolution, seal)
    grad_norm = np.linalg.norm(grad, axis=1, keepdims=True)
    centroid_dir = pts - pts.mean(0)
    # A zero gradient (a point exactly between two outside boundaries) falls back to the direction
    # from the centroid.
    grad = np.where(grad_norm > 1e-9, grad / np.maximum(grad_norm, 1e-12),
                    centroid_dir / np.maximum(np.linalg.norm(centroid_dir, axis=1, keepdims=True), 1e-12))
    cos = (pca * grad).sum(1)
    out = np.where(np.abs(cos)[:, None] >= min_agreement, pca * np.where(cos < 0, -1.0, 1.0)[:, None], grad)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    out[np.linalg.norm(out, axis=1) < 0.5] = (1.0, 0.0, 0.0)
    return out.astype(np.float32)


def _outside_gradient(pts: np.ndarray, resolution: int, seal: float) -> np.ndarray:
    """Gradient ``[N, 3]`` at the points of the signed distance to the outside region (see
    :func:`estimate_normals`)."""
    tau = seal * float(np.mean(cKDTree(pts).query(pts, min(9, len(pts)))[0][:, -1]))
    lo, hi = pts.min(0), pts.max(0)
    voxel = float(np.max(hi - lo)) / resolution
    tau = max(tau, voxel)
    pad = int(math.ceil(tau / voxel)) + 2
    origin = lo - pad * voxel
    shape = tuple(int(math.ceil(e / voxel)) + 1 + 2 * pad for e in (hi - lo))
    ijk = np.clip(np.floor((pts - origin) / voxel).astype(np.int64), 0, np.array(shape) - 1)
    occupied = np.zeros(shape, bool)
    occupied[tuple(ijk.T)] = True
    free = ndimage.distance_transform_edt(~occupied) * voxel >= tau
    lab, _ = ndimage.label(free)
    border = np.unique(np.concatenate([lab[[0, -1]].ravel(), lab[:, [0, -1]].ravel(), lab[:, :, [0, -1]].ravel()]))
    outside = np.isin(lab, border[border > 0])
    field = np.where(outside, ndimage.distance_transform_edt(outside), -ndimage.distance_transform_edt(~outside))
    field = ndimage.gaussian_filter(field.astype(np.float32), 1.0)
    coords = ((pts - origin) / voxel - 0.5).T  # voxel centres at (i + 0.5) * voxel
    return np.stack([ndimage.map_coordinates(g, coords, order=1, mode="nearest") for g in np.gradient(field)], 1)


# ----------------------------------------------------------------------------------------------
# DPSR: the differentiable Poisson solver of Shape As Points
# ----------------------------------------------------------------------------------------------
def _corners(points: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices ``long [B, N, 8]`` of the 8 grid nodes around each point (periodic) and their
    trilinear weights ``[B, N, 8]`` (differentiable in the points). Node ``(i, j, k)`` sits at
    ``(i, j, k) / grid``."""
    x = points * grid
    base = torch.floor(x.detach())
    frac = x - base
    base = base.long()
    idx, wts = [], []
    for bits in range(8):
        o = torch.tensor([bits & 1, bits >> 1 & 1, bits >> 2 & 1], device=points.device)
        node = torch.remainder(base + o, grid)
        idx.append((node[..., 0] * grid + node[..., 1]) * grid + node[..., 2])
        w = torch.where(o.bool(), frac, 1.0 - frac)
        wts.append(w[..., 0] * w[..., 1] * w[..., 2])
    return torch.stack(idx, -1), torch.stack(wts, -1)


def grid_interpolate(field: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Trilinear interpolation of periodic grids at points (SAP's ``grid_interp``).

    Args:
        field: ``float [B, G, G, G]``; node ``(i, j, k)`` is at ``(i, j, k) / G`` in ``[0, 1)^3``.
        points: ``float [B, N, 3]`` in ``[0, 1)^3``.

    Returns:
        ``float [B, N]``, differentiable in both arguments.
    """
    b, g = field.shape[0], field.shape[1]
    idx, w = _corners(points, g)
    vals = torch.gather(field.reshape(b, -1), 1, idx.reshape(b, -1)).reshape(idx.shape)
    return (vals * w).sum(-1)


def splat(points: torch.Tensor, values: torch.Tensor, grid: int) -> torch.Tensor:
    """Trilinear splatting (SAP's ``point_rasterize``) of per-point values onto a periodic grid.

    Args:
        points: ``float [B, N, 3]`` in ``[0, 1)^3``.
        values: ``float [B, N, C]``.
        grid: resolution G.

    Returns:
        ``float [B, C, G, G, G]``: each value spread over the 8 nodes around its point with
        trilinear weights (``index_add``; differentiable in points and values).
    """
    b, n, c = values.shape
    idx, w = _corners(points, grid)  # [B, N, 8]
    g3 = grid ** 3
    offset = (torch.arange(b * c, device=points.device) * g3).view(b, 1, 1, c)
    flat = idx.unsqueeze(-1) + offset  # [B, N, 8, C]: (b * C + c) * G^3 + node
    contrib = w.unsqueeze(-1) * values.unsqueeze(2)  # [B, N, 8, C]
    out = torch.zeros(b * c * g3, dtype=values.dtype, device=values.device)
    out = out.index_add(0, flat.reshape(-1), contrib.reshape(-1))
    return out.view(b, c, grid, grid, grid)


_SPECTRAL_CACHE: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _spectral_terms(grid: int, sigma: float, device, dtype) -> tuple[torch.Tensor, ...]:
    """Integer frequencies ``kx, ky, kz`` of an ``rfftn`` of a G^3 grid (broadcastable) and the
    factor ``g(k) / (2 pi |k|^2)`` (0 at DC) that turns ``k . v_hat`` into ``chi_hat / i``."""
    key = (grid, float(sigma), str(device), dtype)
    if key not in _SPECTRAL_CACHE:
        if len(_SPECTRAL_CACHE) > 8:
            _SPECTRAL_CACHE.clear()
        kx = torch.fft.fftfreq(grid, 1.0 / grid, device=device, dtype=dtype).view(-1, 1, 1)
        ky = kx.view(1, -1, 1)
        kz = torch.fft.rfftfreq(grid, 1.0 / grid, device=device, dtype=dtype).view(1, 1, -1)
        k2 = kx ** 2 + ky ** 2 + kz ** 2
        gauss = torch.exp(-0.5 * (2.0 * sigma / grid) ** 2 * k2)  # SAP's spec_gaussian_filter
        factor = torch.where(k2 > 0, gauss / (2.0 * math.pi * torch.where(k2 > 0, k2, torch.ones_like(k2))),
                             torch.zeros_like(k2))
        _SPECTRAL_CACHE[key] = (kx, ky, kz, factor)
    return _SPECTRAL_CACHE[key]


def dpsr_indicator(points: torch.Tensor, normals: torch.Tensor, grid: int = 128, sigma: float = 2.0) -> torch.Tensor:
    """SAP's differentiable Poisson solver (DPSR): an indicator grid from oriented points.

    Follows ``DPSR.forward`` of Shape As Points (Peng et al., NeurIPS 2021, ``src/dpsr.py``):

    1. splat the normals onto a periodic G^3 grid with trilinear weights: the vector field v;
    2. ``v_hat = rfftn(v)``; smooth with SAP's spectral Gaussian
       ``g(k) = exp(-0.5 * (2 * sigma * |k| / G)^2)`` (k the integer frequency; a spatial Gaussian
       of standard deviation ``sigma / pi`` voxels);
    3. solve ``Laplacian(chi) = div(v)`` spectrally: with ``omega = 2 pi k``,
       ``chi_hat = (-i omega . v_hat) / (-|omega|^2)``, the DC term set to 0;
    4. ``chi = irfftn(chi_hat)``; subtract the mean of ``chi`` trilinearly interpolated at the
       points (the surface is the zero level set); divide by ``-|chi(corner)| / 0.5``.

    With outward normals the result is **negative inside, positive outside**, ``+0.5`` at grid
    node (0, 0, 0) (far outside the shape, given a margin) and about ``-0.5`` deep inside.

    Args:
        points: ``float [B, N, 3]`` in ``[0, 1)^3`` (node ``(i, j, k)`` of the grid is at
            ``(i, j, k) / G``); keep a margin so that the surface stays away from the border.
        normals: ``float [B, N, 3]`` unit outward normals.
        grid: resolution G (even sizes are fastest).
        sigma: smoothing in SAP's units (SAP's default is 2; larger is smoother).

    Returns:
        ``[B, G, G, G]`` indicator, dtype of ``points``; differentiable in points and normals
        (the corner scale is treated as a constant, as in SAP).

    Raises:
        ValueError: mismatched shapes, points outside ``[0, 1)``, or NaN / inf input.
    """
    if points.dim() != 3 or points.shape[-1] != 3 or normals.shape != points.shape:
        raise ValueError(f"points and normals must both be [B, N, 3], got {tuple(points.shape)} "
                         f"and {tuple(normals.shape)}")
    if points.shape[1] == 0:
        raise ValueError("points is empty")
    if not (torch.isfinite(points).all() and torch.isfinite(normals).all()):
        raise ValueError("points or normals contain NaN or inf")
    if points.min() < 0 or points.max() >= 1:
        raise ValueError(f"points must lie in [0, 1)^3, got range [{float(points.min()):.3g}, "
                         f"{float(points.max()):.3g}]")
    b = points.shape[0]
    real = points.dtype
    v_hat = torch.fft.rfftn(splat(points, normals.to(real), grid), dim=(2, 3, 4))  # [B, 3, G, G, G/2+1]
    kx, ky, kz, factor = _spectral_terms(grid, sigma, points.device, real)
    # omega = 2 pi k: chi_hat = (-i omega . v_hat) / (-|omega|^2) = i (k . v_hat) / (2 pi |k|^2)
    chi_hat = 1j * (kx * v_hat[:, 0] + ky * v_hat[:, 1] + kz * v_hat[:, 2]) * factor
    chi = torch.fft.irfftn(chi_hat, s=(grid, grid, grid), dim=(1, 2, 3))
    chi = chi - grid_interpolate(chi, points).mean(1).view(b, 1, 1, 1)
    corner = chi[:, 0, 0, 0].detach().abs().clamp_min(1e-12)
    return -0.5 * chi / corner.view(b, 1, 1, 1)


# ----------------------------------------------------------------------------------------------
# Meshing
# ----------------------------------------------------------------------------------------------
def _normalise(points: np.ndarray, fill: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Map points into ``[0, 1)^3``: bounding box centred at 0.5, largest side scaled to ``fill``.
    Returns ``(points01, centre, scale)`` with ``points01 = (points - centre) * scale + 0.5``."""
    if not 0.1 <= fill <= 0.95:
        raise ValueError(f"fill must be in [0.1, 0.95], got {fill}")
    lo, hi = points.min(0), points.max(0)
    extent = float(np.max(hi - lo))
    if not extent > 0:
        raise ValueError("all points coincide: cannot reconstruct a surface")
    centre = (lo + hi) / 2
    scale = fill / extent
    return (points - centre) * scale + 0.5, centre, scale


def _select_components(vertices: np.ndarray, faces: np.ndarray,
                       min_component: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Keep the largest connected component (by shared vertices, counted in faces), or with
    ``min_component = f`` every component with at least ``f`` times its faces; drop unused
    vertices and reindex."""
    if len(faces) == 0:
        return vertices[:0], faces
    nv = len(vertices)
    e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]]])
    adj = sparse.coo_matrix((np.ones(len(e), np.int8), (e[:, 0], e[:, 1])), shape=(nv, nv))
    ncomp, comp = connected_components(adj, directed=False)
    if ncomp > 1:
        face_comp = comp[faces[:, 0]]
        sizes = np.bincount(face_comp, minlength=ncomp)
        if min_component is None:
            keep = face_comp == np.argmax(sizes)
        else:
            keep = sizes[face_comp] >= min_component * sizes.max()
        faces = faces[keep]
    used = np.unique(faces)
    remap = np.full(nv, -1, np.int64)
    remap[used] = np.arange(len(used))
    return vertices[used], remap[faces]


def signed_volume(vertices: np.ndarray, faces: np.ndarray) -> float:
    """Signed volume of a closed triangle mesh: positive when its faces are wound outwards
    (right-hand rule), in the cube of the vertices' units."""
    v = np.asarray(vertices, np.float64)[np.asarray(faces)]
    return float(np.einsum("ij,ij->i", v[:, 0], np.cross(v[:, 1], v[:, 2])).sum() / 6.0)


def extract_surface(field: np.ndarray,
                    min_component: float | None = DEFAULT_MIN_COMPONENT) -> tuple[np.ndarray, np.ndarray]:
    """Marching cubes at level 0 of an indicator grid (negative inside), closed and outward.

    Values within 1e-4 of 0 are moved to +1e-4 (no grid node exactly on the surface, hence no
    coincident vertices), and the grid is padded with one layer of "outside" so that the surface
    is closed even where it would reach the border. scikit-image's ``marching_cubes`` (Lewiner)
    then gives a closed manifold mesh; connected components are filtered by ``min_component``
    and faces are flipped if the signed volume is negative.

    Args:
        field: ``float [G, G, G]``, node ``(i, j, k)`` at ``(i, j, k) / G``.
        min_component: f: keep every connected component with at least f times the faces of
            the largest; None: the largest only.

    Returns:
        ``(vertices float64 [V, 3] in [0, 1)^3, faces int64 [F, 3])``.

    Raises:
        ValueError: the field has no negative value (nothing inside).
    """
    g = field.shape[0]
    field = np.asarray(field, np.float32)
    field = np.where(np.abs(field) < 1e-4, np.float32(1e-4), field)
    if field.min() >= 0:
        raise ValueError("the indicator has no inside (no value below 0): no surface to extract")
    field = np.pad(field, 1, constant_values=np.float32(max(float(field.max()), 1e-3)))
    verts, faces, _, _ = marching_cubes(field, level=0.0, allow_degenerate=True)
    verts, faces = _select_components((verts - 1.0) / g, faces.astype(np.int64), min_component)
    if signed_volume(verts, faces) < 0:
        faces = faces[:, ::-1]
    return verts, np.ascontiguousarray(faces)


def _outside_positive(field: np.ndarray) -> np.ndarray:
    """DPSR is +0.5 at the corner for outward normals; inward normals give the opposite sign."""
    return -field if field[0, 0, 0] < 0 else field


def _dpsr_batch(clouds: Sequence[np.ndarray], normals: Sequence[np.ndarray], grid: int, sigma: float,
                fill: float, min_component: float | None = DEFAULT_MIN_COMPONENT,
                device: str | torch.device = "cpu") -> list[tuple[np.ndarray, np.ndarray]]:
    """DPSR + marching cubes of several clouds (equal N) in one batched solve; meshes in input
    units (``float32 [V, 3]``, ``int32 [F, 3]``)."""
    p01, frames = [], []
    for pts in clouds:
        q, centre, scale = _normalise(pts, fill)
        p01.append(q)
        frames.append((centre, scale))
    p = torch.as_tensor(np.stack(p01), dtype=torch.float32, device=device)
    n = torch.as_tensor(np.stack(normals), dtype=torch.float32, device=device)
    with torch.no_grad():
        fields = dpsr_indicator(p, n, grid, sigma).cpu().numpy()
    meshes = []
    for field, (centre, scale) in zip(fields, frames):
        verts, faces = extract_surface(_outside_positive(field), min_component)
        meshes.append((((verts - 0.5) / scale + centre).astype(np.float32), faces.astype(np.int32)))
    return meshes


# ----------------------------------------------------------------------------------------------
# SAP optimisation
# ----------------------------------------------------------------------------------------------
def _chamfer_torch(a: torch.Tensor, b: torch.Tensor, b_tree: cKDTree | None = None) -> torch.Tensor:
    """Symmetric Chamfer distance (mean of both directions, L2 not squared) of ``[M, 3]`` and
    ``[N, 3]``, differentiable in both. Nearest neighbours are found without gradient with k-d
    trees (``b_tree``: a prebuilt tree of ``b``), so the cost is O((M + N) log) rather than the
    O(M N) of ``cdist``."""
    a_np, b_np = a.detach().cpu().numpy(), b.detach().cpu().numpy()
    a_to_b = (b_tree or cKDTree(b_np)).query(a_np)[1]
    b_to_a = cKDTree(a_np).query(b_np)[1]
    a_to_b = torch.as_tensor(a_to_b, device=a.device)
    b_to_a = torch.as_tensor(b_to_a, device=a.device)
    return 0.5 * ((a - b[a_to_b]).norm(dim=1).mean() + (b - a[b_to_a]).norm(dim=1).mean())


def _surface_samples(field: torch.Tensor, count: int, gen: torch.Generator,
                     min_component: float | None) -> torch.Tensor:
    """Up to ``count`` vertices (random subset) of the level-0 surface of ``field [G, G, G]``."""
    verts, _ = extract_surface(_outside_positive(field.detach().cpu().numpy()), min_component)
    v = torch.as_tensor(verts, dtype=field.dtype, device=field.device)
    if len(v) > count:
        v = v[torch.randperm(len(v), generator=gen)[:count].to(field.device)]
    return v


def _differentiable_samples(field: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """SAP's differentiable marching cubes, in surrogate form: points on the level set that
    carry the gradient ``d p / d chi = -grad chi / |grad chi|^2`` (a change ``d chi`` of the
    field at p moves the zero crossing by that much along the normal). Values equal
    ``samples``; gradients flow into ``field`` through trilinear interpolation."""
    s = samples.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        val = grid_interpolate(field.detach()[None], s[None])[0]
        (grad,) = torch.autograd.grad(val.sum(), s)
    direction = grad / (grad.pow(2).sum(1, keepdim=True) + 1e-8)
    chi = grid_interpolate(field[None], samples.detach()[None])[0]
    return samples.detach() - direction * (chi - chi.detach()).unsqueeze(1)


def _sap_optimise(p01: np.ndarray, normals: np.ndarray, stages: Sequence[int], steps: Sequence[int],
                  sigma: float, lr: float, normal_lr: float, samples: int, seed: int,
                  min_component: float | None, device) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """Optimise points and normals (in [0,1)^3) so that the DPSR surface fits the input points."""
    target = torch.as_tensor(p01, dtype=torch.float32, device=device)
    pts = target.clone().requires_grad_(True)
    nrm = torch.as_tensor(normals, dtype=torch.float32, device=device).clone().requires_grad_(True)
    opt = torch.optim.Adam([{"params": [pts], "lr": lr}, {"params": [nrm], "lr": normal_lr}])
    gen = torch.Generator().manual_seed(seed)
    tree = cKDTree(p01)
    losses: list[float] = []
    best = (math.inf, pts.detach().clone(), nrm.detach().clone())
    for stage, (grid, count) in enumerate(zip(stages, steps)):
        final_stage = stage == len(stages) - 1
        for step in range(count + int(final_stage)):  # one more evaluation after the last update
            unit = nrm / nrm.norm(dim=1, keepdim=True).clamp_min(1e-8)
            field = dpsr_indicator(pts.clamp(0.0, 1.0 - 1e-6)[None], unit[None], grid, sigma)[0]
            surf = _differentiable_samples(field, _surface_samples(field, samples, gen, min_component))
            loss = _chamfer_torch(surf, target, tree)
            losses.append(float(loss.detach()))
            if final_stage and losses[-1] < best[0]:
                best = (losses[-1], pts.detach().clone(), nrm.detach().clone())
            if step == count:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    _, pts_best, nrm_best = best
    unit = nrm_best / nrm_best.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return pts_best.clamp(0.0, 1.0 - 1e-6), unit, losses


# ----------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------
_DEFAULT_OPTS = {"sigma": 2.0, "fill": DEFAULT_FILL, "min_component": DEFAULT_MIN_COMPONENT, "k": 20,
                 "device": "cpu", "stages": None, "steps": 10, "lr": 1e-3, "normal_lr": 1e-2, "samples": 4096,
                 "seed": 0}


def _options(opts: dict) -> dict:
    unknown = set(opts) - set(_DEFAULT_OPTS)
    if unknown:
        raise TypeError(f"unknown reconstruct option(s) {sorted(unknown)}; known: {sorted(_DEFAULT_OPTS)}")
    return {**_DEFAULT_OPTS, **opts}


def reconstruct(points: np.ndarray, normals: np.ndarray | None = None, method: str = "dpsr", grid: int = 128,
                **opts) -> SurfaceResult:
    """A closed, outward-oriented triangle mesh from a point cloud (Shape As Points).

    ``method="dpsr"``: normals (given, or :func:`estimate_normals`), points mapped into
    ``[0, 1)^3`` (bounding box centred, largest side scaled to ``fill``), :func:`dpsr_indicator`
    on a ``grid^3`` grid, :func:`extract_surface` (marching cubes at level 0, small components
    dropped, outward faces), vertices mapped back to the input coordinates.

    ``method="sap"``: SAP's optimisation mode (Peng et al. 2021, Sec. 3.2), started from the
    input: the points and normals are parameters; each Adam step runs DPSR on the current stage's
    grid, extracts the surface without gradient, takes ``samples`` of its vertices and
    back-propagates the Chamfer distance to the input points through them with SAP's
    ``d p / d chi = -grad chi / |grad chi|^2`` (see :func:`_differentiable_samples`). Grids may
    go coarse to fine (``stages=(32, 64, 128)``); the default is the final grid only, because
    from a good start (the data, not SAP's sphere) coarse stages were measured to make the
    result worse (docs/surface.md). The parameters with the lowest (sampled) loss on the final
    grid, its start included, give the mesh; with the default single stage that start is plain
    DPSR, so the loss cannot end above DPSR's.
    ``result.stats`` holds the Chamfer distances (to the input points, in input units, 20k
    samples) of the initial DPSR mesh and of the final mesh.

    Args:
        points: ``float [N, 3]`` (any units; N >= 10).
        normals: ``float [N, 3]`` outward normals (normalised here), or None to estimate them.
        method: ``"dpsr"`` or ``"sap"``.
        grid: resolution of the (final) DPSR grid (>= 16); 128 takes about 0.2-0.3 s per shape
            on this project's 2-core CPU, 256 about 2-3 s.
        **opts: ``sigma`` (2.0, SAP's smoothing, see :func:`dpsr_indicator`), ``fill`` (0.9),
            ``min_component`` (0.01: keep every connected component with at least this fraction
            of the faces of the largest, dropping floaters; None: the largest component only),
            ``k`` (20, normal estimation), ``device`` ("cpu" or "cuda"); for ``sap`` also
            ``stages`` (grids, default ``(grid,)``), ``steps`` (Adam steps per stage, an int or one
            per stage; 10), ``lr`` (1e-3, for points in the unit cube), ``normal_lr`` (1e-2),
            ``samples`` (4096 surface samples per step), ``seed`` (0).

    Returns:
        :class:`SurfaceResult` (vertices in the input units; ``seconds`` includes normal
        estimation).

    Raises:
        ValueError: empty, NaN / inf or degenerate points, normals of the wrong shape, an
            unknown method, a grid below 16, or an indicator with no inside.
        TypeError: an unknown option.
    """
    start = time.perf_counter()
    o = _options(opts)
    if method not in METHODS:
        raise ValueError(f"unknown surface method {method!r}; known: {', '.join(METHODS)}")
    if int(grid) < 16:
        raise ValueError(f"grid must be at least 16, got {grid}")
    grid = int(grid)
    pts = _check_points(points, min_points=10)
    nrm = estimate_normals(pts, k=o["k"]) if normals is None else _check_normals(normals, len(pts))
    stats: dict = {"sigma": float(o["sigma"]), "fill": float(o["fill"])}
    if method == "dpsr":
        (verts, faces), = _dpsr_batch([pts], [nrm], grid, o["sigma"], o["fill"], o["min_component"], o["device"])
    else:
        verts, faces = _reconstruct_sap(pts, nrm, grid, o, stats)
    return SurfaceResult(vertices=verts, faces=faces, seconds=time.perf_counter() - start, method=method,
                         grid=grid, stats=stats)


def _reconstruct_sap(pts: np.ndarray, nrm: np.ndarray, grid: int, o: dict,
                     stats: dict) -> tuple[np.ndarray, np.ndarray]:
    stages = tuple(int(g) for g in (o["stages"] or (grid,)))
    steps = (int(o["steps"]),) * len(stages) if np.isscalar(o["steps"]) else tuple(int(s) for s in o["steps"])
    if len(steps) != len(stages) or min(steps) < 0 or min(stages) < 16:
        raise ValueError(f"steps {steps} must give one count >= 0 per stage grid (>= 16) {stages}")
    p01, centre, scale = _normalise(pts, o["fill"])
    device = o["device"]

    def mesh(p: torch.Tensor, n: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            field = dpsr_indicator(p[None], n[None], grid, o["sigma"])[0].cpu().numpy()
        return extract_surface(_outside_positive(field), o["min_component"])

    def chamfer01(verts: np.ndarray, faces: np.ndarray) -> float:
        from .sampling import sample_surface
        s = sample_surface(verts, faces, 20000, seed=o["seed"]).points
        d1 = cKDTree(p01).query(s)[0].mean()
        d2 = cKDTree(s).query(p01)[0].mean()
        return float(0.5 * (d1 + d2) / scale)

    p0 = torch.as_tensor(p01, dtype=torch.float32, device=device)
    n0 = torch.as_tensor(nrm, dtype=torch.float32, device=device)
    v_init, f_init = mesh(p0, n0)
    p_opt, n_opt, losses = _sap_optimise(p01, nrm, stages, steps, o["sigma"], o["lr"], o["normal_lr"],
                                         o["samples"], o["seed"], o["min_component"], device)
    verts, faces = mesh(p_opt, n_opt)
    stats.update({"stages": list(stages), "steps": list(steps), "losses": losses,
                  "chamfer_initial": chamfer01(v_init, f_init), "chamfer_final": chamfer01(verts, faces)})
    return ((verts - 0.5) / scale + centre).astype(np.float32), faces.astype(np.int32)


def vote_face_labels(points: np.ndarray, labels: np.ndarray, vertices: np.ndarray, faces: np.ndarray,
                     k: int = LABEL_NEIGHBOURS) -> np.ndarray:
    """Per-face labels by a vote of the ``k`` points nearest to each face centroid.

    The most frequent label among the k nearest points wins (``-1``, unlabelled, is a label
    like any other); ties go to the label of the nearest of the tied points.

    Args:
        points: ``float [N, 3]``; labels: ``int [N]`` (-1 = unlabelled).
        vertices: ``float [V, 3]`` and faces ``int [F, 3]``, in the units of the points.
        k: voters per face (clipped to N).

    Returns:
        ``int16 [F]``.

    Raises:
        ValueError: mismatched points / labels, or an empty point set.
    """
    pts = _check_points(points)
    labels = np.asarray(labels)
    if labels.shape != (len(pts),):
        raise ValueError(f"labels must have shape ({len(pts)},), got {labels.shape}")
    faces = np.asarray(faces, np.int64)
    if len(faces) == 0:
        return np.zeros(0, np.int16)
    centroids = np.asarray(vertices, np.float64)[faces].mean(1)
    k = int(min(k, len(pts)))
    _, idx = cKDTree(pts).query(centroids, k)
    votes = labels[np.asarray(idx).reshape(len(faces), k)]  # [F, k], nearest first
    counts = (votes[:, :, None] == votes[:, None, :]).sum(2)  # how often each voter's label occurs
    return votes[np.arange(len(faces)), np.argmax(counts, axis=1)].astype(np.int16)


def _normals_for(record: ShapeRecord, use_stored_normals: bool, k: int) -> tuple[np.ndarray, str]:
    if use_stored_normals and record.normals is not None:
        return _check_normals(record.normals, len(record.points)), "stored"
    return estimate_normals(record.points, k=k), "estimated"


def _mesh_records(records: list[ShapeRecord], method: str, grid: int, o: dict, batch_size: int,
                  use_stored_normals: bool) -> list[tuple[ShapeRecord, np.ndarray, np.ndarray, dict] | None]:
    """Meshes for records (None where reconstruction failed, with a warning); DPSR in batches."""
    out: list = []
    for b0 in range(0, len(records), max(1, batch_size) if method == "dpsr" else 1):
        batch = records[b0:b0 + (max(1, batch_size) if method == "dpsr" else 1)]
        start = time.perf_counter()
        try:
            prepared = [_normals_for(r, use_stored_normals, o["k"]) for r in batch]
            if method == "dpsr":
                meshes = _dpsr_batch([np.asarray(r.points, np.float64) for r in batch], [n for n, _ in prepared],
                                     grid, o["sigma"], o["fill"], o["min_component"], o["device"])
            else:
                res = reconstruct(batch[0].points, prepared[0][0], method=method, grid=grid, **_sap_only(o))
                meshes = [(res.vertices, res.faces)]
        except ValueError as exc:
            if len(batch) > 1:  # isolate the shape that failed
                for r in batch:
                    out.extend(_mesh_records([r], method, grid, o, 1, use_stored_normals))
                continue
            warnings.warn(f"surface: {batch[0].source}/{batch[0].shape_id}: not reconstructed: {exc}", stacklevel=3)
            out.append(None)
            continue
        seconds = (time.perf_counter() - start) / len(batch)
        for r, (v, f), (_, how) in zip(batch, meshes, prepared):
            info = {"method": method, "grid": grid, "sigma": float(o["sigma"]), "fill": float(o["fill"]),
                    "normals": how, "seconds": round(seconds, 4)}
            out.append((r, v, f, info))
    return out


def _sap_only(o: dict) -> dict:
    return {key: o[key] for key in _DEFAULT_OPTS if key != "k"}


def _partial_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.surface-partial")


def _resume_point(src: Collection, work: Path) -> int:
    """How many leading shapes of ``src`` the work file already holds (validated)."""
    if not work.exists():
        return 0
    with Collection(work) as done:
        m = len(done)
        same = (m <= len(src) and done.num_points == src.num_points
                and all(np.array_equal(getattr(done, f), getattr(src, f)[:m])
                        for f in ("shape_ids", "categories", "sources")))
    if not same:
        raise CollectionError(work, "shapes", f"is not a partial copy of {src.path} (its shapes are not the first "
                              f"shapes of the input); remove it or choose another output")
    return m


def reconstruct_collection(in_path: str | os.PathLike, out_path: str | os.PathLike | None = None,
                           method: str = "dpsr", grid: int = 128, overwrite_meshes: bool = False,
                           progress: bool = True, *, batch_size: int | None = None, commit_every: int = 64,
                           use_stored_normals: bool = False, **opts) -> int:
    """Add reconstructed meshes to the shapes of a collection (``gen3d reconstruct``).

    Every shape without a mesh (every shape with ``overwrite_meshes``) gets the mesh of
    :func:`reconstruct` from its points (normals estimated with :func:`estimate_normals`, or
    the stored ones with ``use_stored_normals``), in the shape's own coordinates, and face labels:
    ``-1`` for an unlabelled shape, else :func:`vote_face_labels` (majority of the 5 nearest
    points). Everything else (points, normals, labels, ids, provenance) is copied unchanged;
    provenance gains ``"surface": {method, grid, sigma, fill, normals, seconds}``. DPSR solves
    ``batch_size`` shapes at once (one batched FFT).

    Resumable: the output is written in transactions of ``commit_every`` shapes, in input order,
    to ``out_path``, or, without it, to ``.<name>.surface-partial`` beside the input, which
    atomically replaces the input at the end (under the input's writer lock; shapes appended
    to the input meanwhile are processed first). An interrupted run continues where the
    output ends; a complete ``out_path`` is left as it is (returns 0). A shape that cannot be
    reconstructed (degenerate points) is copied without a mesh, with a warning.

    Args:
        in_path: the input collection.
        out_path: the output collection, or None to update ``in_path`` in place.
        method, grid, **opts: as :func:`reconstruct`.
        overwrite_meshes: also replace existing meshes.
        progress: show a tqdm progress bar.
        batch_size: shapes per batched DPSR solve; None: 8 on CUDA, 1 on the CPU (where batches
            measured no faster per shape: the solve is memory-bound).
        commit_every: shapes per write transaction.
        use_stored_normals: use a shape's stored normals (if it has any) instead of estimating.

    Returns:
        The number of shapes reconstructed by this call.

    Raises:
        FileNotFoundError: ``in_path`` does not exist.
        CollectionError: the input is not a valid collection, or the output exists and is not a
            partial copy of the input.
        ValueError: an unknown method or a grid below 16; TypeError: an unknown option.
    """
    in_path = Path(in_path)
    if not in_path.exists():
        raise FileNotFoundError(f"{in_path}: no such collection file")
    if method not in METHODS:
        raise ValueError(f"unknown surface method {method!r}; known: {', '.join(METHODS)}")
    if int(grid) < 16:
        raise ValueError(f"grid must be at least 16, got {grid}")
    o = _options(opts)
    if batch_size is None:
        batch_size = 8 if str(o["device"]).startswith("cuda") else 1
    in_place = out_path is None or Path(out_path).resolve() == in_path.resolve()
    work = _partial_path(in_path) if in_place else Path(out_path)
    count = 0
    while True:
        with Collection(in_path) as src:
            total, n = len(src), src.num_points
            start = _resume_point(src, work)
            bar = _progress(total, start, progress, in_path.name)
            try:
                if total == 0 and not work.exists():
                    if in_place:
                        return 0
                    append_records(work, [], num_points=n)
                for c0 in range(start, total, max(1, commit_every)):
                    records = [src.record(i) for i in range(c0, min(total, c0 + max(1, commit_every)))]
                    todo = [r for r in records if overwrite_meshes or not r.has_mesh]
                    for item in _mesh_records(todo, method, int(grid), o, batch_size, use_stored_normals):
                        if item is None:
                            continue
                        r, v, f, info = item
                        r.mesh_vertices, r.mesh_faces = v, f
                        r.face_labels = None if r.labels is None else vote_face_labels(r.points, r.labels, v, f)
                        r.provenance = {**r.provenance, "surface": info}
                        count += 1
                    append_records(work, records, num_points=n)
                    if bar is not None:
                        bar.update(len(records))
            finally:
                if bar is not None:
                    bar.close()
        if not in_place:
            return count
        with _writer_lock(in_path):
            with Collection(in_path) as src, Collection(work) as done:
                finished = len(src) == len(done)
            if finished:
                os.replace(work, in_path)
                work.with_name(work.name + ".lock").unlink(missing_ok=True)  # append_records' lock
                return count


def _progress(total: int, start: int, enabled: bool, name: str):
    if not enabled or start >= total:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc=f"surfaces {name}", unit="shape")
