"""Error-Recycling Fine-Tuning: replay memory, injection, recycled target, one-step errors, the training run, and the
cross-clip backend with an ERFT LoRA."""

from __future__ import annotations

import copy
import re
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from lvstudio.models.lora import add_lora
from lvstudio.sampling.flow_matching import FlowMatchTable
from lvstudio.train.erft import (
    ClipBatch,
    ERFTConfig,
    ERFTModel,
    ErrorBank,
    ErrorBanks,
    Tables,
    _digest,
    _lora_params,
    clip_start_frame,
    erft_loss,
    inject_errors,
    one_step_errors,
    recycled_target,
    sample_clip_batch,
    train_erft,
)
from tests.helpers.df_tiny import VOCAB, tiny_dataset
from tests.helpers.random_preset import write_random_lora

TINY_DIT = {"dim": 32, "num_heads": 2, "ffn_dim": 64, "num_layers": 2, "freq_dim": 32}


def _cfg(out_dir: str = "unused", **kw) -> ERFTConfig:
    base = {"out_dir": out_dir, "steps": 3, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "log_every": 1,
            "ckpt_every": 2, "block_frames": 2, "clip_frames": 4, "carry_frames": 2, "text_dim": 32, "text_layers": 1,
            "threads": 1, "lora_rank": 4, "lora_alpha": 4.0, "num_grids": 5, "bank_capacity": 3, "clean_prob": 0.0,
            "first_clip_prob": 0.0, "dit": TINY_DIT}
    base.update(kw)
    return ERFTConfig(**base)


# -- replay memory ------------------------------------------------------------------------------------------------


def test_bank_capacity_most_similar_replacement_and_sampling() -> None:
    bank = ErrorBank(num_grids=3, capacity=3, replacement="l2")
    for v in (0.0, 10.0, 20.0):
        bank.insert(1, torch.full((2, 2), v))
    assert bank.count(1) == 3 and len(bank) == 3 and bank.count(0) == 0
    slot = bank.insert(1, torch.full((2, 2), 11.0))  # nearest to 10 -> replaces it
    assert slot == 1 and bank.count(1) == 3
    assert sorted(float(e[0, 0]) for e in bank.items[1]) == [0.0, 11.0, 20.0]
    assert bank.insert(1, torch.full((2, 2), -3.0)) == 0  # nearest to 0
    assert bank.sample(0) is None and ErrorBank(2, 2).sample_any() is None
    g = torch.Generator().manual_seed(0)
    drawn = {float(bank.sample(1, g)[0, 0]) for _ in range(60)}
    assert drawn == {-3.0, 11.0, 20.0}
    bank.insert(2, torch.full((2, 2), 99.0))
    seen = [float(bank.sample_any(g)[0, 0]) for _ in range(400)]
    assert set(seen) == {-3.0, 11.0, 20.0, 99.0}
    assert 60 < seen.count(99.0) < 140  # uniform over the 4 stored errors, not over grids
    x = torch.randn(2, 2, requires_grad=True)
    bank.insert(0, x * 2)
    assert not bank.items[0][0].requires_grad and bank.items[0][0].device.type == "cpu"
    with pytest.raises(ValueError, match="shape"):
        bank.insert(1, torch.zeros(3))


def test_bank_fifo_and_state_round_trip(tmp_path: Path) -> None:
    fifo = ErrorBank(2, 2, replacement="fifo", dtype=torch.float16)
    for v in (1.0, 2.0, 3.0):
        fifo.insert(0, torch.full((3,), v))
    assert [float(e[0]) for e in fifo.items[0]] == [3.0, 2.0] and fifo.items[0][0].dtype == torch.float16
    assert fifo.sample(0).dtype == torch.float32
    again = ErrorBank(2, 2, replacement="fifo", dtype=torch.float16)
    again.load_state_dict(fifo.state_dict())
    again.insert(0, torch.full((3,), 4.0))  # the fifo pointer survived: replaces 2.0
    assert [float(e[0]) for e in again.items[0]] == [3.0, 4.0]
    banks = ErrorBanks(ErrorBank(4, 2), ErrorBank(4, 2))
    banks.noise.insert(3, torch.ones(2, 2))
    banks.latent.insert(0, -torch.ones(2, 2))
    banks.save(tmp_path / "b.safetensors", step=7)
    loaded = ErrorBanks(ErrorBank(4, 2), ErrorBank(4, 2))
    assert loaded.load(tmp_path / "b.safetensors") == 7
    assert torch.equal(loaded.noise.items[3][0], torch.ones(2, 2)) and loaded.latent.count(0) == 1
    with pytest.raises(ValueError, match="does not fit"):
        ErrorBank(2, 2).load_state_dict(ErrorBank(4, 2).state_dict() | {"g3": torch.zeros(1, 2)})


