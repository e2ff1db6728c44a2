"""Procedural part-labelled shapes: chairs, tables, airplanes and mugs with known answers.

Each shape is a union of closed, outward-oriented primitives (:mod:`gen3d.primitives`), each
primitive carrying the ShapeNetPart label of the part it belongs to (``gen3d.parts.part_names``).
The mesh of a shape is the concatenation of its primitives (they touch or interpenetrate; there
is no boolean union), so per-face labels are exact. Points are sampled on that mesh by area and
every sample that lies strictly inside another primitive (hidden surface, e.g. the top of a leg
inside the seat) is dropped before exactly ``num_points`` are kept.

Conventions (ShapeNet): y up, the shape's front towards +z (airplane nose at +z, wings along x;
mug axis along y, handle on +x), the bounding box centred at the origin and its largest side
scaled to a random length in [0.85, 0.95].

Determinism: shape ``index`` of stream ``seed`` depends only on ``(category, seed, index)``; its
geometry does not depend on ``num_points`` either (separate random streams for geometry and
sampling). See ``docs/procedural.md``.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import point_cloud_utils as pcu

from .parts import part_names
from .primitives import (CUBE_BITS, Solid, beam, box, concatenate, cylinder, hexahedron, lathe, prism,
                         superellipse_section, tube)
from .records import SPLITS, ShapeRecord
from .sampling import sample_surface

#: The categories :func:`generate` knows (ShapeNetPart names; labels follow ``part_names``).
CATEGORIES: tuple[str, ...] = ("chair", "table", "airplane", "mug")
#: Generator version, stored in provenance; bump it whenever the shapes of a (seed, index) change.
VERSION = 1
#: A sample is hidden when its signed distance to another primitive is below ``-HIDDEN_TOL``
#: (in the units of the normalised shape, whose largest side is about 0.9).
HIDDEN_TOL = 1e-5
_X, _Y, _Z = np.eye(3)


@dataclass
class ProceduralShape:
    """The closed, labelled primitives of one procedural shape (normalised coordinates).

    Attributes:
        category: one of :data:`CATEGORIES`.
        part_names: the category's part names; ``labels`` index into them.
        solids: closed, outward-oriented primitives.
        labels: one part index per solid.
        style: the discrete choices made (JSON-serialisable).
    """

    category: str
    part_names: tuple[str, ...]
    solids: list[Solid] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    style: dict[str, Any] = field(default_factory=dict)

    def add(self, part: str, *solids: Solid) -> None:
        """Append solids belonging to the part named ``part``."""
        label = self.part_names.index(part)
        self.solids.extend(solids)
        self.labels.extend([label] * len(solids))

    def mesh(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(vertices float64 [V, 3], faces int64 [F, 3], face_labels int16 [F],
        face_solid int64 [F])``: the concatenated solids, the label and the solid of each face."""
        vertices, faces = concatenate(self.solids)
        counts = [len(s.faces) for s in self.solids]
        face_labels = np.repeat(np.asarray(self.labels, dtype=np.int16), counts)
        face_solid = np.repeat(np.arange(len(self.solids)), counts)
        return vertices, faces, face_labels, face_solid

    def normalise(self, largest_side: float) -> None:
        """Centre the bounding box at the origin and scale its largest side to ``largest_side``."""
        lo = np.min([s.bounds[0] for s in self.solids], axis=0)
        hi = np.max([s.bounds[1] for s in self.solids], axis=0)
        scale = largest_side / float(np.max(hi - lo))
        self.solids = [s.transformed(scale, -scale * (lo + hi) / 2) for s in self.solids]


# ----------------------------------------------------------------------------------------------
# Shared helpers
# ----------------------------------------------------------------------------------------------

def _pick(rng: np.random.Generator, options: tuple, p: tuple | None = None):
    """One of ``options`` (a plain Python value), uniformly or with probabilities ``p``."""
    return options[int(rng.choice(len(options), p=p))]


def _mirror_x(solid_fn: Callable[[float], Solid]) -> tuple[Solid, Solid]:
    """The two solids ``solid_fn(+1)`` and ``solid_fn(-1)`` (``sign`` multiplies x)."""
    return solid_fn(1.0), solid_fn(-1.0)


def _corner_sites(half_x: float, half_z: float) -> list[tuple[float, float]]:
    """The four ``(x, z)`` sites ``(+-half_x, +-half_z)``."""
    return [(sx * half_x, sz * half_z) for sx in (-1, 1) for sz in (-1, 1)]


