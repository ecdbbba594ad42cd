"""A tiny preset's `dtype` / `vae_dtype` are honoured on the CPU (bfloat16 halves the DiT's matmul time on CPUs with
AVX-512 BF16 or AMX, and is emulated several times slower than float32 on the others): the shipped tiny sets both to
`bfloat16-if-native`, so it runs bfloat16 where the CPU computes it and float32 elsewhere."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from lvstudio.backends import make_backend
from lvstudio.prompt_stream import PromptStreamBuffer

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # the trained tiny weights


def _preset_copy(tmp_path: Path) -> Path:
    """presets/tiny without its dtype choices."""
    folder = tmp_path / "tiny-copy"
    folder.mkdir()
    for name in ("dit.safetensors", "text.safetensors", "vae.safetensors"):
        shutil.copy(ROOT / "presets" / "tiny" / name, folder / name)
    lines = (ROOT / "presets" / "tiny" / "preset.toml").read_text().splitlines()
    text = "\n".join(line for line in lines if not line.startswith(("dtype =", "vae_dtype =")))  # the shipped choice
    (folder / "preset.toml").write_text(text.replace('name = "tiny"', 'name = "tiny-copy"', 1))
    return folder / "preset.toml"


def _first_chunk(bundle) -> np.ndarray:  # noqa: ANN001 - a ModelBundle
    buf = PromptStreamBuffer(bundle.text.encode, block_latents=bundle.preset.attention.block_frames,
                             fps=bundle.preset.fps)
    buf.add_shot(0.0, "a red ball resting in the sky")
    return make_backend("causal-kv", bundle, buf, seed=3, width=64, height=64).step().frames


def test_tiny_preset_precision_follows_dtype_and_vae_dtype(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lvstudio.presets import load_bundle

    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    plain_cpu = load_bundle("tiny")  # bfloat16-if-native on a CPU without bfloat16 arithmetic: float32
    assert next(plain_cpu.dit.parameters()).dtype == torch.float32
    assert next(plain_cpu.vae.parameters()).dtype == torch.float32
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    shipped = load_bundle("tiny")  # ... and on one with AVX512-BF16: bfloat16 (preset.toml: dtype, vae_dtype)
    assert next(shipped.dit.parameters()).dtype == torch.bfloat16
    assert next(shipped.vae.parameters()).dtype == torch.bfloat16
    default = load_bundle(str(_preset_copy(tmp_path)))  # without them: float32 on a CPU ("auto")
    assert next(default.dit.parameters()).dtype == torch.float32
    assert next(default.vae.parameters()).dtype == torch.float32
    assert next(shipped.text.model.parameters()).dtype == torch.float32  # word embeddings: nothing to gain
    # The same video up to bfloat16 rounding: under one level (of 255) of difference per pixel on average.
    a, b = _first_chunk(default).astype(np.float32), _first_chunk(shipped).astype(np.float32)
    assert a.shape == b.shape
    assert 0.0 < np.abs(a - b).mean() < 2.0