# -- injection, target, errors ------------------------------------------------------------------------------------


def _filled_banks(shape: tuple[int, ...]) -> ErrorBanks:
    banks = ErrorBanks(ErrorBank(2, 4), ErrorBank(2, 4))
    for g in range(2):
        for k in range(4):
            banks.noise.insert(g, torch.full(shape, 100.0 * (g + 1) + k))
            banks.latent.insert(g, torch.full(shape, -(100.0 * (g + 1) + k)))
    return banks


def test_injection_shapes_and_probabilities() -> None:
    b, shape = 4000, (2, 4, 1, 1)  # [C, N, h, w]
    banks = _filled_banks(shape)
    cfg = _cfg(noise_prob=0.1, latent_prob=0.7, cond_prob=0.5, clean_prob=0.2)
    x0, eps = torch.zeros(b, *shape), torch.zeros(b, *shape)
    prefix = torch.zeros(b, 2, 3, 1, 1)
    grids = torch.randint(2, (b,), generator=torch.Generator().manual_seed(1))
    inj = inject_errors(x0, eps, prefix, grids, banks, cfg, torch.Generator().manual_seed(0))
    assert inj.eps.shape == eps.shape and inj.x0.shape == x0.shape and inj.prefix.shape == prefix.shape
    assert not (inj.noise & inj.clean).any() and not (inj.latent & inj.clean).any() and not (inj.cond & inj.clean).any()
    assert abs(inj.clean.float().mean() - 0.2) < 0.03
    assert abs(inj.noise.float().mean() - 0.8 * 0.1) < 0.02
    assert abs(inj.latent.float().mean() - 0.8 * 0.7) < 0.03
    assert abs(inj.cond.float().mean() - 0.8 * 0.5) < 0.03
    # values: noise/latent errors come from the sample's own grid; the inputs are not modified in place
    for i in range(200):
        g = int(grids[i])
        e, lat = float(inj.eps[i, 0, 0]), float(inj.x0[i, 0, 0])
        assert (e == 0) != bool(inj.noise[i]) and (not inj.noise[i] or 100 * (g + 1) <= e < 100 * (g + 1) + 4)
        assert (lat == 0) != bool(inj.latent[i]) and (not inj.latent[i] or -100 * (g + 1) - 4 < lat <= -100 * (g + 1))
        assert (float(inj.prefix[i].abs().sum()) == 0) != bool(inj.cond[i])
    assert x0.abs().sum() == 0 and eps.abs().sum() == 0 and prefix.abs().sum() == 0
    # the conditioning error comes from ALL grids
    cond_vals = {float(inj.prefix[i, 0, 0]) for i in range(b) if inj.cond[i]}
    assert any(v <= -200 for v in cond_vals) and any(-200 < v <= -100 for v in cond_vals)
    # clean_prob = 1 turns everything off; same seed, same draws
    off = inject_errors(x0, eps, prefix, grids, banks, _cfg(clean_prob=1.0), torch.Generator().manual_seed(0))
    assert not (off.noise | off.latent | off.cond).any() and off.x0.abs().sum() == 0
    again = inject_errors(x0, eps, prefix, grids, banks, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(again.eps, inj.eps) and torch.equal(again.prefix, inj.prefix)
    # error_scale multiplies every injected error (same draws)
    half = inject_errors(x0, eps, prefix, grids, banks, cfg.model_copy(update={"error_scale": 0.5}),
                         torch.Generator().manual_seed(0))
    for a, b_ in ((half.eps, inj.eps), (half.x0, inj.x0), (half.prefix, inj.prefix)):
        torch.testing.assert_close(a, 0.5 * b_)


def test_recycled_target_and_one_step_errors_by_hand() -> None:
    g = torch.Generator().manual_seed(0)
    x0, eps, e_noise, e_lat, v_hat = (torch.randn(2, 3, 2, 2, 2, generator=g) for _ in range(5))
    sigma = torch.tensor([0.25, 0.8])
    eps_p, x0_p = eps + e_noise, x0 + e_lat
    s = sigma.view(2, 1, 1, 1, 1)
    x_t = (1 - s) * x0_p + s * eps_p
    v_star = recycled_target(eps_p, x0)
    assert torch.allclose(v_star, eps + e_noise - x0)  # towards the CLEAN x0
    noise_err, latent_err = one_step_errors(v_hat, v_star, sigma)
    # integrate to sigma = 1 (noise) and to sigma = 0 (latent) with the prediction vs with the target
    assert torch.allclose(noise_err, (x_t + (1 - s) * v_hat) - (x_t + (1 - s) * v_star), atol=1e-6)
    assert torch.allclose(latent_err, (x_t - s * v_hat) - (x_t - s * v_star), atol=1e-6)
    assert torch.allclose(noise_err[1], 0.2 * (v_hat[1] - v_star[1]), atol=1e-6)
    assert torch.allclose(latent_err[0], -0.25 * (v_hat[0] - v_star[0]), atol=1e-6)


class _ZeroModel(torch.nn.Module):
    """Stands in for ERFTModel: records its inputs, predicts v = 0."""

    def __init__(self) -> None:
        super().__init__()
        from lvstudio.models.tiny_text import TinyTextConfig, TinyTextEncoder

        self.text = TinyTextEncoder(TinyTextConfig.for_words(VOCAB, dim=8, num_layers=1, num_heads=2, text_len=8))
        self.calls: list[tuple] = []
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, seq, t, ids, spec, start_frame):
        self.calls.append((seq.clone(), t.clone(), spec, start_frame))
        return seq * self.w


