"""Causal-KV generation speed of the full-size Wan2.1-T2V-1.3B DiT (random weights) on one CUDA GPU.

Compares with Self-Forcing's published 17 FPS on one H100 (arXiv 2506.08009; LongLive reports 20.7 FPS). Setting:
480x832 (latent 60x104, 1560 tokens per latent frame), bfloat16, blocks of 3 latent frames, 4 few-step denoising
steps ([1000, 750, 500, 250] warped on the shift-5 table) + the clean context pass per block, through lvstudio's own
WanDiT and rolling KV cache, in the two regimes the presets run in:
  - `window21`: Self-Forcing / CausVid presets, a rolling window of 21 latent frames (`--window`), no sink;
  - `longlive window12+sink3`: LongLive, a window of 12 frames including a 3-frame sink, with one prompt switch
    (`--switch-block`) that re-caches the window under the new prompt (global_sink false, bidirectional re-cache),
    timed on its own.
`--global` adds global attention (upstream Self-Forcing inside its 21-frame horizon; the cache grows without bound).
The text encoder is left out (random [1, 512, 4096] features: prompts are encoded once per switch); the Wan VAE
streaming decode (random weights, full size) is timed too unless --no-vae.

Reported per mode: first-block latency (noise -> decoded frames of block 0, the "time to first frame" a viewer
sees), frames/s over all blocks and at steady state (the blocks whose window is full, the switch block left out:
what a long video runs at), the prompt-switch re-cache time, attention masks built at steady state (0 expected),
peak GPU memory and the KV-cache size.

    python benchmarks/wan_speed.py                       # 14 blocks per mode (steady state from block 6 / 3)
    python benchmarks/wan_speed.py --blocks 30 --window 21 --json out/wan_speed.json
    python benchmarks/wan_speed.py --allow-cpu --tiny    # smoke test of the code path (tiny sizes, no GPU)
    python benchmarks/wan_speed.py --skyreels            # SkyReels-V2 DF 1.3B at the preset's settings instead

`--skyreels`: the `skyreels-v2-df-1.3b-540p` preset's regime (the streaming-dit backend's DF mode): the 1.3B DiT with
the fps sample info at 960x544 (latent 68x120, 2040 tokens per latent frame), 24 fps, segments of 97 frames (25
latents) carrying 17 (5 latents), 30 UniPC steps, CFG 6 (two DiT calls per step), through lvstudio's DF sampler, in
the asynchronous mode the preset ships (ar_step 5, blocks of 5) and the synchronous one (ar_step 0). Reported per
mode: model calls, time to the first finished frames (decoded), frames/s overall and from the second segment on
(what a long video runs at), peak GPU memory. Upstream: about 14.7 GB peak VRAM for the 1.3B model at 540P.

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
    steady_from_block: int | None  # first block whose window is full (None: never, or not reached)
    fps_steady: float  # frames/s over the steady blocks, switch block left out (NaN if none)
    switch_block: int | None
    recache_s: float  # prompt-switch re-cache (NaN without a switch)
    masks_steady: int  # attention masks built during the steady blocks
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

        kw = {"base_dim": 8, "dim_mult": [1, 2, 2, 2], "num_res_blocks": 1} if tiny else {}
        model = AutoencoderKLWan(**kw).to(device=device, dtype=dtype).eval().requires_grad_(False)
        vae = WanVAE(model, device, dtype)
    return dit, vae


def steady_from(window: int | None, block_frames: int) -> int | None:
    """First block that attends to a full window: the cache then holds window - block frames before it."""
    return None if window is None else -(-(window - block_frames) // block_frames)


def run_mode(dit, vae, *, mode: str, window: int | None, sink: int, blocks: int, block_frames: int,
             latent_hw: tuple[int, int], device, seed: int = 0, switch_block: int | None = None,
             recache_attention: str = "bidirectional") -> ModeResult:
    """Generate `blocks` blocks through the rolling KV cache and time each one (and a prompt-switch re-cache)."""
    import torch

    from lvstudio.eval.bench_model import count_masks
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
    steady = steady_from(window, n)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    frames_per_block: list[int] = []
    decode_time = recache_time = 0.0
    masks_steady = 0
    recent = None  # [1, C, <=window, h, w] last clean latents (what a switch re-caches)
    with torch.no_grad():
        for b in range(blocks):
            start = b * n
            _sync(device)
            t0 = time.perf_counter()
            with count_masks() as masks:
                # Step 1 (LongLive): a prompt switch re-encodes the window under the new prompt.
                if b == switch_block and recent is not None:
                    cond = dit.new_conditioning(torch.randn(ctx.shape, generator=gen, device=device))
                    k = recent.shape[2]
                    dit.recache(cache, recent, start - k, cond, keep_sink=False,
                                block_frames=n if recache_attention == "block-causal" else None)
                    _sync(device)
                    recache_time = time.perf_counter() - t0

                def denoise(x, t, start=start, cond=cond):
                    return dit(x, t, cond, attention=spec, kv_cache=cache, start_frame=start)

                # Step 2: few-step sampling of the block against the cache.
                noise = torch.randn(1, cfg.out_dim, n, h, w, generator=gen, device=device)
                x0 = few_step_sample(denoise, noise, steps, gen, table=table)
                # Step 3: clean context pass writes the block's K/V.
                dit(x0, torch.zeros(1, n, device=device), cond, attention=spec, kv_cache=cache, start_frame=start,
                    write_cache=True)
            if steady is not None and b >= steady and b != switch_block:
                masks_steady += len(masks)
            recent = x0 if recent is None else torch.cat([recent, x0], 2)[:, :, -(window or 4 * n * 8) :]
            # Step 4: streaming VAE decode of the block.
            if decoder is not None:
                _sync(device)
                t1 = time.perf_counter()
                video = decoder.decode(x0)
                _sync(device)
                decode_time += time.perf_counter() - t1
                frames_per_block.append(int(video.shape[2]))
            else:
                frames_per_block.append(1 + 4 * (n - 1) if b == 0 else 4 * n)
            _sync(device)
            times.append(time.perf_counter() - t0)
    total = sum(times)
    frames = sum(frames_per_block)
    rest = total - times[0]
    steady_blocks = [b for b in range(blocks) if steady is not None and b >= steady and b != switch_block]
    steady_s = sum(times[b] for b in steady_blocks)
    fps_steady = sum(frames_per_block[b] for b in steady_blocks) / steady_s if steady_s > 0 else float("nan")
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return ModeResult(mode, window, sink, blocks, frames, times[0], frames / total,
                      (frames - frames_per_block[0]) / rest if rest > 0 else float("nan"),
                      steady if steady_blocks else None, fps_steady,
                      switch_block if (switch_block is not None and switch_block < blocks) else None,
                      recache_time if switch_block is not None and switch_block < blocks else float("nan"),
                      masks_steady, peak, cache.nbytes() / 2**20, decode_time / total if total else 0.0)


@dataclass(frozen=True)
class DFResult:
    mode: str
    pixel_frames: int
    calls: int  # sampler iterations (each = 2 DiT forwards with CFG)
    first_chunk_s: float  # noise -> the first finished frames, decoded
    fps: float
    fps_steady: float  # frames/s from the second segment on (NaN with one segment)
    peak_mem_gib: float
    decode_share: float


def skyreels_settings(tiny: bool, ar_step: int):
    from lvstudio.sampling.df_sampler import DFSettings

    cbs = 5 if ar_step else 1
    if tiny:
        return DFSettings(num_steps=4, shift=8.0, base_num_frames=37, ar_step=ar_step, causal_block_size=cbs,
                          overlap_history=17, addnoise_condition=20)
    return DFSettings(num_steps=30, shift=8.0, base_num_frames=97, ar_step=ar_step, causal_block_size=cbs,
                      overlap_history=17, addnoise_condition=20)


def run_skyreels(dit, vae, settings, *, mode: str, num_frames: int, latent_hw: tuple[int, int], device,
                 guidance: float = 6.0) -> DFResult:
    """Generate `num_frames` pixel frames with the DF sampler (the streaming-dit DF mode's model calls)."""
    import torch

    from lvstudio.sampling.df_sampler import SkyReelsDFSampler, latent_frames
    from lvstudio.sampling.skyreels_df import skyreels_conditioning, skyreels_denoiser

    cfg = dit.cfg
    gen = torch.Generator(device=device).manual_seed(0)
    cond = skyreels_conditioning(dit, torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen, device=device), 24)
    uncond = skyreels_conditioning(dit, torch.randn(1, cfg.text_len, cfg.text_dim, generator=gen, device=device), 24)
    denoise = skyreels_denoiser(dit, cond, uncond, guidance, causal_block_size=settings.causal_block_size)
    sampler = SkyReelsDFSampler(settings, (1, cfg.out_dim, *latent_hw), latent_frames(num_frames),
                                generator=torch.Generator().manual_seed(1),
                                condition_generator=torch.Generator().manual_seed(2), device=device)
    decoder = vae.streaming_decoder() if vae is not None else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    frames = calls = 0
    first = steady_t0 = None
    steady_frames = 0
    decode_time = 0.0
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        while not sampler.done:
            if sampler.segment_index == 1 and sampler.iteration == 0 and steady_t0 is None:
                _sync(device)
                steady_t0 = time.perf_counter()
            chunks = sampler.step(denoise)
            calls += 1
            for chunk in chunks:
                t1 = time.perf_counter()
                n = int(decoder.decode(chunk.latents).shape[2]) if decoder is not None else \
                    4 * chunk.num_frames - (3 if chunk.start == 0 else 0)
                _sync(device)
                decode_time += time.perf_counter() - t1
                frames += n
                if steady_t0 is not None:
                    steady_frames += n
                if first is None:
                    first = time.perf_counter() - t0
    _sync(device)
    total = time.perf_counter() - t0
    steady_s = time.perf_counter() - steady_t0 if steady_t0 is not None else 0.0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0
    return DFResult(mode, frames, calls, first or float("nan"), frames / total,
                    steady_frames / steady_s if steady_s > 0 else float("nan"), peak, decode_time / total)


