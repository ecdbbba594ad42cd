"""`lvstudio eval transitions`: do `cut`, `switch` and `blend` mean what they say? Measured on the procedural world.

Per backend, with one preset and one seed (every render below uses the run seed):
  1. from scratch: each of K unrelated prompts (sampled from the world grammar; consecutive prompts differ in scene,
     colour and shape) rendered alone, as long as its shot lasts in the storyboards below — the reference;
  2. cuts: one storyboard of the K unrelated prompts, S seconds each, joined by `cut`. Per shot, oracle adherence
     (scene, colour, shape, objects = exactly the prompted objects: fractions of frames) from its second block on,
     against the same blocks of the from-scratch render: a new shot should lose nothing to the shots before it
     (target: within 3 points, on the mean over shots). The shots' noise comes from their block indices, the
     from-scratch renders' from blocks 0.., so the two differ by seed noise as well: the same prompts from scratch
     with the next seed are reported as the noise floor. What a cut itself does is isolated by rendering the
     storyboard again with every other shot replaced: the shots after a replaced one keep their blocks (and noise)
     but not their predecessor, and should come out identical. The whole shot's adherence is reported too, next to
     the same storyboard joined by `switch` — what a storyboard `cut` did before `switch` existed (the issue's
     table);
  3. switches, used as meant: a storyboard of K related prompts — one scene, each prompt changing the object's
     colour or shape (a new instruction for the same shot) — joined by `switch`, and each prompt from scratch.
     Continuity: the mean absolute frame difference across each switch against the mean difference of consecutive
     frames inside shots (target <= 1.5x; the unrelated cut storyboard's ratio is shown for contrast). Response: per
     block after a switch, the adherence of the attribute it changed (mean over the switches that changed colour,
     resp. shape), and the first block where it reaches 90 % of the same prompts from scratch (second block on);
  4. identities across cuts: a storyboard naming `{hero}` (one object) in M shots with a new scene and motion each,
     joined by cuts, against each resolved prompt from scratch: the hero keeps its colour and shape;
  5. latency: each chunk's wall time at a cut and at a switch, against the median chunk;
  6. the decoder restart: the first block of each new shot of the cut storyboard decoded (a) as rendered — the
     streaming decoder restarted with zero history (`new_shot`), (b) with the previous shot's decoder history
     carried on (the smear a restart avoids) and (c) "warm": after the shot's own first latent, an in-distribution
     reference. Reported: PSNR of (a) and (b) against (c) for the block's first 4 frames and the rest, and the
     oracle's scene and colour adherence of the first 4 frames under each. A VAE not trained for restarts shows it
     in (a)'s first frames.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lvstudio.prompt_stream import block_at_frame, block_start_frame
from lvstudio.world.oracle import ADHERENCE_KEYS

KEYS = ADHERENCE_KEYS  # scene, colour, shape, objects (exactly the prompted objects)
CUT_TOLERANCE = 0.03  # adherence points (fractions) a cut's shot may lose against from scratch
CONTINUITY_LIMIT = 1.5  # frame difference across a switch / inside shots
RESPONSE_FRACTION = 0.9  # a switch has responded when adherence reaches this fraction of from scratch


@dataclass(frozen=True)
class TransitionsConfig:
    prompts: int = 12  # K shots in the cut and switch storyboards
    seconds: float = 2.0  # S seconds per shot
    identity_shots: int = 6  # M shots naming {hero}
    seed: int = 0

    def __post_init__(self) -> None:
        if self.prompts < 3 or self.identity_shots < 2:
            raise ValueError("--prompts must be at least 3 (a switch's response is read over two switches) and "
                             "--identity-shots at least 2 (a transition needs two shots)")
        if not 0 < self.seconds <= 60:
            raise ValueError(f"--seconds must be in (0, 60], got {self.seconds}")

    def check_blocks(self, block_latents: int, fps: int) -> None:
        """Refuse shots shorter than two blocks: each shot is scored from its second block on."""
        _, bounds = _shot_bounds(self, self.prompts, block_latents, fps)
        shortest = min(b1 - b0 for b0, b1 in itertools.pairwise(bounds))
        if shortest < 2:
            least = 2 * 4 * block_latents / fps
            raise ValueError(f"--seconds {self.seconds:g} gives shots of {shortest} block(s) at the preset's "
                             f"{fps} fps; each shot is scored from its second block on: use --seconds {least:g} "
                             "or more")


@dataclass
class Rendered:
    """A render measured chunk by chunk: the frames, each chunk's first block, flags, wall time and latents."""

    frames: np.ndarray  # [F, H, W, 3] uint8
    blocks: list[int] = field(default_factory=list)
    new_shot: list[bool] = field(default_factory=list)
    switched: list[bool] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    latents: list[Any] = field(default_factory=list)  # [1, C, n, h, w] tensors


