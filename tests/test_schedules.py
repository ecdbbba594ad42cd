"""Diffusion-forcing schedule matrices, SkyReels-V2 timestep matrix (vs diffusers), StreamDiT and Rolling Forcing."""

from __future__ import annotations

import itertools

import pytest
import torch

from lvstudio.sampling.flow_matching import sigma_grid, unipc_flow_schedule, warp_steps
from lvstudio.sampling.schedules import (
    addnoise_condition,
    autoregressive_matrix,
    full_sequence_matrix,
    levels_to_sigmas,
    pyramid_matrix,
    rolling_forcing_windows,
    skyreels_timestep_matrix,
    stream_partition_levels,
    window_frame_timesteps,
)

# --- original Diffusion Forcing --------------------------------------------------------------------------------


def test_full_sequence_matrix_hand_example() -> None:
    m = full_sequence_matrix(3, 4)
    assert m.dtype == torch.int64
    assert m.tolist() == [[4, 4, 4], [3, 3, 3], [2, 2, 2], [1, 1, 1], [0, 0, 0]]


def test_pyramid_matrix_hand_examples() -> None:
    # S = 2, u = 1: rows = 2 + 2 + 1; M[m, f] = clip(2 + f − m, 0, 2)
    assert pyramid_matrix(3, 2, 1.0).tolist() == [[2, 2, 2], [1, 2, 2], [0, 1, 2], [0, 0, 1], [0, 0, 0]]
    # S = 2, u = 0.5: offsets int(f·0.5) = [0, 0, 1, 1]; rows = 2 + int(1.5) + 1 = 4
    assert pyramid_matrix(4, 2, 0.5).tolist() == [[2, 2, 2, 2], [1, 1, 2, 2], [0, 0, 1, 1], [0, 0, 0, 0]]
    # u = 0 is the full sequence
    assert torch.equal(pyramid_matrix(5, 3, 0.0), full_sequence_matrix(5, 3))


def test_autoregressive_matrix_hand_example() -> None:
    # S = 2, u = S: a frame starts only when the previous one is clean.
    expected = [[2, 2, 2], [1, 2, 2], [0, 2, 2], [0, 1, 2], [0, 0, 2], [0, 0, 1], [0, 0, 0]]
    assert autoregressive_matrix(3, 2).tolist() == expected


@pytest.mark.parametrize(("frames", "levels", "u"), [(1, 5, 1.0), (6, 10, 2.5), (8, 4, 0.3), (4, 7, 7.0)])
def test_pyramid_matrix_invariants(frames: int, levels: int, u: float) -> None:
    m = pyramid_matrix(frames, levels, u)
    assert m.shape == (levels + int((frames - 1) * u) + 1, frames)
    assert bool((m[0] == levels).all()) and bool((m[-1] == 0).all())
    step = m[:-1] - m[1:]
    assert bool(((step == 0) | (step == 1)).all())  # one call lowers a frame by at most one level
    assert bool((m[:, 1:] >= m[:, :-1]).all())  # later frames are never cleaner


def test_df_matrix_errors_and_level_sigmas() -> None:
    with pytest.raises(ValueError):
        full_sequence_matrix(0, 3)
    with pytest.raises(ValueError):
        pyramid_matrix(3, 3, -1.0)
    sig = levels_to_sigmas(pyramid_matrix(3, 4, 1.0), 4, shift=3.0)
    assert float(sig[0, 0]) == 1.0 and float(sig[-1, -1]) == 0.0
    assert float(levels_to_sigmas(torch.tensor([2]), 4)[0]) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        levels_to_sigmas(torch.tensor([5]), 4)


# --- SkyReels-V2 -----------------------------------------------------------------------------------------------


def _diffusers_generate():  # type: ignore[no-untyped-def]
    diffusers = pytest.importorskip("diffusers")
    pipe = object.__new__(diffusers.SkyReelsV2DiffusionForcingPipeline)  # no models: the method needs no state
    return pipe.generate_timestep_matrix


def _grid() -> list[tuple[int, int, int, int, int, int]]:
    combos = []
    for frames, steps, base, ar, ready, cbs in itertools.product(
        (6, 12, 24), (3, 10), (6, 12), (0, 1, 4), (0, 3), (1, 2, 3)
    ):
        if frames % cbs or base > frames or base < cbs:
            continue
        combos.append((frames, steps, base, ar, ready, cbs))
    return combos


def test_skyreels_matrix_equals_diffusers_on_a_grid() -> None:
    generate = _diffusers_generate()
    checked = raised = 0
    for frames, steps, base, ar, ready, cbs in _grid():
        _, template = unipc_flow_schedule(steps, 8.0)
        args = (frames, template, base, ar, ready, cbs)
        try:
            ref = generate(*args)
        except Exception:  # noqa: BLE001 — the reference raises ValueError or fails on an empty stack
            with pytest.raises(ValueError):
                skyreels_timestep_matrix(*args)
            raised += 1
            continue
        ours = skyreels_timestep_matrix(*args)
        for a, b in zip(ours[:3], ref[:3], strict=True):
            assert a.dtype == b.dtype and a.shape == b.shape, args
            assert torch.equal(a, b), args
        assert ours[3] == ref[3], args
        checked += 1
    assert checked > 100 and raised > 5


