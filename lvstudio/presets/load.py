"""Loading a preset into models: the DiT, its text encoder and its VAE behind small adapters every backend uses.

`tiny` presets load from their folder: every file is checked against the sha256 and size its preset.toml records,
and its safetensors header read, before it is opened (`lvstudio.presets.integrity`). Hub presets (umT5 text
encoder, Wan VAE) load from the Hugging Face cache after `lvstudio presets pull` (`lvstudio.presets.hub`): every file
is checked against the preset, the lock or the Hub's content address before it is opened, `.pt`
checkpoints are read only in their converted safetensors form, a LoRA (LongLive) is merged through peft, and the
models go to the requested device in bfloat16 on a GPU (float32 on the CPU).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor

from lvstudio.errors import PresetError
from lvstudio.models.wan_dit import CONFIGS, WanDiT, WanDiTConfig
from lvstudio.presets.schema import Preset, load_preset


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

    # returns an object with decode(z_block), state_dict(), load_state_dict(), reset() and new_shot() (a cut: zero
    # history, still 4 frames per latent)
    def streaming_decoder(self): ...  # noqa: ANN201


@dataclass
class TinyTextAdapter:
    """The tiny word-level encoder; warns once per prompt about words it does not know."""

    model: torch.nn.Module
    warned: set[str] = field(default_factory=set)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor:
        feats, unknown = self.model.encode(prompts)
        for prompt, words in zip(prompts, unknown, strict=True):
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
    variants: dict[str, WanDiT] = field(default_factory=dict, repr=False)  # role -> DiT loaded by dit_for
    image_encoder: Any | None = None  # image-to-video presets: lvstudio.models.clip_vision.ClipVisionEncoder
    notes: list[str] = field(default_factory=list)  # what loading chose (e.g. GPU placement), printed by render

    def latent_hw(self, width: int, height: int) -> tuple[int, int]:
        s = self.spatial_stride
        return height // s, width // s

    def dit_for(self, role: str | None) -> WanDiT:
        """The DiT a backend runs: the preset's main one, or (role given) weights fine-tuned for that backend,
        e.g. `[streaming] dit = "dit_stream"`, loaded once and kept on the bundle. They must share the main DiT's
        text encoder and VAE."""
        if role is None:
            return self.dit
        if role not in self.variants:
            from lvstudio.presets.integrity import verify_local

            path = _require(self.preset.file_path(role), self.preset, f"{role!r} DiT")
            verify_local(self.preset, [role])
            dit = _load_role(self.preset, role, path, load_dit)
            if dit.cfg.to_dict() != self.dit.cfg.to_dict():
                raise PresetError(f"preset {self.preset.name!r}: files.{role} ({path}) has another architecture than "
                                  "files.dit", hint="a backend's DiT must be a fine-tune of the preset's DiT")
            self.variants[role] = dit.to(self.device)
        return self.variants[role]


def _require(path: Path, preset: Preset, role: str) -> Path:
    if not path.exists():
        raise PresetError(
            f"preset {preset.name!r}: {role} weights not found at {path}",
            hint="restore the file from the repository (git checkout presets/) or retrain it (see README)",
        )
    return path


# What each role of a local preset holds, as messages name it.
ROLE_NAMES = {"dit": "DiT", "text_encoder": "text encoder", "vae": "VAE", "lora": "LoRA"}
T = TypeVar("T")


def _preset_file(preset: Preset) -> str:
    return str(preset.sources[0]) if preset.sources else f"preset {preset.name!r}"


def file_holds(path: Path) -> tuple[str | None, str]:
    """What a weight file's safetensors metadata says it holds: a role of `ROLE_NAMES` (or None when it cannot tell)
    and the evidence ("its config has keys channels, dec_blocks, …")."""
    from safetensors import safe_open

    from lvstudio.models.lora import LORA_FORMAT
    from lvstudio.models.tiny_vae import FORMAT as VAE_FORMAT

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        config = json.loads(meta.get("config", "{}"))
    except Exception:  # noqa: BLE001 - an unreadable header says nothing about the model
        return None, "its header cannot be read"
    keys = sorted(config) if isinstance(config, dict) else []
    shown = ", ".join(keys[:4]) + (", …" if len(keys) > 4 else "")
    evidence = f"its config has keys {shown}" if keys else f"its metadata has format {meta.get('format')!r}"
    if meta.get("format") == VAE_FORMAT or "channels" in keys:
        return "vae", evidence
    if meta.get("format") == LORA_FORMAT:
        return "lora", evidence
    if "vocab" in keys:
        return "text_encoder", f"its config has a vocab of {len(config['vocab'])} words"
    if keys and set(keys) <= set(WanDiTConfig.__dataclass_fields__):
        return "dit", evidence
    return None, evidence


def _load_role(preset: Preset, role: str, path: Path, load: Callable[[Path], T]) -> T:
    """`load(path)`, with the errors of a file that holds another model (or another architecture) turned into a
    PresetError naming the preset file, the role and the file."""
    try:
        return load(path)
    except (ValueError, TypeError, KeyError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and "state_dict" not in str(err):
            raise  # out of memory and the like: not a question of which file
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if len(detail) > 200:
            detail = detail[:197] + "..."
        kind = "lora" if preset.lora is not None and role == preset.lora.file else role
        want = ROLE_NAMES.get(kind, kind)
        holds, evidence = file_holds(path)
        where = f"{_preset_file(preset)}: [files.{role}] {path}"
        if holds is not None and holds != kind:
            raise PresetError(f"{where} holds a {ROLE_NAMES[holds]}'s weights ({evidence}), not a {want}'s",
                              hint=f"point [files.{role}] at the {want}'s weights") from None
        fix = " (or make [dit_config] match them)" if kind == "dit" and preset.dit_config else ""
        raise PresetError(f"{where} does not hold weights this preset's {want} can load: {detail}",
                          hint=f"point [files.{role}] at the {want}'s weights{fix}") from None


def load_dit(path: Path, config: WanDiTConfig | None = None) -> WanDiT:
    """A DiT from one safetensors file (its config from the metadata unless given); the file's own checksum is
    verified when it has one (exports of the training recipes do)."""
    from lvstudio.models.key_maps import load_dit_state_dict
    from lvstudio.models.weight_storage import read_weights

    tensors, meta = read_weights(path)
    if config is None:
        config = WanDiTConfig.from_dict(json.loads(meta["config"])) if "config" in meta else CONFIGS["tiny"]
    dit = WanDiT(config)
    sd = {k: v.float() for k, v in tensors.items()}
    load_dit_state_dict(dit, sd, source=str(path))
    return dit.train(False)


def load_bundle(preset: Preset | str, device: str | torch.device | None = None) -> ModelBundle:
    """Load the models a preset names: tiny ones from their folder, Hub ones from the Hugging Face cache.

    device: "cpu", "cuda", "cuda:N", "mps" or "auto"; None = LVSTUDIO_DEVICE, else "cpu".
    """
    if isinstance(preset, str):
        preset = load_preset(preset)
    from lvstudio.models.wan_components import resolve_device

    dev = resolve_device(device if device is not None else os.environ.get("LVSTUDIO_DEVICE", "cpu"))
    if preset.crossclip.svi is not None and preset.is_hub:  # image-to-video (Stable Video Infinity)
        from lvstudio.presets.load_i2v import load_svi_bundle

        return load_svi_bundle(preset, dev)
    if preset.is_hub or preset.text_encoder != "tiny" or preset.vae != "tiny":
        return _load_hub_bundle(preset, dev)
    from lvstudio.models.tiny_text import load_text_encoder
    from lvstudio.models.tiny_vae import load_vae
    from lvstudio.models.wan_components import resolve_dtype
    from lvstudio.presets.integrity import verify_local

    # Step 1: every file present, of the recorded sha256 and size, with a readable header — before any is opened.
    paths = {role: _require(preset.file_path(role), preset, what)
             for role, what in (("dit", "DiT"), ("text_encoder", "text encoder"), ("vae", "VAE"))}
    verify_local(preset, [r for r in preset.files if r in paths or preset.file_path(r).exists()])  # LoRAs too
    dit_cfg = WanDiTConfig.from_dict(preset.dit_config) if preset.dit_config else None
    # Step 2: the preset's precision ("auto": float32 on the CPU, bfloat16 on a GPU); the text encoder stays float32.
    dit = _load_role(preset, "dit", paths["dit"], lambda p: load_dit(p, dit_cfg))
    dit = dit.to(dev, resolve_dtype(preset.dtype, dev))
    text = _load_role(preset, "text_encoder", paths["text_encoder"], load_text_encoder).to(dev)
    vae = _load_role(preset, "vae", paths["vae"], load_vae).to(dev, resolve_dtype(preset.vae_dtype, dev)).train(False)
    return ModelBundle(preset, dit, TinyTextAdapter(text), vae, dev, latent_channels=dit.cfg.out_dim)


def _load_hub_bundle(preset: Preset, dev: torch.device) -> ModelBundle:
    """umT5 + Wan VAE + a Wan2.1 DiT (optionally with a merged LoRA) from the Hub cache, verified before loading."""
    from lvstudio.models.wan_components import (
        load_dit_weights,
        load_umt5,
        load_wan_vae,
        merge_lora,
        resolve_dtype,
    )
    from lvstudio.presets import hub

    if (preset.text_encoder, preset.vae) != ("umt5", "wan"):
        raise PresetError(
            f"preset {preset.name!r} mixes {preset.text_encoder} text with a {preset.vae} VAE",
            hint='Hub presets use text_encoder = "umt5" and vae = "wan"; the tiny components live in presets/tiny',
        )
    for role in ("dit", "text_encoder", "tokenizer", "vae"):
        if role not in preset.files:
            raise PresetError(f"preset {preset.name!r} has no files.{role}",
                              hint="Hub presets list dit, text_encoder, tokenizer and vae (see presets/*.toml)")
    if not preset.dit_config:
        raise PresetError(f"preset {preset.name!r} has no [dit_config]",
                          hint="copy it from presets/self-forcing-1.3b.toml")
    # Step 1: find every file (never the network) and check its sha256 before anything is opened.
    resolved = hub.resolve(preset)
    hub.require_ok(preset, hub.verify_resolved(resolved, use_stamps=True))
    dtype = resolve_dtype(preset.dtype, dev)
    vae_dtype = resolve_dtype(preset.vae_dtype, dev)
    cfg = WanDiTConfig.from_dict(preset.dit_config)
    # Step 2: the DiT in float32 on the CPU, LoRA merged there (exact), then cast and moved.
    dit_files = resolved.files("dit") if resolved.paths["dit"].is_dir() else [resolved.paths["dit"]]
    # A diffusers folder (transformer/) lists its config.json too: the weights are its *.safetensors shards.
    dit = load_dit_weights([f for f in dit_files if f.suffix == ".safetensors"], cfg)
    if preset.lora is not None:
        from safetensors.torch import load_file

        lora = load_file(str(resolved.paths[preset.lora.file]))
        dit, _ = merge_lora(dit, lora, target_modules=preset.lora.target_modules, rank=preset.lora.rank,
                            alpha=preset.lora.alpha)
    dit = dit.to(device=dev, dtype=dtype).train(False).requires_grad_(False)
    # Step 3: the VAE, then the text encoder (offloaded to the CPU when GPU memory is short).
    vae = load_wan_vae(resolved.paths["vae"], device=dev, dtype=vae_dtype)
    if vae.z_dim != cfg.out_dim:
        raise PresetError(f"preset {preset.name!r}: VAE z_dim {vae.z_dim} != DiT out_dim {cfg.out_dim}")
    other = sum(p.numel() * p.element_size() for p in dit.parameters())
    other += sum(p.numel() * p.element_size() for p in vae.model.parameters())
    text = load_umt5(resolved.paths["text_encoder"], resolved.paths["tokenizer"], text_len=cfg.text_len, device=dev,
                     dtype=dtype, offload=preset.text_offload, other_bytes=other)
    if text.dim != cfg.text_dim:
        raise PresetError(f"preset {preset.name!r}: text encoder width {text.dim} != DiT text_dim {cfg.text_dim}")
    return ModelBundle(preset, dit, text, vae, dev, latent_channels=cfg.out_dim, spatial_stride=8)
