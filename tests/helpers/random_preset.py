"""Write a preset folder holding tiny *random* weights (tiny-preset architectures) for end-to-end CLI tests."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lvstudio.models.tiny_text import TinyTextConfig, TinyTextEncoder, save_text_encoder
from lvstudio.models.tiny_vae import TinyVAE, TinyVAEConfig, save_vae
from lvstudio.models.wan_dit import WanDiT, WanDiTConfig


def write_random_preset(folder: Path, *, block_frames: int = 2, window: int = 6, sink: int = 2, size: int = 64,
                        steps: tuple[float, ...] = (1000.0, 500.0), lora: bool = False) -> Path:
    """`lora`: also an ERFT LoRA (rank 4, random up-projections) that the cross-clip backend merges."""
    from lvstudio.world import vocabulary

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    cfg = WanDiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=4, out_dim=4, freq_dim=32, text_dim=16,
                       text_len=12)
    dit = WanDiT(cfg)
    with torch.no_grad():
        dit.head.head.weight.normal_(0, 0.05)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(folder / "dit.safetensors"),
              metadata={"config": json.dumps(cfg.to_dict())})
    text = TinyTextEncoder(TinyTextConfig.for_words(vocabulary(), dim=16, num_layers=1, num_heads=2, text_len=12))
    save_text_encoder(text, folder / "text.safetensors")
    save_vae(TinyVAE(TinyVAEConfig(z_dim=4, channels=(8, 8, 8))), folder / "vae.safetensors")
    if lora:
        write_random_lora(dit, folder / "erft_lora.safetensors")
    step_list = ", ".join(str(s) for s in steps)
    (folder / "preset.toml").write_text(f"""
name = "random-test"
description = "tiny random weights for tests"
backend = "causal-kv"
fps = 16
width = {size}
height = {size}

[files.dit]
path = "dit.safetensors"
[files.text_encoder]
path = "text.safetensors"
[files.vae]
path = "vae.safetensors"

[sampler]
kind = "few-step"
step_list = [{step_list}]
shift = 3.0

[attention]
block_frames = {block_frames}
window_frames = {window}
sink_frames = {sink}
""" + (LORA_TABLES if lora else ""))
    return folder / "preset.toml"


LORA_TABLES = """
[crossclip]
clip_frames = 6
carry_frames = 2
steps = 2
lora = "erft_lora"

[files.erft_lora]
path = "erft_lora.safetensors"
"""


def write_random_lora(dit: WanDiT, path: Path) -> Path:
    """An ERFT LoRA file (rank 4, alpha 4) for `dit` whose up-projections are random, so merging it changes outputs."""
    from lvstudio.models.lora import add_lora, lora_state_dict, save_lora

    adapted = add_lora(copy.deepcopy(dit), rank=4, alpha=4.0)
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if ".lora_B." in name:  # B starts at zero (no change): random, so the LoRA changes the output
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return save_lora(path, lora_state_dict(adapted), 4, 4.0)
