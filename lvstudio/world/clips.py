"""Rendering the procedural world: clips of a scene spec (or a sampled one, with a mid-clip switch) with exact
ground truth for every frame.

Design rules (the oracle in `lvstudio.world.oracle` relies on them):
- Scene palettes stay muted (chroma = max(R,G,B) - min(R,G,B) below ~80 of 255, under every effect); object
  colours stay vivid (chroma above ~110 under every effect). An object therefore never melts into a background,
  even a vivid green ball on the olive grass or an orange star in the desert.
- Each scene has its own dominant colour and layout: pale blue `sky`, dark teal `sea` under a pale band, olive
  `grass`, navy `night`, tan `desert`, white `snow` under a lavender band.
- Effects (`dusk`, `rain`, `fog`) act strongly on the background and mildly on objects, so an object keeps its hue.
- Edge policy: objects always stay fully inside the frame. `moving ...` objects *wrap*: when they reach the far
  edge they re-enter at the opposite edge (a jump, still fully inside). `bouncing` bounces on the bottom edge;
  `growing` pushes the object inwards as it grows and restarts small after its largest size.
- The primary object (the first in the caption) is drawn last, so it is never hidden by another object; the other
  objects never share its colour.

Everything is deterministic by seed (`np.random.default_rng`); frames are uint8 RGB `[F, H, W, 3]`, square,
any size that is a multiple of 8 in [32, 512] (64..256 is what the oracle is verified on).
This module uses numpy and opencv only (no torch).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import cv2
import numpy as np

from lvstudio.world.grammar import EFFECTS, SCENES, ObjectSpec, SceneSpec, sample_spec, switch_spec
from lvstudio.world.pose import WORLD_POSE, Pose

# Nominal object colours (RGB). Hues: red 0, orange 30, yellow 53, green 128, blue 225, purple 273, pink 327 deg.
OBJECT_RGB: Mapping[str, tuple[int, int, int]] = MappingProxyType({
    "red": (225, 35, 35), "orange": (250, 135, 20), "yellow": (240, 215, 30), "green": (40, 190, 60),
    "blue": (35, 85, 240), "purple": (145, 50, 225), "pink": (245, 90, 175),
})


def _check_size(size: int) -> int:
    """Validate a frame size (square side in px)."""
    if not isinstance(size, (int, np.integer)) or size % 8 or not 32 <= size <= 512:
        raise ValueError(f"size must be a multiple of 8 in [32, 512] (64..256 verified), got {size!r}")
    return int(size)


def _check_frames(num_frames: int) -> int:
    """Validate a frame count."""
    if not isinstance(num_frames, (int, np.integer)) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    return int(num_frames)


# ----------------------------------------------------------------------------------------------------------------
# Ground truth and clips
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ObjectTruth:
    """Where one object is in one frame. x, y: centre in px; size: extent (circumscribed diameter) in px."""

    colour: str
    shape: str
    motion: str
    x: float
    y: float
    size: float
    area: float  # px², analytic area of the drawn shape
    angle: float  # degrees


@dataclass(frozen=True)
class FrameTruth:
    """Ground truth of one frame; objects in caption order (primary first)."""

    scene: str
    effect: str | None
    objects: tuple[ObjectTruth, ...]


@dataclass
class Clip:
    """A rendered clip with per-frame captions, specs and ground truth."""

    frames: np.ndarray  # [F, H, W, 3] uint8 RGB
    captions: list[str]  # [F]
    specs: list[SceneSpec]  # [F]
    truth: list[FrameTruth]  # [F]
    switch_frames: list[int]  # frame indices where the caption changed


# ----------------------------------------------------------------------------------------------------------------
# Object geometry and motion (all lengths relative to the frame size S)
# ----------------------------------------------------------------------------------------------------------------

_BASE_RADIUS = MappingProxyType({"small": 0.075, "big": 0.115})  # × S
_EXTENT = MappingProxyType({"ball": 1.0, "cube": 1.2, "triangle": 1.3, "star": 1.35})  # circumradius / radius
_STAR_INNER = 0.45  # inner / outer radius of the 5-point star
_MARGIN = 0.02  # × S, gap kept between an object and the frame edge
_MOVE_SPEED = 0.015  # × S per frame
_MOVES = MappingProxyType({"moving left": ("x", -1), "moving right": ("x", 1), "moving up": ("y", -1),
                           "moving down": ("y", 1)})  # axis and direction of each moving motion
_BOUNCE_SPEED, _GRAVITY = 0.07, 0.007  # × S per frame, × S per frame²: 20-frame hops, 0.35 S high
_SPIN_SPEED = 10.0  # degrees per frame
_GROW_RATE, _GROW_MIN, _GROW_MAX = 0.015, 0.75, 1.45  # scale per frame; growing restarts at _GROW_MIN
_RELAX_RATE = 0.02  # scale per frame back towards 1 when not growing


def _unit_polygon(shape: str, angle_deg: float) -> np.ndarray:
    """Vertices of a shape of circumradius 1, rotated by angle_deg. [N, 2] float64."""
    a = math.radians(angle_deg)
    if shape == "cube":
        t = a + np.pi / 4 + np.arange(4) * np.pi / 2
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if shape == "triangle":
        t = a - np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if shape == "star":
        t = a - np.pi / 2 + np.arange(10) * np.pi / 5
        r = np.where(np.arange(10) % 2 == 0, 1.0, _STAR_INNER)
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    t = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)  # ball: a 48-gon (balls are drawn as circles)
    return np.stack([np.cos(t), np.sin(t)], axis=1)


def _shape_area(shape: str, extent_radius: float) -> float:
    """Analytic area (px²) of a shape with circumradius extent_radius."""
    r2 = extent_radius ** 2
    if shape == "ball":
        return math.pi * r2
    if shape == "cube":
        return 2.0 * r2
    if shape == "triangle":
        return 3.0 * math.sqrt(3.0) / 4.0 * r2
    return 5.0 * _STAR_INNER * math.sin(math.pi / 5) * r2


def motion_step(motion: str, size: int) -> tuple[str, float] | None:
    """How a moving motion moves an object in a frame of `size` px: its axis ("x" or "y", y pointing down) and the
    signed step in px per frame ("moving up" at 128 px: ("y", -1.92)); None for the motions that do not travel."""
    if motion not in _MOVES:
        return None
    axis, sign = _MOVES[motion]
    return axis, sign * _MOVE_SPEED * size


def object_rgb(colour: str, effect: str | None = None) -> tuple[float, float, float]:
    """The RGB an object of `colour` is drawn with under `effect` (effects act mildly on objects)."""
    rgb = np.asarray(OBJECT_RGB[colour], np.float64)
    if effect == "dusk":
        rgb = 0.88 * rgb + 0.12 * np.array([255.0, 160.0, 100.0])
    elif effect == "rain":
        rgb = 0.85 * rgb
    elif effect == "fog":
        rgb = 0.8 * rgb + 0.2 * np.array([200.0, 202.0, 206.0])
    return (float(rgb[0]), float(rgb[1]), float(rgb[2]))


@dataclass
class _ObjectState:
    """Mutable per-clip state of one object (position px, angle deg, scale, vertical speed px/frame)."""

    x: float
    y: float
    angle: float
    scale: float
    vy: float = 0.0

    def extent(self, obj: ObjectSpec, size: int) -> float:
        """Current circumradius in px."""
        return _BASE_RADIUS[obj.size] * self.scale * _EXTENT[obj.shape] * size

    def bounds(self, obj: ObjectSpec, size: int) -> tuple[float, float]:
        """Allowed centre range [lo, hi] (same for x and y) that keeps the object inside the frame."""
        r = self.extent(obj, size) + _MARGIN * size
        return r, size - r

    def clamp(self, obj: ObjectSpec, size: int, free_axis: str = "") -> None:
        """Push the object back inside the frame (along both axes but `free_axis`, "x" or "y")."""
        lo, hi = self.bounds(obj, size)
        if free_axis != "x":
            self.x = min(max(self.x, lo), hi)
        if free_axis != "y":
            self.y = min(max(self.y, lo), hi)

    def step(self, obj: ObjectSpec, size: int, through_edges: bool = False) -> None:
        """Advance one frame under obj.motion. A moving object jumps to the opposite edge when it reaches one, or with
        `through_edges` leaves the frame and comes back across the opposite edge (`Pose.through_edges`)."""
        if through_edges and obj.motion in _MOVES:
            self._move_through(obj, size)
            return
        m = obj.motion
        if m == "growing":
            self.scale += _GROW_RATE
            if self.scale > _GROW_MAX:
                self.scale = _GROW_MIN
        else:
            self._relax()
        lo, hi = self.bounds(obj, size)
        if (move := motion_step(m, size)) is not None:  # past the edge it moves to: jump to the opposite one
            axis, dv = move
            p = getattr(self, axis) + dv
            if dv < 0 and p < lo:
                p += hi - lo
            elif dv > 0 and p > hi:
                p -= hi - lo
            setattr(self, axis, p)
        elif m == "bouncing":
            self.vy += _GRAVITY * size
            self.y += self.vy
            if self.y >= hi:
                self.y, self.vy = hi, -_BOUNCE_SPEED * size
        elif m == "spinning":
            self.angle = (self.angle + _SPIN_SPEED) % 360.0
        if m != "bouncing":
            self.vy = 0.0
        self.clamp(obj, size)

    def _relax(self) -> None:
        """Scale back towards 1 (after a switch away from `growing`)."""
        if self.scale != 1.0:
            self.scale = min(1.0, self.scale + _RELAX_RATE) if self.scale < 1 else max(1.0, self.scale - _RELAX_RATE)

    def _move_through(self, obj: ObjectSpec, size: int) -> None:
        """One frame of a moving object under `Pose.through_edges`: along its axis on a loop of the frame plus its
        extent on each side (it is out of sight when its centre is past an edge by more than its extent), across it
        pushed inside the frame as ever."""
        axis, dv = motion_step(obj.motion, size)  # a moving motion: `step` sends only those here
        self.vy = 0.0
        self._relax()
        reach = self.extent(obj, size) + 1.0
        v = getattr(self, axis) + dv
        period = size + 2 * reach
        setattr(self, axis, (v + reach) % period - reach)  # centre in [-reach, size + reach)
        self.clamp(obj, size, free_axis=axis)


def _initial_state(obj: ObjectSpec, size: int, rng: np.random.Generator, pose: Pose = WORLD_POSE,
                   j: int = 0, n: int = 1) -> _ObjectState:
    """A starting state for object j of n; moving objects start on their trailing side so they cross the frame before
    wrapping (at their slot under `Pose.moving_in_slots`). `pose` may start objects upright, near the centre, in
    fixed slots or on a grid (`Pose`); the same random numbers are drawn either way."""
    scale = float(rng.uniform(_GROW_MIN, 1.0)) if obj.motion == "growing" else 1.0
    angle = float(rng.uniform(0, 360))
    state = _ObjectState(x=0.0, y=0.0, angle=0.0 if pose.upright else angle, scale=scale)
    lo, hi = state.bounds(obj, size)
    u, w = pose.fractions(*rng.uniform(size=2), j, n)
    state.x, state.y = lo + u * (hi - lo), lo + w * (hi - lo)
    if obj.motion in _MOVES and not pose.moving_in_slots:  # the first quarter of its way, on the side it leaves
        axis, sign = _MOVES[obj.motion]
        quarter = 0.25 * (u if axis == "x" else w) * (hi - lo)
        setattr(state, axis, lo + quarter if sign > 0 else hi - quarter)
    state.x, state.y = pose.snap(state.x, lo, hi), pose.snap(state.y, lo, hi)
    return state


def _initial_states(spec: SceneSpec, size: int, rng: np.random.Generator, pose: Pose = WORLD_POSE
                    ) -> list[_ObjectState]:
    """Starting states for all objects, placed apart when possible (8 tries each)."""
    states: list[_ObjectState] = []
    for j, obj in enumerate(spec.objects):
        best, best_gap = None, -math.inf
        for _ in range(8):
            cand = _initial_state(obj, size, rng, pose, j, len(spec.objects))
            gap = min((math.hypot(cand.x - s.x, cand.y - s.y) - cand.extent(obj, size) - s.extent(o, size)
                       for s, o in zip(states, spec.objects, strict=False)), default=math.inf)
            if gap > best_gap:
                best, best_gap = cand, gap
            if gap > 0:
                break
        states.append(best)  # type: ignore[arg-type]
    return states


def _draw_object(img: np.ndarray, obj: ObjectSpec, state: _ObjectState, size: int, effect: str | None) -> None:
    """Draw one object in place on img [S, S, 3] uint8 (anti-aliased, sub-pixel via shift=4)."""
    rgb = np.asarray(object_rgb(obj.colour, effect))
    base = tuple(float(c) for c in rgb)
    # Shades add/subtract the same amount on every channel: same hue, same chroma, so they stay "vivid".
    up = min(40.0, 255.0 - float(rgb.max()))
    light = tuple(float(c) for c in rgb + (up if up >= 15.0 else -min(40.0, float(rgb.min()))))
    dark = tuple(float(c) for c in rgb - min(70.0, float(rgb.min())))
    r = state.extent(obj, size)
    centre = np.array([state.x, state.y])
    fx = 16.0  # shift=4 → coordinates in 1/16 px
    if obj.shape == "ball":
        c = (int(round(state.x * fx)), int(round(state.y * fx)))
        cv2.circle(img, c, int(round(r * fx)), base, -1, cv2.LINE_AA, 4)
        a = math.radians(state.angle)
        spot = centre + 0.45 * r * np.array([math.cos(a), math.sin(a)])
        cv2.circle(img, (int(round(spot[0] * fx)), int(round(spot[1] * fx))), int(round(0.28 * r * fx)), dark, -1,
                   cv2.LINE_AA, 4)
        glint = centre + 0.4 * r * np.array([-0.6, -0.8])
        glint_rgb = tuple(float(c) for c in 0.55 * rgb + 0.45 * 255.0)  # a paler spot, well inside the rim
        cv2.circle(img, (int(round(glint[0] * fx)), int(round(glint[1] * fx))), int(round(0.2 * r * fx)), glint_rgb,
                   -1, cv2.LINE_AA, 4)
        return
    unit = _unit_polygon(obj.shape, state.angle)  # [N, 2]
    outer = np.round((centre + r * unit) * fx).astype(np.int32)
    inner = np.round((centre + 0.5 * r * unit + np.array([-0.08, -0.1]) * r) * fx).astype(np.int32)
    cv2.fillPoly(img, [outer], base, cv2.LINE_AA, 4)
    cv2.fillPoly(img, [inner], light, cv2.LINE_AA, 4)


def _object_truth(obj: ObjectSpec, state: _ObjectState, size: int) -> ObjectTruth:
    """Ground truth for one drawn object."""
    r = state.extent(obj, size)
    return ObjectTruth(colour=obj.colour, shape=obj.shape, motion=obj.motion, x=state.x, y=state.y, size=2.0 * r,
                       area=_shape_area(obj.shape, r), angle=state.angle)


# ----------------------------------------------------------------------------------------------------------------
# Backgrounds: one precomputed backdrop per (scene, effect); frame(t) only rolls/adds precomputed layers
# ----------------------------------------------------------------------------------------------------------------


def _rows(size: int, top: Sequence[float], bottom: Sequence[float], v0: float = 0.0, v1: float = 1.0) -> np.ndarray:
    """Vertical gradient from `top` at v0 to `bottom` at v1 (clamped outside). [S, 1, 3] float32."""
    v = (np.arange(size, dtype=np.float32) + 0.5) / size
    w = np.clip((v - v0) / max(v1 - v0, 1e-6), 0.0, 1.0)[:, None, None]
    return (1 - w) * np.asarray(top, np.float32) + w * np.asarray(bottom, np.float32)


def _over(img: np.ndarray, mask: np.ndarray, colour: Sequence[float] | np.ndarray, alpha: float = 1.0) -> None:
    """Alpha-composite `colour` over float img [S, S, 3] where mask [S, S] uint8 (0..255) is set."""
    a = (mask.astype(np.float32) * (alpha / 255.0))[..., None]
    img *= 1 - a
    img += a * np.asarray(colour, np.float32)


def _wrap_xs(x: float, size: int) -> tuple[float, ...]:
    """Copies of an x coordinate so that drawings wrap around horizontally."""
    return (x - size, x, x + size)


def _ridge(size: int, base: float, amps: Sequence[float], rng: np.random.Generator) -> np.ndarray:
    """A horizontally periodic ridge line y(x) in px: base + sum of sines with integer frequencies. [S]."""
    x = np.arange(size, dtype=np.float64) / size
    y = np.full(size, base * size)
    for k, amp in enumerate(amps, start=1):
        y += amp * size * np.sin(2 * np.pi * (k * x + rng.uniform()))
    return y


def _below(size: int, ridge: np.ndarray) -> np.ndarray:
    """Anti-aliased mask [S, S] uint8 of pixels below a ridge line."""
    yy = np.arange(size, dtype=np.float32)[:, None] + 0.5
    return (np.clip(yy - ridge[None, :].astype(np.float32) + 0.5, 0.0, 1.0) * 255).astype(np.uint8)


def _band(size: int, ridge: np.ndarray, d0: float, d1: float) -> np.ndarray:
    """Anti-aliased mask [S, S] uint8 of the band between ridge + d0 and ridge + d1 (px, downwards)."""
    upper = _below(size, ridge + d0).astype(np.int16)
    return np.clip(upper - _below(size, ridge + d1), 0, 255).astype(np.uint8)


@dataclass
class _Layers:
    """A scene before effects: static image, a horizontally rolled band, twinkling points, additive layers."""

    image: np.ndarray  # [S, S, 3] float32 RGB 0..255; x-periodic wherever it is rolled
    roll_rows: tuple[int, int] = (0, 0)  # rows [a, b) rolled horizontally
    roll_speed: float = 0.0  # px per frame
    points: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None  # ys, xs, rgb [N,3], phase
    adds: tuple[tuple[np.ndarray, float, float], ...] = ()  # (layer [S,S,3] uint8, vy, vx px/frame)
    gust_rows: tuple[int, int] = (0, 0)  # rows whose brightness waves in the wind


def _sky(size: int, rng: np.random.Generator) -> _Layers:
    """Pale blue gradient with soft drifting clouds."""
    img = np.broadcast_to(_rows(size, (112, 146, 186), (178, 202, 226)), (size, size, 3)).copy()
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(4, 7))):
        cx, cy, w = rng.uniform(0, size), rng.uniform(0.08, 0.8) * size, rng.uniform(0.08, 0.16) * size
        for _ in range(int(rng.integers(3, 6))):
            dx, dy, k = rng.uniform(-1, 1) * w, rng.uniform(-0.25, 0.2) * w, rng.uniform(0.45, 0.8)
            for x in _wrap_xs(cx + dx, size):
                cv2.ellipse(mask, (int(x), int(cy + dy)), (int(k * w) + 1, int(0.55 * k * w) + 1), 0, 0, 360, 255,
                            -1, cv2.LINE_AA)
    mask = _blur_wrap(mask, size)
    _over(img, mask, (238, 241, 246), 0.85)
    return _Layers(image=img, roll_rows=(0, size), roll_speed=0.006 * size)


def _blur_wrap(mask: np.ndarray, size: int) -> np.ndarray:
    """Gaussian blur that wraps horizontally (so rolled layers stay seamless)."""
    k = max(3, (size // 32) | 1)
    wide = np.concatenate([mask, mask, mask], axis=1)
    return cv2.GaussianBlur(wide, (k, k), 0)[:, size: 2 * size].copy()


def _sea(size: int, rng: np.random.Generator) -> _Layers:
    """Pale sky band, horizon, dark teal water with rolling wave crests."""
    h = int(0.3 * size)
    img = np.broadcast_to(_rows(size, (150, 180, 205), (196, 212, 222), 0.0, 0.3), (size, size, 3)).copy()
    img[h:] = _rows(size, (62, 112, 135), (28, 66, 92), 0.3, 1.0)[h:]
    crest = np.zeros((size, size), np.uint8)
    for _ in range(int(0.12 * size)):
        v = rng.uniform(0.32, 0.98)
        y = v * size
        length = (0.02 + 0.07 * (v - 0.3)) * size
        cx = rng.uniform(0, size)
        for x in _wrap_xs(cx, size):
            cv2.ellipse(crest, (int(x), int(y)), (int(length) + 1, max(1, int(0.012 * size * v))), 0, 190, 350,
                        255, max(1, size // 96), cv2.LINE_AA)
    _over(img, crest, (128, 168, 180), 0.8)
    cv2.line(img, (0, h), (size - 1, h), (110, 145, 160), max(1, size // 128), cv2.LINE_AA)
    return _Layers(image=img, roll_rows=(h + 1, size), roll_speed=-0.008 * size)


def _grass(size: int, rng: np.random.Generator) -> _Layers:
    """Pale sky band, distant tree line, olive field with blades that shimmer in the wind."""
    img = np.broadcast_to(_rows(size, (170, 190, 200), (200, 210, 205), 0.0, 0.22), (size, size, 3)).copy()
    trees = _ridge(size, 0.2, (0.015, 0.01, 0.008, 0.006), rng)
    _over(img, _below(size, trees), (78, 98, 70))
    field = _ridge(size, 0.25, (0.008, 0.004), rng)
    grad = np.broadcast_to(_rows(size, (118, 144, 84), (84, 114, 58), 0.25, 1.0), (size, size, 3))
    a = (_below(size, field).astype(np.float32) / 255.0)[..., None]
    img = img * (1 - a) + grad * a
    blades = np.zeros((size, size), np.uint8)
    bright = np.zeros((size, size), np.uint8)
    for _ in range(int(0.9 * size)):
        v = rng.uniform(0.3, 1.0)
        x, y = rng.uniform(0, size), v * size
        length, lean = (0.015 + 0.05 * v) * size, rng.uniform(-0.4, 0.4)
        target = bright if rng.random() < 0.4 else blades
        cv2.line(target, (int(x), int(y)), (int(x + lean * length), int(y - length)), 255, 1, cv2.LINE_AA)
    _over(img, blades, (66, 92, 46), 0.7)
    _over(img, bright, (140, 160, 96), 0.7)
    return _Layers(image=img, gust_rows=(int(0.3 * size), size))


def _night(size: int, rng: np.random.Generator) -> _Layers:
    """Navy gradient, moon, dark hills and twinkling stars."""
    img = np.broadcast_to(_rows(size, (8, 12, 32), (28, 34, 62)), (size, size, 3)).copy()
    moon = np.zeros((size, size), np.uint8)
    mx, my, mr = rng.uniform(0.15, 0.85) * size, rng.uniform(0.1, 0.3) * size, 0.06 * size
    cv2.circle(moon, (int(mx), int(my)), int(2.2 * mr), 255, -1, cv2.LINE_AA)
    _over(img, cv2.GaussianBlur(moon, (0, 0), mr), (70, 76, 100), 0.5)
    moon[:] = 0
    cv2.circle(moon, (int(mx), int(my)), int(mr), 255, -1, cv2.LINE_AA)
    _over(img, moon, (222, 222, 204))
    hills = _ridge(size, 0.86, (0.03, 0.015, 0.01), rng)
    _over(img, _below(size, hills), (12, 16, 26))
    n = int(0.006 * size * size)
    ys = rng.integers(0, size, n)
    xs = rng.integers(0, size, n)
    keep = ys < hills[xs] - 2
    ys, xs = ys[keep], xs[keep]
    tone = rng.uniform(0.5, 1.0, len(ys))[:, None]
    rgb = tone * np.array([[235.0, 235.0, 220.0]])
    return _Layers(image=img, points=(ys, xs, rgb, rng.uniform(0, 2 * np.pi, len(ys))))


def _desert(size: int, rng: np.random.Generator) -> _Layers:
    """Hazy sky band, pale sun, three layers of dunes, wind-blown sand."""
    img = np.broadcast_to(_rows(size, (200, 196, 186), (222, 212, 192), 0.0, 0.3), (size, size, 3)).copy()
    sun = np.zeros((size, size), np.uint8)
    cv2.circle(sun, (int(rng.uniform(0.15, 0.85) * size), int(0.12 * size)), int(0.05 * size), 255, -1,
               cv2.LINE_AA)
    _over(img, cv2.GaussianBlur(sun, (0, 0), 0.02 * size + 0.5), (244, 236, 214))
    for base, amps, top, bottom in ((0.3, (0.03, 0.012), (208, 192, 162), (202, 184, 150)),
                                    (0.45, (0.05, 0.02), (206, 186, 148), (198, 176, 136)),
                                    (0.65, (0.06, 0.025, 0.01), (200, 178, 138), (188, 164, 122))):
        ridge = _ridge(size, base, amps, rng)
        grad = np.broadcast_to(_rows(size, top, bottom, base - 0.05, 1.0), (size, size, 3))
        a = (_below(size, ridge).astype(np.float32) / 255.0)[..., None]
        img = img * (1 - a) + grad * a
        _over(img, _band(size, ridge, 0.0, 0.03 * size), np.asarray(bottom) * 0.88, 0.35)
    sand = np.zeros((size, size, 3), np.uint8)
    for _ in range(int(0.2 * size)):
        x, y = rng.uniform(0, size), rng.uniform(0.35, 1.0) * size
        for xx in _wrap_xs(x, size):
            cv2.line(sand, (int(xx), int(y)), (int(xx + 0.04 * size), int(y)), (22, 20, 16), 1, cv2.LINE_AA)
    return _Layers(image=img, adds=((sand, 0.0, 0.02 * size),))


def _snow(size: int, rng: np.random.Generator) -> _Layers:
    """Lavender-grey sky band, white hills with pine trees, falling snowflakes."""
    img = np.broadcast_to(_rows(size, (118, 122, 138), (164, 168, 182), 0.0, 0.35), (size, size, 3)).copy()
    far = _ridge(size, 0.35, (0.03, 0.015), rng)
    _over(img, _below(size, far), (214, 222, 234))
    trees = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(5, 10))):
        x = rng.uniform(0, size)
        y = far[int(x) % size] + 0.01 * size
        h, w = rng.uniform(0.05, 0.1) * size, rng.uniform(0.02, 0.035) * size
        for xx in _wrap_xs(x, size):
            pts = np.array([[xx - w, y], [xx + w, y], [xx, y - h]], np.int32)
            cv2.fillPoly(trees, [pts], 255, cv2.LINE_AA)
    _over(img, trees, (52, 70, 62))
    near = _ridge(size, 0.5, (0.04, 0.02, 0.01), rng)
    grad = np.broadcast_to(_rows(size, (236, 240, 246), (220, 228, 238), 0.45, 1.0), (size, size, 3))
    a = (_below(size, near).astype(np.float32) / 255.0)[..., None]
    img = img * (1 - a) + grad * a
    _over(img, _band(size, near, 0.02 * size, 0.05 * size), (196, 206, 224), 0.5)
    flakes = np.zeros((size, size, 3), np.uint8)
    for _ in range(int(0.35 * size)):
        x, y = rng.uniform(0, size), rng.uniform(0, size)
        rad = max(1, int(rng.uniform(0.004, 0.012) * size))
        for xx in _wrap_xs(x, size):
            for yy in _wrap_xs(y, size):
                cv2.circle(flakes, (int(xx), int(yy)), rad, (60, 60, 60), -1, cv2.LINE_AA)
    return _Layers(image=img, adds=((flakes, 0.012 * size, 0.004 * size),))


_SCENE_BUILDERS = MappingProxyType({"sky": _sky, "sea": _sea, "grass": _grass, "night": _night,
                                    "desert": _desert, "snow": _snow})


def _fog_colour(image: np.ndarray) -> np.ndarray:
    """A light haze colour matched to the scene's brightness. [3] float32."""
    grey = float(image.mean())
    return np.full(3, 0.5 * grey + 0.5 * 205.0, np.float32) + np.array([0.0, 2.0, 6.0], np.float32)


