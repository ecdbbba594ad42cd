"""Samplers over a velocity model `denoise_fn(x [B, C, F, H, W], t [B, F]) -> v = ε − x0`.

- `few_step_sample`: the Self-Forcing / CausVid consistency sampler (predict x0, re-noise with fresh noise).
- `euler_sample`: the flow ODE with Euler steps on a σ grid.
- `UniPCSolver` / `unipc_sample`: UniPC (B(h) variants, x0-predictor form, flow parameterisation) — the Wan and
  SkyReels-V2 default solver. `UniPCSolver` is one stateful stepper, so a backend can keep one per frame.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lvstudio.sampling.flow_matching import (
    FlowMatchTable,
    add_noise,
    lambda_of_sigma,
    x0_from_velocity,
)

DenoiseFn = Callable[[Tensor, Tensor], Tensor]
# callback(step index, model timestep of that step, tensor): few_step_sample passes x0, the ODE samplers the new x.
StepCallback = Callable[[int, float, Tensor], None]


def cfg(denoise_cond: DenoiseFn, denoise_uncond: DenoiseFn, scale: float) -> DenoiseFn:
    """Classifier-free guidance: v = v_uncond + scale·(v_cond − v_uncond) (scale 1 ⇒ the conditional model)."""

    def guided(x: Tensor, t: Tensor) -> Tensor:
        v_cond = denoise_cond(x, t)
        if scale == 1.0:
            return v_cond
        v_uncond = denoise_uncond(x, t)
        return v_uncond + scale * (v_cond - v_uncond)

    return guided


def _frame_timesteps(x: Tensor, t: float) -> Tensor:
    """One timestep for every frame: [B, F] float32."""
    if x.ndim != 5:
        raise ValueError(f"latents must be [B, C, F, H, W], got shape {tuple(x.shape)}")
    return torch.full((x.shape[0], x.shape[2]), float(t), dtype=torch.float32, device=x.device)


def _as_float_list(values: Sequence[float] | Tensor, name: str) -> list[float]:
    out = [float(v) for v in (values.tolist() if isinstance(values, Tensor) else values)]
    if not out:
        raise ValueError(f"{name} must not be empty")
    return out


def few_step_sample(
    denoise_fn: DenoiseFn,
    noise: Tensor,
    steps: Sequence[float],
    generator: torch.Generator | None = None,
    *,
    table: FlowMatchTable | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Few-step consistency sampler; returns the x0 predicted at the last listed step.

    steps: model timesteps (1000-scale), e.g. warp_steps([1000, 750, 500, 250], 5). σ of a step is looked up in
    `table` (nearest entry, as Self-Forcing does) or is t/1000 without one. Fresh noise comes from `generator`.
    """
    ts = _as_float_list(steps, "steps")
    x = noise  # [B, C, F, H, W]
    x0 = noise
    for j, t in enumerate(ts):
        # Step 1: velocity at t, converted to an x0 prediction.
        v = denoise_fn(x, _frame_timesteps(x, t))
        sigma = float(table.sigma_at(t)) if table is not None else t / 1000.0
        x0 = x0_from_velocity(x, v, sigma)
        if callback is not None:
            callback(j, t, x0)
        # Step 2: re-noise x0 to the next listed step with FRESH Gaussian noise.
        if j + 1 < len(ts):
            t_next = ts[j + 1]
            sigma_next = float(table.sigma_at(t_next)) if table is not None else t_next / 1000.0
            gen_device = generator.device if generator is not None else x.device  # a CPU generator also serves CUDA
            eps = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
            x = add_noise(x0, eps, sigma_next)
    return x0


def _model_timesteps(sigmas: list[float], timesteps: Sequence[float] | Tensor | None) -> list[float]:
    if timesteps is None:
        return [1000.0 * s for s in sigmas[:-1]]
    ts = _as_float_list(timesteps, "timesteps")
    if len(ts) != len(sigmas) - 1:
        raise ValueError(f"need one timestep per step: {len(sigmas) - 1} steps, got {len(ts)} timesteps")
    return ts


