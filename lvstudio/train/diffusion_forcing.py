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
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from lvstudio.errors import LvError
from lvstudio.models.kv_cache import AttentionSpec
from lvstudio.models.tiny_text import TinyTextConfig, TinyTextEncoder
from lvstudio.models.wan_dit import CONFIGS, WanDiT, WanDiTConfig
from lvstudio.sampling.flow_matching import add_noise, shift_sigma, velocity_target
from lvstudio.train.common import (
    ConfigProblem,
    DistInfo,
    TrainConfigBase,
    check_inputs,
    init_distributed,
    shutdown_distributed,
    train_device,
    world_size_problem,
)
from lvstudio.train.data import Batch, LatentDataset, latent_dataset, sample_batch
from lvstudio.train.loop import (
    EMA,
    TrainingStopped,
    TrainLog,
    TrainLoop,
    forward_precision,
    lr_at,
    optimizer_step,
    read_checkpoint,
    restore_checkpoint_state,
    set_lr,
    step_generator,
    unwrap,
    weights_digest,
)
from lvstudio.train.sharding import (
    check_fsdp,
    consolidated_checkpoint,
    resume_run_checkpoint,
    save_run_checkpoint,
    shard_model,
    whole_tensors,
)

if TYPE_CHECKING:
    from lvstudio.models.weight_storage import Storage
    from lvstudio.world import Pose


EXPORTABLE = ("diffusion-forcing", "streaming")  # the recipes whose checkpoints hold this model (export_checkpoint)


