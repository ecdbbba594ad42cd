"""One sampling step of Stable Video Infinity's DiT (Wan2.1-I2V-14B, random weights) on one CUDA GPU: resident and
streamed block by block.

Setting: the clip of the svi-*-14b presets, 81 frames at 480x832 (latents 21x60x104, 32 760 tokens), both guidance
rows in one DiT call (batch 2), bfloat16, the whole model cast with `.to(bfloat16)` (norm3 included). A step of the
50-step Euler sampler is one such call, so 50 x the step time is the DiT's share of a clip; the CLIP encode, the VAE
encode of the conditioning video and the decode of the clip come on top (not measured here: no diffusers on the GPU
machine).

Reported: what `plan_memory` chooses with the free memory found; the step time with every block resident; the step
time with the blocks streamed from pinned CPU memory as `plan_memory` plans them for a smaller budget
(`--stream-gb`), and that both give the same velocity bit for bit; peak memory of a step next to
`activation_bytes`' estimate; minutes per clip.

    python benchmarks/svi_speed.py                        # resident, then streamed at 24 GB
    python benchmarks/svi_speed.py --stream-gb 20 --timed 3 --json out/svi_speed.json
    python benchmarks/svi_speed.py --allow-cpu --tiny     # smoke test of the code path (tiny sizes, no GPU)

Without a CUDA GPU it says so and exits 0 (nothing is measured).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

STEPS = 50  # svi-*-14b: 50 Euler steps per clip
ENCODERS_GB = {"umt5": 11.4, "clip": 2.5, "vae": 2.3}  # bf16 umT5, fp32 CLIP ViT-H, VAE + decode (estimates)


def _timed(fn, device, n: int) -> tuple[float, object]:
    import torch

    out = fn()  # warm-up (kernel choice, first block copies)
    times = []
    for _ in range(n):
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize(device) if device.type == "cuda" else None
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stream-gb", type=float, default=24.0, help="GPU memory budget of the streamed run")
    ap.add_argument("--timed", type=int, default=2, help="timed calls per mode (after one warm-up)")
    ap.add_argument("--allow-cpu", action="store_true")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    import torch

    from lvstudio.models.offload import (
        BlockStreamer,
        activation_bytes,
        dit_footprint,
        gpu_free_bytes,
        plan_memory,
    )
    from lvstudio.models.wan_dit import CONFIGS, WanDiT, WanDiTConfig

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("no CUDA GPU: nothing measured (use --allow-cpu --tiny for a smoke test)")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.tiny:
        cfg = WanDiTConfig(model_type="i2v", dim=64, ffn_dim=128, num_heads=2, num_layers=4, in_dim=36, freq_dim=32,
                           text_dim=64, image_dim=32)
        f, h, w, text_len, clip_len = 3, 8, 8, 16, 9
    else:
        cfg = CONFIGS["wan2.1-i2v-14b"]
        f, h, w, text_len, clip_len = 21, 60, 104, 512, 257
    # Step 1: the model with random weights, cast whole (the norm3 of every block in bf16 too).
    torch.manual_seed(0)
    with torch.device(device):
        dit = WanDiT(cfg)
    dit = dit.to(dtype).eval().requires_grad_(False)
    fp, act = dit_footprint(cfg, dtype), activation_bytes(cfg, (f, h, w), 2, dtype)
    free = gpu_free_bytes(device)
    enc = {k: int(v * 1e9) for k, v in ENCODERS_GB.items()}
    found = plan_memory((free or 0) + fp.total_bytes if cuda else None, fp, act, enc, device=str(device))
    g = torch.Generator(device="cpu").manual_seed(1)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    x, y = rnd(2, 16, f, h, w), rnd(2, 20, f, h, w)
    t = torch.full((2,), 937.5, device=device)
    cond = dit.new_conditioning(rnd(2, text_len, cfg.text_dim), rnd(2, clip_len, cfg.image_dim), y)
    # Step 2: resident.
    with torch.no_grad():
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        resident_s, v_res = _timed(lambda: dit(x, t, cond), device, args.timed)
        peak = (torch.cuda.max_memory_allocated(device) - base) if cuda else 0
        # Step 3: streamed as planned for a smaller budget.
        plan = plan_memory(int(args.stream_gb * 1e9) if cuda else 10**12, fp, act, enc, device=str(device))
        streamer = BlockStreamer(dit, device, plan.resident_blocks if plan.mode == "stream" else fp.num_blocks // 2)
        stream_s, v_str = _timed(lambda: dit(x, t, cond), device, args.timed)
        same = bool(torch.equal(v_res, v_str))
        streamer.detach()
    report = {
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu", "dtype": str(dtype), "tiny": args.tiny,
        "tokens": f * (h // 2) * (w // 2), "rows": 2, "dit_gb": fp.total_bytes / 1e9,
        "plan_at_free_memory": found.message, "resident_step_s": resident_s,
        "resident_min_per_clip_dit": STEPS * resident_s / 60, "peak_step_gb": peak / 1e9,
        "activation_estimate_gb": act / 1e9, "stream_budget_gb": args.stream_gb, "stream_plan": plan.message,
        "stream_resident_blocks": streamer.resident_blocks, "stream_step_s": stream_s,
        "stream_min_per_clip_dit": STEPS * stream_s / 60, "stream_fetches": streamer.fetches,
        "stream_equals_resident": same, "finite": bool(torch.isfinite(v_res.float()).all()),
    }
    for k, v in report.items():
        print(f"{k:28s} {v:.3f}" if isinstance(v, float) else f"{k:28s} {v}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0 if same and report["finite"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
