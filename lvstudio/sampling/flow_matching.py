"""Flow matching (rectified flow) as used by Wan2.1 and the models built on it.

    x_σ = (1 − σ)·x0 + σ·ε,   ε ~ N(0, I),   model timestep t = 1000·σ,   model output v = ε − x0

Conversions: x0 = x_σ − σ·v;  ε = x_σ + (1 − σ)·v;  v = (x_σ − x0)/σ.
Timestep shift: σ' = shift·σ / (1 + (shift − 1)·σ) (pushes a uniform grid toward high noise for shift > 1).

σ arguments broadcast over latents `[B, C, F, H, W]`: a Python float or 0-d tensor (everything), a `[B]` tensor
(one σ per sample) or a `[B, F]` tensor (one σ per frame, Diffusion Forcing).

`FlowMatchTable` is the discrete table of Self-Forcing / CausVid / Stable-Video-Infinity
(`FlowMatchScheduler(shift, sigma_min=0, extra_one_step=True)`): every lookup takes the nearest table entry.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

SigmaLike = float | Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are combined in float32; float32/float64 stay as they are."""
    return torch.promote_types(dtype, torch.float32)


def _sigma_like(sigma: SigmaLike, x: Tensor) -> Tensor | float:
    """Reshape σ so that it broadcasts over `x` ([B, C, F, H, W] for per-frame σ)."""
    if not isinstance(sigma, Tensor):
        return float(sigma)
    dtype = _compute_dtype(x.dtype)
    if sigma.ndim == 0:
        return sigma.to(device=x.device, dtype=dtype)
    if sigma.ndim == 1:
        if sigma.shape[0] not in (1, x.shape[0]):
            raise ValueError(f"a 1-D sigma is per sample: expected {x.shape[0]} values, got {sigma.shape[0]}")
        return sigma.to(device=x.device, dtype=dtype).view(-1, *([1] * (x.ndim - 1)))
    if sigma.ndim == 2:
        if x.ndim != 5:
            raise ValueError(f"a [B, F] sigma needs latents [B, C, F, H, W], got shape {tuple(x.shape)}")
        if sigma.shape[0] not in (1, x.shape[0]) or sigma.shape[1] not in (1, x.shape[2]):
            raise ValueError(
                f"per-frame sigma must be [B, F] = [{x.shape[0]}, {x.shape[2]}], got {tuple(sigma.shape)}"
            )
        return sigma.to(device=x.device, dtype=dtype)[:, None, :, None, None]  # [B, 1, F, 1, 1]
    raise ValueError(f"sigma must be a scalar, [B] or [B, F]; got shape {tuple(sigma.shape)}")


def add_noise(x0: Tensor, noise: Tensor, sigma: SigmaLike) -> Tensor:
    """x_σ = (1 − σ)·x0 + σ·ε (σ scalar, [B] or per frame [B, F])."""
    if x0.shape != noise.shape:
        raise ValueError(f"x0 {tuple(x0.shape)} and noise {tuple(noise.shape)} must have the same shape")
    s = _sigma_like(sigma, x0)
    dtype = _compute_dtype(x0.dtype)
    return ((1 - s) * x0.to(dtype) + s * noise.to(dtype)).to(x0.dtype)


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The flow-matching training target v = ε − x0."""
    return noise - x0


def x0_from_velocity(x_t: Tensor, v: Tensor, sigma: SigmaLike) -> Tensor:
    """x0 = x_σ − σ·v."""
    s = _sigma_like(sigma, x_t)
    dtype = _compute_dtype(x_t.dtype)
    return (x_t.to(dtype) - s * v.to(dtype)).to(x_t.dtype)


def noise_from_velocity(x_t: Tensor, v: Tensor, sigma: SigmaLike) -> Tensor:
    """ε = x_σ + (1 − σ)·v."""
    s = _sigma_like(sigma, x_t)
    dtype = _compute_dtype(x_t.dtype)
    return (x_t.to(dtype) + (1 - s) * v.to(dtype)).to(x_t.dtype)


def velocity_from_x0(x_t: Tensor, x0: Tensor, sigma: SigmaLike) -> Tensor:
    """v = (x_σ − x0)/σ; σ must be > 0."""
    if not isinstance(sigma, Tensor) and float(sigma) <= 0.0:
        raise ValueError(f"velocity_from_x0 needs sigma > 0 (got {sigma}); at sigma = 0 the velocity is undefined")
    s = _sigma_like(sigma, x_t)
    dtype = _compute_dtype(x_t.dtype)
    return ((x_t.to(dtype) - x0.to(dtype)) / s).to(x_t.dtype)


def _check_shift(shift: float) -> None:
    if not shift > 0:
        raise ValueError(f"shift must be > 0 (got {shift})")


def shift_sigma(sigma: SigmaLike | np.ndarray, shift: float) -> SigmaLike | np.ndarray:
    """σ' = shift·σ / (1 + (shift − 1)·σ); works on floats, tensors and numpy arrays."""
    _check_shift(shift)
    return shift * sigma / (1 + (shift - 1) * sigma)