@dataclass(frozen=True)
class _Slab:
    """A horizontal slab (chair seat, table top): footprint ``width`` (x) by ``depth`` (z),
    bottom at ``y``, ``thickness`` high; ``exponent`` of its super-ellipse outline (``inf`` for a
    rectangle). ``corner`` is the fraction of the half sizes at which the outline crosses the
    diagonal, so sites inside ``corner * half size`` are under the slab."""

    width: float
    depth: float
    y: float
    thickness: float
    exponent: float

    @property
    def corner(self) -> float:
        return 1.0 if np.isinf(self.exponent) else 2.0 ** (-1.0 / self.exponent)

    @property
    def mid(self) -> float:
        return self.y + self.thickness / 2

    @property
    def top(self) -> float:
        return self.y + self.thickness

    def solid(self) -> Solid:
        center = (0.0, self.mid, 0.0)
        if np.isinf(self.exponent):
            return box(center, (self.width, self.thickness, self.depth))
        section = superellipse_section(40, self.exponent)
        return prism(center, _Y, self.width / 2, self.depth / 2, self.thickness, section, hint=_Z)

    def leg_sites(self, inset: float) -> list[tuple[float, float]]:
        """Four sites whose squares of half side ``<= inset`` stay under the slab."""
        return _corner_sites(self.corner * self.width / 2 - inset, self.corner * self.depth / 2 - inset)


def _slab(rng: np.random.Generator, width: float, depth: float, y: float, thickness: float,
          shape: str) -> _Slab:
    """A :class:`_Slab` of outline ``shape``: ``"box"``, ``"round"`` (ellipse) or ``"rounded"``."""
    exponent = {"box": np.inf, "round": 2.0}.get(shape)
    return _Slab(width, depth, y, thickness, rng.uniform(3.0, 6.0) if exponent is None else exponent)


def _star_base(shape: ProceduralShape, part: str, rng: np.random.Generator, top_y: float,
               column_r: float, foot_len: float, feet: int) -> None:
    """Pedestal: a vertical column from a hub up to ``top_y`` and ``feet`` radial feet."""
    foot_w, foot_h = rng.uniform(0.6, 0.9) * column_r * 1.4, rng.uniform(0.025, 0.04)
    hub_y = foot_h / 2 + rng.uniform(0.01, 0.04)
    phase = rng.uniform(0.0, 2.0 * np.pi / feet)
    hub = cylinder((0.0, hub_y - 0.45 * foot_h, 0.0), (0.0, hub_y + 0.6 * foot_h, 0.0), column_r * 1.4, segments=20)
    shape.add(part, hub, cylinder((0.0, hub_y, 0.0), (0.0, top_y, 0.0), column_r, segments=20))
    for a in phase + 2.0 * np.pi * np.arange(feet) / feet:
        d = np.array([np.cos(a), 0.0, np.sin(a)])
        start = np.array([0.0, hub_y, 0.0]) - d * column_r * 0.5
        end = d * foot_len + np.array([0.0, foot_h / 2, 0.0])
        shape.add(part, beam(start, end, foot_w, foot_h, up=_Y))


def _four_legs(shape: ProceduralShape, part: str, rng: np.random.Generator, slab: _Slab,
               kind: str, side: float, splay: float) -> None:
    """Four legs (``kind`` ``"box"`` or ``"round"``, width ``side``) from the floor into the
    middle of ``slab``, their feet pushed outwards by ``splay``."""
    inset = rng.uniform(0.01, 0.04) + side / 2
    for x, z in slab.leg_sites(inset):
        top = np.array([x, slab.mid, z])
        foot = np.array([x + np.sign(x) * splay, 0.0, z + np.sign(z) * splay])
        leg = beam(foot, top, side, side, up=_Z) if kind == "box" else cylinder(foot, top, side / 2, segments=16)
        shape.add(part, leg)


