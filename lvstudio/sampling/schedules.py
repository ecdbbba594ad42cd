"""Diffusion-forcing schedules: which noise level every frame has at every model call.

- Original Diffusion Forcing matrices (integer levels 0..S, S = pure noise, 0 = clean): full sequence, pyramid,
  autoregressive. Row m is the level of each frame before call m + 1; one call moves row m → row m + 1.
- SkyReels-V2 `generate_timestep_matrix` (timesteps from a UniPC step template, per-frame update masks, sliding
  valid windows) and its `addnoise_condition` prefix re-noising.
- StreamDiT's moving buffer partition (N chunks × c frames, s micro-steps per shift) and Rolling Forcing's window
  of W blocks ordered clean → noisy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from lvstudio.sampling.flow_matching import sigma_grid

# ---------------------------------------------------------------------------------------------------------------
# Original Diffusion Forcing (integer levels)
# ---------------------------------------------------------------------------------------------------------------


def _check_frames_levels(num_frames: int, num_levels: int) -> None:
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1 (got {num_frames})")
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1 (got {num_levels})")


def full_sequence_matrix(num_frames: int, num_levels: int) -> Tensor:
    """[S + 1, F] int64: every frame at level S − m in row m (standard full-sequence diffusion)."""
    _check_frames_levels(num_frames, num_levels)
    levels = torch.arange(num_levels, -1, -1, dtype=torch.int64)  # [S + 1]
    return levels[:, None].repeat(1, num_frames)


def pyramid_matrix(num_frames: int, num_levels: int, uncertainty_scale: float) -> Tensor:
    """[S + int((F − 1)·u) + 1, F] int64 with M[m, f] = clip(S + int(f·u) − m, 0, S).

    Frame f stays int(f·u) levels noisier than frame 0 (u = "causal uncertainty" slope).
    """
    _check_frames_levels(num_frames, num_levels)
    if uncertainty_scale < 0:
        raise ValueError(f"uncertainty_scale must be >= 0 (got {uncertainty_scale})")
    offsets = torch.tensor([int(f * uncertainty_scale) for f in range(num_frames)], dtype=torch.int64)  # [F]
    rows = num_levels + int((num_frames - 1) * uncertainty_scale) + 1
    m = torch.arange(rows, dtype=torch.int64)[:, None]  # [rows, 1]
    return (num_levels + offsets[None, :] - m).clamp(0, num_levels)


def autoregressive_matrix(num_frames: int, num_levels: int) -> Tensor:
    """Pyramid with u = S: frame f starts denoising only once frame f − 1 is clean."""
    return pyramid_matrix(num_frames, num_levels, float(num_levels))


def levels_to_sigmas(levels: Tensor, num_levels: int, shift: float = 1.0) -> Tensor:
    """Map integer levels 0..S to flow σ on an S-step grid: level k ↦ sigma_grid(S, shift)[S − k] (0 ↦ σ = 0)."""
    grid = sigma_grid(num_levels, shift).to(torch.float32)  # [S + 1], grid[0] = most noisy
    if levels.numel() and (int(levels.min()) < 0 or int(levels.max()) > num_levels):
        raise ValueError(f"levels must lie in [0, {num_levels}]")
    return grid.to(levels.device)[num_levels - levels.long()]


# ---------------------------------------------------------------------------------------------------------------
# SkyReels-V2 diffusion forcing
# ---------------------------------------------------------------------------------------------------------------


def skyreels_timestep_matrix(
    num_frames: int,
    step_template: Tensor,
    base_num_frames: int,
    ar_step: int = 0,
    num_pre_ready: int = 0,
    causal_block_size: int = 1,
    shrink_interval_with_mask: bool = False,
) -> tuple[Tensor, Tensor, Tensor, list[tuple[int, int]]]:
    """SkyReels-V2 / diffusers `generate_timestep_matrix`: (step_matrix, step_index, update_mask, valid_interval).

    step_template: N descending timesteps (e.g. `unipc_flow_schedule(30, 8)[1]`). Block state r ∈ 0..N+1 indexes
    [999] ‖ template ‖ [0] (0: not started, N + 1: finished). Each iteration every started block advances one step;
    block i trails block i − 1 by `ar_step` steps until its predecessor is fully denoised (ar_step 0: synchronous).
    The first `num_pre_ready` frames (a clean prefix) start finished. Returns int64 [iters, F] timesteps,
    int64 [iters, F] states, bool [iters, F] frames to update, and per iteration the (start, end) frame window
    (at most `base_num_frames` frames) to feed the model.

    shrink_interval_with_mask=True starts the window at the last block updated in the first iteration (the upstream
    flag is broken: it overwrites the mask list; here the full masks are kept).
    """
    # Step 1: validate (the reference asserts / raises here).
    steps = len(step_template)
    if steps < 1:
        raise ValueError("step_template must hold at least one timestep")
    if causal_block_size < 1:
        raise ValueError(f"causal_block_size must be >= 1 (got {causal_block_size})")
    if num_frames < causal_block_size or num_frames % causal_block_size:
        raise ValueError(
            f"num_frames={num_frames} must be a positive multiple of causal_block_size={causal_block_size}"
        )
    if base_num_frames < causal_block_size:
        raise ValueError(f"base_num_frames={base_num_frames} must be >= causal_block_size={causal_block_size}")
    if ar_step < 0 or num_pre_ready < 0:
        raise ValueError(f"ar_step and num_pre_ready must be >= 0 (got {ar_step}, {num_pre_ready})")
    num_blocks = num_frames // causal_block_size
    base_blocks = base_num_frames // causal_block_size
    if base_blocks < num_blocks and ar_step < steps / base_blocks:
        raise ValueError(
            f"`ar_step` should be at least {math.ceil(steps / base_blocks)} in your setting: {num_blocks} blocks do "
            f"not fit the {base_blocks}-block window, so blocks must be staggered by >= steps / window blocks"
        )
    ready_blocks = num_pre_ready // causal_block_size
    if ready_blocks >= num_blocks:
        raise ValueError(f"num_pre_ready={num_pre_ready} covers every frame: nothing left to denoise")

    # Step 2: block states per iteration.
    finished = steps + 1
    template = torch.cat(
        [
            torch.tensor([999], dtype=torch.int64),
            step_template.detach().to("cpu").long(),
            torch.tensor([0], dtype=torch.int64),
        ]
    )
    prev = [finished if i < ready_blocks else 0 for i in range(num_blocks)]  # plain ints: fast for long videos
    states: list[list[int]] = []
    masks: list[list[bool]] = []
    while not all(r >= steps for r in prev):
        new = [0] * num_blocks
        for i in range(num_blocks):
            if i == 0 or prev[i - 1] >= steps:
                new[i] = prev[i] + 1
            else:
                new[i] = new[i - 1] - ar_step
        new = [min(max(r, 0), finished) for r in new]
        masks.append([r != p and r != finished for r, p in zip(new, prev, strict=True)])
        states.append(new)
        prev = new

    # Step 3: sliding window of at most base_blocks blocks that follows the newest updated block.
    terminal = base_blocks
    if shrink_interval_with_mask:
        terminal = max(i for i, m in enumerate(masks[0]) if m) + 1
    intervals: list[tuple[int, int]] = []
    for mask in masks:
        if terminal < num_blocks and mask[terminal]:
            terminal += 1
        intervals.append((max(terminal - base_blocks, 0), terminal))

    # Step 4: stack and expand blocks to frames.
    step_index = torch.tensor(states, dtype=torch.int64)  # [iters, blocks]
    update_mask = torch.tensor(masks, dtype=torch.bool)
    step_matrix = template[step_index]
    if causal_block_size > 1:
        step_index = step_index.repeat_interleave(causal_block_size, dim=1)
        update_mask = update_mask.repeat_interleave(causal_block_size, dim=1)
        step_matrix = step_matrix.repeat_interleave(causal_block_size, dim=1)
        intervals = [(s * causal_block_size, e * causal_block_size) for s, e in intervals]
    return step_matrix, step_index, update_mask, intervals


@dataclass(frozen=True)
class HistorySegment:
    """One iteration of SkyReels' long-video loop (`overlap_history`), in latent frames."""

    start: int  # first latent of this segment in the whole video
    num_frames: int  # latents this segment's timestep matrix covers (prefix included)
    prefix: int  # clean conditioning latents from the previous segment (num_pre_ready)


