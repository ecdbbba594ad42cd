"""Training recipe for the tiny causal video VAE (`lvstudio.models.tiny_vae`).

AdamW on L1 + MSE + edge reconstruction losses plus a tiny KL term; every step's data and noise come from
`np.random.default_rng([seed, 0, step])`, so a run resumed from a checkpoint continues exactly as an uninterrupted one.
Checkpoints are one safetensors file (model + AdamW state as tensors, step/config as JSON metadata), replaced
atomically.
At the end the held-out PSNR is measured and per-channel latent statistics are stored into the model config.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from lvstudio.models.tiny_vae import TinyVAEConfig

if TYPE_CHECKING:
    import torch
    from torch import Tensor

    from lvstudio.models.tiny_vae import TinyVAE

CKPT_FORMAT = "lvstudio.vae_train_ckpt/1"
CKPT_NAME = "checkpoint.safetensors"
MODEL_NAME = "tiny_vae.safetensors"

MakeBatch = Callable[[np.random.Generator, int], "Tensor"]
Progress = Callable[[int, dict[str, float]], None]


@dataclass(frozen=True)
class VAETrainConfig:
    """Hyper-parameters of `train_vae`."""

    steps: int = 20_000
    batch_size: int = 8
    clip_frames: int = 9  # 1 + 4k pixel frames per clip
    size: int = 128  # frame size make_batch produces
    crop: int = 64  # random square crops of this size for training (0 = full frames); eval uses full frames
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    min_lr_ratio: float = 0.1  # cosine decay from lr to lr * min_lr_ratio over `steps`
    grad_clip: float = 1.0
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    edge_weight: float = 0.5  # L1 on spatial finite differences (sharper edges)
    kl_weight: float = 1e-6  # times the per-element mean KL
    object_weight: float = 0.0  # L1/MSE/edge weight added on vivid (object) pixels and their rim: shapes stay crisp
    freeze_encoder_at: int | None = None  # from this step on only the decoder trains: the latents stay fixed, so a
    #                                       DiT can be trained on them while the decoder keeps improving
    latent_noise: float = 0.0  # decoder-only phase: z + U(0, latent_noise) * per-channel std * eps, so the decoder
    #                            draws crisp frames from slightly-off latents (what a DiT produces)
    restart_prob: float = 0.0  # decoder-only phase: share of batches decoded from a random latent on with zero
    #                            history (`StreamingDecoder.new_shot`, what a cut does), all 4 frames of it trained
    seed: int = 0
    log_every: int = 50
    ckpt_every: int = 500
    eval_batches: int = 2  # held-out batches for the final PSNR
    stats_batches: int = 8  # batches for the latent mean/std
    out_dir: str = "runs/tiny_vae"
    data_workers: int = 0  # processes that render training batches ahead of the model (0 = this one)
    device: str = "cpu"  # where the model trains ("cpu", "cuda", "cuda:1"); batches are rendered on the CPU
    model: TinyVAEConfig = field(default_factory=TinyVAEConfig)
    init_from: str | None = None  # a trained VAE file to start from (`model.z_dim` may be a multiple of its own:
    #                               `widen_latents`); used when the run has no checkpoint yet

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError("steps must be >= 0 and batch_size >= 1")
        if self.clip_frames < 1 or (self.clip_frames - 1) % 4:
            raise ValueError(f"clip_frames must be 1 + 4k, got {self.clip_frames}")
        if self.size % 8 or self.crop % 8 or self.crop > self.size:
            raise ValueError("size and crop must be multiples of 8 with crop <= size")
        if self.log_every < 1 or self.ckpt_every < 1:
            raise ValueError("log_every and ckpt_every must be >= 1")

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def lr_at(cfg: VAETrainConfig, step: int) -> float:
    """Learning rate for (0-based) `step`: linear warmup, then cosine to lr * min_lr_ratio (`loop.lr_at` with the
    decay starting when the warm-up ends)."""
    from lvstudio.train.loop import lr_at as schedule

    return schedule(step, cfg.lr, cfg.warmup_steps, cfg.warmup_steps, cfg.steps, cfg.lr * cfg.min_lr_ratio)


@dataclass(frozen=True)
class WorldBatches:
    """`make_batch` over the procedural world (`lvstudio.world.sample_clip`, imported lazily); a picklable callable,
    so that data worker processes can run it.

    With probability `cut_prob` a clip is a hard cut: a second, unrelated clip takes over at the first pixel frame of
    a random latent (frame 4k - 3), so the VAE learns to keep a cut between two latents clean (a storyboard cut starts
    a new shot while the streaming decoder keeps running).
    """

    num_frames: int
    size: int = 128
    switch_prob: float = 0.3
    cut_prob: float = 0.0

    def __call__(self, rng: np.random.Generator, batch_size: int) -> Tensor:
        import torch

        from lvstudio.world import sample_clip

        seeds = rng.integers(0, 2**31 - 1, size=batch_size)
        clips = []
        for s in seeds:
            frames = sample_clip(int(s), self.num_frames, size=self.size, switch_prob=self.switch_prob).frames
            latents = 1 + (self.num_frames - 1) // 4  # frames [F, H, W, 3]
            if self.cut_prob > 0 and latents > 1 and rng.random() < self.cut_prob:
                at = 4 * int(rng.integers(1, latents)) - 3  # first pixel frame of latent k
                other = sample_clip(int(rng.integers(0, 2**31 - 1)), self.num_frames - at, size=self.size,
                                    switch_prob=self.switch_prob).frames
                frames = np.concatenate([frames[:at], other])
            clips.append(frames)
        frames = torch.from_numpy(np.stack(clips))  # [B, F, H, W, 3] uint8
        return frames.permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)  # [B, 3, F, H, W] in [-1, 1]


def world_batch_fn(num_frames: int, size: int = 128, switch_prob: float = 0.3, cut_prob: float = 0.0) -> MakeBatch:
    """`make_batch` over the procedural world (see `WorldBatches`)."""
    return WorldBatches(num_frames, size, switch_prob, cut_prob)


def step_batch(cfg: VAETrainConfig, make_batch: MakeBatch, step: int) -> tuple[Tensor, int]:
    """Step `step`'s training batch (cropped) and noise seed, from `np.random.default_rng([seed, 0, step])` alone:
    the same in this process or a data worker, and after a resume."""
    rng = np.random.default_rng([cfg.seed, 0, step])
    x = _get_batch(cfg, make_batch, rng, cfg.crop)
    return x, int(rng.integers(0, 2**62))


def step_batches(cfg: VAETrainConfig, make_batch: MakeBatch, start: int) -> Iterator[tuple[Tensor, int]]:
    """`step_batch` of steps start, start+1, ...: made here, or ahead by `cfg.data_workers` spawned processes (a GPU
    trains faster than one CPU core renders the world); the batches are the same either way."""
    import functools
    import multiprocessing

    make = functools.partial(step_batch, cfg, make_batch)
    if cfg.data_workers <= 0:
        yield from map(make, range(start, cfg.steps))
        return
    with multiprocessing.get_context("spawn").Pool(cfg.data_workers) as pool:
        yield from pool.imap(make, range(start, cfg.steps), chunksize=1)


# ---------------------------------------------------------------------------------------------------------------
# Losses and metrics.


def _decoder_phase_forward(cfg: VAETrainConfig, vae: TinyVAE, x: Tensor, generator: torch.Generator
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Frozen encoder (no graph), posterior mean plus latent-noise augmentation, decoder with gradients.
    Returns (reconstruction, target, mu, logvar): with a restart the target is the clip from the restart frame on."""
    import torch

    from lvstudio.models.tiny_vae import CONTINUE_KEY

    with torch.no_grad():
        mu, logvar = vae.encode_raw(x)  # [B, z, f, h, w]
        z = mu
        if cfg.latent_noise > 0:
            std = mu.transpose(0, 1).flatten(1).std(dim=1).view(1, -1, 1, 1, 1)  # [1, z, 1, 1, 1]
            # Noise from the CPU generator (the same numbers on every device), moved to mu's device.
            level = torch.rand(mu.shape[0], 1, 1, 1, 1, generator=generator).to(mu.device) * cfg.latent_noise
            z = mu + level * std * torch.randn(mu.shape, generator=generator).to(mu.device)
    if cfg.restart_prob > 0 and z.shape[2] > 1 and float(torch.rand((), generator=generator)) < cfg.restart_prob:
        k = int(torch.randint(1, z.shape[2], (), generator=generator))  # decode latents k.. from zero history
        return vae.decode_raw(z[:, :, k:], {CONTINUE_KEY: torch.ones(())}), x[:, :, 4 * k - 3 :], mu, logvar
    return vae.decode_raw(z), x, mu, logvar


