"""Diffusion Forcing recipe: a step reduces the loss, resume is exact, torchrun DDP works."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from lvstudio.train.data import latent_captions, sample_batch
from lvstudio.train.diffusion_forcing import build_model, df_loss, train_diffusion_forcing
from lvstudio.train.loop import forward_precision, step_generator
from tests.helpers.df_tiny import VOCAB, tiny_cfg, tiny_dataset

ROOT = Path(__file__).resolve().parents[1]


def test_latent_captions_follow_the_wan_frame_grouping() -> None:
    frames = ["a"] * 6 + ["b"] * 7  # switch at pixel frame 6: latent 1 = frames 1..4, latent 2 = frames 5..8 (mixed)
    assert latent_captions(frames, 4) == ["a", "a", "", "b"]


def test_switch_windows_mask_the_pre_switch_frames() -> None:
    cfg = tiny_cfg("unused", batch_size=64, cfg_dropout=0.0, first_window_prob=1.0)
    batch = sample_batch(tiny_dataset(), cfg, np.random.default_rng(0))
    for prompt, mask in zip(batch.prompts, batch.loss_mask, strict=True):
        if prompt == "a blue cube on the grass" and mask.sum() < 4:
            assert mask.tolist() == [0.0, 0.0, 0.0, 1.0]  # 2 pre-switch latents + 1 mixed latent carry no loss
            break
    else:
        pytest.fail("no switch window sampled")


def test_one_step_reduces_the_loss_on_a_fixed_batch() -> None:
    cfg = tiny_cfg("unused", cfg_dropout=0.0)
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB, 4)
    data = tiny_dataset()
    rng, _ = step_generator(0, 0, 0)
    batch = sample_batch(data, cfg, rng)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    before = df_loss(model, batch, cfg, torch.Generator().manual_seed(1))
    before.backward()
    opt.step()
    with torch.no_grad():
        after = df_loss(model, batch, cfg, torch.Generator().manual_seed(1))
    assert after.item() < before.item()


def test_bfloat16_forward_is_mixed_precision_and_still_learns() -> None:
    # Under precision = "bfloat16" the forward's matmuls run in bfloat16 (the loss moves a little, and stays
    # float32), the weights and their gradients stay float32, and a step still lowers the loss.
    cfg = tiny_cfg("unused", cfg_dropout=0.0, precision="bfloat16")
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB, 4)
    rng, _ = step_generator(0, 0, 0)
    batch = sample_batch(tiny_dataset(), cfg, rng)
    torch.nn.init.normal_(model.dit.head.head.weight, std=0.1)  # Wan zero-inits the head: v would be 0 either way
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    with torch.no_grad():
        full = df_loss(model, batch, cfg, torch.Generator().manual_seed(1))
    with forward_precision(cfg.precision, torch.device("cpu")):
        before = df_loss(model, batch, cfg, torch.Generator().manual_seed(1))
    assert before.dtype == torch.float32
    assert before.item() != full.item() and abs(before.item() - full.item()) < 0.02 * full.item()
    before.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    opt.step()
    with torch.no_grad(), forward_precision(cfg.precision, torch.device("cpu")):
        after = df_loss(model, batch, cfg, torch.Generator().manual_seed(1))
    assert after.item() < before.item()


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_resume_gives_the_same_next_losses(tmp_path: Path, precision: str) -> None:
    data = tiny_dataset()
    full = train_diffusion_forcing(tiny_cfg(str(tmp_path / "a"), steps=4, precision=precision), progress=False,
                                   dataset=data, vocabulary=VOCAB)
    train_diffusion_forcing(tiny_cfg(str(tmp_path / "b"), steps=2, precision=precision), progress=False,
                            dataset=data, vocabulary=VOCAB)
    resumed = train_diffusion_forcing(tiny_cfg(str(tmp_path / "b"), steps=4, precision=precision), progress=False,
                                      dataset=data, vocabulary=VOCAB)
    log_a = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    assert full["weights_sha256"] == resumed["weights_sha256"]
    assert (tmp_path / "b" / "dit.safetensors").exists() and (tmp_path / "b" / "text.safetensors").exists()
    assert not list((tmp_path / "b").glob(".*partial"))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(os.environ.get("LVSTUDIO_SKIP_DISTRIBUTED") == "1", reason="LVSTUDIO_SKIP_DISTRIBUTED=1")
def test_torchrun_two_processes(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "helpers" / "dist_df.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = (tmp_path / "rank0.txt").read_text().split()
    r1 = (tmp_path / "rank1.txt").read_text().split()
    assert r0[0] == r1[0] == "3"
    assert r0[1] == r1[1], "DDP ranks ended with different weights"
    assert (tmp_path / "checkpoint.safetensors").exists()


@pytest.mark.slow
def test_export_from_an_unfinished_run_writes_loadable_weights(tmp_path: Path) -> None:
    from lvstudio.models.tiny_text import load_text_encoder
    from lvstudio.presets.load import load_dit
    from lvstudio.train.diffusion_forcing import export_checkpoint

    cfg = tiny_cfg(str(tmp_path / "run"), steps=2)
    train_diffusion_forcing(cfg, progress=False, dataset=tiny_dataset(), vocabulary=VOCAB)
    for name in ("dit.safetensors", "text.safetensors"):
        (tmp_path / "run" / name).unlink()
    export_checkpoint(cfg, vocabulary=VOCAB)
    dit = load_dit(tmp_path / "run" / "dit.safetensors")
    assert dit.cfg.dim == 32
    assert load_text_encoder(tmp_path / "run" / "text.safetensors").cfg.vocab[1:] == tuple(sorted(VOCAB))


def test_config_file_errors_name_the_key(tmp_path: Path) -> None:
    from lvstudio.train.common import ConfigError, load_config
    from lvstudio.train.diffusion_forcing import DFConfig

    bad = tmp_path / "bad.toml"
    bad.write_text("steps = 10\nbatchsize = 4\n")
    with pytest.raises(ConfigError, match="batchsize: Extra inputs are not permitted — valid keys are: "):
        load_config(bad, DFConfig)
    bad.write_text("steps = 10\n[dit]\ndim = 192\nnum_heads = 5\n")  # found before any clip is made
    with pytest.raises(ConfigError, match=r"bad.toml: dit: dim=192 is not divisible by num_heads=5 — fix the value "
                                          r"of dit$"):
        load_config(bad, DFConfig)
    cfg = load_config(ROOT / "presets" / "tiny" / "train_df.toml", DFConfig)
    assert Path(cfg.vae) == ROOT / "presets" / "tiny" / "vae.safetensors"


@pytest.mark.parametrize(("line", "says"), [
    ("steps = -5", "steps: must be at least 1, got -5 — fix the value of steps"),
    ("batch_size = 0", "batch_size: must be at least 1, got 0"),
    ("lr = 0", "lr: must be more than 0, got 0.0"),
    ("ema_decay = 1.5", "ema_decay: must be in [0, 1), got 1.5"),
    ("warmup_steps = -1", "warmup_steps: must be 0 or more, got -1"),
])
def test_config_ranges_are_checked_before_any_work(tmp_path: Path, line: str, says: str) -> None:
    # steps = -5 once made a causal-distill run's 896 teacher trajectories, then "finished" at step 0 with loss nan.
    from lvstudio.train.causal_distill import CausalDistillConfig
    from lvstudio.train.common import ConfigError, load_config
    from lvstudio.train.diffusion_forcing import DFConfig
    from lvstudio.train.vae_config import VAEFileConfig

    bad = tmp_path / "bad.toml"
    bad.write_text(line + "\n")
    # The recipes that set their own defaults for these keys (lr, batch_size) keep the ranges.
    for model in (DFConfig, CausalDistillConfig, VAEFileConfig):
        with pytest.raises(ConfigError, match=re.escape(f"bad.toml: {says}")):
            load_config(bad, model)


def test_object_masks_cover_the_world_objects() -> None:
    from lvstudio.train.data import object_masks
    from lvstudio.world import sample_clip

    clip = sample_clip(5, 9)
    masks = object_masks(clip.truth, 3, 128)
    assert masks.shape == (3, 16, 16) and 0 < masks.float().mean() < 0.5
    for k, f in ((0, 0), (1, 4), (2, 8)):
        for ob in clip.truth[f].objects:
            assert masks[k, int(ob.y // 8), int(ob.x // 8)] == 1


def test_object_weighting_changes_the_loss_only_when_enabled() -> None:
    import torch

    cfg = tiny_cfg("unused", cfg_dropout=0.0)
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB, 4)
    batch = sample_batch(tiny_dataset(), cfg, np.random.default_rng(0))
    with torch.no_grad():
        plain = df_loss(model, batch, cfg, torch.Generator().manual_seed(1))
        batch.objects = torch.zeros(batch.x0.shape[0], batch.x0.shape[2], 4, 4)
        batch.objects[:, :, 1, 1] = 1
        same = df_loss(model, batch, cfg, torch.Generator().manual_seed(1))
        weighted = df_loss(model, batch, cfg.model_copy(update={"object_weight": 8.0}),
                           torch.Generator().manual_seed(1))
    assert torch.equal(plain, same) and not torch.allclose(plain, weighted)


def test_learning_rate_schedule_warmup_constant_cosine() -> None:
    from lvstudio.train.loop import lr_at

    assert lr_at(0, 1e-3, 10) == pytest.approx(1e-4)
    assert lr_at(50, 1e-3, 10, decay_start=100, total=200, min_lr=1e-4) == pytest.approx(1e-3)
    assert lr_at(150, 1e-3, 10, decay_start=100, total=200, min_lr=1e-4) == pytest.approx(5.5e-4)
    assert lr_at(200, 1e-3, 10, decay_start=100, total=200, min_lr=1e-4) == pytest.approx(1e-4)
