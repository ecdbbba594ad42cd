"""`lvstudio eval denoise`: what the DiT knows at each noise level, and whether the prompt steers it.

For N held-out world clips of one caption each (seeds 20,000 on, as `eval vae`, without a switch), the first block
of latents (the preset's `attention.block_frames` latents n, i.e. 1 + 4(n - 1) frames) is encoded with the preset's
VAE, noised to σ (x_σ = (1 - σ)·x0 + σ·ε; one ε per clip from a seeded CPU generator, the same at every σ) and
denoised in ONE step: x0_hat = x_σ - σ·v, v the DiT's velocity at t = 1000·σ with the preset's classifier-free
guidance against its negative prompt, conditioned as the sampler conditions a shot's first block
(`lvstudio.backends.base.ConditioningCache`). x0_hat is decoded and the oracle reads every frame.

- data row: under the true caption, the oracle's scene / colour / shape / exactly-the-objects (as `eval adherence`
  scores them) and the latent MSE of x0_hat against x0. σ = 0 is the VAE alone (x0 decoded): the ceiling.
- steer rows: the same x_σ under a caption with ONE thing swapped (`lvstudio.world.change_spec`, seeded): the
  primary object's colour (to one no object of the caption has), its shape, or the scene. Per frame, "follows the
  text" = the reading matches the swapped caption on that key, "keeps the data" = it matches the true one, both by
  `frame_scores`: colour = an object of that colour is present; shape = the largest object of the primary colour
  (the colour both captions name, since only the shape differs; without one, the largest object) has that shape;
  scene = the background reads as that scene.

A model that has learnt a word follows the text where the data says little (high σ); one that has not keeps the
data at low σ and follows the text at chance level at every σ.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lvstudio.eval.vae_readback import HELD_OUT_SEED

if TYPE_CHECKING:
    import torch

    from lvstudio.presets import Preset
    from lvstudio.presets.load import ModelBundle
    from lvstudio.world import Pose, SceneSpec

DEFAULT_SIGMAS = (0.3, 0.5, 0.7, 0.8, 0.9)
STEER_KINDS = ("colour", "shape", "scene")  # what a steer row swaps in the caption


def parse_sigmas(text: str) -> tuple[float, ...]:
    """'0.3,0.5,0.9' -> (0.3, 0.5, 0.9) (checked by DenoiseConfig)."""
    values = []
    for part in text.split(","):
        try:
            values.append(float(part))
        except ValueError:
            raise ValueError(f"--sigmas: {part.strip()!r} is not a number; give a comma-separated list such as "
                             "0.3,0.5,0.7") from None
    return tuple(values)


def _world_pose() -> Pose:
    """The world's own pose (any angle, anywhere): the default of `DenoiseConfig.pose`."""
    from lvstudio.world import Pose

    return Pose()


@dataclass(frozen=True)
class DenoiseConfig:
    """What to probe: `clips` held-out clips, noise levels `sigmas` (each in (0, 1]; σ = 0, the VAE alone, is always
    reported; sorted and made unique), `seed` (the noise and the swapped words; the clips are fixed), `cfg_scale`
    (None = the preset's sampler's), `pose` (how the held-out clips' objects start, `lvstudio.world.Pose`: as the
    training set of the DiT had them)."""

    clips: int = 40
    sigmas: tuple[float, ...] = DEFAULT_SIGMAS
    seed: int = 0
    cfg_scale: float | None = None
    pose: Pose = field(default_factory=_world_pose)

    def __post_init__(self) -> None:
        if not isinstance(self.clips, int) or self.clips < 1:
            raise ValueError(f"--clips must be at least 1, got {self.clips!r}")
        levels = sorted({float(s) for s in self.sigmas})
        if not levels:
            raise ValueError("--sigmas needs at least one noise level, e.g. 0.3,0.5,0.7,0.8,0.9")
        bad = [s for s in levels if not (math.isfinite(s) and 0.0 < s <= 1.0)]
        if bad:
            raise ValueError(f"--sigmas: {bad[0]:g} is not a noise level in (0, 1] (0, the VAE alone, is always "
                             "shown)")
        object.__setattr__(self, "sigmas", tuple(levels))
        if self.cfg_scale is not None and not (math.isfinite(self.cfg_scale) and self.cfg_scale >= 0):
            raise ValueError(f"--cfg-scale must be a number >= 0 (1 = no guidance), got {self.cfg_scale:g}")


