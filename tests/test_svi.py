"""Stable Video Infinity: the conditioning layout of every mode (written-out expectations) and its LoRA files."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lvstudio.models.lora import LoraError, apply_lora
from lvstudio.models.svi import (
    SVI_MODES,
    SviConditioner,
    latent_carry_y,
    latent_condition,
    load_svi_lora,
    merge_lora_weights,
    normalize_lora_keys,
    pixel_carry_y,
    pixel_condition_video,
    svi_mode,
    uint8_roundtrip,
)
from lvstudio.models.wan_dit import WanDiT, WanDiTConfig

F = 9  # pixel frames per clip -> 3 latent frames
REF = 0.9  # the reference image's (constant) value


def _frames(values: list[float], size: int = 8) -> torch.Tensor:
    """[1, 3, len(values), size, size], frame i constant = values[i]."""
    return torch.tensor(values, dtype=torch.float32).view(1, 1, -1, 1, 1).expand(1, 3, -1, size, size).clone()


def _per_frame(video: torch.Tensor) -> list[float]:
    """The constant value of each frame (checks the frame is constant)."""
    out = []
    for i in range(video.shape[2]):
        frame = video[:, :, i]
        assert torch.equal(frame, frame.flatten()[0].expand_as(frame)), f"frame {i} is not constant"
        out.append(round(float(frame.flatten()[0]), 6))
    return out


class RecordingVAE:
    """Records what it is asked to encode; returns latents whose frame j is the constant 10*(call) + j."""

    def __init__(self) -> None:
        self.videos: list[torch.Tensor] = []

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        self.videos.append(video.clone())
        b, _, n, h, w = video.shape
        f = (n - 1) // 4 + 1
        base = 10.0 * len(self.videos)
        return (base + torch.arange(f, dtype=torch.float32)).view(1, 1, f, 1, 1).expand(b, 16, f, h // 8, w // 8)


MASK_FRAME0 = [[1.0, 0.0, 0.0]] * 4  # [4 channels][3 latents]: only pixel frame 0 is flagged


def _mask_values(y: torch.Tensor) -> list[list[float]]:
    mask = y[0, :4]  # [4, f, h, w]
    assert torch.equal(mask, mask[:, :, :1, :1].expand_as(mask))
    return mask[:, :, 0, 0].tolist()


# -- pure builders ----------------------------------------------------------------------------------------------


def test_pixel_condition_video_padding() -> None:
    motion = _frames([0.1, 0.2, 0.3, 0.4, 0.5])
    reference = _frames([REF])[:, :, 0]
    assert _per_frame(pixel_condition_video(motion, reference, F, "reference")) == [
        0.1, 0.2, 0.3, 0.4, 0.5, 0.9, 0.9, 0.9, 0.9]
    assert _per_frame(pixel_condition_video(motion, reference, F, "zeros")) == [
        0.1, 0.2, 0.3, 0.4, 0.5, 0.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="no frame to generate"):
        pixel_condition_video(_frames([0.1] * 9), reference, F, "zeros")


def test_pixel_carry_y_is_mask_then_vae_latents() -> None:
    vae = RecordingVAE()
    y = pixel_carry_y(vae, _frames([0.1, 0.2]), _frames([REF])[:, :, 0], F, "reference")
    assert _per_frame(vae.videos[0]) == [0.1, 0.2, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    assert y.shape == (1, 20, 3, 1, 1)
    assert _mask_values(y) == MASK_FRAME0  # two given frames, still only frame 0 flagged (as upstream)
    assert y[0, 4:, :, 0, 0].tolist() == [[10.0, 11.0, 12.0]] * 16


def test_latent_condition_anchor_motion_zeros() -> None:
    anchor = torch.full((1, 16, 1, 2, 2), 7.0)
    previous = (1.0 + torch.arange(3.0)).view(1, 1, 3, 1, 1).expand(1, 16, 3, 2, 2)  # latents 1, 2, 3
    assert latent_condition(anchor, None, 3)[0, 0, :, 0, 0].tolist() == [7.0, 0.0, 0.0]
    assert latent_condition(anchor, previous[:, :, -1:], 3)[0, 0, :, 0, 0].tolist() == [7.0, 3.0, 0.0]
    assert latent_condition(anchor, previous[:, :, -1:], 5)[0, 0, :, 0, 0].tolist() == [7.0, 3.0, 0.0, 0.0, 0.0]
    y = latent_carry_y(anchor, previous[:, :, -1:], F)
    assert y.shape == (1, 20, 3, 2, 2)
    assert _mask_values(y) == MASK_FRAME0  # the carried latent is NOT flagged
    assert y[0, 4:, :, 1, 1].tolist() == [[7.0, 3.0, 0.0]] * 16
    with pytest.raises(ValueError, match="no latent to generate"):
        latent_condition(anchor, previous, 3)


def test_uint8_roundtrip_truncates_like_upstream() -> None:
    x = torch.tensor([-1.0, 1.0, 0.0, 0.5, -0.999, 1.5, -2.0])
    # (x + 1)·127.5 = 0, 255, 127.5, 191.25, 0.1275, 318.75, -127.5 -> clip, trunc -> 0, 255, 127, 191, 0, 255, 0
    expected = torch.tensor([0.0, 255.0, 127.0, 191.0, 0.0, 255.0, 0.0]) * (2 / 255) - 1  # preprocess_image
    assert torch.equal(uint8_roundtrip(x), expected)


# -- every mode, clip after clip --------------------------------------------------------------------------------

LEVELS = (10, 20, 30, 40, 50, 60, 70, 80, 90)
PREV_RAW = [-1 + 2 * (u + 0.5) / 255 for u in LEVELS]  # a decoded clip, each frame half-way between 8-bit levels
PREV = (torch.tensor(LEVELS, dtype=torch.float32) * (2 / 255) - 1).tolist()  # what upstream's PIL round trip gives
PIXEL_EXPECTED = {
    # mode: (clip 0 video sent to the VAE, clip 1 video sent to the VAE, index of CLIP's frame in PREV for clip 1)
    "shot": ([REF] * 9, [PREV[8]] + [REF] * 8, 8),
    "tom": ([REF] + [0.0] * 8, [PREV[8]] + [0.0] * 8, 8),
    "film": ([REF] + [0.0] * 8, PREV[4:9] + [0.0] * 4, 4),
    "2.0": ([REF] * 9, PREV[4:9] + [REF] * 4, 4),
}


@pytest.mark.parametrize("name", sorted(PIXEL_EXPECTED))
def test_pixel_modes_condition_each_clip(name: str) -> None:
    clip0, clip1, clip_frame = PIXEL_EXPECTED[name]
    reference = _frames([REF])[:, :, 0]
    chain = SviConditioner(name, reference, num_frames=F)
    vae = RecordingVAE()
    first = chain.next_inputs(vae)
    assert [round(v, 6) for v in _per_frame(vae.videos[0])] == [round(v, 6) for v in clip0]
    assert torch.equal(first.clip_image, reference)  # the first clip: CLIP reads the reference
    assert _mask_values(first.y) == MASK_FRAME0

    chain.advance(torch.zeros(1, 16, 3, 1, 1), _frames(PREV_RAW))
    second = chain.next_inputs(vae)
    assert [round(v, 6) for v in _per_frame(vae.videos[1])] == [round(v, 6) for v in clip1]
    assert torch.allclose(second.clip_image, _frames([PREV[clip_frame]])[:, :, 0])  # first motion frame
    assert _mask_values(second.y) == MASK_FRAME0
    k = SVI_MODES[name].motion
    assert chain.emit_slice(F) == slice(0, F - k) and chain.held_slice(F) == slice(F - k, F)
    with pytest.raises(ValueError, match="pass the clip's video"):
        chain.advance(torch.zeros(1, 16, 3, 1, 1))


def test_latent_mode_conditions_each_clip() -> None:
    reference = _frames([REF])[:, :, 0]
    chain = SviConditioner("2.0-pro", reference, num_frames=F)
    vae = RecordingVAE()
    first = chain.next_inputs(vae)
    assert len(vae.videos) == 1 and _per_frame(vae.videos[0]) == [REF]  # only the anchor goes through the VAE
    assert first.y[0, 4:, :, 0, 0].tolist() == [[10.0, 0.0, 0.0]] * 16  # [anchor, zeros]
    assert _mask_values(first.y) == MASK_FRAME0
    assert torch.equal(first.clip_image, reference)
    with pytest.raises(ValueError, match="no clip"):
        chain.emit_slice(F)

    latents = (1.0 + torch.arange(3.0)).view(1, 1, 3, 1, 1).expand(1, 16, 3, 1, 1)
    chain.advance(latents)  # no video needed: nothing is decoded for the carry
    assert chain.emit_slice(F) == slice(0, F)  # clip 0 is shown whole
    second = chain.next_inputs(vae)
    assert len(vae.videos) == 1  # the anchor latent is reused, no VAE round trip
    assert second.y[0, 4:, :, 0, 0].tolist() == [[10.0, 3.0, 0.0]] * 16  # [anchor, last latent, zeros]
    assert _mask_values(second.y) == MASK_FRAME0
    chain.advance(latents)
    assert chain.emit_slice(F) == slice(5, F)  # later clips repeat 5 frames (anchor + carried latent)
    assert chain.held_slice(F) == slice(F, F)

    restored = SviConditioner("2.0-pro", torch.zeros(1, 3, 8, 8), num_frames=F)
    restored.load_state_dict(chain.state_dict())
    assert restored.clip_index == 2 and torch.equal(restored.carry, chain.carry)
    assert torch.equal(restored.next_inputs(RecordingVAE()).y, chain.next_inputs(vae).y)


def test_modes_and_overrides() -> None:
    assert set(SVI_MODES) == {"shot", "film", "tom", "2.0", "2.0-pro"}
    assert svi_mode("2.0", motion=1).motion == 1 and SVI_MODES["2.0"].motion == 5
    with pytest.raises(ValueError, match="unknown SVI mode"):
        svi_mode("svi-3")
    with pytest.raises(ValueError, match="reference"):
        SviConditioner("shot", torch.zeros(3, 8, 8))


# -- LoRA -------------------------------------------------------------------------------------------------------

TARGETS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
           "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def _i2v_dit(dim: int = 24, seed: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    dit = WanDiT(WanDiTConfig(model_type="i2v", dim=dim, ffn_dim=32, num_heads=2, num_layers=2, in_dim=36,
                              out_dim=16, freq_dim=32, text_dim=16, image_dim=8)).eval()
    with torch.no_grad():
        dit.head.head.weight.normal_(0, 0.05)  # the official init zeroes the head
    return dit


def _published_lora(dit: WanDiT, rank: int, prefix: str = "pipe.dit.", seed: int = 1) -> dict[str, torch.Tensor]:
    """Adapters in the published layout: peft names with the adapter name, under the Lightning prefix."""
    g = torch.Generator().manual_seed(seed)
    modules = dict(dit.named_modules())
    out = {}
    for i in range(dit.cfg.num_layers):
        for t in TARGETS:
            lin = modules[f"blocks.{i}.{t}"]
            out[f"{prefix}blocks.{i}.{t}.lora_A.default.weight"] = torch.randn(rank, lin.in_features, generator=g) * .1
            out[f"{prefix}blocks.{i}.{t}.lora_B.default.weight"] = torch.randn(lin.out_features, rank, generator=g) * .1
    return out


def _forward(dit: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 16, 3, 4, 4, generator=g)
    cond = dit.new_conditioning(torch.randn(1, 6, 16, generator=g), torch.randn(1, 5, 8, generator=g),
                                torch.randn(1, 20, 3, 4, 4, generator=g))
    with torch.no_grad():
        return dit(x, torch.rand(1, 3, generator=g) * 1000, cond)


@pytest.mark.parametrize("prefix", ["pipe.dit.", ""])
def test_published_lora_merges_to_w_plus_ba_and_equals_peft(tmp_path: Path, prefix: str) -> None:
    base = _i2v_dit()
    path = tmp_path / "svi-shot.safetensors"
    save_file(_published_lora(base, rank=4, prefix=prefix), str(path))
    state, scale = load_svi_lora(path)
    assert scale == 1.0 and len(state) == 2 * 2 * len(TARGETS)
    assert "blocks.0.cross_attn.k.lora_A.weight" in state

    merged = copy.deepcopy(base)
    names = merge_lora_weights(merged, state, scale)
    assert len(names) == 2 * len(TARGETS) and not any("k_img" in n or "v_img" in n for n in names)
    before, after = dict(base.named_modules()), dict(merged.named_modules())
    for name in names:
        expected = before[name].weight + scale * state[f"{name}.lora_B.weight"] @ state[f"{name}.lora_A.weight"]
        torch.testing.assert_close(after[name].weight, expected, atol=1e-6, rtol=0)
    untouched = [k for k, v in base.state_dict().items() if not any(k.startswith(n + ".weight") for n in names)]
    assert all(torch.equal(base.state_dict()[k], merged.state_dict()[k]) for k in untouched)

    unmerged = apply_lora(copy.deepcopy(base), state, merge=False, alpha=scale * 4)  # peft scale alpha/r = 1
    out_merged, out_peft, out_base = _forward(merged), _forward(unmerged), _forward(base)
    torch.testing.assert_close(out_merged, out_peft, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out_merged, out_base, atol=1e-3)


def test_lora_for_another_base_is_refused_with_the_first_bad_key(tmp_path: Path) -> None:
    path = tmp_path / "other.safetensors"
    save_file(_published_lora(_i2v_dit(dim=32), rank=4), str(path))
    state, scale = load_svi_lora(path)
    dit = _i2v_dit(dim=24)
    before = {k: v.clone() for k, v in dit.state_dict().items()}
    with pytest.raises(LoraError, match=r"blocks\.0\.cross_attn\.k\.lora_A\.weight.*\[4, 32\].*\[4, 24\]"):
        merge_lora_weights(dit, state, scale)
    assert all(torch.equal(before[k], v) for k, v in dit.state_dict().items())  # nothing merged


def test_lora_key_formats_and_refusals(tmp_path: Path) -> None:
    dit = _i2v_dit()
    peft = _published_lora(dit, rank=4, prefix="")
    comfy = {}
    for k, v in peft.items():
        k = "diffusion_model." + k.replace(".lora_A.default.weight", ".lora_down.weight")
        comfy[k.replace(".lora_B.default.weight", ".lora_up.weight")] = v
        if ".lora_down." in k:
            comfy[k.replace(".lora_down.weight", ".alpha")] = torch.tensor(2.0)
    state, ratio = normalize_lora_keys(comfy)
    assert ratio == 0.5 and set(state) == set(normalize_lora_keys(peft)[0])
    with pytest.raises(LoraError, match="extra modules"):
        normalize_lora_keys({"pipe.dit.dwpose_embedding.0.weight": torch.zeros(1)})
    with pytest.raises(LoraError, match="not a LoRA weight"):
        normalize_lora_keys({"blocks.0.self_attn.q.weight": torch.zeros(1)})
    with pytest.raises(LoraError, match="does not exist"):
        load_svi_lora(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not safetensors")
    with pytest.raises(LoraError, match="not a safetensors"):
        load_svi_lora(bad)


# -- the whole chain, driven as the cross-clip backend will -----------------------------------------------------


@pytest.mark.slow  # three VAE encodes and decodes per mode: ~5 s alone, much more on a busy CPU
@pytest.mark.parametrize("mode", ["film", "2.0-pro"])
def test_clip_chain_on_tiny_components(tmp_path: Path, mode: str) -> None:
    pytest.importorskip("diffusers")
    from lvstudio.models.clip_vision import ClipVisionEncoder
    from lvstudio.models.key_maps import load_dit_state_dict
    from lvstudio.models.wan_components import WanVAE
    from lvstudio.models.wan_i2v import I2VSampling, dit_config_from_diffusers, sample_i2v
    from tests.helpers.tiny_wan_i2v import TEXT_DIM, tiny_i2v_components

    comp = tiny_i2v_components()
    dit = WanDiT(dit_config_from_diffusers(comp["transformer"].config)).eval()
    load_dit_state_dict(dit, comp["transformer"].state_dict())
    save_file(_published_lora(dit, rank=4), str(tmp_path / "svi.safetensors"))
    merge_lora_weights(dit, *load_svi_lora(tmp_path / "svi.safetensors"))
    vae = WanVAE(comp["vae"], torch.device("cpu"), torch.float32)
    clip = ClipVisionEncoder(comp["image_encoder"], comp["image_processor"], torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    reference = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    text, negative = torch.randn(1, 512, TEXT_DIM, generator=g), torch.randn(1, 512, TEXT_DIM, generator=g)

    chain = SviConditioner(mode, reference, num_frames=F)
    shown, ys = [], []
    for clip_index in range(3):
        inputs = chain.next_inputs(vae)
        ys.append(inputs.y)
        clip_fea = clip.encode(inputs.clip_image, preprocess="wan")  # upstream's CLIP preprocessing
        noise = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(42 * clip_index))
        with torch.no_grad():
            latents = sample_i2v(dit, noise, text, clip_fea, inputs.y, I2VSampling(steps=2), negative_text=negative)
        video = vae.decode(latents)  # each clip decoded on its own, as upstream does
        chain.advance(latents, video)
        shown.append(video[:, :, chain.emit_slice(F)])
        if mode == "film" and clip_index == 0:
            first_video = video
        if mode == "2.0-pro" and clip_index == 0:
            first_latents = latents
    shown.append(video[:, :, chain.held_slice(F)])  # the run stops after the last clip
    frames = torch.cat(shown, dim=2)
    if mode == "film":  # upstream: clip[:-5] + clip[:-5] + the last clip whole
        assert frames.shape[2] == 4 + 4 + 9
        # clip 1 was conditioned on clip 0's last 5 frames (8-bit), re-encoded, then 4 zero frames
        expected = torch.cat([uint8_roundtrip(first_video[:, :, -5:]), torch.zeros(1, 3, 4, 32, 32)], dim=2)
        assert torch.equal(ys[1][:, 4:], vae.encode(expected))
    else:  # upstream: clip 0 whole, later clips without their first 5 frames
        assert frames.shape[2] == 9 + 4 + 4
        assert torch.equal(ys[1][0, 4:, 1], first_latents[0, :, -1])  # the carried latent, no VAE round trip
        assert torch.equal(ys[1][0, 4:, 0], ys[0][0, 4:, 0])  # the anchor latent stays
    assert torch.isfinite(frames).all() and not torch.equal(ys[1], ys[2])