def test_loss_uses_recycled_target_and_banks_errors() -> None:
    cfg = _cfg(bell_weight=False, clean_prob=0.0, latent_prob=1.0, noise_prob=1.0, cond_prob=1.0, num_grids=5)
    tables = Tables.for_config(cfg)
    assert torch.allclose(tables.grids.timesteps, FlowMatchTable(2.0, 5).timesteps)
    banks = ErrorBanks.for_config(cfg.model_copy(update={"bank_dtype": "float32"}))
    g = torch.Generator().manual_seed(4)
    batch = ClipBatch(torch.randn(2, 4, 3, 2, 2, generator=g), torch.randn(2, 4, 2, 2, 2, generator=g),
                      ["a red ball", "a blue cube"], torch.ones(2, 2))
    model = _ZeroModel()
    loss, errors = erft_loss(model, batch, cfg, tables, banks, torch.Generator().manual_seed(5))
    seq, t, spec, start = model.calls[-1]
    assert seq.shape[2] == 5 and torch.equal(seq[:, :, :3], batch.prefix)  # banks empty: nothing injected yet
    assert (t[:, :3] == 0).all() and (t[:, 3:] == t[:, 3:4]).all() and spec.block_frames == 2
    assert start == clip_start_frame(3, 2) == 1
    # replay the draws: with v = 0 the loss is the mean squared recycled target
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(1000, (2,), generator=gen)
    eps = torch.randn(batch.x0.shape, generator=gen)
    v_star = eps - batch.x0
    assert torch.allclose(loss, v_star.pow(2).mean(dim=(1, 3, 4)).sum() / 4, rtol=1e-5)
    assert torch.allclose(t[:, 3], tables.train.timesteps[idx])
    assert torch.equal(errors.grids, tables.grids.index_of(tables.train.timesteps[idx]))
    sigma = tables.train.sigmas[idx].view(2, 1, 1, 1, 1)
    assert torch.allclose(errors.noise, (1 - sigma) * (0 - v_star), atol=1e-5)
    assert torch.allclose(errors.latent, -sigma * (0 - v_star), atol=1e-5)
    assert errors.insert.all()
    # bank them; the next step injects them (noise into eps, latent into x0 and the prefix)
    from lvstudio.train.erft import bank_errors

    assert bank_errors(banks, errors) == 2
    erft_loss(model, batch, cfg, tables, banks, torch.Generator().manual_seed(6))
    seq2 = model.calls[-1][0]
    assert not torch.equal(seq2[:, :, :3], batch.prefix)