@dataclass
class BackendReport:
    backend: str
    preset: str
    config: dict[str, Any]
    prompts: list[str]  # the unrelated prompts (items 1-2)
    related: list[str]  # the switch chain (item 3)
    scratch: dict[str, float]  # from scratch, from the second block on (mean over prompts)
    scratch_other_seed: dict[str, float]  # the same with seed + 1: the noise floor of the comparison
    scratch_whole: dict[str, float]  # from scratch, whole shot
    cut: dict[str, float]  # the cut storyboard, from the second block on
    cut_whole: dict[str, float]
    cut_per_shot: list[dict[str, float]]  # per shot: cut minus from scratch, from the second block on
    independence: dict[str, float]  # shots whose predecessor was replaced: max / mean |pixel difference| (0-255)
    unrelated_switch_whole: dict[str, float]  # the unrelated prompts joined by switch, whole shot
    related_scratch_whole: dict[str, float]  # the switch chain's prompts from scratch, whole shot
    related_switch_whole: dict[str, float]  # the switch chain joined by switch, whole shot
    continuity: dict[str, float]  # frame difference across / inside: the switch chain, and the cut storyboard
    response_curve: dict[str, list[float]]  # colour / shape: adherence per block after switches that changed it
    response_target: dict[str, float]  # colour / shape: from scratch, from the second block on
    response_blocks: dict[str, int | None]  # first block >= 90 % of the target (None: not within the shot)
    hero: str  # the identity's prompt in item 4
    identity: dict[str, dict[str, float]]  # "scratch" / "cut": colour and shape adherence of the hero
    latency: dict[str, float]  # chunk wall time at a cut / at a switch over the median chunk
    decoder: dict[str, float]  # the restart diagnostics (PSNR, oracle) of item 6
    wall_seconds: float = 0.0

    def checks(self) -> dict[str, bool]:
        return {
            **{f"cut {k} within 3 points": self.cut[k] >= self.scratch[k] - CUT_TOLERANCE for k in KEYS},
            "a cut's shot does not depend on the shot before": self.independence["max"] <= 1,
            "switch continuity <= 1.5x": self.continuity["switch_ratio"] <= CONTINUITY_LIMIT,
            **{f"identity {k} within 3 points": self.identity["cut"][k] >= self.identity["scratch"][k] - CUT_TOLERANCE
               for k in ("colour", "shape")},
        }

    def lines(self) -> list[str]:
        pct = "  ".join
        c, d = self.continuity, self.decoder

        def row(scores: dict[str, float]) -> str:
            return pct(f"{k} {scores[k]:.2f}" for k in KEYS)

        out = [f"{self.backend} ({self.preset}): {len(self.prompts)} shots x {self.config['seconds']:g} s, "
               f"seed {self.config['seed']}, {self.wall_seconds:.0f} s",
               "  unrelated prompts (scene, colour and shape all change), whole shot:",
               f"    each from scratch               {row(self.scratch_whole)}",
               f"    one storyboard, cut             {row(self.cut_whole)}",
               f"    one storyboard, switch          {row(self.unrelated_switch_whole)}",
               "  from the 2nd block of each shot:",
               f"    from scratch                    {row(self.scratch)}",
               f"    cut                             {row(self.cut)}   "
               f"(delta {pct(f'{k} {self.cut[k] - self.scratch[k]:+.2f}' for k in KEYS)})",
               f"    from scratch, seed + 1          {row(self.scratch_other_seed)}   "
               f"(delta {pct(f'{k} {self.scratch_other_seed[k] - self.scratch[k]:+.2f}' for k in KEYS)}: "
               "the noise floor)",
               f"  a cut's shot with another shot before it: max |pixel difference| {self.independence['max']:.0f}, "
               f"mean {self.independence['mean']:.4f} (of 255)",
               "  switch chain (one scene; colour or shape changes), whole shot:",
               f"    each from scratch               {row(self.related_scratch_whole)}",
               f"    one storyboard, switch          {row(self.related_switch_whole)}",
               f"  continuity: frame diff across a switch {c['switch_across']:.4f} / inside shots "
               f"{c['switch_inside']:.4f} = {c['switch_ratio']:.2f}x (across a cut of unrelated prompts: "
               f"{c['cut_ratio']:.2f}x)",
               "  switch response, blocks to 90% of from scratch: "
               + pct(f"{k} {'-' if v is None else v}" for k, v in self.response_blocks.items())
               + "   (per block: " + pct(f"{k} " + ",".join(f"{x:.2f}" for x in curve)
                                        + f" vs {self.response_target[k]:.2f}"
                                        for k, curve in self.response_curve.items()) + ")",
               f"  identity {{hero}} = {self.hero!r} across cuts (colour, shape): "
               f"scratch {self.identity['scratch']['colour']:.2f}, "
               f"{self.identity['scratch']['shape']:.2f}; cut {self.identity['cut']['colour']:.2f}, "
               f"{self.identity['cut']['shape']:.2f}",
               f"  chunk time at a cut {self.latency['cut']:.2f}x, at a switch {self.latency['switch']:.2f}x the "
               "median",
               f"  decoder at a cut, PSNR vs warm: restart {d['restart_psnr_first4']:.1f} dB (frames 0-3) "
               f"{d['restart_psnr_rest']:.1f} dB (rest); carried history {d['carried_psnr_first4']:.1f} / "
               f"{d['carried_psnr_rest']:.1f} dB; frames 0-3 scene/colour: restart {d['restart_scene_first4']:.2f}/"
               f"{d['restart_colour_first4']:.2f}, carried {d['carried_scene_first4']:.2f}/"
               f"{d['carried_colour_first4']:.2f}, warm {d['warm_scene_first4']:.2f}/{d['warm_colour_first4']:.2f}"]
        out += [f"  {'ok  ' if ok else 'MISS'} {name}" for name, ok in self.checks().items()]
        return out


