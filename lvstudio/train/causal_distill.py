"""CausVid-style causal distillation of the tiny preset (`lvstudio train causal-distill CONFIG.toml`).

Stage 1a, ODE pairs: the teacher (the base DiT, many-step Euler with CFG) samples windows of `num_blocks` blocks
from world prompts; the trajectory is stored at the student's step list (the Euler grid passes through those σ
exactly) plus the clean end. Teacher attention "causal" samples block by block over the KV cache like the backend
(what the tiny base was trained for), "bidirectional" denoises the whole window jointly. Pairs are written in parts
(out_dir/ode_pairs/part_NNNNN.safetensors), so an interrupted run resumes.
Stage 1b, ODE regression (`target = "clean-end"`, CausVid): per block a random index of the list (or the clean end),
one block-causal forward, MSE(x0 prediction, clean end) over the noisy frames. The output out_dir/dit.safetensors
(EMA) is the `init_dit` of the Self-Forcing config.
Stage 1b, guidance distillation (`target = "teacher-step"`, Meng et al. 2023): the teacher's Euler grid is the
student's step list, so each step of a stored trajectory is one teacher step with CFG, whose velocity is
(x_{j+1} − x_j)/(σ_{j+1} − σ_j). The student (initialised from the teacher) learns that velocity in one forward
without the unconditional row, with the block's past clean as the causal-KV backend holds it; it then samples with
the teacher's own Euler sampler at cfg_scale 1 (half the DiT calls) instead of the few-step sampler. With
`teacher_drop_words` the teacher is also guided on words: a row whose captions lack those words, v += (s − 1)(v_cond −
v_without), which strengthens what the words say alone (the tiny preset's shape words: train_gd_words.toml).
Stage 2 (optional, dmd_steps > 0): DMD with backward_simulation = false, run by `self_forcing.train_self_forcing`
in out_dir/dmd.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
from pydantic import model_validator
from torch import Tensor

from lvstudio.models.kv_cache import AttentionSpec
from lvstudio.models.tiny_vocab import split_words
from lvstudio.models.wan_dit import WanDiT
from lvstudio.sampling.flow_matching import FlowMatchTable, sigma_grid, x0_from_velocity
from lvstudio.sampling.samplers import euler_sample
from lvstudio.train.common import ConfigProblem, require_cpu
from lvstudio.train.data import LatentDataset
from lvstudio.train.loop import (
    EMA,
    TrainLog,
    TrainLoop,
    forward_precision,
    load_checkpoint,
    lr_at,
    optimizer_step,
    progress_bar,
    save_checkpoint,
    set_lr,
    step_generator,
)
from lvstudio.train.self_forcing import (
    DistillModels,
    SelfForcingConfig,
    check_model_inputs,
    export_generator,
    load_models,
    train_self_forcing,
    world_prompts,
)
from lvstudio.train.sharding import refuse_fsdp

RECIPE = "causal-distill-ode"  # the kind of its checkpoints (stage 1b; the DMD stage is a self-forcing run)


class CausalDistillConfig(SelfForcingConfig):
    """ODE pairs + ODE regression (steps / lr / batch_size / ema_* apply to the regression); optional DMD stage 2
    (dmd_* fields plus the inherited Self-Forcing fields)."""

    path_fields: ClassVar[tuple[str, ...]] = SelfForcingConfig.path_fields
    example: ClassVar[str] = "presets/tiny/train_ode.toml"

    teacher_steps: int = 24  # Euler steps of the teacher (the step list's σ are added to the grid)
    teacher_shift: float = 2.0
    teacher_cfg: float = 3.0  # uncond + s·(cond − uncond), the preset convention (1: no unconditional row)
    # Guidance on words: + (s − 1)·(cond − cond without these words), a row whose caption lacks them; it strengthens
    # what the words say and nothing else (the tiny preset: its shape words, on a teacher already guidance-distilled).
    teacher_drop_words: list[str] = []
    teacher_drop_cfg: float = 1.0
    teacher_attention: Literal["causal", "bidirectional"] = "causal"
    num_pairs: int = 256
    pair_batch: int = 16  # pairs per saved part
    clean_index: bool = True  # the regression may also draw the clean end for a block (clean history, no loss)
    target: Literal["clean-end", "teacher-step"] = "clean-end"  # ODE regression or guidance distillation
    betas: tuple[float, float] = (0.9, 0.999)
    lr: float = 2e-4
    batch_size: int = 8
    ema_decay: float = 0.99
    ema_start: int = 20
    dmd_steps: int = 0  # stage 2 iterations (0 = ODE init only)
    dmd_lr: float = 1e-4
    dmd_batch_size: int = 2
    dmd_betas: tuple[float, float] = (0.0, 0.999)

    @model_validator(mode="after")
    def _check_teacher_step(self) -> CausalDistillConfig:
        if self.teacher_drop_cfg != 1.0 and not self.teacher_drop_words:
            raise ConfigProblem("teacher_drop_cfg", f"teacher_drop_cfg = {self.teacher_drop_cfg} guides on the words "
                                "of teacher_drop_words, which is empty",
                                'name them (e.g. teacher_drop_words = ["ball", "cube"]) or set teacher_drop_cfg = 1')
        if self.target == "teacher-step":
            grid, marks = teacher_grid(self), list_sigmas(self)
            if len(grid) != len(marks) + 1 or any(abs(g - m) > 1e-4 for g, m in zip(grid, marks, strict=False)):
                raise ConfigProblem(
                    "target", f'target = "teacher-step" needs the teacher\'s Euler grid to be the student\'s steps '
                    f"(grid {[round(g, 4) for g in grid]}, steps {[round(m, 4) for m in marks]})",
                    f"set teacher_steps = {len(marks)}, teacher_shift = shift and warp = true")
            if self.dmd_steps:
                raise ConfigProblem("dmd_steps", 'target = "teacher-step" has no DMD stage', "set dmd_steps = 0")
        return self

    def sampler_table(self) -> dict:
        """The [sampler] table a preset needs to run the exported generator: guidance distillation keeps the
        teacher's Euler sampler (without CFG), the ODE regression the few-step one."""
        if self.target == "teacher-step":
            return {"kind": "euler", "steps": self.teacher_steps, "shift": self.teacher_shift, "cfg_scale": 1.0,
                    "context_noise": self.context_noise}
        return super().sampler_table()


