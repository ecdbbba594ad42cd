"""Image statistics of generated frames, per frame: luminance, contrast, saturation, chroma, sharpness, vivid
pixels, colour histograms and their distance, flicker, and the grid artefacts a latent video model can grow
(blockiness on the 8-pixel latent grid, pixel checkerboards). numpy + opencv, no torch."""

from __future__ import annotations

import math

import numpy as np

HIST_BINS = 8  # per RGB channel: 512-bin colour histograms
GRID = 8  # pixels per latent cell (the VAE's spatial stride)


def _frames(frames: np.ndarray) -> np.ndarray:
    """Validate RGB frames [F, H, W, 3] (or one [H, W, 3]) as uint8."""
    if not isinstance(frames, np.ndarray) or frames.ndim not in (3, 4) or frames.shape[-1] != 3:
        raise ValueError(f"frames must be RGB [F, H, W, 3] or [H, W, 3], got {getattr(frames, 'shape', frames)}")
    if frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8, got {frames.dtype}")
    return frames[None] if frames.ndim == 3 else frames


def luminance(frames: np.ndarray) -> np.ndarray:
    """Rec. 601 luma in [0, 1]: [F, H, W, 3] uint8 -> [F, H, W] float32."""
    x = _frames(frames).astype(np.float32) * (1.0 / 255.0)
    return x[..., 0] * 0.299 + x[..., 1] * 0.587 + x[..., 2] * 0.114


def image_stats(frames: np.ndarray) -> dict[str, np.ndarray]:
    """Per-frame statistics of [F, H, W, 3] uint8 frames, each an array [F]:
    luminance (mean luma, 0..1), contrast (luma std), saturation (mean HSV saturation, 0..1), chroma (mean
    (max - min) / 255), sharpness (variance of the Laplacian of the luma in 0..255 units), vivid (fraction of
    pixels with chroma >= oracle.VIVID_CHROMA)."""
    import cv2

    from lvstudio.world.oracle import VIVID_CHROMA

    frames = _frames(frames)
    y = luminance(frames)  # [F, H, W]
    mx = frames.max(axis=-1).astype(np.int16)  # [F, H, W]
    mn = frames.min(axis=-1).astype(np.int16)
    chroma = mx - mn
    sat = np.where(mx > 0, chroma / np.maximum(mx, 1).astype(np.float32), 0.0)
    sharp = np.array([cv2.Laplacian(f * 255.0, cv2.CV_32F).var() for f in y], np.float64)
    return {
        "luminance": y.mean(axis=(1, 2)).astype(np.float64),
        "contrast": y.std(axis=(1, 2)).astype(np.float64),
        "saturation": sat.mean(axis=(1, 2)).astype(np.float64),
        "chroma": chroma.mean(axis=(1, 2)) / 255.0,
        "sharpness": sharp,
        "vivid": (chroma >= VIVID_CHROMA).mean(axis=(1, 2)).astype(np.float64),
        **grid_stats(y),
    }


def grid_stats(y: np.ndarray) -> dict[str, np.ndarray]:
    """Grid artefacts of luma frames y [F, H, W] in [0, 1], each an array [F]:
    blockiness = mean |step| across the lines of the 8-pixel latent grid / mean |step| everywhere else (about 1 for
    content without a grid, above 1 when latent cells show as tiles); checker = mean |2x2 checkerboard response|
    (x[i,j] - x[i,j+1] - x[i+1,j] + x[i+1,j+1]) / 2 in luma units: 1 for a full-contrast pixel checkerboard."""
    dx = np.abs(np.diff(y, axis=2))  # [F, H, W-1]: step between columns j and j+1
    dy = np.abs(np.diff(y, axis=1))  # [F, H-1, W]
    on_x = (np.arange(1, y.shape[2]) % GRID) == 0  # steps that cross a grid line
    on_y = (np.arange(1, y.shape[1]) % GRID) == 0
    grid = np.concatenate([dx[:, :, on_x].reshape(len(y), -1), dy[:, on_y, :].reshape(len(y), -1)], axis=1)
    rest = np.concatenate([dx[:, :, ~on_x].reshape(len(y), -1), dy[:, ~on_y, :].reshape(len(y), -1)], axis=1)
    blockiness = grid.mean(axis=1) / np.maximum(rest.mean(axis=1), 1e-6)
    checker = np.abs(y[:, :-1, :-1] - y[:, :-1, 1:] - y[:, 1:, :-1] + y[:, 1:, 1:]).mean(axis=(1, 2)) / 2.0
    return {"blockiness": blockiness.astype(np.float64), "checker": checker.astype(np.float64)}


def colour_histograms(frames: np.ndarray) -> np.ndarray:
    """Per-frame RGB histograms (HIST_BINS per channel) as pixel counts: [F, H, W, 3] uint8 -> [F, HIST_BINS**3]."""
    frames = _frames(frames)
    q = (frames.astype(np.int32) * HIST_BINS) >> 8  # [F, H, W, 3] in 0..HIST_BINS-1
    idx = (q[..., 0] * HIST_BINS + q[..., 1]) * HIST_BINS + q[..., 2]  # [F, H, W]
    bins = HIST_BINS**3
    offsets = np.arange(len(frames))[:, None] * bins
    flat = (idx.reshape(len(frames), -1) + offsets).ravel()
    return np.bincount(flat, minlength=len(frames) * bins).reshape(len(frames), bins).astype(np.float64)


def histogram_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Hellinger distance in [0, 1] between two histograms (counts or probabilities); NaN if either is empty."""
    sa, sb = float(np.sum(a)), float(np.sum(b))
    if sa <= 0 or sb <= 0:
        return float("nan")
    bc = float(np.sum(np.sqrt((np.asarray(a) / sa) * (np.asarray(b) / sb))))
    return math.sqrt(max(0.0, 1.0 - min(bc, 1.0)))


def frame_flicker(frames: np.ndarray, previous: np.ndarray | None = None) -> np.ndarray:
    """Mean absolute difference of each frame to the one before, in [0, 1] units: [F, H, W, 3] -> [F] (the first
    entry is NaN unless `previous` [H, W, 3] is given)."""
    frames = _frames(frames)
    x = frames.astype(np.float32) * (1.0 / 255.0)
    out = np.full(len(frames), np.nan)
    if len(frames) > 1:
        out[1:] = np.abs(np.diff(x, axis=0)).mean(axis=(1, 2, 3))
    if previous is not None:
        out[0] = float(np.abs(x[0] - previous.astype(np.float32) * (1.0 / 255.0)).mean())
    return out


