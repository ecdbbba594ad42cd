"""`lvstudio train vae CONFIG.toml`: a TOML front end (pydantic-checked) for the tiny VAE recipe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field, model_validator

from lvstudio.train.common import (
    ConfigError,
    ConfigProblem,
    TrainConfigBase,
    check_inputs,
    load_config,
    world_size_problem,
)


class VAEFileConfig(TrainConfigBase):
    """`lvstudio train vae CONFIG.toml`: the fields of `vae_recipe.VAETrainConfig`, the clips, the export."""

    path_fields: ClassVar[tuple[str, ...]] = ("out_dir", "export", "init_from")
    example: ClassVar[str] = "presets/tiny/train_vae.toml"

    clip_frames: int = 9
    size: int = 128
    crop: int = 64
    min_lr_ratio: float = 0.1
    l1_weight: float = 1.0
    mse_weight: float = 1.0
    edge_weight: float = 0.5
    kl_weight: float = 1e-6
    object_weight: float = 0.0
    freeze_encoder_at: int | None = None
    latent_noise: float = 0.0
    restart_prob: float = 0.0
    eval_batches: int = 4
    stats_batches: int = 16
    switch_prob: float = 0.3
    data_workers: int = 0  # processes that render training batches ahead of the model (0 = this one)
    cut_prob: float = 0.0  # share of training clips with a hard cut between two latents
    export: str | None = None  # copy the trained VAE here (e.g. presets/tiny/vae.safetensors)
    export_storage: Literal["float32", "float16", "int8"] = "float32"  # how the copy stores it (`weight_storage`)
    model: dict = Field(default_factory=dict)  # TinyVAEConfig overrides
    init_from: str | None = None  # start from this trained VAE file (z_dim may grow by a whole multiple)

    @model_validator(mode="after")
    def _check_clips(self) -> VAEFileConfig:
        # What `VAETrainConfig` would refuse with a traceback after the config was read.
        if (self.clip_frames - 1) % 4:
            raise ConfigProblem("clip_frames", f"{self.clip_frames} frames is not 1 + 4k (the VAE's first frame, "
                                "then latents of 4 frames)", "set clip_frames to 1 + 4k, e.g. 9 or 13")
        if self.crop % 8 or not 0 <= self.crop <= self.size:
            raise ConfigProblem("crop", f"{self.crop} px is not a multiple of 8 px in [0, size = {self.size}]",
                                "set crop to one, e.g. 64")
        return self


def run_vae_config(path: str | Path, progress: bool = True) -> str:
    """Train (or resume) the VAE a config file describes; returns a one-line summary with the held-out PSNR."""
    import torch

    from lvstudio.errors import LvError
    from lvstudio.models.tiny_vae import TinyVAEConfig
    from lvstudio.train.common import train_device
    from lvstudio.train.vae_recipe import VAETrainConfig, train_vae, world_batch_fn

    cfg = load_config(path, VAEFileConfig)
    from lvstudio.train.sharding import refuse_fsdp
    from lvstudio.train.vae_recipe import CKPT_NAME

    if not (Path(cfg.out_dir) / CKPT_NAME).exists():  # init_from is read by a run without a checkpoint only
        check_inputs(cfg, ("init_from",))
    if cfg.export and Path(cfg.export).is_dir():
        raise ConfigError(f"{path}: export: {cfg.export} is a folder",
                          hint="set export to the VAE file to write (e.g. presets/tiny/vae.safetensors)")

    refuse_fsdp(cfg.fsdp, "vae", "the tiny VAE trains in one process")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = train_device(cfg.device)
    try:
        model = TinyVAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.model.items()})
    except (TypeError, ValueError) as exc:
        raise LvError(f"{path}: [model]: {exc}",
                      hint="fix the model sizes (fields of lvstudio.models.tiny_vae.TinyVAEConfig)") from None
    recipe = VAETrainConfig(
        steps=cfg.steps, batch_size=cfg.batch_size, clip_frames=cfg.clip_frames, size=cfg.size, crop=cfg.crop,
        lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps, min_lr_ratio=cfg.min_lr_ratio,
        grad_clip=cfg.grad_clip, l1_weight=cfg.l1_weight, mse_weight=cfg.mse_weight, edge_weight=cfg.edge_weight,
        kl_weight=cfg.kl_weight, object_weight=cfg.object_weight, freeze_encoder_at=cfg.freeze_encoder_at,
        latent_noise=cfg.latent_noise, restart_prob=cfg.restart_prob, seed=cfg.seed, log_every=cfg.log_every,
        ckpt_every=cfg.ckpt_every, device=str(device), data_workers=cfg.data_workers,
        eval_batches=cfg.eval_batches, stats_batches=cfg.stats_batches, out_dir=cfg.out_dir, model=model,
        init_from=cfg.init_from,
    )
    log = Path(cfg.out_dir) / "train_log.jsonl"  # train_vae makes out_dir once init_from is checked

    def report(step: int, metrics: dict) -> None:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **metrics}) + "\n")
        if progress:
            print(f"step {step}: " + " ".join(f"{k} {v:.4g}" for k, v in metrics.items()), flush=True)

    def world_size() -> None:  # after the checkpoint or init_from is read (what they say about the run comes first)
        problem = world_size_problem(cfg.size)
        if problem is not None:
            raise ConfigError(f"{path}: size: {problem.message}", hint=problem.fix)

    train_batch = world_batch_fn(cfg.clip_frames, cfg.size, cfg.switch_prob, cfg.cut_prob)
    result = train_vae(recipe, train_batch, resume=True, progress=report,
                       eval_batch=world_batch_fn(cfg.clip_frames, cfg.size, cfg.switch_prob), before_start=world_size)
    (Path(cfg.out_dir) / "result.json").write_text(json.dumps(result, indent=2))
    if cfg.export:
        from lvstudio.models.weight_storage import store_weights

        store_weights(result["model_path"], cfg.export, cfg.export_storage)
    return (f"VAE trained: {result['steps']} steps, held-out PSNR {result['psnr']:.2f} dB -> "
            f"{cfg.export or result['model_path']}")