def test_skyreels_synchronous_and_async_examples() -> None:
    _, template = unipc_flow_schedule(4, 8.0)  # [999, 986, 949, 842]... (4 UniPC steps)
    step_matrix, step_index, mask, intervals = skyreels_timestep_matrix(3, template, 3, ar_step=0)
    assert step_matrix.shape == (4, 3)
    assert torch.equal(step_matrix, template[:, None].repeat(1, 3))  # synchronous: all frames share timesteps
    assert bool(mask.all()) and intervals == [(0, 3)] * 4
    # ar_step 1 with a 1-frame prefix: block 1 leads, block 2 lags it by one step.
    step_matrix, step_index, mask, intervals = skyreels_timestep_matrix(3, template, 3, ar_step=1, num_pre_ready=1)
    assert step_index.tolist() == [[5, 1, 0], [5, 2, 1], [5, 3, 2], [5, 4, 3], [5, 5, 4]]  # stops once all >= N
    assert mask[:, 0].any().item() is False
    assert mask.tolist()[-1] == [False, False, True]
    assert step_matrix[0].tolist() == [0, int(template[0]), 999]


def test_skyreels_errors() -> None:
    _, template = unipc_flow_schedule(30, 8.0)
    with pytest.raises(ValueError, match="ar_step"):
        skyreels_timestep_matrix(40, template, 20, ar_step=1)  # 40 frames in a 20-frame window need ar_step >= 2
    with pytest.raises(ValueError, match="multiple of causal_block_size"):
        skyreels_timestep_matrix(25, template, 25, causal_block_size=4)
    with pytest.raises(ValueError, match="nothing left"):
        skyreels_timestep_matrix(8, template, 8, num_pre_ready=8)
    with pytest.raises(ValueError, match="at least one"):
        skyreels_timestep_matrix(8, template[:0], 8)


def test_skyreels_long_video_window_slides() -> None:
    _, template = unipc_flow_schedule(6, 8.0)
    _, _, mask, intervals = skyreels_timestep_matrix(20, template, 10, ar_step=2, causal_block_size=2)
    assert all(e - s <= 10 for s, e in intervals)
    assert intervals[0] == (0, 10) and intervals[-1] == (10, 20)
    for i, (s, e) in enumerate(intervals):  # every updated frame lies inside that iteration's window
        updated = torch.nonzero(mask[i]).flatten()
        assert bool(((updated >= s) & (updated < e)).all())


def test_skyreels_shrink_interval_uses_first_row() -> None:
    _, template = unipc_flow_schedule(4, 8.0)
    _, _, mask, intervals = skyreels_timestep_matrix(6, template, 6, ar_step=2, shrink_interval_with_mask=True)
    assert mask.shape == (4 + 5 * 2, 6)  # the full masks are kept
    assert intervals[0] == (0, 1)  # only block 0 updates in the first row
    assert intervals[-1] == (0, 6)


def test_addnoise_condition() -> None:
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 3, 5, 2, 2, generator=g)
    timesteps = torch.full((2, 5), 500.0)
    out, t = addnoise_condition(latents, 2, 20.0, torch.Generator().manual_seed(1), timesteps)
    eps = torch.randn(2, 3, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out[:, :, :2], latents[:, :, :2] * 0.98 + eps * 0.02)
    assert torch.equal(out[:, :, 2:], latents[:, :, 2:])
    assert t is not None and t[:, :2].eq(20.0).all() and t[:, 2:].eq(500.0).all()
    assert timesteps.eq(500.0).all()  # inputs untouched
    same, same_t = addnoise_condition(latents, 2, 0.0, timesteps=timesteps)
    assert same is latents and same_t is timesteps
    with pytest.raises(ValueError):
        addnoise_condition(latents, 2, -1.0)
    with pytest.raises(ValueError):
        addnoise_condition(latents[:, :, 0], 2, 20.0)


# --- StreamDiT -------------------------------------------------------------------------------------------------


def test_stream_partition_hand_example() -> None:
    p = stream_partition_levels(num_chunks=3, chunk_size=2, micro_steps=2)
    assert p.buffer_frames == 6 and p.steps_per_frame == 6
    assert p.level_from.tolist() == [[4, 4, 2, 2, 0, 0], [5, 5, 3, 3, 1, 1]]
    assert p.level_to.tolist() == [[5, 5, 3, 3, 1, 1], [6, 6, 4, 4, 2, 2]]
    assert list(p.emit) == [0, 1] and list(p.append) == [4, 5]
    grid = sigma_grid(6, 1.0).to(torch.float32)
    assert torch.equal(p.sigma_from, grid[p.level_from]) and torch.equal(p.sigma_to, grid[p.level_to])
    assert bool((p.sigma_from[0, -2:] == 1.0).all()) and bool((p.sigma_to[-1, :2] == 0.0).all())