def check_preset(preset: Preset) -> None:
    """A preset the probe can run: of the procedural world (the oracle reads its frames), square frames."""
    if not preset.is_world:
        raise ValueError(f"preset {preset.name!r} was not trained on the procedural world: the oracle cannot read "
                         "its frames; use a world preset such as tiny")
    if preset.width != preset.height:
        raise ValueError(f"preset {preset.name!r} makes {preset.width}x{preset.height} frames; world clips are square")


def swapped_specs(spec: SceneSpec, rng: np.random.Generator) -> dict[str, SceneSpec]:
    """For each kind of STEER_KINDS, `spec` with exactly that one thing changed (drawn from `rng` in that order)."""
    from lvstudio.world import change_spec

    return {kind: change_spec(spec, kind, rng) for kind in STEER_KINDS}


@dataclass
class DenoiseRow:
    """One noise level: fractions of read frames (0..1)."""

    sigma: float
    data: dict[str, float]  # ADHERENCE_KEYS under the true caption
    latent_mse: float | None = None  # mean (x0_hat - x0)² under the true caption; None at σ = 0
    follows_text: dict[str, float] = field(default_factory=dict)  # STEER_KINDS; empty at σ = 0
    keeps_data: dict[str, float] = field(default_factory=dict)


@dataclass
class DenoiseReport:
    preset: str
    clips: int
    frames: int  # read per clip and prediction
    cfg_scale: float
    seed: int
    rows: list[DenoiseRow]
    per_clip: list[dict] = field(default_factory=list)  # captions and swaps, per σ scores
    pose: dict[str, bool | int | float] = field(default_factory=dict)  # how the held-out clips started (non-default)

    def lines(self) -> list[str]:
        from lvstudio.world import Pose

        out = [f"one-step denoising over {self.clips} held-out world clips x {self.frames} frames "
               f"({self.preset}, cfg {self.cfg_scale:g}, seed {self.seed}"
               f"{f', objects {Pose(**self.pose).words()}' if self.pose else ''}); % of frames",
               f"  {'':17s} {'true caption (data row)':^28s}   {'one word swapped: follows text / keeps data':^43s}",
               f"  {'sigma':9s} {'x0 MSE':>7s} {'scene':>6s} {'colour':>6s} {'shape':>6s} {'objects':>7s}   "
               + "  ".join(f"{k:>13s}" for k in STEER_KINDS)]
        for r in self.rows:
            sigma = "0 (VAE)" if r.sigma == 0 else f"{r.sigma:g}"
            mse = "-" if r.latent_mse is None else f"{r.latent_mse:.4f}"
            data = " ".join(f"{100 * r.data[k]:{w}.1f}" for k, w in (("scene", 6), ("colour", 6), ("shape", 6),
                                                                      ("objects", 7)))
            steer = "  ".join(f"{100 * r.follows_text[k]:5.1f} / {100 * r.keeps_data[k]:5.1f}"
                              if k in r.follows_text else f"{'-':>13s}" for k in STEER_KINDS)
            out.append(f"  {sigma:9s} {mse:>7s} {data}   {steer}")
        out.append("  x0 MSE: one-step prediction vs the clean latents. Swapped: the primary object's colour, its "
                   "shape, or the scene;")
        out.append("  frames that read as the swapped word / as the clip's own.")
        return out

    def save(self, path: Path) -> Path:
        """The report as JSON (atomic)."""
        from lvstudio.atomic import atomic_write_text

        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(asdict(self), indent=1))
        return path