def _check_steps(num_steps: int) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1 (got {num_steps})")


def sigma_grid(num_steps: int, shift: float = 1.0, sigma_max: float = 1.0, sigma_min: float = 0.0) -> Tensor:
    """Descending float64 σ grid with `num_steps + 1` entries, the last one 0.

    σ = shift(linspace(sigma_max, sigma_min, n + 1)[:-1]) ‖ [0]. Presets:
    Self-Forcing/CausVid Euler (1.0, 0.0); diffusers UniPC/flow (1.0, 1/1000); Wan official UniPC (0.999, 0.0).
    """
    _check_steps(num_steps)
    _check_shift(shift)
    if not 0.0 <= sigma_min < sigma_max <= 1.0:
        raise ValueError(f"need 0 <= sigma_min < sigma_max <= 1 (got sigma_min={sigma_min}, sigma_max={sigma_max})")
    base = np.linspace(sigma_max, sigma_min, num_steps + 1)[:-1]  # numpy: same rounding as the reference code
    grid = np.concatenate([shift_sigma(base, shift), [0.0]])
    return torch.from_numpy(grid)


def unipc_flow_schedule(num_steps: int, shift: float, num_train_timesteps: int = 1000) -> tuple[Tensor, Tensor]:
    """(sigmas float32 [n+1], timesteps int64 [n]) exactly as diffusers
    `UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift)` sets them:
    σ = shift(linspace(1, 1/T, n + 1)[:-1]), σ₀ nudged to 1 − 1e-6, timesteps = int(1000·σ), final σ 0.

    These integer timesteps are also the SkyReels-V2 DF `step_template`.
    """
    _check_steps(num_steps)
    grid = sigma_grid(num_steps, shift, 1.0, 1.0 / num_train_timesteps).numpy()[:-1].copy()
    if abs(grid[0] - 1.0) < 1e-6:
        grid[0] -= 1e-6  # keeps log(σ) finite in the multistep update
    timesteps = torch.from_numpy(grid * num_train_timesteps).to(torch.int64)  # truncation, like the reference
    sigmas = torch.from_numpy(np.concatenate([grid, [0.0]]).astype(np.float32))
    return sigmas, timesteps


