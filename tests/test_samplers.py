"""Few-step, Euler and UniPC samplers; Euler and UniPC are checked against diffusers' schedulers."""

from __future__ import annotations

import pytest
import torch

from lvstudio.sampling.flow_matching import FlowMatchTable, sigma_grid, unipc_flow_schedule, warp_steps
from lvstudio.sampling.samplers import UniPCSolver, cfg, euler_sample, few_step_sample, unipc_sample

B, C, F, H, W = 1, 4, 3, 2, 2


def _toy_problem(seed: int = 0):  # type: ignore[no-untyped-def]
    """A linear, time-dependent velocity field over [B, C, F, H, W] (nonlinear in t)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(C, C, generator=g) * 0.3
    target = torch.randn(B, C, F, H, W, generator=g)
    noise = torch.randn(B, C, F, H, W, generator=g)

    def denoise_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = (t / 1000.0)[:, None, :, None, None]  # [B, 1, F, 1, 1]
        return torch.einsum("ij,bjfhw->bifhw", mix, x) * (1 - s) + (x - target) * s + 0.1 * torch.sin(3 * s)

    return denoise_fn, noise


def _oracle(x0: torch.Tensor, sigma_of_t=lambda t: t / 1000.0):  # type: ignore[no-untyped-def]
    """Exact velocity toward a fixed x0 for any x_t: v = (x_t − x0)/σ."""

    def denoise_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = sigma_of_t(t)[:, None, :, None, None]
        return (x - x0) / s

    return denoise_fn


# --- CFG ---------------------------------------------------------------------------------------------------


def test_cfg_formula() -> None:
    def cond(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x + 1

    def uncond(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x - 1

    x, t = torch.zeros(B, C, F, H, W), torch.zeros(B, F)
    assert torch.equal(cfg(cond, uncond, 1.0)(x, t), cond(x, t))
    assert torch.equal(cfg(cond, uncond, 5.0)(x, t), torch.full_like(x, -1 + 5 * 2))


# --- few-step consistency sampler ---------------------------------------------------------------------------


def test_few_step_oracle_returns_x0() -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, C, F, H, W, generator=g)
    noise = torch.randn(B, C, F, H, W, generator=g)
    steps = warp_steps([1000, 750, 500, 250], 5.0)
    out = few_step_sample(_oracle(x0), noise, steps, torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)
    table = FlowMatchTable(shift=8.0)
    out = few_step_sample(
        _oracle(x0, table.sigma_at), noise, [1000, 757, 522], torch.Generator().manual_seed(1), table=table
    )
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


def test_few_step_fresh_noise_comes_from_generator() -> None:
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(B, C, F, H, W, generator=g)
    noise = torch.randn(B, C, F, H, W, generator=g)
    steps = [1000.0, 937.5, 833.33, 625.0]
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    oracle = _oracle(x0)

    def recording(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen.append((x.clone(), t.clone()))
        return oracle(x, t)

    few_step_sample(recording, noise, steps, torch.Generator().manual_seed(7))
    assert len(seen) == 4
    assert torch.equal(seen[0][0], noise)
    assert seen[0][1].shape == (B, F) and bool((seen[2][1] == 833.33).all())
    # Each re-noised input is (1 − σ)x0 + σε with ε the next fresh draw of the same generator.
    replay = torch.Generator().manual_seed(7)
    for j in range(1, 4):
        eps = torch.randn(noise.shape, generator=replay)
        sigma = steps[j] / 1000.0
        torch.testing.assert_close(seen[j][0], (1 - sigma) * x0 + sigma * eps, atol=1e-5, rtol=1e-5)


def test_few_step_same_seed_same_result() -> None:
    denoise_fn, noise = _toy_problem(1)
    steps = warp_steps([1000, 750, 500, 250], 5.0)
    a = few_step_sample(denoise_fn, noise, steps, torch.Generator().manual_seed(3))
    b = few_step_sample(denoise_fn, noise, steps, torch.Generator().manual_seed(3))
    c = few_step_sample(denoise_fn, noise, steps, torch.Generator().manual_seed(4))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_few_step_callback_and_errors() -> None:
    denoise_fn, noise = _toy_problem(2)
    calls: list[tuple[int, float, tuple[int, ...]]] = []
    few_step_sample(denoise_fn, noise, [1000, 500], callback=lambda j, t, x0: calls.append((j, t, tuple(x0.shape))))
    assert calls == [(0, 1000.0, noise.shape), (1, 500.0, noise.shape)]
    with pytest.raises(ValueError, match="empty"):
        few_step_sample(denoise_fn, noise, [])
    with pytest.raises(ValueError, match=r"\[B, C, F, H, W\]"):
        few_step_sample(denoise_fn, noise[:, :, 0], [1000])


# --- Euler -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("steps", "shift"), [(4, 1.0), (10, 3.0), (30, 8.0), (20, 5.0)])
def test_euler_equals_diffusers_flow_match_euler(steps: int, shift: float) -> None:
    diffusers = pytest.importorskip("diffusers")
    denoise_fn, noise = _toy_problem(3)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    x = noise.clone()
    for t in sched.timesteps:
        v = denoise_fn(x, torch.full((B, F), float(t)))
        x = sched.step(v, t, x).prev_sample
    ours = euler_sample(denoise_fn, noise, sched.sigmas, timesteps=sched.timesteps)
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=0)


def test_euler_is_exact_on_straight_paths() -> None:
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(B, C, F, H, W, generator=g)
    noise = torch.randn(B, C, F, H, W, generator=g)
    out = euler_sample(_oracle(x0), noise, sigma_grid(7, 5.0))
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)
    seen: list[int] = []
    euler_sample(_oracle(x0), noise, sigma_grid(3), callback=lambda i, t, x: seen.append(i))
    assert seen == [0, 1, 2]
    with pytest.raises(ValueError):
        euler_sample(_oracle(x0), noise, [1.0])


# --- UniPC -------------------------------------------------------------------------------------------------


def _diffusers_unipc(denoise_fn, noise, steps, shift, **kwargs):  # type: ignore[no-untyped-def]
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, **kwargs
    )
    sched.set_timesteps(steps)
    sigmas, timesteps = sched.sigmas.clone(), sched.timesteps.clone()
    x = noise.clone()
    for t in sched.timesteps:
        v = denoise_fn(x, torch.full((B, F), float(t)))
        x = sched.step(v, t, x).prev_sample
    return x, sigmas, timesteps


@pytest.mark.parametrize(("steps", "shift"), [(1, 5.0), (2, 5.0), (5, 1.0), (10, 3.0), (30, 8.0), (8, 16.0)])
def test_unipc_equals_diffusers(steps: int, shift: float) -> None:
    denoise_fn, noise = _toy_problem(5)
    ref, _, _ = _diffusers_unipc(denoise_fn, noise, steps, shift, solver_order=2)
    sigmas, timesteps = unipc_flow_schedule(steps, shift)
    ours = unipc_sample(denoise_fn, noise, sigmas, timesteps=timesteps)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("order", "solver_type"), [(1, "bh2"), (2, "bh2"), (2, "bh1"), (1, "bh1")])
def test_unipc_variants_equal_diffusers(order: int, solver_type: str) -> None:
    """Final σ = σ_min (not 0): diffusers' bh1 turns a final σ of 0 into NaN (−inf·0), so compare there."""
    denoise_fn, noise = _toy_problem(6)
    ref, sigmas, timesteps = _diffusers_unipc(
        denoise_fn, noise, 12, 5.0, solver_order=order, solver_type=solver_type, final_sigmas_type="sigma_min"
    )
    assert float(sigmas[-1]) > 0
    ours = unipc_sample(denoise_fn, noise, sigmas, timesteps=timesteps, order=order, solver_type=solver_type)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)


