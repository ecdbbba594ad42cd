"""Self-Forcing distillation of the tiny preset into a few-step causal generator (`lvstudio train self-forcing`).

Three models share the tiny base's architecture and its (frozen) text encoder:
  - real score: the shipped base DiT, frozen; classifier-free guided  r = cond + g·(cond − uncond);
  - fake score (critic): initialised from the base, trained by flow matching on the generator's samples;
  - generator: initialised from the base or from the ODE init (`lvstudio.train.causal_distill`), trained by DMD.

Generator samples come from
  - the Self-Forcing rollout (`backward_simulation = True`): block by block over the rolling KV cache exactly as the
    causal-KV backend samples (few-step with fresh re-noising, then a clean context pass writing the cache); one random
    exit step per iteration, the only forward that keeps its graph; no backprop through time across blocks;
  - or CausVid's shortcut (`backward_simulation = False`): real data latents noised per block to a random step of the
    list, one block-causal forward.
`mode = "mixed-history"` is the non-distillation baseline: ordinary flow matching on the next block given a history
that is the generator's own (no-grad) reconstruction with probability p, else real latents.

Runs in one process or under torchrun: DDP-style with gradients all-reduced by hand (the rollout calls the generator
many times per backward, which DDP's single-forward bookkeeping does not allow), or with `--fsdp` (generator, critic
and the frozen real score sharded, `lvstudio.train.sharding`). Checkpoints (both models, both AdamW states, the
generator EMA) are one safetensors file in out_dir, or a sharded one under FSDP; the export is `dit.safetensors`
(generator EMA).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from lvstudio.models.kv_cache import AttentionSpec
from lvstudio.models.wan_dit import Conditioning, WanDiT, WanDiTConfig
from lvstudio.presets.schema import step_list_problem
from lvstudio.sampling.flow_matching import (
    FlowMatchTable,
    add_noise,
    sample_dmd_sigma,
    shift_sigma,
    velocity_target,
    warp_steps,
    x0_from_velocity,
)
from lvstudio.sampling.samplers import few_step_sample
from lvstudio.train.common import (
    ConfigError,
    ConfigProblem,
    DistInfo,
    TrainConfigBase,
    check_inputs,
    init_distributed,
    require_cpu,
    shutdown_distributed,
)
from lvstudio.train.data import LatentDataset
from lvstudio.train.loop import (
    EMA,
    TrainLog,
    TrainLoop,
    forward_precision,
    lr_at,
    optimizer_step,
    set_lr,
    step_generator,
    weights_digest,
)
from lvstudio.train.sharding import (
    check_fsdp,
    resume_run_checkpoint,
    save_run_checkpoint,
    shard_model,
    whole_tensors,
)

RealFn = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]  # (x_t, t [B, F]) -> (x0 cond, x0 uncond)
FakeFn = Callable[[Tensor, Tensor], Tensor]  # (x_t, t [B, F]) -> x0 (DMD) or velocity (critic)


class SelfForcingConfig(TrainConfigBase):
    """`lvstudio train self-forcing CONFIG.toml`. Paths are relative to the config file."""

    path_fields: ClassVar[tuple[str, ...]] = ("out_dir", "real_dit", "init_dit", "critic_dit", "text", "latents")
    example: ClassVar[str] = "presets/tiny/train_sf.toml"

    real_dit: str = "dit.safetensors"  # teacher / real score (the shipped base)
    init_dit: str | None = None  # generator init (base or ODE-init output); None = real_dit
    critic_dit: str | None = None  # fake-score init; None = real_dit
    text: str = "text.safetensors"  # frozen text encoder of the base
    latents: str | None = None  # LatentDataset of real windows (needed by mixed-history / backward_simulation=false)
    mode: Literal["dmd", "mixed-history"] = "dmd"
    backward_simulation: bool = True  # True: Self-Forcing rollout; False: CausVid (noised real latents)
    prompt_source: Literal["world", "dataset"] = "world"
    # Few-step sampler of the generator (what the [sampler] of a preset made from it says).
    step_list: list[float] = Field(default_factory=lambda: [1000.0, 750.0, 500.0, 250.0])
    warp: bool = True
    shift: float = 2.0
    last_step_only: bool = False  # always exit at the last step (no random exit)
    # Attention / rollout geometry (the tiny preset's [attention]).
    size: int = 128  # pixels; latents are size // 8
    block_frames: int = 2
    num_blocks: int = 3
    window_frames: int | None = 6
    sink_frames: int = 2
    rope_mode: Literal["absolute", "rebase"] = "rebase"
    context_noise: float = 0.0
    precision: Literal["float32", "bfloat16"] = "float32"  # "bfloat16": the steps' forward passes under autocast
    # DMD.
    guidance_scale: float = 2.0  # real score r = cond + g·(cond − uncond)  (= preset cfg_scale 1 + g)
    dmd_shift: float = 2.0  # shift of the DMD / critic timestep distribution
    dmd_clamp: tuple[float, float] = (20.0, 980.0)
    dfake_gen_update_ratio: int = 3  # generator step every this many iterations; critic every iteration
    lr: float = 1e-4
    lr_critic: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.999)
    grad_clip: float = 10.0
    warmup_steps: int = 10
    ema_decay: float = 0.99
    ema_start: int = 50
    # Mixed-history baseline.
    history_gen_prob: float = 0.5  # share of samples whose history is the generator's own reconstruction
    history_start_index: int = 1  # that reconstruction starts from real history noised to step_list[index]
    flow_shift: float = 1.0  # shift of the flow-matching σ of the trained block
    batch_size: int = 2

    @model_validator(mode="after")
    def _check(self) -> SelfForcingConfig:
        problem = step_list_problem(self.step_list, self.warp)
        if problem:
            raise ConfigProblem("step_list", problem, "fix the step list (e.g. [1000, 750, 500, 250])")
        if self.num_blocks < 1 or self.block_frames < 1:
            raise ConfigProblem("num_blocks", "num_blocks and block_frames must be >= 1", "set both to 1 or more")
        if self.dfake_gen_update_ratio < 1:
            raise ConfigProblem("dfake_gen_update_ratio", f"must be >= 1 (got {self.dfake_gen_update_ratio})",
                                "set it to 1 or more (a generator step every this many critic steps)")
        if not 0 <= self.history_start_index < len(self.step_list):
            raise ConfigProblem("history_start_index", f"must index step_list (0..{len(self.step_list) - 1}), got "
                                f"{self.history_start_index}", f"set it to 0..{len(self.step_list) - 1}")
        try:
            AttentionSpec(self.block_frames, self.window_frames, self.sink_frames)
        except ValueError as err:
            raise ConfigProblem("window_frames", str(err), "set window_frames to at least sink_frames + block_frames "
                                "(or remove it: unbounded)") from None
        return self

    @property
    def num_frames(self) -> int:
        return self.num_blocks * self.block_frames

    @property
    def spec(self) -> AttentionSpec:
        return AttentionSpec(self.block_frames, self.window_frames, self.sink_frames)

    def sampler_table(self) -> dict:
        """The [sampler] table a preset needs to run the exported generator."""
        return {"kind": "few-step", "step_list": list(self.step_list), "warp": self.warp, "shift": self.shift,
                "cfg_scale": 1.0, "context_noise": self.context_noise}

    def timesteps(self) -> list[float]:
        """The sampler's model timesteps (warped onto the shifted table if `warp`)."""
        return warp_steps(self.step_list, self.shift) if self.warp else [float(s) for s in self.step_list]


