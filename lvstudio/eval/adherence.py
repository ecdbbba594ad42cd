"""`lvstudio eval adherence`: does generated video follow its prompt? Measured by the oracle on the procedural world.

For N prompts sampled from the world's grammar (seeded), render `seconds` of video with a backend and let the oracle
read every frame: scene adherence = fraction of frames whose background reads as the prompt's scene; colour
adherence = fraction of frames containing an object of the prompt's primary colour; shape likewise. Reported as the
mean over prompts, plus the fraction of prompts where the majority of frames adhere.
"""

from __future__ import annotations

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

    def lines(self) -> list[str]:
        out = [f"oracle adherence over {self.num_prompts} prompts x {self.seconds:g} s ({self.backend}):"]
        for k in KEYS:
            out.append(f"  {k:7s} mean {100 * self.mean[k]:5.1f}%   "
                       f"prompts with majority {100 * self.majority[k]:5.1f}%")
        out.append(f"  flicker {self.flicker:.4f}   generation {self.frames_per_second:.1f} frames/s")
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


def evaluate_adherence(
    bundle,
    num_prompts: int = 100,
    seconds: float = 2.0,
    seed: int = 0,
    backend: str = "causal-kv",
    on_prompt: Callable[[int, str, dict], None] | None = None,
) -> AdherenceReport:
    import time

    from lvstudio.world import sample_spec
    from lvstudio.world.oracle import adherence, flicker

    rng = np.random.default_rng(seed)
    rows, flick = [], []
    t0, total_frames = time.perf_counter(), 0
    for i in range(num_prompts):
        spec = sample_spec(rng)
        prompt = spec.caption()
        frames = render_prompt(bundle, prompt, seconds, seed=seed * 100_003 + i, backend=backend)
        total_frames += frames.shape[0]
        score = adherence(frames, spec)
        rows.append({"prompt": prompt, **{k: float(score[k]) for k in KEYS}})
        flick.append(flicker(frames))
        if on_prompt is not None:
            on_prompt(i, prompt, rows[-1])
    wall = time.perf_counter() - t0
    mean = {k: float(np.mean([r[k] for r in rows])) for k in KEYS}
    majority = {k: float(np.mean([r[k] > 0.5 for r in rows])) for k in KEYS}
    return AdherenceReport(num_prompts, seconds, backend, mean, majority, rows, float(np.mean(flick)),
                           total_frames / max(wall, 1e-9))
