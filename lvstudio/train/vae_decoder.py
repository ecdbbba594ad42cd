"""Decoder tuning of the tiny VAE on a DiT's last-step estimates (`lvstudio train vae-decoder CONFIG.toml`).

The sampler's last step makes the output latents out of the DiT's x0 estimate at the last σ (Euler 3 at shift 2,
σ 1 → 0.8 → 0.5 → 0, and the shipped re-noising sampler on the same grid: σ = 0.5). That estimate is a
conditional mean: the layout is decided, object edges are soft, and the VAE decoder was trained on clean latents.
As LTX-Video has its decoder do the last denoising step, this recipe teaches the decoder to draw the world's frames
from the DiT's estimates of their own latents:

  world clip → frozen encoder → z0; per block of latents, z_σ = (1 − σ) z0 + σ ε (σ uniform in sigma_range) with the
  block's past clean (as the causal-KV backend's cache holds it) and the clip's caption → DiT → x0 estimate;
  decoder(estimate) ≈ the clip (the VAE recipe's L1 + MSE + edge loss, objects weighted).

A share of the batch (1 − estimate_prob) decodes clean latents with the VAE recipe's latent noise, and zero-history
restarts (what a cut does) stay in, so the decoder keeps what it did. Only the decoder trains: the encoder, hence
the latents and their statistics, do not move, so the DiT stays valid and the streaming decoder stays exact. Every
step's data and noise come from (seed, step), so a resumed run is the uninterrupted one.

On the tiny preset (README "Decoder tuning on the DiT's estimates") it removed stray fragments and flicker but not
wrong shapes, which were already in the DiT's estimates. With `fringe_weight` (the object weight also on the vivid
colours the decoder draws where the target has background) it removed most colour fringes by moving objects, and that
decoder ships (presets/tiny/train_vae_fringe.toml).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import model_validator
from torch import Tensor

from lvstudio.models.kv_cache import AttentionSpec
from lvstudio.models.tiny_vae import CONTINUE_KEY
from lvstudio.models.wan_dit import WanDiT
from lvstudio.sampling.flow_matching import add_noise, timesteps_from_sigma, x0_from_velocity
from lvstudio.train.common import (
    ConfigError,
    ConfigProblem,
    TrainConfigBase,
    check_inputs,
    train_device,
    world_size_problem,
)
from lvstudio.train.loop import (
    TrainLog,
    TrainLoop,
    load_checkpoint,
    lr_at,
    optimizer_step,
    save_checkpoint,
    set_lr,
    step_generator,
)

RECIPE = "vae-decoder"


class VaeDecoderConfig(TrainConfigBase):
    """What to tune (vae), with which DiT and text encoder (the preset's), on which clips, how."""

    path_fields: ClassVar[tuple[str, ...]] = ("out_dir", "vae", "dit", "text", "export")
    example: ClassVar[str] = "presets/tiny/train_vae_decoder.toml"

    vae: str  # the VAE whose decoder is tuned (its encoder and latent statistics are kept)
    dit: str  # the DiT whose estimates the decoder learns to draw (the preset's)
    text: str  # its text encoder
    clip_frames: int = 13  # pixel frames per world clip: 1 + 4k, the latents whole blocks
    size: int = 128  # world frame size (the DiT's)
    crop: int = 64  # decoder training crops (px, on the 8-px latent grid; 0 = whole frames)
    switch_prob: float = 0.3  # clips whose caption changes once (the captions follow, per block)
    estimate_prob: float = 0.6  # share of clips decoded from the DiT's estimates (the rest: clean + latent noise)
    sigma_range: tuple[float, float] = (0.25, 0.6)  # σ of the estimates, uniform (the samplers' last σ: 0.5, 0.4)
    latent_noise: float = 0.1  # clean clips: z + U(0, latent_noise) · ε (normalised latents)
    restart_prob: float = 0.25  # batches decoded from a random latent on with zero history (a cut)
    object_weight: float = 8.0  # loss weight on object pixels and their rim (`vae_recipe.object_pixel_weight`)
    fringe_weight: bool = False  # the same weight where the decoder draws a vivid colour the target lacks (fringes)
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    edge_weight: float = 0.5
    block_frames: int = 2  # latent frames per causal block (the preset's [attention])
    window_frames: int = 6
    sink_frames: int = 2
    export: str | None = None  # copy the tuned VAE here (e.g. presets/tiny/vae.safetensors)
    export_storage: Literal["float32", "float16", "int8"] = "float32"

    @model_validator(mode="after")
    def _check(self) -> VaeDecoderConfig:
        problem = world_size_problem(self.size)  # the tuning clips are the world's
        if problem is not None:
            raise problem
        latents = 1 + (self.clip_frames - 1) // 4
        if self.clip_frames < 5 or (self.clip_frames - 1) % 4 or latents % self.block_frames:
            raise ConfigProblem("clip_frames", f"clip_frames = {self.clip_frames} must be 1 + 4k with 1 + k latents a "
                                f"multiple of block_frames = {self.block_frames}",
                                f"set clip_frames to e.g. {1 + 4 * (2 * self.block_frames - 1)}")
        if self.size % 8 or self.crop % 8 or not 0 <= self.crop <= self.size:
            raise ConfigProblem("crop", f"size = {self.size} and crop = {self.crop} must be multiples of 8 with crop "
                                "<= size", "set crop to a multiple of 8 up to size (0: whole frames)")
        lo, hi = self.sigma_range
        if not 0.0 < lo <= hi <= 1.0:
            raise ConfigProblem("sigma_range", f"{list(self.sigma_range)} must satisfy 0 < low <= high <= 1",
                                "set it to [low, high] in (0, 1], e.g. [0.25, 0.6]")
        return self

    @property
    def spec(self) -> AttentionSpec:
        return AttentionSpec(self.block_frames, self.window_frames, self.sink_frames)


# ---------------------------------------------------------------------------------------------------------------
# The DiT's estimates
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def dit_estimates(dit: WanDiT, context: Tensor, z0: Tensor, sigma: Tensor, noise: Tensor,
                  spec: AttentionSpec) -> Tensor:
    """x0 estimates [B, C, F, h, w] of clean latents z0 [B, C, F, h, w], block by block: block k noised to
    (1 − σ) z0 + σ ε (σ [B], ε `noise` like z0), its past clean at timestep 0, one block-causal forward with that
    block's text features context [B, K, text_len, text_dim]; estimate = z_σ − σ v."""
    b, n = z0.shape[0], spec.block_frames
    t = timesteps_from_sigma(sigma.float()).to(z0.device)  # [B]
    out = []
    for k in range(z0.shape[2] // n):
        lo, hi = k * n, (k + 1) * n
        z_s = add_noise(z0[:, :, lo:hi], noise[:, :, lo:hi], sigma)  # [B, C, n, h, w]
        x = torch.cat([z0[:, :, :lo], z_s], dim=2)  # [B, C, hi, h, w]
        tt = torch.cat([torch.zeros(b, lo, device=z0.device), t[:, None].expand(b, n)], dim=1)  # [B, hi]
        v = dit(x, tt, dit.new_conditioning(context[:, k]), attention=spec)
        out.append(x0_from_velocity(z_s, v[:, :, lo:], sigma))
    return torch.cat(out, dim=2)


def block_captions(captions: list[str], num_latents: int, block_frames: int) -> list[str]:
    """The caption of each block of latents: that of its last pixel frame (latent l ends at frame 4l), where a
    prompt switch inside the block has taken effect."""
    return [captions[4 * ((k + 1) * block_frames - 1)] for k in range(num_latents // block_frames)]


# ---------------------------------------------------------------------------------------------------------------
# The recipe
# ---------------------------------------------------------------------------------------------------------------


def tuning_batch(cfg: VaeDecoderConfig, vae: torch.nn.Module, dit: WanDiT, text: torch.nn.Module,
                 rng: np.random.Generator, gen: torch.Generator, device: torch.device) -> tuple[Tensor, Tensor]:
    """One step's decoder inputs (raw latents [B, z, f, c, c] of a crop) and targets (its pixels [B, 3, F, 8c, 8c]):
    world clips through the frozen encoder, then per clip the DiT's estimate at a random σ or the clean latents with a
    little noise."""
    from lvstudio.world import sample_clip

    mean, std = (t.view(1, -1, 1, 1, 1) for t in (vae.latents_mean, vae.latents_std))  # [1, z, 1, 1, 1]
    cells = cfg.crop // 8 if cfg.crop else cfg.size // 8
    # 1. World clips [B, 3, F, H, W] in [-1, 1] and their captions.
    clips = [sample_clip(int(rng.integers(2**31 - 1)), cfg.clip_frames, size=cfg.size, switch_prob=cfg.switch_prob)
             for _ in range(cfg.batch_size)]
    x = torch.from_numpy(np.stack([c.frames for c in clips])).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
    x = x.to(device)
    with torch.no_grad():
        # 2. Frozen encoder → normalised latents z0 [B, z, f, h, w].
        z0 = (vae.encode_raw(x)[0] - mean) / std
        # 3. Per clip: the DiT's estimate at a random σ, or clean latents with a little noise.
        pick = torch.rand(cfg.batch_size, generator=gen) < cfg.estimate_prob
        lo, hi = cfg.sigma_range
        sigma = lo + (hi - lo) * torch.rand(cfg.batch_size, generator=gen)
        noise = torch.randn(z0.shape, generator=gen).to(device)
        level = torch.rand(cfg.batch_size, 1, 1, 1, 1, generator=gen).to(device) * cfg.latent_noise
        z_in = z0 + level * noise
        rows = torch.nonzero(pick).flatten()
        if len(rows):
            caps = [block_captions(clips[int(i)].captions, z0.shape[2], cfg.block_frames) for i in rows]
            ids, _ = text.tokenize([c for cc in caps for c in cc])
            context = text(ids.to(device)).unflatten(0, (len(rows), -1))  # [b, K, text_len, text_dim]
            r = rows.to(device)
            z_in[r] = dit_estimates(dit, context, z0[r], sigma[rows], noise[r], cfg.spec)
        raw = z_in * std + mean
        # 4. A crop on the latent grid, the pixels under it.
        top, left = (int(v) for v in rng.integers(0, cfg.size // 8 - cells + 1, size=2))
        raw = raw[..., top : top + cells, left : left + cells]
        x = x[..., 8 * top : 8 * (top + cells), 8 * left : 8 * (left + cells)]
    return raw, x


def train_vae_decoder(cfg: VaeDecoderConfig, *, progress: bool = True) -> dict:
    """Tune the decoder of cfg.vae (resumes from out_dir/checkpoint.safetensors); writes out_dir/vae.safetensors
    (float32, the base's latent statistics) and, if set, cfg.export in cfg.export_storage."""
    from lvstudio.models.tiny_text import load_text_encoder
    from lvstudio.models.tiny_vae import load_vae, save_vae
    from lvstudio.models.weight_storage import store_weights
    from lvstudio.presets.load import load_dit
    from lvstudio.train.sharding import refuse_fsdp
    from lvstudio.train.vae_recipe import reconstruction_terms

    refuse_fsdp(cfg.fsdp, "vae-decoder", "the tiny VAE's decoder tunes in one process")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = train_device(cfg.device)
    out = Path(cfg.out_dir)
    check_inputs(cfg, ("vae", "dit", "text"))
    out.mkdir(parents=True, exist_ok=True)  # once the inputs are there: a refused run leaves no empty out_dir
    vae = load_vae(cfg.vae, device=device)
    dit = load_dit(Path(cfg.dit)).to(device).requires_grad_(False)
    text = load_text_encoder(cfg.text).to(device).requires_grad_(False)
    if dit.cfg.in_dim != vae.config.z_dim:
        raise ConfigError(f"dit = {cfg.dit} takes {dit.cfg.in_dim} latent channels, vae = {cfg.vae} makes "
                         f"{vae.config.z_dim}: use the DiT trained on this VAE's latents")
    vae.encoder.requires_grad_(False)
    vae.decoder.train(True)
    opt = torch.optim.AdamW(vae.decoder.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    ckpt = out / "checkpoint.safetensors"
    start = load_checkpoint(ckpt, vae, opt, None, expected=RECIPE)[0] if ckpt.exists() else 0
    log = TrainLog(out, True)

    def one_step(step: int) -> dict[str, float]:
        rng, gen = step_generator(cfg.seed, step, 0)
        lr = set_lr(opt, lr_at(step, cfg.lr, cfg.warmup_steps, cfg.decay_start, cfg.steps, cfg.min_lr))
        raw, x = tuning_batch(cfg, vae, dit, text, rng, gen, device)  # steps 1-4
        f = raw.shape[2]
        # 5. Decode (from a random latent with zero history when restarting), the VAE recipe's loss, AdamW.
        if f > 1 and float(torch.rand((), generator=gen)) < cfg.restart_prob:
            k = int(torch.randint(1, f, (), generator=gen))
            recon, x = vae.decode_raw(raw[:, :, k:], {CONTINUE_KEY: torch.ones(())}), x[:, :, 4 * k - 3 :]
        else:
            recon = vae.decode_raw(raw)
        terms = reconstruction_terms(recon, x, cfg.object_weight, cfg.fringe_weight)
        loss = cfg.l1_weight * terms["l1"] + cfg.mse_weight * terms["mse"] + cfg.edge_weight * terms["edge"]
        grad_norm = optimizer_step(opt, loss, vae.decoder.parameters(), cfg.grad_clip)
        return {"loss": float(loss.detach()), **{k: float(v.detach()) for k, v in terms.items()},
                "grad_norm": grad_norm, "lr": lr}

    loop = TrainLoop.for_config(cfg, start=start, report=log.report, progress=progress, description="vae decoder",
                                checkpoint=lambda step: save_checkpoint(ckpt, vae, opt, None, step,
                                                                        {"recipe": RECIPE}))
    step, last = loop.run(one_step)
    # 6. The tuned VAE (same encoder and statistics), and its shipped copy.
    path = out / "vae.safetensors"
    save_vae(vae.train(False), path)
    if cfg.export:
        store_weights(path, cfg.export, cfg.export_storage)
    (out / "result.json").write_text(json.dumps({"step": step, "loss": last.get("loss", math.nan)}, indent=2))
    return {"step": step, "loss": last.get("loss", math.nan), "out_dir": str(out), "vae": str(path)}
