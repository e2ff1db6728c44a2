"""Reading meshes and point clouds from files.

* OFF (``.off``): parsed here with numpy (header ``OFF`` then ``nV nF nE``, on one line or two;
  ``#`` comments; triangles, or polygons split into triangle fans), because point-cloud-utils 0.34
  prints a debug line per file and neither it nor trimesh reads from in-memory bytes (we read OFF
  straight out of ``.tar.xz`` archives).
* OBJ / PLY / STL / GLB: trimesh (``force="mesh"``, scenes concatenated).
* Point clouds: ``.npy`` (``[N, 3]`` or ``[N, >=6]`` with normals), ``.ply`` without faces,
  ``.pts`` / ``.xyz`` / ``.txt`` (whitespace columns).

Every function raises :class:`gen3d.errors.DataFormatError` naming the file and field for
malformed input, and :class:`FileNotFoundError` for missing files.
"""
from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataFormatError

MESH_SUFFIXES = (".off", ".obj", ".ply", ".stl", ".glb", ".gltf")
CLOUD_SUFFIXES = (".npy", ".pts", ".xyz", ".txt")


@dataclass
class Mesh:
    """A triangle mesh: ``vertices float32 [V, 3]``, ``faces int32 [F, 3]`` (0-based).

    ``face_source int64 [F]`` gives, for each triangle, the index of the polygon of the file it
    came from (identity for pure triangle meshes), so that per-polygon labels can follow
    triangulation.
    """

    vertices: np.ndarray
    faces: np.ndarray
    face_source: np.ndarray


def _check_mesh(vertices: np.ndarray, faces: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(vertices)):
        raise DataFormatError(name, "vertices", "non-finite (NaN or inf) coordinates")
    if len(faces) and (faces.min() < 0 or faces.max() >= len(vertices)):
        raise DataFormatError(name, "faces", f"vertex index out of range [0, {len(vertices)})")


def parse_off(data: bytes | str, name: str = "<off>") -> Mesh:
    """Parse the text of an OFF file.

    Args:
        data: the file's bytes or text.
        name: file name used in error messages.

    Raises:
        DataFormatError: bad header, counts, truncated data, bad indices, non-finite vertices.
    """
    if isinstance(data, bytes):
        try:
            text = data.decode("ascii")
        except UnicodeDecodeError as exc:
            raise DataFormatError(name, "header", "not an ASCII OFF file") from exc
    else:
        text = data
    if "#" in text:
        text = "\n".join(line.split("#", 1)[0] for line in text.splitlines())
    head = text.split(None, 4)
    if not head or not head[0].upper().endswith("OFF"):
        raise DataFormatError(name, "header", f"expected 'OFF', got {head[0][:20]!r}" if head else "empty file")
    if head[0].upper() != "OFF":
        raise DataFormatError(name, "header", f"unsupported OFF variant {head[0]!r} (only plain OFF)")
    if len(head) < 4:
        raise DataFormatError(name, "header", "missing vertex/face counts")
    try:
        nv, nf = int(head[1]), int(head[2])
        int(head[3])
    except ValueError as exc:
        raise DataFormatError(name, "header", f"counts are not integers: {head[1:4]}") from exc
    if nv <= 0 or nf < 0:
        raise DataFormatError(name, "header", f"bad counts nV={nv} nF={nf}")
    body = head[4] if len(head) > 4 else ""
    with np.errstate(all="ignore"):
        try:
            values = np.array(body.split(), dtype=np.float64)
        except ValueError as exc:
            raise DataFormatError(name, "body", f"non-numeric token ({exc})") from exc
    if len(values) < 3 * nv:
        raise DataFormatError(name, "vertices", f"truncated: expected {nv} vertices")
    vertices = values[: 3 * nv].reshape(nv, 3)
    rest = values[3 * nv:]
    faces, source = _parse_off_faces(rest, nf, name)
    _check_mesh(vertices, faces, name)
    return Mesh(vertices.astype(np.float32), faces.astype(np.int32), source)


