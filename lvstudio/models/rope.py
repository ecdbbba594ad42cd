"""Wan's 3D rotary position embedding (reference mechanisms §1.5), shared by the DiT and its KV cache.

head_dim is split into time / height / width parts (44/42/42 real dims for head_dim 128); each part rotates adjacent
pairs (x[2j], x[2j+1]) by angle p * theta^(-2j/dim) for its own position p. Only the *difference* of query and key
positions reaches the attention logits, which is what lets the KV cache store keys already rotated at absolute
positions and translate a whole window at once (see `lvstudio.models.kv_cache`).
"""

from __future__ import annotations

import torch
from torch import Tensor


class Rope3D:
    """3D rotary embedding: head_dim split into time/height/width parts (44/42/42 for head_dim 128), adjacent pairs.

    Angles for any position are computed on demand in float64, so positions past the checkpoint's table are
    representable; `WanDiT` refuses them in absolute mode because the checkpoints never saw them.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        hw = 2 * (head_dim // 6)
        self.dims = (head_dim - 2 * hw, hw, hw)  # real dims per axis, each even
        self.theta = theta

    def _angles(self, pos: Tensor, dim: int) -> Tensor:
        # pos [N] -> [N, dim/2] angles p * theta^(-2j/dim)
        j = torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device)
        return pos.to(torch.float64)[:, None] * torch.pow(self.theta, -j / dim)

    def rotation(self, frame_pos: Tensor, height: int, width: int) -> Tensor:
        """Rotation for tokens laid out frame-major: frame_pos [F] -> complex64 [F*height*width, 1, head_dim/2]."""
        dt, dh, dw = self.dims
        dev = frame_pos.device
        a_t = self._angles(frame_pos, dt)  # [F, dt/2]
        a_h = self._angles(torch.arange(height, device=dev), dh)  # [H, dh/2]
        a_w = self._angles(torch.arange(width, device=dev), dw)  # [W, dw/2]
        f, h, w = a_t.shape[0], height, width
        ang = torch.cat(
            [
                a_t[:, None, None].expand(f, h, w, -1),
                a_h[None, :, None].expand(f, h, w, -1),
                a_w[None, None, :].expand(f, h, w, -1),
            ],
            dim=-1,
        ).reshape(f * h * w, 1, -1)
        return torch.complex(torch.cos(ang).float(), torch.sin(ang).float())


def apply_rope(x: Tensor, rot: Tensor) -> Tensor:
    """Rotate adjacent pairs (x[2j], x[2j+1]) as complex numbers. x [B, L, heads, head_dim]; rot [L, 1, head_dim/2].

    (x1 + i x2)(cos + i sin) = (x1 cos - x2 sin) + i (x1 sin + x2 cos), computed in float32, cast back to x's dtype.
    """
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())  # [B, L, heads, head_dim/2]
    return torch.view_as_real(xc * rot).flatten(-2).type_as(x)
