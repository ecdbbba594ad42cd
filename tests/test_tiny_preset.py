"""The shipped tiny preset: loads offline, knows the world's vocabulary, renders the demo storyboard."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lvstudio.video import probe_video

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_preset_loads_and_knows_the_world_vocabulary() -> None:
    from lvstudio.bundle import load_bundle
    from lvstudio.train.world import vocabulary

    bundle = load_bundle("tiny")
    assert set(vocabulary()) <= set(bundle.text.model.cfg.vocab)
    with pytest.warns(UserWarning, match="'purplish'"):
        bundle.text.encode(["a purplish ball on the grass"])
    assert bundle.text.unknown_words("a red ball on the moon") == ["moon"]
    n = sum(p.numel() for p in bundle.dit.parameters())
    assert 1e6 < n < 2e7


def test_demo_storyboard_renders_with_the_tiny_preset(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "demo.mp4"
    r = subprocess.run([sys.executable, "-m", "lvstudio", "render", str(ROOT / "storyboards" / "demo.toml"), "--out",
                        str(out), "--duration", "5s", "--no-progress"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    info = probe_video(out)
    assert (info.codec, info.pix_fmt, info.width, info.height, info.num_frames) == ("h264", "yuv420p", 128, 128, 80)
