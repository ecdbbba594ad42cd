"""The KV cache keeps exactly what the next block sees: no attention mask and no copy at steady state, buffers
allocated once, keys rotated once, the same numbers as the old cache, and exact snapshots."""

from __future__ import annotations

import pytest
import torch

from lvstudio.eval.bench_model import _LegacyDiT, _LegacyKVCache, causal_kv_block
from lvstudio.models import wan_dit
from lvstudio.models.kv_cache import AttentionSpec
from lvstudio.models.wan_dit import WanDiT, WanDiTConfig

CFG = WanDiTConfig(dim=48, ffn_dim=96, num_heads=2, num_layers=2, in_dim=4, out_dim=4, freq_dim=32, text_dim=16,
                   text_len=8)
HW = (4, 6)  # latent size: 2 x 3 = 6 tokens per frame
LF = 6


def _model(seed: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    model = WanDiT(CFG).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # random everything (the official init zeroes the head)
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _inputs(blocks: int, n: int, batch: int = 1, seed: int = 1) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, 4, n, *HW, generator=g) for _ in range(blocks)]
    ts = [[torch.rand(batch, n, generator=g) * 1000 for _ in range(2)] for _ in range(blocks)]
    return xs, ts


SPECS = [
    AttentionSpec(block_frames=3, window_frames=12, sink_frames=3),  # LongLive
    AttentionSpec(block_frames=3, window_frames=9, sink_frames=0),  # Self-Forcing / CausVid, rolled
    AttentionSpec(block_frames=2, window_frames=6, sink_frames=2),  # the tiny preset
    AttentionSpec(block_frames=2, window_frames=7, sink_frames=2),  # a ring that blocks do not tile
]


@pytest.mark.parametrize("rope_mode", ["absolute", "rebase"])
@pytest.mark.parametrize("spec", SPECS)
def test_no_mask_reaches_attention_and_keys_are_the_buffer(spec: AttentionSpec, rope_mode: str, monkeypatch) -> None:
    model = _model()
    cond = model.new_conditioning(torch.randn(1, CFG.text_len, CFG.text_dim))
    calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    real = wan_dit._attention

    def spy(q, k, v, mask):
        if k.shape[1] != CFG.text_len:  # self-attention (cross-attention reads the text tokens)
            calls.append((k, mask))
        return real(q, k, v, mask)

    monkeypatch.setattr(wan_dit, "_attention", spy)
    n, window = spec.block_frames, spec.window_frames
    cache = model.new_kv_cache(spec, HW)
    xs, ts = _inputs(12, n)
    with torch.no_grad():
        for b in range(12):
            calls.clear()
            causal_kv_block(model, cache, cond, xs[b], ts[b], spec, b * n, rope_mode)
            assert all(mask is None for _, mask in calls), f"block {b} built an attention mask"
            if (b + 1) * n >= window:  # the window is full: every call reads the whole buffer, in place
                for i, (k, _) in enumerate(calls):
                    layer = cache.layers[i % CFG.num_layers]
                    assert k.shape[1] == window * LF
                    assert k.untyped_storage().data_ptr() == layer.k.untyped_storage().data_ptr()
    # What is cached is exactly what the next block attends to: the sink and window - sink - block frames.
    keep = window - spec.sink_frames - n
    assert cache.frame_ids == list(range(spec.sink_frames)) + list(range(12 * n - keep, 12 * n))


class _ExactLegacyCache(_LegacyKVCache):
    """The old algorithm, but evicting down to what the next block sees (defines the re-based positions)."""

    def commit(self, new_frame_ids: list[int]) -> None:
        super().commit(new_frame_ids)
        block = self.spec.block_frames or 1
        excess = len(self.frame_ids) - self.num_sink - (self.spec.window_frames - self.spec.sink_frames - block)
        if self.spec.window_frames is None or excess <= 0:
            return
        s, e = self.num_sink * self.tokens_per_frame, (self.num_sink + excess) * self.tokens_per_frame
        self.layers = [None if kv is None else (torch.cat([kv[0][:, :s], kv[0][:, e:]], 1),
                                                torch.cat([kv[1][:, :s], kv[1][:, e:]], 1)) for kv in self.layers]
        self.frame_ids = self.frame_ids[: self.num_sink] + self.frame_ids[self.num_sink + excess :]


