"""Flow-matching math, shift/warp, σ grids and the Self-Forcing FlowMatchTable."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lvstudio.sampling.flow_matching import (
    FlowMatchTable,
    add_noise,
    noise_from_velocity,
    sample_dmd_sigma,
    sample_training_sigma,
    shift_sigma,
    sigma_grid,
    unipc_flow_schedule,
    velocity_from_x0,
    velocity_target,
    warp_steps,
    x0_from_velocity,
)

B, C, F, H, W = 2, 3, 4, 2, 3


def _latents(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, F, H, W, generator=g), torch.randn(B, C, F, H, W, generator=g)


# --- step warping and reference lists -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("steps", "shift", "expected"),
    [
        ([1000, 750, 500, 250], 5.0, [1000.0, 937.5, 833.33, 625.0]),
        ([1000, 750, 500, 250], 8.0, [1000.0, 960.0, 888.9, 727.3]),
        ([1000, 800, 600, 400, 200], 5.0, [1000.0, 952.4, 882.4, 769.2, 555.6]),
    ],
)
def test_warp_steps_reference_values(steps: list[int], shift: float, expected: list[float]) -> None:
    assert warp_steps(steps, shift) == pytest.approx(expected, abs=0.06)


def test_warp_steps_equals_analytic_shift_and_maps_zero_to_zero() -> None:
    steps = [1000, 900, 437, 1, 0]
    warped = warp_steps(steps, 5.0)
    analytic = [1000.0 * shift_sigma(s / 1000.0, 5.0) for s in steps]
    assert warped == pytest.approx(analytic, abs=1e-3)
    assert warped[-1] == 0.0


@pytest.mark.parametrize("bad", [[1000, 750.5], [1001], [-1]])
def test_warp_steps_rejects_non_table_steps(bad: list[float]) -> None:
    with pytest.raises(ValueError, match="integers"):
        warp_steps(bad, 5.0)


def test_causvid_stored_trajectory_timesteps() -> None:
    grid = sigma_grid(50, 8.0) * 1000  # 50-step Euler grid, shift 8
    assert grid[[0, 36, 44]].tolist() == pytest.approx([1000.0, 756.8, 521.7], abs=0.05)
    table = FlowMatchTable(shift=8.0, num_steps=50)
    assert table.timesteps[[0, 36, 44]].tolist() == pytest.approx([1000.0, 756.8, 521.7], abs=0.05)


# --- conversions -------------------------------------------------------------------------------------------------


def _sigma_forms() -> list[object]:
    g = torch.Generator().manual_seed(3)
    return [
        0.37,
        torch.tensor(0.81),
        torch.rand(B, generator=g) * 0.9 + 0.05,
        torch.rand(B, F, generator=g) * 0.9 + 0.05,
    ]


@pytest.mark.parametrize("sigma", _sigma_forms(), ids=["float", "0d", "per_sample", "per_frame"])
def test_conversions_invert_each_other(sigma: object) -> None:
    x0, eps = _latents()
    x_t = add_noise(x0, eps, sigma)
    v = velocity_target(x0, eps)
    torch.testing.assert_close(x0_from_velocity(x_t, v, sigma), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(noise_from_velocity(x_t, v, sigma), eps, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(velocity_from_x0(x_t, x0, sigma), v, atol=1e-4, rtol=1e-4)


def test_add_noise_endpoints() -> None:
    x0, eps = _latents(1)
    assert torch.equal(add_noise(x0, eps, 0.0), x0)
    assert torch.equal(add_noise(x0, eps, 1.0), eps)
    zeros, ones = torch.zeros(B, F), torch.ones(B, F)
    assert torch.equal(add_noise(x0, eps, zeros), x0)
    assert torch.equal(add_noise(x0, eps, ones), eps)


def test_per_frame_sigma_broadcast() -> None:
    x0, eps = _latents(2)
    sigma = torch.tensor([[0.0, 0.25, 0.5, 1.0], [0.9, 0.1, 0.3, 0.7]])  # [B, F]
    out = add_noise(x0, eps, sigma)
    for b in range(B):
        for f in range(F):
            s = float(sigma[b, f])
            expected = (1 - s) * x0[b, :, f] + s * eps[b, :, f]
            torch.testing.assert_close(out[b, :, f], expected)


def test_half_precision_keeps_dtype() -> None:
    x0, eps = _latents(4)
    out = add_noise(x0.bfloat16(), eps.bfloat16(), torch.full((B, F), 0.5))
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), 0.5 * x0 + 0.5 * eps, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("shape", [(B + 1,), (B, F + 1), (B, F, 1)])
def test_bad_sigma_shapes_raise(shape: tuple[int, ...]) -> None:
    x0, eps = _latents()
    with pytest.raises(ValueError):
        add_noise(x0, eps, torch.full(shape, 0.5))


def test_velocity_from_x0_rejects_zero_sigma() -> None:
    x0, eps = _latents()
    with pytest.raises(ValueError, match="sigma > 0"):
        velocity_from_x0(eps, x0, 0.0)


# --- shift and grids ---------------------------------------------------------------------------------------------


def test_shift_sigma_properties() -> None:
    s = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert torch.equal(shift_sigma(s, 1.0), s)
    shifted = shift_sigma(s, 5.0)
    assert float(shifted[0]) == 0.0 and float(shifted[-1]) == 1.0
    assert bool((shifted[1:] > shifted[:-1]).all())
    assert bool((shifted[1:-1] > s[1:-1]).all())  # shift > 1 pushes toward noise
    assert shift_sigma(0.5, 3.0) == pytest.approx(0.75)
    assert np.allclose(shift_sigma(np.array([0.5]), 3.0), [0.75])
    with pytest.raises(ValueError):
        shift_sigma(0.5, 0.0)


def test_sigma_grid_shape_and_presets() -> None:
    grid = sigma_grid(30, 8.0)
    assert grid.shape == (31,) and grid.dtype == torch.float64
    assert float(grid[0]) == 1.0 and float(grid[-1]) == 0.0
    assert bool((grid[1:] < grid[:-1]).all())
    wan = sigma_grid(4, 1.0, sigma_max=0.999, sigma_min=0.0)
    assert wan.tolist() == pytest.approx([0.999, 0.74925, 0.4995, 0.24975, 0.0])
    with pytest.raises(ValueError):
        sigma_grid(0, 1.0)
    with pytest.raises(ValueError):
        sigma_grid(5, 1.0, sigma_max=0.1, sigma_min=0.2)


@pytest.mark.parametrize(("steps", "shift"), [(1, 1.0), (10, 3.0), (30, 8.0), (50, 5.0), (7, 16.0)])
def test_unipc_flow_schedule_equals_diffusers(steps: int, shift: float) -> None:
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)
    sched.set_timesteps(steps)
    sigmas, timesteps = unipc_flow_schedule(steps, shift)
    assert sigmas.dtype == sched.sigmas.dtype and timesteps.dtype == sched.timesteps.dtype
    assert torch.equal(sigmas, sched.sigmas)
    assert torch.equal(timesteps, sched.timesteps)


# --- FlowMatchTable -------------------------------------------------------------------------------------------


def test_table_hand_computation() -> None:
    table = FlowMatchTable(shift=5.0)
    assert len(table) == 1000
    # index k ↦ σ = shift(1 − k/1000)
    for k in (0, 1, 250, 500, 999):
        s = 1 - k / 1000
        assert float(table.sigmas[k]) == pytest.approx(5 * s / (1 + 4 * s), abs=1e-6)
    assert float(table.timesteps[0]) == 1000.0
    assert float(table.timesteps[250]) == pytest.approx(937.5, abs=1e-3)
    assert float(table.sigmas[-1]) == pytest.approx(0.00498, abs=1e-5)  # the table minimum (t = 0 lookups)
    assert float(table.sigma_at(0.0)) == pytest.approx(0.00498, abs=1e-5)


def test_table_matches_diffusers_flow_match_euler_training_sigmas() -> None:
    diffusers = pytest.importorskip("diffusers")
    for shift in (1.0, 5.0, 8.0):
        ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)  # 1000 training sigmas, 1 → 0.001, shifted
        table = FlowMatchTable(shift=shift)
        torch.testing.assert_close(table.sigmas, ref.sigmas, atol=1e-6, rtol=0)
        torch.testing.assert_close(table.timesteps, ref.timesteps, atol=1e-3, rtol=0)


def test_table_nearest_lookups() -> None:
    table = FlowMatchTable(shift=5.0)
    t = torch.tensor([[937.4, 1000.0], [0.0, 625.01]])  # [B, F]
    idx = table.index_of(t)
    assert idx.shape == (2, 2)
    assert idx.tolist() == [[250, 0], [999, 750]]
    torch.testing.assert_close(table.sigma_at(t), table.sigmas[idx])
    x0, eps = _latents()
    t_frames = torch.tensor([[1000.0, 937.5, 833.33, 625.0]] * B)
    torch.testing.assert_close(table.add_noise(x0, eps, t_frames), add_noise(x0, eps, table.sigma_at(t_frames)))
    torch.testing.assert_close(table.add_noise(x0, eps, 937.5), add_noise(x0, eps, 0.9375))


def test_table_set_timesteps_and_euler_step() -> None:
    table = FlowMatchTable(shift=8.0, num_steps=50)
    grid = sigma_grid(50, 8.0).to(torch.float32)
    torch.testing.assert_close(table.sigmas, grid[:-1], atol=1e-6, rtol=0)
    x0, eps = _latents(5)
    v = velocity_target(x0, eps)
    x = eps.clone()  # σ = 1: straight-line flow ⇒ Euler is exact
    for t in table.timesteps:
        x = table.step(v, float(t), x)
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="1000-entry"):
        table.warp([1000, 750])


def test_training_weight_peaks_near_500_with_mean_one() -> None:
    table = FlowMatchTable(shift=5.0)
    assert float(table.weights.mean()) == pytest.approx(1.0, abs=1e-5)
    assert float(table.weights.min()) == 0.0
    peak_t = float(table.timesteps[table.weights.argmax()])
    assert abs(peak_t - 500.0) < 2.0
    w = table.training_weight(torch.tensor([[500.0, 980.0], [20.0, 1000.0]]))
    assert w.shape == (2, 2)
    assert float(w[0, 0]) == pytest.approx(float(table.weights.max()), rel=1e-4)
    assert bool((w[0, 0] > w[0, 1]) & (w[0, 0] > w[1, 0]))
    assert float(w[1, 1]) == 0.0


# --- training σ samplers -------------------------------------------------------------------------------------


def test_sample_training_sigma_uniform_over_table_per_block() -> None:
    table = FlowMatchTable(shift=5.0)
    s1 = sample_training_sigma(table, 4, 6, torch.Generator().manual_seed(0), frames_per_block=3)
    s2 = sample_training_sigma(table, 4, 6, torch.Generator().manual_seed(0), frames_per_block=3)
    assert s1.shape == (4, 6) and torch.equal(s1, s2)
    assert torch.equal(s1[:, :3], s1[:, :1].expand(4, 3)) and torch.equal(s1[:, 3:], s1[:, 3:4].expand(4, 3))
    assert bool(torch.isin(s1, table.sigmas).all())
    many = sample_training_sigma(table, 2000, 1, torch.Generator().manual_seed(1))
    # Uniform over the *shifted* table ⇒ median σ ≈ shift(0.5) = 5/6.
    assert float(many.median()) == pytest.approx(5 / 6, abs=0.03)
    with pytest.raises(ValueError):
        sample_training_sigma(table, 1, 5, frames_per_block=3)


def test_sample_dmd_sigma_shift_and_clamp() -> None:
    s = sample_dmd_sigma(3, 5, shift=5.0, generator=torch.Generator().manual_seed(0))
    assert s.shape == (3, 5)
    assert torch.equal(s, s[:, :1].expand(3, 5))  # uniform over frames
    big = sample_dmd_sigma(4000, 1, shift=5.0, generator=torch.Generator().manual_seed(2))
    assert float(big.min()) >= 0.02 - 1e-7 and float(big.max()) <= 0.98 + 1e-7
    assert float(big.max()) == pytest.approx(0.98)  # the upper clamp is hit (shifted values pile up near 1)
    # Every value is the shift of an integer timestep (or a clamp bound).
    t_int = torch.arange(0, 1000, dtype=torch.float32)
    allowed = (shift_sigma(t_int / 1000, 5.0)).clamp(0.02, 0.98)
    distance = (big.flatten()[:, None] - allowed[None, :]).abs().min(dim=1).values
    assert float(distance.max()) < 1e-6
    per_block = sample_dmd_sigma(2, 6, 8.0, torch.Generator().manual_seed(3), uniform=False, frames_per_block=3)
    assert torch.equal(per_block[:, :3], per_block[:, :1].expand(2, 3))
    again = sample_dmd_sigma(2, 6, 8.0, torch.Generator().manual_seed(3), uniform=False, frames_per_block=3)
    assert torch.equal(per_block, again)


def test_lambda_helpers_are_finite_inside() -> None:
    from lvstudio.sampling.flow_matching import lambda_of_sigma

    assert lambda_of_sigma(0.5) == 0.0
    assert lambda_of_sigma(0.0) == math.inf and lambda_of_sigma(1.0) == -math.inf