def _apply_effect(img: np.ndarray, effect: str | None, phases: np.ndarray) -> np.ndarray:
    """Bake a global effect into a float image [S, S, 3] (depends on y only, or is x-periodic)."""
    size = img.shape[0]
    if effect == "dusk":
        warm = _rows(size, (84, 66, 108), (226, 160, 124), 0.0, 0.75)
        return 0.86 * (0.6 * img + 0.4 * warm)
    if effect == "rain":
        grey = img.mean(axis=2, keepdims=True)
        return 0.78 * (0.7 * img + 0.3 * grey) + np.array([4.0, 6.0, 12.0], np.float32)
    if effect == "fog":
        x = np.arange(size, dtype=np.float32) / size
        v = np.arange(size, dtype=np.float32)[:, None] / size
        haze = 0.58 - 0.2 * v + 0.06 * np.sin(2 * np.pi * (x[None, :] + phases[0])) * np.sin(
            2 * np.pi * (2 * x[None, :] + 1.5 * v + phases[1]))
        haze = haze[..., None]
        return img * (1 - haze) + _fog_colour(img) * haze
    return img


def _rain_layer(size: int, rng: np.random.Generator) -> np.ndarray:
    """Additive rain streaks, periodic in both directions. [S, S, 3] uint8."""
    layer = np.zeros((size, size, 3), np.uint8)
    for _ in range(int(0.5 * size)):
        x, y, length = rng.uniform(0, size), rng.uniform(0, size), rng.uniform(0.04, 0.09) * size
        for xx in _wrap_xs(x, size):
            for yy in _wrap_xs(y, size):
                cv2.line(layer, (int(xx), int(yy)), (int(xx - 0.25 * length), int(yy + length)), (48, 50, 56), 1,
                         cv2.LINE_AA)
    return layer


