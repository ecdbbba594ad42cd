"""Self-Forcing recipe: gradient only at the exit step, train/inference consistency with the causal-KV backend,
DMD and critic losses, mixed-history batches, tiny runs that export and resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lvstudio.backends.base import block_generator
from lvstudio.backends.causal_kv import CausalKVBackend
from lvstudio.models.kv_cache import AttentionSpec
from lvstudio.models.tiny_text import TinyTextConfig, TinyTextEncoder, save_text_encoder
from lvstudio.models.wan_dit import WanDiT, WanDiTConfig
from lvstudio.presets import AttentionSettings, SamplerSettings
from lvstudio.prompt_stream import PromptStreamBuffer
from lvstudio.sampling.flow_matching import FlowMatchTable, warp_steps
from lvstudio.train.data import LatentDataset
from lvstudio.train.self_forcing import (
    SelfForcingConfig,
    critic_loss,
    dmd_loss,
    mixed_history_inputs,
    rollout,
    train_self_forcing,
)
from tests.helpers.random_bundle import random_bundle

WORDS = ["a", "red", "blue", "ball", "cube", "over", "the", "sea", "on", "grass"]
PROMPTS = ["a red ball over the sea", "a blue cube on the grass"]
STEPS = [1000.0, 750.0, 500.0, 250.0]


def tiny_dit(seed: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    dit = WanDiT(WanDiTConfig(dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=4, out_dim=4, freq_dim=32,
                              text_dim=16, text_len=8))
    with torch.no_grad():
        dit.head.head.weight.normal_(0, 0.05)  # the official init zeroes the head
    return dit


def tiny_files(folder: Path) -> dict[str, str]:
    """A tiny base (dit + text encoder) saved like the shipped preset; returns config path fields."""
    folder.mkdir(parents=True, exist_ok=True)
    dit = tiny_dit()
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(folder / "dit.safetensors"),
              metadata={"config": json.dumps(dit.cfg.to_dict()), "format": "pt"})
    torch.manual_seed(1)
    text = TinyTextEncoder(TinyTextConfig.for_words(WORDS, dim=16, num_layers=1, num_heads=2, text_len=8))
    save_text_encoder(text, folder / "text.safetensors")
    return {"real_dit": str(folder / "dit.safetensors"), "text": str(folder / "text.safetensors")}


def tiny_latents(seed: int = 0) -> LatentDataset:
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(6, 4, 6, 4, 4, generator=g)
    return LatentDataset(latents, [[PROMPTS[i % 2]] * 6 for i in range(6)])


def tiny_sf_cfg(out_dir: Path, files: dict[str, str], **kw) -> SelfForcingConfig:
    base = dict(out_dir=str(out_dir), steps=3, batch_size=2, size=32, num_blocks=3, block_frames=2, window_frames=6,
                sink_frames=2, shift=3.0, dfake_gen_update_ratio=2, warmup_steps=1, ema_start=1, log_every=1,
                ckpt_every=2, threads=1, **files)
    base.update(kw)
    return SelfForcingConfig(**base)


def _context(dit: WanDiT, b: int = 2) -> torch.Tensor:
    return torch.randn(b, 8, 16, generator=torch.Generator().manual_seed(5))


def test_rollout_keeps_gradient_only_at_the_exit_step() -> None:
    dit = tiny_dit()
    spec = AttentionSpec(2, 4, 2)  # window 4 < 6 frames: eviction happens inside the rollout
    table = FlowMatchTable(shift=3.0)
    steps = warp_steps(STEPS, 3.0)
    exit_index = 2
    calls: list[dict] = []

    def pre_hook(module, args, kwargs):
        cache = kwargs.get("kv_cache")
        calls.append({"grad": torch.is_grad_enabled(), "t": float(args[1].flatten()[0]), "x": args[0].detach().clone(),
                      "start": kwargs.get("start_frame", 0), "write": kwargs.get("write_cache", False),
                      "cache": None if cache is None else {k: v.clone() for k, v in cache.state_dict().items()}})

    def post_hook(module, args, kwargs, out):
        calls[-1]["out_grad"] = out.requires_grad

    h1 = dit.register_forward_pre_hook(pre_hook, with_kwargs=True)
    h2 = dit.register_forward_hook(post_hook, with_kwargs=True)
    cond = dit.new_conditioning(_context(dit))
    noise = torch.randn(2, 4, 6, 4, 4, generator=torch.Generator().manual_seed(0))
    out = rollout(dit, cond, noise, steps, block_frames=2, spec=spec, exit_index=exit_index, grad=True,
                  rng=torch.Generator().manual_seed(1), table=table)
    h1.remove()
    h2.remove()
    # Per block: exit_index no-grad steps, the exit step with graph, one no-grad context pass.
    assert len(calls) == 3 * (exit_index + 2)
    with_graph = [c for c in calls if c["out_grad"]]
    assert len(with_graph) == 3 and all(c["grad"] and c["t"] == pytest.approx(steps[exit_index]) for c in with_graph)
    assert all(not c["out_grad"] for c in calls if c["write"] or c["t"] != pytest.approx(steps[exit_index]))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    dit.zero_grad()
    (out * weights).sum().backward()
    got = [p.grad.clone() for p in dit.parameters()]
    # Reference: each block's exit forward alone, from the same input and the same (detached) cache.
    dit.zero_grad()
    sigma = float(table.sigma_at(steps[exit_index]))
    for k, c in enumerate(with_graph):
        cache = dit.new_kv_cache(spec, (4, 4))
        if c["cache"] is not None:
            cache.load_state_dict(c["cache"])
        t = torch.full((2, 2), steps[exit_index])
        v = dit(c["x"], t, dit.new_conditioning(cond.context), attention=spec, kv_cache=cache, start_frame=c["start"])
        x0 = c["x"] - sigma * v
        (x0 * weights[:, :, 2 * k : 2 * k + 2]).sum().backward()
    for a, b in zip(got, [p.grad for p in dit.parameters()], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("rope_mode", ["absolute", "rebase"])
def test_rollout_without_grad_equals_the_backend_few_step_sampling(rope_mode: str) -> None:
    sampler = SamplerSettings(kind="few-step", step_list=STEPS, shift=3.0, cfg_scale=1.0)
    attention = AttentionSettings(block_frames=2, window_frames=6, sink_frames=2, rope_mode=rope_mode)
    bundle = random_bundle(sampler=sampler, attention=attention)
    prompt = "a red ball over the sea"
    buf = PromptStreamBuffer(bundle.text.encode, block_latents=2, fps=16)
    buf.add_shot(0.0, prompt)
    backend = CausalKVBackend(bundle, buf, seed=3, width=32, height=32)
    chunks = [backend.step().latents for _ in range(5)]  # 10 latents: the window (6) evicts from block 3 on
    gens = [block_generator(3, b, torch.device("cpu")) for b in range(5)]
    noise = torch.cat([torch.randn(1, 4, 2, 4, 4, generator=g) for g in gens], dim=2)
    att = bundle.preset.attention
    with torch.no_grad():
        out = rollout(bundle.dit, bundle.dit.new_conditioning(bundle.text.encode([prompt])), noise,
                      warp_steps(STEPS, 3.0), block_frames=2, spec=AttentionSpec(2, att.window_frames, att.sink_frames),
                      exit_index=len(STEPS) - 1, grad=False, rng=gens, table=FlowMatchTable(shift=3.0),
                      rope_mode=att.rope_mode, context_noise=sampler.context_noise)
    torch.testing.assert_close(out, torch.cat(chunks, dim=2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("guidance", [0.0, 2.0])
def test_dmd_step_moves_toward_the_real_prediction_and_away_from_the_fake(guidance: float) -> None:
    x = torch.zeros(1, 2, 2, 3, 3, requires_grad=True)
    cond, uncond = torch.full_like(x, 1.0), torch.full_like(x, 0.5)
    real = cond + guidance * (cond - uncond)
    fake = torch.full_like(x, -1.0)
    sigma, eps = torch.full((1, 2), 0.5), torch.randn(x.shape)
    loss = dmd_loss(x, lambda xt, t: (cond, uncond), lambda xt, t: fake, sigma, eps, guidance)
    loss.backward()
    expected = (fake - real) / (x.detach() - real).abs().mean() / x.numel()  # d/dx of 0.5·mean((x − target)²)
    torch.testing.assert_close(x.grad, expected.to(x.grad.dtype))
    x_new = x.detach() - 0.1 * x.grad
    assert (x_new - real).norm() < (x.detach() - real).norm()
    assert (x_new - fake).norm() > (x.detach() - fake).norm()


def test_critic_loss_is_the_flow_loss_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 2, 2, generator=g)
    eps = torch.randn(x.shape, generator=g)
    sigma = torch.tensor([[0.2, 0.2, 0.7, 0.7], [0.9, 0.9, 0.1, 0.1]])

    def fake(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return 0.5 * x_t + t[:, None, :, None, None] / 1000

    s = sigma[:, None, :, None, None]
    x_t = (1 - s) * x + s * eps
    by_hand = ((0.5 * x_t + s - (eps - x)) ** 2).mean()
    torch.testing.assert_close(critic_loss(fake, x, sigma, eps), by_hand)


def test_mixed_history_batches_mix_real_and_generated_history(tmp_path: Path) -> None:
    files = tiny_files(tmp_path / "base")
    cfg = tiny_sf_cfg(tmp_path / "run", files, mode="mixed-history", batch_size=8, history_gen_prob=0.5)
    dit = tiny_dit()
    x0 = torch.randn(8, 4, 6, 4, 4, generator=torch.Generator().manual_seed(0))
    mb = mixed_history_inputs(dit, _context(dit, 8), x0, cfg, FlowMatchTable(shift=3.0),
                              torch.Generator().manual_seed(3))
    hist = mb.x.shape[2] - 2
    assert hist in (2, 4) and mb.t.shape == (8, hist + 2) and mb.target.shape == (8, 4, 2, 4, 4)
    assert 0 < int(mb.generated.sum()) < 8
    same = [bool(torch.equal(mb.x[i, :, :hist], x0[i, :, :hist])) for i in range(8)]
    assert same == [not bool(g) for g in mb.generated]
    assert torch.all(mb.t[:, :hist] == cfg.context_noise) and torch.all(mb.t[:, hist:] > 0)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["self-forcing", "causvid", "mixed-history", "self-forcing-bfloat16",
                                    "mixed-history-bfloat16"])
def test_three_step_runs_export_and_resume(tmp_path: Path, recipe: str) -> None:
    files = tiny_files(tmp_path / "base")
    kw = {"self-forcing": {}, "causvid": {"backward_simulation": False},
          "mixed-history": {"mode": "mixed-history"}, "self-forcing-bfloat16": {"precision": "bfloat16"},
          "mixed-history-bfloat16": {"mode": "mixed-history", "precision": "bfloat16"}}[recipe]
    data = tiny_latents()
    full = train_self_forcing(tiny_sf_cfg(tmp_path / "a", files, **kw), progress=False, dataset=data)
    train_self_forcing(tiny_sf_cfg(tmp_path / "b", files, steps=2, **kw), progress=False, dataset=data)
    resumed = train_self_forcing(tiny_sf_cfg(tmp_path / "b", files, **kw), progress=False, dataset=data)
    assert full["step"] == resumed["step"] == 3
    log_a = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert [(r["loss_g"], r["loss_c"]) for r in log_a] == [(r["loss_g"], r["loss_c"]) for r in log_b]
    wa, wb = load_file(str(tmp_path / "a" / "dit.safetensors")), load_file(str(tmp_path / "b" / "dit.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    base = load_file(files["real_dit"])
    assert any(not torch.equal(wa[k], base[k]) for k in wa)  # the generator moved


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        SelfForcingConfig(step_list=[])
    with pytest.raises(ValueError):
        SelfForcingConfig(history_start_index=4)
    assert np.allclose(SelfForcingConfig(shift=2.0).timesteps()[0], 1000.0)



@pytest.mark.slow
def test_train_export_ships_the_generator_into_a_preset_folder(tmp_path: Path) -> None:
    """`lvstudio train export CONFIG --recipe self-forcing --to DIR --storage int8`: the generator's DiT, stored int8,
    the same weights within an int8 step (how tiny-fast's dit.safetensors is made)."""
    from typer.testing import CliRunner

    from lvstudio.cli import app
    from lvstudio.models.weight_storage import read_weights

    files = tiny_files(tmp_path / "base")
    cfg = tiny_sf_cfg(tmp_path / "run", files, steps=2)
    train_self_forcing(cfg, progress=False, dataset=tiny_latents())
    fields = cfg.model_dump(exclude_none=True, exclude={"fsdp"})
    config = tmp_path / "sf.toml"
    config.write_text("".join(f"{k} = {json.dumps(list(v) if isinstance(v, tuple) else v)}\n"
                              for k, v in fields.items()))
    result = CliRunner().invoke(app, ["train", "export", str(config), "--recipe", "self-forcing",
                                      "--to", str(tmp_path / "preset"), "--storage", "int8"])
    assert result.exit_code == 0, result.output
    shipped, meta = read_weights(tmp_path / "preset" / "dit.safetensors")
    assert meta["storage"] == "int8-per-channel" and not (tmp_path / "preset" / "text.safetensors").exists()
    run = load_file(str(tmp_path / "run" / "dit.safetensors"))
    assert shipped.keys() == run.keys()
    for k, w in run.items():  # int8: within a step of the tensor's largest channel; small tensors float16
        assert torch.allclose(shipped[k].float(), w, rtol=0, atol=float(w.abs().max()) / 127 + 1e-3), k
