"""Streaming-buffer training (StreamDiT style): `lvstudio train streaming CONFIG.toml`.

A training sample is one state of the moving buffer used by the streaming-DiT backend: N chunks of c latent frames,
chunk n at the noise level the partition gives it at a random micro-step. The partition scheme (N, s) is drawn per
step from a set (mixed training, so one model serves several schemes). Loss:
  - flow matching on every frame at its own level (object-weighted, like diffusion forcing);
  - a buffer-boundary consistency term: the chunk about to leave the buffer must agree with what the previous buffer
    state (one micro-step earlier, every frame one level noisier) predicted for it — x0 predictions compared, the
    earlier one without gradient.
Everything else (data, DDP, EMA, checkpoints, resume) is the diffusion-forcing run (`run_training`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import Tensor, nn

from lvstudio.models.kv_cache import AttentionSpec
from lvstudio.sampling.flow_matching import add_noise, sigma_grid, velocity_target
from lvstudio.sampling.schedules import stream_partition_levels
from lvstudio.train.common import ConfigProblem
from lvstudio.train.data import Batch, LatentDataset
from lvstudio.train.diffusion_forcing import DFConfig, flow_error, run_training
from lvstudio.train.loop import unwrap


class StreamConfig(DFConfig):
    """`lvstudio train streaming CONFIG.toml` (all diffusion-forcing fields, plus the buffer schemes)."""

    example: ClassVar[str] = "presets/tiny/train_stream.toml"

    partitions: list[tuple[int, int]] = Field(default_factory=lambda: [(3, 1), (3, 2), (2, 2)])  # (chunks N, micro s)
    consistency_weight: float = 0.5
    stream_shift: float = 2.0

    def window_problem(self) -> ConfigProblem | None:
        """The diffusion-forcing windows, and each buffer scheme (N chunks of block_frames, s micro-steps) fits in
        one (None: they do)."""
        problem = super().window_problem()
        if problem is not None:
            return problem
        if not self.partitions:
            return ConfigProblem("partitions", "there is no buffer scheme", "set partitions = [[3, 1], [2, 2]]")
        for n, s in self.partitions:
            if n < 1 or s < 1:
                return ConfigProblem("partitions", f"[{n}, {s}]: a scheme needs at least 1 chunk and 1 micro-step",
                                     "give each scheme as [chunks, micro-steps], both 1 or more")
            if n * self.block_frames > self.latent_frames:
                return ConfigProblem("partitions", f"[{n}, {s}]: {n} chunks of block_frames = {self.block_frames} "
                                     f"are longer than latent_frames = {self.latent_frames}",
                                     f"use at most {self.latent_frames // self.block_frames} chunks, or longer "
                                     "training windows (latent_frames)")
        return None


def stream_sigmas(cfg: StreamConfig, batch: int, gen: torch.Generator) -> tuple[Tensor, Tensor, int]:
    """Per-frame sigma [B, N*c] of the current buffer state and of the previous one (every frame one level
    noisier), for a partition scheme drawn from cfg.partitions; returns (now, prev, N*c)."""
    c = cfg.block_frames
    n, s = cfg.partitions[int(torch.randint(len(cfg.partitions), (1,), generator=gen))]
    if n * c > cfg.latent_frames:
        raise ValueError(f"partition ({n} chunks x {c} frames) is longer than latent_frames={cfg.latent_frames}")
    part = stream_partition_levels(n, c, s, cfg.stream_shift)
    grid = sigma_grid(n * s, cfg.stream_shift).float()  # level k -> sigma; level 0 is pure noise
    j = torch.randint(s, (batch,), generator=gen)  # micro-step of each sample
    level = part.level_from[j]  # [B, N*c]
    return grid[level], grid[(level - 1).clamp_min(0)], n * c


def stream_loss(model: nn.Module, batch: Batch, cfg: StreamConfig, gen: torch.Generator) -> Tensor:
    """Flow matching on a staggered buffer + boundary consistency of the leaving chunk."""
    sig_now, sig_prev, length = stream_sigmas(cfg, batch.x0.shape[0], gen)  # drawn on the CPU generator
    x0 = batch.x0[:, :, :length]
    sig_now, sig_prev = sig_now.to(x0.device), sig_prev.to(x0.device)
    mask = batch.loss_mask[:, :length]
    eps = torch.randn(x0.shape, generator=gen).to(x0.device)
    ids = unwrap(model).text.tokenize(batch.prompts)[0].to(x0.device)
    spec = AttentionSpec(block_frames=cfg.block_frames)
    # Step 1: the current buffer state, every frame at its own level.
    x_now = add_noise(x0, eps, sig_now)
    v = model(x_now, sig_now * 1000, ids, spec)
    objects = None if batch.objects is None else batch.objects[:, :length]
    flow = flow_error(v, velocity_target(x0, eps), mask, objects, cfg.object_weight)
    if cfg.consistency_weight <= 0:
        return flow
    # Step 2: the previous state (one level noisier everywhere) predicted the leaving chunk too; agree with it.
    c = cfg.block_frames
    with torch.no_grad():
        x_prev = add_noise(x0, eps, sig_prev)
        v_prev = model(x_prev, sig_prev * 1000, ids, spec)
        x0_prev = x_prev[:, :, :c] - sig_prev[:, None, :c, None, None] * v_prev[:, :, :c]
    x0_now = x_now[:, :, :c] - sig_now[:, None, :c, None, None] * v[:, :, :c]
    cons = (x0_now - x0_prev).pow(2).mean(dim=(1, 3, 4))  # [B, c]
    cons = (cons * mask[:, :c]).sum() / mask[:, :c].sum().clamp_min(1.0)
    return flow + cfg.consistency_weight * cons


def train_streaming(cfg: StreamConfig, *, progress: bool = True, dataset: LatentDataset | None = None,
                    vocabulary: list[str] | None = None) -> dict:
    """Fine-tune (init_dit / init_text) or train a model for the streaming-DiT backend."""
    return run_training(cfg, stream_loss, "streaming", progress=progress, dataset=dataset, vocabulary=vocabulary)