def euler_sample(
    denoise_fn: DenoiseFn,
    noise: Tensor,
    sigmas: Sequence[float] | Tensor,
    *,
    timesteps: Sequence[float] | Tensor | None = None,
    callback: StepCallback | None = None,
) -> Tensor:
    """Euler integration of the flow ODE over `sigmas` (n + 1 descending values, usually ending at 0).

    The model sees t = 1000·σ unless `timesteps` (one per step) is given.
    """
    sig = _as_float_list(sigmas, "sigmas")
    if len(sig) < 2:
        raise ValueError("sigmas needs at least 2 values (start and end)")
    ts = _model_timesteps(sig, timesteps)
    x = noise  # [B, C, F, H, W]
    for i, t in enumerate(ts):
        # x_{σ'} = x_σ + (σ' − σ)·v
        v = denoise_fn(x, _frame_timesteps(x, t))
        x = (x + (sig[i + 1] - sig[i]) * v).to(noise.dtype)
        if callback is not None:
            callback(i, t, x)
    return x


def _safe_lambda(sigma: float) -> float:
    """log((1 − σ)/σ), with σ = 1 moved to 1 − 1e-6 so that the first step stays finite."""
    return lambda_of_sigma(min(sigma, 1.0 - 1e-6))


class UniPCSolver:
    """UniPC multistep solver for a flow model (x0-predictor form, UniP predictor + UniC corrector).

    Matches diffusers `UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True)` with its
    defaults (predict_x0, bh2, lower_order_final, final σ 0) when given the same σ grid. Call `step(v, x)` once per
    σ of the grid except the last; it returns x at the next σ. A step onto σ = 0 is always first order.
    """

    def __init__(
        self,
        sigmas: Sequence[float] | Tensor,
        order: int = 2,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
    ) -> None:
        sig = _as_float_list(sigmas, "sigmas")
        if len(sig) < 2:
            raise ValueError("sigmas needs at least 2 values (start and end)")
        if any(b >= a for a, b in zip(sig[:-1], sig[1:-1], strict=False)) or sig[-1] > sig[-2]:
            raise ValueError("sigmas must be strictly decreasing (only the final value may repeat the one before)")
        if any(s <= 0.0 for s in sig[:-1]) or sig[-1] < 0.0 or sig[0] > 1.0:
            raise ValueError("sigmas must lie in (0, 1], with only the last allowed to be 0")
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2 (got {order})")
        if solver_type not in ("bh1", "bh2"):
            raise ValueError(f"solver_type must be 'bh1' or 'bh2' (got {solver_type!r})")
        self.sigmas = sig
        self.order = order
        self.solver_type = solver_type
        self.lower_order_final = lower_order_final
        self.step_index = 0
        self._x0_history: list[Tensor] = []  # x0 predictions at sigmas[step_index - k], newest last
        self._last_sample: Tensor | None = None  # sample the last predictor started from
        self._last_order = 0

    @property
    def num_steps(self) -> int:
        return len(self.sigmas) - 1

    @property
    def done(self) -> bool:
        return self.step_index >= self.num_steps

    @property
    def sigma(self) -> float:
        """σ of the sample the next `step` expects."""
        return self.sigmas[min(self.step_index, self.num_steps)]

    def state_dict(self) -> dict[str, Tensor]:
        """The solver's progress as tensors (step index, order, x0 history, last sample), for snapshots."""
        state = {"step_index": torch.tensor(self.step_index), "last_order": torch.tensor(self._last_order)}
        for k, x0 in enumerate(self._x0_history):
            state[f"x0.{k}"] = x0.detach().clone()
        if self._last_sample is not None:
            state["last_sample"] = self._last_sample.detach().clone()
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore `state_dict()` into a solver built on the same σ grid."""
        step = int(state["step_index"])
        if not 0 <= step <= self.num_steps:
            raise ValueError(f"step_index {step} does not fit this {self.num_steps}-step solver")
        self.step_index = step
        self._last_order = int(state.get("last_order", torch.tensor(0)))
        self._x0_history = [state[f"x0.{k}"].clone() for k in range(self.order) if f"x0.{k}" in state]
        last = state.get("last_sample")
        self._last_sample = None if last is None else last.clone()

    def _b_h(self, hh: float) -> float:
        return math.expm1(hh) if self.solver_type == "bh2" else hh

    def _correct(self, x: Tensor, x0_new: Tensor) -> Tensor:
        """UniC: refine the sample at σ_i using the x0 prediction just made there."""
        i = self.step_index
        last = self._last_sample
        if last is None:
            return x
        s0, t = self.sigmas[i - 1], self.sigmas[i]
        m0 = self._x0_history[-1]  # x0 at σ_{i−1}
        lam_s0 = _safe_lambda(s0)
        h = _safe_lambda(t) - lam_s0
        hh = -h
        phi1 = math.expm1(hh)
        b_h = self._b_h(hh)
        order = self._last_order
        # Step 1: the b-vector of the B(h) family, b_k = k!·φ_{k+1}(hh)/B(h).
        b: list[float] = []
        h_phi_k = phi1 / hh - 1.0
        fact = 1
        for k in range(1, order + 1):
            b.append(h_phi_k * fact / b_h)
            fact *= k + 1
            h_phi_k = h_phi_k / hh - 1.0 / fact
        # Step 2: corrector weights ρ (order 1: the trapezoid 1/2; order 2: solve [[1, 1], [r1, 1]]·ρ = b).
        alpha_t = 1.0 - t
        base = (t / s0) * last - (alpha_t * phi1) * m0
        d1_t = x0_new - m0
        if order == 1:
            return base - (alpha_t * b_h * 0.5) * d1_t
        r1 = (_safe_lambda(self.sigmas[i - 2]) - lam_s0) / h
        rho0 = (b[0] - b[1]) / (1.0 - r1)
        rho1 = b[0] - rho0
        d1 = (self._x0_history[-2] - m0) / r1
        return base - (alpha_t * b_h) * (rho0 * d1 + rho1 * d1_t)

    def _predict(self, x: Tensor, order: int) -> Tensor:
        """UniP: from σ_i to σ_{i+1} with the newest x0 prediction(s)."""
        i = self.step_index
        s0, t = self.sigmas[i], self.sigmas[i + 1]
        m0 = self._x0_history[-1]
        if t == 0.0:
            return m0  # the exact limit of the first-order update at σ = 0
        lam_s0 = _safe_lambda(s0)
        h = _safe_lambda(t) - lam_s0
        hh = -h
        phi1 = math.expm1(hh)
        alpha_t = 1.0 - t
        out = (t / s0) * x - (alpha_t * phi1) * m0
        if order == 2:
            r1 = (_safe_lambda(self.sigmas[i - 1]) - lam_s0) / h
            d1 = (self._x0_history[-2] - m0) / r1
            out = out - (alpha_t * self._b_h(hh) * 0.5) * d1
        return out

    def step(self, velocity: Tensor, sample: Tensor) -> Tensor:
        """One solver step: `sample` is at `self.sigma`, `velocity` the model output there; returns the next x."""
        if self.done:
            raise ValueError(f"UniPCSolver already took all {self.num_steps} steps")
        dtype = sample.dtype
        work = torch.promote_types(dtype, torch.float32)
        x = sample.to(work)
        # Step 1: model output → x0 prediction at σ_i.
        x0 = x - self.sigmas[self.step_index] * velocity.to(work)
        # Step 2: corrector on the sample the previous predictor produced.
        if self.step_index > 0:
            x = self._correct(x, x0)
        # Step 3: history and order (warm-up: order 1 first; lower_order_final: order 1 on the last step).
        self._x0_history = (self._x0_history + [x0])[-self.order :]
        order = min(self.order, len(self._x0_history))
        if self.lower_order_final:
            order = min(order, self.num_steps - self.step_index)
        if self.sigmas[self.step_index + 1] == 0.0:
            order = 1
        # Step 4: predictor to σ_{i+1}.
        x_next = self._predict(x, order)
        self._last_sample = x
        self._last_order = order
        self.step_index += 1
        return x_next.to(dtype)


def unipc_sample(
    denoise_fn: DenoiseFn,
    noise: Tensor,
    sigmas: Sequence[float] | Tensor,
    *,
    timesteps: Sequence[float] | Tensor | None = None,
    order: int = 2,
    solver_type: str = "bh2",
    lower_order_final: bool = True,
    callback: StepCallback | None = None,
) -> Tensor:
    """UniPC sampling over `sigmas` (e.g. `unipc_flow_schedule(n, shift)`); t = 1000·σ unless `timesteps` given."""
    solver = UniPCSolver(sigmas, order=order, solver_type=solver_type, lower_order_final=lower_order_final)
    ts = _model_timesteps(solver.sigmas, timesteps)
    x = noise  # [B, C, F, H, W]
    for i, t in enumerate(ts):
        v = denoise_fn(x, _frame_timesteps(x, t))
        x = solver.step(v, x)
        if callback is not None:
            callback(i, t, x)
    return x
