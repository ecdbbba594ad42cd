"""`lvstudio bench render`: generation speed of a whole render (DiT + VAE decode + H.264 encode) on this machine.

Measured in one run, on one long single-prompt render with live prompts (switches) pushed every 20 s:
  - real-time factor (video seconds per wall second) including decode and encode;
  - time to first frame;
  - per-chunk time around minute 1 vs around the last minute (rolling window => ratio ~ 1);
  - resident memory, KV-cache size and the backend's whole state (KV cache + the latents it holds) at minute 1 vs
    the last minute (flat);
  - the stall of a prompt-switch re-cache (ms), against the median chunk.
"""

from __future__ import annotations

import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


def _rss_mb() -> float:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return float("nan")


@dataclass
class RenderBenchResult:
    preset: str
    backend: str
    minutes: float
    threads: int
    realtime_factor: float
    first_frame_s: float
    chunk_ms_minute1: float
    chunk_ms_last: float
    rss_mb_minute1: float
    rss_mb_last: float
    kv_mb_minute1: float
    kv_mb_last: float
    state_mb_minute1: float
    state_mb_last: float
    recache_ms: float
    chunk_ms_median: float
    frames_per_second: float = 0.0

    def lines(self) -> list[str]:
        return [
            f"render bench: preset {self.preset}, backend {self.backend}, {self.minutes:g} min of video, "
            f"{self.threads} torch thread(s)",
            f"  real time factor (DiT + decode + H.264): x{self.realtime_factor:.2f}",
            f"  time to first frame: {1000 * self.first_frame_s:.0f} ms",
            f"  chunk time: minute 1 {self.chunk_ms_minute1:.1f} ms, last minute {self.chunk_ms_last:.1f} ms "
            f"(ratio {self.chunk_ms_last / self.chunk_ms_minute1:.3f})",
            f"  memory: RSS {self.rss_mb_minute1:.0f} MB -> {self.rss_mb_last:.0f} MB; "
            f"KV cache {self.kv_mb_minute1:.2f} MB -> {self.kv_mb_last:.2f} MB; "
            f"backend state {self.state_mb_minute1:.2f} MB -> {self.state_mb_last:.2f} MB",
            f"  prompt-switch re-cache stall: {self.recache_ms:.1f} ms (median chunk {self.chunk_ms_median:.1f} ms)"
            if math.isfinite(self.recache_ms) else
            "  prompt-switch re-cache stall: not measured (the render ended before its first prompt switch)",
        ]


def run_render_bench(preset: str = "tiny", minutes: float = 10.0, threads: int = 1, cut_every_s: float = 20.0,
                     seed: int = 0, backend: str | None = None) -> RenderBenchResult:
    import torch

    with torch.no_grad():  # not torch.set_grad_enabled(False): callers in the same process keep their autograd
        return _bench(preset, minutes, threads, cut_every_s, seed, backend)


def _bench(preset: str, minutes: float, threads: int, cut_every_s: float, seed: int,
           backend: str | None) -> RenderBenchResult:
    import torch

    from lvstudio.presets import load_preset
    from lvstudio.presets.load import load_bundle
    from lvstudio.session import RenderSession, RenderSettings
    from lvstudio.storyboard import parse_storyboard
    from lvstudio.video import VideoSink

    torch.set_num_threads(threads)
    p = load_preset(preset)
    prompts = ["a red ball bouncing over the sea", "a blue cube moving left on the grass",
               "a yellow star spinning in the night sky", "a pink triangle resting on the snow"]
    sb = parse_storyboard(f'title = "bench"\npreset = "tiny"\nduration = {minutes * 60}\n'
                          f'[[shots]]\nat = 0\nprompt = "{prompts[0]}"\n')
    settings = RenderSettings(p.name, backend or p.backend, seed, p.fps, p.width, p.height, round(minutes * 60 * p.fps))
    session = RenderSession(sb, load_bundle(p), settings)
    times: list[tuple[float, float, float, float, float]] = []  # (video second, chunk s, rss, kv MB, state MB)
    recache: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        sink = VideoSink(Path(tmp) / "bench.mp4", p.fps, p.width, p.height)
        session.add_sink(lambda c: sink.write(c.frames))
        next_cut, k = cut_every_s, 1
        t0 = time.perf_counter()
        while not session.done:
            now_s = session.frames_done / p.fps
            if now_s >= next_cut:
                session.push(prompts[k % len(prompts)])
                next_cut, k = next_cut + cut_every_s, k + 1
            c0 = time.perf_counter()
            chunk = session.step()
            dt = time.perf_counter() - c0
            if chunk.timings.get("recache", 0) > 0:
                recache.append(chunk.timings["recache"])
            else:
                caches = session.backend.cache_summary()
                times.append((now_s, dt, _rss_mb(), caches["kv_mb"], caches["state_mb"]))
        wall = time.perf_counter() - t0
        sink.close()

    def around(second: float) -> list[tuple[float, float, float, float, float]]:
        return [t for t in times if abs(t[0] - second) <= 15] or times

    first, last = around(60.0), around(minutes * 60 - 20)
    med = statistics.median
    return RenderBenchResult(
        preset=p.name, backend=settings.backend, minutes=minutes, threads=threads,
        realtime_factor=(settings.num_frames / p.fps) / wall,
        first_frame_s=session.stats.first_frame_s or float("nan"),
        chunk_ms_minute1=1000 * med(t[1] for t in first), chunk_ms_last=1000 * med(t[1] for t in last),
        rss_mb_minute1=med(t[2] for t in first), rss_mb_last=med(t[2] for t in last),
        kv_mb_minute1=med(t[3] for t in first), kv_mb_last=med(t[3] for t in last),
        state_mb_minute1=med(t[4] for t in first), state_mb_last=med(t[4] for t in last),
        recache_ms=1000 * med(recache) if recache else float("nan"),
        chunk_ms_median=1000 * med(t[1] for t in times), frames_per_second=settings.num_frames / wall,
    )


def comparison_lines(results: list[RenderBenchResult]) -> list[str]:
    """Side-by-side ratios against the first result (all measured in the same process, one after the other)."""
    base = results[0]

    def label(r: RenderBenchResult) -> str:
        return f"{r.preset}/{r.backend}"

    out = [f"side by side (ratios vs {label(base)}):",
           f"  {'preset/backend':26s} {'x real time':>11s} {'frames/s':>9s} {'first frame ms':>15s} {'chunk ms':>9s} "
           f"{'last/min1':>9s}"]
    for r in results:
        out.append(f"  {label(r):26s} {r.realtime_factor:11.2f} {r.frames_per_second:9.2f} "
                   f"{1000 * r.first_frame_s:15.0f} {r.chunk_ms_median:9.1f} "
                   f"{r.chunk_ms_last / r.chunk_ms_minute1:9.3f}")
    for r in results[1:]:
        out.append(f"  {label(r)} / {label(base)}: speed x{r.realtime_factor / base.realtime_factor:.2f}, "
                   f"first frame x{r.first_frame_s / base.first_frame_s:.2f}")
    return out