# ---------------------------------------------------------------------------------------------------------------
# Stage 1a: ODE pairs
# ---------------------------------------------------------------------------------------------------------------


def list_sigmas(cfg: SelfForcingConfig) -> list[float]:
    """σ of the student's (warped) steps, looked up in the shifted table like the sampler does."""
    table = FlowMatchTable(shift=cfg.shift)
    return [float(table.sigma_at(t)) for t in cfg.timesteps()]


def teacher_grid(cfg: CausalDistillConfig) -> list[float]:
    """Descending Euler σ grid: sigma_grid(teacher_steps, teacher_shift) with the list's σ inserted exactly."""
    marks = list_sigmas(cfg)
    base = [float(s) for s in sigma_grid(cfg.teacher_steps, cfg.teacher_shift)]
    grid = sorted({*marks, *(s for s in base if all(abs(s - m) > 1e-4 for m in marks))}, reverse=True)
    if grid[0] < 1.0 - 1e-6:
        grid = [1.0, *grid]
    return grid


def drop_words(prompt: str, words: list[str]) -> str:
    """The prompt without these words (the caption of a word-guidance row), split as the tiny text encoder splits
    it (lower case, punctuation dropped), so "Ball," is dropped as the encoder reads it: "ball"."""
    drop = {w.lower() for w in words}
    return " ".join(w for w in split_words(prompt) if w not in drop)