class _Backdrop:
    """One scene under one effect at one size; frame(t) costs a copy, a roll and a saturating add."""

    def __init__(self, scene: str, effect: str | None, size: int, rng: np.random.Generator) -> None:
        layers = _SCENE_BUILDERS[scene](size, rng)
        self.size = size
        phases = rng.uniform(size=2)
        self.image = np.clip(_apply_effect(layers.image, effect, phases) + 0.5, 0, 255).astype(np.uint8)  # [S,S,3]
        self.roll_rows, self.roll_speed = layers.roll_rows, layers.roll_speed
        self.gust_rows = layers.gust_rows
        self.points = None
        if layers.points is not None:
            ys, xs, rgb, phase = layers.points
            with_points = layers.image.copy()
            with_points[ys, xs] = rgb
            lit = _apply_effect(with_points, effect, phases)[ys, xs]  # [N, 3] point colours under the effect
            self.points = (ys, xs, lit, phase)
        adds = list(layers.adds)
        if effect == "rain":
            adds.append((_rain_layer(size, rng), 0.09 * size, -0.022 * size))
        self.adds = tuple(adds)

    def frame(self, t: int) -> np.ndarray:
        """Background at frame t. [S, S, 3] uint8."""
        # Step 1: the static image, with its rolling band shifted
        out = self.image.copy()
        a, b = self.roll_rows
        if b > a:
            out[a:b] = np.roll(self.image[a:b], int(round(t * self.roll_speed)), axis=1)
        # Step 2: wind gusts (a brightness wave crossing the field)
        a, b = self.gust_rows
        if b > a:
            x = np.arange(self.size, dtype=np.float32) / self.size
            gain = 1.0 + 0.07 * np.sin(2 * np.pi * (x - 0.03 * t))
            out[a:b] = np.clip(out[a:b] * gain[None, :, None], 0, 255).astype(np.uint8)
        # Step 3: twinkling points
        if self.points is not None:
            ys, xs, rgb, phase = self.points
            k = (0.6 + 0.4 * np.sin(0.5 * t + phase))[:, None]
            out[ys, xs] = np.clip(out[ys, xs] * (1 - k) + rgb * k, 0, 255).astype(np.uint8)
        # Step 4: additive moving layers (snowflakes, sand, rain)
        for layer, vy, vx in self.adds:
            shifted = np.roll(layer, (int(round(t * vy)), int(round(t * vx))), axis=(0, 1))
            cv2.add(out, shifted, dst=out)
        return out