def _losses(cfg: VAETrainConfig, vae: TinyVAE, x: Tensor, generator: torch.Generator, step: int = 0
            ) -> dict[str, Tensor]:
    """Weighted loss terms of one batch x [B, 3, F, H, W]; key "loss" is the total."""
    import torch

    if cfg.freeze_encoder_at is not None and step >= cfg.freeze_encoder_at:
        recon, x, mu, logvar = _decoder_phase_forward(cfg, vae, x, generator)
    else:
        recon, mu, logvar = vae(x, sample=True, generator=generator)
    terms = reconstruction_terms(recon, x, cfg.object_weight)
    kl = 0.5 * torch.mean(mu.pow(2) + logvar.exp() - 1.0 - logvar)
    loss = cfg.l1_weight * terms["l1"] + cfg.mse_weight * terms["mse"] + cfg.edge_weight * terms["edge"] \
        + cfg.kl_weight * kl
    return {"loss": loss, **terms, "kl": kl}


def reconstruction_terms(recon: Tensor, x: Tensor, object_weight: float, fringe: bool = False) -> dict[str, Tensor]:
    """L1, MSE and edge (L1 on spatial finite differences) of recon − x [B, 3, F, H, W], each weighted per pixel by
    `object_pixel_weight` when object_weight > 0; `fringe`: the pixels the reconstruction draws vivid count as
    object pixels too (colour fringes and ghosts where the target has background)."""
    diff = recon - x
    if object_weight > 0:
        w = object_pixel_weight(x, object_weight, recon.detach() if fringe else None)  # [B, 1, F, H, W], mean 1
        l1 = (diff.abs() * w).mean()
        mse = (diff.pow(2) * w).mean()
        edge = ((diff.diff(dim=-1).abs() * w[..., 1:]).mean() + (diff.diff(dim=-2).abs() * w[..., 1:, :]).mean()) * 0.5
    else:
        l1 = diff.abs().mean()
        mse = diff.pow(2).mean()
        edge = (diff.diff(dim=-1).abs().mean() + diff.diff(dim=-2).abs().mean()) * 0.5
    return {"l1": l1, "mse": mse, "edge": edge}