@pytest.mark.parametrize(("n", "c", "s"), [(1, 4, 6), (4, 1, 1), (3, 2, 2), (2, 3, 4)])
def test_stream_partition_is_periodic(n: int, c: int, s: int) -> None:
    p = stream_partition_levels(n, c, s, shift=3.0)
    assert torch.equal(p.level_from[1:], p.level_to[:-1])  # micro-steps chain
    assert bool((p.level_to[-1, list(p.emit)] == n * s).all())  # emitted chunk is clean
    shifted = torch.cat([p.level_to[-1, c:], torch.zeros(c, dtype=torch.int64)])  # shift by c, append noise
    assert torch.equal(shifted, p.level_from[0])


def test_stream_partition_special_cases() -> None:
    uniform = stream_partition_levels(1, 4, 5)  # c = B, s = K: standard diffusion
    assert bool((uniform.level_from == torch.arange(5)[:, None]).all())
    diagonal = stream_partition_levels(4, 1, 1)  # c = 1, s = 1: FIFO diagonal
    assert diagonal.level_from.tolist() == [[3, 2, 1, 0]]
    custom = stream_partition_levels(2, 1, 1, sigmas=[1.0, 0.3, 0.0])
    assert custom.sigma_from.tolist() == [[pytest.approx(0.3), 1.0]]
    with pytest.raises(ValueError):
        stream_partition_levels(2, 1, 1, sigmas=[1.0, 0.0])
    with pytest.raises(ValueError):
        stream_partition_levels(0, 1, 1)


# --- Rolling Forcing ---------------------------------------------------------------------------------------------


def test_rolling_forcing_windows() -> None:
    steps = warp_steps([1000, 800, 600, 400, 200], 5.0)
    windows = rolling_forcing_windows(7, steps)
    assert len(windows) == 7 + 5 - 1
    first, full, last = windows[0], windows[4], windows[-1]
    assert (first.start_block, first.end_block, first.timesteps) == (0, 1, (steps[0],))
    assert first.new_block == 0 and first.finished_block is None
    assert (full.start_block, full.end_block) == (0, 5)
    assert full.timesteps == tuple(reversed(steps))  # clean → noisy
    assert full.next_timesteps == (None, *reversed(steps[1:]))
    assert full.finished_block == 0
    assert (last.start_block, last.end_block, last.timesteps) == (6, 7, (steps[-1],))
    assert last.new_block is None and last.finished_block == 6
    # Every block visits every step once, in order, and finishes exactly once.
    for b in range(7):
        seen = [w.timesteps[b - w.start_block] for w in windows if w.start_block <= b < w.end_block]
        assert seen == steps
    assert sorted(w.finished_block for w in windows if w.finished_block is not None) == list(range(7))
    t = window_frame_timesteps(full, 3, batch_size=2)
    assert t.shape == (2, 15) and t[0, :3].eq(steps[-1]).all() and t[1, -3:].eq(1000.0).all()
    short = rolling_forcing_windows(2, steps)  # fewer blocks than the window
    assert [(w.start_block, w.end_block) for w in short] == [(0, 1), (0, 2), (0, 2), (0, 2), (0, 2), (1, 2)]
    with pytest.raises(ValueError):
        rolling_forcing_windows(0, steps)


def test_overlap_history_segments_cover_the_video_like_skyreels() -> None:
    from lvstudio.sampling.schedules import HistorySegment, overlap_history_segments

    # SkyReels' recommended long-video setting: 97-frame base, 17 frames of overlap, 257 frames -> 65 latents.
    segs = overlap_history_segments(257, 97, 17, causal_block_size=1)
    assert segs[0] == HistorySegment(0, 25, 0)
    # n_iter = 1 + (65 - 25 - 1) // (25 - 5) + 1 = 3; finished before k: 25, 45
    assert segs[1:] == [HistorySegment(20, 25, 5), HistorySegment(40, 25, 5)]
    assert segs[-1].start + segs[-1].num_frames == 65
    # every segment after the first starts inside the previous one by exactly the overlap
    for a, b in zip(segs, segs[1:], strict=False):
        assert b.start == a.start + a.num_frames - 5
    # a causal block of 2 cuts the 5-latent prefix to 4; short videos are one segment
    assert overlap_history_segments(257, 97, 17, causal_block_size=2)[1].prefix == 4
    assert overlap_history_segments(97, 97, 17) == [HistorySegment(0, 25, 0)]
    with pytest.raises(ValueError, match="shorter"):
        overlap_history_segments(257, 17, 17)
