"""`lvstudio bench train`: a diffusion-forcing step timed in each precision, taking turns."""

from __future__ import annotations

from pathlib import Path

import pytest

from lvstudio.eval.bench_train import run_train_bench
from tests.helpers.df_tiny import tiny_cfg
from tests.helpers.random_preset import write_random_preset


@pytest.mark.slow
def test_both_precisions_are_timed_in_turns_and_compared(tmp_path: Path) -> None:
    preset = write_random_preset(tmp_path / "p")  # its VAE (z_dim 4) gives the latent shape
    cfg = tiny_cfg(str(tmp_path / "run"), vae=str(preset.parent / "vae.safetensors"), size=32, batch_size=2)
    bench = run_train_bench(cfg, "df.toml", steps=2)
    assert list(bench.ms) == ["float32", "bfloat16"] and all(len(v) == 2 and min(v) > 0 for v in bench.ms.values())
    lines = bench.lines()
    assert lines[0].startswith("train bench: df.toml,") and "2 windows per step" in lines[0]
    assert lines[2].split()[0] == "float32" and lines[2].endswith("x1.00")
    assert lines[3].split()[0] == "bfloat16" and lines[3].split()[-1].startswith("x")