@torch.no_grad()
def teacher_trajectories(teacher: WanDiT, context: Tensor, uncond: Tensor, noise: Tensor,
                         cfg: CausalDistillConfig, dropped: Tensor | None = None) -> Tensor:
    """Teacher samples from `noise` [B, C, F, h, w]; returns the trajectory [B, K+1, C, F, h, w] at the list's
    σ (K entries) plus the clean end. Guided on `uncond` [B, L, D] (unless teacher_cfg is 1) and, with
    teacher_drop_cfg, on `dropped` [B, L, D] (the prompts without teacher_drop_words)."""
    grid = teacher_grid(cfg)
    marks = list_sigmas(cfg)
    b = noise.shape[0]
    use_uncond, use_dropped = cfg.teacher_cfg != 1.0, cfg.teacher_drop_cfg != 1.0
    if use_dropped and dropped is None:
        raise ValueError("teacher_drop_cfg is set: pass the prompts' features without teacher_drop_words")
    ctx = [context, *([uncond] if use_uncond else []), *([dropped] if use_dropped else [])]
    r = len(ctx)  # rows: cond[, uncond][, dropped]
    cond_rows = teacher.new_conditioning(torch.cat(ctx))

    def guide(v: Tensor) -> Tensor:
        out = v[:b]
        if use_uncond:
            out = v[b : 2 * b] + cfg.teacher_cfg * (v[:b] - v[b : 2 * b])
        if use_dropped:
            out = out + (cfg.teacher_drop_cfg - 1.0) * (v[:b] - v[(r - 1) * b :])
        return out

    def run(x: Tensor, denoise) -> list[Tensor]:
        states: dict[int, Tensor] = {}
        if grid[0] in marks:
            states[marks.index(grid[0])] = x.clone()

        def record(i: int, _t: float, xi: Tensor) -> None:
            s = grid[i + 1]
            if s in marks:
                states[marks.index(s)] = xi.clone()

        x0 = euler_sample(denoise, x, grid, callback=record)
        return [states[j] for j in range(len(marks))] + [x0]

    def denoiser(**kw):
        def guided(x: Tensor, t: Tensor) -> Tensor:
            return guide(teacher(torch.cat([x] * r), torch.cat([t] * r), cond_rows, **kw))

        return guided

    if cfg.teacher_attention == "bidirectional":
        return torch.stack(run(noise, denoiser(attention=AttentionSpec())), dim=1)
    # Causal: block by block over the KV cache, then the clean context pass (as the causal-KV backend).
    n, (h, w) = cfg.block_frames, noise.shape[-2:]
    cache = teacher.new_kv_cache(cfg.spec, (h, w))
    blocks = []
    for k in range(cfg.num_blocks):
        s = k * n
        traj = run(noise[:, :, s : s + n], denoiser(attention=cfg.spec, kv_cache=cache, start_frame=s,
                                                    rope_mode=cfg.rope_mode))
        x0 = traj[-1]
        t_ctx = torch.full((r * b, n), float(cfg.context_noise))
        teacher(torch.cat([x0] * r), t_ctx, cond_rows, attention=cfg.spec, kv_cache=cache, start_frame=s,
                write_cache=True, rope_mode=cfg.rope_mode)
        blocks.append(torch.stack(traj, dim=1))  # [B, K+1, C, n, h, w]
    return torch.cat(blocks, dim=3)


