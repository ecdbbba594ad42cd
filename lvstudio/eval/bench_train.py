"""`lvstudio bench train CONFIG`: what a diffusion-forcing step costs in each `precision`, side by side in one run.

The step is the recipe's own (`df_loss`, then `optimizer_step`: backward, clipping, AdamW) on the config's model
and batch size; the latents are random (speed does not depend on them) and the captions the world's. The precisions
take turns, step by step, so a machine whose load changes slows them alike; the median per precision is reported
with its ratio to the first.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch

from lvstudio.train.data import Batch
from lvstudio.train.diffusion_forcing import DFConfig, build_model, df_loss
from lvstudio.train.loop import forward_precision, optimizer_step


@dataclass
class TrainBench:
    config: str
    params: int
    windows: int  # per step (the config's batch_size)
    threads: int
    ms: dict[str, list[float]]  # precision -> milliseconds of each timed step

    def lines(self) -> list[str]:
        first = next(iter(self.ms))
        base = statistics.median(self.ms[first])
        out = [f"train bench: {self.config}, {self.params / 1e6:.2f} M parameters, {self.windows} windows per step, "
               f"{self.threads} thread(s), {len(self.ms[first])} timed steps per precision (taking turns)",
               "  precision    median ms/step   min ms   speed vs " + first]
        for name, times in self.ms.items():
            med = statistics.median(times)
            out.append(f"  {name:<10} {med:>14.1f} {min(times):>8.1f}   x{base / med:.2f}")
        return out


def run_train_bench(cfg: DFConfig, config_name: str, steps: int = 6, threads: int = 1,
                    precisions: tuple[str, ...] = ("float32", "bfloat16")) -> TrainBench:
    """Time `steps` DF steps per precision (after one untimed warm-up each), alternating."""
    from lvstudio.checked_files import WEIGHTS_HINT, read_metadata
    from lvstudio.models.tiny_vae import TinyVAEConfig
    from lvstudio.world import vocabulary

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    channels = TinyVAEConfig.from_json(read_metadata(cfg.vae, hint=WEIGHTS_HINT)["config"]).z_dim
    model = build_model(cfg.model_copy(update={"init_dit": None, "init_text": None}), vocabulary(), channels)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    # Step 1: one batch of random latents at the config's shape (the tiny VAEs downsample 8x), ~5 % object pixels.
    g = torch.Generator().manual_seed(0)
    b, f, h = cfg.batch_size, cfg.latent_frames, cfg.size // 8
    batch = Batch(x0=torch.randn(b, channels, f, h, h, generator=g),
                  prompts=["a red ball bouncing over the sea at dusk"] * b, loss_mask=torch.ones(b, f),
                  objects=(torch.rand(b, f, h, h, generator=g) < 0.05).float())
    # Step 2: the precisions take turns; the first round is not timed.
    ms: dict[str, list[float]] = {p: [] for p in precisions}
    for i in range(steps + 1):
        for p in precisions:
            t0 = time.perf_counter()
            with forward_precision(p, torch.device("cpu")):
                loss = df_loss(model, batch, cfg, torch.Generator().manual_seed(i))
            optimizer_step(opt, loss, model.parameters(), cfg.grad_clip)
            if i:  # the first round warms up
                ms[p].append((time.perf_counter() - t0) * 1000)
    params = sum(p.numel() for p in model.parameters())
    return TrainBench(config_name, params, cfg.batch_size, threads, ms)
