"""The CLIP image encoder of Wan2.1 image-to-video: ViT-H/14 penultimate-layer tokens (257 x 1280 at 224 px).

Wan2.1 I2V reads its conditioning image through open-clip's XLM-RoBERTa ViT-H/14 visual tower and keeps the output of
block 31 of 32 (`use_31_block=True`): 256 patch tokens + the CLS token, width 1280. The Diffusers-layout repos ship
that tower as a transformers `CLIPVisionModel(WithProjection)` in `image_encoder/` (safetensors) with its
`CLIPImageProcessor` in `image_processor/`; `hidden_states[-2]` of that model is the same tensor. The DiT projects
these tokens with `img_emb` and attends to them through `k_img` / `v_img` (lvstudio.models.wan_dit.CrossAttention).

Two preprocessings exist and they differ, so a caller picks the one its reference uses:
  "wan"        official Wan / DiffSynth / Stable Video Infinity: the whole [-1, 1] frame is resized to 224x224
               (bicubic, no crop: the aspect ratio is not kept), mapped to [0, 1] and normalised with CLIP mean/std.
  "processor"  diffusers' WanImageToVideoPipeline: the frame goes to the repo's CLIPImageProcessor as 8-bit RGB
               (shortest side to 224, bicubic, centre crop 224, rescale, normalise) — the sides of a wide frame
               are cropped away.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from lvstudio.errors import PresetError

ClipPreprocess = Literal["wan", "processor"]
# OpenAI CLIP statistics (also laion ViT-H/14's and Wan's `clip.py`), used when no processor config is given.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipVisionEncoder:
    """transformers CLIP vision tower + its image processor; frames in [-1, 1] -> Wan's CLIP image tokens."""

    def __init__(self, model: Any, processor: Any | None, device: torch.device) -> None:
        self.model = model
        self.processor = processor
        self.device = device
        cfg = model.config
        self.dim = int(cfg.hidden_size)  # 1280 for ViT-H/14
        self.image_size = int(cfg.image_size)  # 224
        self.num_tokens = (self.image_size // int(cfg.patch_size)) ** 2 + 1  # 257
        mean = getattr(processor, "image_mean", None) or CLIP_MEAN
        std = getattr(processor, "image_std", None) or CLIP_STD
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def preprocess(self, frames: Tensor, mode: ClipPreprocess = "wan") -> Tensor:
        """frames [B, 3, H, W] in [-1, 1] -> pixel_values [B, 3, S, S] float32 (S = the model's image size)."""
        if frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be [B, 3, H, W] in [-1, 1], got {tuple(frames.shape)}")
        if mode == "wan":
            x = F.interpolate(frames.float().cpu(), size=(self.image_size, self.image_size), mode="bicubic",
                              align_corners=False)
            return (x * 0.5 + 0.5 - self.mean) / self.std
        if mode == "processor":
            if self.processor is None:
                raise ValueError("preprocess='processor' needs the repo's image processor (image_processor/)")
            # 8-bit RGB HWC, the form a PIL image reaches the processor in (diffusers passes the PIL image).
            u8 = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            images = [img.permute(1, 2, 0).cpu().numpy() for img in u8]
            return self.processor(images=images, return_tensors="pt")["pixel_values"].float()
        raise ValueError(f"preprocess must be 'wan' or 'processor' (got {mode!r})")

    @torch.no_grad()
    def encode(self, frames: Tensor, preprocess: ClipPreprocess = "wan") -> Tensor:
        """frames [B, 3, H, W] in [-1, 1] -> CLIP tokens [B, num_tokens, dim] (float32, on `self.device`)."""
        pixels = self.preprocess(frames, preprocess).to(self.device, self.dtype)
        out = self.model(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-2].float()  # the penultimate block, as Wan's use_31_block


def load_clip_vision(encoder_dir: Path, processor_dir: Path | None, *, device: torch.device,
                     dtype: torch.dtype = torch.float32) -> ClipVisionEncoder:
    """Load the CLIP vision tower (safetensors only, no network) and its image processor from Diffusers-layout folders.

    Wan and SVI run this encoder in float32 (it is small: ~0.63 B parameters); `dtype` can lower it.
    """
    from transformers import CLIPImageProcessor, CLIPVisionModel

    encoder_dir = Path(encoder_dir)
    if not (encoder_dir / "config.json").is_file() or not any(encoder_dir.glob("*.safetensors")):
        raise PresetError(f"{encoder_dir} holds no CLIP image encoder (config.json + *.safetensors)",
                          hint="pull the preset again (`lvstudio presets pull NAME --force`); pickled .bin files are "
                               "not read")
    processor = None
    if processor_dir is not None:
        if not (Path(processor_dir) / "preprocessor_config.json").is_file():
            raise PresetError(f"{processor_dir} has no preprocessor_config.json",
                              hint="pull the preset again (`lvstudio presets pull NAME --force`)")
        processor = CLIPImageProcessor.from_pretrained(str(processor_dir), local_files_only=True)
    try:
        # A CLIPVisionModelWithProjection checkpoint loads into CLIPVisionModel (the unused projection is skipped).
        model = CLIPVisionModel.from_pretrained(str(encoder_dir), dtype=dtype, local_files_only=True,
                                                use_safetensors=True)
    except (OSError, ValueError) as err:
        raise PresetError(f"cannot load the CLIP image encoder from {encoder_dir}: {str(err).splitlines()[0]}",
                          hint="pull the preset again (`lvstudio presets pull NAME --force`)") from None
    model.train(False).requires_grad_(False).to(device)
    return ClipVisionEncoder(model, processor, device)
