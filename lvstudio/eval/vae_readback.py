"""`lvstudio eval vae`: what a VAE keeps of the world — held-out world clips through encode → decode, read back by
the oracle (scene, colour, shape, exactly-the-prompted-objects, as `eval adherence` scores generated video), with
the PSNR of the reconstruction and the decoder's time per second of video.

The originals read back at 100 % on every key (the oracle is exact on world frames), so the figures are what the VAE
loses. The clips (seeds 20,000 on) are not among the training seeds of the VAE recipe's eval batches or the latent
dataset (0 to dataset_clips - 1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

HELD_OUT_SEED = 20_000


@dataclass
class VaeReadback:
    clips: int
    frames: int
    adherence: dict[str, float]  # oracle keys (ADHERENCE_KEYS) over every reconstructed frame
    psnr_db: float  # of the reconstruction in [0, 255], over all frames
    decode_ms_per_second: float  # decoder wall time per second of 16-fps video (one thread unless set otherwise)
    by_shape: dict[str, float] = field(default_factory=dict)  # shape read-back per prompted shape
    by_motion: dict[str, float] = field(default_factory=dict)  # shape read-back per motion of the primary object

    def lines(self) -> list[str]:
        keys = " ".join(f"{k} {100 * v:.1f}%" for k, v in self.adherence.items())
        shapes = " ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(self.by_shape.items()))
        motions = ", ".join(f"{k} {100 * v:.0f}%" for k, v in sorted(self.by_motion.items()))
        return [f"VAE read-back over {self.clips} held-out world clips x {self.frames} frames: {keys}",
                f"  shape by prompted shape: {shapes}",
                f"  shape by motion: {motions}",
                f"  PSNR {self.psnr_db:.2f} dB; decode {self.decode_ms_per_second:.0f} ms per video second"]


def vae_readback(vae_path: str | Path, clips: int = 60, frames: int = 17, switch_prob: float = 0.3,
                 size: int = 128, fps: int = 16) -> VaeReadback:
    """Encode and decode `clips` held-out world clips of `frames` frames (1 + 4k) with the tiny VAE at `vae_path`."""
    import numpy as np
    import torch

    from lvstudio.models.tiny_vae import load_vae
    from lvstudio.world import sample_clip
    from lvstudio.world.oracle import ADHERENCE_KEYS, frame_scores, read_frame

    if clips < 1 or frames < 1 or (frames - 1) % 4:
        raise ValueError(f"need clips >= 1 and frames = 1 + 4k, got clips={clips}, frames={frames}")
    vae = load_vae(vae_path).train(False)
    totals = dict.fromkeys(ADHERENCE_KEYS, 0)
    shape_hits: dict[str, list[int]] = {}
    motion_hits: dict[str, list[int]] = {}
    sq_err, n_values, decode_s, n_frames = 0.0, 0, 0.0, 0
    for i in range(clips):
        # Step 1: a held-out clip, through the VAE (decode timed on its own).
        clip = sample_clip(HELD_OUT_SEED + i, frames, size=size, switch_prob=switch_prob)
        video = torch.from_numpy(clip.frames).permute(3, 0, 1, 2)[None].float() / 127.5 - 1  # [1, 3, F, H, W]
        with torch.no_grad():
            z = vae.encode(video)
            t0 = time.perf_counter()
            recon = vae.decode(z)
            decode_s += time.perf_counter() - t0
        out = ((recon[0].permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        # Step 2: PSNR and the oracle's reading of every frame against the clip's ground truth.
        sq_err += float(((out.astype(np.float64) - clip.frames.astype(np.float64)) ** 2).sum())
        n_values += out.size
        for frame, spec in zip(out, clip.specs, strict=True):
            scores = frame_scores(read_frame(frame), spec)
            for k, ok in scores.items():
                totals[k] += ok
            shape_hits.setdefault(spec.objects[0].shape, []).append(int(scores["shape"]))
            motion_hits.setdefault(spec.objects[0].motion, []).append(int(scores["shape"]))
        n_frames += len(out)
    mse = sq_err / max(n_values, 1)
    psnr = float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)
    return VaeReadback(clips, frames, {k: v / n_frames for k, v in totals.items()}, float(psnr),
                       1000 * decode_s / (n_frames / fps), {k: sum(v) / len(v) for k, v in shape_hits.items()},
                       {k: sum(v) / len(v) for k, v in motion_hits.items()})
