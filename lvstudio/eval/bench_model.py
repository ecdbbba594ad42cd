"""`lvstudio bench model`: what the KV cache and the rolling window buy, measured side by side in one run.

1. KV-cached block rollout vs recomputing the whole block-causal prefix for every new block, at several lengths
   (the ratio must grow with length: linear vs quadratic work).
2. Per-block time at block 10 vs block 200 with a rolling window + sink (the ratio must stay near 1).

Weights are random (speed does not depend on them); the architecture is the tiny preset's at 128x128.
"""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelBenchResult:
    lengths: list[int]  # in blocks
    cached_s: list[float]
    recompute_s: list[float]
    block10_ms: float
    block200_ms: float
    cache_mb_at_10: float
    cache_mb_at_200: float

    def lines(self) -> list[str]:
        out = ["KV-cached rollout vs recompute-from-scratch (one forward per block, tiny DiT, 128x128):"]
        for n, c, r in zip(self.lengths, self.cached_s, self.recompute_s, strict=True):
            out.append(f"  {n:4d} blocks: cached {c:7.3f} s   recompute {r:7.3f} s   speedup x{r / c:5.2f}")
        out.append("Rolling window (12 frames, sink 3), per-block time:")
        out.append(
            f"  block 10: {self.block10_ms:6.2f} ms   block 200: {self.block200_ms:6.2f} ms   "
            f"ratio {self.block200_ms / self.block10_ms:4.2f}   "
            f"cache {self.cache_mb_at_10:.2f} MB -> {self.cache_mb_at_200:.2f} MB"
        )
        return out


def run_model_bench(
    lengths: tuple[int, ...] = (4, 8, 16, 32), block_frames: int = 3, latent_hw: tuple[int, int] = (16, 16),
    threads: int = 2,
) -> ModelBenchResult:
    """Run both measurements; returns the figures (nothing printed)."""
    import torch

    from lvstudio.models.kv_cache import AttentionSpec
    from lvstudio.models.wan_dit import CONFIGS, WanDiT

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
        rolling = AttentionSpec(block_frames=block_frames, window_frames=12, sink_frames=3)
        cache = model.new_kv_cache(rolling, latent_hw)
        times: dict[int, float] = {}
        sizes: dict[int, float] = {}
        for i in range(206):
            x, t = block(i)
            t0 = time.perf_counter()
            model(x, t, cond, attention=rolling, kv_cache=cache, start_frame=i * block_frames, write_cache=True,
                  rope_mode="rebase")
            times[i] = time.perf_counter() - t0
            sizes[i] = cache.nbytes() / 2**20

    def around(c: int) -> float:
        vals = sorted(times[i] for i in range(c - 5, c + 6))
        return 1000 * vals[len(vals) // 2]  # median of 11 blocks

    return ModelBenchResult(list(lengths), cached_s, recompute_s, around(10), around(200), sizes[10], sizes[200])