def _side_supports(shape: ProceduralShape, part: str, rng: np.random.Generator, slab: _Slab,
                   runner: bool, posts: bool) -> None:
    """Two side supports under ``slab`` at +-x, each a solid panel along z or (``posts=True``) a
    post at each end, optionally standing on a floor runner along z (chair panels / sled, table
    trestle)."""
    thick = rng.uniform(0.02, 0.04)
    foot_w = thick + rng.uniform(0.01, 0.03)
    half_x = slab.corner * slab.width / 2 - rng.uniform(0.005, 0.03) - foot_w / 2
    half_z = slab.corner * slab.depth / 2 - rng.uniform(0.005, 0.04)
    foot_h = rng.uniform(0.02, 0.035) if runner else 0.0
    runner_len = 2 * half_z + rng.uniform(0.04, 0.1)
    bottom = foot_h / 2
    for x in (-half_x, half_x):
        if runner:
            shape.add(part, box((x, foot_h / 2, 0.0), (foot_w, foot_h, runner_len)))
        if posts:
            for z in (-(half_z - thick / 2), half_z - thick / 2):
                shape.add(part, box((x, (bottom + slab.mid) / 2, z), (thick, slab.mid - bottom, thick)))
        else:
            shape.add(part, box((x, (bottom + slab.mid) / 2, 0.0), (thick, slab.mid - bottom, 2 * half_z)))


# ----------------------------------------------------------------------------------------------
# Chair
# ----------------------------------------------------------------------------------------------

def _chair(rng: np.random.Generator, shape: ProceduralShape) -> None:
    """Seat, legs below it, back at its rear (-z) above it, arms on ~35% of chairs."""
    seat_style = _pick(rng, ("box", "rounded", "thick"))
    thickness = rng.uniform(0.07, 0.12) if seat_style == "thick" else rng.uniform(0.03, 0.055)
    seat = _slab(rng, rng.uniform(0.42, 0.6), rng.uniform(0.4, 0.56), rng.uniform(0.36, 0.48), thickness,
                 "rounded" if seat_style == "rounded" else "box")
    shape.add("seat", seat.solid())
    shape.style["seat"] = seat_style
    _chair_legs(rng, shape, seat)
    back_mid_z = _chair_back(rng, shape, seat)
    shape.style["has_arms"] = bool(rng.random() < 0.35)
    if shape.style["has_arms"]:
        _chair_arms(rng, shape, seat, back_mid_z)


def _chair_legs(rng: np.random.Generator, shape: ProceduralShape, seat: _Slab) -> None:
    """Four box or round (possibly splayed) legs, a star-base pedestal, side panels or a sled."""
    style = _pick(rng, ("box4", "round4", "pedestal", "panels", "sled"), p=(0.3, 0.3, 0.15, 0.1, 0.15))
    shape.style["legs"] = style
    if style in ("box4", "round4"):
        splay = rng.uniform(0.02, 0.07) if rng.random() < 0.4 else 0.0
        shape.style["splayed"] = splay > 0
        _four_legs(shape, "leg", rng, seat, "box" if style == "box4" else "round", rng.uniform(0.028, 0.05), splay)
    elif style == "pedestal":
        feet = int(rng.integers(4, 6))
        shape.style["feet"] = feet
        _star_base(shape, "leg", rng, seat.mid, rng.uniform(0.022, 0.04), rng.uniform(0.22, 0.3), feet)
    else:
        _side_supports(shape, "leg", rng, seat, runner=style == "sled", posts=style == "sled")


def _chair_back(rng: np.random.Generator, shape: ProceduralShape, seat: _Slab) -> Callable[[float], float]:
    """Add the back at the rear (-z) of the seat; returns ``z(y)`` of the back's mid-plane."""
    style = _pick(rng, ("slab", "tilted", "spindles", "rail"))
    shape.style["back"] = style
    width = seat.width * rng.uniform(0.75, 0.97)
    thick = rng.uniform(0.025, 0.06)
    z0 = -seat.depth / 2 - rng.uniform(0.004, 0.02)  # rear face just behind the seat's rear face
    y0, y1 = seat.mid, seat.top + rng.uniform(0.32, 0.55)
    tilt = rng.uniform(0.06, 0.16) if style == "tilted" else 0.0
    if style in ("slab", "tilted"):
        b = CUBE_BITS
        corners = np.stack([(b[:, 0] - 0.5) * width, y0 + b[:, 1] * (y1 - y0),
                            z0 + b[:, 2] * thick - b[:, 1] * tilt], axis=1)
        shape.add("back", hexahedron(corners))
    else:
        _back_frame(rng, shape, style, width, thick, z0, y0, y1, seat.top)
    return lambda y: z0 + thick / 2 - tilt * (y - y0) / (y1 - y0)


