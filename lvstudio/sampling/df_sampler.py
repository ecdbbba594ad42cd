"""SkyReels-V2 Diffusion Forcing sampling over a velocity model, as a resumable stream of finished latent frames.

Reproduces the denoising of diffusers' `SkyReelsV2DiffusionForcingPipeline` (and its image-to-video and
video-to-video variants) over any `denoise_fn(x [B, C, F, H, W], t [B, F]) -> v`:

    timeline of L latent frames (None = unbounded), cut into segments of at most W = (base_num_frames - 1)//4 + 1
    latents; segment k > 0 starts O = (overlap_history - 1)//4 + 1 latents before the end of the timeline so far
    and carries those O latents (cut down to a multiple of the causal block) as its clean prefix.

    per segment:  noise [B, C, F_k, H, W] from `generator`; prefix frames overwritten with the carried latents;
                  one UniPC solver per latent frame; the timestep matrix of `skyreels_timestep_matrix`
                  (ar_step, causal_block_size, num_pre_ready = prefix)
    per iteration i:
        1. model input = the segment's frames in valid_interval[i], timesteps = step_matrix[i] there
        2. addnoise_condition: prefix frames of the input re-noised to t = a (x·(1 − a/1000) + ε·a/1000)
        3. v = denoise_fn(input, timesteps)
        4. every frame in update_mask[i] takes one step of its own solver
        5. frames whose last update this was are final: they are emitted (in timeline order) as `DFChunk`s

The first segment's prefix is the caller's: an image latent (image-to-video, never cut) or the latents of the last
`overlap_history` frames of a video (video-to-video, cut to the block size like a carried prefix, and part of the
output as in diffusers). Each segment is fed to the model whole (diffusers passes the segment length as the window),
with RoPE positions starting at 0.

`SkyReelsDFSampler` holds all state explicitly (segment, iteration, latents, solvers, carried history), takes one
model call per `step(denoise_fn)` — so the caller may change the conditioning between any two calls — and can be
snapshotted with `state_dict()` / `load_state_dict()` between steps.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lvstudio.sampling.flow_matching import unipc_flow_schedule
from lvstudio.sampling.samplers import DenoiseFn, UniPCSolver
from lvstudio.sampling.schedules import addnoise_condition, skyreels_timestep_matrix

PrefixKind = Literal["image", "video"]
VAE_TEMPORAL_STRIDE = 4  # pixel frames per latent frame (after the first) in the Wan VAE


def latent_frames(num_frames: int, stride: int = VAE_TEMPORAL_STRIDE) -> int:
    """Latent frames of a clip of `num_frames` pixel frames: (num_frames - 1)//stride + 1."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1 (got {num_frames})")
    return (num_frames - 1) // stride + 1


def round_pixel_frames(num_frames: int, stride: int = VAE_TEMPORAL_STRIDE) -> int:
    """diffusers' rounding of a pixel frame count to the form stride·k + 1 (down), at least 1."""
    if num_frames % stride != 1:
        num_frames = num_frames // stride * stride + 1
    return max(num_frames, 1)


