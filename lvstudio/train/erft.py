"""Error-Recycling Fine-Tuning (Stable Video Infinity) of a LoRA for the cross-clip backend:
`lvstudio train erft CONFIG.toml`.

A training window is what the ERFT cross-clip backend sees for a later clip:
    [reference latent (latent 0 of the clip)] + [carry_frames clean latents] + [new latents]
the clean prefix held at t = 0, one t per sample from the shifted 1000-entry FlowMatchTable, loss on the new frames
only, block-causal attention aligned like the backend (`start_frame`). A `first_clip_prob` share of the batches is
the first clip (no prefix, clip_frames new latents, no error injection) so the LoRA keeps the first clip intact.

Error recycling (reference mechanisms §6.3): the model's own one-step errors are banked per timestep grid
(grid = nearest entry of the 50-step shifted table) and injected back:
    ε' = ε + e_noise (noise_prob),  x0' = x0 + e_latent (latent_prob),  prefix += e_latent from any grid (cond_prob)
    (clean_prob turns all three off for a sample)
    x_t = (1−σ)x0' + σε',  target v* = ε' − x0 (the CLEAN x0: the model learns to steer back)
    no grad: noise_err = (1−σ)(v̂ − v*),  latent_err = −σ(v̂ − v*)  -> banks[grid(t)]
Only the LoRA is trained (base DiT and text encoder frozen). Banks are saved next to the checkpoint (one file per
rank), so a resumed run continues exactly. Export: out_dir/erft_lora.safetensors (EMA of the adapters).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from lvstudio.models.kv_cache import AttentionSpec
from lvstudio.models.lora import LORA_TARGETS, add_lora, lora_state_dict, save_lora
from lvstudio.models.wan_dit import WanDiT, WanDiTConfig
from lvstudio.sampling.flow_matching import FlowMatchTable
from lvstudio.train.common import ConfigProblem, DistInfo, barrier, require_cpu, shutdown_distributed
from lvstudio.train.data import LatentDataset, latent_dataset
from lvstudio.train.diffusion_forcing import DFConfig, build_model, start_run
from lvstudio.train.loop import (
    TrainLog,
    TrainLoop,
    check_fit,
    fitting,
    flatten_optimizer,
    forward_precision,
    lr_at,
    misfit,
    optimizer_step,
    read_checkpoint,
    set_lr,
    step_generator,
    unflatten_optimizer,
    unwrap,
)
from lvstudio.train.sharding import refuse_fsdp

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
CHECKPOINT = "checkpoint.safetensors"
LORA_FILE = "erft_lora.safetensors"
BANKS_MISFIT = "the error banks do not fit this run's config"  # num_grids, bank_capacity, the clip's shape
BANKS_HINT = ("the error banks are written atomically, so a crash does not do this (a disk or a copy did): restore it "
              "from a backup, or delete it to continue with empty banks (they fill again as the run trains)")


class ERFTConfig(DFConfig):
    """`lvstudio train erft CONFIG.toml` (diffusion-forcing data/model fields, plus clips, LoRA and error banks)."""

    path_fields: ClassVar[tuple[str, ...]] = ("out_dir", "vae", "init_dit", "init_text", "latents")
    example: ClassVar[str] = "presets/tiny/train_erft.toml"

    shift: float = 2.0  # shift of the 1000-entry training table and of the 50-grid table
    lr: float = 1e-4
    ema_start: int = 0
    # Clips (as the cross-clip backend makes them)
    clip_frames: int = Field(6, ge=1)  # latents per clip, carried ones included
    carry_frames: int = Field(2, ge=0)
    use_reference: bool = True  # prepend latent 0 of the clip as the reference frame
    bidirectional: bool = False  # attention inside the clip (the tiny preset: block-causal)
    first_clip_prob: float = Field(0.1, ge=0, le=1)  # share of batches that are a first clip (no prefix)
    bell_weight: bool = True  # bsmntw training weight w(t)
    latents: str | None = None  # an existing latent dataset (e.g. the DF run's); else built in out_dir
    # LoRA
    lora_rank: int = Field(16, ge=1)
    lora_alpha: float = Field(16.0, gt=0)
    lora_targets: str = LORA_TARGETS
    # Error banks and injection
    num_grids: int = Field(50, ge=1)
    bank_capacity: int = Field(16, ge=1)
    bank_replacement: Literal["l2", "fifo"] = "l2"
    bank_dtype: Literal["float32", "float16", "bfloat16"] = "float16"
    noise_prob: float = Field(0.01, ge=0, le=1)
    latent_prob: float = Field(0.9, ge=0, le=1)
    cond_prob: float = Field(0.9, ge=0, le=1)
    clean_prob: float = Field(0.5, ge=0, le=1)
    error_scale: float = Field(1.0, ge=0)  # banked errors are added times this (SVI: unscaled; a small model errs more)
    clean_buffer_update_prob: float = Field(0.1, ge=0, le=1)
    buffer_warmup_steps: int = Field(50, ge=0)  # gather errors from every rank into every bank until this step

    @model_validator(mode="after")
    def _check_clip(self) -> ERFTConfig:
        if self.carry_frames >= self.clip_frames:
            raise ValueError(f"carry_frames ({self.carry_frames}) must be < clip_frames ({self.clip_frames})")
        if self.clip_frames % self.block_frames or self.carry_frames % self.block_frames:
            raise ValueError(f"clip_frames ({self.clip_frames}) and carry_frames ({self.carry_frames}) must be "
                             f"multiples of block_frames ({self.block_frames}), as in the cross-clip backend")
        return self

    def window_problem(self) -> ConfigProblem | None:
        """ERFT trains on cross-clip windows, not on `latent_frames` ones: the clips it encodes (no `latents`) must
        hold a window of clip_frames latents after the reference latent (None: they do)."""
        need = self.clip_frames + (1 if self.prefix_frames else 0)
        if self.latents is None and self.clip_latents < need:
            return ConfigProblem("clip_latents", f"clips of {self.clip_latents} latents are too short for windows of "
                                 f"clip_frames = {self.clip_frames} latents"
                                 + (" that start after latent 0 (the reference)" if self.prefix_frames else ""),
                                 f"set clip_latents to at least {need}")
        return None

    @property
    def new_frames(self) -> int:
        return self.clip_frames - self.carry_frames

    @property
    def prefix_frames(self) -> int:
        return int(self.use_reference) + self.carry_frames


# ---------------------------------------------------------------------------------------------------------------
# Replay memory
# ---------------------------------------------------------------------------------------------------------------


class ErrorBank:
    """Per-timestep-grid replay memory of error tensors (detached, on the CPU, stored in `dtype`).

    Each grid holds at most `capacity` errors; when full, a new error replaces the most similar stored one (L2,
    keeps the bank diverse) or the oldest ("fifo"). Sampling is uniform (one grid, or all grids together).
    """

    def __init__(self, num_grids: int, capacity: int, replacement: str = "l2", dtype: torch.dtype = torch.float32
                 ) -> None:
        if num_grids < 1 or capacity < 1:
            raise ValueError(f"num_grids and capacity must be >= 1 (got {num_grids}, {capacity})")
        if replacement not in ("l2", "fifo"):
            raise ValueError(f"replacement must be 'l2' or 'fifo' (got {replacement!r})")
        self.num_grids = num_grids
        self.capacity = capacity
        self.replacement = replacement
        self.dtype = dtype
        self.items: list[list[Tensor]] = [[] for _ in range(num_grids)]
        self.next_slot = [0] * num_grids  # fifo pointer per grid

    def __len__(self) -> int:
        return sum(len(g) for g in self.items)

    def count(self, grid: int) -> int:
        return len(self.items[grid])

    def insert(self, grid: int, error: Tensor) -> int:
        """Store `error` in `grid`; returns the slot it went to."""
        if not 0 <= grid < self.num_grids:
            raise ValueError(f"grid {grid} out of range [0, {self.num_grids})")
        e = error.detach().to("cpu", self.dtype).clone()
        items = self.items[grid]
        if items and items[0].shape != e.shape:
            raise ValueError(f"error shape {tuple(e.shape)} differs from the bank's {tuple(items[0].shape)}")
        if len(items) < self.capacity:
            items.append(e)
            return len(items) - 1
        if self.replacement == "fifo":
            slot = self.next_slot[grid]
            self.next_slot[grid] = (slot + 1) % self.capacity
        else:
            stack = torch.stack(items).float().flatten(1)  # [capacity, D]
            slot = int((stack - e.float().flatten()).pow(2).sum(dim=1).argmin())
        items[slot] = e
        return slot

    def sample(self, grid: int, gen: torch.Generator | None = None) -> Tensor | None:
        """A uniformly drawn error of `grid` (float32), or None if the grid is empty."""
        items = self.items[grid]
        if not items:
            return None
        return items[int(torch.randint(len(items), (1,), generator=gen))].float()

    def sample_any(self, gen: torch.Generator | None = None) -> Tensor | None:
        """A uniformly drawn error over all grids together (float32), or None if the bank is empty."""
        total = len(self)
        if total == 0:
            return None
        i = int(torch.randint(total, (1,), generator=gen))
        for items in self.items:
            if i < len(items):
                return items[i].float()
            i -= len(items)
        raise RuntimeError("unreachable")  # pragma: no cover

    def state_dict(self) -> dict[str, Tensor]:
        state = {f"g{k}": torch.stack(items) for k, items in enumerate(self.items) if items}
        state["next_slot"] = torch.tensor(self.next_slot, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.items = [[] for _ in range(self.num_grids)]
        for key, stack in state.items():
            if key.startswith("g"):
                k = int(key[1:])
                if k >= self.num_grids or stack.shape[0] > self.capacity:
                    raise ValueError(f"bank state {key} ({stack.shape[0]} errors) does not fit {self.num_grids} grids "
                                     f"x {self.capacity}")
                self.items[k] = [e.to(self.dtype).clone() for e in stack]
        if "next_slot" in state:
            self.next_slot = [int(x) for x in state["next_slot"]]


@dataclass
class ErrorBanks:
    noise: ErrorBank  # noise_err = (1−σ)(v̂ − v*), injected into ε
    latent: ErrorBank  # latent_err = −σ(v̂ − v*), injected into x0 and into the clean prefix

    @classmethod
    def for_config(cls, cfg: ERFTConfig) -> ErrorBanks:
        dt = _DTYPES[cfg.bank_dtype]
        return cls(ErrorBank(cfg.num_grids, cfg.bank_capacity, cfg.bank_replacement, dt),
                   ErrorBank(cfg.num_grids, cfg.bank_capacity, cfg.bank_replacement, dt))

    def save(self, path: Path, step: int) -> Path:
        """Atomically, with a checksum (`lvstudio.checked_files`)."""
        from lvstudio.checked_files import save_checked

        tensors = {f"noise.{k}": v for k, v in self.noise.state_dict().items()}
        tensors.update({f"latent.{k}": v for k, v in self.latent.state_dict().items()})
        return save_checked(tensors, path, {"step": str(step), "format": "lvstudio.erft_banks/1"})

    def load(self, path: Path, shape: tuple[int, ...] | None = None) -> int:
        """Restore from a file written by save() (verified first: DamagedFileError); returns its step. Banks of
        another num_grids or bank_capacity, or (given `shape`, [C, N, h, w]) errors of another shape than this run
        makes, are an LvError (`lvstudio.train.loop.misfit`)."""
        from lvstudio.checked_files import load_checked

        tensors, meta = load_checked(path, require_digest=False, hint=BANKS_HINT)
        step = int(meta.get("step", -1))
        stored = sorted({tuple(v.shape[1:]) for k, v in tensors.items() if k.rsplit(".", 1)[-1].startswith("g")})
        if shape is not None and any(s != tuple(shape) for s in stored):
            raise misfit(path, f"errors of shape {list(stored[0])}, this run makes {list(shape)}", BANKS_MISFIT)
        with fitting(path, BANKS_MISFIT):
            self.noise.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("noise.")})
            self.latent.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("latent.")})
        return step


# ---------------------------------------------------------------------------------------------------------------
# Data: cross-clip windows
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ClipBatch:
    prefix: Tensor | None  # [B, C, P, h, w] clean reference + carried latents (None for a first clip)
    x0: Tensor  # [B, C, N, h, w] the new latents
    prompts: list[str]
    loss_mask: Tensor  # [B, N] 1 where a new frame is trained
    objects: Tensor | None = None  # [B, N, h, w]

    @property
    def first_clip(self) -> bool:
        return self.prefix is None


def sample_clip_batch(data: LatentDataset, cfg: ERFTConfig, rng: np.random.Generator) -> ClipBatch:
    """A batch of cross-clip windows (deterministic given rng); the whole batch is either first clips or later ones."""
    n, _, length = data.latents.shape[:3]
    first = cfg.prefix_frames == 0 or rng.random() < cfg.first_clip_prob
    lo = 0 if first else 1  # later clips never start at latent 0 (that is the reference)
    if length < lo + cfg.clip_frames:
        raise ValueError(f"clips of {length} latents are too short for reference + clip_frames={cfg.clip_frames}; "
                         "encode longer clips (clip_latents)")
    carry = 0 if first else cfg.carry_frames
    prefixes, xs, prompts, masks, objs = [], [], [], [], []
    for _ in range(cfg.batch_size):
        i = int(rng.integers(n))
        o = 0 if first else int(rng.integers(lo, length - cfg.clip_frames + 1))
        lat = data.latents[i]  # [C, L, h, w]
        if not first:
            parts = ([lat[:, :1]] if cfg.use_reference else []) + [lat[:, o : o + carry]]
            prefixes.append(torch.cat(parts, dim=1))
        new = slice(o + carry, o + cfg.clip_frames)
        xs.append(lat[:, new])
        caps = data.captions[i][new]
        prompt = caps[-1] or next((c for c in reversed(caps) if c), "")
        masks.append(torch.tensor([1.0 if c == prompt else 0.0 for c in caps]))
        prompts.append("" if rng.random() < cfg.cfg_dropout else prompt)
        if data.objects is not None:
            objs.append(data.objects[i, new])
    prefix = torch.stack(prefixes).float() if prefixes else None
    objects = torch.stack(objs).float() if objs else None
    return ClipBatch(prefix, torch.stack(xs).float(), prompts, torch.stack(masks), objects)


# ---------------------------------------------------------------------------------------------------------------
# Error recycling
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Injected:
    eps: Tensor  # ε' [B, C, N, h, w]
    x0: Tensor  # x0' (error-corrupted) [B, C, N, h, w]
    prefix: Tensor | None  # the clean prefix with conditioning errors [B, C, P, h, w]
    clean: Tensor  # [B] bool: clean-input sample (no injection drawn)
    noise: Tensor  # [B] bool: a noise error was added
    latent: Tensor  # [B] bool: a latent error was added
    cond: Tensor  # [B] bool: a conditioning error was added


def inject_errors(x0: Tensor, eps: Tensor, prefix: Tensor | None, grids: Tensor, banks: ErrorBanks,
                  cfg: ERFTConfig, gen: torch.Generator) -> Injected:
    """Draw the injection flags per sample and add banked errors (where the bank has any)."""
    b = x0.shape[0]
    u = torch.rand(b, 4, generator=gen)
    clean = u[:, 0] < cfg.clean_prob
    want_noise = (u[:, 1] < cfg.noise_prob) & ~clean
    want_latent = (u[:, 2] < cfg.latent_prob) & ~clean
    want_cond = (u[:, 3] < cfg.cond_prob) & ~clean & (prefix is not None)
    eps, x0 = eps.clone(), x0.clone()
    prefix = None if prefix is None else prefix.clone()
    done = torch.zeros(3, b, dtype=torch.bool)
    for i in range(b):
        g = int(grids[i])
        if want_noise[i] and (e := banks.noise.sample(g, gen)) is not None:
            eps[i] += cfg.error_scale * e
            done[0, i] = True
        if want_latent[i] and (e := banks.latent.sample(g, gen)) is not None:
            x0[i] += cfg.error_scale * e
            done[1, i] = True
        if prefix is not None and want_cond[i] and (e := banks.latent.sample_any(gen)) is not None:
            # SVI adds a window of a latent error to the first frames of y; here the clean prefix (ref + carry).
            p, n = prefix.shape[2], e.shape[1]
            k = min(p, n)
            j = int(torch.randint(n - k + 1, (1,), generator=gen))
            prefix[i, :, p - k :] += cfg.error_scale * e[:, j : j + k]
            done[2, i] = True
    return Injected(eps, x0, prefix, clean, done[0], done[1], done[2])


def recycled_target(eps_prime: Tensor, x0: Tensor) -> Tensor:
    """v* = ε' − x0: from the (error-carrying) noise to the CLEAN latent."""
    return eps_prime - x0


