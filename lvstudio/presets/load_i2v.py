"""Loading an image-to-video Hub preset (Stable Video Infinity: Wan2.1-I2V-14B + an SVI LoRA) into a ModelBundle.

    files.dit            the Diffusers-layout `transformer/` folder: read tensor by tensor in the compute dtype
                         (`load_dit_lowmem`: a 14B model in bf16 needs ~33 GB of host memory, even from fp32 shards)
    files.svi_lora       the published SVI LoRA, merged in place at its scale (`lvstudio.models.svi`)
    files.image_encoder  the CLIP vision tower (float32, as Wan and SVI run it)
    files.text_encoder, files.tokenizer, files.vae   umT5 and the Wan VAE, as in the other Hub presets

Where everything lives is decided once from the free GPU memory (`lvstudio.models.offload.plan_memory`): the DiT
resident or streamed block by block, each encoder on the GPU, swapped in while it runs, or on the CPU. The decision
is one sentence in `bundle.notes`, which `lvstudio render` prints before it starts.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lvstudio.errors import PresetError
from lvstudio.models.wan_dit import WanDiTConfig
from lvstudio.presets.load import ModelBundle
from lvstudio.presets.schema import Preset

I2V_ROLES = ("dit", "svi_lora", "image_encoder", "text_encoder", "tokenizer", "vae")
# Working memory of a Wan VAE decode (one latent frame = 4 pixel frames at a time, ~6 live fp/bf16 feature maps of
# 96 channels at full resolution), per pixel of a frame. An estimate, not measured.
VAE_WORK_BYTES_PER_PIXEL = 6 * 96 * 4 * 2


def _check(preset: Preset) -> WanDiTConfig:
    missing = [r for r in I2V_ROLES if r not in preset.files]
    if missing:
        raise PresetError(f"preset {preset.name!r} (SVI) has no files.{missing[0]}",
                          hint=f"an SVI preset lists {', '.join(I2V_ROLES)} (see presets/svi-shot-14b.toml)")
    if (preset.text_encoder, preset.vae) != ("umt5", "wan"):
        raise PresetError(f"preset {preset.name!r} (SVI) uses {preset.text_encoder} text and a {preset.vae} VAE",
                          hint='SVI presets use text_encoder = "umt5" and vae = "wan"')
    cfg = WanDiTConfig.from_dict(preset.dit_config) if preset.dit_config else None
    if cfg is None or cfg.model_type != "i2v":
        raise PresetError(f"preset {preset.name!r} (SVI) needs an image-to-video [dit_config]",
                          hint='set model_type = "i2v", in_dim = 36 (copy it from presets/svi-shot-14b.toml)')
    return cfg


def _safetensors(paths: list[Path]) -> list[Path]:
    return [p for p in paths if p.suffix == ".safetensors"]


def load_svi_bundle(preset: Preset, dev: torch.device) -> ModelBundle:
    """DiT (+ merged SVI LoRA), CLIP, umT5 and VAE of an SVI preset from the Hub cache, verified, placed by free
    GPU memory."""
    from lvstudio.models.clip_vision import load_clip_vision
    from lvstudio.models.offload import (
        SwapOnCall,
        activation_bytes,
        dit_footprint,
        gpu_free_bytes,
        load_dit_lowmem,
        place_dit,
        plan_memory,
    )
    from lvstudio.models.svi import load_svi_lora, merge_lora_weights
    from lvstudio.models.wan_components import load_umt5, load_wan_vae, loaded_bytes, resolve_dtype
    from lvstudio.models.wan_i2v import latent_frames
    from lvstudio.presets import hub

    cfg = _check(preset)
    # Step 1: find every file (never the network) and check it before anything is opened.
    resolved = hub.resolve(preset)
    hub.require_ok(preset, hub.verify_resolved(resolved, use_stamps=True))
    paths = resolved.paths
    dtype, vae_dtype = resolve_dtype(preset.dtype, dev), resolve_dtype(preset.vae_dtype, dev)
    # Step 2: where things go, from the free GPU memory and the sizes of what is about to load.
    st = preset.crossclip
    rows = 1 if (preset.sampler.cfg_scale if st.cfg_scale is None else st.cfg_scale) == 1.0 else 2
    shape = (latent_frames(st.pixel_frames), preset.height // 8, preset.width // 8)
    encoders = {
        "umt5": loaded_bytes(paths["text_encoder"], dtype),
        "clip": loaded_bytes(paths["image_encoder"], torch.float32),
        "vae": loaded_bytes(paths["vae"], vae_dtype) + VAE_WORK_BYTES_PER_PIXEL * preset.width * preset.height,
    }
    plan = plan_memory(gpu_free_bytes(dev), dit_footprint(cfg, dtype), activation_bytes(cfg, shape, rows, dtype),
                       encoders, device=str(dev))
    notes = [f"{preset.name}: {plan.message}"]
    # Step 3: the DiT in its compute dtype on the CPU, the SVI LoRA merged in place, then placed.
    dit = load_dit_lowmem(_safetensors(resolved.files("dit")), cfg, dtype)
    lora, scale = load_svi_lora(paths["svi_lora"])
    merged = merge_lora_weights(dit, lora, scale, compute_device=dev if dev.type == "cuda" else None)
    notes.append(f"{preset.name}: SVI LoRA {paths['svi_lora'].name} merged into {len(merged)} linears at scale "
                 f"{scale:g}; weights in {str(dtype).removeprefix('torch.')}")
    place_dit(dit, plan, dev)
    # Step 4: the encoders where the plan puts them (swap: on the CPU, on the GPU only while they run).
    where = {k: (dev if p == "gpu" else torch.device("cpu")) for k, p in plan.encoders.items()}
    vae = load_wan_vae(paths["vae"], device=dev if plan.encoders["vae"] != "cpu" else where["vae"], dtype=vae_dtype)
    if vae.z_dim != cfg.out_dim:
        raise PresetError(f"preset {preset.name!r}: VAE z_dim {vae.z_dim} != DiT out_dim {cfg.out_dim}")
    if plan.encoders["vae"] == "swap":
        vae = SwapOnCall(vae, vae.model, dev, ("encode", "decode"))
    clip_dev = dev if plan.encoders["clip"] != "cpu" else where["clip"]
    clip = load_clip_vision(paths["image_encoder"], None, device=clip_dev, dtype=torch.float32)
    if plan.encoders["clip"] == "swap":
        clip = SwapOnCall(clip, clip.model, dev, ("encode",))
    offload = {"gpu": "never", "swap": "swap", "cpu": "cpu"}[plan.encoders["umt5"]]
    text = load_umt5(paths["text_encoder"], paths["tokenizer"], text_len=cfg.text_len, device=dev, dtype=dtype,
                     offload=offload if preset.text_offload == "auto" else preset.text_offload)
    if text.dim != cfg.text_dim:
        raise PresetError(f"preset {preset.name!r}: text encoder width {text.dim} != DiT text_dim {cfg.text_dim}")
    return ModelBundle(preset, dit, text, vae, dev, latent_channels=cfg.out_dim, spatial_stride=8,
                       image_encoder=clip, notes=notes)