class DFConfig(TrainConfigBase):
    """`lvstudio train diffusion-forcing CONFIG.toml`."""

    path_fields: ClassVar[tuple[str, ...]] = ("out_dir", "vae", "init_dit", "init_text")
    example: ClassVar[str] = "presets/tiny/train_df.toml"

    dit: dict = Field(default_factory=dict)  # overrides of the `tiny` DiT config fields
    text_dim: int = 128
    text_layers: int = 2
    vae: str = "vae.safetensors"  # relative to the config file
    size: int = 128
    clip_latents: int = 9  # latents per encoded world clip (1 + 4*(9-1) = 33 frames)
    latent_frames: int = 6  # training window
    block_frames: int = 2  # causal block size in latent frames
    dataset_clips: int = 2000
    data_workers: int = 0  # processes that render the world clips while the dataset is encoded (0 = this one)
    switch_prob: float = 0.3
    upright_objects: bool = False  # world objects start at angle 0 (`lvstudio.world.Pose`; `spinning` ones turn)
    centred_objects: bool = False  # world objects start in the middle half of their positions (`Pose`)
    object_grid: int = Field(0, ge=0)  # px: objects start at the centre of a cell of this grid (`Pose.grid`; 0: off)
    object_slots: bool = False  # world objects start at fixed places: one in the middle, two on a diagonal (`Pose`)
    moving_in_slots: bool = False  # with object_slots: moving objects start at their slots too (`Pose`)
    through_edges: bool = False  # moving objects leave across an edge and come back across the opposite (`Pose`)
    late_start_prob: float = Field(0.0, ge=0.0, le=1.0)  # share of clips that start late (`Pose.late_prob`): wraps,
    late_start_frames: int = Field(0, ge=0)  # ... 1..this many frames into the world's run (`Pose.late_frames`)
    cfg_dropout: float = 0.1
    shift: float = 1.0  # timestep shift of the training noise distribution
    first_window_prob: float = 0.4  # how often a window starts at latent 0 (the 1-frame latent)
    object_weight: float = 0.0  # extra loss weight on latent pixels covered by objects (world ground truth)
    ar_prob: float = 0.5  # share of samples in the inference regime: blocks before a random block are near-clean
    context_sigma_max: float = 0.05  # noise level range of that near-clean history (noise augmentation)
    init_dit: str | None = None  # start from these DiT weights (safetensors) instead of random
    init_text: str | None = None  # start from these text-encoder weights (safetensors)
    precision: Literal["float32", "bfloat16"] = "float32"  # "bfloat16": mixed precision (`forward_precision`)

    @field_validator("dit")
    @classmethod
    def _check_dit(cls, dit: dict) -> dict:
        # A bad [dit] table is an error when the config is read, not after the clips are made and encoded.
        WanDiTConfig.from_dict({**CONFIGS["tiny"].to_dict(), **dit})
        return dit

    @model_validator(mode="after")
    def _check_geometry(self) -> DFConfig:
        # Clips, windows and blocks that do not fit each other are errors when the config is read, not after the
        # clips are made and encoded.
        problem = self.geometry_problem()
        if problem is not None:
            raise problem
        return self

    def geometry_problem(self) -> ConfigProblem | None:
        """What does not fit: the frame size and the DiT's patches, the training windows and the encoded clips
        (`window_problem`), the objects' pose, the text encoder's heads (None: everything fits)."""
        problem = world_size_problem(self.size)
        if problem is not None:
            return problem
        patch = WanDiTConfig.from_dict({**CONFIGS["tiny"].to_dict(), **self.dit}).patch_size
        side = self.size // 8  # latents a side
        if side % patch[1] or side % patch[2]:
            step = 8 * max(patch[1], patch[2])
            return ConfigProblem("size", f"{self.size} px is {side} latents a side, not a whole number of the DiT's "
                                 f"{patch[1]}x{patch[2]}-latent patches", f"set size to a multiple of {step} px "
                                 "such as 64 or 128")
        return self.window_problem() or self.pose_problem()

    def window_problem(self) -> ConfigProblem | None:
        """What does not fit in the training windows: the encoded clips, the causal blocks (None: they fit)."""
        if self.latent_frames > self.clip_latents:
            return ConfigProblem("latent_frames", f"the training window of {self.latent_frames} latents is longer "
                                 f"than the encoded clips (clip_latents = {self.clip_latents})",
                                 "set latent_frames to at most clip_latents, or clip_latents to at least latent_frames")
        if self.latent_frames % self.block_frames:
            return ConfigProblem("latent_frames", f"{self.latent_frames} latents is not a whole number of causal "
                                 f"blocks of block_frames = {self.block_frames}",
                                 f"set latent_frames to a multiple of block_frames (e.g. {2 * self.block_frames})")
        return None

    def pose_problem(self) -> ConfigProblem | None:
        """What does not fit in how the clips' objects start, or in the text encoder (None: they fit)."""
        if self.moving_in_slots and not self.object_slots:
            return ConfigProblem("moving_in_slots", "moving_in_slots = true starts moving objects at their slots, "
                                 "and object_slots is false", "set object_slots = true, or moving_in_slots = false")
        heads = TinyTextConfig.num_heads
        if self.text_dim % heads:
            return ConfigProblem("text_dim", f"{self.text_dim} is not divisible by the text encoder's {heads} heads",
                                 f"set text_dim to a multiple of {heads} (e.g. 128)")
        return None

    def pose(self) -> Pose:
        """How the training clips' objects start (`lvstudio.world.Pose`)."""
        from lvstudio.world import Pose

        return Pose(upright=self.upright_objects, centred=self.centred_objects, grid=self.object_grid,
                    slots=self.object_slots, moving_in_slots=self.moving_in_slots, through_edges=self.through_edges,
                    late_prob=self.late_start_prob, late_frames=self.late_start_frames)


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
        from lvstudio.models.key_maps import load_dit_state_dict

        load_dit_state_dict(dit, _init_weights(cfg.init_dit, "init_dit"), source=cfg.init_dit)
    text = TinyTextEncoder(text_cfg)
    if cfg.init_text:
        text.load_state_dict(_init_weights(cfg.init_text, "init_text"))
    return TinyDF(dit, text)


def _init_weights(path: str, key: str) -> dict[str, Tensor]:
    """The float32 tensors of the config's init file `key`: verified when it carries a checksum (an export of
    lvstudio), only parsed when it does not (weights from elsewhere or an older version)."""
    from lvstudio.checked_files import WEIGHTS_HINT
    from lvstudio.models.weight_storage import read_weights

    tensors, _ = read_weights(path, hint=f"point {key} at an intact file, or {WEIGHTS_HINT}")
    return {k: v.float() for k, v in tensors.items()}


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


