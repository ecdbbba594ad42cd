"""Oracle: read scene, object colours, shapes and positions back from frames of the procedural world.

No learned model: opencv + numpy only (no torch), robust to mild blur and noise (generated frames after a VAE).
- Scene (and effect): median Lab colour of the top 30% and of the bottom half of the frame, object pixels left
  out, nearest of the (scene, effect) prototypes measured on rendered backgrounds (`measure_scene_prototypes`).
- Objects: vivid pixels (chroma = max - min of RGB ≥ VIVID_CHROMA; scene palettes stay below ~75, objects above
  ~95) labelled by nearest object hue under the detected effect; per colour, external contours of the labelled
  mask (holes filled) give centre, area and shape: star by solidity, ball / cube / triangle by how much of the
  minimum enclosing circle the shape fills (about 1.0 / 0.64 / 0.41).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from lvstudio.world.clips import motion_step, object_rgb, render_background
from lvstudio.world.grammar import COLOURS, EFFECTS, SCENES, SceneSpec

VIVID_CHROMA = 88  # of 255; scene palettes stay below ~75, objects above ~95 under every effect
MAX_HUE_DISTANCE = 40.0  # degrees; vivid pixels further from every object hue are ignored
MIN_AREA_FRACTION = 0.0012  # of H*W; smaller blobs are noise
_TOP, _BOTTOM = 0.3, 0.5  # scene feature regions: rows [0, 0.3 H) and [0.5 H, H)

# (scene, effect) → median Lab (L, a, b) of the top region, then of the bottom region.
# Regenerate with `measure_scene_prototypes()` after changing world palettes (tests/test_oracle.py checks them).
SCENE_PROTOTYPES: tuple[tuple[str, str | None, tuple[float, ...]], ...] = (
    ('sky', None, (63.4, -1.9, -22.6, 77.0, -2.7, -16.1)),
    ('sky', 'dusk', (47.1, 4.3, -15.9, 64.6, 3.7, 0.5)),
    ('sky', 'rain', (53.2, -0.8, -16.4, 64.2, -1.0, -12.5)),
    ('sky', 'fog', (72.2, -1.3, -11.2, 77.9, -1.7, -10.3)),
    ('sea', None, (77.6, -3.9, -11.5, 33.4, -6.4, -18.8)),
    ('sea', 'dusk', (54.7, 3.0, -10.0, 40.4, 0.4, -0.4)),
    ('sea', 'rain', (64.7, -1.8, -10.0, 29.0, -3.5, -14.8)),
    ('sea', 'fog', (71.6, -1.9, -6.5, 48.2, -4.9, -11.9)),
    ('grass', None, (77.5, -4.6, -1.5, 48.2, -20.9, 27.8)),
    ('grass', 'dusk', (52.6, 2.6, -4.5, 48.2, -3.7, 22.9)),
    ('grass', 'rain', (64.1, -2.3, -4.2, 38.6, -11.8, 12.2)),
    ('grass', 'fog', (71.6, -2.2, -1.9, 56.2, -12.2, 14.6)),
    ('night', None, (5.6, 4.7, -14.5, 9.6, 6.2, -17.2)),
    ('night', 'dusk', (17.2, 8.5, -11.6, 28.6, 8.4, 2.1)),
    ('night', 'rain', (7.2, 3.5, -12.5, 10.7, 4.2, -13.8)),
    ('night', 'fog', (31.7, 1.6, -7.4, 28.4, 2.2, -9.4)),
    ('desert', None, (82.1, -0.2, 8.4, 71.3, 2.1, 23.9)),
    ('desert', 'dusk', (57.1, 5.2, 0.8, 61.4, 8.0, 22.7)),
    ('desert', 'rain', (67.9, 0.2, 1.3, 58.4, 1.0, 10.2)),
    ('desert', 'fog', (80.2, -0.0, 2.7, 74.4, 0.7, 12.2)),
    ('snow', None, (58.7, 1.7, -8.4, 91.9, -0.5, -4.7)),
    ('snow', 'dusk', (44.2, 6.5, -8.5, 72.3, 5.5, 6.1)),
    ('snow', 'rain', (49.6, 1.6, -8.4, 76.1, 0.2, -6.1)),
    ('snow', 'fog', (71.8, 0.7, -4.9, 87.7, -0.2, -3.9)),
)


@dataclass(frozen=True)
class ObjectReading:
    """One object read from a frame: colour and shape words, centre (px), area (px²)."""

    colour: str
    shape: str
    x: float
    y: float
    area: float


@dataclass(frozen=True)
class FrameReading:
    """What the oracle reads from one frame; objects largest first. effect: best guess (None = clear)."""

    scene: str
    objects: tuple[ObjectReading, ...]
    effect: str | None = None


def _as_uint8(frame: np.ndarray, what: str = "frame") -> np.ndarray:
    """Validate an RGB image [H, W, 3]; floats are taken as [0, 1] and converted to uint8."""
    if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3:
        raise ValueError(f"{what} must be an RGB array [H, W, 3], got {getattr(frame, 'shape', type(frame))}")
    if frame.shape[0] < 16 or frame.shape[1] < 16:
        raise ValueError(f"{what} is too small to read: {frame.shape}")
    if frame.dtype == np.uint8:
        return frame
    if np.issubdtype(frame.dtype, np.floating):
        return (np.clip(frame, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    raise ValueError(f"{what} must be uint8 (0..255) or float (0..1), got dtype {frame.dtype}")


def _scene_features(frame: np.ndarray, background: np.ndarray) -> np.ndarray:
    """Median Lab of the top and bottom regions over background pixels. frame [H, W, 3] uint8 → [6]."""
    h = frame.shape[0]
    lab = cv2.cvtColor(frame.astype(np.float32) * (1.0 / 255.0), cv2.COLOR_RGB2Lab)  # [H, W, 3]
    feats = []
    for a, b in ((0, max(1, int(_TOP * h))), (int(_BOTTOM * h), h)):
        region, keep = lab[a:b:2, ::2], background[a:b:2, ::2]
        pixels = region[keep] if keep.sum() >= 16 else region.reshape(-1, 3)
        feats.append(np.median(pixels, axis=0))
    return np.concatenate(feats)


def measure_scene_prototypes(size: int = 128, seeds: Sequence[int] = (0, 1, 2, 3)
                             ) -> tuple[tuple[str, str | None, tuple[float, ...]], ...]:
    """Scene features of rendered backgrounds for every (scene, effect), averaged over seeds (for SCENE_PROTOTYPES)."""
    table = []
    for scene in SCENES:
        for effect in (None, *EFFECTS):
            feats = [_scene_features(render_background(scene, effect, 1, size, seed)[0],
                                     np.ones((size, size), bool)) for seed in seeds]
            table.append((scene, effect, tuple(round(float(v), 1) for v in np.mean(feats, axis=0))))
    return tuple(table)


def _classify_scene(feats: np.ndarray) -> tuple[str, str | None]:
    """Nearest (scene, effect) prototype."""
    protos = np.array([p for _, _, p in SCENE_PROTOTYPES], np.float32)  # [K, 6]
    k = int(np.argmin(((protos - feats[None]) ** 2).sum(axis=1)))
    return SCENE_PROTOTYPES[k][0], SCENE_PROTOTYPES[k][1]


def _hue_degrees(rgb: Sequence[float]) -> float:
    """Hue of one RGB colour in degrees."""
    px = np.asarray(rgb, np.float32).reshape(1, 1, 3) / 255.0
    return float(cv2.cvtColor(px, cv2.COLOR_RGB2HSV)[0, 0, 0])


def _shape_of(contour: np.ndarray) -> str:
    """Classify a filled external contour as ball, cube, triangle or star.

    Fill ratios of the contour's area in its minimum enclosing triangle / circle / rotated rectangle, and its
    solidity (area / convex hull area); measured on world frames, ideal shapes give
    ball 0.6/0.9/0.79/0.98, cube 0.54/0.69/0.91/0.95, triangle 0.89/0.48/0.56/0.94, star 0.38/0.51/0.47/0.66.
    """
    area = cv2.contourArea(contour)
    if area <= 0:
        return "ball"
    solidity = area / max(cv2.contourArea(cv2.convexHull(contour)), 1e-6)
    _, radius = cv2.minEnclosingCircle(contour)
    circle_fill = area / max(math.pi * radius * radius, 1e-6)
    (_, (rw, rh), _) = cv2.minAreaRect(contour)
    rect_fill = area / max(rw * rh, 1e-6)
    tri_area, _ = cv2.minEnclosingTriangle(contour)
    tri_fill = area / max(tri_area, 1e-6)
    if tri_fill >= 0.72:
        return "triangle"
    if circle_fill >= 0.8 and solidity >= 0.93:
        return "ball"
    if rect_fill >= 0.74 and solidity >= 0.89:
        return "cube"
    if solidity < 0.85:
        return "star"
    scores = {"ball": circle_fill - 0.8, "cube": rect_fill - 0.74, "triangle": tri_fill - 0.72}
    return max(scores, key=scores.__getitem__)


def _read_objects(frame: np.ndarray, effect: str | None) -> tuple[list[ObjectReading], np.ndarray]:
    """Objects in a frame (largest first) and the vivid-pixel mask [H, W] bool."""
    h, w = frame.shape[:2]
    # Step 1: vivid pixels (a 3x3 median first knocks out sensor-like noise)
    smooth = cv2.medianBlur(frame, 3)
    rgb = smooth.astype(np.int16)
    chroma = rgb.max(axis=2) - rgb.min(axis=2)  # [H, W]
    vivid = chroma >= VIVID_CHROMA
    # Step 2: label vivid pixels by the nearest object hue under the effect (-1: unlabelled)
    ys, xs = np.nonzero(vivid)
    hue = cv2.cvtColor(smooth, cv2.COLOR_RGB2HSV_FULL)[ys, xs, 0].astype(np.float32) * (360.0 / 256.0)  # [N]
    protos = np.array([_hue_degrees(object_rgb(c, effect)) for c in COLOURS], np.float32)  # [C]
    diff = np.abs(hue[:, None] - protos[None, :])
    diff = np.minimum(diff, 360.0 - diff)  # [N, C]
    label = np.full((h, w), -1, np.int16)  # [H, W]
    label[ys, xs] = np.where(diff.min(axis=1) <= MAX_HUE_DISTANCE, np.argmin(diff, axis=1), -1)
    # Step 3: per colour, external contours of the cleaned mask → objects
    min_area = max(6.0, MIN_AREA_FRACTION * h * w)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (3, 3))
    objects: list[ObjectReading] = []
    for c_idx in np.unique(label[label >= 0]):
        mask = (label == c_idx).astype(np.uint8)
        if mask.sum() < min_area:
            continue
        if min(h, w) >= 96:
            mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, kernel)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        for cnt in contours:
            x0, y0, bw, bh = cv2.boundingRect(cnt)
            filled = np.zeros((bh, bw), np.uint8)
            cv2.drawContours(filled, [cnt - np.array([[x0, y0]])], -1, 1, thickness=-1)
            m = cv2.moments(filled, binaryImage=True)
            if m["m00"] < min_area or len(cnt) < 5:
                continue
            objects.append(ObjectReading(colour=COLOURS[int(c_idx)], shape=_shape_of(cnt),
                                         x=x0 + m["m10"] / m["m00"], y=y0 + m["m01"] / m["m00"], area=m["m00"]))
    objects.sort(key=lambda o: -o.area)
    return objects, vivid


def read_frame(frame: np.ndarray) -> FrameReading:
    """Read scene, effect and objects from one RGB frame [H, W, 3] (uint8, or float in [0, 1])."""
    frame = _as_uint8(frame)
    # Step 1: scene from the background (vivid pixels and their rims left out)
    rgb = frame.astype(np.int16)
    vivid = (rgb.max(axis=2) - rgb.min(axis=2)) >= VIVID_CHROMA
    background = cv2.dilate(vivid.astype(np.uint8), np.ones((5, 5), np.uint8)) == 0
    scene, effect = _classify_scene(_scene_features(frame, background))
    # Step 2: objects, with hues judged under the detected effect
    objects, _ = _read_objects(frame, effect)
    return FrameReading(scene=scene, objects=tuple(objects), effect=effect)


def _as_clip(frames: np.ndarray) -> np.ndarray:
    """Validate a clip [F, H, W, 3]."""
    if not isinstance(frames, np.ndarray) or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) == 0:
        raise ValueError(f"frames must be a non-empty array [F, H, W, 3], got {getattr(frames, 'shape', frames)}")
    return frames


def read_clip(frames: np.ndarray) -> list[FrameReading]:
    """read_frame for every frame of [F, H, W, 3]."""
    return [read_frame(f) for f in _as_clip(frames)]


def primary_shape(reading: FrameReading, colour: str) -> str | None:
    """The shape read for the primary object: the largest object of the primary colour (no such object: the largest
    object; no object at all: None)."""
    same = [o for o in reading.objects if o.colour == colour]
    pool = same or list(reading.objects)
    return pool[0].shape if pool else None


ADHERENCE_KEYS = ("scene", "colour", "shape", "objects")


def exact_objects(reading: FrameReading, spec: SceneSpec) -> bool:
    """Exactly the prompted objects: per object colour, as many separate objects (connected components of that
    colour) as the prompt names, and no object of any other colour. A grid of blobs, a missing object or a stray one
    all fail (`object_faults` says which)."""
    return not any(object_faults(reading, spec).values())


OBJECT_FAULTS = ("several", "missing", "other")  # why a frame is not exactly the prompted objects


def object_faults(reading: FrameReading, spec: SceneSpec) -> dict[str, bool]:
    """Why a frame fails `exact_objects` (any number may hold): "several" — a prompted colour read as more objects
    than the prompt names (drawn twice, or in pieces); "missing" — fewer (absent, or merged with another object);
    "other" — an object of a colour the prompt does not name."""
    read, prompted = Counter(o.colour for o in reading.objects), Counter(o.colour for o in spec.objects)
    return {"several": any(read[c] > n for c, n in prompted.items()),
            "missing": any(read[c] < n for c, n in prompted.items()),
            "other": any(c not in prompted for c in read)}


def frame_scores(reading: FrameReading, spec: SceneSpec) -> dict[str, bool]:
    """What one frame gets right against a spec: scene; an object of the primary colour; the primary object's shape
    (the largest object of the primary colour); exactly the prompted objects."""
    p = spec.objects[0]
    return {
        "scene": reading.scene == spec.scene,
        "colour": any(o.colour == p.colour for o in reading.objects),
        "shape": primary_shape(reading, p.colour) == p.shape,
        "objects": exact_objects(reading, spec),
    }


def adherence_of_readings(readings: Sequence[FrameReading], specs: Sequence[SceneSpec]) -> dict[str, float]:
    """Mean of `frame_scores` over paired readings and specs (one per frame) for every key of ADHERENCE_KEYS."""
    if not readings or len(readings) != len(specs):
        raise ValueError(f"need one spec per reading, got {len(specs)} specs for {len(readings)} readings")
    totals = dict.fromkeys(ADHERENCE_KEYS, 0)
    for r, s in zip(readings, specs, strict=True):
        for k, ok in frame_scores(r, s).items():
            totals[k] += ok
    return {k: v / len(readings) for k, v in totals.items()}


def adherence(frames: np.ndarray, spec: SceneSpec | Sequence[SceneSpec]) -> dict[str, float]:
    """Fractions of frames whose scene matches, that contain an object of the primary colour, where the primary
    object's shape matches, and that show exactly the prompted objects (`exact_objects`).
    spec: one SceneSpec, or one per frame (e.g. Clip.specs for a clip with a switch)."""
    frames = _as_clip(frames)
    specs = [spec] * len(frames) if isinstance(spec, SceneSpec) else list(spec)
    if len(specs) != len(frames) or not all(isinstance(s, SceneSpec) for s in specs):
        raise ValueError(f"spec must be a SceneSpec or {len(frames)} SceneSpecs, one per frame")
    return adherence_of_readings(read_clip(frames), specs)


def travel(readings: Sequence[FrameReading], spec: SceneSpec, size: int, gap: int = 4) -> float | None:
    """Does the prompt's first object move the way its motion says? For "moving left/right/up/down": over the frame
    pairs `gap` apart in which its colour is read as one object in both, the fraction whose centre moved along the
    motion's axis, in its direction, by at least a quarter of the world's own step over `gap` frames
    (`clips.motion_step`). Pairs that moved more than half the frame (a wrap to the opposite edge) are not counted.
    None for the other motions or when no pair is countable. Frame-by-frame scores cannot see a frozen object; this
    does."""
    obj = spec.objects[0]
    step = motion_step(obj.motion, size)
    if step is None:
        return None
    axis, per_frame = step
    centres = []
    for r in readings:
        mine = [o for o in r.objects if o.colour == obj.colour]
        centres.append(getattr(mine[0], axis) if len(mine) == 1 else None)
    steps = [(b - a) / per_frame for a, b in zip(centres, centres[gap:], strict=False)  # in world steps
             if a is not None and b is not None and abs(b - a) <= size / 2]
    if not steps:
        return None
    return float(np.mean([k >= 0.25 * gap for k in steps]))


def flicker(frames: np.ndarray) -> float:
    """Mean absolute frame-to-frame difference in [0, 1] units (0.0 for a single frame)."""
    frames = _as_clip(frames)
    if len(frames) < 2:
        return 0.0
    x = frames.astype(np.float32) / 255.0 if frames.dtype == np.uint8 else frames.astype(np.float32)
    return float(np.mean(np.abs(np.diff(x, axis=0))))