# -- prompts --------------------------------------------------------------------------------------------------------
def unrelated_specs(rng: np.random.Generator, k: int) -> list[Any]:
    """k world specs, each differing from the one before in scene, primary colour and primary shape."""
    from lvstudio.world import sample_spec

    specs = [sample_spec(rng)]
    while len(specs) < k:
        s, prev = sample_spec(rng), specs[-1]
        if (s.scene != prev.scene and s.primary.colour != prev.primary.colour
                and s.primary.shape != prev.primary.shape):
            specs.append(s)
    return specs


def related_specs(rng: np.random.Generator, k: int) -> tuple[list[Any], list[str]]:
    """k world specs of one scene (one object, no effect), each changing the colour or the shape of the one before;
    and which of the two each switch changed ("" for the first)."""
    from dataclasses import replace

    from lvstudio.world import COLOURS, SHAPES, SceneSpec, sample_spec

    first = sample_spec(rng)
    specs, changed = [SceneSpec(first.scene, (first.primary,))], [""]
    while len(specs) < k:
        obj = specs[-1].primary
        if rng.random() < 0.5:
            colours = [c for c in COLOURS if c != obj.colour]
            obj, what = replace(obj, colour=colours[rng.integers(len(colours))]), "colour"
        else:
            shapes = [s for s in SHAPES if s != obj.shape]
            obj, what = replace(obj, shape=shapes[rng.integers(len(shapes))]), "shape"
        specs.append(SceneSpec(first.scene, (obj,)))
        changed.append(what)
    return specs, changed