def skyreels_main(args, device, dtype) -> int:
    """--skyreels: the DF modes (async as the preset ships, and sync)."""
    import torch

    from lvstudio.models.wan_dit import CONFIGS, WanDiT, WanDiTConfig

    height, width = (64, 64) if args.tiny else (544, 960)
    latent_hw = (height // 8, width // 8)
    torch.manual_seed(0)
    base = WanDiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, freq_dim=32, text_dim=64, text_len=16) \
        if args.tiny else CONFIGS["wan2.1-t2v-1.3b"]
    cfg = WanDiTConfig.from_dict({**base.to_dict(), "inject_sample_info": True})
    with torch.device(device):
        dit = WanDiT(cfg)
    dit = dit.to(dtype).eval().requires_grad_(False)
    _, vae = build(args.tiny, device, dtype, with_vae=not args.no_vae) if not args.no_vae else (None, None)
    num_frames = args.df_frames or (77 if args.tiny else 177)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test, not a measurement)"
    print(f"device: {gpu}; SkyReels-V2 DF DiT {sum(p.numel() for p in dit.parameters()) / 1e9:.2f} B params, "
          f"{dtype}; {width}x{height} (latent {latent_hw[0]}x{latent_hw[1]}); {num_frames} frames at 24 fps; CFG 6; "
          f"VAE decode: {'no' if args.no_vae else 'yes'}; torch {torch.__version__}")
    results = []
    for mode, ar_step in (("skyreels-df async 5/5", 5), ("skyreels-df sync", 0)):
        results.append(run_skyreels(dit, vae, skyreels_settings(args.tiny, ar_step), mode=mode,
                                    num_frames=num_frames, latent_hw=latent_hw, device=device))
    print(f"{'mode':<24} {'frames':>6} {'calls':>5} {'first frames s':>14} {'frames/s':>9} {'fps steady':>10} "
          f"{'peak GiB':>8} {'decode %':>8}")
    for r in results:
        print(f"{r.mode:<24} {r.pixel_frames:>6} {r.calls:>5} {r.first_chunk_s:>14.3f} {r.fps:>9.2f} "
              f"{r.fps_steady:>10.2f} {r.peak_mem_gib:>8.2f} {100 * r.decode_share:>7.1f}%")
    print(f"async / sync: speed x{results[0].fps / results[1].fps:.2f}, "
          f"first frames x{results[0].first_chunk_s / results[1].first_chunk_s:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": gpu, "dtype": str(dtype), "width": width, "height": height,
                                         "vae": not args.no_vae, "results": [asdict(r) for r in results]}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=14,
                    help="blocks per mode (14 = 42 latent frames: past the 21-frame window and the LongLive switch)")
    ap.add_argument("--window", type=int, default=21, help="rolling window of the Self-Forcing / CausVid mode")
    ap.add_argument("--switch-block", type=int, default=None,
                    help="LongLive mode: block where the prompt switches and the window is re-cached "
                         "(default: half way, once the 12-frame window is full)")
    ap.add_argument("--recache-attention", choices=["bidirectional", "block-causal"], default="bidirectional",
                    help="how the re-cached window attends to itself (upstream LongLive: bidirectional)")
    ap.add_argument("--global", dest="with_global", action="store_true",
                    help="also run global attention (grows without bound; upstream Self-Forcing's 21-frame horizon)")
    ap.add_argument("--block-frames", type=int, default=3)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--no-vae", action="store_true", help="time the DiT only")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up blocks per mode")
    ap.add_argument("--allow-cpu", action="store_true", help="run on the CPU when no GPU (smoke test only)")
    ap.add_argument("--tiny", action="store_true", help="tiny DiT/VAE and 64x64 (smoke test of the code path)")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--skyreels", action="store_true", help="SkyReels-V2 DF 1.3B at the preset's settings instead")
    ap.add_argument("--df-frames", type=int, default=None,
                    help="--skyreels: pixel frames (default 177 = 2 segments; tiny: 77 = 3 segments)")
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("wan_speed: no CUDA GPU found — nothing measured. This benchmark needs one NVIDIA GPU (bf16) to "
              "compare with Self-Forcing's 17 FPS on one H100; run it on a GPU machine "
              "(`--allow-cpu --tiny` only smoke-tests the code path).")
        return 0
    n = args.block_frames
    if args.blocks < 1 or n < 1 or args.window < n:
        print(f"wan_speed: need --blocks >= 1 and --window >= --block-frames (got {args.blocks}, {args.window}, {n})",
              file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.skyreels:
        return skyreels_main(args, device, dtype)
    height, width = (64, 64) if args.tiny else (args.height, args.width)
    if height % 16 or width % 16:
        print(f"wan_speed: {width}x{height} is not a multiple of 16", file=sys.stderr)
        return 2
    latent_hw = (height // 8, width // 8)
    dit, vae = build(args.tiny, device, dtype, with_vae=not args.no_vae)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (smoke test, not a measurement)"
    params = sum(p.numel() for p in dit.parameters()) / 1e9
    print(f"device: {gpu}; DiT {params:.2f} B params, {dtype}; {width}x{height} (latent {latent_hw[0]}x{latent_hw[1]},"
          f" {latent_hw[0] * latent_hw[1] // 4} tokens/frame); block {n}; 4 steps; VAE decode: "
          f"{'no' if args.no_vae else 'yes'}; torch {torch.__version__}")
    switch = args.switch_block if args.switch_block is not None else max(args.blocks // 2, steady_from(12, n) + 1)
    modes: list[tuple[str, int | None, int, int | None]] = [
        (f"window{args.window}", args.window, 0, None),
        ("longlive window12+sink3", 12, 3, switch),
    ]
    if args.with_global:
        modes.insert(0, ("global", None, 0, None))
    results: list[ModeResult] = []
    for name, window, sink, switch_block in modes:
        kw = {"mode": name, "window": window, "sink": sink, "block_frames": n, "latent_hw": latent_hw,
              "device": device, "recache_attention": args.recache_attention}
        if args.warmup:
            run_mode(dit, vae, blocks=args.warmup, **kw)
        results.append(run_mode(dit, vae, blocks=args.blocks, seed=1, switch_block=switch_block, **kw))
    print(f"{'mode':<24} {'blocks':>6} {'frames':>6} {'first block s':>13} {'frames/s':>9} {'fps after 1st':>13} "
          f"{'steady from':>11} {'fps steady':>10} {'re-cache s':>10} {'masks':>5} {'peak GiB':>8} {'KV MiB':>8} "
          f"{'decode %':>8}")
    for r in results:
        steady = "-" if r.steady_from_block is None else f"block {r.steady_from_block}"
        recache = "-" if r.switch_block is None else f"{r.recache_s:.3f}"
        print(f"{r.mode:<24} {r.blocks:>6} {r.pixel_frames:>6} {r.first_block_s:>13.3f} {r.fps:>9.2f} "
              f"{r.fps_after_first:>13.2f} {steady:>11} {r.fps_steady:>10.2f} {recache:>10} {r.masks_steady:>5} "
              f"{r.peak_mem_gib:>8.2f} {r.kv_cache_mib:>8.1f} {100 * r.decode_share:>7.1f}%")
    short = [r.mode for r in results if r.window_frames is not None and r.steady_from_block is None]
    if short:
        print(f"note: {', '.join(short)} never reached a full window; use more --blocks for the steady state")
    if device.type == "cuda" and not args.tiny:
        print(f"reference: Self-Forcing paper {SELF_FORCING_FPS_H100:.0f} FPS on one H100 (their code, bf16); "
              "steady-state ratio to it: "
              + ", ".join(f"{r.mode} {r.fps_steady / SELF_FORCING_FPS_H100:.2f}x" for r in results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"device": gpu, "dtype": str(dtype), "width": width, "height": height,
                                         "vae": not args.no_vae, "results": [asdict(r) for r in results]}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