def generate_ode_pairs(cfg: CausalDistillConfig, models: DistillModels, out: Path, progress: bool = False) -> Path:
    """Write (or finish writing) the ODE-pair parts in out/ode_pairs; returns that folder.

    The parts are a cache: each is written atomically with a checksum, and one found damaged is made again (with a
    warning); a part depends only on (seed, part) and what made it (`pair_maker`: the teacher's and text encoder's
    sha256 and the sampling settings), so it comes out the same. A part another teacher or other settings made is
    made again, with a warning (parts of versions that did not record it are taken as they are)."""
    from lvstudio.checked_files import load_cache, save_checked

    folder = out / "ode_pairs"
    folder.mkdir(parents=True, exist_ok=True)
    maker = pair_maker(cfg)

    parts = math.ceil(cfg.num_pairs / cfg.pair_batch)
    h = cfg.size // 8
    timesteps = torch.tensor([*cfg.timesteps(), 0.0], dtype=torch.float32)
    with progress_bar(parts, 0, progress, "ode pairs") as update:
        for p in range(parts):
            path = folder / f"part_{p:05d}.safetensors"
            found = load_cache(path, _read_part)
            if found is not None and found[3] not in (None, maker):
                warnings.warn(f"{path} was made by another teacher or other settings ({_maker_change(found[3], maker)})"
                              "; it is a cache, so it is made again", stacklevel=2)
            elif found is not None:
                update(p + 1, math.nan)
                continue
            b = min(cfg.pair_batch, cfg.num_pairs - p * cfg.pair_batch)
            rng = np.random.default_rng([cfg.seed, p, 17])
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            prompts = world_prompts(b, rng)
            noise = torch.randn(b, models.real.cfg.out_dim, cfg.num_frames, h, h, generator=gen)
            dropped = (models.encode([drop_words(q, cfg.teacher_drop_words) for q in prompts])
                       if cfg.teacher_drop_cfg != 1.0 else None)  # only word guidance uses this row
            traj = teacher_trajectories(models.real, models.encode(prompts), models.encode([""] * b), noise, cfg,
                                        dropped)
            save_checked({"trajectory": traj.contiguous(), "timesteps": timesteps}, path,
                         {"prompts": json.dumps(prompts), "format": "pt", "maker": maker})
            update(p + 1, math.nan)
    return folder


def pair_maker(cfg: CausalDistillConfig) -> str:
    """What a part of ODE pairs depends on besides (seed, part), as JSON: the teacher's and the text encoder's sha256
    and the settings of the teacher's sampling and of the windows."""
    from lvstudio.checked_folders import file_sha256

    keys = ("teacher_steps", "teacher_shift", "teacher_cfg", "teacher_attention", "num_blocks", "block_frames",
            "window_frames", "sink_frames", "rope_mode", "context_noise", "size")
    words = {"teacher_drop_cfg": cfg.teacher_drop_cfg, "teacher_drop_words": sorted(cfg.teacher_drop_words)}
    return json.dumps({"teacher": file_sha256(cfg.real_dit), "text": file_sha256(cfg.text),
                       "timesteps": [round(t, 6) for t in cfg.timesteps()], **{k: getattr(cfg, k) for k in keys},
                       **(words if cfg.teacher_drop_cfg != 1.0 else {})}, sort_keys=True)


def _maker_change(old: str, new: str) -> str:
    """The keys of `pair_maker` that differ: "teacher, teacher_cfg"."""
    was, now = json.loads(old), json.loads(new)
    return ", ".join(k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k)) or "its record"


def load_ode_pairs(folder: Path) -> tuple[Tensor, Tensor, list[str]]:
    """All parts (verified): trajectories [N, K+1, C, F, h, w], timesteps [K+1] (last 0), prompts."""
    trajs, prompts, timesteps = [], [], None
    for path in sorted(folder.glob("part_*.safetensors")):
        traj, timesteps, part_prompts, _ = _read_part(path)
        trajs.append(traj)
        prompts += part_prompts
    if not trajs:
        raise FileNotFoundError(f"no ODE pairs in {folder}")
    return torch.cat(trajs), timesteps, prompts


def _read_part(path: Path) -> tuple[Tensor, Tensor, list[str], str | None]:
    """One part: trajectories [b, K+1, C, F, h, w], timesteps [K+1], prompts, its `pair_maker` record (None: made
    before parts recorded it); DamagedFileError if it is damaged."""
    from lvstudio.checked_files import load_checked

    hint = "ODE pairs are derived data: delete the part, and `lvstudio train causal-distill CONFIG.toml` makes it again"
    tensors, meta = load_checked(path, require_digest=False, hint=hint)
    return tensors["trajectory"], tensors["timesteps"], json.loads(meta["prompts"]), meta.get("maker")


