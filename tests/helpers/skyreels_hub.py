"""A Hub cache holding a tiny random `Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers` (diffusers layout: transformer/ =
SkyReelsV2Transformer3DModel with the fps sample info, text_encoder/, tokenizer/, vae/), and the test preset made
from presets/skyreels-v2-df-1.3b-540p.toml at tiny size (same repo, files and settings; short segments, few steps)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from tests.helpers.hub_cache import (
    TEXT_DIM,
    TINY_DIT,
    WORDS,
    add_folder,
    commit_for,
    write_test_preset,
    write_text_encoder,
    write_tokenizer,
    write_vae,
)

REPO = "Skywork/SkyReels-V2-DF-1.3B-540P-Diffusers"
SHIPPED = "skyreels-v2-df-1.3b-540p"
NAME = f"hubtest-{SHIPPED}"
SKYREELS = {"num_steps": 4, "base_num_frames": 37, "overlap_history": 17, "ar_step": 5, "causal_block_size": 5,
            "addnoise_condition": 20.0, "guidance_scale": 6.0}


def write_transformer(folder: Path) -> None:
    from diffusers import SkyReelsV2Transformer3DModel

    torch.manual_seed(20)
    heads = TINY_DIT["num_heads"]
    model = SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=TINY_DIT["dim"] // heads,
        in_channels=TINY_DIT["in_dim"], out_channels=TINY_DIT["out_dim"], text_dim=TEXT_DIM,
        freq_dim=TINY_DIT["freq_dim"], ffn_dim=TINY_DIT["ffn_dim"], num_layers=TINY_DIT["num_layers"],
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", inject_sample_info=True).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing that matters here; make the output non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(str(folder), safe_serialization=True)


def build_skyreels_cache(hub: Path) -> str:
    """The repository in a Hub cache at `hub`; returns its commit."""
    commit = commit_for(REPO)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        write_transformer(t / "transformer")
        write_tokenizer(t / "tokenizer")
        write_text_encoder(t / "text_encoder", vocab_size=3 + len(WORDS) + 27)
        write_vae(t / "vae")
        for sub in ("transformer", "tokenizer", "text_encoder", "vae"):
            add_folder(hub, REPO, commit, sub, t / sub)
    return commit


def write_skyreels_test_preset(folder: Path, size: int = 64) -> Path:
    return write_test_preset(folder, SHIPPED, size=size, dit_config={"inject_sample_info": True},
                             skyreels=SKYREELS, negative_prompt="static grass")