def _back_frame(rng: np.random.Generator, shape: ProceduralShape, style: str, width: float,
                thick: float, z0: float, y0: float, y1: float, seat_top: float) -> None:
    """Two posts and a top rail (wider and thicker than the posts, which end inside it), filled
    with vertical spindles/slats (``"spindles"``) or 0-2 lower rails (``"rail"``)."""
    post = rng.uniform(0.025, 0.045)
    rail_h = rng.uniform(0.05, 0.09) if style == "spindles" else rng.uniform(0.08, 0.16)
    zc, post_top = z0 + thick / 2, y1 - rail_h / 2
    shape.add("back", box((0.0, y1 - rail_h / 2, zc), (width + 0.01, rail_h, thick * 1.15)))
    for sx in (-1.0, 1.0):
        shape.add("back", box((sx * (width / 2 - post / 2), (y0 + post_top) / 2, zc), (post, post_top - y0, thick)))
    inner = width / 2 - post
    if style == "spindles":
        count, kind = int(rng.integers(3, 7)), _pick(rng, ("round", "flat"))
        shape.style.update(spindles=count, spindle_kind=kind)
        gap = 2 * inner / (count + 1)
        radius = min(rng.uniform(0.008, 0.015), 0.4 * thick, 0.35 * gap)
        slat = (rng.uniform(0.3, 0.7) * gap, post_top - y0, thick * 0.5)
        for x in np.linspace(-inner, inner, count + 2)[1:-1]:
            if kind == "round":
                shape.add("back", cylinder((x, y0, zc), (x, post_top, zc), radius, segments=12))
            else:
                shape.add("back", box((x, (y0 + post_top) / 2, zc), slat))
    else:
        count = int(rng.integers(0, 3))
        shape.style["lower_rails"] = count
        for y in np.linspace(seat_top, y1 - rail_h, count + 2)[1:-1]:
            shape.add("back", box((0.0, y, zc), (2 * inner + post, rng.uniform(0.02, 0.04), thick * 0.7)))


def _chair_arms(rng: np.random.Generator, shape: ProceduralShape, seat: _Slab,
                back_mid_z: Callable[[float], float]) -> None:
    """Armrest bar plus a support post on each side; posts stand on the seat near its front."""
    y = seat.top + rng.uniform(0.17, 0.27)
    bar_h, post = rng.uniform(0.025, 0.04), rng.uniform(0.025, 0.04)
    offset = rng.uniform(0.0, 0.015)
    bar_w = post + 2 * offset + rng.uniform(0.012, 0.03)
    post_x = seat.corner * seat.width / 2 - post / 2 - rng.uniform(0.008, 0.02)
    post_z = seat.corner * seat.depth / 2 - post / 2 - rng.uniform(0.01, 0.05)
    z_front = post_z + post / 2 + rng.uniform(0.01, 0.06)
    z_rear = back_mid_z(y)
    for sx in (-1.0, 1.0):
        shape.add("arm", box((sx * (post_x + offset), y, (z_rear + z_front) / 2), (bar_w, bar_h, z_front - z_rear)),
                  box((sx * post_x, (seat.mid + y) / 2, post_z), (post, y - seat.mid, post)))


# ----------------------------------------------------------------------------------------------
# Table
# ----------------------------------------------------------------------------------------------

def _table(rng: np.random.Generator, shape: ProceduralShape) -> None:
    """Rectangular, round or rounded top on four legs, a pedestal or two trestles (top/leg only)."""
    top_style = _pick(rng, ("box", "round", "rounded"), p=(0.5, 0.25, 0.25))
    height, thick = rng.uniform(0.5, 0.78), rng.uniform(0.025, 0.06)
    if top_style == "round":
        width = depth = 2 * rng.uniform(0.3, 0.55)
    else:
        width = rng.uniform(0.8, 1.6)
        depth = min(width, rng.uniform(0.5, 0.95))
    top = _slab(rng, width, depth, height - thick, thick, top_style)
    shape.add("top", top.solid())
    p_legs = (0.5, 0.5, 0.0) if top_style == "round" else (0.55, 0.15, 0.3)
    legs = _pick(rng, ("four", "pedestal", "trestle"), p=p_legs)
    shape.style.update(top=top_style, legs=legs)
    if legs == "four":
        kind = _pick(rng, ("box", "round"))
        shape.style["leg_kind"] = kind
        _four_legs(shape, "leg", rng, top, kind, rng.uniform(0.035, 0.07), 0.0)
    elif legs == "pedestal":
        _table_pedestal(rng, shape, top)
    else:
        _side_supports(shape, "leg", rng, top, runner=True, posts=False)


