"""Training step time of every recipe on this machine, measured one after the other in one process.

    python benchmarks/train_steps.py                 # 12 steps each (the first 4 are warm-up), 1 torch thread
    python benchmarks/train_steps.py --steps 20 --threads 2

Each recipe runs from its shipped config in presets/tiny/ (same model sizes and batch sizes, one process), on the
same latent dataset: runs/tiny_df/latents.safetensors when it exists, else 48 world clips encoded here. Time per step
comes from the recipe's own train log (`sec_per_step` over the steps after the warm-up), so data loading, the
forward/backward passes, optimiser, EMA and (for ERFT) the replay memory are all included; checkpoints are not
(they are written after the measured steps). Ratios are against diffusion forcing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "presets" / "tiny"

# (label, module, config class, function, config file, overrides)
RECIPES: tuple[tuple[str, str, str, str, str, dict], ...] = (
    ("diffusion-forcing", "diffusion_forcing", "DFConfig", "train_diffusion_forcing", "train_df.toml",
     {"init_dit": str(TINY / "dit.safetensors"), "init_text": str(TINY / "text.safetensors")}),
    ("streaming", "streaming", "StreamConfig", "train_streaming", "train_stream.toml", {}),
    ("erft (LoRA)", "erft", "ERFTConfig", "train_erft", "train_erft.toml", {"latents": None}),
    ("self-forcing (DMD)", "self_forcing", "SelfForcingConfig", "train_self_forcing", "train_sf.toml",
     {"init_dit": str(TINY / "dit.safetensors")}),
    ("mixed-history", "self_forcing", "SelfForcingConfig", "train_self_forcing", "train_sf.toml",
     {"init_dit": str(TINY / "dit.safetensors"), "mode": "mixed-history", "batch_size": 8}),
)


def _dataset(tmp: Path):  # noqa: ANN202 - LatentDataset
    from lvstudio.models.tiny_vae import load_vae
    from lvstudio.train.data import LatentDataset, encode_world_dataset

    shipped = ROOT / "runs" / "tiny_df" / "latents.safetensors"
    if shipped.exists():
        return LatentDataset.load(shipped), shipped
    vae = load_vae(TINY / "vae.safetensors").train(False)
    data = encode_world_dataset(vae, 48, 7, 128, 0.3, seed=0, batch=4)
    path = tmp / "latents.safetensors"
    data.save(path)
    return data, path


def measure(steps: int, warmup: int, threads: int) -> list[tuple[str, float]]:
    import importlib

    import torch

    from lvstudio.train.common import load_config

    torch.set_num_threads(threads)
    out: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data, data_path = _dataset(tmp)
        for label, module, cls_name, fn_name, toml, overrides in RECIPES:
            mod = importlib.import_module(f"lvstudio.train.{module}")
            cfg = load_config(TINY / toml, getattr(mod, cls_name))
            update = {"out_dir": str(tmp / label.split()[0]), "steps": steps, "log_every": warmup,
                      "ckpt_every": 10**6, "threads": threads, "warmup_steps": 0, **overrides}
            if "latents" in type(cfg).model_fields:
                update["latents"] = str(data_path)
            cfg = cfg.model_copy(update=update)
            getattr(mod, fn_name)(cfg, progress=False, dataset=data)
            rows = [json.loads(line) for line in (Path(cfg.out_dir) / "train_log.jsonl").read_text().splitlines()]
            timed = [r["sec_per_step"] for r in rows if r["step"] > warmup]
            out.append((f"{label} (batch {cfg.batch_size})", sum(timed) / len(timed)))
            print(f"  {out[-1][0]:34s} {out[-1][1]:.3f} s/step", file=sys.stderr, flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must be larger than --warmup")
    results = measure(args.steps, args.warmup, args.threads)
    base = results[0][1]
    print(f"training step time, one process, {args.threads} torch thread(s), steps {args.warmup + 1}..{args.steps}:")
    for label, sec in results:
        print(f"  {label:34s} {sec:6.3f} s/step   x{sec / base:.2f} vs diffusion forcing")


if __name__ == "__main__":
    main()
