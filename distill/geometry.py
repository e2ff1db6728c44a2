"""Point-cloud neighbourhood operations in plain torch: kNN, gathering, kNN grouping, 3-NN
interpolation and the Chamfer-L2 distance.

pytorch3d, ``pointnet2_ops`` and ``KNN_CUDA`` have no wheels here, so these are written with batched
torch operations that run unchanged on CPU and CUDA:

* :func:`knn` — exact k nearest neighbours (pytorch3d ``knn_points`` semantics, without padding):
  distances by ``torch.cdist`` (direct differences, not the ``|a|^2 + |b|^2 - 2ab`` expansion, so
  close neighbours are ordered exactly) and ``topk``, over chunks of queries to bound memory.
* :func:`gather_points` — ``index_points`` of PointNet++ (Qi et al., NeurIPS 2017) for any index shape.
* :func:`group` — the FPS + kNN tokeniser of Point-MAE / Point-M2AE (Pang et al. 2022; Zhang et al.,
  NeurIPS 2022): each centre's k nearest points in coordinates relative to the centre.
* :func:`three_nn_interpolate` — PointNet++ feature propagation: inverse squared distance weights of
  the 3 nearest source points.
* :func:`chamfer_l2` — the squared-distance Chamfer distance of Point-MAE / Point-M2AE
  (``ChamferDistanceL2``: mean of squared nearest-neighbour distances, both directions, summed).

Returned distances are recomputed from the gathered coordinates, so they are exact and
differentiable with respect to the inputs (the neighbour indices are not).
"""
from __future__ import annotations

from typing import NamedTuple

import torch

#: default bound on the number of pairwise distances held at once by :func:`knn` (64 Mi floats = 256 MiB)
DEFAULT_MAX_PAIRS = 1 << 26


class KNNResult(NamedTuple):
    """Output of :func:`knn`: ``dist2 float [B, M, k]`` squared distances (ascending) and
    ``idx int64 [B, M, k]`` indices into the reference points."""

    dist2: torch.Tensor
    idx: torch.Tensor


class Groups(NamedTuple):
    """Output of :func:`group`: ``neighborhood float [B, G, k, 3]`` the neighbours' coordinates minus
    their centre, and ``idx int64 [B, G, k]`` their indices into the points (nearest first)."""

    neighborhood: torch.Tensor
    idx: torch.Tensor


def _check_clouds(name: str, x: torch.Tensor, dim: int | None = 3) -> None:
    if x.dim() != 3 or (dim is not None and x.shape[-1] != dim):
        want = f"[B, *, {dim}]" if dim is not None else "[B, *, C]"
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")


