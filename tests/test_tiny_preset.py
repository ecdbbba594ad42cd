"""The shipped tiny preset: loads offline, knows the world's vocabulary, renders the demo storyboard."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lvstudio.video import probe_video

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # subprocess renders and the trained preset


def test_tiny_preset_loads_and_knows_the_world_vocabulary() -> None:
    from lvstudio.presets.load import load_bundle
    from lvstudio.world import vocabulary

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


@pytest.mark.parametrize(("story", "lora"), [("stream.toml", False), ("crossclip.toml", False),
                                            ("crossclip.toml", True)])
def test_backend_storyboards_render_playable_mp4(tmp_path: Path, story: str, lora: bool) -> None:
    """The streaming-DiT and cross-clip examples render end to end to H.264 (and, on random weights, a preset whose
    cross-clip backend merges an ERFT LoRA: the shipped presets have none since v1's tiny-erft was retired)."""
    from tests.helpers.random_preset import write_random_preset

    extra = ["--preset", str(write_random_preset(tmp_path / "with-lora", lora=True, size=128))] if lora else []
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "x.mp4"
    r = subprocess.run([sys.executable, "-m", "lvstudio", "render", str(ROOT / "storyboards" / story), "--out",
                        str(out), "--duration", "3s", "--no-progress", *extra], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    info = probe_video(out)
    assert (info.codec, info.pix_fmt, info.width, info.height, info.num_frames) == ("h264", "yuv420p", 128, 128, 48)


def test_tiny_preset_samples_in_three_renoised_steps_with_guidance_distilled_in() -> None:
    """The shipped DiT is the CFG-2 base guidance-distilled (train_gd.toml, then train_gd_words.toml): cfg_scale 1,
    one pass per step, 3 steps on Euler 3's grid (σ 1, 0.8, 0.5) re-noised in between, and it still draws the
    prompt: the right scene, colour and one object."""
    import numpy as np

    from lvstudio.eval.adherence import render_prompt
    from lvstudio.presets import load_preset
    from lvstudio.presets.load import load_bundle
    from lvstudio.world import ObjectSpec, SceneSpec
    from lvstudio.world.oracle import adherence

    p = load_preset("tiny")
    from lvstudio.sampling.flow_matching import sigma_grid, warp_steps

    assert (p.sampler.kind, p.sampler.cfg_scale) == ("few-step", 1.0)
    sigmas = [t / 1000 for t in warp_steps(p.sampler.step_list, p.sampler.shift)]
    assert sigmas == pytest.approx([float(s) for s in sigma_grid(3, 2.0)[:-1]], abs=1e-3)
    frames = render_prompt(load_bundle(p), "a red ball bouncing over the sea", 1.5, seed=1)
    assert frames.shape == (24, 128, 128, 3) and frames.dtype == np.uint8
    score = adherence(frames, SceneSpec("sea", (ObjectSpec("red", "ball", "bouncing"),)))
    assert score["scene"] > 0.8 and score["colour"] > 0.9, score
    assert score["objects"] > 0.5, score  # one ball, as v2 draws it (v1 drew a grid of blobs)