def test_clip_batches_are_backend_windows() -> None:
    data = tiny_dataset()
    batch = sample_clip_batch(data, _cfg(batch_size=8, cfg_dropout=0.0), np.random.default_rng(0))
    assert batch.prefix.shape == (8, 4, 3, 4, 4) and batch.x0.shape == (8, 4, 2, 4, 4)
    lat = data.latents
    for b in range(8):  # the reference is latent 0 of its clip; carried + new latents are contiguous
        i = next(i for i in range(lat.shape[0]) if torch.equal(lat[i, :, 0], batch.prefix[b, :, 0]))
        o = next(o for o in range(1, 5) if torch.equal(lat[i, :, o : o + 2], batch.prefix[b, :, 1:]))
        assert torch.equal(lat[i, :, o + 2 : o + 4], batch.x0[b])
    first = sample_clip_batch(data, _cfg(first_clip_prob=1.0), np.random.default_rng(0))
    assert first.prefix is None and first.x0.shape[2] == 4
    with pytest.raises(ValueError, match="too short"):
        sample_clip_batch(data, _cfg(clip_frames=6, carry_frames=2), np.random.default_rng(0))
    with pytest.raises(ValidationError, match="multiples of block_frames"):
        _cfg(clip_frames=5)
    with pytest.raises(ValidationError, match="carry_frames"):
        _cfg(clip_frames=4, carry_frames=4)


# -- the training run ---------------------------------------------------------------------------------------------


def _init_weights(tmp_path: Path) -> tuple[str, str]:
    """A base DiT with a non-zero head (the official init zeroes it, which would give zero LoRA gradients)."""
    from safetensors.torch import save_file

    from lvstudio.train.diffusion_forcing import build_model

    cfg = _cfg()
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB, 4)
    with torch.no_grad():
        model.dit.head.head.weight.normal_(0, 0.05)
    dit, text = tmp_path / "dit.safetensors", tmp_path / "text.safetensors"
    save_file({k: v.contiguous() for k, v in model.dit.state_dict().items()}, str(dit))
    save_file({k: v.contiguous() for k, v in model.text.state_dict().items()}, str(text))
    return str(dit), str(text)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["float32", "bfloat16"])
def test_three_step_run_writes_lora_and_resumes_exactly(tmp_path: Path, precision: str) -> None:
    from lvstudio.models.lora import load_lora

    dit, text = _init_weights(tmp_path)
    data = tiny_dataset()
    kw = {"init_dit": dit, "init_text": text, "first_clip_prob": 0.3, "clean_prob": 0.3, "ema_start": 1,
          "ema_decay": 0.5, "precision": precision}
    full = train_erft(_cfg(str(tmp_path / "full"), **kw), progress=False, dataset=data, vocabulary=VOCAB)
    assert full["step"] == 3 and np.isfinite(full["loss"]) and full["banked"] > 0
    state, meta = load_lora(full["lora"])
    assert meta["rank"] == 4 and meta["base"]["dit_config"]["dim"] == 32
    assert meta["base"]["init_dit"] == "dit.safetensors"
    assert any(v.abs().sum() > 0 for k, v in state.items() if ".lora_B." in k)  # it learnt something
    from lvstudio.train.erft import export_erft_lora

    again, _ = load_lora(export_erft_lora(_cfg(str(tmp_path / "full"))))
    assert all(torch.equal(again[k], v) for k, v in state.items())
    out = tmp_path / "full"
    assert [p.name for p in out.glob("erft_banks.*")] == ["erft_banks.rank0.step3.safetensors"]
    # 2 steps, then resume to 3: same adapters, same banks
    part = str(tmp_path / "part")
    train_erft(_cfg(part, steps=2, **kw), progress=False, dataset=data, vocabulary=VOCAB)
    resumed = train_erft(_cfg(part, **kw), progress=False, dataset=data, vocabulary=VOCAB)
    assert resumed["lora_sha256"] == full["lora_sha256"] and resumed["loss"] == full["loss"]
    a, b = ErrorBanks.for_config(_cfg()), ErrorBanks.for_config(_cfg())
    a.load(out / "erft_banks.rank0.step3.safetensors"), b.load(Path(part) / "erft_banks.rank0.step3.safetensors")
    assert all(torch.equal(x, y) for x, y in zip(a.latent.state_dict().values(), b.latent.state_dict().values(),
                                                   strict=True))
    # a checkpoint of another base DiT is refused
    from lvstudio.train.common import ConfigError

    with pytest.raises(ConfigError, match="another base DiT"):
        train_erft(_cfg(part, steps=4, **(kw | {"init_dit": None})), progress=False, dataset=data, vocabulary=VOCAB)


