"""Princeton Segmentation Benchmark meshes: Labeled PSB and the human segmentations.

Labeled PSB (Kalogerakis, Hertzmann, Singh 2010, "Learning 3D mesh segmentation and labeling")
-----------------------------------------------------------------------------------------------
Layout (as unpacked from the authors' ``labeledDb.7z``, or straight from a ``.tar``/``.tar.xz``
of that folder): ``LabeledDB_new/<Category>/<id>.off`` and ``<id>_labels.txt``. A label file is
pairs of lines — a part name, then the 1-based indices of the faces of that part (CRLF line ends
in the release). 19 categories of 20 meshes.

* Part names: with ``part_names="shapenet"`` (default) Airplane, Chair, Table and Cup become the
  ShapeNetPart categories ``airplane``, ``chair``, ``table``, ``mug`` with their part names (the
  mapping is in ``gen3d/data/psb.yaml``: chair support -> seat, backsupport -> back; airplane
  stabilizer + rudder -> tail; table support -> top; cup -> mug); every other category keeps its
  PSB part names (sorted). ``part_names="psb"`` keeps the PSB names for all categories.
* Split (fixed): the first 10 ids of each category are ``train``, the last 10 ``test``.

PSB (Chen, Golovinskiy, Funkhouser 2009, "A benchmark for 3D mesh segmentation")
-------------------------------------------------------------------------------
Layout: ``<root>/off/<id>.off`` and human segmentations ``<root>/seg_human/<id>/<id>_<k>.seg``
(or the release's ``<root>/seg/Benchmark/<id>/<id>_<k>.seg``): one 0-based segment index per face.
Segments are *not* semantic, so :func:`read_psb` yields unlabelled records and
:func:`read_psb_segmentations` returns the segmentations themselves.
"""
from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DataFormatError
from ..meshio import parse_off, read_off
from ..orient import canonical_rotation
from ..parts import load_table
from ..parts import part_names as shapenet_part_names
from ..records import ShapeRecord
from ._common import mesh_record

_MEMBER = re.compile(r"(?:^|/)([A-Za-z]+)/(\d+)(_labels\.txt|\.off)$")


def psb_categories() -> list[str]:
    """The 19 Labeled-PSB category names (``Airplane`` ... ``Vase``)."""
    return sorted(load_table("psb")["parts"])


def _canonical_psb_category(name: str) -> str:
    for cat in psb_categories():
        if cat.lower() == name.lower():
            return cat
    mapped = {v["category"]: k for k, v in load_table("psb")["mapping"].items()}
    if name.lower() in mapped:
        return mapped[name.lower()]
    raise KeyError(f"unknown Labeled-PSB category {name!r}; known: {', '.join(psb_categories())}")


def psb_category_of_id(mesh_id: int) -> str:
    """The PSB category of a mesh id (ids are shared by PSB and Labeled PSB)."""
    table = load_table("psb")
    for cat, first in table["first_id"].items():
        if first <= mesh_id < first + table["meshes_per_category"]:
            return cat
    raise KeyError(f"mesh id {mesh_id} is in no PSB category")


def labeled_psb_split(category: str, mesh_id: int) -> str:
    """``"train"`` for the first 10 ids of the category, ``"test"`` for the last 10."""
    table = load_table("psb")
    first = table["first_id"][_canonical_psb_category(category)]
    offset = mesh_id - first
    if not 0 <= offset < table["meshes_per_category"]:
        raise KeyError(f"mesh id {mesh_id} is not a {category} id")
    return "train" if offset < table["train_per_category"] else "test"


def target_names(category: str, part_names: str = "shapenet") -> tuple[str, tuple[str, ...], dict[str, str]]:
    """``(category, part names, PSB part -> part)`` the reader produces for a PSB category."""
    cat = _canonical_psb_category(category)
    table = load_table("psb")
    if part_names not in ("shapenet", "psb"):
        raise ValueError(f"part_names must be 'shapenet' or 'psb', got {part_names!r}")
    if part_names == "shapenet" and cat in table["mapping"]:
        entry = table["mapping"][cat]
        return entry["category"], shapenet_part_names(entry["category"]), dict(entry["parts"])
    names = tuple(table["parts"][cat])
    return cat.lower(), names, {n: n for n in names}


