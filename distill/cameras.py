"""Pinhole cameras for rendering shapes normalised to the unit sphere: view sets and projection.

Conventions (``docs/distill-design.md``, "Cameras"):

* World frame: y up (ShapeNet). Shapes are normalised to the unit sphere before rendering.
* Camera frame: OpenCV — x right, y down, z forward; a point in front of the camera has z > 0.
  ``extrinsics`` map world to camera coordinates, ``p_cam = R @ p_world + t`` with
  ``extrinsics = [[R, t], [0, 0, 0, 1]]``.
* Pixels: ``intrinsics`` is the pinhole matrix K in pixels, ``[u, v, 1]^T ~ K @ p_cam``, u along the
  image width (column), v along the height (row). Pixel ``(row i, column j)`` covers the square
  ``[j, j + 1) x [i, i + 1)`` of the image plane, so its centre is at ``(j + 0.5, i + 0.5)`` and a
  projection ``(u, v)`` falls in pixel ``(floor(v), floor(u))``. The principal point of
  :func:`pinhole` is the image centre ``(W / 2, H / 2)``.
* Spherical view angles follow PyTorch3D's ``look_at_view_transform`` (used by PartSLIP): a camera at
  distance d, elevation e and azimuth a (degrees) sits at
  ``d * (cos e * sin a, sin e, cos e * cos a)`` and looks at the origin with y up; azimuth 0 looks
  along -z, elevation > 0 looks down on the shape.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

#: PartSLIP's ten (elevation, azimuth) views in degrees: a ring of four at 10°, three from above at
#: 40° and three from below at -20°, with azimuths staggered between the rings.
PARTSLIP_VIEWS: tuple[tuple[float, float], ...] = (
    (10.0, 0.0), (10.0, 90.0), (10.0, 180.0), (10.0, 270.0),
    (40.0, 0.0), (40.0, 120.0), (40.0, 240.0),
    (-20.0, 60.0), (-20.0, 180.0), (-20.0, 300.0),
)

#: Default camera distance to the origin (PartSLIP's ``camera_distance=2.2``), in unit-sphere radii.
DEFAULT_DISTANCE = 2.2
#: Default full field of view in degrees: the unit sphere seen from 2.2 subtends a half-angle of
#: asin(1 / 2.2) = 27.0°, so at 60° its silhouette spans 88% of the image's shorter side.
DEFAULT_FOV = 60.0


def _check_image_size(image_size: Sequence[int]) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in image_size)
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be a pair (H, W) of positive ints, got {image_size!r}") from None
    if h < 1 or w < 1 or (h, w) != tuple(image_size):
        raise ValueError(f"image_size must be a pair (H, W) of positive ints, got {image_size!r}")
    return h, w


@dataclass
class Cameras:
    """A batch of V pinhole cameras sharing one image size.

    Attributes:
        extrinsics: ``float32 [V, 4, 4]`` world -> camera (OpenCV: x right, y down, z forward),
            ``[[R, t], [0, 0, 0, 1]]`` with R a rotation.
        intrinsics: ``float32 [V, 3, 3]`` pinhole K in pixels (see the module docstring for the pixel
            convention).
        image_size: ``(H, W)`` in pixels.
        elevation: ``float32 [V]`` degrees (informational; NaN where unknown).
        azimuth: ``float32 [V]`` degrees (informational; NaN where unknown).

    Raises:
        ValueError: (on construction) for tensors of the wrong shape, mismatched V, tensors on
            different devices or a bad ``image_size``.
    """

    extrinsics: torch.Tensor
    intrinsics: torch.Tensor
    image_size: tuple[int, int]
    elevation: torch.Tensor
    azimuth: torch.Tensor

    def __post_init__(self) -> None:
        self.image_size = _check_image_size(self.image_size)
        for name, shape in (("extrinsics", (4, 4)), ("intrinsics", (3, 3))):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or tuple(t.shape[1:]) != shape:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a tensor [V, {shape[0]}, {shape[1]}], got {got}")
            setattr(self, name, t.float())
        v = self.extrinsics.shape[0]
        if self.intrinsics.shape[0] != v:
            raise ValueError(f"intrinsics has {self.intrinsics.shape[0]} views, extrinsics {v}")
        for name in ("elevation", "azimuth"):
            t = torch.as_tensor(getattr(self, name), dtype=torch.float32, device=self.extrinsics.device)
            if tuple(t.shape) != (v,):
                raise ValueError(f"{name} must have shape [{v}], got {tuple(t.shape)}")
            setattr(self, name, t)
        if self.intrinsics.device != self.extrinsics.device:
            raise ValueError(f"intrinsics are on {self.intrinsics.device}, extrinsics on {self.extrinsics.device}")

    @property
    def num_views(self) -> int:
        """V, the number of cameras."""
        return int(self.extrinsics.shape[0])

    @property
    def device(self) -> torch.device:
        return self.extrinsics.device

    @property
    def centers(self) -> torch.Tensor:
        """Camera centres in world coordinates, ``float32 [V, 3]`` (``-R^T t``)."""
        r, t = self.extrinsics[:, :3, :3], self.extrinsics[:, :3, 3]
        return -(r.transpose(1, 2) @ t.unsqueeze(-1)).squeeze(-1)

    def to(self, device: torch.device | str) -> Cameras:
        """The same cameras with every tensor on ``device``."""
        return Cameras(self.extrinsics.to(device), self.intrinsics.to(device), self.image_size,
                       self.elevation.to(device), self.azimuth.to(device))

    def select(self, views: torch.Tensor | Sequence[int] | slice) -> Cameras:
        """The cameras ``views`` (indices, a bool mask or a slice) as a new :class:`Cameras`."""
        if not isinstance(views, slice):
            views = torch.as_tensor(views, device=self.device)
            if views.dtype != torch.bool:
                views = views.long().reshape(-1)
        return Cameras(self.extrinsics[views], self.intrinsics[views], self.image_size,
                       self.elevation[views], self.azimuth[views])

    def world_to_camera(self, points: torch.Tensor) -> torch.Tensor:
        """Points ``float [N, 3]`` (world) to camera coordinates ``float32 [V, N, 3]``.

        Computed on ``points.device``. Raises ValueError if ``points`` is not ``[N, 3]``.
        """
        if not isinstance(points, torch.Tensor) or points.dim() != 2 or points.shape[1] != 3:
            got = tuple(points.shape) if isinstance(points, torch.Tensor) else type(points).__name__
            raise ValueError(f"points must be a tensor [N, 3], got {got}")
        ext = self.extrinsics.to(points.device)
        # [V, 1, 3] + [N, 3] @ [V, 3, 3] -> [V, N, 3]
        return torch.baddbmm(ext[:, None, :3, 3], points.float().expand(len(ext), -1, -1),
                             ext[:, :3, :3].transpose(1, 2))

    def project(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project world points into every view.

        Args:
            points: ``float [N, 3]`` world coordinates (any float dtype, any device; the result is on
                ``points.device``).

        Returns:
            ``(uv, z)``: ``uv float32 [V, N, 2]`` pixel coordinates ``(u, v) = (column, row)`` with
            pixel centres at integer + 0.5 (a projection falls in pixel ``(floor(v), floor(u))``),
            and ``z float32 [V, N]`` the camera depth (> 0 in front of the camera). ``uv`` is only
            meaningful where ``z > 0``; it stays finite elsewhere.

        Raises:
            ValueError: if ``points`` is not ``[N, 3]``.
        """
        cam = self.world_to_camera(points)
        z = cam[..., 2]
        k = self.intrinsics.to(points.device)
        q = cam @ k[:, :2, :].transpose(1, 2)                     # [V, N, 2] = (K @ p)[:2]
        safe = torch.where(z.abs() > 1e-12, z, torch.full_like(z, 1e-12))
        return q / safe.unsqueeze(-1), z