# ---------------------------------------------------------------------------------------------------------------
# Rollout: the backend's block loop, with gradient only at the exit step
# ---------------------------------------------------------------------------------------------------------------


def _frame_t(x: Tensor, t: float) -> Tensor:
    return torch.full((x.shape[0], x.shape[2]), float(t), dtype=torch.float32, device=x.device)  # [B, F]


def rollout(
    generator: WanDiT,
    cond: Conditioning,
    noise: Tensor,
    steps: Sequence[float],
    *,
    block_frames: int,
    spec: AttentionSpec,
    exit_index: int,
    grad: bool,
    rng: torch.Generator | Sequence[torch.Generator],
    table: FlowMatchTable,
    rope_mode: Literal["absolute", "rebase"] = "absolute",
    context_noise: float = 0.0,
    start_frame: int = 0,
) -> Tensor:
    """Block-autoregressive few-step generation over a fresh KV cache; returns x0 [B, C, F, h, w].

    noise [B, C, F, h, w] is x at steps[0] for every block. Per block: no-grad steps 0..exit−1 (x0 prediction,
    re-noise with fresh noise from `rng` — one generator, or one per block like the backend's per-block seeds),
    the exit step (with graph when `grad`), whose x0 is the block's output, then a no-grad clean context pass at
    t = context_noise that writes the block's K/V. With exit_index = last and grad=False this is exactly the
    causal-KV backend's few-step sampling (cfg_scale 1).
    """
    ts = [float(t) for t in steps]
    if not 0 <= exit_index < len(ts):
        raise ValueError(f"exit_index must be in [0, {len(ts)}) (got {exit_index})")
    _, _, f, h, w = noise.shape
    if f % block_frames:
        raise ValueError(f"{f} latent frames is not a multiple of block_frames={block_frames}")
    cache = generator.new_kv_cache(spec, (h, w))
    outputs = []
    for k in range(f // block_frames):
        s = start_frame + k * block_frames
        gen = rng[k] if isinstance(rng, Sequence) else rng
        x = noise[:, :, k * block_frames : (k + 1) * block_frames]  # [B, C, n, h, w]

        def denoise(xx: Tensor, tt: Tensor, s: int = s) -> Tensor:
            return generator(xx, tt, cond, attention=spec, kv_cache=cache, start_frame=s, rope_mode=rope_mode)

        # Step 1: no-grad denoising steps before the exit step (the sampler's own code, then its re-noise).
        if exit_index > 0:
            with torch.no_grad():
                x0 = few_step_sample(denoise, x, ts[:exit_index], gen, table=table)
                eps = torch.randn(x.shape, generator=gen, device=gen.device, dtype=x.dtype).to(x.device)
                x = add_noise(x0, eps, float(table.sigma_at(ts[exit_index])))
        # Step 2: the exit step, the only forward that keeps its graph.
        with torch.set_grad_enabled(grad):
            v = denoise(x, _frame_t(x, ts[exit_index]))
            x0 = x0_from_velocity(x, v, float(table.sigma_at(ts[exit_index])))
        outputs.append(x0)
        # Step 3: no-grad clean context pass writes the block into the cache (no backprop through time).
        with torch.no_grad():
            generator(x0.detach(), _frame_t(x0, context_noise), cond, attention=spec, kv_cache=cache,
                      start_frame=s, write_cache=True, rope_mode=rope_mode)
    return torch.cat(outputs, dim=2)


# ---------------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------------


def dmd_loss(x: Tensor, real_fn: RealFn, fake_fn: FakeFn, sigma: Tensor, eps: Tensor, guidance: float) -> Tensor:
    """Distribution-matching loss (Self-Forcing `model/dmd.py`).

    x [B, C, F, h, w] generator samples (with graph); sigma [B, F]; eps ~ N(0, I) like x. Both scores return x0
    predictions; real = cond + guidance·(cond − uncond). grad = (fake − real) / mean|x − real| (per sample), and
    L = 0.5·MSE(x, stopgrad(x − grad)), so a gradient step moves x toward the real prediction, away from the fake.
    """
    with torch.no_grad():
        x_t = add_noise(x.detach(), eps, sigma)
        t = sigma * 1000.0
        fake = fake_fn(x_t, t)
        cond, uncond = real_fn(x_t, t)
        real = cond + guidance * (cond - uncond)
        norm = (x.detach().double() - real.double()).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        grad = torch.nan_to_num((fake.double() - real.double()) / norm)
        target = x.detach().double() - grad
    return 0.5 * nn.functional.mse_loss(x.double(), target)


def critic_loss(fake_velocity_fn: FakeFn, x: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:
    """Flow-matching loss of the fake score on generator samples: mean((v_fake(x_t, t) − (ε − x))²)."""
    x = x.detach()
    x_t = add_noise(x, eps, sigma)
    v = fake_velocity_fn(x_t, sigma * 1000.0)
    return (v - velocity_target(x, eps)).pow(2).mean()


# ---------------------------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class DistillModels:
    """What a distillation run holds: frozen text encoder and real score, the generator (+ EMA), the critic."""

    text: nn.Module
    real: WanDiT
    generator: WanDiT
    critic: WanDiT | None

    def encode(self, prompts: list[str]) -> Tensor:
        """Frozen text features [B, text_len, text_dim]."""
        with torch.no_grad():
            ids, _ = self.text.tokenize(prompts)
            return self.text(ids)

    def trainable(self) -> nn.ModuleDict:
        mods = {"generator": self.generator}
        if self.critic is not None:
            mods["critic"] = self.critic
        return nn.ModuleDict(mods)


def check_model_inputs(cfg: SelfForcingConfig, needs_latents: bool = False) -> None:
    """Before a run makes its out_dir: the weight files it reads are there (and `latents` when the run
    `needs_latents`); a ConfigError names the key and the fix."""
    check_inputs(cfg, ("real_dit", "init_dit", "critic_dit", "text"), {
        "init_dit": "run the ODE init first (lvstudio train causal-distill presets/tiny/train_ode.toml), or set "
                    "init_dit to its out_dir/dit.safetensors (or remove it: real_dit)"})
    if not needs_latents:
        return
    if cfg.latents is None:
        where = f"{cfg._source}: " if cfg._source else ""
        raise ConfigError(f"{where}latents: this run (mode = {cfg.mode!r}, backward_simulation = "
                          f"{str(cfg.backward_simulation).lower()}, prompt_source = {cfg.prompt_source!r}) needs real "
                          "latents, and latents is not set",
                          hint="set latents to a diffusion-forcing run's out_dir/latents.safetensors")
    check_inputs(cfg, ("latents",))


def load_models(cfg: SelfForcingConfig, with_critic: bool) -> DistillModels:
    from lvstudio.models.tiny_text import load_text_encoder
    from lvstudio.presets.load import load_dit

    check_model_inputs(cfg)
    text = load_text_encoder(cfg.text).requires_grad_(False)
    real = load_dit(Path(cfg.real_dit)).requires_grad_(False)
    generator = load_dit(Path(cfg.init_dit or cfg.real_dit)).train(True)
    critic = load_dit(Path(cfg.critic_dit or cfg.real_dit)).train(True) if with_critic else None
    return DistillModels(text, real, generator, critic)


def clean_windows(data: LatentDataset, num_frames: int, block_frames: int) -> list[tuple[int, int, str]]:
    """(clip, offset, caption) of every window of `num_frames` latents (block-aligned) under one caption."""
    out = []
    for i, caps in enumerate(data.captions):
        for o in range(0, len(caps) - num_frames + 1, block_frames):
            window = set(caps[o : o + num_frames])
            if len(window) == 1 and "" not in window:
                out.append((i, o, caps[o]))
    if not out:
        raise ValueError(f"the latent dataset has no {num_frames}-latent window under a single caption")
    return out


def sample_windows(data: LatentDataset, windows: list[tuple[int, int, str]], batch: int, num_frames: int,
                   rng: np.random.Generator) -> tuple[Tensor, list[str]]:
    """A batch of real windows [B, C, F, h, w] and their captions (deterministic given rng)."""
    picks = [windows[int(rng.integers(len(windows)))] for _ in range(batch)]
    x = torch.stack([data.latents[i, :, o : o + num_frames] for i, o, _ in picks]).float()
    return x, [c for _, _, c in picks]


def world_prompts(batch: int, rng: np.random.Generator) -> list[str]:
    """Captions drawn from the procedural world's grammar (Self-Forcing is data-free apart from prompts)."""
    from lvstudio.world import sample_spec

    return [sample_spec(rng).caption() for _ in range(batch)]


# ---------------------------------------------------------------------------------------------------------------
# Generator samples
# ---------------------------------------------------------------------------------------------------------------


def exit_index_at(cfg: SelfForcingConfig, step: int) -> int:
    """The rollout's exit step for an iteration: random (seeded by seed, step; same on every rank and block)."""
    if cfg.last_step_only:
        return len(cfg.step_list) - 1
    return int(np.random.default_rng([cfg.seed, step, 991]).integers(len(cfg.step_list)))


def causvid_sample(generator: WanDiT, cond: Conditioning, x0_real: Tensor, cfg: SelfForcingConfig,
                   table: FlowMatchTable, gen: torch.Generator, grad: bool) -> Tensor:
    """CausVid (backward_simulation = False): real latents noised per block to a random listed step, one
    block-causal forward of the generator; returns its x0 prediction [B, C, F, h, w]."""
    ts = torch.tensor(cfg.timesteps(), dtype=torch.float32)
    b = x0_real.shape[0]
    idx = torch.randint(0, len(ts), (b, cfg.num_blocks), generator=gen)
    t = ts[idx].repeat_interleave(cfg.block_frames, dim=1)  # [B, F]
    sigma = table.sigma_at(t)  # [B, F]
    eps = torch.randn(x0_real.shape, generator=gen)
    x_t = add_noise(x0_real, eps, sigma)
    with torch.set_grad_enabled(grad):
        v = generator(x_t, t, cond, attention=cfg.spec, rope_mode="absolute")
        return x0_from_velocity(x_t, v, sigma)


def generator_samples(models: DistillModels, cfg: SelfForcingConfig, context: Tensor, x0_real: Tensor | None,
                      table: FlowMatchTable, gen: torch.Generator, step: int, grad: bool) -> Tensor:
    """What the generator produces for this iteration's prompts (rollout or CausVid), [B, C, F, h, w]."""
    cond = models.generator.new_conditioning(context)
    if not cfg.backward_simulation:
        if x0_real is None:
            raise ValueError("backward_simulation = false needs real latents (set `latents` in the config)")
        return causvid_sample(models.generator, cond, x0_real, cfg, table, gen, grad)
    h = cfg.size // 8
    noise = torch.randn(context.shape[0], models.generator.cfg.out_dim, cfg.num_frames, h, h, generator=gen)
    return rollout(models.generator, cond, noise, cfg.timesteps(), block_frames=cfg.block_frames, spec=cfg.spec,
                   exit_index=exit_index_at(cfg, step), grad=grad, rng=gen, table=table, rope_mode=cfg.rope_mode,
                   context_noise=cfg.context_noise)


def _x0_fn(model: WanDiT, context: Tensor, spec: AttentionSpec) -> FakeFn:
    def fn(x_t: Tensor, t: Tensor) -> Tensor:
        v = model(x_t, t, model.new_conditioning(context), attention=spec)
        return x0_from_velocity(x_t, v, t / 1000.0)

    return fn


def _real_fn(model: WanDiT, context: Tensor, uncond: Tensor, spec: AttentionSpec) -> RealFn:
    def fn(x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        b = x_t.shape[0]
        v = model(torch.cat([x_t, x_t]), torch.cat([t, t]), model.new_conditioning(torch.cat([context, uncond])),
                  attention=spec)
        x0 = x0_from_velocity(torch.cat([x_t, x_t]), v, torch.cat([t, t]) / 1000.0)
        return x0[:b], x0[b:]

    return fn


def _velocity_fn(model: WanDiT, context: Tensor, spec: AttentionSpec) -> FakeFn:
    def fn(x_t: Tensor, t: Tensor) -> Tensor:
        return model(x_t, t, model.new_conditioning(context), attention=spec)

    return fn


# ---------------------------------------------------------------------------------------------------------------
# Mixed-history baseline
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class MixedHistoryBatch:
    x: Tensor  # [B, C, (k+1)·n, h, w] history (clean) ‖ the noisy block k
    t: Tensor  # [B, (k+1)·n] context_noise on the history, 1000σ on block k
    target: Tensor  # [B, C, n, h, w] velocity target of block k
    generated: Tensor  # [B] bool: history made by the generator


def mixed_history_inputs(generator: WanDiT, context: Tensor, x0_real: Tensor, cfg: SelfForcingConfig,
                         table: FlowMatchTable, gen: torch.Generator) -> MixedHistoryBatch:
    """History blocks (a random number ≥ 1) are, per sample with probability history_gen_prob, the generator's
    own no-grad few-step reconstruction of the real history (from step_list[history_start_index]); the next block
    is noised real data at a random σ."""
    n, b = cfg.block_frames, x0_real.shape[0]
    k = int(torch.randint(1, cfg.num_blocks, (1,), generator=gen)) if cfg.num_blocks > 1 else 0
    history = x0_real[:, :, : k * n].clone()
    generated = torch.rand(b, generator=gen) < cfg.history_gen_prob
    if k > 0 and bool(generated.any()):
        rows = generated.nonzero().flatten()
        ts = cfg.timesteps()[cfg.history_start_index :]
        eps = torch.randn(history[rows].shape, generator=gen)
        start = add_noise(history[rows], eps, float(table.sigma_at(ts[0])))
        history[rows] = rollout(generator, generator.new_conditioning(context[rows]), start, ts, block_frames=n,
                                spec=cfg.spec, exit_index=len(ts) - 1, grad=False, rng=gen, table=table,
                                rope_mode=cfg.rope_mode, context_noise=cfg.context_noise)
    block = x0_real[:, :, k * n : (k + 1) * n]
    sigma = shift_sigma(torch.rand(b, generator=gen), cfg.flow_shift)  # [B]
    eps = torch.randn(block.shape, generator=gen)
    x_t = add_noise(block, eps, sigma)
    t = torch.cat([torch.full((b, k * n), float(cfg.context_noise)), (sigma * 1000)[:, None].expand(b, n)], dim=1)
    return MixedHistoryBatch(torch.cat([history, x_t], dim=2), t, velocity_target(block, eps), generated)


def mixed_history_loss(generator: WanDiT, context: Tensor, x0_real: Tensor, cfg: SelfForcingConfig,
                       table: FlowMatchTable, gen: torch.Generator) -> Tensor:
    """Flow-matching loss on the next block given mixed real / self-generated history."""
    mb = mixed_history_inputs(generator, context, x0_real, cfg, table, gen)
    v = generator(mb.x, mb.t, generator.new_conditioning(context), attention=cfg.spec)
    n = cfg.block_frames
    return (v[:, :, -n:] - mb.target).pow(2).mean()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints (two models, two optimizers, one EMA) and export
# ---------------------------------------------------------------------------------------------------------------


def export_generator(config: WanDiTConfig, shadow: dict[str, Tensor], out: Path, sampler: dict | None = None) -> Path:
    """Write the generator EMA (`EMA.shadow`, whole tensors) as out/dit.safetensors (config metadata as
    diffusion_forcing.export_weights): atomically, with its checksum (`lvstudio.checked_files`)."""
    from lvstudio.checked_files import save_checked

    meta = {"config": json.dumps(config.to_dict()), "format": "pt"}
    if sampler is not None:
        meta["sampler"] = json.dumps(sampler)
    return save_checked({k: v.contiguous() for k, v in shadow.items()}, out / "dit.safetensors", meta)


def export_run(cfg: SelfForcingConfig) -> Path:
    """out_dir/dit.safetensors from the generator EMA of the run's latest checkpoint (an unfinished run's too; a
    sharded one is gathered into out_dir/consolidated.safetensors first). The checkpoint is verified first."""
    from lvstudio.checked_files import WEIGHTS_HINT, read_metadata
    from lvstudio.errors import LvError
    from lvstudio.train.loop import check_fit, read_checkpoint
    from lvstudio.train.sharding import consolidated_checkpoint

    out = Path(cfg.out_dir)
    ckpt = consolidated_checkpoint(out)
    if ckpt is None:
        raise LvError(f"no checkpoint in {out}", hint="train first, or pass the config of the run to export")
    tensors = read_checkpoint(ckpt, ("self-forcing", "causvid-dmd", "mixed-history", "causal-distill-ode"))[0]
    meta = read_metadata(cfg.init_dit or cfg.real_dit, hint=WEIGHTS_HINT)
    config = WanDiTConfig.from_dict(json.loads(meta["config"]))
    # The generator EMA must be a DiT of the config's init DiT, whose config the export records: else an LvError
    # naming what differs, before anything is written.
    with torch.device("meta"):
        wanted = WanDiT(config).state_dict()
    check_fit(ckpt, {f"ema.{k}": v for k, v in wanted.items()}, tensors, ("ema.",))
    shadow = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    return export_generator(config, shadow, out, cfg.sampler_table())


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def train_self_forcing(cfg: SelfForcingConfig, *, progress: bool = True, dataset: LatentDataset | None = None,
                       vocabulary: list[str] | None = None) -> dict:
    """Train (or resume) a Self-Forcing / CausVid-DMD / mixed-history run in cfg.out_dir; returns final figures.

    `vocabulary` is accepted for symmetry with the other recipes; the frozen text encoder brings its own.
    """
    del vocabulary
    dmd = cfg.mode == "dmd"
    recipe = "mixed-history" if not dmd else ("self-forcing" if cfg.backward_simulation else "causvid-dmd")
    check_fsdp(cfg.fsdp, "self-forcing")
    require_cpu(cfg, "self-forcing")
    dist = init_distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    needs_data = not dmd or not cfg.backward_simulation or cfg.prompt_source == "dataset"
    check_model_inputs(cfg, needs_latents=needs_data and dataset is None)
    out.mkdir(parents=True, exist_ok=True)  # once the inputs are there: a refused run leaves no empty out_dir
    torch.manual_seed(cfg.seed)
    models = load_models(cfg, with_critic=dmd)
    if cfg.fsdp:  # generator, critic and the frozen real score, each sharded on its own (the text encoder is not)
        for dit in (models.generator, models.critic, models.real):
            if dit is not None:
                shard_model(dit)
    data = dataset
    if needs_data and data is None:
        data = LatentDataset.load(Path(str(cfg.latents)))
    windows = clean_windows(data, cfg.num_frames, cfg.block_frames) if needs_data else []
    trainable = models.trainable()
    opts = {"generator": torch.optim.AdamW(models.generator.parameters(), lr=cfg.lr, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)}
    if models.critic is not None:
        opts["critic"] = torch.optim.AdamW(models.critic.parameters(), lr=cfg.lr_critic, betas=cfg.betas,
                                           weight_decay=cfg.weight_decay)
    ema = EMA(models.generator, cfg.ema_decay)
    start = resume_run_checkpoint(out, trainable, opts, ema, cfg.fsdp, recipe)
    one_step = _step_fn(cfg, models, opts, ema, data, windows, dist)

    def save(step: int) -> None:
        save_run_checkpoint(out, trainable, opts, ema, step, {"recipe": recipe}, dist, cfg.fsdp)

    loop = TrainLoop.for_config(cfg, start=start, report=TrainLog(out, dist.is_main).report, checkpoint=save,
                                progress=progress and dist.is_main, description=recipe,
                                progress_keys=("loss_g", "loss_c"))
    step, last = loop.run(one_step)
    shadow = whole_tensors(ema.shadow) if cfg.fsdp else ema.shadow
    if dist.is_main:
        export_generator(models.generator.cfg, shadow, out, cfg.sampler_table())
    digest = weights_digest(models.generator)
    shutdown_distributed(dist)
    return {"step": step, "loss_g": _nan(last.get("loss_g")), "loss_c": _nan(last.get("loss_c")),
            "out_dir": str(out), "weights_sha256": digest}


def _step_fn(cfg: SelfForcingConfig, models: DistillModels, opts: dict[str, torch.optim.Optimizer], ema: EMA,
             data: LatentDataset | None, windows: list[tuple[int, int, str]], dist: DistInfo,
             ) -> Callable[[int], dict[str, float | None]]:
    """One iteration of the run: the generator's DMD (or mixed-history) update every `dfake_gen_update_ratio`
    iterations and the critic's flow-matching update every iteration. Reports the latest losses (None before the
    first update of a model) and the generator's learning rate."""
    table = FlowMatchTable(shift=cfg.shift)
    spec = cfg.spec
    last = {"loss_g": math.nan, "loss_c": math.nan}
    average = None if cfg.fsdp else dist  # FSDP's reduce-scatter already averages the gradients
    device = next(models.generator.parameters()).device

    def forward() -> contextlib.AbstractContextManager:  # the precision of every forward pass (not the backward)
        return forward_precision(cfg.precision, device)

    def one_step(step: int) -> dict[str, float | None]:
        # Step 1: deterministic prompts (and real windows) and noise for (seed, step, rank).
        rng, gen = step_generator(cfg.seed, step, dist.rank)
        x0_real = None
        if windows:
            x0_real, prompts = sample_windows(data, windows, cfg.batch_size, cfg.num_frames, rng)
        else:
            prompts = world_prompts(cfg.batch_size, rng)
        context = models.encode(prompts)  # [B, L, D]
        uncond = models.encode([""] * len(prompts))
        lr_g = set_lr(opts["generator"], lr_at(step, cfg.lr, cfg.warmup_steps, cfg.decay_start, cfg.steps,
                                               cfg.min_lr))
        ema_decay = 0.0 if step < cfg.ema_start else None
        if cfg.mode != "dmd":
            # Step 2 (baseline): flow matching on the next block after mixed history.
            with forward():
                loss = mixed_history_loss(models.generator, context, x0_real, cfg, table, gen)
            optimizer_step(opts["generator"], loss, models.generator.parameters(), cfg.grad_clip, average_over=average)
            ema.update(models.generator, decay=ema_decay)
            last["loss_g"] = float(loss.detach())
            return {"loss_g": _finite(last["loss_g"]), "loss_c": _finite(last["loss_c"]), "lr": lr_g}
        gen_update = step % cfg.dfake_gen_update_ratio == 0
        # Step 2: generator samples (graph only through each block's exit step when updating G).
        with forward():
            x = generator_samples(models, cfg, context, x0_real, table, gen, step, grad=gen_update)
        # Step 3: generator DMD update.
        if gen_update:
            sigma = sample_dmd_sigma(x.shape[0], cfg.num_frames, cfg.dmd_shift, gen, clamp=cfg.dmd_clamp)
            eps = torch.randn(x.shape, generator=gen)
            with forward():
                loss_g = dmd_loss(x, _real_fn(models.real, context, uncond, spec),
                                  _x0_fn(models.critic, context, spec), sigma, eps, cfg.guidance_scale)
            optimizer_step(opts["generator"], loss_g, models.generator.parameters(), cfg.grad_clip,
                           average_over=average)
            ema.update(models.generator, decay=ema_decay)
            last["loss_g"] = float(loss_g.detach())
        # Step 4: critic (fake score) update, every iteration, on this iteration's samples (detached: one rollout per
        # iteration serves both updates).
        set_lr(opts["critic"], lr_at(step, cfg.lr_critic, cfg.warmup_steps, cfg.decay_start, cfg.steps, cfg.min_lr))
        sigma = sample_dmd_sigma(x.shape[0], cfg.num_frames, cfg.dmd_shift, gen, clamp=cfg.dmd_clamp)
        eps = torch.randn(x.shape, generator=gen)
        with forward():
            loss_c = critic_loss(_velocity_fn(models.critic, context, spec), x.detach(), sigma, eps)
        optimizer_step(opts["critic"], loss_c, models.critic.parameters(), cfg.grad_clip, average_over=average)
        last["loss_c"] = float(loss_c.detach())
        return {"loss_g": _finite(last["loss_g"]), "loss_c": _finite(last["loss_c"]), "lr": lr_g}

    return one_step


def _finite(value: float) -> float | None:
    return None if math.isnan(value) else value


def _nan(value: float | None) -> float:
    return math.nan if value is None else value