def df_loss(model: TinyDF, batch: Batch, cfg: DFConfig, gen: torch.Generator) -> Tensor:
    """Flow-matching loss with one noise level per causal block (Diffusion Forcing), masked per frame."""
    x0 = batch.x0
    b, _, f = x0.shape[:3]
    nb = f // cfg.block_frames
    # The noise is drawn on the CPU generator (the same numbers on every device), then moved to x0's device.
    u = shift_sigma(torch.rand(b, nb, generator=gen), cfg.shift)  # [B, nb] independent level per block
    # A share of the samples mimics autoregressive inference: history blocks before block k are (nearly) clean.
    ar = torch.rand(b, 1, generator=gen) < cfg.ar_prob
    k = torch.randint(0, nb, (b, 1), generator=gen)
    history = torch.arange(nb)[None, :] < k
    clean = torch.rand(b, nb, generator=gen) * cfg.context_sigma_max
    u = torch.where(ar & history, clean, u)
    sigma = u.repeat_interleave(cfg.block_frames, dim=1).to(x0.device)  # [B, F]
    eps = torch.randn(x0.shape, generator=gen).to(x0.device)
    x_t = add_noise(x0, eps, sigma)
    ids = unwrap(model).text.tokenize(batch.prompts)[0].to(x0.device)
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


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


LossFn = Callable[[nn.Module, Batch, "DFConfig", torch.Generator], Tensor]


def train_diffusion_forcing(cfg: DFConfig, *, progress: bool = True, dataset: LatentDataset | None = None,
                            vocabulary: list[str] | None = None) -> dict:
    """Train (or resume) a DF run in cfg.out_dir. Returns final figures. Works under torchrun (DDP)."""
    return run_training(cfg, df_loss, "diffusion-forcing", progress=progress, dataset=dataset, vocabulary=vocabulary)


def start_run(cfg: DFConfig, dataset: LatentDataset | None, vocabulary: list[str] | None,
              make_dataset: Callable[[DFConfig, Path, DistInfo], LatentDataset] | None = None,
              ) -> tuple[DistInfo, Path, LatentDataset, list[str]]:
    """What every latent-space run does first: join torchrun's group, set threads, make out_dir, get the latent
    dataset (given, else built/loaded by `make_dataset`, default `latent_dataset`) and the world vocabulary."""
    dist = init_distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    check_inputs(cfg, df_inputs(cfg, dataset is None and not (out / "latents.safetensors").exists()))
    out.mkdir(parents=True, exist_ok=True)  # once the inputs are there: a refused run leaves no empty out_dir
    data = dataset if dataset is not None else (make_dataset or latent_dataset)(cfg, out, dist)
    if vocabulary is None:
        from lvstudio.world import vocabulary as world_vocabulary

        vocabulary = world_vocabulary()
    return dist, out, data, vocabulary


def df_inputs(cfg: DFConfig, encodes: bool) -> tuple[str, ...]:
    """The input files a latent-space run reads (`check_inputs`): its init weights, and the VAE when it `encodes`
    the latent dataset (none in out_dir yet; an ERFT run given `latents` reads that file instead)."""
    latents = getattr(cfg, "latents", None)
    reads_latents = latents is not None and Path(latents).is_file()
    return ("init_dit", "init_text") + (("vae",) if encodes and not reads_latents else ())


def run_training(cfg: DFConfig, loss_fn: LossFn, recipe: str, *, progress: bool = True,
                 dataset: LatentDataset | None = None, vocabulary: list[str] | None = None) -> dict:
    """The run of every latent-space recipe that trains the whole model (DF, streaming): data, AdamW, EMA, DDP or
    FSDP (`cfg.fsdp`), checkpoints; the loss is the recipe's."""
    check_fsdp(cfg.fsdp, recipe)
    dist, out, data, vocabulary = start_run(cfg, dataset, vocabulary)
    torch.manual_seed(cfg.seed)
    device = train_device(cfg.device)
    model = build_model(cfg, vocabulary, data.latents.shape[1]).to(device)
    if cfg.fsdp:
        shard_model(model)  # parameters, gradients, AdamW states and the EMA are sharded from here on
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    ema = EMA(model, cfg.ema_decay)
    start = resume_run_checkpoint(out, model, {"": opt}, ema, cfg.fsdp, recipe)
    ddp_devices = [device.index] if device.type == "cuda" else None
    train_model = (torch.nn.parallel.DistributedDataParallel(model, device_ids=ddp_devices)
                   if dist.enabled and not cfg.fsdp else model)

    def one_step(step: int) -> dict[str, float]:
        # A deterministic batch and noise for (seed, step, rank); loss, backward, clip, AdamW; EMA (a plain copy
        # until ema_start).
        rng, gen = step_generator(cfg.seed, step, dist.rank)
        batch = sample_batch(data, cfg, rng).to(device)
        lr = set_lr(opt, lr_at(step, cfg.lr, cfg.warmup_steps, cfg.decay_start, cfg.steps, cfg.min_lr))
        with forward_precision(cfg.precision, device):
            loss = loss_fn(train_model, batch, cfg, gen)
        grad_norm = optimizer_step(opt, loss, model.parameters(), cfg.grad_clip)
        ema.update(model, decay=0.0 if step + 1 <= cfg.ema_start else None)
        return {"loss": float(loss.detach()), "grad_norm": grad_norm, "lr": lr}

    def save(step: int) -> None:
        save_run_checkpoint(out, model, {"": opt}, ema, step, {"recipe": recipe}, dist, cfg.fsdp)

    loop = TrainLoop.for_config(cfg, start=start, report=TrainLog(out, dist.is_main).report, checkpoint=save,
                                progress=progress and dist.is_main, description=recipe)
    try:
        step, last = loop.run(one_step)
    except TrainingStopped:
        # Every rank stops at the same step (the loop makes them agree): end the process group before the
        # process exits, or gloo's threads can abort it at exit ("terminate called without an active exception").
        shutdown_distributed(dist)
        raise
    shadow = whole_tensors(ema.shadow) if cfg.fsdp else ema.shadow
    if dist.is_main:
        export_weights(model, shadow, out)
    digest = weights_digest(model)
    shutdown_distributed(dist)
    return {"step": step, "loss": last.get("loss", float("nan")), "weights_sha256": digest}


