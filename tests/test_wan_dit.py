"""The Wan DiT: parity with diffusers' WanTransformer3DModel, key maps, and KV-cached attention topologies."""

from __future__ import annotations

import pytest
import torch

from lvstudio.models.key_maps import (
    WeightsError,
    diffusers_to_official,
    load_dit_state_dict,
    official_to_diffusers,
    strip_wrappers,
)
from lvstudio.models.kv_cache import AttentionSpec
from lvstudio.models.wan_dit import CONFIGS, WanDiT, WanDiTConfig

diffusers = pytest.importorskip("diffusers")


def _randomize(model: torch.nn.Module, seed: int) -> None:
    """Replace every parameter with random values (the official init zeroes the head, which hides bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def _tiny(model_type: str = "t2v", **kw) -> WanDiTConfig:
    base = dict(
        model_type=model_type, dim=48, ffn_dim=96, num_heads=2, num_layers=2, in_dim=36 if model_type == "i2v" else 4,
        out_dim=4, freq_dim=32, text_dim=16, text_len=512, image_dim=24,
    )
    base.update(kw)
    return WanDiTConfig(**base)


def _diffusers_twin(cfg: WanDiTConfig):
    return diffusers.WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps, image_dim=cfg.image_dim if cfg.model_type == "i2v" else None,
        added_kv_proj_dim=cfg.dim if cfg.model_type == "i2v" else None,
    ).eval()


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
@pytest.mark.parametrize("shape", [(1, 3, 4, 4), (2, 5, 6, 8), (1, 2, 8, 6)])
@pytest.mark.parametrize("per_frame_t", [False, True])
def test_forward_equals_diffusers(model_type: str, shape: tuple[int, int, int, int], per_frame_t: bool) -> None:
    torch.manual_seed(0)
    cfg = _tiny(model_type)
    ours = WanDiT(cfg).eval()
    _randomize(ours, seed=1)
    ref = _diffusers_twin(cfg)
    ref.load_state_dict(official_to_diffusers(ours.state_dict()), strict=True)

    b, f, h, w = shape
    noise_ch = 16 if model_type == "i2v" else cfg.in_dim
    x = torch.randn(b, noise_ch, f, h, w)
    y = torch.randn(b, cfg.in_dim - noise_ch, f, h, w) if model_type == "i2v" else None
    clip = torch.randn(b, 7, cfg.image_dim) if model_type == "i2v" else None
    ctx = torch.randn(b, 512, cfg.text_dim)
    if per_frame_t:
        t = torch.rand(b, f) * 1000
        t_ref = t.repeat_interleave((h // 2) * (w // 2), dim=1)  # diffusers takes one timestep per token
    else:
        t = torch.rand(b) * 1000
        t_ref = t
    with torch.no_grad():
        out = ours(x, t, ours.new_conditioning(ctx, clip, y))
        ref_in = x if y is None else torch.cat([x, y], 1)
        enc = ctx if clip is None else ctx  # diffusers concatenates image tokens itself
        expected = ref(ref_in, t_ref, enc, encoder_hidden_states_image=clip, return_dict=False)[0]
    assert out.shape == (b, cfg.out_dim, f, h, w)
    assert (out - expected).abs().max().item() <= 1e-4


def test_official_key_names_and_round_trip() -> None:
    for model_type in ("t2v", "i2v"):
        cfg = _tiny(model_type)
        sd = WanDiT(cfg).state_dict()
        # official names (spot checks from the Wan2.1 checkpoint layout)
        for key in ("patch_embedding.weight", "time_projection.1.weight", "blocks.0.norm3.weight",
                    "blocks.1.self_attn.norm_q.weight", "blocks.0.ffn.2.bias", "head.modulation", "head.head.weight"):
            assert key in sd
        assert not any(".norm1." in k or ".norm2." in k for k in sd), "non-affine norms must carry no keys"
        if model_type == "i2v":
            assert {"blocks.0.cross_attn.k_img.weight", "img_emb.proj.4.bias"} <= set(sd)
        conv = official_to_diffusers(sd)
        assert set(conv) == set(_diffusers_twin(cfg).state_dict())
        back = diffusers_to_official(conv)
        assert set(back) == set(sd)
        assert all(back[k] is sd[k] for k in sd)


def test_load_errors_name_keys_and_wrappers_are_stripped() -> None:
    cfg = _tiny()
    model = WanDiT(cfg)
    sd = dict(model.state_dict())
    wrapped = {"generator_ema": {f"model._fsdp_wrapped_module.{k}": v for k, v in sd.items()}, "step": 3}
    other = WanDiT(cfg)
    load_dit_state_dict(other, wrapped)
    assert all(torch.equal(other.state_dict()[k], v) for k, v in sd.items())
    assert set(strip_wrappers({"generator": {f"model.{k}": v for k, v in sd.items()}})) == set(sd)
    # diffusers-layout weights load too
    load_dit_state_dict(other, official_to_diffusers(sd))

    broken = dict(sd)
    del broken["blocks.1.ffn.0.weight"]
    broken["blocks.9.extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError) as err:
        load_dit_state_dict(other, broken)
    assert "blocks.1.ffn.0.weight" in str(err.value) and "blocks.9.extra.weight" in str(err.value)
    broken = dict(sd)
    broken["head.head.weight"] = torch.zeros(3, 3)
    with pytest.raises(WeightsError, match="head.head.weight"):
        load_dit_state_dict(other, broken)


def test_configs_have_the_published_sizes() -> None:
    assert CONFIGS["wan2.1-t2v-1.3b"].head_dim == 128
    assert WanDiT(CONFIGS["tiny"]).rope.dims == (24, 20, 20)
    from lvstudio.models.wan_dit import Rope3D

    assert Rope3D(128).dims == (44, 42, 42)  # Wan's 22/21/21 complex split
    n = sum(p.numel() for p in WanDiT(CONFIGS["tiny"]).parameters())
    assert 1e6 < n < 2e7


# --------------------------------------------------------------------------------------------------------------
# KV-cached attention
# --------------------------------------------------------------------------------------------------------------


def _model_and_inputs(num_frames: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = _tiny(text_len=8)
    model = WanDiT(cfg).eval()
    _randomize(model, seed)
    x = torch.randn(1, cfg.in_dim, num_frames, 4, 6)
    t = torch.rand(1, num_frames) * 1000
    cond = model.new_conditioning(torch.randn(1, 8, cfg.text_dim))
    return model, x, t, cond


@pytest.mark.parametrize(
    "spec",
    [
        AttentionSpec(block_frames=3),
        AttentionSpec(block_frames=3, window_frames=9, sink_frames=3),
        AttentionSpec(block_frames=2, window_frames=6, sink_frames=0),
        AttentionSpec(block_frames=1, window_frames=4, sink_frames=1),
    ],
)
def test_kv_rollout_equals_block_causal_forward(spec: AttentionSpec) -> None:
    n = 18
    model, x, t, cond = _model_and_inputs(n)
    bf = spec.block_frames
    with torch.no_grad():
        full = model(x, t, cond, attention=spec)
        cache = model.new_kv_cache(spec, (4, 6))
        outs = []
        for s in range(0, n, bf):
            outs.append(model(x[:, :, s : s + bf], t[:, s : s + bf], cond, attention=spec, kv_cache=cache,
                              start_frame=s, write_cache=True))
    rolled = torch.cat(outs, dim=2)
    assert (rolled - full).abs().max().item() <= 1e-5
    # the mask really matters: a bidirectional forward differs
    with torch.no_grad():
        bidir = model(x, t, cond)
    assert (bidir - full).abs().max().item() > 1e-3


def test_denoising_steps_do_not_write_and_context_pass_does() -> None:
    model, x, t, cond = _model_and_inputs(6)
    spec = AttentionSpec(block_frames=3, window_frames=6, sink_frames=3)
    cache = model.new_kv_cache(spec, (4, 6))
    with torch.no_grad():
        model(x[:, :, :3], t[:, :3], cond, attention=spec, kv_cache=cache, start_frame=0)
        assert cache.num_frames == 0
        model(x[:, :, :3], t[:, :3], cond, attention=spec, kv_cache=cache, start_frame=0, write_cache=True)
        assert cache.frame_ids == [0, 1, 2] and cache.num_sink == 3
        with pytest.raises(ValueError, match="already cached"):
            model(x[:, :, :3], t[:, :3], cond, attention=spec, kv_cache=cache, start_frame=0, write_cache=True)


def test_kv_cache_memory_is_constant_past_the_window() -> None:
    model, _, _, cond = _model_and_inputs(1)
    spec = AttentionSpec(block_frames=2, window_frames=8, sink_frames=2)
    cache = model.new_kv_cache(spec, (4, 6))
    sizes, storage = [], set()
    with torch.no_grad():
        for blk in range(12):
            x = torch.randn(1, 4, 2, 4, 6)
            model(x, torch.zeros(1, 2), cond, attention=spec, kv_cache=cache, start_frame=2 * blk, write_cache=True)
            sizes.append((cache.nbytes(), cache.num_frames, tuple(cache.layers[0].k.shape)))
            storage.add(tuple(kv.k.data_ptr() for kv in cache.layers))
    # The buffers are allocated once, window-sized (8 frames of 6 tokens), and never replaced.
    assert len(storage) == 1 and all(s[2] == (1, 8 * 6, 2, 24) for s in sizes), sizes
    assert len(set(sizes[2:])) == 1, sizes  # sink 2 + 4 past frames held from the third block on
    assert cache.frame_ids[:2] == [0, 1]  # the sink survives eviction
    # Exactly what the next 2-frame block sees: the sink + window - sink - block = 4 past frames.
    assert cache.frame_ids[2:] == list(range(24 - 4, 24))
    state = cache.state_dict()
    assert state["0.k"].shape[1] == 6 * 6  # a snapshot holds only the live frames


def test_rebase_mode_is_translation_invariant_and_passes_the_rope_table() -> None:
    model, x, t, cond = _model_and_inputs(12)
    spec = AttentionSpec(block_frames=3, window_frames=9, sink_frames=3)

    def rollout(offset: int, mode: str) -> torch.Tensor:
        cache = model.new_kv_cache(spec, (4, 6))
        outs = []
        with torch.no_grad():
            for s in range(0, 12, 3):
                outs.append(model(x[:, :, s : s + 3], t[:, s : s + 3], cond, attention=spec, kv_cache=cache,
                                  start_frame=offset + s, write_cache=True, rope_mode=mode))
        return torch.cat(outs, 2)

    base = rollout(0, "rebase")
    far = rollout(4998, "rebase")  # far past the 1024-frame table (block-aligned offset)
    assert (base - far).abs().max().item() <= 1e-5
    with pytest.raises(ValueError, match="rebase"):
        rollout(4998, "absolute")
    # Until the window is full the re-based positions are the absolute ones.
    first = rollout(0, "absolute")
    assert (first[:, :, :9] - base[:, :, :9]).abs().max().item() <= 1e-5


def test_recache_rewrites_the_window_and_keeps_the_sink() -> None:
    model, x, t, cond = _model_and_inputs(12)
    spec = AttentionSpec(block_frames=3, window_frames=9, sink_frames=3)
    cache = model.new_kv_cache(spec, (4, 6))
    with torch.no_grad():
        for s in range(0, 12, 3):
            model(x[:, :, s : s + 3], torch.zeros(1, 3), cond, attention=spec, kv_cache=cache, start_frame=s,
                  write_cache=True)
    before = {k: v.clone() for k, v in cache.state_dict().items()}
    ids = list(cache.frame_ids)
    new_cond = model.new_conditioning(torch.randn(1, 8, 16))
    lo = cache.frame_ids[cache.num_sink]
    model.recache(cache, x[:, :, lo:12], lo, new_cond, keep_sink=True, block_frames=3)
    after = cache.state_dict()
    assert cache.frame_ids == ids
    sink_tokens = 3 * cache.tokens_per_frame
    for i in range(model.cfg.num_layers):
        assert torch.equal(after[f"{i}.k"][:, :sink_tokens], before[f"{i}.k"][:, :sink_tokens])
        if i > 0:  # layer-0 K/V depend only on the frames themselves (checked below)
            assert not torch.allclose(after[f"{i}.k"][:, sink_tokens:], before[f"{i}.k"][:, sink_tokens:])
    # Layer-0 K/V depend only on the frames themselves, so they survive a re-cache under the same conditioning.
    model.recache(cache, x[:, :, lo:12], lo, cond, keep_sink=True, block_frames=3)
    assert (cache.state_dict()["0.k"] - before["0.k"]).abs().max() <= 1e-5
    # Re-caching under the same conditioning reproduces every layer (each frame sees what it saw the first time).
    wide = AttentionSpec(block_frames=3, window_frames=12, sink_frames=3)
    cache2 = model.new_kv_cache(wide, (4, 6))
    with torch.no_grad():
        for s in range(0, 12, 3):
            model(x[:, :, s : s + 3], torch.zeros(1, 3), cond, attention=wide, kv_cache=cache2, start_frame=s,
                  write_cache=True)
    ref = {k: v.clone() for k, v in cache2.state_dict().items()}
    model.recache(cache2, x[:, :, 3:12], 3, cond, keep_sink=True, block_frames=3)
    for key, val in cache2.state_dict().items():
        assert (val.float() - ref[key].float()).abs().max() <= 1e-5, key
    # Without a global sink the cache is rebuilt from the given frames; the first ones become the sink.
    model.recache(cache, x[:, :, 3:12], 3, new_cond, keep_sink=False)
    assert cache.frame_ids == [3, 4, 5, 9, 10, 11] and cache.num_sink == 3  # sink + window - sink - block


def test_cross_attention_cache_gives_identical_output() -> None:
    model, x, t, cond = _model_and_inputs(3)
    with torch.no_grad():
        a = model(x, t, cond)
        assert cond.cache is not None and cond.cache.is_filled
        b = model(x, t, cond)
        c = model(x, t, model.new_conditioning(cond.context))
    assert torch.equal(a, b) and torch.allclose(a, c)


@pytest.mark.parametrize("model_type", ["t2v", "i2v"])
def test_runs_with_every_weight_in_bf16(model_type: str) -> None:
    """`dit.to(torch.bfloat16)` (how Hub presets load on a GPU) runs, norm3 included: its fp32 input meets fp32 copies
    of its bf16 weights, and the output stays close to the fp32 model's (bf16 rounding only)."""
    cfg = _tiny(model_type)
    torch.manual_seed(0)
    ref = WanDiT(cfg).eval()
    _randomize(ref, 3)
    bf16 = WanDiT(cfg).eval()
    bf16.load_state_dict(ref.state_dict())
    bf16.to(torch.bfloat16)
    assert bf16.blocks[0].norm3.weight.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(1)
    noise_ch = 16 if model_type == "i2v" else cfg.in_dim
    x = torch.randn(1, noise_ch, 3, 4, 4, generator=g)
    t = torch.full((1, 3), 500.0)
    ctx = torch.randn(1, 8, cfg.text_dim, generator=g)
    clip = torch.randn(1, 5, cfg.image_dim, generator=g) if model_type == "i2v" else None
    y = torch.randn(1, cfg.in_dim - noise_ch, 3, 4, 4, generator=g) if model_type == "i2v" else None
    with torch.no_grad():
        want = ref(x, t, ref.new_conditioning(ctx, clip, y)).float()
        got = bf16(x, t, bf16.new_conditioning(ctx, clip, y)).float()
    assert torch.isfinite(got).all()
    assert float((got - want).abs().max() / want.abs().max()) < 0.05