def overlap_history_segments(num_frames: int, base_num_frames: int, overlap_history: int,
                             causal_block_size: int = 1) -> list[HistorySegment]:
    """SkyReels-V2 long video: split `num_frames` pixel frames into segments of at most `base_num_frames`, each after
    the first conditioned on the last `overlap_history` pixel frames of the video so far (re-encoded: the prefix is
    (overlap_history - 1) // 4 + 1 latents, cut down to a multiple of the causal block). Run
    `skyreels_timestep_matrix(seg.num_frames, ..., num_pre_ready=seg.prefix)` per segment.
    """
    if min(num_frames, base_num_frames, overlap_history, causal_block_size) < 1:
        raise ValueError("num_frames, base_num_frames, overlap_history and causal_block_size must be >= 1")
    lat, base = (num_frames - 1) // 4 + 1, (base_num_frames - 1) // 4 + 1
    ov = (overlap_history - 1) // 4 + 1
    if ov >= base:
        raise ValueError(f"overlap_history ({overlap_history} frames = {ov} latents) must be shorter than "
                         f"base_num_frames ({base_num_frames} frames = {base} latents)")
    if lat <= base:
        return [HistorySegment(0, lat, 0)]
    prefix = ov // causal_block_size * causal_block_size
    segments = [HistorySegment(0, base, 0)]
    n_iter = 1 + (lat - base - 1) // (base - ov) + 1
    for k in range(1, n_iter):
        finished = k * (base - ov) + ov  # latents done before segment k
        frames = min(lat - finished + ov, base)
        segments.append(HistorySegment(finished - ov, frames, prefix))
    return segments