def look_at(eye: torch.Tensor, target: torch.Tensor, up: torch.Tensor | Sequence[float] = (0.0, 1.0, 0.0)) -> torch.Tensor:
    """World -> camera extrinsics of cameras at ``eye`` looking at ``target`` (OpenCV convention).

    The camera z axis points from ``eye`` to ``target``, x = z × up (right in the image) and
    y = z × x (down in the image), so ``up`` appears upwards in the image.

    Args:
        eye: ``float [V, 3]`` camera centres (world).
        target: ``float [V, 3]`` or ``[3]`` points looked at.
        up: ``float [V, 3]`` or ``[3]`` world up direction (default +y).

    Returns:
        ``float32 [V, 4, 4]`` extrinsics on ``eye.device``.

    Raises:
        ValueError: for bad shapes, ``eye == target``, or ``up`` parallel to the viewing direction.
    """
    eye = torch.as_tensor(eye, dtype=torch.float32)
    if eye.dim() != 2 or eye.shape[1] != 3:
        raise ValueError(f"eye must be [V, 3], got {tuple(eye.shape)}")
    dev = eye.device
    target = torch.as_tensor(target, dtype=torch.float32, device=dev).expand_as(eye)
    up = torch.as_tensor(up, dtype=torch.float32, device=dev)
    if up.shape[-1] != 3:
        raise ValueError(f"up must be [3] or [V, 3], got {tuple(up.shape)}")
    up = up.expand_as(eye)
    fwd = target - eye
    n = fwd.norm(dim=1, keepdim=True)
    if bool((n <= 1e-9).any()):
        raise ValueError("eye and target coincide for some camera")
    z = fwd / n
    x = torch.linalg.cross(z, up)
    nx = x.norm(dim=1, keepdim=True)
    if bool((nx <= 1e-6 * up.norm(dim=1, keepdim=True)).any()):
        raise ValueError("up is parallel to the viewing direction for some camera (e.g. elevation ±90°)")
    x = x / nx
    y = torch.linalg.cross(z, x)
    r = torch.stack([x, y, z], dim=1)                                # rows: camera axes in world
    ext = torch.zeros(len(eye), 4, 4, dtype=torch.float32, device=dev)
    ext[:, :3, :3] = r
    ext[:, :3, 3] = -(r @ eye.unsqueeze(-1)).squeeze(-1)
    ext[:, 3, 3] = 1.0
    return ext


