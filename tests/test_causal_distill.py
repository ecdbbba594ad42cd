"""CausVid causal distillation: ODE pairs (shapes, timesteps, both teacher attentions), the regression loss, tiny
runs of the ODE init (+ DMD stage 2) that export and resume; guidance distillation (target "teacher-step")."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lvstudio.train.causal_distill import (
    CausalDistillConfig,
    drop_words,
    generate_ode_pairs,
    list_sigmas,
    load_ode_pairs,
    ode_regression_loss,
    pair_maker,
    teacher_grid,
    teacher_step_loss,
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


def test_pairs_of_another_teacher_or_guidance_are_made_again(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    files = tiny_files(tmp_path / "base")
    cfg = tiny_cd_cfg(tmp_path / "run", files, num_pairs=2)
    generate_ode_pairs(cfg, load_models(cfg, with_critic=False), tmp_path / "run")
    part = tmp_path / "run" / "ode_pairs" / "part_00000.safetensors"
    made = load_ode_pairs(part.parent)[0]
    # Another guidance scale: the part is made again, with a warning naming what changed.
    stronger = tiny_cd_cfg(tmp_path / "run", files, num_pairs=2, teacher_cfg=5.0)
    with pytest.warns(UserWarning, match="another teacher or other settings \\(teacher_cfg\\)"):
        generate_ode_pairs(stronger, load_models(stronger, with_critic=False), tmp_path / "run")
    assert not torch.equal(load_ode_pairs(part.parent)[0], made)
    # Guidance on words (the captions without them as a third row): made again too.
    worded = tiny_cd_cfg(tmp_path / "run", files, num_pairs=2, teacher_cfg=5.0, teacher_drop_words=["ball", "cube"],
                         teacher_drop_cfg=1.5)
    with pytest.warns(UserWarning, match="\\(teacher_drop_cfg, teacher_drop_words\\)"):
        generate_ode_pairs(worded, load_models(worded, with_critic=False), tmp_path / "run")
    with pytest.warns(UserWarning, match="\\(teacher_drop_cfg, teacher_drop_words\\)"):
        generate_ode_pairs(stronger, load_models(stronger, with_critic=False), tmp_path / "run")
    # Another teacher file (same name, new weights): made again; the same teacher and settings: kept as it is.
    dit = tiny_dit(seed=7)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, files["real_dit"],
              metadata={"config": json.dumps(dit.cfg.to_dict()), "format": "pt"})
    with pytest.warns(UserWarning, match="\\(teacher\\)"):
        generate_ode_pairs(stronger, load_models(stronger, with_critic=False), tmp_path / "run")
    before = part.stat().st_mtime_ns
    generate_ode_pairs(stronger, load_models(stronger, with_critic=False), tmp_path / "run")
    assert part.stat().st_mtime_ns == before


def test_word_guidance_is_guidance_against_the_caption_without_the_words(tmp_path: Path) -> None:
    """v_c + (s − 1)(v_c − v_dropped): with the empty prompt as the dropped row it is CFG s exactly; with the caption
    itself (no word dropped) it is no guidance; the config needs the words, and only then records them."""
    teacher = tiny_dit()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 4, 6, 4, 4, generator=g)
    context, uncond = torch.randn(2, 8, 16, generator=g), torch.zeros(2, 8, 16)
    cfg2 = _teacher_step_cfg(teacher_cfg=2.0)
    words = _teacher_step_cfg(teacher_cfg=1.0, teacher_drop_words=["ball"], teacher_drop_cfg=2.0)
    torch.testing.assert_close(teacher_trajectories(teacher, context, uncond, noise, words, dropped=uncond),
                               teacher_trajectories(teacher, context, uncond, noise, cfg2), atol=1e-5, rtol=1e-5)
    plain = teacher_trajectories(teacher, context, uncond, noise, _teacher_step_cfg(teacher_cfg=1.0))
    torch.testing.assert_close(teacher_trajectories(teacher, context, uncond, noise, words, dropped=context), plain,
                               atol=1e-5, rtol=1e-5)
    assert not torch.allclose(teacher_trajectories(teacher, context, uncond, noise, words, dropped=uncond), plain)
    with pytest.raises(ValueError, match="pass the prompts' features"):
        teacher_trajectories(teacher, context, uncond, noise, words)
    with pytest.raises(ValueError, match="teacher_drop_words, which is empty"):
        _teacher_step_cfg(teacher_drop_cfg=1.5)
    assert drop_words("a red ball bouncing and a blue star resting over the sea", ["ball", "star"]) == (
        "a red bouncing and a blue resting over the sea")
    assert drop_words("A red Ball, bouncing!", ["BALL"]) == "a red bouncing"  # as the text encoder splits it
    files = tiny_files(tmp_path / "base")
    assert "teacher_drop" not in pair_maker(tiny_cd_cfg(tmp_path, files, teacher_drop_words=["ball"]))
    assert '"teacher_drop_cfg": 1.3' in pair_maker(tiny_cd_cfg(tmp_path, files, teacher_drop_words=["ball"],
                                                               teacher_drop_cfg=1.3))


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


def _teacher_step_cfg(**kw) -> CausalDistillConfig:
    base = dict(size=32, shift=3.0, teacher_shift=3.0, teacher_steps=4, num_blocks=3, block_frames=2, window_frames=6,
                sink_frames=2, target="teacher-step")
    return CausalDistillConfig(**{**base, **kw})


def test_teacher_step_targets_are_the_teachers_own_steps() -> None:
    """Without CFG the teacher is its own perfect student (loss ~0 on every block and state: the velocity read off
    the trajectory, the clean past and the timesteps are the sampler's); with CFG 2 it is not."""
    teacher = tiny_dit()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(3, 4, 6, 4, 4, generator=g)
    context, uncond = torch.randn(3, 8, 16, generator=g), torch.zeros(3, 8, 16)
    losses = {}
    for teacher_cfg in (1.0, 2.0):
        cfg = _teacher_step_cfg(teacher_cfg=teacher_cfg)
        traj = teacher_trajectories(teacher, context, uncond, noise, cfg)
        with torch.no_grad():
            losses[teacher_cfg] = [float(teacher_step_loss(teacher, context, traj, cfg, g.manual_seed(s)))
                                   for s in range(12)]
    assert max(losses[1.0]) < 1e-10 and min(losses[2.0]) > 1e-7
    assert min(losses[2.0]) > 1000 * max(losses[1.0])


def test_teacher_step_needs_the_teachers_grid_on_the_step_list() -> None:
    with pytest.raises(ValueError, match="set teacher_steps = 4"):
        _teacher_step_cfg(teacher_steps=12)
    with pytest.raises(ValueError, match="dmd_steps = 0"):
        _teacher_step_cfg(dmd_steps=5)
    assert _teacher_step_cfg().sampler_table() == {"kind": "euler", "steps": 4, "shift": 3.0, "cfg_scale": 1.0,
                                                    "context_noise": 0.0}
    assert CausalDistillConfig().sampler_table()["kind"] == "few-step"


@pytest.mark.slow
def test_guidance_distillation_run_exports_an_euler_generator(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lvstudio.cli import app
    from lvstudio.train.self_forcing import export_run

    files = tiny_files(tmp_path / "base")
    cfg = tiny_cd_cfg(tmp_path / "run", files, target="teacher-step", teacher_steps=4, teacher_cfg=2.0)
    train_causal_distill(cfg, progress=False)
    exported = tmp_path / "run" / "dit.safetensors"
    from safetensors import safe_open

    with safe_open(str(exported), "pt") as f:
        assert json.loads(f.metadata()["sampler"])["kind"] == "euler"
    first = load_file(exported)
    export_run(cfg)  # the checkpoint's EMA again: the same weights
    again = load_file(exported)
    assert all(torch.equal(first[k], again[k]) for k in first)
    (tmp_path / "run.toml").write_text("\n".join(f"{k} = {json.dumps(v)}" for k, v in cfg.model_dump().items()
                                                 if v is not None and not isinstance(v, dict)))
    result = CliRunner().invoke(app, ["train", "export", str(tmp_path / "run.toml"), "--recipe", "causal-distill",
                                      "--to", str(tmp_path / "preset"), "--storage", "int8"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "preset" / "dit.safetensors").exists()