def identity_specs(rng: np.random.Generator, m: int) -> tuple[str, list[str], list[Any]]:
    """The hero's prompt ("a big red ball"), m shot prompts naming {hero} and their resolved specs: one object, a
    new scene (never the one before) and a new motion each shot, no effect."""
    from dataclasses import replace

    from lvstudio.world import MOTIONS, SCENES, ObjectSpec, SceneSpec, sample_spec

    hero = sample_spec(rng).primary
    hero_text = " ".join(ObjectSpec(hero.colour, hero.shape, MOTIONS[0], hero.size).phrase().split()[:-2])
    specs: list[SceneSpec] = []
    while len(specs) < m:
        scene = SCENES[rng.integers(len(SCENES))]
        if specs and scene == specs[-1].scene:
            continue
        specs.append(SceneSpec(scene, (replace(hero, motion=MOTIONS[rng.integers(len(MOTIONS))]),)))
    prompts = ["{hero} " + s.caption().removeprefix(hero_text + " ") for s in specs]
    return hero_text, prompts, specs


# -- rendering ------------------------------------------------------------------------------------------------------
def render_shots(bundle: Any, backend: str, shots: list[tuple[float, str, str]], seed: int, blocks: int,
                 identities: dict[str, str] | None = None) -> Rendered:
    """Render (at seconds, prompt, transition) shots until `blocks` whole blocks are made."""
    import torch

    from lvstudio.backends import make_backend
    from lvstudio.caches import IdentityCache
    from lvstudio.prompt_stream import PromptStreamBuffer

    p = bundle.preset
    ids = IdentityCache()
    for name, prompt in (identities or {}).items():
        ids.add(name, prompt)
    buffer = PromptStreamBuffer(bundle.text.encode, ids, block_latents=p.attention.block_frames, fps=p.fps)
    for i, (at, prompt, transition) in enumerate(shots):
        buffer.add_shot(at, prompt, transition, shot=i)
    be = make_backend(backend, bundle, buffer, seed=seed, width=p.width, height=p.height)
    need = block_start_frame(blocks, p.attention.block_frames)
    out, frames = Rendered(np.zeros(0)), []
    with torch.no_grad():
        while sum(f.shape[0] for f in frames) < need:
            t0 = time.perf_counter()
            chunk = be.step()
            out.seconds.append(time.perf_counter() - t0)
            frames.append(chunk.frames)
            out.blocks.append(chunk.block)
            out.new_shot.append(chunk.new_shot)
            out.switched.append(chunk.switched)
            out.latents.append(chunk.latents)
    out.frames = np.concatenate(frames)[:need]
    return out


def _span(frames: np.ndarray, b0: int, b1: int, n: int) -> np.ndarray:
    """Frames of blocks [b0, b1)."""
    return frames[block_start_frame(b0, n) : block_start_frame(b1, n)]


def _adherence(frames: np.ndarray, spec: Any) -> dict[str, float]:
    from lvstudio.world.oracle import adherence

    return {k: float(v) for k, v in adherence(frames, spec).items()}


def _mean(rows: list[dict[str, float]], keys: tuple[str, ...] = KEYS) -> dict[str, float]:
    return {k: float(np.mean([r[k] for r in rows])) for k in keys}