# ---------------------------------------------------------------------------------------------------------------
# Settings and the segment plan
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DFSettings:
    """SkyReels-V2 DF sampling settings (pixel-frame counts as in the pipelines; defaults = the 540P upstream CLI)."""

    num_steps: int = 30
    shift: float = 8.0
    base_num_frames: int = 97  # pixel frames per segment: the model's window (121 for 720P)
    ar_step: int = 0  # 0 = synchronous; > 0 = block i trails block i - 1 by ar_step steps
    causal_block_size: int = 1  # latent frames per block; every segment length must be a multiple
    overlap_history: int | None = None  # pixel frames carried between segments (17 or 37); needed past the window
    addnoise_condition: float = 0.0  # timestep of the noise put back on carried frames (20 recommended, <= 60)

    def __post_init__(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be >= 1 (got {self.num_steps})")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0 (got {self.shift})")
        if self.base_num_frames < 1:
            raise ValueError(f"base_num_frames must be >= 1 (got {self.base_num_frames})")
        if self.ar_step < 0:
            raise ValueError(f"ar_step must be >= 0 (got {self.ar_step})")
        if self.causal_block_size < 1:
            raise ValueError(f"causal_block_size must be >= 1 (got {self.causal_block_size})")
        if self.overlap_history is not None and self.overlap_history < 1:
            raise ValueError(f"overlap_history must be >= 1 pixel frame (got {self.overlap_history})")
        if not 0.0 <= self.addnoise_condition <= 1000.0:
            raise ValueError(f"addnoise_condition is a timestep in [0, 1000] (got {self.addnoise_condition})")
        if self.overlap_history is not None and self.overlap_latents >= self.base_latents:
            raise ValueError(
                f"overlap_history={self.overlap_history} ({self.overlap_latents} latents) must be shorter than "
                f"base_num_frames={self.base_num_frames} ({self.base_latents} latents)"
            )

    @property
    def base_latents(self) -> int:
        """W: latent frames per segment."""
        return latent_frames(self.base_num_frames)

    @property
    def overlap_latents(self) -> int:
        """O: latent frames carried into the next segment (0 without overlap_history)."""
        return 0 if self.overlap_history is None else latent_frames(self.overlap_history)

    @property
    def carried_prefix(self) -> int:
        """Clean prefix of segments after the first: O cut down to a multiple of the causal block."""
        return self.overlap_latents - self.overlap_latents % self.causal_block_size


@dataclass(frozen=True)
class DFSegment:
    """One segment of the timeline (latent frames)."""

    index: int
    start: int  # timeline index of the segment's first latent
    num_frames: int  # latents in the segment, prefix included
    prefix: int  # clean conditioning latents at its start (the matrix's num_pre_ready)
    emit_from: int  # first frame of the segment that joins the output (0 for the first segment, else O)

    @property
    def end(self) -> int:
        return self.start + self.num_frames


def plan_segment(settings: DFSettings, num_latents: int | None, index: int, first_prefix: int = 0,
                 first_prefix_kind: PrefixKind | None = None, long_video: bool | None = None) -> DFSegment | None:
    """Geometry of segment `index`, or None past the last one (diffusers' arithmetic; num_latents None = unbounded).

    long_video: whether the timeline is cut into overlapping segments. None means diffusers' text-/image-to-video
    rule (longer than the window); video-to-video always uses the long-video arithmetic.
    """
    w, o = settings.base_latents, settings.overlap_latents
    if long_video is None:
        long_video = num_latents is None or num_latents > w
    if long_video and settings.overlap_history is None:
        raise ValueError(
            f"overlap_history is required when the video is longer than base_num_frames={settings.base_num_frames} "
            "(and for video-to-video); 17 or 37 are recommended"
        )
    if index < 0:
        raise ValueError(f"segment index must be >= 0 (got {index})")
    if not long_video:
        if index > 0:
            return None
        frames = int(num_latents)  # type: ignore[arg-type]  # not long => bounded
        prefix = _first_prefix(settings, first_prefix, first_prefix_kind)
        return DFSegment(0, 0, frames, prefix, 0)
    if num_latents is not None:
        n_iter = 1 + (num_latents - w - 1) // (w - o) + 1
        if n_iter < 1:
            raise ValueError(f"{num_latents} latent frames are too few for overlap_history={settings.overlap_history}"
                             f" ({o} latents): the video must be longer than its overlap")
        if index >= n_iter:
            return None
    start = index * (w - o)
    frames = w if num_latents is None else min(num_latents - start, w)
    if index == 0:
        return DFSegment(0, 0, frames, _first_prefix(settings, first_prefix, first_prefix_kind), 0)
    return DFSegment(index, start, frames, settings.carried_prefix, o)


def _first_prefix(settings: DFSettings, first_prefix: int, kind: PrefixKind | None) -> int:
    if first_prefix and kind == "video":
        return first_prefix - first_prefix % settings.causal_block_size  # cut like a carried prefix
    return first_prefix