def one_step_errors(v_hat: Tensor, v_star: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
    """(noise_err, latent_err) = ((1−σ)(v̂ − v*), −σ(v̂ − v*)): one Euler step to σ = 1 and to σ = 0 with the
    prediction minus the same step with the target. sigma [B]; v [B, C, N, h, w]."""
    d = (v_hat - v_star).float()
    s = sigma.float().view(-1, *([1] * (d.ndim - 1)))
    return (1 - s) * d, -s * d


@dataclass
class StepErrors:
    noise: Tensor  # [B, C, N, h, w]
    latent: Tensor  # [B, C, N, h, w]
    grids: Tensor  # [B] int64
    insert: Tensor  # [B] bool


class ERFTModel(nn.Module):
    """Frozen text encoder + the LoRA-adapted DiT, called on a whole clip sequence."""

    def __init__(self, dit: nn.Module, text: nn.Module) -> None:
        super().__init__()
        self.dit = dit
        self.text = text

    def forward(self, seq: Tensor, t: Tensor, ids: Tensor, spec: AttentionSpec, start_frame: int) -> Tensor:
        with torch.no_grad():
            context = self.text(ids)  # [B, text_len, text_dim]
        return self.dit(seq, t, self.dit.new_conditioning(context), attention=spec, start_frame=start_frame)


def clip_start_frame(prefix: int, block_frames: int) -> int:
    """The backend's start frame: the first new frame begins a causal block (ERFTCrossClipBackend._start)."""
    return 0 if prefix % block_frames == 0 else block_frames - prefix % block_frames


@dataclass(frozen=True)
class Tables:
    train: FlowMatchTable  # 1000 entries: t sampling and bell weights
    grids: FlowMatchTable  # num_grids entries: the bank grids

    @classmethod
    def for_config(cls, cfg: ERFTConfig) -> Tables:
        return cls(FlowMatchTable(cfg.shift, 1000), FlowMatchTable(cfg.shift, cfg.num_grids))


def erft_loss(model: nn.Module, batch: ClipBatch, cfg: ERFTConfig, tables: Tables, banks: ErrorBanks,
              gen: torch.Generator) -> tuple[Tensor, StepErrors | None]:
    """Error-recycling flow-matching loss on the new frames of a clip; returns (loss, errors to bank)."""
    x0 = batch.x0  # [B, C, N, h, w]
    b, n = x0.shape[0], x0.shape[2]
    # Step 1: one t per sample from the shifted table; its grid; clean noise.
    idx = torch.randint(len(tables.train), (b,), generator=gen)
    sigma, t = tables.train.sigmas[idx], tables.train.timesteps[idx]  # [B]
    grids = tables.grids.index_of(t)  # [B]
    eps = torch.randn(x0.shape, generator=gen)
    # Step 2: error injection (none for a first clip: its banks would not fit, and it has no history).
    if batch.first_clip:
        inj = Injected(eps, x0, None, torch.ones(b, dtype=torch.bool), *torch.zeros(3, b, dtype=torch.bool))
    else:
        inj = inject_errors(x0, eps, batch.prefix, grids, banks, cfg, gen)
    x_t = (1 - sigma.view(-1, 1, 1, 1, 1)) * inj.x0 + sigma.view(-1, 1, 1, 1, 1) * inj.eps
    v_star = recycled_target(inj.eps, x0)
    # Step 3: the clip sequence, clean prefix at t = 0, aligned on the backend's block grid.
    p = 0 if inj.prefix is None else inj.prefix.shape[2]
    seq = x_t if inj.prefix is None else torch.cat([inj.prefix, x_t], dim=2)
    ts = torch.cat([torch.zeros(b, p), t[:, None].expand(b, n)], dim=1)  # [B, P+N]
    spec = AttentionSpec(None if cfg.bidirectional else cfg.block_frames)
    ids, _ = unwrap(model).text.tokenize(batch.prompts)
    v_hat = model(seq, ts, ids, spec, clip_start_frame(p, cfg.block_frames))[:, :, p:]
    # Step 4: masked (object-weighted) MSE per sample, times the bell weight w(t).
    err = (v_hat - v_star).pow(2).mean(dim=1)  # [B, N, h, w]
    if batch.objects is not None and cfg.object_weight > 0:
        weight = 1.0 + cfg.object_weight * batch.objects
        err = err * weight / weight.mean(dim=(2, 3), keepdim=True)
    per_frame = err.mean(dim=(2, 3)) * batch.loss_mask  # [B, N]
    w = tables.train.weights[idx] if cfg.bell_weight else torch.ones(b)
    loss = (per_frame.sum(dim=1) * w).sum() / batch.loss_mask.sum().clamp_min(1.0)
    if batch.first_clip:
        return loss, None
    # Step 5: the errors this step made (no grad), and which samples feed the banks.
    with torch.no_grad():
        noise_err, latent_err = one_step_errors(v_hat.detach(), v_star, sigma)
        insert = ~inj.clean | (torch.rand(b, generator=gen) < cfg.clean_buffer_update_prob)
    return loss, StepErrors(noise_err, latent_err, grids, insert)


def bank_errors(banks: ErrorBanks, errors: StepErrors) -> int:
    """Insert the flagged errors at their grids; returns how many samples were banked."""
    done = 0
    for i in range(errors.grids.shape[0]):
        if errors.insert[i]:
            g = int(errors.grids[i])
            banks.noise.insert(g, errors.noise[i])
            banks.latent.insert(g, errors.latent[i])
            done += 1
    return done


def _gather_errors(errors: StepErrors | None, shape: tuple[int, ...], batch: int) -> StepErrors:
    """All ranks' errors (warm-up): every rank takes part, a first-clip rank sends nothing flagged."""
    import torch.distributed as tdist

    if errors is None:
        zeros = torch.zeros(batch, *shape)
        errors = StepErrors(zeros, zeros, torch.zeros(batch, dtype=torch.int64), torch.zeros(batch, dtype=torch.bool))
    parts = []
    for x in (errors.noise.float(), errors.latent.float(), errors.grids, errors.insert.to(torch.uint8)):
        out = [torch.empty_like(x) for _ in range(tdist.get_world_size())]
        tdist.all_gather(out, x.contiguous())
        parts.append(torch.cat(out))
    return StepErrors(parts[0], parts[1], parts[2], parts[3].bool())


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints (LoRA + EMA + optimizer) and banks
# ---------------------------------------------------------------------------------------------------------------


def _bank_path(out: Path, rank: int, step: int) -> Path:
    return out / f"erft_banks.rank{rank}.step{step}.safetensors"


def _save_state(out: Path, model: ERFTModel, opt: torch.optim.Optimizer, ema: dict[str, Tensor], step: int,
                base: dict, lora_alpha: float) -> None:
    from lvstudio.checked_files import save_checked

    tensors = {f"lora.{k}": v for k, v in lora_state_dict(model.dit).items()}
    tensors.update({f"ema.{k}": v.clone() for k, v in ema.items()})
    opt_tensors, opt_meta = flatten_optimizer(opt)
    tensors.update(opt_tensors)
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"step": str(step), "recipe": "erft", "optimizer": opt_meta, "base": json.dumps(base), "format": "pt",
            "lora_alpha": repr(float(lora_alpha))}
    save_checked(tensors, out / CHECKPOINT, meta)


