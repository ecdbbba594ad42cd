"""Tiny random Wan image-to-video components, as diffusers' own WanImageToVideoPipeline tests build them."""

from __future__ import annotations

import torch

TEXT_DIM = 32


def tiny_i2v_components(seed: int = 0) -> dict:
    """diffusers' test components (tiny AutoencoderKLWan, WanTransformer3DModel, CLIP vision + processor) with random
    (non-zero) DiT weights and the i2v image branch of the real config (added_kv_proj_dim = inner dim)."""
    import diffusers
    import transformers

    torch.manual_seed(seed)
    vae = diffusers.AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                     temperal_downsample=[False, True, True]).eval()
    torch.manual_seed(seed)
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
        text_dim=TEXT_DIM, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=4, added_kv_proj_dim=24,
    ).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in transformer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    torch.manual_seed(seed)
    image_encoder = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=4, projection_dim=4, num_hidden_layers=2, num_attention_heads=2, image_size=32,
        intermediate_size=16, patch_size=1,
    )).eval()
    image_processor = transformers.CLIPImageProcessor(crop_size=32, size=32)
    return {"vae": vae, "transformer": transformer, "image_encoder": image_encoder, "image_processor": image_processor}


WORDS = ["a", "red", "blue", "ball", "cube", "over", "the", "sea", "grass", "blurry", "static"]


def tiny_svi_bundle(mode: str = "shot", *, frames: int = 9, size: int = 32, steps: int = 2, cfg_scale: float = 5.0,
                    negative_prompt: str = "blurry static", seed: int = 0):
    """A ModelBundle for the SVI cross-clip backend on the components above (the Wan I2V architecture: DiT, VAE and
    CLIP vision tower with random weights) and the tiny word-level text encoder at the DiT's text width."""
    from lvstudio.models.clip_vision import ClipVisionEncoder
    from lvstudio.models.key_maps import load_dit_state_dict
    from lvstudio.models.tiny_text import TinyTextConfig, TinyTextEncoder
    from lvstudio.models.wan_components import WanVAE
    from lvstudio.models.wan_dit import WanDiT
    from lvstudio.models.wan_i2v import dit_config_from_diffusers
    from lvstudio.presets import AttentionSettings, CrossClipSettings, Preset
    from lvstudio.presets.load import ModelBundle, TinyTextAdapter

    comp = tiny_i2v_components(seed)
    dit = WanDiT(dit_config_from_diffusers(comp["transformer"].config)).eval()
    load_dit_state_dict(dit, comp["transformer"].state_dict(), source="tiny i2v transformer")
    torch.manual_seed(seed)
    text = TinyTextEncoder(TinyTextConfig.for_words(WORDS, dim=TEXT_DIM, num_layers=1, num_heads=2, text_len=8))
    cpu = torch.device("cpu")
    preset = Preset(
        name="svi-test", backend="erft-crossclip", fps=16, width=size, height=size, realtime=False,
        negative_prompt=negative_prompt, attention=AttentionSettings(block_frames=1),
        crossclip=CrossClipSettings(svi=mode, pixel_frames=frames, steps=steps, shift=5.0, cfg_scale=cfg_scale),
    )
    return ModelBundle(preset, dit, TinyTextAdapter(text.eval()), WanVAE(comp["vae"], cpu, torch.float32), cpu,
                       latent_channels=16, image_encoder=ClipVisionEncoder(comp["image_encoder"],
                                                                           comp["image_processor"], cpu))
