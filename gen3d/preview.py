"""PNG contact sheets of point clouds (numpy + Pillow; no GPU, no OpenGL).

Each cloud is drawn with an orthographic camera from a fixed 3/4 view (azimuth 30°, elevation 20°,
y up), as depth-sorted square splats shaded by depth, or coloured by part label. This is a preview
for people, not the renderer of the teachers (that one lives in ``distill``).
"""
from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

PALETTE = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                    [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]], np.uint8)


def _view_matrix(azimuth: float, elevation: float) -> np.ndarray:
    a, e = np.radians(azimuth), np.radians(elevation)
    rot_y = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    rot_x = np.array([[1, 0, 0], [0, np.cos(e), -np.sin(e)], [0, np.sin(e), np.cos(e)]])
    return rot_x @ rot_y


def render_cloud(points: np.ndarray, labels: np.ndarray | None = None, size: int = 256, splat: int = 2,
                 azimuth: float = 30.0, elevation: float = 20.0) -> np.ndarray:
    """Render one cloud ``[N, 3]`` to an RGB image ``uint8 [size, size, 3]`` (white background).

    Points are centred and scaled to fit; nearer points are drawn last (painter's algorithm).
    ``labels`` ``[N]`` (-1 = grey) colour the parts; otherwise the shade encodes depth.
    """
    pts = np.asarray(points, np.float64)
    pts = (pts - (pts.max(0) + pts.min(0)) / 2) @ _view_matrix(azimuth, elevation).T
    scale = 0.45 * size / max(np.abs(pts[:, :2]).max(), 1e-9)
    px = np.round(pts[:, 0] * scale + size / 2).astype(int)
    py = np.round(size / 2 - pts[:, 1] * scale).astype(int)
    depth = pts[:, 2]
    order = np.argsort(depth)  # far (negative z, away from the viewer) first
    if labels is None:
        shade = (200 - 150 * (depth - depth.min()) / max(np.ptp(depth), 1e-9)).astype(np.uint8)
        colours = np.stack([shade, shade, np.full_like(shade, 230)], 1)
    else:
        lab = np.asarray(labels)
        colours = np.where(lab[:, None] >= 0, PALETTE[np.clip(lab, 0, None) % len(PALETTE)], 160).astype(np.uint8)
    img = np.full((size, size, 3), 255, np.uint8)
    for dx in range(splat):
        for dy in range(splat):
            x, y = np.clip(px[order] + dx, 0, size - 1), np.clip(py[order] + dy, 0, size - 1)
            img[y, x] = colours[order]
    return img


def contact_sheet(clouds: Sequence[np.ndarray], path: str | os.PathLike, labels: Sequence[np.ndarray | None] | None = None,
                  titles: Sequence[str] | None = None, columns: int = 8, size: int = 192) -> None:
    """Write a grid of rendered clouds to a PNG file (written to a temporary name, then renamed)."""
    n = len(clouds)
    rows = max(1, -(-n // columns))
    cols = min(columns, max(n, 1))
    sheet = Image.new("RGB", (cols * size, rows * (size + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for k, cloud in enumerate(clouds):
        r, c = divmod(k, cols)
        img = render_cloud(cloud, None if labels is None else labels[k], size)
        sheet.paste(Image.fromarray(img), (c * size, r * (size + 14) + 14))
        if titles is not None:
            draw.text((c * size + 4, r * (size + 14)), str(titles[k])[:32], fill=(0, 0, 0))
    tmp = f"{path}.tmp.png"
    sheet.save(tmp)
    os.replace(tmp, path)