# -- a resume or an export with other LoRA settings than the run's -----------------------------------------------


def _erft_run_state(cfg: ERFTConfig) -> tuple[ERFTModel, torch.optim.Optimizer, dict[str, torch.Tensor], dict]:
    """What train_erft builds before it resumes (base DiT and its record, the config's adapters, AdamW, EMA), the
    adapters random and AdamW one step in, so that a restore shows."""
    from lvstudio.train.diffusion_forcing import build_model

    torch.manual_seed(cfg.seed)
    base_model = build_model(cfg, VOCAB, 4).requires_grad_(False)
    base = {"dit_sha256": _digest(base_model.dit), "dit_config": base_model.dit.cfg.to_dict(), "init_dit": None}
    model = ERFTModel(add_lora(base_model.dit, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets), base_model.text)
    params = [p for _, p in _lora_params(model)]
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.1)
    opt = torch.optim.AdamW(params, lr=1e-3)
    sum(p.pow(2).sum() for p in params).backward()
    opt.step()
    return model, opt, {k: p.detach().clone() for k, p in _lora_params(model)}, base


def _misfit(call, path: Path, detail: str) -> None:  # noqa: ANN001 - call() must refuse the file at `path`
    """call() raises the LvError of a checkpoint that does not fit: exit 2, one line naming `path`, `detail` (a
    regex) and the way out."""
    from lvstudio.errors import DamagedFileError, LvError

    with pytest.raises(LvError) as caught:
        call()
    text = str(caught.value)
    assert caught.value.exit_code == 2 and not isinstance(caught.value, DamagedFileError), text
    assert text.startswith(f"{path}: the checkpoint does not fit this run's models ("), text
    assert re.search(detail, text), (detail, text)
    assert text.endswith(" — use the config the run was started with, or point out_dir at a new folder"), text
    assert "\n" not in text


def test_resume_and_export_with_another_lora_rank_or_targets_are_refused(tmp_path: Path) -> None:
    from lvstudio.models.lora import load_lora
    from lvstudio.train.erft import CHECKPOINT, LORA_FILE, _load_state, _save_state, export_erft_lora

    runs = {}
    for name, kw in (("all", {}), ("qv", {"lora_targets": "q,v"})):  # rank 4 on q,k,v,o,ffn.0,ffn.2 / on q,v only
        out = tmp_path / name
        out.mkdir()
        model, opt, ema, base = _erft_run_state(_cfg(str(out), **kw))
        _save_state(out, model, opt, ema, 2, base, 4.0)
        runs[name] = out / CHECKPOINT
    # (the run, what the new config changes, what the message says; 2 blocks x 10 adapted linears x A, B = 40
    # adapters, 16 of them on q and v; the resume compares the adapters and their EMA, the export the EMA)
    cases = (
        ("all", {"lora_rank": 8}, r"\(shape mismatches: ema\.blocks\.0\.cross_attn\.k\.lora_A\.weight \[4, 32\] "
                                  r"\(this run \[8, 32\]\), [^;]*, \.\.\. \((80|40) in all\)\)"),
        ("all", {"lora_targets": "q,v"}, r"\(unexpected: ema\.blocks\.0\.cross_attn\.k\.lora_A\.weight, [^;]* "
                                        r"\((48|24) in all\)\)"),
        ("qv", {}, r"\(missing: ema\.blocks\.0\.cross_attn\.k\.lora_A\.weight, [^;]* \((48|24) in all\)\)"),
        ("all", {"lora_alpha": 8.0}, r"\(its adapters were trained with lora_alpha = 4, this config has 8\)"),
    )
    for run, changed, detail in cases:
        path = runs[run]
        kept = path.read_bytes()
        cfg = _cfg(str(path.parent), **changed)
        # Resume: refused before anything is restored (the new run's adapters, EMA and AdamW are as they were).
        model, opt, ema, base = _erft_run_state(cfg)
        before = {k: p.detach().clone() for k, p in _lora_params(model)}
        opt_before = copy.deepcopy(opt.state_dict())
        _misfit(partial(_load_state, path, model, opt, ema, base, cfg.lora_alpha), path,
                detail.replace("ema", "lora", 1))
        assert all(torch.equal(p, before[k]) for k, p in _lora_params(model))
        assert all(torch.equal(ema[k], before[k]) for k in ema)
        assert str(opt.state_dict()) == str(opt_before)
        # Export: refused before anything is written.
        _misfit(partial(export_erft_lora, cfg), path, detail)
        assert not (path.parent / LORA_FILE).exists() and path.read_bytes() == kept
    # With the run's own settings both go through.
    model, opt, ema, base = _erft_run_state(_cfg(str(runs["qv"].parent), lora_targets="q,v"))
    assert _load_state(runs["qv"], model, opt, ema, base, 4.0) == 2
    state, meta = load_lora(export_erft_lora(_cfg(str(runs["qv"].parent), lora_targets="q,v")))
    assert meta["targets"] == "q,v" and all(torch.equal(state[k], ema[k]) for k in ema) and state.keys() == ema.keys()