def object_pixel_weight(x: Tensor, weight: float, recon: Tensor | None = None) -> Tensor:
    """Per-pixel loss weight [B, 1, F, H, W]: 1 + weight on vivid pixels (the world's objects: chroma ≥ 88 of 255,
    as the oracle reads them) dilated by 2 px so their edges count, renormalised to mean 1 per frame. With `recon`
    [B, 3, F, H, W], pixels vivid in either (a colour the decoder draws where the target has none counts too)."""
    import torch.nn.functional as F

    def vivid_of(img: Tensor) -> Tensor:
        chroma = img.amax(dim=1, keepdim=True) - img.amin(dim=1, keepdim=True)  # [B, 1, F, H, W] in [0, 2]
        return chroma >= 2 * 88 / 255

    vivid = (vivid_of(x) if recon is None else vivid_of(x) | vivid_of(recon)).float()
    b, _, f, h, w = vivid.shape
    rim = F.max_pool2d(vivid.transpose(1, 2).reshape(b * f, 1, h, w), 5, stride=1, padding=2)
    wt = 1.0 + weight * rim.reshape(b, f, 1, h, w).transpose(1, 2)
    return wt / wt.mean(dim=(3, 4), keepdim=True)


def _psnr_from_mse(mse: float) -> float:
    return float("inf") if mse <= 0 else 10.0 * math.log10(4.0 / mse)  # [-1, 1] range: peak-to-peak 2


def _get_batch(cfg: VAETrainConfig, make_batch: MakeBatch, rng: np.random.Generator, crop: int) -> Tensor:
    """A checked batch [B, 3, F, H, W], randomly cropped to `crop` (0 = full size)."""
    x = make_batch(rng, cfg.batch_size)
    want = (cfg.batch_size, 3, cfg.clip_frames, cfg.size, cfg.size)
    if tuple(x.shape) != want:
        raise ValueError(f"make_batch returned {tuple(x.shape)}, expected {want}")
    if crop and crop < cfg.size:
        top, left = (int(v) for v in rng.integers(0, cfg.size - crop + 1, size=2))
        x = x[..., top : top + crop, left : left + crop]
    return x.float().contiguous()


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints.