def export_checkpoint(cfg: DFConfig, out_dir: Path | None = None, vocabulary: list[str] | None = None) -> Path:
    """Write dit/text safetensors from the EMA of the latest checkpoint of a (possibly unfinished) run; a sharded
    (FSDP) checkpoint is first gathered into out_dir/consolidated.safetensors."""
    out = Path(out_dir or cfg.out_dir)
    ckpt = consolidated_checkpoint(out)
    if ckpt is None:
        raise LvError(f"no checkpoint in {out}", hint="train first, or pass the config of the run to export")
    if vocabulary is None:
        from lvstudio.world import vocabulary as world_vocabulary

        vocabulary = world_vocabulary()
    # Verified, written by a recipe that trains this model, and fitting the config's model: a damaged or foreign
    # checkpoint, or one of another model size, is named before anything is written.
    tensors, meta = read_checkpoint(ckpt, EXPORTABLE)
    channels = tensors["model.dit.patch_embedding.weight"].shape[1]
    model = build_model(cfg.model_copy(update={"init_dit": None, "init_text": None}), vocabulary, channels)
    ema = EMA(model, cfg.ema_decay)
    restore_checkpoint_state(ckpt, tensors, meta, model, {}, ema)
    export_weights(model, ema.shadow, out)
    return out


def ship_weights(run_dir: Path, preset_dir: Path, storage: Storage = "float16",
                 names: tuple[str, ...] = ("dit.safetensors", "text.safetensors")) -> list[Path]:
    """Copy a run's exported weights `names` (a DF run's dit and text; a Self-Forcing run has only its generator's
    dit) into a preset folder in `storage` (`lvstudio.models.weight_storage`:
    float16 by default, half the size, same outputs to ~1e-3; int8 a quarter), keeping the config metadata. The
    exports are verified first; the copies get their own checksum (record the preset's new sha256 with
    `lvstudio presets hash PRESET_DIR --write`). A preset folder that does not exist yet is made."""
    from lvstudio.models.weight_storage import store_weights

    hint = "export it again: `lvstudio train export CONFIG.toml` (from the checkpoint)"
    Path(preset_dir).mkdir(parents=True, exist_ok=True)
    return [store_weights(Path(run_dir) / name, Path(preset_dir) / name, storage, hint)
            for name in names]


def export_weights(model: TinyDF, shadow: dict[str, Tensor], out: Path) -> None:
    """Write the EMA weights (`EMA.shadow`, whole tensors) as dit.safetensors / text.safetensors (with configs in
    metadata) into out: atomically, each with its checksum (`lvstudio.checked_files`)."""
    from lvstudio.checked_files import save_checked
    from lvstudio.models.tiny_text import config_to_json

    dit = {k[4:]: v.cpu().contiguous() for k, v in shadow.items() if k.startswith("dit.")}
    text = {k[5:]: v.cpu().contiguous() for k, v in shadow.items() if k.startswith("text.")}
    save_checked(dit, out / "dit.safetensors", {"config": json.dumps(model.dit.cfg.to_dict()), "format": "pt"})
    save_checked(text, out / "text.safetensors", {"config": config_to_json(model.text.cfg), "format": "pt"})
