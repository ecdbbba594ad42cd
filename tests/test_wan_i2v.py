"""Wan image-to-video on our DiT: one clip equals diffusers' WanImageToVideoPipeline (tiny random components)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lvstudio.models.clip_vision import ClipVisionEncoder
from lvstudio.models.key_maps import load_dit_state_dict
from lvstudio.models.wan_components import WanVAE
from lvstudio.models.wan_dit import WanDiT
from lvstudio.models.wan_i2v import (
    I2VSampling,
    dit_config_from_diffusers,
    first_frame_video,
    i2v_condition,
    i2v_mask,
    latent_frames,
    sample_i2v,
)
from tests.helpers.tiny_wan_i2v import TEXT_DIM, tiny_i2v_components

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

H = W = 32
FRAMES = 9


_components = tiny_i2v_components


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (H, W, 3), generator=g, dtype=torch.uint8).numpy()
    image = PIL.fromarray(pixels)
    image_t = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 127.5 - 1.0  # [1, 3, H, W] in [-1, 1]
    text = torch.randn(1, 512, TEXT_DIM, generator=g)  # diffusers splits image tokens at len - 512
    negative = torch.randn(1, 512, TEXT_DIM, generator=g)
    noise = torch.randn(1, 16, latent_frames(FRAMES), H // 8, W // 8, generator=g)
    return image, image_t, text, negative, noise


def _ours(comp: dict, image_t, text, negative, noise, sampling: I2VSampling, **kw):
    dit = WanDiT(dit_config_from_diffusers(comp["transformer"].config)).eval()
    load_dit_state_dict(dit, comp["transformer"].state_dict(), source="diffusers transformer")
    clip = ClipVisionEncoder(comp["image_encoder"], comp["image_processor"], torch.device("cpu"))
    clip_fea = clip.encode(image_t, preprocess="processor")
    y = i2v_condition(WanVAE(comp["vae"], torch.device("cpu"), torch.float32), image_t, FRAMES)
    with torch.no_grad():
        return sample_i2v(dit, noise.clone(), text, clip_fea, y, sampling, negative_text=negative, **kw)


def _reference(comp: dict, scheduler, image, text, negative, noise, guidance: float, steps: int):
    pipe = diffusers.WanImageToVideoPipeline(tokenizer=None, text_encoder=None, scheduler=scheduler, **comp)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(image=image, prompt_embeds=text, negative_prompt_embeds=negative, height=H, width=W,
               num_frames=FRAMES, num_inference_steps=steps, guidance_scale=guidance, latents=noise.clone(),
               output_type="latent", return_dict=False)[0]
    return out.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("batch_cfg", [True, False])
def test_clip_equals_diffusers_euler(batch_cfg: bool) -> None:
    comp = _components()
    image, image_t, text, negative, noise = _inputs()
    steps, guidance = 3, 5.0
    ref = _reference(comp, diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0), image, text, negative, noise,
                     guidance, steps)
    grid = diffusers.FlowMatchEulerDiscreteScheduler(shift=7.0)
    grid.set_timesteps(steps)
    ours = _ours(comp, image_t, text, negative, noise, I2VSampling(steps=steps, guidance=guidance, batch_cfg=batch_cfg),
                 sigmas=grid.sigmas, timesteps=grid.timesteps)
    assert ours.shape == ref.shape == noise.shape
    assert _rel(ours, ref) <= 1e-4


def test_clip_equals_diffusers_unipc_schedule() -> None:
    """Our own UniPC schedule (I2VSampling.schedule) equals diffusers' UniPC flow scheduler's."""
    comp = _components(seed=3)
    image, image_t, text, negative, noise = _inputs(seed=3)
    steps, guidance, shift = 4, 3.0, 5.0
    sched = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                              flow_shift=shift)
    ref = _reference(comp, sched, image, text, negative, noise, guidance, steps)
    ours = _ours(comp, image_t, text, negative, noise,
                 I2VSampling(steps=steps, shift=shift, guidance=guidance, sampler="unipc"))
    assert _rel(ours, ref) <= 1e-4


def test_mask_and_condition_video_layout() -> None:
    # 9 pixel frames -> 3 latents; frame 0 known: latent 0 has 4 ones, latents 1 and 2 zeros.
    m = i2v_mask(9, (2, 3))
    assert m.shape == (4, 3, 2, 3)
    assert torch.equal(m[:, 0], torch.ones(4, 2, 3)) and not m[:, 1:].any()
    # first and last frame known (FLF2V layout): latent 2 covers pixel frames 5..8, the last flag is channel 3.
    m = i2v_mask(9, (1, 1), known=(0, 8))
    assert m[:, :, 0, 0].tolist() == [[1, 0, 0], [1, 0, 0], [1, 0, 0], [1, 0, 1]]
    video = first_frame_video(torch.full((1, 3, 2, 2), 0.5), 5)
    assert video.shape == (1, 3, 5, 2, 2)
    assert video[:, :, 0].eq(0.5).all() and not video[:, :, 1:].any()
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        latent_frames(8)


def test_config_from_diffusers_and_errors() -> None:
    cfg = dit_config_from_diffusers(_components()["transformer"].config)
    assert (cfg.model_type, cfg.dim, cfg.num_heads, cfg.in_dim, cfg.image_dim) == ("i2v", 24, 2, 36, 4)
    real = {"num_attention_heads": 40, "attention_head_dim": 128, "ffn_dim": 13824, "num_layers": 40,
            "in_channels": 36, "out_channels": 16, "image_dim": 1280, "added_kv_proj_dim": 5120, "text_dim": 4096}
    from lvstudio.models.wan_dit import CONFIGS

    assert dit_config_from_diffusers(real) == CONFIGS["wan2.1-i2v-14b"]
    with pytest.raises(ValueError, match="FLF2V"):
        dit_config_from_diffusers({**real, "pos_embed_seq_len": 514})
    dit = WanDiT(dit_config_from_diffusers({**real, "image_dim": None, "in_channels": 16, "num_layers": 1,
                                            "num_attention_heads": 2, "attention_head_dim": 12, "ffn_dim": 8,
                                            "text_dim": 8}))
    with pytest.raises(ValueError, match="i2v DiT"):
        sample_i2v(dit, torch.zeros(1, 16, 1, 2, 2), torch.zeros(1, 4, 8), torch.zeros(1, 1, 4),
                   torch.zeros(1, 20, 1, 2, 2), I2VSampling(steps=1))


def test_guidance_needs_negative_prompt() -> None:
    comp = _components()
    _, image_t, text, _, noise = _inputs()
    with pytest.raises(ValueError, match="negative_text"):
        _ours(comp, image_t, text, None, noise, I2VSampling(steps=1, guidance=5.0))
    # guidance 1: the negative prompt is not needed and not used
    out = _ours(comp, image_t, text, None, noise, I2VSampling(steps=1, guidance=1.0))
    assert torch.isfinite(out).all() and not np.allclose(out.numpy(), noise.numpy())


def test_clip_encoder_loads_offline_from_diffusers_folders(tmp_path) -> None:
    from lvstudio.errors import PresetError
    from lvstudio.models.clip_vision import load_clip_vision

    comp = _components()
    comp["image_encoder"].save_pretrained(tmp_path / "image_encoder", safe_serialization=True)
    comp["image_processor"].save_pretrained(tmp_path / "image_processor")
    enc = load_clip_vision(tmp_path / "image_encoder", tmp_path / "image_processor", device=torch.device("cpu"))
    _, image_t, _, _, _ = _inputs()
    ref = ClipVisionEncoder(comp["image_encoder"], comp["image_processor"], torch.device("cpu"))
    for mode in ("wan", "processor"):
        assert torch.equal(enc.encode(image_t, preprocess=mode), ref.encode(image_t, preprocess=mode))
    tokens = enc.encode(torch.zeros(2, 3, 16, 24), preprocess="wan")  # any frame size: resized to the model's
    assert tokens.shape == (2, enc.num_tokens, enc.dim) == (2, 32 * 32 + 1, 4)
    # "wan": the whole frame resized (bicubic) to the model's size, [0, 1], CLIP mean/std — no crop
    pix = enc.preprocess(image_t, "wan")
    expected = torch.nn.functional.interpolate(image_t, size=(32, 32), mode="bicubic", align_corners=False)
    mean = torch.tensor(comp["image_processor"].image_mean).view(1, 3, 1, 1)
    std = torch.tensor(comp["image_processor"].image_std).view(1, 3, 1, 1)
    torch.testing.assert_close(pix, (expected * 0.5 + 0.5 - mean) / std)
    with pytest.raises(PresetError, match="no CLIP image encoder"):
        load_clip_vision(tmp_path / "missing", None, device=torch.device("cpu"))
    with pytest.raises(PresetError, match="preprocessor_config.json"):
        load_clip_vision(tmp_path / "image_encoder", tmp_path, device=torch.device("cpu"))