def test_error_banks_of_another_config_are_refused(tmp_path: Path) -> None:
    from lvstudio.errors import LvError

    cfg = _cfg()  # 5 grids of 3 errors
    banks = ErrorBanks.for_config(cfg)
    for grid in (0, 4):
        banks.noise.insert(grid, torch.ones(4, 2, 4, 4))  # [C, N, h, w]
        banks.latent.insert(grid, -torch.ones(4, 2, 4, 4))
    path = banks.save(tmp_path / "erft_banks.rank0.step2.safetensors", 2)
    assert ErrorBanks.for_config(cfg).load(path, (4, 2, 4, 4)) == 2
    cases = ((cfg, (4, 4, 4, 4), "errors of shape [4, 2, 4, 4], this run makes [4, 4, 4, 4]"),  # another clip
             (_cfg(num_grids=3), (4, 2, 4, 4), "bank state g4 (1 errors) does not fit 3 grids x 3"))
    for other, shape, detail in cases:
        with pytest.raises(LvError) as caught:
            ErrorBanks.for_config(other).load(path, shape)
        assert str(caught.value) == (f"{path}: the error banks do not fit this run's config ({detail}) — use the "
                                     "config the run was started with, or point out_dir at a new folder")


def test_cli_resume_with_another_lora_rank_is_exit_2_one_line(tmp_path: Path) -> None:
    """`lvstudio train erft` in the out_dir of a run of another lora_rank: exit 2, one line, nothing written."""
    from typer.testing import CliRunner

    from lvstudio.cli import app
    from tests.helpers.df_tiny import config_file

    out = tmp_path / "run"
    out.mkdir()
    tiny_dataset().save(out / "latents.safetensors")  # the run's latent cache (no VAE here)
    config = tmp_path / "erft.toml"
    args = ["train", "erft", str(config), "--no-progress"]
    config_file(config, _cfg("run", steps=1, ckpt_every=1))
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, (first.exception, first.output)
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    assert {"checkpoint.safetensors", "erft_lora.safetensors"} <= files.keys()
    config_file(config, _cfg("run", steps=2, ckpt_every=1, lora_rank=8))
    again = CliRunner().invoke(app, args)
    lines = again.output.strip().splitlines()
    # exit 2 through the CLI's own handling (an escaping exception would be again.exception, exit 1)
    assert again.exit_code == 2 and isinstance(again.exception, SystemExit), (again.exception, again.output)
    assert len(lines) == 1 and "Traceback" not in again.output, again.output
    assert lines[0].startswith(f"{out / 'checkpoint.safetensors'}: the checkpoint does not fit this run's models "
                               "(shape mismatches: lora.blocks.0.cross_attn.k.lora_A.weight [4, 32] (this run [8, 32])"
                               ), lines[0]
    assert lines[0].endswith("— use the config the run was started with, or point out_dir at a new folder")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # nothing written, nothing changed


# -- the cross-clip backend with an ERFT LoRA ---------------------------------------------------------------------


def _lora_file(bundle, path: Path) -> Path:
    return write_random_lora(bundle.dit, path)


