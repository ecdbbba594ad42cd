"""CausVid causal distillation: ODE pairs (shapes, timesteps, both teacher attentions), the regression loss, tiny
runs of the ODE init (+ DMD stage 2) that export and resume."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lvstudio.train.causal_distill import (
    CausalDistillConfig,
    generate_ode_pairs,
    list_sigmas,
    load_ode_pairs,
    ode_regression_loss,
    teacher_grid,
    teacher_trajectories,
    train_causal_distill,
)
from lvstudio.train.self_forcing import load_models
from tests.test_self_forcing import tiny_dit, tiny_files, tiny_latents


def tiny_cd_cfg(out_dir: Path, files: dict[str, str], **kw) -> CausalDistillConfig:
    base = dict(out_dir=str(out_dir), steps=3, batch_size=2, size=32, num_blocks=3, block_frames=2, window_frames=6,
                sink_frames=2, shift=3.0, teacher_shift=3.0, teacher_steps=5, num_pairs=3, pair_batch=2,
                warmup_steps=1, ema_start=1, log_every=1, ckpt_every=2, threads=1, **files)
    base.update(kw)
    return CausalDistillConfig(**base)


def test_teacher_grid_passes_through_the_step_list() -> None:
    cfg = CausalDistillConfig(shift=2.0, teacher_shift=2.0, teacher_steps=12)
    grid = teacher_grid(cfg)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and all(a > b for a, b in itertools.pairwise(grid))
    assert all(s in grid for s in list_sigmas(cfg)) and len(grid) >= 13


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_ode_pairs_shapes_and_timesteps(tmp_path: Path, attention: str) -> None:
    files = tiny_files(tmp_path / "base")
    cfg = tiny_cd_cfg(tmp_path / "run", files, teacher_attention=attention)
    models = load_models(cfg, with_critic=False)
    folder = generate_ode_pairs(cfg, models, tmp_path / "run")
    assert sorted(p.name for p in folder.iterdir()) == ["part_00000.safetensors", "part_00001.safetensors"]
    traj, timesteps, prompts = load_ode_pairs(folder)
    k = len(cfg.step_list)
    assert traj.shape == (3, k + 1, 4, 6, 4, 4) and len(prompts) == 3
    torch.testing.assert_close(timesteps, torch.tensor([*cfg.timesteps(), 0.0]))
    # Entry 0 is the noise itself (σ = 1); the states differ along the trajectory.
    for j in range(k):
        assert not torch.allclose(traj[:, j], traj[:, j + 1])
    assert traj[:, 0].std() > 0.5 and torch.isfinite(traj).all()
    # Resumable: existing parts are kept, not regenerated.
    before = (folder / "part_00000.safetensors").stat().st_mtime_ns
    generate_ode_pairs(cfg, models, tmp_path / "run")
    assert (folder / "part_00000.safetensors").stat().st_mtime_ns == before


@pytest.mark.parametrize("attention", ["causal", "bidirectional"])
def test_causal_teacher_blocks_ignore_later_noise(tmp_path: Path, attention: str) -> None:
    cfg = tiny_cd_cfg(tmp_path, {}, teacher_attention=attention)
    teacher = tiny_dit()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 4, 6, 4, 4, generator=g)
    context, uncond = torch.randn(1, 8, 16, generator=g), torch.zeros(1, 8, 16)
    other = noise.clone()
    other[:, :, 4:] = torch.randn(1, 4, 2, 4, 4, generator=g)  # new noise for the last block only
    a = teacher_trajectories(teacher, context, uncond, noise, cfg)
    b = teacher_trajectories(teacher, context, uncond, other, cfg)
    same_first = torch.allclose(a[:, :, :, :2], b[:, :, :, :2], atol=1e-6)
    assert same_first == (attention == "causal")


def test_regression_loss_skips_clean_frames_and_learns() -> None:
    cfg = CausalDistillConfig(size=32, shift=3.0, num_blocks=3, block_frames=2, window_frames=6, sink_frames=2)
    dit = tiny_dit()
    g = torch.Generator().manual_seed(0)
    traj = torch.randn(4, 5, 4, 6, 4, 4, generator=g)
    timesteps = torch.tensor([*cfg.timesteps(), 0.0])
    context = torch.randn(4, 8, 16, generator=g)
    opt = torch.optim.AdamW(dit.parameters(), lr=3e-3)
    before = ode_regression_loss(dit, context, traj, timesteps, cfg, torch.Generator().manual_seed(1))
    before.backward()
    opt.step()
    with torch.no_grad():
        after = ode_regression_loss(dit, context, traj, timesteps, cfg, torch.Generator().manual_seed(1))
    assert after < before
    # Only clean frames everywhere: nothing to regress.
    clean = traj[:, -1:].expand(-1, 5, -1, -1, -1, -1)
    zero_t = torch.zeros(5)
    loss = ode_regression_loss(dit, context, clean, zero_t, cfg, torch.Generator().manual_seed(1))
    assert float(loss.detach()) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_three_step_ode_init_exports_resumes_and_feeds_dmd(tmp_path: Path, precision: str) -> None:
    files = tiny_files(tmp_path / "base")
    full = train_causal_distill(tiny_cd_cfg(tmp_path / "a", files, precision=precision), progress=False)
    train_causal_distill(tiny_cd_cfg(tmp_path / "b", files, steps=2, precision=precision), progress=False)
    resumed = train_causal_distill(tiny_cd_cfg(tmp_path / "b", files, dmd_steps=2, precision=precision),
                                   progress=False, dataset=tiny_latents())
    assert full["step"] == resumed["step"] == 3 and full["pairs"] == 3
    log_a = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    wa, wb = load_file(str(tmp_path / "a" / "dit.safetensors")), load_file(str(tmp_path / "b" / "dit.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # Stage 2 (DMD on noised real latents) started from the ODE init and exported its own generator.
    assert resumed["dmd"]["step"] == 2 and (tmp_path / "b" / "dmd" / "dit.safetensors").exists()
    dmd_log = [json.loads(x) for x in (tmp_path / "b" / "dmd" / "train_log.jsonl").read_text().splitlines()]
    assert len(dmd_log) == 2 and all("loss_c" in r for r in dmd_log)