def _table_pedestal(rng: np.random.Generator, shape: ProceduralShape, top: _Slab) -> None:
    """Central column on a disk (cone frustum) foot or on star feet."""
    foot = _pick(rng, ("disk", "star"))
    shape.style["foot"] = foot
    column_r = rng.uniform(0.035, 0.07)
    reach = min(top.width, top.depth) / 2 * rng.uniform(0.45, 0.75)
    if foot == "star":
        _star_base(shape, "leg", rng, top.mid, column_r, reach, int(rng.integers(3, 5)))
        return
    foot_h = rng.uniform(0.025, 0.05)
    shape.add("leg", cylinder((0.0, 0.0, 0.0), (0.0, foot_h, 0.0), reach, reach * rng.uniform(0.6, 1.0), segments=32),
              cylinder((0.0, foot_h / 2, 0.0), (0.0, top.mid, 0.0), column_r, segments=20))


# ----------------------------------------------------------------------------------------------
# Airplane
# ----------------------------------------------------------------------------------------------

def _fuselage_profile(rng: np.random.Generator, radius: float, length: float, nose: str) -> np.ndarray:
    """``(r, h)`` lathe profile of the fuselage, tail end at ``h = 0``, nose at ``h = length``."""
    tail_frac, nose_frac = rng.uniform(0.25, 0.35), rng.uniform(0.08, 0.16)
    tail_r = rng.uniform(0.2, 0.4)
    s = np.linspace(0.0, 1.0, 4)
    tail = np.stack([radius * (tail_r + (1 - tail_r) * np.sin(np.pi / 2 * s)), tail_frac * length * s], axis=1)
    s = np.array([0.0, 0.35, 0.65, 0.85, 0.97])
    nose_r = np.sqrt(1 - s**2) if nose == "round" else (1 - s) ** 0.8
    nose_pts = np.stack([radius * nose_r, length * (1 - nose_frac + nose_frac * s)], axis=1)
    return np.concatenate([[[0.0, 0.0]], tail, nose_pts, [[0.0, length]]])


def _panel(root_le, tip_le, chords, thicknesses, chord_dir, thick_dir) -> Solid:
    """Tapered, swept flat panel (wing, stabiliser, fin) as a hexahedron: leading edges at
    ``root_le`` and ``tip_le``, ``chords = (root, tip)`` along ``chord_dir`` from the leading
    edge, ``thicknesses = (root, tip)`` centred along ``thick_dir``."""
    b = CUBE_BITS
    end = b[:, 2].astype(int)  # 0 at the root, 1 at the tip
    ends = np.array([root_le, tip_le], dtype=np.float64)[end]
    chord = np.asarray(chords, dtype=np.float64)[end]
    thick = np.asarray(thicknesses, dtype=np.float64)[end]
    return hexahedron(ends + (b[:, 0] * chord)[:, None] * chord_dir + ((b[:, 1] - 0.5) * thick)[:, None] * thick_dir)


@dataclass(frozen=True)
class _Wing:
    """One (right, +x) wing half: root leading edge at ``(0, y, z_le)``, ``span`` along x."""

    y: float
    z_le: float
    span: float
    chord: tuple[float, float]
    thick: tuple[float, float]
    sweep: float
    dihedral: float

    def at(self, f: float) -> tuple[float, float, float, float]:
        """``(y_mid, z_le, chord, thickness)`` at span fraction ``f`` (0 root, 1 tip)."""
        chord = self.chord[0] + f * (self.chord[1] - self.chord[0])
        thick = self.thick[0] + f * (self.thick[1] - self.thick[0])
        return self.y + f * self.dihedral, self.z_le - f * self.sweep, chord, thick

    def solid(self, sign: float) -> Solid:
        y_tip, z_tip, _, _ = self.at(1.0)
        return _panel((0.0, self.y, self.z_le), (sign * self.span, y_tip, z_tip), self.chord, self.thick, -_Z, _Y)


def _airplane(rng: np.random.Generator, shape: ProceduralShape) -> None:
    """Lathe fuselage along z (nose +z), mirrored swept wings, tail, optional engines."""
    length, radius = 1.0, rng.uniform(0.035, 0.06)
    nose = _pick(rng, ("round", "pointed"))
    shape.add("body", lathe((0.0, 0.0, -length / 2), _Z, _fuselage_profile(rng, radius, length, nose), 24))
    position = _pick(rng, ("low", "mid", "high"))
    y = {"low": -0.5, "mid": 0.0, "high": 0.5}[position] * radius
    root = rng.uniform(0.16, 0.28)
    taper = rng.uniform(0.25, 0.6)
    root_t = min(root * rng.uniform(0.07, 0.11), 0.8 * (radius - abs(y)) * 2)
    wing = _Wing(y, rng.uniform(0.05, 0.18), rng.uniform(0.38, 0.52), (root, root * taper),
                 (root_t, root_t * taper), rng.uniform(0.04, 0.3), rng.uniform(-0.01, 0.05))
    shape.add("wing", *_mirror_x(wing.solid))
    shape.style.update(nose=nose, wing_position=position)
    _airplane_tail(rng, shape, length)
    _airplane_engines(rng, shape, wing)


