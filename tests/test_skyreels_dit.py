"""SkyReels-V2 additions to the Wan DiT: parity with diffusers' SkyReelsV2Transformer3DModel, keys and configs."""

from __future__ import annotations

import pytest
import torch

from lvstudio.models.key_maps import (
    diffusers_to_official,
    dit_config_from_diffusers,
    dit_config_from_official,
    load_dit_state_dict,
    official_to_diffusers,
)
from lvstudio.models.kv_cache import AttentionSpec
from lvstudio.models.wan_dit import WanDiT, WanDiTConfig, fps_class

diffusers = pytest.importorskip("diffusers")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _tiny(**kw: object) -> WanDiTConfig:
    base: dict[str, object] = {"dim": 48, "ffn_dim": 96, "num_heads": 2, "num_layers": 2, "in_dim": 4, "out_dim": 4,
                               "freq_dim": 32, "text_dim": 16, "text_len": 512}
    base.update(kw)
    return WanDiTConfig(**base)  # type: ignore[arg-type]


def _diffusers_twin(cfg: WanDiTConfig):  # type: ignore[no-untyped-def]
    return diffusers.SkyReelsV2Transformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps, inject_sample_info=cfg.inject_sample_info, num_frame_per_block=cfg.num_frame_per_block,
    ).eval()


def _pair(**kw: object) -> tuple[WanDiT, torch.nn.Module]:
    torch.manual_seed(0)
    cfg = _tiny(**kw)
    ours = WanDiT(cfg).eval()
    _randomize(ours, seed=1)
    ref = _diffusers_twin(cfg)
    ref.load_state_dict(official_to_diffusers(ours.state_dict()), strict=True)
    return ours, ref


@pytest.mark.parametrize("fps", [None, 16, 24])
@pytest.mark.parametrize("block", [1, 2])
@pytest.mark.parametrize("shape", [(1, 4, 4, 6), (1, 6, 6, 4)])
def test_forward_equals_diffusers_per_frame(fps: int | None, block: int, shape: tuple[int, int, int, int]) -> None:
    ours, ref = _pair(inject_sample_info=fps is not None, num_frame_per_block=block)
    b, f, h, w = shape
    x = torch.randn(b, 4, f, h, w)
    ctx = torch.randn(b, 512, 16)
    t = torch.randint(0, 1000, (b, f))  # integer timesteps, as the pipeline feeds them
    idx = None if fps is None else fps_class(fps)
    with torch.no_grad():
        out = ours(x, t.float(), ours.new_conditioning(ctx, fps_index=idx))
        expected = ref(x, t, ctx, enable_diffusion_forcing=True, fps=None if idx is None else [idx],
                       return_dict=False)[0]
    assert out.shape == expected.shape == (b, 4, f, h, w)
    assert (out - expected).abs().max().item() <= 1e-4


@pytest.mark.parametrize("inject", [False, True])
def test_forward_equals_diffusers_one_timestep_per_sample(inject: bool) -> None:
    ours, ref = _pair(inject_sample_info=inject)
    x, ctx, t = torch.randn(2, 4, 3, 4, 4), torch.randn(2, 512, 16), torch.tensor([999.0, 250.0])
    idx = [1, 0] if inject else None
    with torch.no_grad():
        out = ours(x, t, ours.new_conditioning(ctx, fps_index=None if idx is None else torch.tensor(idx)))
        expected = ref(x, t, ctx, enable_diffusion_forcing=False, fps=idx, return_dict=False)[0]
    assert (out - expected).abs().max().item() <= 1e-4


def test_block_causal_default_equals_explicit_spec_and_matters() -> None:
    ours, _ = _pair(num_frame_per_block=2)
    x, ctx, t = torch.randn(1, 4, 4, 4, 4), torch.randn(1, 512, 16), torch.rand(1, 4) * 1000
    cond = ours.new_conditioning(ctx)
    with torch.no_grad():
        default = ours(x, t, cond)
        explicit = ours(x, t, cond, attention=AttentionSpec(block_frames=2))
        bidir = ours(x, t, cond, attention=AttentionSpec())
    assert torch.equal(default, explicit)
    assert (default - bidir).abs().max().item() > 1e-3
    # the first block sees only itself, so it is unchanged by later frames
    with torch.no_grad():
        first = ours(x[:, :, :2], t[:, :2], cond)
    assert (first - default[:, :, :2]).abs().max().item() <= 1e-5