# -- measurements ---------------------------------------------------------------------------------------------------
def _continuity(frames: np.ndarray, starts: list[int]) -> tuple[float, float]:
    """Mean |frame difference| across the given shot-start frames, and between consecutive frames inside shots."""
    x = frames.astype(np.float32) / 255.0
    diffs = np.abs(np.diff(x, axis=0)).mean(axis=(1, 2, 3))  # diffs[i]: frame i -> i + 1
    across = [diffs[s - 1] for s in starts]
    inside = np.delete(diffs, [s - 1 for s in starts])
    return float(np.mean(across)), float(np.mean(inside))


def _response(frames: np.ndarray, bounds: list[int], specs: list[Any], changed: list[str], n: int,
              target: dict[str, float]) -> tuple[dict[str, list[float]], dict[str, int | None]]:
    """Per block after each switch, the adherence of the attribute it changed (mean over the switches that changed
    it); the first block where that reaches RESPONSE_FRACTION of `target` (None: not within the shortest shot)."""
    length = min(b1 - b0 for b0, b1 in zip(bounds[1:], bounds[2:], strict=False))
    curve: dict[str, list[float]] = {}
    for key in ("colour", "shape"):
        rows = [[_adherence(_span(frames, b0 + j, b0 + j + 1, n), spec)[key] for j in range(length)]
                for b0, spec, what in zip(bounds, specs, changed, strict=False) if what == key]
        if rows:
            curve[key] = [float(np.mean([r[j] for r in rows])) for j in range(length)]
    first = {k: next((j for j, v in enumerate(c) if v >= RESPONSE_FRACTION * target[k]), None)
             for k, c in curve.items()}
    return curve, first


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def decoder_restart(bundle: Any, cuts: Rendered, specs: list[Any], n: int) -> dict[str, float]:
    """Item 6 of the module doc, over every cut of the cut storyboard."""
    import torch

    from lvstudio.backends.base import to_uint8_frames

    vae = bundle.vae
    carried_dec = vae.streaming_decoder()  # the whole storyboard decoded without restarts
    rows: list[dict[str, float]] = []
    shot = 0
    with torch.no_grad():
        for z, new in zip(cuts.latents, cuts.new_shot, strict=True):
            z = z.to(bundle.device)
            carried = to_uint8_frames(carried_dec.decode(z))
            if not new:
                continue
            shot += 1
            first = z[:, :, :n]  # the new shot's first block
            restart_dec, warm_dec = vae.streaming_decoder(), vae.streaming_decoder()
            restart_dec.new_shot()
            restart = to_uint8_frames(restart_dec.decode(first))
            warm_dec.decode(first[:, :, :1])
            warm = to_uint8_frames(warm_dec.decode(first))
            got = {"restart": restart, "carried": carried[: 4 * n]}
            row: dict[str, float] = {}
            for name, frames in got.items():
                row[f"{name}_psnr_first4"] = _psnr(frames[:4], warm[:4])
                row[f"{name}_psnr_rest"] = _psnr(frames[4:], warm[4:])
            for name, frames in {**got, "warm": warm}.items():
                score = _adherence(frames[:4], specs[shot])
                row[f"{name}_scene_first4"], row[f"{name}_colour_first4"] = score["scene"], score["colour"]
            rows.append(row)
    return _mean(rows, tuple(rows[0]))


def _latency(r: Rendered, flag: list[bool]) -> float:
    """Mean wall time of the flagged chunks over the median chunk of the render."""
    at = [s for s, f in zip(r.seconds, flag, strict=True) if f]
    return float(np.mean(at) / np.median(r.seconds)) if at else float("nan")


# -- one backend ----------------------------------------------------------------------------------------------------
def _shot_bounds(cfg: TransitionsConfig, k: int, n: int, fps: int) -> tuple[list[float], list[int]]:
    """Shot start times and their blocks (plus the block where a next shot would start) for k shots of S seconds."""
    ats = [i * cfg.seconds for i in range(k)]
    return ats, [block_at_frame(round(at * fps), n) for at in [*ats, k * cfg.seconds]]