def _airplane_tail(rng: np.random.Generator, shape: ProceduralShape, length: float) -> None:
    """Vertical fin on the tail plus two horizontal stabilisers, at the fuselage (conventional)
    or just under the top of the fin (T-tail)."""
    style = _pick(rng, ("conventional", "t-tail"))
    shape.style["tail"] = style
    chord = (rng.uniform(0.12, 0.2), 0.0)
    chord = (chord[0], chord[0] * rng.uniform(0.45, 0.75))
    height, sweep, thick = rng.uniform(0.12, 0.22), rng.uniform(0.03, 0.12), rng.uniform(0.008, 0.012)
    le = -length / 2 + 0.02 + chord[0]
    shape.add("tail", _panel((0.0, 0.0, le), (0.0, height, le - sweep), chord, (thick, thick * 0.7), -_Z, _X))
    span, stab_t = rng.uniform(0.12, 0.2), rng.uniform(0.006, 0.011)
    if style == "t-tail":
        y = height - stab_t / 2 - 0.003
        fin_chord = chord[0] + (chord[1] - chord[0]) * y / height
        z, root = le - sweep * y / height - 0.05 * fin_chord, 0.85 * fin_chord
    else:
        y, z = 0.0, le - rng.uniform(0.0, 0.03)
        root = min(rng.uniform(0.08, 0.14), z + length / 2 - 0.01)
    tip, stab_sweep = root * rng.uniform(0.4, 0.7), rng.uniform(0.02, 0.08)
    shape.add("tail", *_mirror_x(lambda s: _panel((0.0, y, z), (s * span, y, z - stab_sweep), (root, tip),
                                                  (stab_t, stab_t * 0.7), -_Z, _Y)))


def _airplane_engines(rng: np.random.Generator, shape: ProceduralShape, wing: _Wing) -> None:
    """0, 2 or 4 nacelles hung under the wings on pylons (both labelled ``engine``)."""
    count = int(_pick(rng, (0, 2, 4), p=(0.35, 0.45, 0.2)))
    shape.style["engines"] = count
    if count == 0:
        return
    radius, length = rng.uniform(0.025, 0.04), rng.uniform(0.12, 0.2)
    fractions = (rng.uniform(0.3, 0.4),) if count == 2 else (rng.uniform(0.25, 0.32), rng.uniform(0.55, 0.68))
    profile = [(0.0, 0.0), (0.7 * radius, 0.0), (radius, 0.4 * length), (radius, length), (0.0, length)]
    for f in fractions:
        y_wing, z_le, chord, thick = wing.at(f)
        yc = y_wing - thick / 2 - radius - rng.uniform(0.003, 0.02)
        z_front = z_le + length * rng.uniform(0.25, 0.5)
        lo, hi = max(z_le - chord, z_front - length), min(z_le, z_front)
        pylon_w = rng.uniform(0.006, 0.01)
        for sign in (1.0, -1.0):
            x = sign * f * wing.span
            shape.add("engine", lathe((x, yc, z_front - length), _Z, profile, 20),
                      beam((x, yc, (lo + hi) / 2), (x, y_wing, (lo + hi) / 2), pylon_w, 0.7 * (hi - lo), up=_Z))


# ----------------------------------------------------------------------------------------------
# Mug
# ----------------------------------------------------------------------------------------------