@pytest.mark.parametrize("rope_mode", ["absolute", "rebase"])
@pytest.mark.parametrize("spec", SPECS)
def test_rollout_equals_the_old_cache(spec: AttentionSpec, rope_mode: str) -> None:
    """Denoising calls and context passes over 12 blocks (well past the window), batch 2 (guidance rows)."""
    new = _model()
    old = _LegacyDiT(CFG).eval()
    old.load_state_dict(new.state_dict())
    ctx = torch.randn(2, CFG.text_len, CFG.text_dim)
    n = spec.block_frames
    caches = {"new": new.new_kv_cache(spec, HW), "old": old.new_kv_cache(spec, HW),
              "exact": _ExactLegacyCache(CFG.num_layers, spec, LF)}
    models = {"new": new, "old": old, "exact": old}
    outs: dict[str, list[torch.Tensor]] = {k: [] for k in caches}
    xs, ts = _inputs(12, n, batch=2)
    with torch.no_grad():
        for b in range(12):
            for key, cache in caches.items():
                cond = models[key].new_conditioning(ctx)
                outs[key] += causal_kv_block(models[key], cache, cond, xs[b], ts[b], spec, b * n, rope_mode)
    diff = {k: max(float((a - c).abs().max()) for a, c in zip(outs["new"], outs[k], strict=True))
            for k in ("old", "exact")}
    assert diff["exact"] <= 1e-5, diff
    if rope_mode == "absolute" or spec.sink_frames == 0:
        assert diff["old"] <= 1e-5, diff  # the old cache's extra block was masked out
    else:
        # The old cache re-based positions over the block it kept but could not see, which left a one-block gap
        # between the sink and the window; positions now follow the sink contiguously, as documented.
        assert diff["old"] > 1e-4, diff


def test_a_query_of_several_blocks_takes_the_masked_path_and_equals_the_full_forward() -> None:
    """The streaming backend's pattern: a multi-block buffer queried against the cache (no write)."""
    model = _model()
    cond = model.new_conditioning(torch.randn(1, CFG.text_len, CFG.text_dim))
    spec = AttentionSpec(block_frames=2, window_frames=6, sink_frames=2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 16, *HW, generator=g)
    t = torch.rand(1, 16, generator=g) * 1000
    cache = model.new_kv_cache(spec, HW)
    with torch.no_grad():
        full = model(x, t, cond, attention=spec)
        for s in range(0, 10, 2):
            model(x[:, :, s : s + 2], t[:, s : s + 2], cond, attention=spec, kv_cache=cache, start_frame=s,
                  write_cache=True)
        ids = list(cache.frame_ids)
        buffer = model(x[:, :, 10:16], t[:, 10:16], cond, attention=spec, kv_cache=cache, start_frame=10)
    assert cache.frame_ids == ids  # nothing written
    assert (buffer - full[:, :, 10:16]).abs().max() <= 1e-5


def test_snapshot_holds_the_live_frames_and_resumes_exactly() -> None:
    model = _model()
    spec = AttentionSpec(block_frames=2, window_frames=7, sink_frames=2)
    cond = model.new_conditioning(torch.randn(2, CFG.text_len, CFG.text_dim))
    xs, ts = _inputs(10, 2, batch=2)
    cache = model.new_kv_cache(spec, HW)
    with torch.no_grad():
        for b in range(5):  # the ring has wrapped and the re-based sink has moved
            causal_kv_block(model, cache, cond, xs[b], ts[b], spec, 2 * b, "rebase")
        state = {k: v.clone() for k, v in cache.state_dict().items()}
        assert state["0.k"].shape == (2, cache.num_frames * LF, 2, 24)  # live frames only
        again = model.new_kv_cache(spec, HW)
        again.load_state_dict(state)
        assert set(again.state_dict()) == set(state)
        assert all(torch.equal(again.state_dict()[k], v) for k, v in state.items())
        cast = model.new_kv_cache(spec, HW)  # a snapshot in another dtype is converted on first use
        cast.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in state.items()})
        rest: dict[str, list[torch.Tensor]] = {}
        for key, c in (("orig", cache), ("resumed", again), ("cast", cast)):
            rest[key] = [out for b in range(5, 10)
                         for out in causal_kv_block(model, c, cond, xs[b], ts[b], spec, 2 * b, "rebase")]
    for a, b in zip(rest["orig"], rest["resumed"], strict=True):
        assert torch.equal(a, b)
    for a, b in zip(rest["orig"], rest["cast"], strict=True):
        assert (a - b).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="older lvstudio"):
        model.new_kv_cache(spec, HW).load_state_dict({"frame_ids": state["frame_ids"], "num_sink": state["num_sink"]})