# ---------------------------------------------------------------------------------------------------------------
# Stage 1b: ODE regression
# ---------------------------------------------------------------------------------------------------------------


def ode_regression_loss(generator: WanDiT, context: Tensor, traj: Tensor, timesteps: Tensor,
                        cfg: CausalDistillConfig, gen: torch.Generator) -> Tensor:
    """traj [B, K+1, C, F, h, w]; per block one random index (the clean end too if clean_index); one block-causal
    forward; MSE(x0 prediction, clean end) over the noisy frames."""
    b, kk = traj.shape[:2]
    n, nb = cfg.block_frames, cfg.num_blocks
    choices = kk if cfg.clean_index else kk - 1
    idx = torch.randint(0, choices, (b, nb), generator=gen).repeat_interleave(n, dim=1)  # [B, F]
    x_t = torch.gather(traj, 1, idx[:, None, None, :, None, None].expand(-1, 1, *traj.shape[2:])).squeeze(1)
    t = timesteps[idx]  # [B, F]
    table = FlowMatchTable(shift=cfg.shift)
    sigma = torch.where(t > 0, table.sigma_at(t), torch.zeros_like(t))
    v = generator(x_t, t, generator.new_conditioning(context), attention=cfg.spec)
    x0 = x0_from_velocity(x_t, v, sigma)
    noisy = (t > 0).float()  # [B, F]
    err = (x0 - traj[:, -1]).pow(2).mean(dim=(1, 3, 4))  # [B, F]
    return (err * noisy).sum() / noisy.sum().clamp_min(1.0)


def teacher_step_loss(generator: WanDiT, context: Tensor, traj: Tensor, cfg: CausalDistillConfig,
                      gen: torch.Generator) -> Tensor:
    """Guidance distillation. traj [B, K+1, C, F, h, w] of a teacher whose Euler grid is the list's σ (checked by
    the config). One block k for the batch (random), its past clean (as the backend's KV cache holds it), a random
    state j per sample; MSE(student velocity, teacher's CFG velocity at x_j) over block k."""
    b, kk = traj.shape[:2]
    n = cfg.block_frames
    k = int(torch.randint(0, cfg.num_blocks, (1,), generator=gen))
    j = torch.randint(0, kk - 1, (b,), generator=gen)  # [B]
    sigma = torch.tensor([*list_sigmas(cfg), 0.0])
    t_list = torch.tensor(cfg.timesteps())
    s, e = k * n, (k + 1) * n
    rows = torch.arange(b)
    x_j, x_next = traj[rows, j, :, s:e], traj[rows, j + 1, :, s:e]  # [B, C, n, h, w]
    v_teacher = (x_next - x_j) / (sigma[j + 1] - sigma[j]).view(b, 1, 1, 1, 1)
    x = torch.cat([traj[:, -1, :, :s], x_j], dim=2)  # [B, C, e, h, w]: clean past, block k at state j
    t = torch.cat([torch.full((b, s), float(cfg.context_noise)), t_list[j][:, None].expand(b, n)], dim=1)  # [B, e]
    v = generator(x, t, generator.new_conditioning(context), attention=cfg.spec)
    return (v[:, :, s:].float() - v_teacher).pow(2).mean()