def pinhole(fov_deg: float, image_size: Sequence[int], device: torch.device | str | None = None) -> torch.Tensor:
    """Pinhole intrinsics ``float32 [3, 3]`` with square pixels and the principal point at the image centre.

    Args:
        fov_deg: full field of view in degrees across the *shorter* image side, in (0, 180).
        image_size: ``(H, W)`` pixels.

    Returns:
        ``K = [[f, 0, W/2], [0, f, H/2], [0, 0, 1]]`` with ``f = min(H, W) / 2 / tan(fov / 2)``.

    Raises:
        ValueError: for ``fov_deg`` outside (0, 180) or a bad ``image_size``.
    """
    h, w = _check_image_size(image_size)
    if not 0.0 < float(fov_deg) < 180.0:
        raise ValueError(f"fov_deg must be in (0, 180), got {fov_deg}")
    f = min(h, w) / 2.0 / math.tan(math.radians(float(fov_deg)) / 2.0)
    return torch.tensor([[f, 0.0, w / 2.0], [0.0, f, h / 2.0], [0.0, 0.0, 1.0]], dtype=torch.float32, device=device)


def orbit_cameras(elevation: torch.Tensor | Sequence[float], azimuth: torch.Tensor | Sequence[float],
                  image_size: Sequence[int] = (224, 224), distance: float = DEFAULT_DISTANCE,
                  fov: float = DEFAULT_FOV, device: torch.device | str | None = None) -> Cameras:
    """Cameras on a sphere of radius ``distance`` around the origin, looking at it, world y up.

    Camera v sits at ``distance * (cos e sin a, sin e, cos e cos a)`` (PyTorch3D's
    ``look_at_view_transform`` placement) for ``e = elevation[v]``, ``a = azimuth[v]`` in degrees.

    Raises:
        ValueError: for mismatched or empty angle lists, ``|elevation| >= 90``, ``distance <= 0``,
            or a bad ``fov`` / ``image_size``.
    """
    elev = torch.as_tensor(elevation, dtype=torch.float32, device=device).reshape(-1)
    azim = torch.as_tensor(azimuth, dtype=torch.float32, device=device).reshape(-1)
    if elev.shape != azim.shape or elev.numel() == 0:
        raise ValueError(f"elevation and azimuth must be non-empty and of equal length, got "
                         f"{elev.numel()} and {azim.numel()}")
    if bool((elev.abs() >= 90).any()):
        raise ValueError("elevation must be in (-90, 90) degrees (the up vector is +y)")
    if not float(distance) > 0:
        raise ValueError(f"distance must be > 0, got {distance}")
    e, a = torch.deg2rad(elev), torch.deg2rad(azim)
    eye = float(distance) * torch.stack([e.cos() * a.sin(), e.sin(), e.cos() * a.cos()], dim=1)
    ext = look_at(eye, torch.zeros(3, device=eye.device))
    k = pinhole(fov, image_size, device=eye.device).expand(len(eye), 3, 3).clone()
    return Cameras(ext, k, tuple(image_size), elev, azim)