def _check_alpha(path: Path, meta: Mapping[str, str], lora_alpha: float) -> None:
    """The adapters were trained at this lora_alpha (the scale of their output): else the misfit LvError. Checkpoints
    of versions that did not record it pass."""
    saved = meta.get("lora_alpha")
    if saved is not None and float(saved) != float(lora_alpha):
        raise misfit(path, f"its adapters were trained with lora_alpha = {float(saved):g}, this config has "
                           f"{float(lora_alpha):g}")


def _load_state(path: Path, model: ERFTModel, opt: torch.optim.Optimizer, ema: dict[str, Tensor], base: dict,
                lora_alpha: float) -> int:
    from lvstudio.train.common import ConfigError

    tensors, meta = read_checkpoint(path, "erft")  # verified, an ERFT one: an LvError before anything is restored
    saved = json.loads(meta.get("base", "{}"))
    if saved.get("dit_sha256") != base.get("dit_sha256"):
        raise ConfigError(f"{path} was trained on another base DiT (sha256 {saved.get('dit_sha256')}, now "
                          f"{base.get('dit_sha256')})", hint="resume with the same init_dit, or use a fresh out_dir")
    _check_alpha(path, meta, lora_alpha)
    # The adapters (and their EMA) of this config's LoRA, rank and targets, are the checkpoint's, name for name and
    # shape for shape: else an LvError naming what differs, before anything is restored.
    params = dict(_lora_params(model))
    wanted = {f"lora.{k}": p for k, p in params.items()} | {f"ema.{k}": v for k, v in ema.items()}
    check_fit(path, wanted, tensors, ("lora.", "ema."))
    with fitting(path), torch.no_grad():
        for key, p in params.items():
            p.copy_(tensors[f"lora.{key}"])
        for key in ema:
            ema[key] = tensors[f"ema.{key}"].clone()
        unflatten_optimizer(opt, tensors, meta["optimizer"])
    torch.set_rng_state(tensors["rng.torch"])
    return int(meta["step"])