def train_causal_distill(cfg: CausalDistillConfig, *, progress: bool = True, dataset: LatentDataset | None = None,
                         vocabulary: list[str] | None = None) -> dict:
    """ODE pairs → ODE regression (→ out_dir/dit.safetensors) → optional DMD stage 2 (out_dir/dmd). Resumable."""
    import os

    del vocabulary
    refuse_fsdp(cfg.fsdp, "causal-distill", "it runs in one process (its DMD stage is the self-forcing recipe, "
                "which takes --fsdp)")
    require_cpu(cfg, "causal-distill")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("causal-distill runs in one process (launch it without torchrun)")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    check_model_inputs(cfg, needs_latents=cfg.dmd_steps > 0 and dataset is None)  # stage 2: real latents
    out.mkdir(parents=True, exist_ok=True)  # once the inputs are there: a refused run leaves no empty out_dir
    torch.manual_seed(cfg.seed)
    models = load_models(cfg, with_critic=False)
    # Stage 1a: teacher ODE pairs.
    t0 = time.perf_counter()
    folder = generate_ode_pairs(cfg, models, out, progress)
    pair_seconds = time.perf_counter() - t0
    trajs, timesteps, prompts = load_ode_pairs(folder)
    # Stage 1b: regression.
    generator = models.generator
    device = next(generator.parameters()).device
    opt = torch.optim.AdamW(generator.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    ema = EMA(generator, cfg.ema_decay)
    ckpt = out / "checkpoint.safetensors"
    start = load_checkpoint(ckpt, generator, opt, ema, RECIPE)[0] if ckpt.exists() else 0
    log = TrainLog(out, True)

    def one_step(step: int) -> dict[str, float]:
        # A deterministic batch of pairs and per-block indices; loss, AdamW with warm-up, EMA.
        rng, gen = step_generator(cfg.seed, step, 0)
        rows = rng.integers(len(prompts), size=cfg.batch_size)
        context = models.encode([prompts[int(i)] for i in rows])
        lr = set_lr(opt, lr_at(step, cfg.lr, cfg.warmup_steps, cfg.decay_start, cfg.steps, cfg.min_lr))
        with forward_precision(cfg.precision, device):
            batch = trajs[torch.as_tensor(rows)]
            loss = (teacher_step_loss(generator, context, batch, cfg, gen) if cfg.target == "teacher-step"
                    else ode_regression_loss(generator, context, batch, timesteps, cfg, gen))
        grad_norm = optimizer_step(opt, loss, generator.parameters(), cfg.grad_clip)
        ema.update(generator, decay=0.0 if step + 1 <= cfg.ema_start else None)
        return {"loss": float(loss.detach()), "grad_norm": grad_norm, "lr": lr}

    def save(step: int) -> None:
        save_checkpoint(ckpt, generator, opt, ema, step, {"recipe": RECIPE})

    loop = TrainLoop.for_config(cfg, start=start, report=lambda step, f: log.report(step, {"stage": "ode", **f}),
                                checkpoint=save, progress=progress, description="ode regression")
    step, last = loop.run(one_step)
    loss_value = last.get("loss", math.nan)
    export_generator(generator.cfg, ema.shadow, out, cfg.sampler_table())
    result = {"step": step, "loss": loss_value, "pairs": len(prompts), "pair_seconds": pair_seconds,
              "out_dir": str(out)}
    # Stage 2: DMD on noised real latents (CausVid), the Self-Forcing loop with backward_simulation = false.
    if cfg.dmd_steps > 0:
        result["dmd"] = train_self_forcing(dmd_config(cfg), progress=progress, dataset=dataset)
    return result


def dmd_config(cfg: CausalDistillConfig) -> SelfForcingConfig:
    """The stage-2 Self-Forcing config: generator from the ODE init, noised real latents, out_dir/dmd."""
    fields = {k: getattr(cfg, k) for k in SelfForcingConfig.model_fields}
    fields.update(out_dir=str(Path(cfg.out_dir) / "dmd"), init_dit=str(Path(cfg.out_dir) / "dit.safetensors"),
                  backward_simulation=False, mode="dmd", steps=cfg.dmd_steps, lr=cfg.dmd_lr,
                  batch_size=cfg.dmd_batch_size, betas=cfg.dmd_betas)
    return SelfForcingConfig(**fields)
