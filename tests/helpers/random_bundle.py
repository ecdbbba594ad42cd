"""A ModelBundle of tiny random models (same architectures as the tiny preset) for backend/session tests."""

from __future__ import annotations

import torch

from lvstudio.models.tiny_text import TinyTextConfig, TinyTextEncoder
from lvstudio.models.tiny_vae import TinyVAE, TinyVAEConfig
from lvstudio.models.wan_dit import WanDiT, WanDiTConfig
from lvstudio.presets import AttentionSettings, Preset, SamplerSettings
from lvstudio.presets.load import ModelBundle, TinyTextAdapter

WORDS = ["a", "red", "blue", "ball", "cube", "bouncing", "over", "the", "sea", "on", "grass", "sky", "in"]


def random_bundle(
    *, sampler: SamplerSettings | None = None, attention: AttentionSettings | None = None, size: int = 32, seed: int = 0
) -> ModelBundle:
    torch.manual_seed(seed)
    dit = WanDiT(WanDiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=4, out_dim=4, freq_dim=32,
                              text_dim=16, text_len=8)).eval()
    with torch.no_grad():  # the official init zeroes the head; give it something to say
        dit.head.head.weight.normal_(0, 0.05)
    text = TinyTextEncoder(TinyTextConfig.for_words(WORDS, dim=16, num_layers=1, num_heads=2, text_len=8)).eval()
    vae = TinyVAE(TinyVAEConfig(z_dim=4, channels=(8, 8, 8))).eval()
    preset = Preset(
        name="random-test", fps=16, width=size, height=size,
        sampler=sampler or SamplerSettings(kind="few-step", step_list=[1000, 500], shift=3.0),
        attention=attention or AttentionSettings(block_frames=2, window_frames=6, sink_frames=2),
    )
    return ModelBundle(preset, dit, TinyTextAdapter(text), vae, torch.device("cpu"), latent_channels=4)


def random_skyreels_bundle(*, ar_step: int = 1, guidance: float = 3.0, sample_info: bool = True,
                           seed: int = 0) -> ModelBundle:
    """The random bundle as a SkyReels-V2 DF preset: streaming-dit runs its DF mode (blocks of 2 latents, windows of
    6, 2 carried, 3 UniPC steps), and the DiT injects the fps sample info."""
    from lvstudio.presets.schema import SkyReelsSettings

    bundle = random_bundle(seed=seed)
    torch.manual_seed(seed + 1)
    dit = WanDiT(WanDiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=4, out_dim=4, freq_dim=32,
                              text_dim=16, text_len=8, inject_sample_info=sample_info)).eval()
    with torch.no_grad():
        dit.head.head.weight.normal_(0, 0.05)
    sk = SkyReelsSettings(num_steps=3, shift=3.0, base_num_frames=21, ar_step=ar_step, causal_block_size=2,
                          overlap_history=5, addnoise_condition=20.0, guidance_scale=guidance)
    bundle.dit = dit
    bundle.preset = bundle.preset.model_copy(update={"name": "random-skyreels", "backend": "streaming-dit",
                                                     "skyreels": sk})
    return bundle