def render_background(scene: str, effect: str | None = None, num_frames: int = 1, size: int = 128,
                      seed: int = 0) -> np.ndarray:
    """Frames of a scene without objects. [F, S, S, 3] uint8 (used e.g. to calibrate the oracle)."""
    if scene not in SCENES or (effect is not None and effect not in EFFECTS):
        raise ValueError(f"unknown scene/effect {scene!r}/{effect!r}")
    size, num_frames = _check_size(size), _check_frames(num_frames)
    backdrop = _Backdrop(scene, effect, size, np.random.default_rng(seed))
    return np.stack([backdrop.frame(t) for t in range(num_frames)])


# ----------------------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------------------


def _render(schedule: Sequence[tuple[int, SceneSpec]], num_frames: int, size: int,
            rng: np.random.Generator, pose: Pose = WORLD_POSE, lead_in: int = 0) -> Clip:
    """Render a clip whose spec changes at the given start frames; object states carry over every switch. With
    `lead_in`, the world runs that many frames under the first spec before the first recorded frame (frame numbers,
    switch frames included, count from the recorded start)."""
    frames = np.empty((num_frames, size, size, 3), np.uint8)  # [F, S, S, 3]
    states = _initial_states(schedule[0][1], size, rng, pose)
    backdrop_seed = int(rng.integers(2 ** 62))
    backdrops: dict[tuple[str, str | None], _Backdrop] = {}
    captions: list[str] = []
    specs: list[SceneSpec] = []
    truth: list[FrameTruth] = []
    starts = [s + lead_in for s, _ in schedule]
    for t in range(lead_in + num_frames):
        # Step 1: the spec in force; advance the objects
        spec = schedule[max(0, int(np.searchsorted(starts, t, side="right")) - 1)][1]
        for obj, state in zip(spec.objects, states, strict=True):
            if t > 0:
                state.step(obj, size, pose.through_edges)
            else:
                state.clamp(obj, size)
        if t < lead_in:
            continue
        # Step 2: the background, then the objects (primary last, so it is never hidden)
        key = (spec.scene, spec.effect)
        if key not in backdrops:
            backdrops[key] = _Backdrop(spec.scene, spec.effect, size,
                                       np.random.default_rng([backdrop_seed, SCENES.index(spec.scene)]))
        frames[t - lead_in] = backdrops[key].frame(t)
        for obj, state in reversed(list(zip(spec.objects, states, strict=True))):
            _draw_object(frames[t - lead_in], obj, state, size, spec.effect)
        # Step 3: record text and ground truth
        captions.append(spec.caption())
        specs.append(spec)
        truth.append(FrameTruth(scene=spec.scene, effect=spec.effect,
                                objects=tuple(_object_truth(o, s, size)
                                              for o, s in zip(spec.objects, states, strict=True))))
    switch_frames = [s - lead_in for s in starts[1:] if 0 < s - lead_in < num_frames]
    return Clip(frames=frames, captions=captions, specs=specs, truth=truth, switch_frames=switch_frames)