def addnoise_condition(
    latents: Tensor,
    prefix_len: int,
    amount: float,
    generator: torch.Generator | None = None,
    timesteps: Tensor | None = None,
) -> tuple[Tensor, Tensor | None]:
    """SkyReels `addnoise_condition`: lightly re-noise the clean prefix frames of a model input.

    latents [B, C, F, H, W] (the window fed to the model; frames [0, prefix_len) are conditioning):
    x ← x·(1 − a/1000) + ε·a/1000 on those frames, and their timesteps (if given, [B, F]) are set to a.
    Returns new tensors; inputs are not modified. amount 0 returns them unchanged.
    """
    if latents.ndim != 5:
        raise ValueError(f"latents must be [B, C, F, H, W], got shape {tuple(latents.shape)}")
    if not 0 <= amount <= 1000:
        raise ValueError(f"amount must be a timestep in [0, 1000] (got {amount}); 20 is the recommended value")
    if prefix_len < 0:
        raise ValueError(f"prefix_len must be >= 0 (got {prefix_len})")
    p = min(prefix_len, latents.shape[2])
    if amount == 0 or p == 0:
        return latents, timesteps
    factor = 0.001 * amount
    out = latents.clone()
    prefix = out[:, :, :p]  # [B, C, p, H, W]
    gen_device = generator.device if generator is not None else latents.device
    eps = torch.randn(prefix.shape, generator=generator, device=gen_device, dtype=latents.dtype).to(latents.device)
    out[:, :, :p] = prefix * (1.0 - factor) + eps * factor
    new_t = None
    if timesteps is not None:
        new_t = timesteps.clone()
        new_t[:, :p] = amount
    return out, new_t


# ---------------------------------------------------------------------------------------------------------------
# StreamDiT moving buffer
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamPartition:
    """Steady-state noise layout of a StreamDiT buffer of N chunks × c frames (frame 0 = oldest, cleanest).

    Each of the s micro-steps is one model call over the whole buffer: frame f goes from `level_from[j, f]` to
    `level_to[j, f]` (levels count denoising steps done: 0 = pure noise, K = N·s = clean; σ likewise). After the
    last micro-step the first chunk is clean: frames `emit` are output, the buffer shifts left by c, and fresh
    noise fills positions `append`. Warm-up with p < N chunks present: use the last p·c columns.
    """

    num_chunks: int
    chunk_size: int
    micro_steps: int
    level_from: Tensor  # [s, N·c] int64
    level_to: Tensor  # [s, N·c] int64
    sigma_from: Tensor  # [s, N·c] float32
    sigma_to: Tensor  # [s, N·c] float32
    emit: range
    append: range

    @property
    def buffer_frames(self) -> int:
        return self.num_chunks * self.chunk_size

    @property
    def steps_per_frame(self) -> int:
        return self.num_chunks * self.micro_steps