def _backend(bundle, seed: int = 1, **kw):
    from lvstudio.backends.erft_crossclip import ERFTCrossClipBackend
    from lvstudio.presets import CrossClipSettings
    from lvstudio.prompt_stream import PromptStreamBuffer

    buf = PromptStreamBuffer(bundle.text.encode, block_latents=2, fps=16)
    buf.add_shot(0.0, "a red ball over the sea")
    st = kw.pop("settings", CrossClipSettings(clip_frames=6, carry_frames=2, steps=2))
    return ERFTCrossClipBackend(bundle, buf, seed=seed, width=32, height=32, settings=st, **kw)


def test_backend_with_lora_differs_and_is_deterministic(tmp_path: Path) -> None:
    from lvstudio.errors import PresetError
    from lvstudio.presets import CrossClipSettings, FileEntry
    from tests.helpers.random_bundle import random_bundle

    bundle = random_bundle()
    before = {k: v.clone() for k, v in bundle.dit.state_dict().items()}
    path = _lora_file(bundle, tmp_path / "erft_lora.safetensors")
    plain = [_backend(bundle).step().latents for _ in range(1)] + [_backend(bundle, lora=False).step().latents]
    with_lora = _backend(bundle, lora=path)
    a = [with_lora.step().latents for _ in range(2)]
    again = _backend(bundle, lora=str(path))
    b = [again.step().latents for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert torch.equal(plain[0], plain[1]) and not torch.allclose(a[0], plain[0])
    assert not torch.equal(_backend(bundle, seed=2, lora=path).step().latents, a[0])
    assert all(torch.equal(v, before[k]) for k, v in bundle.dit.state_dict().items())  # bundle.dit untouched
    # the preset's role: settings.lora names a [files] entry next to the preset
    preset = bundle.preset.model_copy(update={"files": {"erft_lora": FileEntry(path=path.name)}, "folder": tmp_path})
    bundle.preset = preset
    st = CrossClipSettings(clip_frames=6, carry_frames=2, steps=2, lora="erft_lora")
    assert torch.equal(_backend(bundle, settings=st).step().latents, a[0])
    assert torch.equal(_backend(bundle, settings=st, lora=False).step().latents, plain[0])
    with pytest.raises(PresetError, match="names no ERFT LoRA"):
        _backend(bundle, lora=True)
    with pytest.raises(PresetError, match="does not exist"):
        _backend(bundle, lora=tmp_path / "nope.safetensors")


def test_shipped_config_matches_the_preset_backend() -> None:
    from lvstudio.presets import CrossClipSettings
    from lvstudio.train.common import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "presets/tiny/train_erft.toml", ERFTConfig)
    st = CrossClipSettings()
    assert (cfg.clip_frames, cfg.carry_frames, cfg.bidirectional, cfg.shift) == (st.clip_frames, st.carry_frames,
                                                                                 st.bidirectional, st.shift)
    assert cfg.init_dit == str((root / "runs/tiny_v2o/dit.safetensors").resolve())  # the CFG base
    assert cfg.out_dir == str((root / "runs/tiny_erft_v2").resolve())  # resolved: runs/ may be a symlink
    assert cfg.lora_targets == "q,k,v,o,ffn.0,ffn.2" and cfg.num_grids == 50


def test_large_dit_is_merged_in_place_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lvstudio.backends import erft_crossclip
    from lvstudio.errors import PresetError
    from tests.helpers.random_bundle import random_bundle

    bundle = random_bundle()
    path = _lora_file(bundle, tmp_path / "a.safetensors")
    small = _backend(bundle, lora=path)
    want = small.step().latents
    monkeypatch.setattr(erft_crossclip, "copy", None)  # would fail if a copy were made
    monkeypatch.setattr(erft_crossclip, "INPLACE_MERGE_PARAMS", 0)  # treat the tiny DiT as a large one
    first = _backend(bundle, lora=path)
    assert first.dit is bundle.dit and torch.equal(first.step().latents, want)
    assert torch.equal(_backend(bundle, lora=path).step().latents, want)  # not merged twice
    with pytest.raises(PresetError, match="already has the LoRA"):
        _backend(bundle, lora=_lora_file(random_bundle(seed=1), tmp_path / "b.safetensors"))
    with pytest.raises(PresetError, match="load the bundle again"):
        _backend(bundle, lora=False)