def plan_segments(settings: DFSettings, num_latents: int, first_prefix: int = 0,
                  first_prefix_kind: PrefixKind | None = None, long_video: bool | None = None) -> list[DFSegment]:
    """Every segment of a bounded timeline."""
    out: list[DFSegment] = []
    while (seg := plan_segment(settings, num_latents, len(out), first_prefix, first_prefix_kind, long_video)):
        out.append(seg)
    return out


@dataclass(frozen=True)
class DFSchedule:
    """The timestep matrix of one segment and, per frame, the iterations of its first and last update."""

    step_matrix: Tensor  # [iters, F] int64 model timesteps
    update_mask: Tensor  # [iters, F] bool: frames stepped by their solver at each iteration
    intervals: list[tuple[int, int]]  # per iteration: the (start, end) frames fed to the model
    first_at: list[int]  # per frame: first iteration that updates it (-1: never, a clean prefix frame)
    final_at: list[int]  # per frame: last iteration that updates it (-1: never)

    @property
    def num_iterations(self) -> int:
        return int(self.step_matrix.shape[0])

    def entering(self, iteration: int) -> range:
        """Frames whose first update happens at `iteration` (they enter the model as pure noise)."""
        frames = [f for f, it in enumerate(self.first_at) if it == iteration]
        return range(frames[0], frames[-1] + 1) if frames else range(0)


def segment_schedule(settings: DFSettings, segment: DFSegment) -> DFSchedule:
    """diffusers' `generate_timestep_matrix` for a segment (window = the whole segment, as the pipelines pass it)."""
    cbs = settings.causal_block_size
    if segment.num_frames % cbs:
        raise ValueError(
            f"segment {segment.index} has {segment.num_frames} latent frames, "
            f"not a multiple of causal_block_size={cbs};"
            " choose num_frames / base_num_frames / overlap_history so that every segment divides (e.g. 97/17 with 5)"
        )
    _, template = unipc_flow_schedule(settings.num_steps, settings.shift)
    if len(template) > 1 and int(template[0]) == int(template[1]):
        # diffusers' scheduler would start such a frame at its second step and run off the end of its grid.
        raise ValueError(f"{settings.num_steps} steps at shift {settings.shift} repeat the first integer timestep "
                         f"({int(template[0])}); use fewer steps")
    matrix, _, mask, intervals = skyreels_timestep_matrix(
        segment.num_frames, template, segment.num_frames, settings.ar_step, segment.prefix, cbs
    )
    iters = torch.arange(mask.shape[0])[:, None].expand_as(mask)
    never = torch.full_like(iters, -1)
    final_at = torch.where(mask, iters, never).amax(dim=0)
    first_at = torch.where(mask, iters, torch.full_like(iters, mask.shape[0])).amin(dim=0)
    first_at = torch.where(mask.any(dim=0), first_at, never[0])
    return DFSchedule(matrix, mask, intervals, [int(v) for v in first_at], [int(v) for v in final_at])


@dataclass(frozen=True)
class SwitchLatency:
    """Effect of a prompt switch made just before global model call `call` (calls >= `call` see the new prompt)."""

    call: int
    emitted: int  # timeline latents already emitted before the switch
    first_new: int  # first output latent whose every update saw the new prompt (it enters at or after `call`)
    calls_until_visible: int  # model calls from the switch until `first_new` is final (emitted)

    @property
    def latent_frames(self) -> int:
        """Output latents emitted after the switch that still began under the old prompt."""
        return self.first_new - self.emitted