def _config_adapters(cfg: ERFTConfig, dit_config: dict) -> dict[str, Tensor]:
    """The adapters the config's LoRA (rank, targets) puts on a DiT of `dit_config`, under plain keys: meta tensors
    (names and shapes, no memory)."""
    with torch.device("meta"):
        dit = WanDiT(WanDiTConfig.from_dict(dit_config))
    return lora_state_dict(add_lora(dit, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets))


def _lora_params(model: ERFTModel) -> list[tuple[str, nn.Parameter]]:
    """(plain key, parameter) of every adapter, in a fixed order (the optimizer's)."""
    from lvstudio.models.lora import plain_key

    out = []
    for name, p in model.dit.named_parameters():
        key = plain_key(name)
        if key is not None:
            out.append((key, p))
    return sorted(out, key=lambda kv: kv[0])


def _digest(tensors: dict[str, Tensor] | nn.Module) -> str:
    h = hashlib.sha256()
    items = tensors.state_dict().items() if isinstance(tensors, nn.Module) else sorted(tensors.items())
    for _, v in items:
        h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _erft_dataset(cfg: ERFTConfig, out: Path, dist: DistInfo) -> LatentDataset:
    if cfg.latents is not None and Path(cfg.latents).is_file():
        return LatentDataset.load(Path(cfg.latents))
    return latent_dataset(cfg, out, dist)


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