def _mug(rng: np.random.Generator, shape: ProceduralShape) -> None:
    """Lathe body along y with an inner cavity (cylinder, tapered or barrel) and a handle."""
    radius = rng.uniform(0.3, 0.42)
    height = 2 * radius * rng.uniform(0.8, 1.4)
    wall, bottom = radius * rng.uniform(0.08, 0.12), height * rng.uniform(0.04, 0.08)
    body = _pick(rng, ("cylinder", "tapered", "barrel"))
    k = {"cylinder": 0.0, "tapered": rng.uniform(0.08, 0.25), "barrel": rng.uniform(0.05, 0.12)}[body]
    outer = {"cylinder": lambda h: radius + 0 * h,
             "tapered": lambda h: radius * (1 + k * h / height),
             "barrel": lambda h: radius * (1 + k * np.sin(np.pi * h / height))}[body]
    chamfer = min(wall, 0.02)
    up, down = np.linspace(chamfer, height, 8), np.linspace(height, bottom, 8)
    profile = np.concatenate([[[0.0, 0.0], [outer(0.0) - chamfer, 0.0]],
                              np.stack([outer(up), up], 1), np.stack([outer(down) - wall, down], 1),
                              [[0.0, bottom]]])
    shape.add("body", lathe((0.0, 0.0, 0.0), _Y, profile, 32))
    shape.style["body"] = body
    _mug_handle(rng, shape, lambda h: outer(h) - wall / 2, height, chamfer, radius)


def _mug_handle(rng: np.random.Generator, shape: ProceduralShape, mid_wall: Callable, height: float,
                chamfer: float, radius: float) -> None:
    """Handle on +x: a tube along a (sheared) elliptical arc whose ends meet the middle of the
    wall horizontally, so that its flat end caps are hidden inside the wall."""
    style = _pick(rng, ("round", "flat", "wide"))
    shape.style["handle"] = style
    tube_r = radius * rng.uniform(0.08, 0.13)
    yc = height * rng.uniform(0.45, 0.58)
    ay = min(height * rng.uniform(0.25, 0.34), yc - tube_r - chamfer - 0.01, height - 0.02 - tube_r - yc)
    ax = ay * {"round": rng.uniform(0.9, 1.15), "flat": rng.uniform(0.65, 0.85), "wide": rng.uniform(1.2, 1.5)}[style]
    tube_r = min(tube_r, min(ax**2 / ay, ay**2 / ax) / 1.3)
    a = np.linspace(-np.pi / 2, np.pi / 2, 16)
    x_lo, x_hi = mid_wall(yc - ay), mid_wall(yc + ay)
    path = np.stack([x_lo + (x_hi - x_lo) * (np.sin(a) + 1) / 2 + ax * np.cos(a), yc + ay * np.sin(a), 0 * a], 1)
    tangents = np.stack([(x_hi - x_lo) / 2 * np.cos(a) - ax * np.sin(a), ay * np.cos(a), 0 * a], 1)
    shape.add("handle", tube(path, tangents, _Z, tube_r, segments=12))


_BUILDERS: dict[str, Callable[[np.random.Generator, ProceduralShape], None]] = {
    "chair": _chair, "table": _table, "airplane": _airplane, "mug": _mug,
}


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def _check_category(category: str) -> None:
    if category not in _BUILDERS:
        raise ValueError(f"unknown procedural category {category!r}; known: {', '.join(CATEGORIES)}")


def _seed_sequence(category: str, seed: int, index: int) -> np.random.SeedSequence:
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got seed={seed}, index={index}")
    return np.random.SeedSequence([int(seed), int(index), zlib.crc32(category.encode())])


def build_shape(category: str, index: int, seed: int = 0) -> ProceduralShape:
    """The closed, labelled primitives of procedural shape ``index`` of stream ``seed``.

    Depends only on ``(category, seed, index)``. Coordinates are normalised (bounding box centred
    at the origin, largest side in [0.85, 0.95]; y up, front +z).

    Raises:
        ValueError: for an unknown category or a negative seed or index.
    """
    _check_category(category)
    geometry_ss, _ = _seed_sequence(category, seed, index).spawn(2)
    rng = np.random.default_rng(geometry_ss)
    shape = ProceduralShape(category, part_names(category))
    _BUILDERS[category](rng, shape)
    shape.normalise(rng.uniform(0.85, 0.95))
    return shape


def visible_mask(points: np.ndarray, point_solid: np.ndarray, solids: list[Solid],
                 tol: float = HIDDEN_TOL) -> np.ndarray:
    """``bool [N]``: True where a surface point is not strictly inside any other solid.

    Args:
        points: ``[N, 3]`` points, each on the surface of solid ``point_solid[i]``.
        point_solid: ``int [N]`` index into ``solids``.
        solids: closed, outward-oriented meshes.
        tol: a point is hidden when its signed distance to another solid is below ``-tol``.
    """
    points = np.ascontiguousarray(points, dtype=np.float64)
    visible = np.ones(len(points), dtype=bool)
    for j, solid in enumerate(solids):
        lo, hi = solid.bounds
        cand = np.flatnonzero((point_solid != j) & visible
                              & np.all((points > lo - tol) & (points < hi + tol), axis=1))
        if len(cand):
            visible[cand[_signed_distance(points[cand], solid) < -tol]] = False
    return visible