def test_fps_is_required_and_checked() -> None:
    ours, _ = _pair(inject_sample_info=True)
    x, ctx, t = torch.randn(1, 4, 2, 4, 4), torch.randn(1, 512, 16), torch.rand(1, 2) * 1000
    with pytest.raises(ValueError, match="fps_index"):
        ours(x, t, ours.new_conditioning(ctx))
    with pytest.raises(ValueError, match="fps_index"):
        ours(x, t, ours.new_conditioning(ctx, fps_index=2))
    assert fps_class(16) == 0 and fps_class(24) == 1 and fps_class(15.0) == 1
    with torch.no_grad():
        a = ours(x, t, ours.new_conditioning(ctx, fps_index=0))
        b = ours(x, t, ours.new_conditioning(ctx, fps_index=1))
    assert (a - b).abs().max().item() > 1e-4


def test_skyreels_keys_round_trip_in_both_layouts() -> None:
    cfg = _tiny(inject_sample_info=True)
    sd = WanDiT(cfg).state_dict()
    assert {"fps_embedding.weight", "fps_projection.0.weight", "fps_projection.2.bias"} <= set(sd)
    conv = official_to_diffusers(sd)
    assert set(conv) == set(_diffusers_twin(cfg).state_dict())
    assert {"fps_projection.net.0.proj.weight", "fps_projection.net.2.bias"} <= set(conv)
    back = diffusers_to_official(conv)
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)
    # Both layouts load strictly; the diffusers-layout twin's own weights give the same model.
    _, ref = _pair(inject_sample_info=True)
    other = WanDiT(cfg)
    load_dit_state_dict(other, ref.state_dict())
    load_dit_state_dict(other, {"model." + k: v for k, v in diffusers_to_official(ref.state_dict()).items()})


def test_configs_from_both_layouts() -> None:
    # SkyReels-V2-DF-1.3B-540P as diffusers' conversion script writes it, and the upstream WanModel config.
    diff = {"_class_name": "SkyReelsV2Transformer3DModel", "added_kv_proj_dim": None, "attention_head_dim": 128,
            "cross_attn_norm": True, "eps": 1e-06, "ffn_dim": 8960, "freq_dim": 256, "in_channels": 16,
            "num_attention_heads": 12, "inject_sample_info": True, "num_layers": 30, "out_channels": 16,
            "patch_size": [1, 2, 2], "qk_norm": "rms_norm_across_heads", "text_dim": 4096, "image_dim": None,
            "rope_max_seq_len": 1024, "pos_embed_seq_len": None, "num_frame_per_block": 1}
    official = {"_class_name": "WanModel", "model_type": "t2v", "patch_size": [1, 2, 2], "text_len": 512,
                "in_dim": 16, "dim": 1536, "ffn_dim": 8960, "freq_dim": 256, "text_dim": 4096, "out_dim": 16,
                "num_heads": 12, "num_layers": 30, "window_size": [-1, -1], "qk_norm": True,
                "cross_attn_norm": True, "inject_sample_info": True, "eps": 1e-06}
    a = WanDiTConfig.from_dict(dit_config_from_diffusers(diff))
    b = WanDiTConfig.from_dict(dit_config_from_official(official))
    assert a == b
    assert a.dim == 1536 and a.num_heads == 12 and a.inject_sample_info and a.model_type == "t2v"
    with pytest.raises(ValueError, match="qk_norm"):
        dit_config_from_diffusers({**diff, "qk_norm": "rms_norm"})
    with pytest.raises(ValueError, match="unknown_thing"):
        dit_config_from_official({**official, "unknown_thing": 1})
    i2v = dit_config_from_diffusers({**diff, "added_kv_proj_dim": 1536, "image_dim": 1280, "in_channels": 36})
    assert i2v["model_type"] == "i2v" and i2v["in_dim"] == 36