def render_spec(spec: SceneSpec, num_frames: int, size: int = 128, seed: int = 0, pose: Pose = WORLD_POSE) -> Clip:
    """A clip of one given spec (no switch). Deterministic by seed; `pose`: how objects start (`Pose`; a late start
    is drawn from `seed`)."""
    if not isinstance(spec, SceneSpec):
        raise ValueError(f"spec must be a SceneSpec, got {type(spec).__name__}")
    size, num_frames = _check_size(size), _check_frames(num_frames)
    return _render([(0, spec)], num_frames, size, np.random.default_rng(seed), pose, pose.lead_in(seed))


def sample_clip(seed: int, num_frames: int, size: int = 128, switch_prob: float = 0.3, pose: Pose = WORLD_POSE
                ) -> Clip:
    """A random clip; with probability switch_prob the caption changes once, between 1/4 and 3/4 of the clip.

    A switch changes the scene, or the primary object's colour, shape or motion; objects move on smoothly.
    `pose`: how objects start (`Pose`: upright, centred, in slots, on a grid, late); the captions are the same.
    Deterministic by seed (same seed → identical bytes).
    """
    size, num_frames = _check_size(size), _check_frames(num_frames)
    if not 0.0 <= switch_prob <= 1.0:
        raise ValueError(f"switch_prob must be in [0, 1], got {switch_prob!r}")
    rng = np.random.default_rng(seed)
    spec = sample_spec(rng)
    schedule = [(0, spec)]
    if rng.random() < switch_prob and num_frames >= 2:
        at = int(rng.integers(max(1, num_frames // 4), max(2, (3 * num_frames) // 4 + 1)))
        schedule.append((at, switch_spec(spec, rng)))
    return _render(schedule, num_frames, size, rng, pose, pose.lead_in(seed))