def _signed_distance(points: np.ndarray, solid: Solid) -> np.ndarray:
    """``float64 [N]`` signed distance (negative inside) of points to a closed solid.

    point-cloud-utils 0.34 returns a wrong scalar for a single query point, so one point is
    queried twice.
    """
    query = np.repeat(points, 2, axis=0) if len(points) == 1 else points
    sdf = np.atleast_1d(pcu.signed_distance_to_mesh(query, solid.vertices, solid.faces)[0])
    return sdf[: len(points)]


def _sample_visible(shape: ProceduralShape, num_points: int, rng: np.random.Generator):
    """Sample until ``num_points`` visible points are found, then keep a seeded subset of them.

    Returns ``(points float32 [N, 3], normals float32 [N, 3], labels int16 [N])``.
    """
    vertices, faces, face_labels, face_solid = shape.mesh()
    chunks, found, fraction = [], 0, 1.0
    while found < num_points:
        n = int(np.ceil(1.5 * (num_points - found) / fraction)) + 16
        s = sample_surface(vertices, faces, n, seed=int(rng.integers(2**31)), face_labels=face_labels)
        keep = visible_mask(s.points, face_solid[s.face_index], shape.solids)
        fraction = max(keep.mean(), 0.05)
        chunks.append((s.points[keep], s.normals[keep], s.labels[keep]))
        found += int(keep.sum())
    points, normals, labels = (np.concatenate(c) for c in zip(*chunks))
    pick = np.sort(rng.choice(len(points), num_points, replace=False))
    return points[pick], normals[pick], labels[pick]


def generate(category: str, index: int, seed: int = 0, num_points: int = 2048,
             split: str = "train") -> ShapeRecord:
    """Procedural shape ``index`` of stream ``seed`` as a labelled :class:`ShapeRecord`.

    Args:
        category: one of :data:`CATEGORIES`.
        index: shape index ``>= 0`` within the stream.
        seed: stream seed ``>= 0``; the shape depends only on ``(category, seed, index)`` and its
            geometry not on ``num_points``.
        num_points: N, number of visible surface points (``>= 1``).
        split: one of ``gen3d.records.SPLITS``.

    Returns:
        A record with ``shape_id = f"{category}-s{seed}-{index:06d}"``, ``source="procedural"``,
        ``points``/``normals`` ``float32 [N, 3]`` (unit face normals), ``labels int16 [N]``,
        ``mesh_vertices float32 [V, 3]``, ``mesh_faces int32 [F, 3]``, ``face_labels int16 [F]``
        and ``provenance`` with dataset, generator, version, category, seed, index, style (the
        discrete choices) and ``solid_faces`` (face count of each closed primitive, in mesh order).

    Raises:
        ValueError: for an unknown category or split, negative seed/index, or ``num_points < 1``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
    if num_points < 1:
        raise ValueError(f"num_points must be >= 1, got {num_points}")
    shape = build_shape(category, index, seed)
    _, sampling_ss = _seed_sequence(category, seed, index).spawn(2)
    points, normals, labels = _sample_visible(shape, num_points, np.random.default_rng(sampling_ss))
    vertices, faces, face_labels, _ = shape.mesh()
    provenance = {"dataset": "procedural", "generator": "gen3d.procedural", "version": VERSION,
                  "category": category, "seed": int(seed), "index": int(index), "style": dict(shape.style),
                  "solid_faces": [int(len(s.faces)) for s in shape.solids]}
    return ShapeRecord(shape_id=f"{category}-s{seed}-{index:06d}", category=category, source="procedural",
                       split=split, points=points, part_names=shape.part_names, labels=labels,
                       normals=normals, mesh_vertices=vertices.astype(np.float32),
                       mesh_faces=faces.astype(np.int32), face_labels=face_labels, provenance=provenance)


def generate_many(category: str, count: int, seed: int = 0, num_points: int = 2048,
                  split: str = "train", start: int = 0) -> Iterator[ShapeRecord]:
    """Yield :func:`generate` for indices ``start .. start + count - 1`` of stream ``seed``.

    Raises:
        ValueError: as :func:`generate` (checked before the first shape), or for ``count < 0``.
    """
    _check_category(category)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return (generate(category, i, seed, num_points, split) for i in range(start, start + count))
