"""A tiny VAE training config shared by the training tests."""

from __future__ import annotations

from pathlib import Path

from lvstudio.train.vae_config import VAEFileConfig
from tests.helpers.df_tiny import config_file


def small_vae_config_file(path: Path, out_dir: str, **kw) -> Path:
    """A VAE run of a few CPU seconds (channels 8/8/16, 5-frame clips of 16 px, one eval batch) as a TOML config for
    `lvstudio train vae`, out_dir relative to the file; `kw` overrides its fields."""
    base = dict(out_dir=out_dir, steps=2, batch_size=1, clip_frames=5, size=16, crop=0, eval_batches=1,
                stats_batches=1, threads=1, device="cpu", model={"channels": [8, 8, 16]})
    return config_file(path, VAEFileConfig(**(base | kw)))