def switch_latencies(settings: DFSettings, num_latents: int, first_prefix: int = 0,
                     first_prefix_kind: PrefixKind | None = None) -> list[SwitchLatency]:
    """For every model call of a bounded run: how late a prompt switched just before it fully takes effect.

    A model call sees one prompt for its whole window, so frames already denoising keep part of the old prompt;
    the first fully switched frame is the first output frame that enters the model after the switch. Switches whose
    first fully switched frame would lie past the end of the video are left out.
    """
    # Step 1: per output latent, the global call of its first and of its last update.
    first_call: dict[int, int] = {}
    final_call: dict[int, int] = {}
    offset = 0
    for seg in plan_segments(settings, num_latents, first_prefix, first_prefix_kind):
        sched = segment_schedule(settings, seg)
        for f in range(seg.emit_from, seg.num_frames):
            first_call[seg.start + f] = offset + sched.first_at[f] if sched.first_at[f] >= 0 else -1
            final_call[seg.start + f] = offset + max(sched.final_at[f], 0)
        offset += sched.num_iterations
    # Step 2: for a switch before each call, the first latent entering at or after it and what was emitted before.
    out: list[SwitchLatency] = []
    frames = sorted(first_call)
    for call in range(offset):
        emitted = sum(1 for f in frames if final_call[f] < call)
        new = [f for f in frames if first_call[f] >= call]
        if not new:
            break
        first_new = new[0]
        out.append(SwitchLatency(call, emitted, first_new, final_call[first_new] - call + 1))
    return out


# ---------------------------------------------------------------------------------------------------------------
# The sampler
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DFChunk:
    """Finished latent frames [start, start + n) of the timeline."""

    start: int
    latents: Tensor  # [B, C, n, H, W]
    segment: int
    iteration: int  # the segment's iteration after which they were final

    @property
    def num_frames(self) -> int:
        return int(self.latents.shape[2])


@dataclass(frozen=True)
class DFStep:
    """What the next `step()` will do (for conditioning choices and progress displays)."""

    segment: int
    iteration: int  # within the segment
    num_iterations: int  # of the segment
    window: range  # timeline frames fed to the model
    entering: range  # timeline frames that start denoising at this call
    timesteps: Tensor  # [window] int64
    updating: tuple[int, ...] = ()  # timeline frames that take a solver step at this call (their output counts)


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Gaussian noise drawn where the generator lives (a CPU generator also serves CUDA), like diffusers."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)


