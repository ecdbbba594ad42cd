"""Diffusion Forcing training of the tiny preset: flow matching with an independent noise level per block of latent
frames, block-causal attention, classifier-free-guidance dropout, EMA, AdamW, resumable safetensors checkpoints,
one process or torchrun (DDP).

Data: clips of the procedural world, encoded once by the tiny VAE into a latent dataset in out_dir. A training
sample is a window of `latent_frames` latents; its caption is the caption at the window's end. Clips whose caption
changes inside the window (a scene/object/motion switch) keep the pre-switch frames as context but take no loss on
them: the model learns "given this history, under the new prompt, continue with the new content" — exactly the
situation after a prompt switch with KV re-cache at inference.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from pydantic import Field
from torch import Tensor, nn

from lvstudio.models.kv_cache import AttentionSpec
from lvstudio.models.tiny_text import TinyTextConfig, TinyTextEncoder
from lvstudio.models.wan_dit import CONFIGS, WanDiT, WanDiTConfig
from lvstudio.sampling.flow_matching import add_noise, shift_sigma, velocity_target
from lvstudio.train.common import (
    EMA,
    DistInfo,
    TrainConfigBase,
    TrainLog,
    init_distributed,
    latest_checkpoint,
    load_checkpoint,
    lr_at,
    progress_bar,
    save_checkpoint,
    shutdown_distributed,
)


class DFConfig(TrainConfigBase):
    """`lvstudio train diffusion-forcing CONFIG.toml`."""

    path_fields: ClassVar[tuple[str, ...]] = ("out_dir", "vae", "init_dit", "init_text")

    dit: dict = Field(default_factory=dict)  # overrides of the `tiny` DiT config fields
    text_dim: int = 128
    text_layers: int = 2
    vae: str = "vae.safetensors"  # relative to the config file
    size: int = 128
    clip_latents: int = 9  # latents per encoded world clip (1 + 4*(9-1) = 33 frames)
    latent_frames: int = 6  # training window
    block_frames: int = 2  # causal block size in latent frames
    dataset_clips: int = 2000
    switch_prob: float = 0.3
    cfg_dropout: float = 0.1
    shift: float = 1.0  # timestep shift of the training noise distribution
    first_window_prob: float = 0.4  # how often a window starts at latent 0 (the 1-frame latent)
    object_weight: float = 0.0  # extra loss weight on latent pixels covered by objects (world ground truth)
    ar_prob: float = 0.5  # share of samples in the inference regime: blocks before a random block are near-clean
    context_sigma_max: float = 0.05  # noise level range of that near-clean history (noise augmentation)
    init_dit: str | None = None  # start from these DiT weights (safetensors) instead of random
    init_text: str | None = None  # start from these text-encoder weights (safetensors)


class TinyDF(nn.Module):
    """The trainable pair: the DiT and the text encoder it is conditioned on (trained jointly)."""

    def __init__(self, dit: WanDiT, text: TinyTextEncoder) -> None:
        super().__init__()
        self.dit = dit
        self.text = text

    def forward(self, x_t: Tensor, t: Tensor, ids: Tensor, spec: AttentionSpec) -> Tensor:
        context = self.text(ids)  # [B, text_len, text_dim]
        return self.dit(x_t, t, self.dit.new_conditioning(context), attention=spec)


def build_model(cfg: DFConfig, vocabulary: list[str], latent_channels: int) -> TinyDF:
    text_cfg = TinyTextConfig.for_words(vocabulary, dim=cfg.text_dim, num_layers=cfg.text_layers)
    base = CONFIGS["tiny"].to_dict()
    base.update({"in_dim": latent_channels, "out_dim": latent_channels, "text_dim": cfg.text_dim,
                 "text_len": text_cfg.text_len})
    base.update(cfg.dit)
    dit = WanDiT(WanDiTConfig.from_dict(base))
    if cfg.init_dit:
        from safetensors.torch import load_file

        from lvstudio.models.key_maps import load_dit_state_dict

        load_dit_state_dict(dit, {k: v.float() for k, v in load_file(cfg.init_dit).items()}, source=cfg.init_dit)
    text = TinyTextEncoder(text_cfg)
    if cfg.init_text:
        from safetensors.torch import load_file

        text.load_state_dict({k: v.float() for k, v in load_file(cfg.init_text).items()})
    return TinyDF(dit, text)


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class LatentDataset:
    latents: Tensor  # [N, C, L, h, w] normalised VAE latents
    captions: list[list[str]]  # per clip, per latent frame ("" where the frames of a latent disagree)
    objects: Tensor | None = None  # [N, L, h, w] 1 where an object covers the latent pixel (world ground truth)
    seeds: list[int] | None = None  # world seed of each clip

    def save(self, path: Path) -> None:
        from lvstudio.atomic import save_safetensors_atomic

        tensors = {"latents": self.latents}
        if self.objects is not None:
            tensors["objects"] = self.objects
        meta = {"captions": json.dumps(self.captions), "seeds": json.dumps(self.seeds)}
        save_safetensors_atomic(tensors, path, meta)

    @classmethod
    def load(cls, path: Path) -> LatentDataset:
        from safetensors import safe_open
        from safetensors.torch import load_file

        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        t = load_file(str(path))
        return cls(t["latents"], json.loads(meta["captions"]), t.get("objects"), json.loads(meta.get("seeds", "null")))


def object_masks(truth: list, num_latents: int, size: int) -> Tensor:
    """[L, h, w] coverage of a clip's objects on the latent grid (union over each latent's pixel frames, dilated 1 px)."""
    import cv2

    h = size // 8
    out = np.zeros((num_latents, h, h), np.uint8)
    for k in range(num_latents):
        frames = [0] if k == 0 else range(4 * k - 3, 4 * k + 1)
        for f in frames:
            for ob in truth[f].objects:
                r = int(round(ob.size / 16 + 1))
                cv2.circle(out[k], (int(round(ob.x / 8 - 0.5)), int(round(ob.y / 8 - 0.5))), r, 1, -1)
    return torch.from_numpy(out)


def latent_captions(frame_captions: list[str], num_latents: int) -> list[str]:
    """Caption per latent frame: latent 0 <- pixel frame 0; latent k <- pixel frames 4k-3..4k ("" if they differ)."""
    out = [frame_captions[0]]
    for k in range(1, num_latents):
        group = set(frame_captions[4 * k - 3 : 4 * k + 1])
        out.append(group.pop() if len(group) == 1 else "")
    return out


@torch.no_grad()
def encode_world_dataset(vae: torch.nn.Module, num_clips: int, clip_latents: int, size: int, switch_prob: float,
                         seed: int, batch: int = 16) -> LatentDataset:
    """Render `num_clips` world clips and encode them with the VAE."""
    from lvstudio.world import sample_clip

    num_frames = 1 + 4 * (clip_latents - 1)
    latents, captions, objects, seeds = [], [], [], []
    for start in range(0, num_clips, batch):
        clip_seeds = [seed * 1_000_003 + i for i in range(start, min(num_clips, start + batch))]
        clips = [sample_clip(s, num_frames, size=size, switch_prob=switch_prob) for s in clip_seeds]
        video = torch.from_numpy(np.stack([c.frames for c in clips])).permute(0, 4, 1, 2, 3).float() / 127.5 - 1
        latents.append(vae.encode(video))  # [b, C, L, h, w]
        captions += [latent_captions(c.captions, clip_latents) for c in clips]
        objects += [object_masks(c.truth, clip_latents, size) for c in clips]
        seeds += clip_seeds
    return LatentDataset(torch.cat(latents), captions, torch.stack(objects), seeds)


def add_object_masks(data: LatentDataset, cfg: DFConfig) -> LatentDataset:
    """Re-render the (deterministic) world clips of a dataset built without masks, to add them."""
    from lvstudio.world import sample_clip

    n, length = data.latents.shape[0], data.latents.shape[2]
    num_frames = 1 + 4 * (length - 1)
    masks = [object_masks(sample_clip(cfg.seed * 1_000_003 + i, num_frames, size=cfg.size,
                                      switch_prob=cfg.switch_prob).truth, length, cfg.size) for i in range(n)]
    seeds = [cfg.seed * 1_000_003 + i for i in range(n)]
    return LatentDataset(data.latents, data.captions, torch.stack(masks), seeds)


@dataclass
class Batch:
    x0: Tensor  # [B, C, F, h, w]
    prompts: list[str]
    loss_mask: Tensor  # [B, F] 1 where the frame is trained
    objects: Tensor | None = None  # [B, F, h, w] object coverage


def sample_batch(data: LatentDataset, cfg: DFConfig, rng: np.random.Generator) -> Batch:
    """A batch of training windows (deterministic given rng)."""
    n, _, length = data.latents.shape[:3]
    if cfg.latent_frames > length:
        raise ValueError(f"latent_frames={cfg.latent_frames} is longer than the encoded clips ({length} latents)")
    offsets = list(range(0, length - cfg.latent_frames + 1, cfg.block_frames))
    xs, prompts, masks, objs = [], [], [], []
    for _ in range(cfg.batch_size):
        i = int(rng.integers(n))
        o = 0 if rng.random() < cfg.first_window_prob else int(rng.choice(offsets))
        caps = data.captions[i][o : o + cfg.latent_frames]
        prompt = caps[-1] or next((c for c in reversed(caps) if c), "")
        masks.append(torch.tensor([1.0 if c == prompt else 0.0 for c in caps]))
        prompts.append("" if rng.random() < cfg.cfg_dropout else prompt)
        xs.append(data.latents[i, :, o : o + cfg.latent_frames])
        if data.objects is not None:
            objs.append(data.objects[i, o : o + cfg.latent_frames])
    objects = torch.stack(objs).float() if objs else None
    return Batch(torch.stack(xs).float(), prompts, torch.stack(masks), objects)


def df_loss(model: TinyDF, batch: Batch, cfg: DFConfig, gen: torch.Generator) -> Tensor:
    """Flow-matching loss with one noise level per causal block (Diffusion Forcing), masked per frame."""
    x0 = batch.x0
    b, _, f = x0.shape[:3]
    nb = f // cfg.block_frames
    u = shift_sigma(torch.rand(b, nb, generator=gen), cfg.shift)  # [B, nb] independent level per block
    # A share of the samples mimics autoregressive inference: history blocks before block k are (nearly) clean.
    ar = torch.rand(b, 1, generator=gen) < cfg.ar_prob
    k = torch.randint(0, nb, (b, 1), generator=gen)
    history = torch.arange(nb)[None, :] < k
    clean = torch.rand(b, nb, generator=gen) * cfg.context_sigma_max
    u = torch.where(ar & history, clean, u)
    sigma = u.repeat_interleave(cfg.block_frames, dim=1)  # [B, F]
    eps = torch.randn(x0.shape, generator=gen)
    x_t = add_noise(x0, eps, sigma)
    ids, _ = _unwrap(model).text.tokenize(batch.prompts)
    v = model(x_t, sigma * 1000, ids, AttentionSpec(block_frames=cfg.block_frames))
    return flow_error(v, velocity_target(x0, eps), batch.loss_mask, batch.objects, cfg.object_weight)


def flow_error(v: Tensor, target: Tensor, frame_mask: Tensor, objects: Tensor | None, object_weight: float) -> Tensor:
    """Mean squared velocity error over trained frames; v/target [B, C, F, h, w], frame_mask [B, F].

    Objects are a few % of the pixels but carry the prompt's colour and shape: pixels they cover (objects
    [B, F, h, w]) weigh `1 + object_weight` (renormalised per frame).
    """
    err = (v - target).pow(2).mean(dim=1)  # [B, F, h, w]
    if objects is not None and object_weight > 0:
        weight = 1.0 + object_weight * objects
        err = err * weight / weight.mean(dim=(2, 3), keepdim=True)
    per_frame = err.mean(dim=(2, 3))  # [B, F]
    return (per_frame * frame_mask).sum() / frame_mask.sum().clamp_min(1.0)


def _unwrap(model: nn.Module) -> TinyDF:
    return model.module if hasattr(model, "module") else model  # type: ignore[return-value]


def step_generator(seed: int, step: int, rank: int) -> tuple[np.random.Generator, torch.Generator]:
    """Data and noise RNGs for one step: deterministic, so a resumed run continues exactly."""
    rng = np.random.default_rng([seed, step, rank])
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    return rng, gen


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


LossFn = Callable[[nn.Module, "Batch", DFConfig, torch.Generator], Tensor]


def train_diffusion_forcing(cfg: DFConfig, *, progress: bool = True, dataset: LatentDataset | None = None,
                            vocabulary: list[str] | None = None) -> dict:
    """Train (or resume) a DF run in cfg.out_dir. Returns final figures. Works under torchrun (DDP)."""
    return run_training(cfg, df_loss, "diffusion-forcing", progress=progress, dataset=dataset, vocabulary=vocabulary)


def start_run(cfg: DFConfig, dataset: LatentDataset | None, vocabulary: list[str] | None,
              make_dataset: Callable[[DFConfig, Path, DistInfo], LatentDataset] | None = None,
              ) -> tuple[DistInfo, Path, LatentDataset, list[str]]:
    """What every latent-space run does first: join torchrun's group, set threads, make out_dir, get the latent
    dataset (given, else built/loaded by `make_dataset`, default `_dataset`) and the world vocabulary."""
    dist = init_distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = dataset if dataset is not None else (make_dataset or _dataset)(cfg, out, dist)
    if vocabulary is None:
        from lvstudio.world import vocabulary as world_vocabulary

        vocabulary = world_vocabulary()
    return dist, out, data, vocabulary


def run_training(cfg: DFConfig, loss_fn: LossFn, recipe: str, *, progress: bool = True,
                 dataset: LatentDataset | None = None, vocabulary: list[str] | None = None) -> dict:
    """The training loop every latent-space recipe shares (DF, streaming): data, AdamW, EMA, DDP, checkpoints."""
    dist, out, data, vocabulary = start_run(cfg, dataset, vocabulary)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, vocabulary, data.latents.shape[1])
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    ema = EMA(model, cfg.ema_decay)
    step = 0
    ckpt = latest_checkpoint(out)
    if ckpt is not None:
        step, _ = load_checkpoint(ckpt, model, opt, ema)
    train_model: nn.Module = model
    if dist.enabled:
        train_model = torch.nn.parallel.DistributedDataParallel(model)
    log = TrainLog(out, dist.is_main)
    last_loss = math.nan
    t_last = time.perf_counter()
    with progress_bar(cfg.steps, step, progress and dist.is_main, recipe) as update:
        while step < cfg.steps:
            # Step 1: a deterministic batch and noise for (seed, step, rank).
            rng, gen = step_generator(cfg.seed, step, dist.rank)
            batch = sample_batch(data, cfg, rng)
            # Step 2: loss, backward, clip, AdamW with warm-up.
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg.lr, cfg.warmup_steps, cfg.decay_start, cfg.steps, cfg.min_lr)
            loss = loss_fn(train_model, batch, cfg, gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            # Step 3: EMA (plain copy until ema_start), logging, checkpoints.
            ema.update(model, decay=0.0 if step <= cfg.ema_start else None)
            last_loss = float(loss.detach())
            update(step, last_loss)
            if step % cfg.log_every == 0 or step == cfg.steps:
                now = time.perf_counter()
                log.write(step=step, loss=last_loss, grad_norm=float(gnorm), lr=opt.param_groups[0]["lr"],
                          sec_per_step=(now - t_last) / cfg.log_every, time=time.time())
                t_last = now
            if dist.is_main and (step % cfg.ckpt_every == 0 or step == cfg.steps):
                save_checkpoint(out / "checkpoint.safetensors", model, opt, ema, step, {"recipe": recipe})
    if dist.is_main:
        export_weights(model, ema, out)
    shutdown_distributed(dist)
    return {"step": step, "loss": last_loss, "weights_sha256": weights_digest(model)}


def weights_digest(model: nn.Module) -> str:
    """sha256 of all parameters (used to check that DDP ranks end with identical weights)."""
    import hashlib

    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _dataset(cfg: DFConfig, out: Path, dist: DistInfo) -> LatentDataset:
    path = out / "latents.safetensors"
    if dist.is_main and not path.exists():
        from lvstudio.models.tiny_vae import load_vae

        vae = load_vae(cfg.vae).train(False)
        data = encode_world_dataset(vae, cfg.dataset_clips, cfg.clip_latents, cfg.size, cfg.switch_prob, cfg.seed,
                                    batch=4)
        data.save(path)
    elif dist.is_main and cfg.object_weight > 0 and LatentDataset.load(path).objects is None:
        add_object_masks(LatentDataset.load(path), cfg).save(path)  # datasets built before masks existed
    if dist.enabled:
        import torch.distributed as tdist

        tdist.barrier()
    return LatentDataset.load(path)


def export_checkpoint(cfg: DFConfig, out_dir: Path | None = None, vocabulary: list[str] | None = None) -> Path:
    """Write dit/text safetensors from the EMA of the latest checkpoint of a (possibly unfinished) run."""
    out = Path(out_dir or cfg.out_dir)
    ckpt = latest_checkpoint(out)
    if ckpt is None:
        raise FileNotFoundError(f"no checkpoint in {out}")
    if vocabulary is None:
        from lvstudio.world import vocabulary as world_vocabulary

        vocabulary = world_vocabulary()
    from safetensors import safe_open

    with safe_open(str(ckpt), "pt") as f:
        channels = f.get_tensor("model.dit.patch_embedding.weight").shape[1]
    model = build_model(cfg.model_copy(update={"init_dit": None, "init_text": None}), vocabulary, channels)
    ema = EMA(model, cfg.ema_decay)
    step, _ = load_checkpoint(ckpt, model, None, ema)
    export_weights(model, ema, out)
    return out


def ship_weights(run_dir: Path, preset_dir: Path, half: bool = True) -> list[Path]:
    """Copy a run's exported dit/text weights into a preset folder (fp16 by default: half the size, same outputs
    to ~1e-3), keeping the config metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lvstudio.atomic import save_safetensors_atomic

    written = []
    for name in ("dit.safetensors", "text.safetensors"):
        src = Path(run_dir) / name
        with safe_open(str(src), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(src))
        if half:
            tensors = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
        written.append(save_safetensors_atomic(tensors, Path(preset_dir) / name, meta))
    return written


def export_weights(model: TinyDF, ema: EMA, out: Path) -> None:
    """Write the EMA weights as dit.safetensors / text.safetensors (with configs in metadata) into out."""
    from safetensors.torch import save_file

    from lvstudio.models.tiny_text import config_to_json

    shadow = ema.shadow
    dit = {k[4:]: v.contiguous() for k, v in shadow.items() if k.startswith("dit.")}
    text = {k[5:]: v.contiguous() for k, v in shadow.items() if k.startswith("text.")}
    save_file(dit, str(out / "dit.safetensors"), metadata={"config": json.dumps(model.dit.cfg.to_dict()), "format": "pt"})
    save_file(text, str(out / "text.safetensors"), metadata={"config": config_to_json(model.text.cfg), "format": "pt"})