class _Tally:
    """Hits per key over read frames, for one noise level."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.frames: dict[str, int] = {}
        self.sq_err, self.n_values = 0.0, 0

    def add(self, key: str, hits: Sequence[bool]) -> None:
        self.hits[key] = self.hits.get(key, 0) + int(sum(hits))
        self.frames[key] = self.frames.get(key, 0) + len(hits)

    def add_error(self, pred: torch.Tensor, x0: torch.Tensor) -> None:
        """Squared error of a predicted x0 [1, C, n, h, w] against the clean latents."""
        self.sq_err += float(((pred - x0) ** 2).sum())
        self.n_values += x0.numel()

    def mean(self, key: str) -> float:
        return self.hits[key] / self.frames[key]


class _OneStep:
    """x0_hat = x_σ - σ·v in one DiT call per caption, guided as the sampler guides a shot's first block."""

    def __init__(self, bundle: ModelBundle, cfg_scale: float) -> None:
        from lvstudio.backends.base import ConditioningCache
        from lvstudio.models.kv_cache import AttentionSpec
        from lvstudio.prompt_stream import PromptStreamBuffer

        p = bundle.preset
        self.bundle = bundle
        self.negative = p.negative_prompt
        self.buffer = PromptStreamBuffer(bundle.text.encode, block_latents=p.attention.block_frames, fps=p.fps,
                                         negative=p.negative_prompt)
        self.conds = ConditioningCache(bundle.dit, bundle.device, self.buffer, cfg_scale)
        a = p.attention
        self.spec = AttentionSpec(a.block_frames, a.window_frames, a.sink_frames)
        self.rope_mode = a.rope_mode

    def __call__(self, x_t: torch.Tensor, sigma: float, caption: str) -> torch.Tensor:
        """x_t [1, C, n, h, w] at σ -> the predicted x0 [1, C, n, h, w] (float32)."""
        import torch

        from lvstudio.sampling.flow_matching import x0_from_velocity

        rows = self.conds.rows  # [cond, uncond] with guidance
        cond = self.conds.get(f"{caption}\0{self.negative}", self.buffer.embedding(caption), self.negative)
        t = torch.full((rows, x_t.shape[2]), 1000.0 * sigma, device=x_t.device)  # [rows, n]
        v = self.conds.guide(self.bundle.dit(x_t.expand(rows, -1, -1, -1, -1), t, cond, attention=self.spec,
                                             start_frame=0, rope_mode=self.rope_mode))
        return x0_from_velocity(x_t, v.float(), sigma)