def _save_checkpoint(path: str, cfg: VAETrainConfig, vae: TinyVAE, opt: torch.optim.Optimizer, step: int) -> None:
    """Model + AdamW state as tensors, step and configs as JSON metadata; atomic, with a checksum
    (`lvstudio.checked_files`)."""
    from lvstudio.checked_files import save_checked
    tensors = {f"model/{k}": v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    opt_sd = opt.state_dict()
    for idx, st in opt_sd["state"].items():
        for name, value in st.items():
            tensors[f"optim/{idx}/{name}"] = value.detach().cpu().contiguous()
    metadata = {
        "format": CKPT_FORMAT,
        "step": str(step),
        "seed": str(cfg.seed),
        "model_config": vae.config.to_json(),
        "train_config": cfg.to_json(),
        "param_groups": json.dumps(opt_sd["param_groups"]),
    }
    save_checked(tensors, path, metadata)


def _load_checkpoint(path: str, cfg: VAETrainConfig, vae: TinyVAE, opt: torch.optim.Optimizer) -> int:
    """Restore model and optimizer from `path` (verified: a damaged file raises DamagedFileError, another recipe's
    checkpoint or another model config an LvError, before anything is restored); returns the number of completed
    steps."""
    from lvstudio.errors import LvError
    from lvstudio.train.loop import FIT_HINT, read_checkpoint

    tensors, meta = read_checkpoint(path, "vae")  # "vae": the kind of CKPT_FORMAT (lvstudio.train.loop)
    if TinyVAEConfig.from_json(meta["model_config"]) != cfg.model:
        raise LvError(f"{path} was trained with another model config than [model] of this run's config",
                      hint=FIT_HINT)
    vae.load_state_dict({k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}, strict=True)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim/"):
            _, idx, name = key.split("/", 2)
            state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return int(meta["step"])


def _init_from(cfg: VAETrainConfig, vae: TinyVAE) -> None:
    """Load `cfg.init_from` into `vae`, widened to `cfg.model.z_dim` (an LvError naming the fields when the two
    models differ otherwise)."""
    from lvstudio.errors import LvError
    from lvstudio.models.tiny_vae import load_vae, widen_latents

    src = load_vae(cfg.init_from)
    differ = [f.name for f in fields(src.config) if f.name not in ("z_dim", "latents_mean", "latents_std")
              and getattr(src.config, f.name) != getattr(cfg.model, f.name)]
    if differ or cfg.model.z_dim % src.config.z_dim:
        raise LvError(f"init_from {cfg.init_from} has another model than [model] of this run's config "
                      f"({', '.join(differ) or f'z_dim {src.config.z_dim} does not divide {cfg.model.z_dim}'})",
                      hint="copy its [model] sizes into the config; only z_dim may grow, by a whole multiple")
    if cfg.model.z_dim != src.config.z_dim:
        src = widen_latents(src, cfg.model.z_dim)
    vae.load_state_dict(src.state_dict(), strict=True)


def _start(cfg: VAETrainConfig, vae: TinyVAE, opt: torch.optim.Optimizer, ckpt_path: str | None,
           before_start: Callable[[], None] | None) -> int:
    """The step a run starts from: its checkpoint's (when `ckpt_path` exists), else 0 from `init_from` or random;
    then `before_start()`, then out_dir is made (after init_from is checked: a refused run leaves nothing behind)."""
    start = 0
    if ckpt_path is not None and os.path.exists(ckpt_path):
        start = _load_checkpoint(ckpt_path, cfg, vae, opt)
    elif cfg.init_from:
        _init_from(cfg, vae)
    if before_start is not None:
        before_start()
    os.makedirs(cfg.out_dir, exist_ok=True)
    return start


# ---------------------------------------------------------------------------------------------------------------
# The recipe.


def train_vae(
    cfg: VAETrainConfig,
    make_batch: MakeBatch,
    resume: bool = True,
    progress: Progress | None = None,
    eval_batch: MakeBatch | None = None,
    before_start: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Train the tiny VAE; returns figures (final loss, held-out PSNR, latent stats, paths).

    `make_batch(rng, batch_size)` must return `[B, 3, clip_frames, size, size]` in [-1, 1]; `eval_batch` (default
    `make_batch`) gives the held-out PSNR and latent-statistics batches.
    `progress(step, metrics)` is called every `log_every` steps and at the last step with the mean loss terms over
    the steps since the previous call (plus lr, psnr of that mean MSE, sec_per_step of those steps); `final_loss` is
    the last such mean. The loop is `lvstudio.train.loop.TrainLoop`. `before_start()` (it may raise) runs once the
    checkpoint or `init_from` is read, before out_dir is made.
    """
    import torch

    from lvstudio.models.tiny_vae import TinyVAE, save_vae
    from lvstudio.train.loop import TrainLoop, optimizer_step, set_lr

    ckpt_path = os.path.join(cfg.out_dir, CKPT_NAME)
    with torch.random.fork_rng():  # seeded init without touching the caller's global RNG
        torch.manual_seed(cfg.seed)
        vae = TinyVAE(cfg.model).to(cfg.device)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = _start(cfg, vae, opt, ckpt_path if resume else None, before_start)

    batches = step_batches(cfg, make_batch, start)

    def one_step(step: int) -> dict[str, float]:
        # This step's data and noise, derived from (seed, step) only; forward, backward, clip, AdamW update at the
        # scheduled learning rate.
        x, noise_seed = next(batches)
        x = x.to(cfg.device)
        gen = torch.Generator().manual_seed(noise_seed)
        lr = set_lr(opt, lr_at(cfg, step))
        if cfg.freeze_encoder_at is not None and step >= cfg.freeze_encoder_at:
            vae.encoder.requires_grad_(False)  # decoder-only phase: the latents stay fixed
        terms = _losses(cfg, vae, x, gen, step)
        optimizer_step(opt, terms["loss"], vae.parameters(), cfg.grad_clip)
        return {**{k: float(v.detach()) for k, v in terms.items()}, "lr": lr}

    def reduce(window: list[dict[str, float]]) -> dict[str, float]:
        # The window's mean loss terms, the current learning rate and the PSNR of the mean MSE.
        metrics = {k: sum(w[k] for w in window) / len(window) for k in window[-1] if k != "lr"}
        return {**metrics, "lr": window[-1]["lr"], "psnr": _psnr_from_mse(metrics["mse"])}

    vae.train()
    t0 = time.perf_counter()
    loop = TrainLoop(total=cfg.steps, start=start, log_every=cfg.log_every, ckpt_every=cfg.ckpt_every,
                     report=progress, checkpoint=lambda done: _save_checkpoint(ckpt_path, cfg, vae, opt, done),
                     reduce=reduce)
    try:
        _, last = loop.run(one_step)
    finally:
        batches.close()  # stops the data workers
    steps_run, final_loss = loop.steps_run, last.get("loss", float("nan"))

    vae.train(False)
    held_out_psnr = evaluate_psnr(vae, cfg, eval_batch or make_batch)
    mean, std = latent_stats(vae, cfg, eval_batch or make_batch)
    vae.set_latent_stats(mean, std)
    model_path = os.path.join(cfg.out_dir, MODEL_NAME)
    save_vae(vae, model_path)
    return {
        "steps": cfg.steps,
        "steps_run": steps_run,
        "final_loss": final_loss,
        "psnr": held_out_psnr,
        "latents_mean": mean,
        "latents_std": std,
        "checkpoint": ckpt_path,
        "model_path": model_path,
        "seconds": time.perf_counter() - t0,
    }


def evaluate_psnr(vae: TinyVAE, cfg: VAETrainConfig, make_batch: MakeBatch) -> float:
    """PSNR (dB) of decode(encode(x)) on `cfg.eval_batches` held-out full-size batches."""
    import torch

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(cfg.eval_batches):
            x = _get_batch(cfg, make_batch, np.random.default_rng([cfg.seed, 1, i]), crop=0).to(cfg.device)
            total += float(torch.mean((vae.decode(vae.encode(x)) - x) ** 2)) * x.shape[0]
            count += x.shape[0]
    return _psnr_from_mse(total / max(count, 1))


def latent_stats(vae: TinyVAE, cfg: VAETrainConfig, make_batch: MakeBatch) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of the raw posterior mean over `cfg.stats_batches` full-size batches."""
    import torch

    z_dim = vae.config.z_dim
    s1 = torch.zeros(z_dim, dtype=torch.float64)
    s2 = torch.zeros(z_dim, dtype=torch.float64)
    n = 0
    with torch.no_grad():
        for i in range(cfg.stats_batches):
            x = _get_batch(cfg, make_batch, np.random.default_rng([cfg.seed, 2, i]), crop=0).to(cfg.device)
            mu, _ = vae.encode_raw(x)  # [B, z, f, h, w]
            flat = mu.transpose(0, 1).reshape(z_dim, -1).double().cpu()
            s1 += flat.sum(1)
            s2 += flat.pow(2).sum(1)
            n += flat.shape[1]
    if n == 0:
        return [0.0] * z_dim, [1.0] * z_dim
    mean = s1 / n
    std = (s2 / n - mean.pow(2)).clamp_min(1e-12).sqrt()
    return mean.tolist(), std.tolist()
