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