def stream_partition_levels(
    num_chunks: int,
    chunk_size: int,
    micro_steps: int,
    shift: float = 1.0,
    sigmas: Sequence[float] | Tensor | None = None,
) -> StreamPartition:
    """StreamDiT partition (K = 0 reference frames, N chunks, c frames each, s micro-steps per shift).

    σ of level k is `sigmas[k]` (N·s + 1 descending values ending at 0) or `sigma_grid(N·s, shift)[k]`.
    c = B, s = K gives uniform diffusion; c = 1, s = 1 gives diagonal (FIFO) denoising.
    """
    if num_chunks < 1 or chunk_size < 1 or micro_steps < 1:
        raise ValueError(
            f"num_chunks, chunk_size and micro_steps must be >= 1 (got {num_chunks}, {chunk_size}, {micro_steps})"
        )
    total = num_chunks * micro_steps
    if sigmas is None:
        grid = sigma_grid(total, shift).to(torch.float32)
    else:
        grid = torch.as_tensor(sigmas, dtype=torch.float32).flatten()
        if grid.numel() != total + 1:
            raise ValueError(f"sigmas needs N·s + 1 = {total + 1} values, got {grid.numel()}")
    # Chunk n (0 = oldest) has done (N − 1 − n)·s steps when a shift period starts.
    chunk_start = (num_chunks - 1 - torch.arange(num_chunks, dtype=torch.int64)) * micro_steps  # [N]
    frame_start = chunk_start.repeat_interleave(chunk_size)  # [N·c]
    j = torch.arange(micro_steps, dtype=torch.int64)[:, None]  # [s, 1]
    level_from = frame_start[None, :] + j  # [s, N·c]
    level_to = level_from + 1
    buffer = num_chunks * chunk_size
    return StreamPartition(
        num_chunks=num_chunks,
        chunk_size=chunk_size,
        micro_steps=micro_steps,
        level_from=level_from,
        level_to=level_to,
        sigma_from=grid[level_from],
        sigma_to=grid[level_to],
        emit=range(0, chunk_size),
        append=range(buffer - chunk_size, buffer),
    )


# ---------------------------------------------------------------------------------------------------------------
# Rolling Forcing window
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RollingWindow:
    """One Rolling Forcing model call: blocks [start_block, end_block), oldest (cleanest) first.

    timesteps[k]: timestep of block start_block + k at this call; next_timesteps[k]: the level its x0 is re-noised
    to for the next window, None when the block is finished by this call. new_block enters as fresh noise.
    """

    index: int
    start_block: int
    end_block: int
    timesteps: tuple[float, ...]
    next_timesteps: tuple[float | None, ...]
    new_block: int | None
    finished_block: int | None


def rolling_forcing_windows(num_blocks: int, steps: Sequence[float]) -> list[RollingWindow]:
    """Rolling Forcing schedule: W = len(steps) blocks per window, nb + W − 1 windows.

    Window w holds blocks max(0, w − W + 1)..min(nb − 1, w); block b is at steps[w − b] (steps noisy → clean, e.g.
    warp_steps([1000, 800, 600, 400, 200], 5)), so a full window reads clean → noisy: [t_W, …, t_1].
    """
    if num_blocks < 1:
        raise ValueError(f"num_blocks must be >= 1 (got {num_blocks})")
    ts = [float(s) for s in steps]
    width = len(ts)
    if width < 1:
        raise ValueError("steps must not be empty")
    windows: list[RollingWindow] = []
    for w in range(num_blocks + width - 1):
        start, end = max(0, w - width + 1), min(num_blocks - 1, w) + 1
        levels = [w - b for b in range(start, end)]  # step index of each block, clean (high) → noisy (low)
        windows.append(
            RollingWindow(
                index=w,
                start_block=start,
                end_block=end,
                timesteps=tuple(ts[k] for k in levels),
                next_timesteps=tuple(ts[k + 1] if k + 1 < width else None for k in levels),
                new_block=w if w < num_blocks else None,
                finished_block=w - width + 1 if w - width + 1 >= 0 else None,
            )
        )
    return windows


def window_frame_timesteps(window: RollingWindow, frames_per_block: int, batch_size: int = 1) -> Tensor:
    """Per-frame model timesteps [B, blocks·frames_per_block] for one Rolling Forcing window."""
    if frames_per_block < 1 or batch_size < 1:
        raise ValueError("frames_per_block and batch_size must be >= 1")
    t = torch.tensor(window.timesteps, dtype=torch.float32).repeat_interleave(frames_per_block)
    return t[None, :].repeat(batch_size, 1)
