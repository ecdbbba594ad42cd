"""Causal-KV generation speed of the full-size Wan2.1-T2V-1.3B DiT (random weights) on one CUDA GPU.

Compares with Self-Forcing's published 17 FPS on one H100 (arXiv 2506.08009; LongLive reports 20.7 FPS). Setting:
480x832 (latent 60x104, 1560 tokens per latent frame), bfloat16, blocks of 3 latent frames, 4 few-step denoising
steps ([1000, 750, 500, 250] warped on the shift-5 table) + the clean context pass per block, through lvstudio's own
WanDiT and rolling KV cache — once with global attention (Self-Forcing's default, KV grows to 21 frames) and once
with LongLive's rolling window (12 frames including a 3-frame sink). The text encoder is left out (random [1, 512,
4096] features: prompts are encoded once per switch); the Wan VAE streaming decode (random weights, full size) is
timed too unless --no-vae.

Reported per mode: first-block latency (noise -> decoded frames of block 0, the "time to first frame" a viewer sees),
frames/s over all blocks (pixel frames: 9 for the first block, then 12 per block) and after the first block, peak
GPU memory and the KV-cache size.

    python benchmarks/wan_speed.py                       # 7 blocks (81 frames, 5 s of video) per mode
    python benchmarks/wan_speed.py --blocks 20 --json out/wan_speed.json
    python benchmarks/wan_speed.py --allow-cpu --tiny    # smoke test of the code path (tiny sizes, no GPU)

Without a CUDA GPU it says so and exits 0 (nothing is measured).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SELF_FORCING_FPS_H100 = 17.0  # paper figure, one H100, chunk-wise


@dataclass(frozen=True)
class ModeResult:
    mode: str
    window_frames: int | None
    sink_frames: int
    blocks: int
    pixel_frames: int
    first_block_s: float
    fps: float
    fps_after_first: float
    peak_mem_gib: float
    kv_cache_mib: float
    decode_share: float  # share of the time spent in VAE decode


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(tiny: bool, device, dtype, with_vae: bool):
    """(dit, vae adapter or None) with random weights."""
    import torch

    from lvstudio.models.wan_dit import CONFIGS, WanDiT, WanDiTConfig

    torch.manual_seed(0)
    if tiny:
        cfg = WanDiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, text_dim=64, text_len=16)
    else:
        cfg = CONFIGS["wan2.1-t2v-1.3b"]
    with torch.device(device):
        dit = WanDiT(cfg)
    dit = dit.to(dtype).eval().requires_grad_(False)
    vae = None
    if with_vae:
        from diffusers import AutoencoderKLWan

        from lvstudio.models.wan_components import WanVAE

        kw = dict(base_dim=8, dim_mult=[1, 2, 2, 2], num_res_blocks=1) if tiny else {}
        model = AutoencoderKLWan(**kw).to(device=device, dtype=dtype).eval().requires_grad_(False)
        vae = WanVAE(model, device, dtype)
    return dit, vae


def run_mode(dit, vae, *, mode: str, window: int | None, sink: int, blocks: int, block_frames: int,
             latent_hw: tuple[int, int], device, seed: int = 0) -> ModeResult:
    """Generate `blocks` blocks through the rolling KV cache and time each one."""
    import torch

    from lvstudio.models.kv_cache import AttentionSpec
    from lvstudio.sampling.flow_matching import FlowMatchTable, warp_steps
    from lvstudio.sampling.samplers import few_step_sample

    cfg = dit.cfg
    h, w = latent_hw
    n = block_frames
    spec = AttentionSpec(n, window, sink)
    steps = warp_steps([1000.0, 750.0, 500.0, 250.0], 5.0)
    table = FlowMatchTable(shift=5.0)
    gen = torch.Generator(device=device).manual_seed(seed)
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen, device=device)
    cond = dit.new_conditioning(ctx)
    cache = dit.new_kv_cache(spec, (h, w))
    decoder = vae.streaming_decoder() if vae is not None else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    decode_time = 0.0
    frames = 0
    with torch.no_grad():
        for b in range(blocks):
            start = b * n

            def denoise(x, t, start=start):
                return dit(x, t, cond, attention=spec, kv_cache=cache, start_frame=start)

            _sync(device)
            t0 = time.perf_counter()
            # Step 1: few-step sampling of the block against the cache.
            noise = torch.randn(1, cfg.out_dim, n, h, w, generator=gen, device=device)
            x0 = few_step_sample(denoise, noise, steps, gen, table=table)
            # Step 2: clean context pass writes the block's K/V.
            dit(x0, torch.zeros(1, n, device=device), cond, attention=spec, kv_cache=cache, start_frame=start,
                write_cache=True)
            # Step 3: streaming VAE decode of the block.
            if decoder is not None:
                _sync(device)
                t1 = time.perf_counter()
                video = decoder.decode(x0)
                _sync(device)
                decode_time += time.perf_counter() - t1
                frames += int(video.shape[2])
            else:
                frames += 1 + 4 * (n - 1) if b == 0 else 4 * n
            _sync(device)
            times.append(time.perf_counter() - t0)
    total = sum(times)
    first_frames = 1 + 4 * (n - 1)
    rest = total - times[0]
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return ModeResult(mode, window, sink, blocks, frames, times[0], frames / total,
                      (frames - first_frames) / rest if rest > 0 else float("nan"), peak,
                      cache.nbytes() / 2**20, decode_time / total if total else 0.0)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=7, help="blocks per mode (7 = 21 latent = 81 pixel frames)")
    ap.add_argument("--block-frames", type=int, default=3)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--no-vae", action="store_true", help="time the DiT only")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up blocks per mode")
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU when no GPU (smoke test only)")
    ap.add_argument("--tiny", action="store_true", help="tiny DiT/VAE and 64x64 (smoke test of the code path)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("wan_speed: no CUDA GPU found — nothing measured. This benchmark needs one NVIDIA GPU (bf16) to "
              "compare with Self-Forcing's 17 FPS on one H100; run it on a GPU machine "
              "(`--allow-cpu --tiny` only smoke-tests the code path).")
        return 0
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    height, width = (64, 64) if args.tiny else (args.height, args.width)
    if height % 16 or width % 16:
        print(f"wan_speed: {width}x{height} is not a multiple of 16", file=sys.stderr)
        return 2
    latent_hw = (height // 8, width // 8)
    dit, vae = build(args.tiny, device, dtype, with_vae=not args.no_vae)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test, not a measurement)"
    params = sum(p.numel() for p in dit.parameters()) / 1e9
    print(f"device: {gpu}; DiT {params:.2f} B params, {dtype}; {width}x{height} (latent {latent_hw[0]}x{latent_hw[1]},"
          f" {latent_hw[0] * latent_hw[1] // 4} tokens/frame); block {args.block_frames}; 4 steps; VAE decode: "
          f"{'no' if args.no_vae else 'yes'}; torch {torch.__version__}")
    modes = [("global", None, 0), ("window12+sink3", 12, 3)]
    results: list[ModeResult] = []
    for name, window, sink in modes:
        if args.warmup:
            run_mode(dit, vae, mode=name, window=window, sink=sink, blocks=args.warmup, block_frames=args.block_frames,
                     latent_hw=latent_hw, device=device)
        results.append(run_mode(dit, vae, mode=name, window=window, sink=sink, blocks=args.blocks,
                                block_frames=args.block_frames, latent_hw=latent_hw, device=device, seed=1))
    print(f"{'mode':<16} {'blocks':>6} {'frames':>6} {'first block s':>13} {'frames/s':>9} {'fps after 1st':>13} "
          f"{'peak GiB':>8} {'KV MiB':>8} {'decode %':>8}")
    for r in results:
        print(f"{r.mode:<16} {r.blocks:>6} {r.pixel_frames:>6} {r.first_block_s:>13.3f} {r.fps:>9.2f} "
              f"{r.fps_after_first:>13.2f} {r.peak_mem_gib:>8.2f} {r.kv_cache_mib:>8.1f} {100 * r.decode_share:>7.1f}%")
    if device.type == "cuda" and not args.tiny:
        print(f"reference: Self-Forcing paper {SELF_FORCING_FPS_H100:.0f} FPS on one H100 (their code, bf16); "
              "ratio to it: " + ", ".join(f"{r.mode} {r.fps / SELF_FORCING_FPS_H100:.2f}x" for r in results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": gpu, "dtype": str(dtype), "width": width, "height": height,
                                         "vae": not args.no_vae, "results": [asdict(r) for r in results]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
