"""`lvstudio bench model`: what the KV cache and the rolling window buy, measured side by side in one run.

1. KV-cached block rollout vs recomputing the whole block-causal prefix for every new block, at several lengths
   (the ratio must grow with length: linear vs quadratic work).
2. Per-block time at block 10 vs block 200 with a rolling window + sink (the ratio must stay near 1).
3. The KV cache against the one it replaced (issue #16), per block of the causal-KV backend (4 denoising calls + the
   clean context pass) with a full window, at the tiny preset's config and at dim 256 / 8 layers: milliseconds per
   block, their ratio, the largest output difference and how many attention masks each built. The old cache is kept
   here only, as a faithful copy (`_LegacyDiT`): keys stored without RoPE and re-rotated on every call, grown by
   `torch.cat` per layer, one block more kept than the next block can see (so a dense mask on every call).

Weights are random (speed does not depend on them); latents are 16x16 (the tiny preset's 128x128 frames).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from lvstudio.models import wan_dit
from lvstudio.models.kv_cache import AttentionSpec, frame_mask, token_mask
from lvstudio.models.rope import Rope3D
from lvstudio.models.wan_dit import CONFIGS, SelfAttention, WanDiT, WanDiTConfig

# dim 256 / 8 layers, Wan's head_dim 128: the size the issue compared with Self-Forcing's reference model.
MID_CONFIG = WanDiTConfig(dim=256, ffn_dim=1024, num_heads=2, num_layers=8, text_dim=128, text_len=24, freq_dim=64)


@dataclass(frozen=True)
class CacheComparison:
    """Per-block time of the KV cache vs the old one, same weights and inputs, steady state (window full)."""

    name: str  # e.g. "tiny, window 12 + sink 3"
    new_ms: float  # median per block
    old_ms: float
    max_diff: float  # largest |new - old| over every output of the timed blocks
    new_masks: int  # attention masks built during the timed blocks
    old_masks: int
    old_mask_mb: float  # their total size

    def line(self) -> str:
        return (f"  {self.name:<34} new {self.new_ms:7.2f} ms   old {self.old_ms:7.2f} ms   new/old "
                f"{self.new_ms / self.old_ms:4.2f}   max |diff| {self.max_diff:.1e}   masks new {self.new_masks}, "
                f"old {self.old_masks} ({self.old_mask_mb:.1f} MB)")


@dataclass(frozen=True)
class ModelBenchResult:
    lengths: list[int]  # in blocks
    cached_s: list[float]
    recompute_s: list[float]
    block10_ms: float
    block200_ms: float
    cache_mb_at_10: float
    cache_mb_at_200: float
    comparisons: list[CacheComparison] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = []
        if self.lengths:
            out.append("KV-cached rollout vs recompute-from-scratch (one forward per block, tiny DiT, 128x128):")
        for n, c, r in zip(self.lengths, self.cached_s, self.recompute_s, strict=True):
            out.append(f"  {n:4d} blocks: cached {c:7.3f} s   recompute {r:7.3f} s   speedup x{r / c:5.2f}")
        if self.block10_ms == self.block10_ms:  # not NaN
            out.append("Rolling window (12 frames, sink 3), per-block time:")
            out.append(
                f"  block 10: {self.block10_ms:6.2f} ms   block 200: {self.block200_ms:6.2f} ms   "
                f"ratio {self.block200_ms / self.block10_ms:4.2f}   "
                f"cache {self.cache_mb_at_10:.2f} MB -> {self.cache_mb_at_200:.2f} MB"
            )
        if self.comparisons:
            out.append("KV cache vs the old cache, per block (4 denoising calls + context pass), window full:")
            out.extend(c.line() for c in self.comparisons)
            if any("rebase" in c.name for c in self.comparisons):
                out.append("  (rebase: the old cache re-based positions over a block it kept but could not see, a "
                           "one-block"
                           " gap after the sink; the window now follows the sink contiguously, so outputs differ)")
        return out


def run_model_bench(
    lengths: tuple[int, ...] = (4, 8, 16, 32),
    block_frames: int = 3,
    latent_hw: tuple[int, int] = (16, 16),
    threads: int = 2,
    rolling_blocks: int = 206,
    compare_blocks: int = 12,
) -> ModelBenchResult:
    """Run the measurements; returns the figures (nothing printed). 0 skips a part (lengths=() skips part 1)."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = CONFIGS["tiny"]
    model = WanDiT(cfg).train(False)
    cond = model.new_conditioning(torch.randn(1, cfg.text_len, cfg.text_dim))
    h, w = latent_hw

    def block(i: int) -> tuple:
        return torch.randn(1, cfg.in_dim, block_frames, h, w), torch.zeros(1, block_frames)

    causal = AttentionSpec(block_frames=block_frames)
    cached_s, recompute_s = [], []
    with torch.no_grad():
        model(*block(0), cond)  # warm-up
        for n in lengths:
            # Step 1: cached — each block attends to the cache and appends itself.
            cache = model.new_kv_cache(causal, latent_hw)
            t0 = time.perf_counter()
            for i in range(n):
                x, t = block(i)
                model(x, t, cond, attention=causal, kv_cache=cache, start_frame=i * block_frames, write_cache=True)
            cached_s.append(time.perf_counter() - t0)
            # Step 2: recompute — each block re-runs the whole prefix under the block-causal mask.
            xs, ts = [], []
            t0 = time.perf_counter()
            for i in range(n):
                x, t = block(i)
                xs.append(x)
                ts.append(t)
                model(torch.cat(xs, 2), torch.cat(ts, 1), cond, attention=causal)
            recompute_s.append(time.perf_counter() - t0)

        # Step 3: rolling window — time blocks around 10 and around 200.
        times: dict[int, float] = {}
        sizes: dict[int, float] = {}
        if rolling_blocks:
            rolling = AttentionSpec(block_frames=block_frames, window_frames=12, sink_frames=3)
            cache = model.new_kv_cache(rolling, latent_hw)
            for i in range(rolling_blocks):
                x, t = block(i)
                t0 = time.perf_counter()
                model(x, t, cond, attention=rolling, kv_cache=cache, start_frame=i * block_frames, write_cache=True,
                      rope_mode="rebase")
                times[i] = time.perf_counter() - t0
                sizes[i] = cache.nbytes() / 2**20

    def around(c: int) -> float:
        if c + 6 > rolling_blocks:
            return float("nan")
        vals = sorted(times[i] for i in range(c - 5, c + 6))
        return 1000 * vals[len(vals) // 2]  # median of 11 blocks

    # Step 4: the KV cache vs the old one, at steady state.
    comparisons = []
    if compare_blocks:
        ll = AttentionSpec(block_frames, 12, 3)
        sf = AttentionSpec(block_frames, 21, 0)
        for name, c, spec, mode in (("tiny, window 12 + sink 3", cfg, ll, "absolute"),
                                    ("tiny, window 21", cfg, sf, "absolute"),
                                    ("tiny, window 12 + sink 3, rebase", cfg, ll, "rebase"),
                                    ("dim 256 x 8, window 12 + sink 3", MID_CONFIG, ll, "absolute"),
                                    ("dim 256 x 8, window 21", MID_CONFIG, sf, "absolute")):
            comparisons.append(
                compare_caches(name, c, spec, rope_mode=mode, latent_hw=latent_hw, blocks=compare_blocks))
    return ModelBenchResult(list(lengths), cached_s, recompute_s, around(10), around(200),
                            sizes.get(10, float("nan")), sizes.get(200, float("nan")), comparisons)


# ---------------------------------------------------------------------------------------------------------------
# New cache vs old cache
# ---------------------------------------------------------------------------------------------------------------


@contextmanager
def count_masks() -> Iterator[list[Tensor]]:
    """Record every attention mask handed to the DiT's attention function while inside the block."""
    masks: list[Tensor] = []
    real = wan_dit._attention

    def spy(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        if mask is not None:
            masks.append(mask)
        return real(q, k, v, mask)

    wan_dit._attention = spy
    try:
        yield masks
    finally:
        wan_dit._attention = real


def causal_kv_block(model: WanDiT, cache, cond, x: Tensor, ts: list[Tensor], spec: AttentionSpec, start: int,
                    rope_mode: str) -> list[Tensor]:
    """One block as the causal-KV backend runs it: len(ts) denoising calls, then the context pass that writes."""
    outs = [model(x, t, cond, attention=spec, kv_cache=cache, start_frame=start, rope_mode=rope_mode) for t in ts]
    outs.append(model(x, torch.zeros_like(ts[0]), cond, attention=spec, kv_cache=cache, start_frame=start,
                      write_cache=True, rope_mode=rope_mode))
    return outs


def compare_caches(name: str, cfg: WanDiTConfig, spec: AttentionSpec, *, rope_mode: str = "absolute",
                   latent_hw: tuple[int, int] = (16, 16), blocks: int = 12, steps: int = 4,
                   seed: int = 0) -> CacheComparison:
    """Time the new and the old cache block by block (alternating, same inputs) once the window is full."""
    torch.manual_seed(seed)
    new = WanDiT(cfg).train(False)
    with torch.no_grad():  # the official init zeroes the head: give the outputs something to compare
        new.head.head.weight.normal_(0, 0.02)
    old = _LegacyDiT(cfg).train(False)
    old.load_state_dict(new.state_dict())
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim)
    cond_new, cond_old = new.new_conditioning(ctx), old.new_conditioning(ctx)
    n, (h, w) = spec.block_frames or 1, latent_hw
    cache_new, cache_old = new.new_kv_cache(spec, latent_hw), old.new_kv_cache(spec, latent_hw)
    warm = -(-(spec.window_frames or 21) // n) + 2  # blocks until the window is full, and two more
    gen = torch.Generator().manual_seed(seed)
    new_ms, old_ms, diff, masks_new, masks_old, mask_bytes = [], [], 0.0, 0, 0, 0
    with torch.no_grad():
        for b in range(warm + blocks):
            x = torch.randn(1, cfg.in_dim, n, h, w, generator=gen)
            ts = [torch.full((1, n), 1000.0 * (steps - j) / steps) for j in range(steps)]
            runs: dict[str, tuple[float, list[Tensor], list[Tensor]]] = {}
            sides = [("new", new, cache_new, cond_new), ("old", old, cache_old, cond_old)]
            for key, model, cache, cond in sides if b % 2 == 0 else sides[::-1]:  # alternate who goes first
                with count_masks() as masks:
                    t0 = time.perf_counter()
                    outs = causal_kv_block(model, cache, cond, x, ts, spec, b * n, rope_mode)
                    runs[key] = (time.perf_counter() - t0, outs, masks)
            if b < warm:
                continue
            new_ms.append(1000 * runs["new"][0])
            old_ms.append(1000 * runs["old"][0])
            pairs = zip(runs["new"][1], runs["old"][1], strict=True)
            diff = max([diff] + [float((a - o).abs().max()) for a, o in pairs])
            masks_new += len(runs["new"][2])
            masks_old += len(runs["old"][2])
            mask_bytes += sum(m.numel() * m.element_size() for m in runs["old"][2])

    def median(v: list[float]) -> float:
        return sorted(v)[len(v) // 2]

    return CacheComparison(name, median(new_ms), median(old_ms), diff, masks_new, masks_old, mask_bytes / 2**20)


# ---------------------------------------------------------------------------------------------------------------
# The old KV cache (before issue #16), for comparison only
# ---------------------------------------------------------------------------------------------------------------


def _legacy_cos_sin(rope: Rope3D, frame_pos: Tensor, height: int, width: int) -> tuple[Tensor, Tensor]:
    """The old RoPE tables: cos, sin [F*height*width, 1, head_dim/2] float32."""
    dt, dh, dw = rope.dims
    dev = frame_pos.device
    a_t = rope._angles(frame_pos, dt)  # [F, dt/2]
    a_h = rope._angles(torch.arange(height, device=dev), dh)  # [H, dh/2]
    a_w = rope._angles(torch.arange(width, device=dev), dw)  # [W, dw/2]
    f, h, w = a_t.shape[0], height, width
    ang = torch.cat(
        [a_t[:, None, None].expand(f, h, w, -1), a_h[None, :, None].expand(f, h, w, -1),
         a_w[None, None, :].expand(f, h, w, -1)],
        dim=-1,
    ).reshape(f * h * w, 1, -1)
    return torch.cos(ang).float(), torch.sin(ang).float()


def _legacy_apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The old RoPE application: real arithmetic on unbound pairs (same numbers, more kernels)."""
    x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # [B, L, heads, head_dim/2] each
    out = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)
    return out.type_as(x)


@dataclass
class _LegacyKVCache:
    """The old cache: per-layer K/V without RoPE, grown by torch.cat, window - sink frames kept after the sink."""

    num_layers: int
    spec: AttentionSpec
    tokens_per_frame: int
    layers: list[tuple[Tensor, Tensor] | None] = field(default_factory=list)
    frame_ids: list[int] = field(default_factory=list)
    num_sink: int = 0

    def __post_init__(self) -> None:
        if not self.layers:
            self.layers = [None] * self.num_layers

    @property
    def num_frames(self) -> int:
        return len(self.frame_ids)

    @property
    def end_frame(self) -> int:
        return self.frame_ids[-1] + 1 if self.frame_ids else 0

    def nbytes(self) -> int:
        return sum(kv[0].numel() * kv[0].element_size() * 2 for kv in self.layers if kv is not None)

    def reset(self) -> None:
        self.layers = [None] * self.num_layers
        self.frame_ids = []
        self.num_sink = 0

    def keep_only_sink(self) -> None:
        keep = self.num_sink * self.tokens_per_frame
        self.layers = [None if kv is None else (kv[0][:, :keep], kv[1][:, :keep]) for kv in self.layers]
        self.frame_ids = self.frame_ids[: self.num_sink]

    def read(self, layer: int) -> tuple[Tensor, Tensor] | None:
        return self.layers[layer]

    def append(self, layer: int, k: Tensor, v: Tensor) -> None:
        kv = self.layers[layer]
        self.layers[layer] = (k, v) if kv is None else (torch.cat([kv[0], k], 1), torch.cat([kv[1], v], 1))

    def commit(self, new_frame_ids: list[int]) -> None:
        for f in new_frame_ids:
            self.frame_ids.append(f)
            if self.num_sink < self.spec.sink_frames and len(self.frame_ids) == self.num_sink + 1:
                self.num_sink += 1
        if self.spec.window_frames is None:
            return
        capacity = self.num_sink + (self.spec.window_frames - self.spec.sink_frames)
        excess = len(self.frame_ids) - capacity
        if excess <= 0:
            return
        lf = self.tokens_per_frame
        s, e = self.num_sink * lf, (self.num_sink + excess) * lf
        for i, kv in enumerate(self.layers):
            if kv is not None:
                self.layers[i] = (torch.cat([kv[0][:, :s], kv[0][:, e:]], 1),
                                  torch.cat([kv[1][:, :s], kv[1][:, e:]], 1))
        self.frame_ids = self.frame_ids[: self.num_sink] + self.frame_ids[self.num_sink + excess :]


@dataclass
class _LegacyContext:
    q_cos: Tensor
    q_sin: Tensor
    mask: Tensor | None
    cache: _LegacyKVCache | None = None
    cached_cos: Tensor | None = None  # RoPE for the cached keys, applied on every call
    cached_sin: Tensor | None = None
    write: bool = False
    plan: list[int] | None = None  # frames to commit (write only)


class _LegacySelfAttention(SelfAttention):
    def forward(self, x: Tensor, ctx: _LegacyContext, layer: int) -> Tensor:  # type: ignore[override]
        q = self.norm_q(self.q(x)).unflatten(2, (self.num_heads, -1))
        k = self.norm_k(self.k(x)).unflatten(2, (self.num_heads, -1))
        v = self.v(x).unflatten(2, (self.num_heads, -1))
        q_r = _legacy_apply_rope(q, ctx.q_cos, ctx.q_sin)
        k_r = _legacy_apply_rope(k, ctx.q_cos, ctx.q_sin)
        keys, values = k_r, v
        if ctx.cache is not None:
            cached = ctx.cache.read(layer)
            if cached is not None:
                ck, cv = cached
                keys = torch.cat([_legacy_apply_rope(ck, ctx.cached_cos, ctx.cached_sin), k_r], dim=1)
                values = torch.cat([cv, v], dim=1)
            if ctx.write:
                ctx.cache.append(layer, k.detach(), v.detach())
        return self.o(wan_dit._attention(q_r, keys, values, ctx.mask))


class _LegacyDiT(WanDiT):
    """WanDiT with the old self-attention and cache path (same parameters, same state_dict keys)."""

    def __init__(self, cfg: WanDiTConfig) -> None:
        super().__init__(cfg)
        for blk in self.blocks:
            blk.self_attn = _LegacySelfAttention(cfg.dim, cfg.num_heads, cfg.eps)

    def new_kv_cache(self, spec: AttentionSpec, latent_hw: tuple[int, int]) -> _LegacyKVCache:  # type: ignore[override]
        _, ph, pw = self.cfg.patch_size
        return _LegacyKVCache(self.cfg.num_layers, spec, (latent_hw[0] // ph) * (latent_hw[1] // pw))

    def _legacy_positions(self, frames: Tensor, cache: _LegacyKVCache | None,
                          rope_mode: str) -> tuple[Tensor, Tensor | None]:
        cached = torch.tensor(cache.frame_ids, dtype=torch.int64) if cache is not None and cache.frame_ids else None
        if rope_mode == "absolute":
            return frames, cached
        n_sink = cache.num_sink if cache is not None else 0
        all_frames = frames if cached is None else torch.cat([cached, frames])
        rest = all_frames[n_sink:]
        first = int(rest.min()) if rest.numel() else 0
        pos = torch.cat([torch.arange(n_sink), rest - first + n_sink])
        if cached is None:
            return pos, None
        return pos[len(cached) :], pos[: len(cached)]

    def _attention_context(self, spec, cache, start_frame, n_frames, hp, wp, write, rope_mode, device):  # type: ignore[override]
        frames = torch.arange(start_frame, start_frame + n_frames)
        pos, cached_pos = self._legacy_positions(frames, cache, rope_mode)
        q_cos, q_sin = _legacy_cos_sin(self.rope, pos.to(device), hp, wp)
        lf = hp * wp
        if cache is None or not cache.frame_ids:
            key_frames = frames
            c_cos = c_sin = None
        else:
            key_frames = torch.cat([torch.tensor(cache.frame_ids, dtype=torch.int64), frames])
            c_cos, c_sin = _legacy_cos_sin(self.rope, cached_pos.to(device), hp, wp)
        mask_spec = spec
        if cache is not None:
            mask_spec = replace(spec, window_frames=cache.spec.window_frames, sink_frames=cache.spec.sink_frames)
        allowed = frame_mask(frames, key_frames, mask_spec)
        mask = None if bool(allowed.all()) else token_mask(allowed, lf, lf).to(device)
        plan = list(range(start_frame, start_frame + n_frames)) if (cache is not None and write) else None
        return _LegacyContext(q_cos, q_sin, mask, cache, c_cos, c_sin, write, plan)