class FlowMatchTable:
    """Discrete shifted σ table with nearest-entry lookups (Self-Forcing `FlowMatchScheduler(shift, sigma_min=0,
    extra_one_step=True)`; training uses 1000 entries).

    sigmas [n] float32 = shift(linspace(σ_start, σ_min, n + 1)[:-1]), timesteps = T·sigmas, and the "bsmntw"
    training weights [n] (Gaussian bump in t around T/2, shifted to min 0, mean 1).
    """

    def __init__(
        self,
        shift: float = 5.0,
        num_steps: int = 1000,
        num_train_timesteps: int = 1000,
        sigma_max: float = 1.0,
        sigma_min: float = 0.0,
    ) -> None:
        _check_shift(shift)
        if not 0.0 <= sigma_min < sigma_max <= 1.0:
            raise ValueError(f"need 0 <= sigma_min < sigma_max <= 1 (got {sigma_min}, {sigma_max})")
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be >= 1 (got {num_train_timesteps})")
        self.shift = float(shift)
        self.num_train_timesteps = int(num_train_timesteps)
        self.sigma_max = float(sigma_max)
        self.sigma_min = float(sigma_min)
        self.sigmas = torch.empty(0)
        self.timesteps = torch.empty(0)
        self.weights = torch.empty(0)
        self.set_timesteps(num_steps)

    def __len__(self) -> int:
        return int(self.sigmas.shape[0])

    def set_timesteps(self, num_steps: int, denoising_strength: float = 1.0) -> None:
        """Rebuild the table with `num_steps` entries (1000 for training, e.g. 50 for a teacher Euler run)."""
        _check_steps(num_steps)
        if not 0.0 < denoising_strength <= 1.0:
            raise ValueError(f"denoising_strength must be in (0, 1] (got {denoising_strength})")
        start = self.sigma_min + (self.sigma_max - self.sigma_min) * denoising_strength
        base = torch.linspace(start, self.sigma_min, num_steps + 1, dtype=torch.float32)[:-1]
        self.sigmas = shift_sigma(base, self.shift)  # [n]
        self.timesteps = self.sigmas * self.num_train_timesteps  # [n]
        # "bsmntw" weights: exp(-2((t - T/2)/T)^2), minus its minimum, scaled to mean 1 (peak near t = T/2).
        scale = float(self.num_train_timesteps)
        bump = torch.exp(-2 * ((self.timesteps - scale / 2) / scale) ** 2)
        bump = bump - bump.min()
        total = bump.sum()
        self.weights = bump * (num_steps / total) if total > 0 else torch.ones_like(bump)

    def index_of(self, t: SigmaLike) -> Tensor:
        """Index of the table entry nearest to timestep(s) t (1000-scale); same shape as t."""
        tt = torch.as_tensor(t, dtype=torch.float32)
        table = self.timesteps.to(tt.device)
        return (tt.unsqueeze(-1) - table).abs().argmin(dim=-1)

    def sigma_at(self, t: SigmaLike) -> Tensor:
        """σ of the nearest table entry for timestep(s) t."""
        idx = self.index_of(t)
        return self.sigmas.to(idx.device)[idx]

    def training_weight(self, t: SigmaLike) -> Tensor:
        """bsmntw loss weight of the nearest table entry for timestep(s) t."""
        idx = self.index_of(t)
        return self.weights.to(idx.device)[idx]

    def add_noise(self, x0: Tensor, noise: Tensor, t: SigmaLike) -> Tensor:
        """(1 − σ)·x0 + σ·ε with σ looked up from t (scalar, [B] or per frame [B, F])."""
        sigma = self.sigma_at(t)
        return add_noise(x0, noise, sigma if sigma.ndim else float(sigma))

    def x0_from_velocity(self, x_t: Tensor, v: Tensor, t: SigmaLike) -> Tensor:
        """x0 = x_t − σ(t)·v with the table's σ."""
        sigma = self.sigma_at(t)
        return x0_from_velocity(x_t, v, sigma if sigma.ndim else float(sigma))

    def training_target(self, x0: Tensor, noise: Tensor) -> Tensor:
        """v = ε − x0."""
        return velocity_target(x0, noise)

    def step(self, v: Tensor, t: SigmaLike, x_t: Tensor) -> Tensor:
        """Euler step from the entry nearest t to the next entry (σ = 0 after the last one)."""
        idx = self.index_of(t)
        padded = torch.cat([self.sigmas, self.sigmas.new_zeros(1)])
        sigma, sigma_next = padded[idx], padded[idx + 1]
        dt = sigma_next - sigma
        return x_t + _sigma_like(dt if dt.ndim else float(dt), x_t) * v

    def warp(self, steps: Sequence[float]) -> list[float]:
        """Self-Forcing step warping on this table: t ↦ (timesteps ‖ [0])[T − t] (needs a T-entry table)."""
        if len(self) != self.num_train_timesteps:
            raise ValueError(
                f"warping indexes a {self.num_train_timesteps}-entry table; call set_timesteps"
                f"({self.num_train_timesteps}) first (table has {len(self)})"
            )
        padded = torch.cat([self.timesteps, self.timesteps.new_zeros(1)])
        out: list[float] = []
        for step in steps:
            s = float(step)
            if s != round(s) or not 0 <= s <= self.num_train_timesteps:
                raise ValueError(f"warped steps must be integers in [0, {self.num_train_timesteps}] (got {step})")
            out.append(float(padded[self.num_train_timesteps - int(round(s))]))
        return out