class SkyReelsDFSampler:
    """A SkyReels-V2 DF run as an explicit state machine; see the module docstring.

    latent_shape: (B, C, H, W) of the latents. num_latents: timeline length (None = unbounded; needs overlap_history).
    prefix: [B, C, n, H, W] clean latents for the start of the first segment (image or video latents).
    generator: the segment noise (diffusers' `generator`). condition_generator: the addnoise_condition noise
    (None = torch's global generator, which is what diffusers uses).
    """

    def __init__(
        self,
        settings: DFSettings,
        latent_shape: tuple[int, int, int, int],
        num_latents: int | None,
        *,
        prefix: Tensor | None = None,
        prefix_kind: PrefixKind | None = None,
        generator: torch.Generator | None = None,
        condition_generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if num_latents is not None and num_latents < 1:
            raise ValueError(f"num_latents must be >= 1 (got {num_latents})")
        if prefix is not None:
            b, c, h, w = latent_shape
            if prefix.ndim != 5 or (prefix.shape[0], prefix.shape[1], prefix.shape[3], prefix.shape[4]) != (b, c, h, w):
                raise ValueError(f"prefix must be [B, C, n, H, W] = [{b}, {c}, n, {h}, {w}], got {tuple(prefix.shape)}")
            if prefix_kind not in ("image", "video"):
                raise ValueError(f"prefix_kind must be 'image' or 'video' with a prefix (got {prefix_kind!r})")
        self.settings = settings
        self.latent_shape = latent_shape
        self.num_latents = num_latents
        self.device = torch.device(device)
        self.generator = generator
        self.condition_generator = condition_generator
        self.prefix_kind = prefix_kind if prefix is not None else None
        self._first_prefix = None if prefix is None else prefix.to(self.device, torch.float32)
        self._long = True if self.prefix_kind == "video" else None
        n_first = 0 if prefix is None else int(prefix.shape[2])
        self._first_len = n_first
        self._sigmas, _ = unipc_flow_schedule(settings.num_steps, settings.shift)
        first = self.segment_plan(0)
        if first is None or first.prefix >= first.num_frames:
            raise ValueError("the prefix covers the whole first segment: nothing is left to generate")
        # Explicit state (everything a snapshot needs).
        self.segment_index = 0
        self.iteration = 0  # next iteration of the current segment
        self.latents: Tensor | None = None  # [B, C, F_seg, H, W] the current segment, None until it starts
        self.solvers: list[UniPCSolver] = []
        self.history: Tensor | None = None  # [B, C, <=O, H, W] the last O timeline latents of finished segments
        self.emitted = 0  # timeline frames emitted so far
        self._segment: DFSegment | None = None
        self._schedule: DFSchedule | None = None

    # -- plan -------------------------------------------------------------------------------------------------------
    def segment_plan(self, index: int) -> DFSegment | None:
        return plan_segment(self.settings, self.num_latents, index, self._first_len, self.prefix_kind, self._long)

    @property
    def input_latents(self) -> int:
        """Leading timeline latents that are the caller's video (video-to-video output starts with them)."""
        if self.prefix_kind != "video":
            return 0
        seg = self.segment_plan(0)
        return seg.prefix if seg is not None else 0

    @property
    def done(self) -> bool:
        return self._current() is None

    def _current(self) -> tuple[DFSegment, DFSchedule] | None:
        if self._segment is None or self._segment.index != self.segment_index:
            seg = self.segment_plan(self.segment_index)
            if seg is None:
                return None
            self._segment, self._schedule = seg, segment_schedule(self.settings, seg)
        assert self._schedule is not None  # set together with _segment
        return self._segment, self._schedule

    def peek(self) -> DFStep | None:
        """The next model call, or None when the run is complete."""
        cur = self._current()
        if cur is None:
            return None
        seg, sched = cur
        s, e = sched.intervals[self.iteration]
        ent = sched.entering(self.iteration)
        entering = range(seg.start + ent.start, seg.start + ent.stop) if ent else range(0)
        mask = sched.update_mask[self.iteration]
        updating = tuple(seg.start + f for f in range(s, e) if bool(mask[f]))
        return DFStep(seg.index, self.iteration, sched.num_iterations, range(seg.start + s, seg.start + e),
                      entering, sched.step_matrix[self.iteration, s:e], updating)

    # -- stepping ---------------------------------------------------------------------------------------------------
    def _start_segment(self, seg: DFSegment) -> None:
        b, c, h, w = self.latent_shape
        # Step 1: fresh noise for the whole segment, then the clean prefix over its first frames.
        latents = _randn((b, c, seg.num_frames, h, w), self.generator, self.device)
        if seg.index == 0:
            if self._first_prefix is not None:
                latents[:, :, : seg.prefix] = self._first_prefix[:, :, : seg.prefix]
        elif seg.prefix:
            if self.history is None or self.history.shape[2] < self.settings.overlap_latents:
                raise ValueError("internal: the carried history is shorter than the overlap")
            latents[:, :, : seg.prefix] = self.history[:, :, : seg.prefix]
        # Step 2: one UniPC solver per latent frame, all on the same σ grid.
        self.latents = latents
        self.solvers = [UniPCSolver(self._sigmas) for _ in range(seg.num_frames)]
        self.iteration = 0

    def step(self, denoise_fn: DenoiseFn) -> list[DFChunk]:
        """One model call; returns the chunks that became final (possibly none)."""
        cur = self._current()
        if cur is None:
            raise ValueError("the run is complete: no segment left to denoise")
        seg, sched = cur
        if self.latents is None:
            self._start_segment(seg)
        latents = self.latents
        assert latents is not None  # set by _start_segment
        i = self.iteration
        s, e = sched.intervals[i]
        b = latents.shape[0]
        # Step 1: model input for the window and its per-frame timesteps [B, e - s].
        x_in = latents[:, :, s:e].clone()
        t_in = sched.step_matrix[i, s:e].to(self.device)[None].expand(b, -1).clone()
        # Step 2: re-noise the carried prefix lightly (addnoise_condition).
        a = self.settings.addnoise_condition
        if a > 0 and s < seg.prefix:
            x_in, t_noised = addnoise_condition(x_in, seg.prefix - s, a, self.condition_generator, t_in)
            t_in = t_in if t_noised is None else t_noised  # int64: a is truncated like diffusers' assignment
        # Step 3: the model.
        v = denoise_fn(x_in, t_in.to(torch.float32))  # [B, C, e - s, H, W]
        if v.shape != x_in.shape:
            raise ValueError(f"denoise_fn returned {tuple(v.shape)}, expected {tuple(x_in.shape)}")
        # Step 4: each updated frame takes one step of its own solver.
        mask = sched.update_mask[i]
        for f in range(s, e):
            if bool(mask[f]):
                latents[:, :, f] = self.solvers[f].step(v[:, :, f - s], latents[:, :, f])
        # Step 5: emit the frames that became final, in timeline order.
        self.iteration += 1
        chunks = self._emit(seg, sched, i)
        if self.iteration == sched.num_iterations:
            self._finish_segment(seg)
        return chunks

    def _emit(self, seg: DFSegment, sched: DFSchedule, iteration: int) -> list[DFChunk]:
        assert self.latents is not None
        lo = max(self.emitted - seg.start, seg.emit_from)
        hi = lo
        while hi < seg.num_frames and sched.final_at[hi] <= iteration:
            hi += 1
        if hi == lo:
            return []
        self.emitted = seg.start + hi
        return [DFChunk(seg.start + lo, self.latents[:, :, lo:hi].clone(), seg.index, iteration)]

    def _finish_segment(self, seg: DFSegment) -> None:
        assert self.latents is not None
        o = self.settings.overlap_latents
        new = self.latents[:, :, seg.emit_from :]
        tail = new if self.history is None else torch.cat([self.history, new], dim=2)
        self.history = tail[:, :, max(tail.shape[2] - o, 0) :].clone() if o else None
        self.latents = None
        self.solvers = []
        self.segment_index += 1
        self.iteration = 0

    def chunks(self, denoise_fn: DenoiseFn) -> Iterator[DFChunk]:
        """Run to the end (or forever when unbounded), yielding chunks as they become final."""
        while not self.done:
            yield from self.step(denoise_fn)

    # -- snapshots ----------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (safetensors-friendly): position, latents, solvers, history, generator states."""
        state: dict[str, Tensor] = {
            "segment": torch.tensor(self.segment_index),
            "iteration": torch.tensor(self.iteration),
            "emitted": torch.tensor(self.emitted),
        }
        if self.latents is not None:
            state["latents"] = self.latents.detach().clone()
            for f, solver in enumerate(self.solvers):
                for key, value in solver.state_dict().items():
                    state[f"solver.{f}.{key}"] = value
        if self.history is not None:
            state["history"] = self.history.detach().clone()
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        if self.condition_generator is not None:
            state["condition_generator"] = self.condition_generator.get_state()
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Resume from `state_dict()` (same settings, shapes and prefix)."""
        self.segment_index = int(state["segment"])
        self.iteration = int(state["iteration"])
        self.emitted = int(state["emitted"])
        self.history = state["history"].to(self.device) if "history" in state else None
        self.latents, self.solvers = None, []
        if "latents" in state:
            self.latents = state["latents"].to(self.device).clone()
            n = self.latents.shape[2]
            self.solvers = [UniPCSolver(self._sigmas) for _ in range(n)]
            for f, solver in enumerate(self.solvers):
                prefix = f"solver.{f}."
                solver.load_state_dict({k[len(prefix):]: v.to(self.device) for k, v in state.items()
                                        if k.startswith(prefix)})
        if self.generator is not None and "generator" in state:
            self.generator.set_state(state["generator"])
        if self.condition_generator is not None and "condition_generator" in state:
            self.condition_generator.set_state(state["condition_generator"])
        self._segment = self._schedule = None