def test_unipc_is_exact_on_straight_paths_from_sigma_one() -> None:
    g = torch.Generator().manual_seed(8)
    x0 = torch.randn(B, C, F, H, W, generator=g)
    noise = torch.randn(B, C, F, H, W, generator=g)
    out = unipc_sample(_oracle(x0), noise, sigma_grid(6, 5.0))  # starts at σ = 1 exactly
    torch.testing.assert_close(out, x0, atol=1e-5, rtol=1e-5)


def test_unipc_solver_per_frame_steppers_match_batched() -> None:
    """One solver per frame (SkyReels style) gives the batched result when all frames step together."""
    denoise_fn, noise = _toy_problem(9)
    sigmas, timesteps = unipc_flow_schedule(6, 8.0)
    batched = unipc_sample(denoise_fn, noise, sigmas, timesteps=timesteps)
    solvers = [UniPCSolver(sigmas) for _ in range(F)]
    x = noise.clone()
    for t in timesteps:
        v = denoise_fn(x, torch.full((B, F), float(t)))
        x = torch.stack([solvers[f].step(v[:, :, f], x[:, :, f]) for f in range(F)], dim=2)
    torch.testing.assert_close(x, batched, atol=1e-6, rtol=0)
    assert all(s.done for s in solvers)
    with pytest.raises(ValueError, match="already took"):
        solvers[0].step(v[:, :, 0], x[:, :, 0])


@pytest.mark.parametrize(
    "bad",
    [[1.0], [0.5, 0.8, 0.0], [1.0, 0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [1.5, 0.0]],
    ids=["short", "increasing", "repeat_mid", "zero_mid", "above_one"],
)
def test_unipc_solver_rejects_bad_grids(bad: list[float]) -> None:
    with pytest.raises(ValueError):
        UniPCSolver(bad)


def test_unipc_converges_toward_fine_euler() -> None:
    denoise_fn, noise = _toy_problem(10)
    fine = euler_sample(denoise_fn, noise, sigma_grid(400, 3.0))
    coarse_euler = euler_sample(denoise_fn, noise, sigma_grid(10, 3.0))
    coarse_unipc = unipc_sample(denoise_fn, noise, sigma_grid(10, 3.0))
    assert float((coarse_unipc - fine).abs().max()) < float((coarse_euler - fine).abs().max())