def warp_steps(steps: Sequence[float], shift: float, num_train_timesteps: int = 1000) -> list[float]:
    """Self-Forcing `warp_denoising_step`: map a uniform few-step list onto the shifted 1000-entry table.

    [1000, 750, 500, 250], shift 5 → [1000, 937.5, 833.33, 625.0]; shift 8 → [1000, 960, 888.9, 727.3].
    """
    table = FlowMatchTable(shift=shift, num_steps=num_train_timesteps, num_train_timesteps=num_train_timesteps)
    return table.warp(steps)


def sample_training_sigma(
    table: FlowMatchTable,
    batch_size: int,
    num_frames: int,
    generator: torch.Generator | None = None,
    frames_per_block: int = 1,
    device: torch.device | str | None = None,
) -> Tensor:
    """Diffusion-forcing training σ [B, F]: a uniform index into the (shifted) table per block of frames.

    Model timestep t = table.num_train_timesteps·σ; loss weight `table.training_weight(t)`.
    """
    if batch_size < 1 or num_frames < 1:
        raise ValueError(f"batch_size and num_frames must be >= 1 (got {batch_size}, {num_frames})")
    if frames_per_block < 1 or num_frames % frames_per_block:
        raise ValueError(f"num_frames={num_frames} must be a positive multiple of frames_per_block={frames_per_block}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    num_blocks = num_frames // frames_per_block
    idx = torch.randint(0, len(table), (batch_size, num_blocks), generator=generator, device=gen_device)
    sigma = table.sigmas.to(gen_device)[idx].repeat_interleave(frames_per_block, dim=1)  # [B, F]
    return sigma.to(device) if device is not None else sigma


def sample_dmd_sigma(
    batch_size: int,
    num_frames: int,
    shift: float,
    generator: torch.Generator | None = None,
    uniform: bool = True,
    frames_per_block: int = 1,
    min_timestep: int = 0,
    max_timestep: int = 1000,
    clamp: tuple[float, float] = (20.0, 980.0),
    num_train_timesteps: int = 1000,
    device: torch.device | str | None = None,
) -> Tensor:
    """DMD / critic σ [B, F]: integer t in [min_timestep, max_timestep), shifted, clamped to `clamp` (1000-scale).

    uniform=True uses one t per sample for all frames (Self-Forcing `uniform_timestep`); otherwise one per block.
    """
    _check_shift(shift)
    if batch_size < 1 or num_frames < 1:
        raise ValueError(f"batch_size and num_frames must be >= 1 (got {batch_size}, {num_frames})")
    if not 0 <= min_timestep < max_timestep <= num_train_timesteps:
        raise ValueError(f"need 0 <= min_timestep < max_timestep <= {num_train_timesteps}")
    if frames_per_block < 1 or num_frames % frames_per_block:
        raise ValueError(f"num_frames={num_frames} must be a positive multiple of frames_per_block={frames_per_block}")
    gen_device = generator.device if generator is not None else torch.device("cpu")
    cols = 1 if uniform else num_frames // frames_per_block
    t = torch.randint(min_timestep, max_timestep, (batch_size, cols), generator=generator, device=gen_device)
    t = t.to(torch.float32)
    t = shift_sigma(t / num_train_timesteps, shift) * num_train_timesteps
    t = t.clamp(clamp[0], clamp[1])
    repeat = num_frames if uniform else frames_per_block
    sigma = (t / num_train_timesteps).repeat_interleave(repeat, dim=1)  # [B, F]
    return sigma.to(device) if device is not None else sigma


def timesteps_from_sigma(sigma: Tensor, num_train_timesteps: int = 1000) -> Tensor:
    """Model timestep t = T·σ."""
    return sigma * num_train_timesteps


def lambda_of_sigma(sigma: float) -> float:
    """Half log-SNR of flow matching, log((1 − σ)/σ) (+inf at σ = 0, −inf at σ = 1)."""
    if sigma <= 0.0:
        return math.inf
    if sigma >= 1.0:
        return -math.inf
    return math.log1p(-sigma) - math.log(sigma)