def _from_scratch(bundle: Any, backend: str, specs: list[Any], bounds: list[int], seed: int,
                  ) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """Each spec's caption rendered alone for its shot's blocks: adherence from the second block on, and whole."""
    n = bundle.preset.attention.block_frames
    later, whole = [], []
    for spec, b0, b1 in zip(specs, bounds, bounds[1:], strict=False):
        frames = render_shots(bundle, backend, [(0.0, spec.caption(), "cut")], seed, b1 - b0).frames
        later.append(_adherence(_span(frames, 1, b1 - b0, n), spec))
        whole.append(_adherence(frames, spec))
    return later, whole


def _storyboard(bundle: Any, backend: str, ats: list[float], specs: list[Any], transition: str, blocks: int,
                seed: int) -> Rendered:
    shots = [(at, s.caption(), "cut" if i == 0 else transition)
             for i, (at, s) in enumerate(zip(ats, specs, strict=True))]
    return render_shots(bundle, backend, shots, seed, blocks)


def _per_shot(frames: np.ndarray, bounds: list[int], specs: list[Any], n: int, skip: int) -> list[dict[str, float]]:
    """Adherence of each shot from its block `skip` on."""
    return [_adherence(_span(frames, b0 + skip, b1, n), s)
            for b0, b1, s in zip(bounds, bounds[1:], specs, strict=False)]


def evaluate_backend(bundle: Any, backend: str, cfg: TransitionsConfig,
                     log: Callable[[str], None] = lambda _m: None) -> BackendReport:
    """Items 1-6 of the module doc for one backend."""
    t_start = time.perf_counter()
    p = bundle.preset
    n, fps, seed = p.attention.block_frames, p.fps, cfg.seed
    rng = np.random.default_rng(cfg.seed)
    specs = unrelated_specs(rng, cfg.prompts)
    related, changed = related_specs(rng, cfg.prompts)
    ats, bounds = _shot_bounds(cfg, cfg.prompts, n, fps)
    # Step 1: from scratch, each prompt as long as its shot.
    log(f"{backend}: {cfg.prompts} unrelated prompts from scratch")
    scratch_later, scratch_whole = _from_scratch(bundle, backend, specs, bounds, seed)
    other_seed, _ = _from_scratch(bundle, backend, specs, bounds, seed + 1)
    # Step 2: the unrelated prompts joined by cuts, and by switches (what a cut did before).
    log(f"{backend}: the unrelated prompts joined by cuts, then by switches")
    cuts = _storyboard(bundle, backend, ats, specs, "cut", bounds[-1], seed)
    unrelated_switch = _storyboard(bundle, backend, ats, specs, "switch", bounds[-1], seed)
    cut_later = _per_shot(cuts.frames, bounds, specs, n, 1)
    independence = _independence(bundle, backend, ats, specs, bounds, seed, cuts.frames)
    # Step 3: the switch chain, joined by switches and from scratch.
    log(f"{backend}: the switch chain, from scratch and joined by switches")
    related_later, related_whole = _from_scratch(bundle, backend, related, bounds, seed)
    switches = _storyboard(bundle, backend, ats, related, "switch", bounds[-1], seed)
    starts = [block_start_frame(b, n) for b in bounds[1:-1]]
    across, inside = _continuity(switches.frames, starts)
    cut_across, cut_inside = _continuity(cuts.frames, starts)
    target = _mean(related_later)
    curve, first = _response(switches.frames, bounds[1:], related[1:], changed[1:], n, target)
    # Step 4: identities across cuts.
    log(f"{backend}: {cfg.identity_shots} shots naming {{hero}}")
    hero, identity = _identity(bundle, backend, cfg, rng)
    return BackendReport(
        backend=backend, preset=p.name, config=asdict(cfg), prompts=[s.caption() for s in specs],
        related=[s.caption() for s in related], scratch=_mean(scratch_later), scratch_other_seed=_mean(other_seed),
        scratch_whole=_mean(scratch_whole),
        cut=_mean(cut_later), cut_whole=_mean(_per_shot(cuts.frames, bounds, specs, n, 0)),
        cut_per_shot=[{k: r[k] - q[k] for k in KEYS} for r, q in zip(cut_later, scratch_later, strict=True)],
        independence=independence,
        unrelated_switch_whole=_mean(_per_shot(unrelated_switch.frames, bounds, specs, n, 0)),
        related_scratch_whole=_mean(related_whole),
        related_switch_whole=_mean(_per_shot(switches.frames, bounds, related, n, 0)),
        continuity={"switch_across": across, "switch_inside": inside, "switch_ratio": across / inside,
                    "cut_across": cut_across, "cut_inside": cut_inside, "cut_ratio": cut_across / cut_inside},
        response_curve=curve, response_target={k: target[k] for k in curve}, response_blocks=first,
        hero=hero, identity=identity,
        # Steps 5-6: latency and the decoder restart.
        latency={"cut": _latency(cuts, cuts.new_shot), "switch": _latency(switches, switches.switched)},
        decoder=decoder_restart(bundle, cuts, specs, n), wall_seconds=time.perf_counter() - t_start,
    )