def test_one_cache_one_rope_mode_and_global_attention_grows() -> None:
    model = _model()
    cond = model.new_conditioning(torch.randn(1, CFG.text_len, CFG.text_dim))
    xs, ts = _inputs(5, 3)
    cache = model.new_kv_cache(AttentionSpec(block_frames=3), HW)
    with torch.no_grad():
        causal_kv_block(model, cache, cond, xs[0], ts[0], AttentionSpec(block_frames=3), 0, "absolute")
        with pytest.raises(ValueError, match="rope_mode"):
            model(xs[1], ts[1][0], cond, attention=AttentionSpec(block_frames=3), kv_cache=cache, start_frame=3,
                  rope_mode="rebase")
        for b in range(1, 5):
            causal_kv_block(model, cache, cond, xs[b], ts[b], AttentionSpec(block_frames=3), 3 * b, "absolute")
    assert cache.frame_ids == list(range(15)) and cache.layers[0].k.shape[1] >= 15 * LF


# --------------------------------------------------------------------------------------------------------------
# Re-cache after a prompt switch (LongLive `_recache_after_switch`, global_sink = false)
# --------------------------------------------------------------------------------------------------------------


def _dense_with_mask(model: WanDiT, x, t, cond, start: int, allowed: torch.Tensor, monkeypatch) -> torch.Tensor:
    """Full-sequence forward whose self-attention uses the explicit frame mask `allowed` [F, F]."""
    token = allowed.repeat_interleave(LF, 0).repeat_interleave(LF, 1)
    real = wan_dit._attention

    def explicit(q, k, v, mask):
        return real(q, k, v, token if k.shape[1] == token.shape[1] else mask)

    with monkeypatch.context() as m:
        m.setattr(wan_dit, "_attention", explicit)
        return model(x, t, cond, start_frame=start)  # bidirectional spec: the explicit mask is the only mask


@pytest.mark.parametrize("pattern", ["bidirectional", "block-causal"])
def test_recache_attention_pattern_equals_a_dense_forward_with_explicit_masks(pattern: str, monkeypatch) -> None:
    """Window 12, sink 3, blocks of 3: re-cache 12 frames under a new prompt, then denoise the next block.

    Dense reference over the 15 frames: the re-cached frames see each other (all, or block by block); the next
    block sees the new sink (the 3 oldest re-cached frames), the 6 newest re-cached frames and itself.
    """
    model = _model()
    spec = AttentionSpec(block_frames=3, window_frames=12, sink_frames=3)
    g = torch.Generator().manual_seed(4)
    s = 18  # the switch happens at frame 18: re-cache frames 6..17
    x = torch.randn(1, 4, s + 3, *HW, generator=g)
    t_next = torch.rand(1, 3, generator=g) * 1000
    old_cond = model.new_conditioning(torch.randn(1, CFG.text_len, CFG.text_dim, generator=g))
    new_ctx = torch.randn(1, CFG.text_len, CFG.text_dim, generator=g)
    cache = model.new_kv_cache(spec, HW)
    with torch.no_grad():
        for b in range(0, s, 3):  # history under the old prompt
            model(x[:, :, b : b + 3], torch.zeros(1, 3), old_cond, attention=spec, kv_cache=cache, start_frame=b,
                  write_cache=True)
        cond = model.new_conditioning(new_ctx)
        model.recache(cache, x[:, :, s - 12 : s], s - 12, cond, keep_sink=False,
                      block_frames=3 if pattern == "block-causal" else None)
        assert cache.frame_ids == [6, 7, 8, 12, 13, 14, 15, 16, 17] and cache.num_sink == 3
        cached = model(x[:, :, s : s + 3], t_next, cond, attention=spec, kv_cache=cache, start_frame=s)

        frames = torch.arange(s - 12, s + 3)
        allowed = torch.zeros(15, 15, dtype=torch.bool)
        if pattern == "bidirectional":
            allowed[:12, :12] = True
        else:
            allowed[:12, :12] = (frames[:12, None] // 3) >= (frames[None, :12] // 3)
        allowed[12:, :3] = True  # the new sink
        allowed[12:, 6:15] = True  # the 6 newest re-cached frames and the block itself
        t = torch.cat([torch.zeros(1, 12), t_next], dim=1)
        dense = _dense_with_mask(model, x[:, :, s - 12 : s + 3], t, model.new_conditioning(new_ctx), s - 12, allowed,
                                 monkeypatch)
        # The other pattern gives other numbers (so the check above has teeth).
        other = allowed.clone()
        other[:12, :12] = True if pattern == "block-causal" else (frames[:12, None] // 3) >= (frames[None, :12] // 3)
        wrong = _dense_with_mask(model, x[:, :, s - 12 : s + 3], t, model.new_conditioning(new_ctx), s - 12, other,
                                 monkeypatch)
    assert (cached - dense[:, :, 12:]).abs().max() <= 1e-5
    assert (cached - wrong[:, :, 12:]).abs().max() > 1e-3
