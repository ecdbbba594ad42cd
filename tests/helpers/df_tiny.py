"""Tiny Diffusion Forcing setups shared by the training tests (and the torchrun script)."""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel

from lvstudio.train.data import LatentDataset
from lvstudio.train.diffusion_forcing import DFConfig

VOCAB = ["a", "red", "blue", "ball", "cube", "over", "the", "sea", "grass", "on"]


def tiny_cfg(out_dir: str, **kw) -> DFConfig:
    base = dict(
        out_dir=out_dir, steps=4, batch_size=4, lr=1e-3, warmup_steps=1, ema_start=1, log_every=1, ckpt_every=2,
        latent_frames=4, block_frames=2, text_dim=32, text_layers=1, cfg_dropout=0.25, threads=1,
        dit={"dim": 32, "num_heads": 2, "ffn_dim": 64, "num_layers": 2, "freq_dim": 32},
    )
    base.update(kw)
    return DFConfig(**base)


def tiny_dataset(seed: int = 0) -> LatentDataset:
    g = torch.Generator().manual_seed(seed)
    prompts = ["a red ball over the sea", "a blue cube on the grass"]
    captions = []
    latents = torch.randn(6, 4, 6, 4, 4, generator=g)
    for i in range(6):
        p = prompts[i % 2]
        caps = [p] * 6
        if i == 5:  # a switch clip
            caps = [prompts[0]] * 2 + [""] + [prompts[1]] * 3
        captions.append(caps)
        latents[i] += 2.0 if p == prompts[0] else -2.0
    return LatentDataset(latents, captions)


def config_file(path: Path, cfg: BaseModel) -> Path:
    """A training config (the fields it was given) as a TOML file for `lvstudio train ...`; relative paths in it are
    relative to the file."""
    from tests.helpers.hub_cache import to_toml

    path.write_text(to_toml(cfg.model_dump(exclude_unset=True)), encoding="utf-8")
    return path


def tiny_config_file(path: Path, out_dir: str, **kw) -> Path:
    """`tiny_cfg` as a TOML config for `lvstudio train diffusion-forcing` (out_dir relative to the file); the
    latent dataset is expected in out_dir/latents.safetensors (`tiny_dataset().save(...)`)."""
    return config_file(path, tiny_cfg(out_dir, **kw))