def _parse_off_faces(rest: np.ndarray, nf: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    if nf == 0:
        return np.zeros((0, 3), np.int64), np.zeros(0, np.int64)
    # Fast path: every face is "3 a b c" with nothing after it.
    if len(rest) == 4 * nf:
        block = rest.reshape(nf, 4)
        if np.all(block[:, 0] == 3):
            return _as_index(block[:, 1:], name), np.arange(nf)
    faces, source, pos = [], [], 0
    for i in range(nf):
        if pos >= len(rest):
            raise DataFormatError(name, "faces", f"truncated: {i} of {nf} faces present")
        k = rest[pos]
        if k != int(k) or k < 3 or pos + 1 + int(k) > len(rest):
            raise DataFormatError(name, f"face {i}", f"bad polygon size {k!r} or truncated")
        k = int(k)
        poly = _as_index(rest[pos + 1: pos + 1 + k], name)
        faces.extend([poly[0], poly[j], poly[j + 1]] for j in range(1, k - 1))
        source.extend([i] * (k - 2))
        pos += 1 + k
        # Skip optional per-face colour values: they are not integers followed by a polygon size.
        while pos < len(rest) and i + 1 < nf and (rest[pos] != int(rest[pos]) or rest[pos] < 3):
            pos += 1
    return np.array(faces, np.int64).reshape(-1, 3), np.array(source, np.int64)


def _as_index(values: np.ndarray, name: str) -> np.ndarray:
    if not np.all(np.isfinite(values)) or np.any(values != np.round(values)):
        raise DataFormatError(name, "faces", "vertex indices must be integers")
    return values.astype(np.int64)


def read_off(path: str | os.PathLike) -> Mesh:
    """Read an OFF file from disk (see :func:`parse_off`)."""
    path = Path(path)
    return parse_off(path.read_bytes(), str(path))


def load_mesh(path: str | os.PathLike) -> Mesh:
    """Load a triangle mesh from ``.off`` (own parser) or ``.obj/.ply/.stl/.glb/.gltf`` (trimesh).

    Raises:
        FileNotFoundError: missing file.
        DataFormatError: unreadable file, no faces, bad indices or non-finite vertices.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such mesh file")
    suffix = path.suffix.lower()
    if suffix == ".off":
        return read_off(path)
    if suffix not in MESH_SUFFIXES:
        raise DataFormatError(path, "suffix", f"unsupported mesh format {suffix!r} ({', '.join(MESH_SUFFIXES)})")
    import trimesh

    try:
        mesh = trimesh.load(str(path), force="mesh", process=False)
    except Exception as exc:  # trimesh raises many types for bad files
        raise DataFormatError(path, "file", f"trimesh could not read it: {exc}") from exc
    faces = np.asarray(getattr(mesh, "faces", np.zeros((0, 3))), dtype=np.int64)
    vertices = np.asarray(getattr(mesh, "vertices", np.zeros((0, 3))), dtype=np.float64)
    if len(faces) == 0:
        raise DataFormatError(path, "faces", "the file has no faces (use it as a point cloud)")
    _check_mesh(vertices, faces, str(path))
    return Mesh(vertices.astype(np.float32), faces.astype(np.int32), np.arange(len(faces)))


def load_point_cloud(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """Load a point cloud; returns ``(points float32 [N, 3], normals float32 [N, 3] or None)``.

    ``.npy``: ``[N, 3]`` or ``[N, >=6]`` (columns 3:6 are normals). ``.pts/.xyz/.txt``: whitespace
    columns, the same convention. ``.ply`` without faces: its vertices (trimesh).

    Raises:
        FileNotFoundError, DataFormatError.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such point-cloud file")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif suffix in (".pts", ".xyz", ".txt"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # empty files are reported below
                arr = np.loadtxt(path, dtype=np.float64, ndmin=2)
        elif suffix == ".ply":
            import trimesh

            arr = np.asarray(trimesh.load(str(path), process=False).vertices)
        else:
            raise DataFormatError(path, "suffix", f"unsupported point-cloud format {suffix!r}")
    except DataFormatError:
        raise
    except Exception as exc:
        raise DataFormatError(path, "file", f"could not read point cloud: {exc}") from exc
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.shape[1] < 3 or len(arr) == 0 or not np.issubdtype(arr.dtype, np.number):
        raise DataFormatError(path, "points", f"expected a non-empty [N, 3+] numeric array, got {arr.dtype} {arr.shape}")
    arr = arr.astype(np.float32)
    if not np.all(np.isfinite(arr[:, :3])):
        raise DataFormatError(path, "points", "non-finite (NaN or inf) coordinates")
    normals = arr[:, 3:6] if arr.shape[1] >= 6 else None
    return arr[:, :3].copy(), None if normals is None else normals.copy()


def read_text_lines(data: bytes, name: str) -> list[str]:
    """Decode a small text file (ASCII/UTF-8, LF or CRLF) into stripped non-empty lines."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataFormatError(name, "file", "not a UTF-8 text file") from exc
    return [line.strip() for line in io.StringIO(text) if line.strip()]
