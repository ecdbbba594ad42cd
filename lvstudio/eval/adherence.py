"""`lvstudio eval adherence`: does generated video follow its prompt? Measured by the oracle on the procedural world.

For N prompts sampled from the world's grammar (seeded), render `seconds` of video with a backend and let the oracle
read every frame: scene adherence = fraction of frames whose background reads as the prompt's scene; colour
adherence = fraction of frames containing an object of the prompt's primary colour; shape likewise. Reported as the
mean over prompts, plus the fraction of prompts where the majority of frames adhere. For prompts whose first object
moves left, right, up or down, `travel` says how often it moves that way (frame scores cannot see a frozen object).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

KEYS = ("scene", "colour", "shape", "objects")  # objects: exactly the prompted objects (lvstudio.world.oracle)


@dataclass
class AdherenceReport:
    num_prompts: int
    seconds: float
    backend: str
    mean: dict[str, float]  # mean fraction of adherent frames
    majority: dict[str, float]  # fraction of prompts whose frames mostly adhere
    per_prompt: list[dict] = field(default_factory=list)
    flicker: float = 0.0
    frames_per_second: float = 0.0  # generation speed (frames / wall second)
    # prompted shape of the primary object -> {shape read for it (`primary_shape`; "none": no object): frames}
    shape_reads: dict[str, dict[str, int]] = field(default_factory=dict)
    objects_read: float = 0.0  # mean objects the oracle reads per frame
    objects_prompted: float = 0.0  # mean objects the prompts name
    # `object_faults` kind -> fraction of frames (mean over prompts) with that fault
    faults: dict[str, float] = field(default_factory=dict)
    travel: float | None = None  # prompts whose first object moves left/right/up/down: mean `oracle.travel`

    def breakdown(self, key: str, group: str) -> dict[str, float]:
        """Mean of score `key` over the prompts of each value of `group` (a per-prompt field: "motion" and "size"
        of the primary object, "count" of objects), largest groups first."""
        groups: dict[str, list[float]] = {}
        for r in self.per_prompt:
            if group in r:
                groups.setdefault(str(r[group]), []).append(r[key])
        return {g: float(np.mean(v)) for g, v in sorted(groups.items(), key=lambda kv: (-len(kv[1]), kv[0]))}

    def lines(self) -> list[str]:
        out = [f"oracle adherence over {self.num_prompts} prompts x {self.seconds:g} s ({self.backend}):"]
        for k in KEYS:
            out.append(f"  {k:7s} mean {100 * self.mean[k]:5.1f}%   "
                       f"prompts with majority {100 * self.majority[k]:5.1f}%")
        out.append(f"  flicker {self.flicker:.4f}   generation {self.frames_per_second:.1f} frames/s")
        out.append(f"  objects per frame: {self.objects_read:.2f} read, {self.objects_prompted:.2f} prompted")
        if self.travel is not None:
            moving = sum("travel" in r for r in self.per_prompt)
            out.append(f"  moving objects travel the prompted way in {100 * self.travel:.1f}% of frame pairs 4 apart "
                       f"({moving} prompts)")
        if self.faults:
            out.append("  not exactly the objects, % of frames: a prompted colour drawn as several objects "
                       f"{100 * self.faults['several']:.1f}%, one missing {100 * self.faults['missing']:.1f}%, "
                       f"another colour {100 * self.faults['other']:.1f}%")
        for shape, reads in self.shape_reads.items():
            total = sum(reads.values())
            out.append(f"  {shape:8s} read as " + ", ".join(
                f"{k} {100 * v / total:.0f}%" for k, v in sorted(reads.items(), key=lambda kv: -kv[1])))
        for key, group, label in (("shape", "motion", "shape by motion"), ("shape", "size", "shape by size"),
                                  ("objects", "count", "exactly the objects by objects prompted"),
                                  ("several", "count", "a prompted colour drawn as several objects, by objects"),
                                  ("several", "motion", "... by motion")):
            parts = self.breakdown(key, group)
            if parts:
                out.append(f"  {label}: " + ", ".join(f"{g} {100 * v:.0f}%" for g, v in parts.items()))
        worst = sorted(self.per_prompt, key=lambda r: r["scene"] + r["colour"])[:3]
        for r in worst:
            out.append(f"  weakest: {r['prompt']!r} scene {r['scene']:.2f} colour {r['colour']:.2f} "
                       f"shape {r['shape']:.2f}")
        return out


def render_prompt(bundle, prompt: str, seconds: float, seed: int, backend: str = "causal-kv") -> np.ndarray:
    """Render one prompt for `seconds` with a backend of the bundle; returns frames [F, H, W, 3] uint8."""
    from lvstudio.backends import make_backend
    from lvstudio.prompt_stream import PromptStreamBuffer

    p = bundle.preset
    buffer = PromptStreamBuffer(bundle.text.encode, block_latents=p.attention.block_frames, fps=p.fps)
    buffer.add_shot(0.0, prompt)
    be = make_backend(backend, bundle, buffer, seed=seed, width=p.width, height=p.height)
    frames: list[np.ndarray] = []
    need = round(seconds * p.fps)
    while sum(f.shape[0] for f in frames) < need:
        frames.append(be.step().frames)
    return np.concatenate(frames)[:need]


def check_run(num_prompts: int, seconds: float, fps: int) -> None:
    """Refuse an eval with nothing to score (ValueError naming the option and the least it takes)."""
    if num_prompts < 1:
        raise ValueError(f"--prompts must be at least 1, got {num_prompts}")
    if not (math.isfinite(seconds) and round(seconds * fps) >= 2):
        raise ValueError(f"--seconds must give at least 2 frames (flicker compares neighbours): {2 / fps:g} s or "
                         f"more at the preset's {fps} fps, got {seconds:g}")


def evaluate_adherence(
    bundle,
    num_prompts: int = 100,
    seconds: float = 2.0,
    seed: int = 0,
    backend: str = "causal-kv",
    on_prompt: Callable[[int, str, dict], None] | None = None,
) -> AdherenceReport:
    import time
    from collections import Counter

    from lvstudio.world import SHAPES, sample_spec
    from lvstudio.world.oracle import (
        OBJECT_FAULTS,
        adherence_of_readings,
        flicker,
        object_faults,
        primary_shape,
        read_clip,
        travel,
    )

    check_run(num_prompts, seconds, bundle.preset.fps)
    rng = np.random.default_rng(seed)
    rows, flick = [], []
    shape_reads: dict[str, Counter] = {s: Counter() for s in SHAPES}
    counts = {"read": 0, "prompted": 0}
    t0, total_frames = time.perf_counter(), 0
    for i in range(num_prompts):
        spec = sample_spec(rng)
        prompt = spec.caption()
        frames = render_prompt(bundle, prompt, seconds, seed=seed * 100_003 + i, backend=backend)
        total_frames += frames.shape[0]
        readings = read_clip(frames)
        score = adherence_of_readings(readings, [spec] * len(readings))
        p = spec.objects[0]
        shape_reads[p.shape].update(primary_shape(r, p.colour) or "none" for r in readings)
        counts["read"] += sum(len(r.objects) for r in readings)
        counts["prompted"] += len(spec.objects) * len(readings)
        faults = [object_faults(r, spec) for r in readings]
        rows.append({"prompt": prompt, **{k: float(score[k]) for k in KEYS}, "motion": p.motion, "size": p.size,
                     "count": len(spec.objects), **{k: float(np.mean([f[k] for f in faults])) for k in OBJECT_FAULTS}})
        moved = travel(readings, spec, frames.shape[1])
        if moved is not None:
            rows[-1]["travel"] = moved
        flick.append(flicker(frames))
        if on_prompt is not None:
            on_prompt(i, prompt, rows[-1])
    wall = time.perf_counter() - t0
    mean = {k: float(np.mean([r[k] for r in rows])) for k in KEYS}
    majority = {k: float(np.mean([r[k] > 0.5 for r in rows])) for k in KEYS}
    travels = [r["travel"] for r in rows if "travel" in r]  # the moving prompts with countable frame pairs
    return AdherenceReport(num_prompts, seconds, backend, mean, majority, rows, float(np.mean(flick)),
                           total_frames / max(wall, 1e-9), {k: dict(v) for k, v in shape_reads.items() if v},
                           counts["read"] / max(total_frames, 1), counts["prompted"] / max(total_frames, 1),
                           {k: float(np.mean([r[k] for r in rows])) for k in OBJECT_FAULTS},
                           float(np.mean(travels)) if travels else None)