def _independence(bundle: Any, backend: str, ats: list[float], specs: list[Any], bounds: list[int], seed: int,
                  a: np.ndarray) -> dict[str, float]:
    """Item 2's check of the cut itself: the cut storyboard (frames `a`) again with every even shot replaced by
    another prompt; the odd shots keep their blocks and noise but not their predecessor. |pixel difference| of the
    odd shots."""
    n = bundle.preset.attention.block_frames
    others = unrelated_specs(np.random.default_rng(seed + 7), len(specs))
    mixed = [o if i % 2 == 0 else s for i, (s, o) in enumerate(zip(specs, others, strict=True))]
    b = _storyboard(bundle, backend, ats, mixed, "cut", bounds[-1], seed).frames
    diffs = [np.abs(_span(a, b0, b1, n).astype(np.int16) - _span(b, b0, b1, n).astype(np.int16))
             for i, (b0, b1) in enumerate(zip(bounds, bounds[1:], strict=False)) if i % 2 == 1]
    return {"max": float(max(d.max() for d in diffs)), "mean": float(np.mean([d.mean() for d in diffs]))}


def _identity(bundle: Any, backend: str, cfg: TransitionsConfig,
              rng: np.random.Generator) -> tuple[str, dict[str, dict[str, float]]]:
    """Item 4: the hero's prompt, and its colour and shape adherence in the storyboard with cuts ("cut") and in each
    prompt from scratch ("scratch"), from each shot's second block on."""
    p = bundle.preset
    n, fps = p.attention.block_frames, p.fps
    hero, prompts, specs = identity_specs(rng, cfg.identity_shots)
    ats = [i * cfg.seconds for i in range(cfg.identity_shots)]
    bounds = [block_at_frame(round(at * fps), n) for at in [*ats, cfg.identity_shots * cfg.seconds]]
    story = render_shots(bundle, backend, [(at, pr, "cut") for at, pr in zip(ats, prompts, strict=True)],
                         cfg.seed, bounds[-1], {"hero": hero})
    rows, refs = [], []
    for b0, b1, spec in zip(bounds, bounds[1:], specs, strict=False):
        rows.append(_adherence(_span(story.frames, b0 + 1, b1, n), spec))
        ref = render_shots(bundle, backend, [(0.0, spec.caption(), "cut")], cfg.seed, b1 - b0).frames
        refs.append(_adherence(_span(ref, 1, b1 - b0, n), spec))
    keys = ("colour", "shape")
    return hero, {"scratch": _mean(refs, keys), "cut": _mean(rows, keys)}


def save_reports(reports: list[BackendReport], path: Path) -> Path:
    """The reports as JSON (atomic)."""
    from lvstudio.atomic import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps([asdict(r) for r in reports], indent=1, default=float))
    return path