def gather_points(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather rows of a batched point tensor by index (PointNet++ ``index_points``).

    Args:
        x: ``[B, N, C]`` any dtype, CPU or CUDA.
        idx: ``int64 [B, ...]`` indices into N (any number of trailing dimensions).

    Returns:
        ``[B, ..., C]`` with ``out[b, i..., :] = x[b, idx[b, i...], :]``; differentiable w.r.t. ``x``.

    Raises:
        ValueError: ``x`` is not 3-D, or the batch sizes differ. Out-of-range indices raise torch's
        ``RuntimeError`` (CPU) or a device assert (CUDA).
    """
    _check_clouds("x", x, dim=None)
    if idx.shape[0] != x.shape[0]:
        raise ValueError(f"batch sizes differ: x has {x.shape[0]}, idx has {idx.shape[0]}")
    b, _, c = x.shape
    flat = idx.reshape(b, -1, 1).long().expand(-1, -1, c)
    return x.gather(1, flat).reshape(*idx.shape, c)


def knn(query: torch.Tensor, ref: torch.Tensor, k: int, max_pairs: int = DEFAULT_MAX_PAIRS) -> KNNResult:
    """Exact k nearest neighbours of each query point among the reference points, batched.

    Args:
        query: ``float [B, M, 3]`` (any float dtype; distances are computed in float32 or wider).
        ref: ``float [B, N, 3]``.
        k: neighbours per query, ``1 <= k <= N``.
        max_pairs: at most this many query-reference distances are held at once (queries are
            processed in chunks of ``max(1, max_pairs // (B * N))``).

    Returns:
        :class:`KNNResult` ``(dist2 [B, M, k], idx int64 [B, M, k])`` sorted by increasing distance;
        ``dist2`` has the dtype of ``query`` and is differentiable w.r.t. both inputs. Ties are
        broken arbitrarily (as ``torch.topk``).

    Raises:
        ValueError: bad shapes, different batch sizes, or ``k`` out of range.
    """
    _check_clouds("query", query)
    _check_clouds("ref", ref)
    if query.shape[0] != ref.shape[0]:
        raise ValueError(f"batch sizes differ: query has {query.shape[0]}, ref has {ref.shape[0]}")
    b, m, _ = query.shape
    n = ref.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    chunk = max(1, max_pairs // max(1, b * n))
    with torch.no_grad():
        work = torch.promote_types(query.dtype, torch.float32)
        q, r = query.detach().to(work), ref.detach().to(work)
        parts = []
        for s in range(0, m, chunk):
            d = torch.cdist(q[:, s:s + chunk], r, compute_mode="donot_use_mm_for_euclid_dist")
            parts.append(d.topk(k, dim=-1, largest=False, sorted=True).indices)
        idx = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
    dist2 = ((query.unsqueeze(2) - gather_points(ref, idx).to(query.dtype)) ** 2).sum(-1)
    return KNNResult(dist2, idx)


def group(points: torch.Tensor, centers: torch.Tensor, k: int, max_pairs: int = DEFAULT_MAX_PAIRS) -> Groups:
    """kNN grouping (Point-MAE / Point-M2AE tokeniser): the k points nearest each centre, relative to it.

    Args:
        points: ``float [B, N, 3]``.
        centers: ``float [B, G, 3]`` (usually FPS-selected points of ``points``).
        k: group size, ``1 <= k <= N``.
        max_pairs: memory bound of :func:`knn`.

    Returns:
        :class:`Groups` ``(neighborhood [B, G, k, 3] = points[idx] - centre, idx int64 [B, G, k])``,
        nearest first.

    Raises:
        ValueError: as :func:`knn`.
    """
    idx = knn(centers, points, k, max_pairs).idx
    return Groups(gather_points(points, idx) - centers.unsqueeze(2), idx)


def three_nn_interpolate(xyz_target: torch.Tensor, xyz_source: torch.Tensor, feats: torch.Tensor,
                         eps: float = 1e-8, max_pairs: int = DEFAULT_MAX_PAIRS) -> torch.Tensor:
    """PointNet++ feature propagation (Qi et al., NeurIPS 2017, §3.4): features of the 3 nearest
    source points, weighted by inverse squared distance ``w_i = (1 / (d_i^2 + eps)) / sum_j (...)``.

    With fewer than 3 source points the S available ones are used (S = 1 copies the feature).
    When ``B * N * S <= max_pairs`` the weights form a dense ``[B, N, S]`` matrix applied by one
    batched matmul (fast on CPU); otherwise the 3 neighbours' features are gathered.
    A target point that coincides with a source point gets (almost exactly) that point's feature.

    Args:
        xyz_target: ``float [B, N, 3]`` where features are wanted.
        xyz_source: ``float [B, S, 3]`` where features are known.
        feats: ``float [B, S, C]``.
        eps: added to squared distances (PointNet++ uses 1e-8).
        max_pairs: memory bound of :func:`knn`.

    Returns:
        ``float [B, N, C]`` (dtype of ``feats``), differentiable w.r.t. ``feats`` and both coordinates.

    Raises:
        ValueError: bad shapes or ``feats`` not matching ``xyz_source``.
    """
    _check_clouds("feats", feats, dim=None)
    if feats.shape[:2] != xyz_source.shape[:2]:
        raise ValueError(f"feats {tuple(feats.shape)} does not match xyz_source {tuple(xyz_source.shape)}")
    b, n, _ = xyz_target.shape
    s = xyz_source.shape[1]
    dist2, idx = knn(xyz_target, xyz_source, min(3, s), max_pairs)
    w = 1.0 / (dist2.float() + eps)
    w = (w / w.sum(-1, keepdim=True)).to(feats.dtype)
    if b * n * s <= max_pairs:
        # as a sparse-in-spirit [B, N, S] weight matrix times the features: one batched matmul is much
        # faster than gathering [B, N, 3, C] neighbour features (same result)
        weights = torch.zeros(b, n, s, dtype=feats.dtype, device=feats.device).scatter(2, idx, w)
        return torch.bmm(weights, feats)
    return (gather_points(feats, idx) * w.unsqueeze(-1)).sum(2)


def chamfer_l2(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared-distance Chamfer distance per cloud (Point-MAE / Point-M2AE ``ChamferDistanceL2``):
    ``mean_i min_j |x_i - y_j|^2 + mean_j min_i |x_i - y_j|^2``.

    Args:
        x: ``float [B, N, 3]``.
        y: ``float [B, M, 3]`` (M may differ from N).

    Returns:
        ``float [B]``, differentiable w.r.t. both clouds; ``.mean()`` gives the official loss when
        all clouds have the same sizes.

    Raises:
        ValueError: bad shapes or batch sizes.
    """
    return knn(x, y, 1).dist2[..., 0].mean(1) + knn(y, x, 1).dist2[..., 0].mean(1)


__all__ = [
    "DEFAULT_MAX_PAIRS",
    "Groups",
    "KNNResult",
    "chamfer_l2",
    "gather_points",
    "group",
    "knn",
    "three_nn_interpolate",
]