def _world_clip_latents(bundle: ModelBundle, index: int, frames: int, pose: Pose
                        ) -> tuple[SceneSpec, torch.Tensor, np.ndarray]:
    """Held-out clip `index` (one caption, no switch; its objects start in `pose`): its spec, latents
    [1, C, n, h, w] and the VAE's read-back frames [F, H, W, 3] uint8 (x0 decoded)."""
    import torch

    from lvstudio.backends.base import to_uint8_frames
    from lvstudio.world import sample_clip

    clip = sample_clip(HELD_OUT_SEED + index, frames, size=bundle.preset.width, switch_prob=0.0, pose=pose)
    video = torch.from_numpy(clip.frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # [1, 3, F, H, W]
    x0 = bundle.vae.encode(video.to(bundle.device)).float()  # [1, C, n, h, w]
    return clip.specs[0], x0, to_uint8_frames(bundle.vae.decode(x0))


def _score(tally: _Tally, readings: list, spec: SceneSpec, swaps: dict[str, SceneSpec] | None = None,
           swapped_readings: dict[str, list] | None = None) -> dict[str, float]:
    """Add one clip's frames to `tally`: the data row's keys on `readings` under `spec`; with swaps, per kind the
    frames of `swapped_readings[kind]` that follow the swapped caption and that keep `spec`. Returns this clip's
    fractions (for the JSON)."""
    from lvstudio.world.oracle import ADHERENCE_KEYS, frame_scores

    clip: dict[str, float] = {}
    data = [frame_scores(r, spec) for r in readings]
    for k in ADHERENCE_KEYS:
        tally.add(k, [s[k] for s in data])
        clip[k] = float(np.mean([s[k] for s in data]))
    for kind, swapped in (swaps or {}).items():
        rs = swapped_readings[kind]
        text = [frame_scores(r, swapped)[kind] for r in rs]
        kept = [frame_scores(r, spec)[kind] for r in rs]
        tally.add(f"text:{kind}", text)
        tally.add(f"data:{kind}", kept)
        clip[f"{kind}_follows_text"], clip[f"{kind}_keeps_data"] = float(np.mean(text)), float(np.mean(kept))
    return clip


def evaluate_denoise(bundle: ModelBundle, cfg: DenoiseConfig,
                     on_clip: Callable[[int, str], None] | None = None) -> DenoiseReport:
    """The one-step denoising probe (module docstring) of a world preset's bundle (`check_preset`)."""
    import torch

    from lvstudio.backends.base import to_uint8_frames
    from lvstudio.sampling.flow_matching import add_noise
    from lvstudio.world.oracle import read_clip

    p = bundle.preset
    check_preset(p)
    seed, sigmas = cfg.seed, cfg.sigmas
    scale = p.sampler.cfg_scale if cfg.cfg_scale is None else float(cfg.cfg_scale)
    frames = 1 + 4 * (p.attention.block_frames - 1)
    one_step = _OneStep(bundle, scale)
    tallies = {s: _Tally() for s in (0.0, *sigmas)}
    per_clip: list[dict] = []
    with torch.no_grad():
        for i in range(cfg.clips):
            # Step 1: a held-out clip of one caption, its first block of latents, the VAE's read-back (σ = 0).
            spec, x0, vae_frames = _world_clip_latents(bundle, i, frames, cfg.pose)
            swaps = swapped_specs(spec, np.random.default_rng([seed, i]))
            record = {"caption": spec.caption(), **{f"{k}_swapped": s.caption() for k, s in swaps.items()},
                      "sigma": {"0": _score(tallies[0.0], read_clip(vae_frames), spec)}}
            eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed * 100_003 + i))  # [1, C, n, h, w]
            for sigma in sigmas:
                # Step 2: one noise level; one-step predictions under the true and each swapped caption.
                x_t = add_noise(x0, eps.to(x0.device), sigma)
                preds = [one_step(x_t, sigma, s.caption()) for s in (spec, *swaps.values())]
                tallies[sigma].add_error(preds[0], x0)
                # Step 3: decode and read every prediction; score the data row and the steer rows.
                readings = [read_clip(to_uint8_frames(bundle.vae.decode(x))) for x in preds]
                record["sigma"][f"{sigma:g}"] = _score(tallies[sigma], readings[0], spec, swaps,
                                                       dict(zip(STEER_KINDS, readings[1:], strict=True)))
            per_clip.append(record)
            if on_clip is not None:
                on_clip(i, spec.caption())
    return DenoiseReport(p.name, cfg.clips, frames, scale, seed, [_row(s, t) for s, t in tallies.items()], per_clip,
                         {k: v for k, v in asdict(cfg.pose).items() if v})


def _row(sigma: float, tally: _Tally) -> DenoiseRow:
    from lvstudio.world.oracle import ADHERENCE_KEYS

    steer = [k for k in STEER_KINDS if f"text:{k}" in tally.hits]
    return DenoiseRow(sigma, {k: tally.mean(k) for k in ADHERENCE_KEYS},
                      tally.sq_err / tally.n_values if tally.n_values else None,
                      {k: tally.mean(f"text:{k}") for k in steer}, {k: tally.mean(f"data:{k}") for k in steer})