def partslip_cameras(num_views: int = 10, image_size: Sequence[int] = (224, 224), distance: float = DEFAULT_DISTANCE,
                     fov: float = DEFAULT_FOV, device: torch.device | str | None = None) -> Cameras:
    """The fixed multi-view set of PartSLIP (Liu et al., CVPR 2023), used by PartDistill.

    PartSLIP's ``render_pc.py`` (PyTorch3D) renders the unit-sphere-normalised shape from 10 views
    at ``camera_distance=2.2``: (elevation, azimuth) = (10, 0), (10, 90), (10, 180), (10, 270) — a
    ring slightly above the equator —, (40, 0), (40, 120), (40, 240) from above and (-20, 60),
    (-20, 180), (-20, 300) from below (:data:`PARTSLIP_VIEWS`; recalled from the PartSLIP code, not
    re-checked against it here). Together they see the top, sides and underside of the shape.

    Differences to PartSLIP, by design: PartSLIP uses an orthographic camera spanning [-1, 1] and
    800x800 images; here the cameras are pinhole (the contract of :class:`Cameras`) with a default
    ``fov`` of 60°, chosen so that the unit sphere at distance 2.2 spans 88% of the shorter image
    side (no clipping, room for splat radii), and 224x224 images (the teachers' input size).

    Args:
        num_views: 1..10; the first ``num_views`` of :data:`PARTSLIP_VIEWS`.
        image_size: ``(H, W)``.
        distance: camera distance to the origin (unit-sphere radii).
        fov: full field of view across the shorter image side, degrees.
        device: where the tensors live.

    Raises:
        ValueError: for ``num_views`` outside 1..10 or bad camera parameters.
    """
    if not 1 <= int(num_views) <= len(PARTSLIP_VIEWS):
        raise ValueError(f"num_views must be in 1..{len(PARTSLIP_VIEWS)} for the PartSLIP view set, got {num_views}")
    views = PARTSLIP_VIEWS[: int(num_views)]
    return orbit_cameras([e for e, _ in views], [a for _, a in views], image_size, distance, fov, device)


def random_cameras(num_views: int, seed: int = 0, image_size: Sequence[int] = (224, 224),
                   distance: float = DEFAULT_DISTANCE, fov: float = DEFAULT_FOV,
                   elevation_range: tuple[float, float] = (-30.0, 60.0),
                   device: torch.device | str | None = None) -> Cameras:
    """Random orbit cameras (e.g. more views to train the few-shot teacher).

    Azimuths are uniform in [0, 360); elevations are uniform *by area* on the sphere band
    ``elevation_range`` (sin e uniform), so views do not crowd near the poles. The same seed gives
    the same cameras on every device (drawn on the CPU).

    Args:
        num_views: V >= 1.
        seed: any integer.
        image_size, distance, fov, device: as :func:`partslip_cameras`.
        elevation_range: ``(low, high)`` degrees with ``-90 < low <= high < 90``.

    Raises:
        ValueError: for ``num_views < 1``, a bad ``elevation_range`` or bad camera parameters.
    """
    if int(num_views) < 1:
        raise ValueError(f"num_views must be >= 1, got {num_views}")
    lo, hi = (float(x) for x in elevation_range)
    if not -90.0 < lo <= hi < 90.0:
        raise ValueError(f"elevation_range must satisfy -90 < low <= high < 90, got {elevation_range}")
    g = torch.Generator().manual_seed(int(seed))
    u = torch.rand(2, int(num_views), generator=g, dtype=torch.float64)
    s_lo, s_hi = math.sin(math.radians(lo)), math.sin(math.radians(hi))
    elev = torch.rad2deg(torch.asin(s_lo + (s_hi - s_lo) * u[0]))
    azim = 360.0 * u[1]
    return orbit_cameras(elev.float(), azim.float(), image_size, distance, fov, device)