def train_erft(cfg: ERFTConfig, *, progress: bool = True, dataset: LatentDataset | None = None,
               vocabulary: list[str] | None = None) -> dict:
    """Train (or resume) an ERFT LoRA in cfg.out_dir; writes out_dir/erft_lora.safetensors. Works under torchrun."""
    refuse_fsdp(cfg.fsdp, "erft", "it trains a LoRA on a frozen base; its checkpoints hold the adapters of one "
                "process (not yet written for sharded adapters)")
    require_cpu(cfg, "erft")
    dist, out, data, vocabulary = start_run(cfg, dataset, vocabulary, _erft_dataset)
    # Step 1: frozen base (DiT + text), LoRA adapters (same init on every rank), AdamW on the adapters only.
    torch.manual_seed(cfg.seed)
    base_model = build_model(cfg, vocabulary, data.latents.shape[1])
    base = {"dit_sha256": _digest(base_model.dit), "dit_config": base_model.dit.cfg.to_dict(),
            "init_dit": Path(cfg.init_dit).name if cfg.init_dit else None}
    base_model.requires_grad_(False)
    dit = add_lora(base_model.dit, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
    model = ERFTModel(dit, base_model.text)
    params = [p for _, p in _lora_params(model)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    ema = {k: p.detach().clone().float() for k, p in _lora_params(model)}
    banks = ErrorBanks.for_config(cfg)
    tables = Tables.for_config(cfg)
    log = TrainLog(out, dist.is_main)
    # Step 2: resume LoRA/EMA/optimizer/RNG and this rank's banks of the same step.
    start = 0
    err_shape = (data.latents.shape[1], cfg.new_frames, *data.latents.shape[3:])  # [C, N, h, w] of a banked error
    if (out / CHECKPOINT).exists():
        start = _load_state(out / CHECKPOINT, model, opt, ema, base, cfg.lora_alpha)
        bank_file = _bank_path(out, dist.rank, start)
        if bank_file.exists():
            banks.load(bank_file, err_shape)
        else:
            log.write(step=start, event="banks_missing", rank=dist.rank)
    train_model = torch.nn.parallel.DistributedDataParallel(model) if dist.enabled else model
    banked = 0

    def one_step(step: int) -> dict[str, float]:
        nonlocal banked
        # A deterministic clip batch and noise for (seed, step, rank); the loss with recycled errors; AdamW on the
        # adapters.
        rng, gen = step_generator(cfg.seed, step, dist.rank)
        batch = sample_clip_batch(data, cfg, rng)
        lr = set_lr(opt, lr_at(step, cfg.lr, cfg.warmup_steps, cfg.decay_start, cfg.steps, cfg.min_lr))
        with forward_precision(cfg.precision, torch.device("cpu")):
            loss, errors = erft_loss(train_model, batch, cfg, tables, banks, gen)
        grad_norm = optimizer_step(opt, loss, params, cfg.grad_clip)
        # Bank this step's errors (from every rank during the warm-up), then the EMA of the adapters.
        if dist.enabled and step + 1 <= cfg.buffer_warmup_steps:
            errors = _gather_errors(errors, err_shape, cfg.batch_size)
        if errors is not None:
            banked += bank_errors(banks, errors)
        d = 0.0 if step + 1 <= cfg.ema_start else cfg.ema_decay
        with torch.no_grad():
            for k, p in _lora_params(model):
                ema[k].mul_(d).add_(p.detach().float(), alpha=1 - d)
        return {"loss": float(loss.detach()), "grad_norm": grad_norm, "lr": lr, "banked": banked,
                "bank_noise": len(banks.noise), "bank_latent": len(banks.latent)}

    def save(step: int) -> None:
        _checkpoint(out, model, opt, ema, step, base, banks, dist, cfg.lora_alpha)

    loop = TrainLoop.for_config(cfg, start=start, report=log.report, checkpoint=save,
                                progress=progress and dist.is_main, description="erft")
    step, last = loop.run(one_step)
    lora_path = out / LORA_FILE
    if dist.is_main:
        save_lora(lora_path, ema, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, base=base)
    shutdown_distributed(dist)
    return {"step": step, "loss": last.get("loss", math.nan), "lora": str(lora_path),
            "lora_sha256": _digest(lora_state_dict(dit)), "banked": banked}


def _checkpoint(out: Path, model: ERFTModel, opt: torch.optim.Optimizer, ema: dict[str, Tensor], step: int,
                base: dict, banks: ErrorBanks, dist: DistInfo, lora_alpha: float) -> None:
    """Banks of every rank first, then the checkpoint; older bank files go only once the checkpoint is written, so
    a crash at any point leaves banks matching the checkpoint's step."""
    banks.save(_bank_path(out, dist.rank, step), step)
    barrier(dist)
    if dist.is_main:
        _save_state(out, model, opt, ema, step, base, lora_alpha)
    barrier(dist)
    for old in out.glob(f"erft_banks.rank{dist.rank}.step*.safetensors"):
        if old.name != _bank_path(out, dist.rank, step).name:
            old.unlink(missing_ok=True)


def export_erft_lora(cfg: ERFTConfig, out_dir: Path | None = None) -> Path:
    """Write out_dir/erft_lora.safetensors from the EMA adapters of the checkpoint (e.g. of an unfinished run),
    verified first; adapters of another LoRA rank or targets than the config's are an LvError (`check_fit`) before
    anything is written (the file's metadata would not describe its tensors)."""
    out = Path(out_dir or cfg.out_dir)
    path = out / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint in {out}")
    tensors, meta = read_checkpoint(path, "erft")
    base = json.loads(meta.get("base", "{}"))
    _check_alpha(path, meta, cfg.lora_alpha)
    if "dit_config" in base:  # every ERFT checkpoint records its base DiT's config
        check_fit(path, {f"ema.{k}": v for k, v in _config_adapters(cfg, base["dit_config"]).items()}, tensors,
                  ("ema.",))
    ema = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
    return save_lora(out / LORA_FILE, ema, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, base=base)