def parse_labels(data: bytes, num_faces: int, name: str) -> dict[str, np.ndarray]:
    """Parse a Labeled-PSB ``_labels.txt`` into ``{part name: 0-based face indices int64}``.

    Args:
        data: the file's bytes (LF or CRLF).
        num_faces: the mesh's face count, to check the indices against.
        name: file name for errors.

    Raises:
        DataFormatError: odd number of lines, non-integer or out-of-range indices, a face
            labelled twice.
    """
    try:
        lines = [line.strip() for line in data.decode("utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError as exc:
        raise DataFormatError(name, "file", "not a UTF-8 text file") from exc
    if not lines or len(lines) % 2:
        raise DataFormatError(name, "lines", f"expected pairs of lines (part name, face indices), got {len(lines)} lines")
    parts: dict[str, list[np.ndarray]] = {}
    for j in range(0, len(lines), 2):
        part = lines[j]
        try:
            idx = np.array(lines[j + 1].split(), dtype=np.int64) - 1
        except ValueError as exc:
            raise DataFormatError(name, f"line {j + 2} ({part})", "face indices must be integers") from exc
        if idx.size and (idx.min() < 0 or idx.max() >= num_faces):
            raise DataFormatError(name, f"line {j + 2} ({part})", f"face index out of range 1..{num_faces}")
        parts.setdefault(part, []).append(idx)
    merged = {k: np.concatenate(v) for k, v in parts.items()}
    counts = np.bincount(np.concatenate(list(merged.values())), minlength=num_faces)
    if counts.max(initial=0) > 1:
        raise DataFormatError(name, "faces", f"{int((counts > 1).sum())} faces are labelled more than once")
    return merged


def face_labels_from_parts(parts: dict[str, np.ndarray], num_faces: int, mapping: dict[str, str],
                           names: tuple[str, ...], file: str) -> np.ndarray:
    """``int16 [F]`` face labels (index into ``names``; -1 for unlabelled faces).

    Raises:
        DataFormatError: a part name with no entry in ``mapping``.
    """
    labels = np.full(num_faces, -1, np.int16)
    for part, idx in parts.items():
        if part not in mapping:
            raise DataFormatError(file, f"part {part!r}", f"unknown part name; expected one of {sorted(mapping)}")
        labels[idx] = names.index(mapping[part])
    return labels


@dataclass
class LabeledPSBFile:
    """The raw bytes of one Labeled-PSB mesh and its label file."""

    category: str
    mesh_id: int
    off: bytes
    labels: bytes
    off_name: str
    labels_name: str


def iter_labeled_psb_files(source: str | os.PathLike, categories: Iterable[str] | None = None) -> Iterator[LabeledPSBFile]:
    """Yield the (mesh, labels) file pairs of a Labeled-PSB copy, sorted by category and id.

    Args:
        source: an unpacked ``LabeledDB_new`` folder (or its parent, or one category folder),
            or a ``.tar`` / ``.tar.xz`` / ``.tar.gz`` archive of it.
        categories: PSB category names to keep (any case; ShapeNetPart names such as ``mug`` too).

    Raises:
        FileNotFoundError: ``source`` does not exist.
        DataFormatError: a mesh without its label file or vice versa; an unreadable archive.
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source}: no Labeled-PSB folder or archive here")
    wanted = None if categories is None else {_canonical_psb_category(c) for c in categories}
    found: dict[tuple[str, int], dict[str, tuple[str, bytes]]] = {}

    def keep(path: str) -> tuple[str, int, str] | None:
        m = _MEMBER.search(path.replace(os.sep, "/"))
        if not m:
            return None
        try:
            cat = _canonical_psb_category(m.group(1))
        except KeyError:
            return None
        if wanted is not None and cat not in wanted:
            return None
        return cat, int(m.group(2)), "labels" if m.group(3) == "_labels.txt" else "off"

    if source.is_dir():
        for path in sorted(source.rglob("*")):
            k = keep(str(path))
            if k:
                found.setdefault(k[:2], {})[k[2]] = (str(path), path.read_bytes())
    else:
        try:
            with tarfile.open(source, "r|*") as tar:
                for member in tar:
                    k = keep(member.name) if member.isfile() else None
                    if k:
                        found.setdefault(k[:2], {})[k[2]] = (f"{source}:{member.name}", tar.extractfile(member).read())
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise DataFormatError(source, "archive", f"not a readable tar archive: {exc}") from exc
    for (cat, mesh_id), files in sorted(found.items()):
        if set(files) != {"off", "labels"}:
            missing = ({"off", "labels"} - set(files)).pop()
            present = next(iter(files.values()))[0]
            raise DataFormatError(present, missing, f"{cat} mesh {mesh_id} has no {'label file' if missing == 'labels' else 'mesh'}")
        yield LabeledPSBFile(cat, mesh_id, files["off"][1], files["labels"][1], files["off"][0], files["labels"][0])


def labeled_psb_record(item: LabeledPSBFile, num_points: int = 2048, seed: int = 0, part_names: str = "shapenet",
                       keep_mesh: bool = True, orient: bool = True) -> ShapeRecord:
    """Parse one Labeled-PSB pair into a record (points sampled with face labels).

    With ``orient`` (default), chairs, airplanes and tables are rotated into ShapeNet's pose by the
    axis-aligned rotation :func:`gen3d.orient.canonical_rotation` derives from their labelled parts
    (recorded as ``provenance["rotation"]``, a 3x3 list, or None where no rule applies); the raw
    meshes are not consistently oriented.

    Raises:
        DataFormatError: a malformed mesh or label file, or labels that do not fit the mesh.
    """
    mesh = parse_off(item.off, item.off_name)
    num_polys = int(mesh.face_source.max()) + 1 if len(mesh.face_source) else 0
    parts = parse_labels(item.labels, num_polys, item.labels_name)
    category, names, mapping = target_names(item.category, part_names)
    poly_labels = face_labels_from_parts(parts, num_polys, mapping, names, item.labels_name)
    unlabelled = int((poly_labels < 0).sum())
    vertices, rotation = mesh.vertices, None
    if orient:
        sn_names, sn_labels = names, poly_labels
        if part_names != "shapenet":  # the rules speak ShapeNetPart part names
            _, sn_names, sn_mapping = target_names(item.category, "shapenet")
            sn_labels = face_labels_from_parts(parts, num_polys, sn_mapping, sn_names, item.labels_name)
        rotation = canonical_rotation(category, mesh.vertices, mesh.faces, sn_labels[mesh.face_source], sn_names)
        if rotation is not None:
            vertices = (np.asarray(mesh.vertices, np.float64) @ rotation.T).astype(np.float32)
    return mesh_record(
        vertices, mesh.faces, poly_labels[mesh.face_source], shape_id=str(item.mesh_id), category=category,
        source="real", split=labeled_psb_split(item.category, item.mesh_id), part_names=names,
        num_points=num_points, seed=seed, keep_mesh=keep_mesh,
        provenance={"dataset": "labeled-psb", "psb_category": item.category, "file": item.off_name,
                    "labels_file": item.labels_name, "part_names": part_names, "unlabelled_faces": unlabelled,
                    "rotation": None if rotation is None else rotation.round().astype(int).tolist()})


def read_labeled_psb(source: str | os.PathLike, categories: Iterable[str] | None = None,
                     splits: Iterable[str] | None = None, num_points: int = 2048, seed: int = 0,
                     part_names: str = "shapenet", keep_mesh: bool = True, orient: bool = True) -> Iterator[ShapeRecord]:
    """Read Labeled-PSB meshes as records (see the module docstring for layout, names, split).

    Args:
        source: folder or archive (see :func:`iter_labeled_psb_files`).
        categories: PSB or ShapeNetPart category names; None = all 19.
        splits: subset of ``{"train", "test"}``; None = both.
        num_points: points sampled per mesh (area-weighted, labels from faces).
        seed: sampling seed (per-shape seeds derive from it and the mesh id).
        part_names: ``"shapenet"`` or ``"psb"``.
        keep_mesh: store the mesh and per-face labels in the record.
        orient: rotate chairs, airplanes and tables into ShapeNet's pose (:func:`labeled_psb_record`).

    Yields:
        :class:`ShapeRecord` with ``source="real"``, ``shape_id`` the PSB id.
    """
    splits = None if splits is None else set(splits)
    for item in iter_labeled_psb_files(source, categories):
        if splits is None or labeled_psb_split(item.category, item.mesh_id) in splits:
            yield labeled_psb_record(item, num_points, seed, part_names, keep_mesh, orient)


# ----------------------------------------------------------------------------------------------
# PSB (Chen et al. 2009) with human segmentations
# ----------------------------------------------------------------------------------------------
def _seg_dir(root: Path, mesh_id: int) -> Path:
    for cand in (root / "seg_human" / str(mesh_id), root / "seg" / "Benchmark" / str(mesh_id)):
        if cand.is_dir():
            return cand
    raise FileNotFoundError(f"{root}: no human segmentations for mesh {mesh_id} "
                            f"(looked in seg_human/{mesh_id} and seg/Benchmark/{mesh_id})")


def read_psb_segmentations(root: str | os.PathLike, mesh_id: int, num_faces: int | None = None) -> list[np.ndarray]:
    """The human segmentations of one PSB mesh: a list of ``int64 [F]`` segment indices (0-based,
    one array per annotator file ``<id>_<k>.seg``, sorted by k).

    Raises:
        FileNotFoundError: no segmentation folder.
        DataFormatError: a file whose line count differs from the mesh's face count, or
            non-integer / negative entries.
    """
    root = Path(root)
    if num_faces is None:
        num_faces = len(read_off(root / "off" / f"{mesh_id}.off").faces)
    files = sorted(_seg_dir(root, mesh_id).glob(f"{mesh_id}_*.seg"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    segs = []
    for f in files:
        try:
            seg = np.array(f.read_bytes().split(), dtype=np.int64)
        except ValueError as exc:
            raise DataFormatError(f, "segments", "entries must be integers") from exc
        if len(seg) != num_faces:
            raise DataFormatError(f, "lines", f"{len(seg)} entries for a mesh of {num_faces} faces")
        if seg.size and seg.min() < 0:
            raise DataFormatError(f, "segments", "negative segment index")
        segs.append(seg)
    return segs


def read_psb(root: str | os.PathLike, categories: Iterable[str] | None = None, num_points: int = 2048,
             seed: int = 0, keep_mesh: bool = True) -> Iterator[ShapeRecord]:
    """Read PSB meshes (``<root>/off/<id>.off``) as unlabelled real records.

    Categories come from the mesh id (shared with Labeled PSB) and are named as the Labeled-PSB
    reader names them (``airplane``, ``chair``, ...); the split follows Labeled PSB's fixed split.
    Provenance lists the human segmentation files (read them with :func:`read_psb_segmentations`).
    """
    root = Path(root)
    if not (root / "off").is_dir():
        raise FileNotFoundError(f"{root}: no 'off' folder of PSB meshes")
    wanted = None if categories is None else {_canonical_psb_category(c) for c in categories}
    for path in sorted((root / "off").glob("*.off"), key=lambda p: int(p.stem) if p.stem.isdigit() else -1):
        if not path.stem.isdigit():
            continue
        mesh_id = int(path.stem)
        cat = psb_category_of_id(mesh_id)
        if wanted is not None and cat not in wanted:
            continue
        mesh = read_off(path)
        category, names, _ = target_names(cat)
        try:
            seg_files = sorted(str(p) for p in _seg_dir(root, mesh_id).glob("*.seg"))
        except FileNotFoundError:
            seg_files = []
        yield mesh_record(mesh.vertices, mesh.faces, None, shape_id=str(mesh_id), category=category,
                          source="real", split=labeled_psb_split(cat, mesh_id), part_names=names,
                          num_points=num_points, seed=seed, keep_mesh=keep_mesh,
                          provenance={"dataset": "psb", "file": str(path), "segmentations": seg_files})
