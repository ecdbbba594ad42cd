"""A loaded preset: the DiT, its text encoder and its VAE behind small adapters every backend uses."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from lvstudio.errors import PresetError
from lvstudio.models.wan_dit import CONFIGS, WanDiT, WanDiTConfig
from lvstudio.presets import Preset, load_preset


class TextEncoder(Protocol):
    def encode(self, prompts: list[str]) -> Tensor:  # -> [B, text_len, text_dim]
        ...

    def unknown_words(self, prompt: str) -> list[str]:
        ...


class VideoVAE(Protocol):
    def encode(self, video: Tensor) -> Tensor:  # [B,3,F,H,W] in [-1,1] -> normalised latents
        ...

    def decode(self, z: Tensor) -> Tensor:
        ...

    def streaming_decoder(self): ...  # noqa: ANN201 - returns an object with decode(z_block), state_dict(), reset()


@dataclass
class TinyTextAdapter:
    """The tiny word-level encoder; warns once per prompt about words it does not know."""

    model: torch.nn.Module
    warned: set[str] = field(default_factory=set)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor:
        feats, unknown = self.model.encode(prompts)
        for prompt, words in zip(prompts, unknown):
            if words and prompt not in self.warned:
                self.warned.add(prompt)
                warnings.warn(
                    f"the tiny preset does not know the words {', '.join(repr(w) for w in words)} "
                    f"(in {prompt!r}); they are ignored. Its vocabulary is listed by `lvstudio presets info tiny`.",
                    stacklevel=2,
                )
        return feats

    def unknown_words(self, prompt: str) -> list[str]:
        return self.model.tokenize([prompt])[1][0]


@dataclass
class ModelBundle:
    preset: Preset
    dit: WanDiT
    text: TextEncoder
    vae: VideoVAE
    device: torch.device
    latent_channels: int
    spatial_stride: int = 8

    def latent_hw(self, width: int, height: int) -> tuple[int, int]:
        s = self.spatial_stride
        return height // s, width // s


def _metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _require(path: Path, preset: Preset, role: str) -> Path:
    if not path.exists():
        raise PresetError(
            f"preset {preset.name!r}: {role} weights not found at {path}",
            hint="restore the file from the repository (git checkout presets/) or retrain it (see README)",
        )
    return path


def load_dit(path: Path, config: WanDiTConfig | None = None) -> WanDiT:
    from safetensors.torch import load_file

    from lvstudio.models.key_maps import load_dit_state_dict

    if config is None:
        meta = _metadata(path)
        config = WanDiTConfig.from_dict(json.loads(meta["config"])) if "config" in meta else CONFIGS["tiny"]
    dit = WanDiT(config)
    sd = {k: v.float() for k, v in load_file(str(path)).items()}
    load_dit_state_dict(dit, sd, source=str(path))
    return dit.eval()


def load_bundle(preset: Preset | str, device: str | torch.device = "cpu") -> ModelBundle:
    """Load the models a preset names (the tiny ones from presets/tiny/)."""
    if isinstance(preset, str):
        preset = load_preset(preset)
    dev = torch.device(device)
    if preset.text_encoder != "tiny" or preset.vae != "tiny":
        raise PresetError(
            f"preset {preset.name!r} uses {preset.text_encoder}/{preset.vae} components, which need the Hub adapters",
            hint="Hub presets are not available in this build yet; use preset = \"tiny\"",
        )
    from lvstudio.models.tiny_text import load_text_encoder
    from lvstudio.models.tiny_vae import load_vae

    dit_cfg = WanDiTConfig.from_dict(preset.dit_config) if preset.dit_config else None
    dit = load_dit(_require(preset.file_path("dit"), preset, "DiT"), dit_cfg).to(dev)
    text = load_text_encoder(_require(preset.file_path("text_encoder"), preset, "text encoder")).to(dev)
    vae = load_vae(_require(preset.file_path("vae"), preset, "VAE"), device=dev).eval()
    return ModelBundle(preset, dit, TinyTextAdapter(text), vae, dev, latent_channels=dit.cfg.out_dim)
