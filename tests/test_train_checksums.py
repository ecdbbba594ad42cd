"""Every file a training recipe writes carries a checksum (`lvstudio.checked_files`) and is verified when read back.

For each recipe a bit is flipped inside a tensor of what it wrote (the header still parses, so only the checksum can
tell): a damaged checkpoint, error bank, export or LoRA is a DamagedFileError naming the file and what to do (exit 2
at the CLI, one line, no traceback); a damaged cache (the latent dataset, the ODE pairs) is built again, with a
warning, to the same contents. A clean round trip still gives back what was written. A checkpoint another recipe
wrote (in the out_dir of a run, or given to an export) is named with its kind and the way out, exit 2 at the CLI.
A checkpoint that does not fit the config's model is refused by the exports too. (The shards of an FSDP checkpoint
and their checksums.json: tests/test_fsdp.py; a LoRA rank or targets that changed: tests/test_erft.py.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from lvstudio.checked_files import DIGEST_KEY, load_checked, read_metadata
from lvstudio.errors import DamagedFileError
from lvstudio.models.tiny_vae import TinyVAE, TinyVAEConfig, load_vae, save_vae
from lvstudio.train.diffusion_forcing import DFConfig
from lvstudio.train.loop import CHECKPOINT, EMA, save_checkpoint
from tests.helpers.df_tiny import VOCAB, tiny_cfg
from tests.helpers.faults import flip_in_tensor, rng
from tests.helpers.vae_tiny import small_vae_config_file

ROOT = Path(__file__).resolve().parents[1]
SMALL_VAE = TinyVAEConfig(channels=(8, 8, 16))


def _damaged(path: Path, call, *words: str) -> DamagedFileError:  # noqa: ANN001 - any callable reading `path`
    """Flip a bit inside a tensor of `path`; `call()` must raise DamagedFileError naming it, with `words`."""
    flip_in_tensor(path, rng(f"{path.parent.name}/{path.name}"))
    with pytest.raises(DamagedFileError) as caught:
        call()
    text = str(caught.value)
    assert caught.value.path == path and str(path) in text and "do not match their checksum" in text, text
    for w in words:
        assert w in text, (w, text)
    return caught.value


def _stepped_adamw(model: nn.Module) -> torch.optim.Optimizer:
    """AdamW after one step (so that its state holds tensors)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sum(p.float().pow(2).sum() for p in params).backward()
    opt.step()
    return opt


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------------------------
# VAE recipe: checkpoint and export


def _vae_checkpoint(path: Path, seed: int = 0) -> tuple[TinyVAE, torch.optim.Optimizer]:
    from lvstudio.train.vae_recipe import VAETrainConfig, _save_checkpoint

    torch.manual_seed(seed)
    vae = TinyVAE(SMALL_VAE)
    opt = _stepped_adamw(vae)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_checkpoint(str(path), VAETrainConfig(out_dir=str(path.parent), model=SMALL_VAE), vae, opt, 7)
    return vae, opt


def test_vae_recipe_checkpoint_and_export_are_checked(tmp_path: Path) -> None:
    from lvstudio.train.vae_recipe import VAETrainConfig, _load_checkpoint

    path = tmp_path / "run" / "checkpoint.safetensors"
    vae, opt = _vae_checkpoint(path)
    assert DIGEST_KEY in read_metadata(path)
    cfg = VAETrainConfig(out_dir=str(path.parent), model=SMALL_VAE)
    torch.manual_seed(1)
    other = TinyVAE(SMALL_VAE)
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-3)
    assert _load_checkpoint(str(path), cfg, other, other_opt) == 7
    assert _equal(other.state_dict(), vae.state_dict())
    assert torch.equal(other_opt.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    _damaged(path, lambda: _load_checkpoint(str(path), cfg, other, other_opt), "move it away to start the run")
    # The export (vae.safetensors) that presets and the latent datasets read.
    export = tmp_path / "run" / "vae.safetensors"
    save_vae(vae, export)
    assert _equal(load_vae(export).state_dict(), vae.state_dict())
    _damaged(export, lambda: load_vae(export), "run the export or training that wrote it again")


@pytest.mark.slow
def test_a_damaged_vae_checkpoint_is_one_line_and_exit_2_at_the_cli(tmp_path: Path) -> None:
    config = small_vae_config_file(tmp_path / "vae.toml", "run")
    ckpt = tmp_path / "run" / "checkpoint.safetensors"
    _vae_checkpoint(ckpt)  # as a run of this config stopped after step 7 wrote it
    flip_in_tensor(ckpt, rng("cli-vae-checkpoint"))
    damaged = ckpt.read_bytes()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "lvstudio", "train", "vae", str(config)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    assert lines[0].startswith(f"{ckpt} is damaged: its contents do not match their checksum"), lines[0]
    assert "move it away to start the run from step 0" in lines[0]
    assert ckpt.read_bytes() == damaged  # nothing was written over it
    assert sorted(p.name for p in ckpt.parent.iterdir()) == ["checkpoint.safetensors"]


# ---------------------------------------------------------------------------------------------------------------
# ERFT: error banks, checkpoint, LoRA export


def test_erft_banks_checkpoint_and_lora_export_are_checked(tmp_path: Path) -> None:
    from lvstudio.models.lora import add_lora, load_lora
    from lvstudio.train.diffusion_forcing import build_model
    from lvstudio.train.erft import ERFTModel, ErrorBanks, _load_state, _lora_params, _save_state, export_erft_lora
    from tests.test_erft import _cfg

    cfg = _cfg(str(tmp_path))
    # Banks.
    banks = ErrorBanks.for_config(cfg)
    g = torch.Generator().manual_seed(0)
    for grid in (0, 2, 2, 4):
        banks.noise.insert(grid, torch.randn(4, 2, 4, 4, generator=g))
        banks.latent.insert(grid, torch.randn(4, 2, 4, 4, generator=g))
    bank_file = banks.save(tmp_path / "erft_banks.rank0.step2.safetensors", 2)
    again = ErrorBanks.for_config(cfg)
    assert again.load(bank_file) == 2
    assert _equal(again.noise.state_dict(), banks.noise.state_dict())
    assert _equal(again.latent.state_dict(), banks.latent.state_dict())
    _damaged(bank_file, lambda: again.load(bank_file), "delete it to continue with empty banks")

    # Checkpoint (adapters, EMA, optimizer, RNG) and the LoRA exported from it.
    def model(seed: int) -> ERFTModel:
        torch.manual_seed(seed)
        base = build_model(cfg, VOCAB, 4).requires_grad_(False)
        dit = add_lora(base.dit, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets)
        for _, p in _lora_params(ERFTModel(dit, base.text)):
            nn.init.normal_(p, std=0.1)
        return ERFTModel(dit, base.text)

    a = model(0)
    opt = _stepped_adamw(a)
    ema = {k: p.detach().clone() * 0.5 for k, p in _lora_params(a)}
    base = {"dit_sha256": "x"}
    _save_state(tmp_path, a, opt, ema, 2, base, cfg.lora_alpha)
    b = model(0)
    with torch.no_grad():
        for _, p in _lora_params(b):
            p.zero_()
    b_ema = {k: torch.zeros_like(v) for k, v in ema.items()}
    assert _load_state(tmp_path / CHECKPOINT, b, torch.optim.AdamW([p for _, p in _lora_params(b)]), b_ema, base,
                       cfg.lora_alpha) == 2
    assert _equal(dict(_lora_params(b)), dict(_lora_params(a))) and _equal(b_ema, ema)
    lora = export_erft_lora(cfg, tmp_path)
    load_checked(lora)  # carries its checksum
    state, _ = load_lora(lora)
    assert _equal(state, ema)
    _damaged(tmp_path / CHECKPOINT, lambda: export_erft_lora(cfg, tmp_path), "move it away")
    with pytest.raises(DamagedFileError, match="move it away"):
        _load_state(tmp_path / CHECKPOINT, b, torch.optim.AdamW([p for _, p in _lora_params(b)]), b_ema, base,
                    cfg.lora_alpha)
    _damaged(lora, lambda: load_checked(lora))


# ---------------------------------------------------------------------------------------------------------------
# Self-Forcing: export from the checkpoint, and the export read back as the next stage's init


def test_self_forcing_export_and_its_reads_are_checked(tmp_path: Path) -> None:
    from lvstudio.presets.load import load_dit
    from lvstudio.train.self_forcing import export_run, load_models
    from tests.test_self_forcing import tiny_dit, tiny_files, tiny_sf_cfg

    files = tiny_files(tmp_path / "base")
    cfg = tiny_sf_cfg(tmp_path / "run", files)
    generator = tiny_dit(3)
    ema = EMA(generator, 0.5)
    ema.shadow = {k: v * 0.5 for k, v in ema.shadow.items()}
    save_checkpoint(tmp_path / "run" / CHECKPOINT, nn.ModuleDict({"generator": generator}),
                    {"generator": _stepped_adamw(generator)}, ema, 3, {"recipe": "self-forcing"})
    export = export_run(cfg)
    assert export == tmp_path / "run" / "dit.safetensors" and DIGEST_KEY in read_metadata(export)
    assert _equal(load_dit(export).state_dict(), ema.shadow)
    # The export is the init_dit of the next stage: read through the recipe's own loader, verified.
    models = load_models(tiny_sf_cfg(tmp_path / "next", files, init_dit=str(export)), with_critic=False)
    assert _equal(models.generator.state_dict(), ema.shadow)
    _damaged(export, lambda: load_models(tiny_sf_cfg(tmp_path / "next", files, init_dit=str(export)), False))
    _damaged(tmp_path / "run" / CHECKPOINT, lambda: export_run(cfg), "move it away to start the run from step 0")


# ---------------------------------------------------------------------------------------------------------------
# Diffusion forcing: export, ship into a preset, init weights


def test_diffusion_forcing_export_ship_and_init_weights_are_checked(tmp_path: Path) -> None:
    from lvstudio.models.tiny_text import load_text_encoder
    from lvstudio.presets.load import load_dit
    from lvstudio.train.diffusion_forcing import build_model, export_checkpoint, ship_weights

    run = tmp_path / "run"
    cfg = tiny_cfg(str(run))
    torch.manual_seed(0)
    model = build_model(cfg, VOCAB, 4)
    ema = EMA(model, 0.5)
    ema.shadow = {k: v * 0.5 if v.is_floating_point() else v for k, v in ema.shadow.items()}
    save_checkpoint(run / CHECKPOINT, model, _stepped_adamw(model), ema, 2, {"recipe": "diffusion-forcing"})
    export_checkpoint(cfg, vocabulary=VOCAB)
    dit, text = run / "dit.safetensors", run / "text.safetensors"
    load_checked(dit), load_checked(text)  # written with their checksums
    assert _equal(load_dit(dit).state_dict(), {k[4:]: v for k, v in ema.shadow.items() if k.startswith("dit.")})
    assert _equal(load_text_encoder(text).state_dict(),
                  {k[5:]: v for k, v in ema.shadow.items() if k.startswith("text.")})
    # Shipped into a preset folder in fp16: a checksum of the fp16 tensors (not the copied fp32 one).
    preset = tmp_path / "presets" / "new"  # made by ship_weights
    shipped = ship_weights(run, preset)
    for path in shipped:
        tensors, meta = load_checked(path)
        assert meta["format"] == "pt" and "config" in meta
        assert all(v.dtype == torch.float16 for v in tensors.values() if v.is_floating_point())
    assert load_dit(preset / "dit.safetensors").cfg.dim == 32
    # The exports as init weights of a new run.
    init = cfg.model_copy(update={"init_dit": str(dit), "init_text": str(text)})
    again = build_model(init, VOCAB, 4)
    assert _equal(again.state_dict(), {k: v.float() for k, v in ema.shadow.items()})
    _damaged(dit, lambda: ship_weights(run, preset), "lvstudio train export")
    with pytest.raises(DamagedFileError, match="point init_dit at an intact file"):
        build_model(init, VOCAB, 4)
    _damaged(text, lambda: build_model(init.model_copy(update={"init_dit": None}), VOCAB, 4), "init_text")
    _damaged(run / CHECKPOINT, lambda: export_checkpoint(cfg, vocabulary=VOCAB), "move it away")


# ---------------------------------------------------------------------------------------------------------------
# Caches: the latent dataset and the ODE pairs are built again, to the same contents (the same tensors and metadata,
# so the same checksum; safetensors may order the metadata keys differently in the header)


def _contents(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (copies: safetensors may map the file, which the test then changes in place) and metadata."""
    tensors, meta = load_checked(path)
    return {k: v.clone() for k, v in tensors.items()}, meta


def _same(a: tuple[dict[str, torch.Tensor], dict[str, str]], b: tuple[dict[str, torch.Tensor], dict[str, str]]) -> bool:
    return _equal(a[0], b[0]) and a[1] == b[1]


def _no_warnings(call):  # noqa: ANN001, ANN202 - call() with warnings turned into errors
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return call()


def _latent_run(tmp_path: Path, size: int) -> tuple[DFConfig, Path]:
    """A config whose run encodes 2 world clips of 2 latents at `size` with a random small VAE, and its out_dir."""
    torch.manual_seed(0)
    save_vae(TinyVAE(SMALL_VAE), tmp_path / "vae.safetensors")
    cfg = tiny_cfg(str(tmp_path / "run"), vae=str(tmp_path / "vae.safetensors"), size=size, clip_latents=2,
                   latent_frames=2, dataset_clips=2, device="cpu")
    run = Path(cfg.out_dir)
    run.mkdir()
    return cfg, run


def test_a_damaged_latent_dataset_is_encoded_again_to_the_same_contents(tmp_path: Path) -> None:
    from lvstudio.train.common import DistInfo
    from lvstudio.train.data import LatentDataset, latent_dataset

    cfg, run = _latent_run(tmp_path, 32)
    data = latent_dataset(cfg, run, DistInfo())
    path = run / "latents.safetensors"
    good, written = _contents(path), path.stat().st_mtime_ns
    assert DIGEST_KEY in read_metadata(path) and data.latents.shape[0] == 2 and data.latents.shape[2] == 2
    loaded = _no_warnings(lambda: latent_dataset(cfg, run, DistInfo()))  # intact: read, not rebuilt
    assert path.stat().st_mtime_ns == written and torch.equal(loaded.latents, data.latents)
    _damaged(path, lambda: LatentDataset.load(path), "encodes it again")
    with pytest.warns(UserWarning, match=r"latents\.safetensors is damaged .*built again"):
        rebuilt = latent_dataset(cfg, run, DistInfo())
    assert _same(_contents(path), good) and torch.equal(rebuilt.latents, data.latents)
    assert rebuilt.captions == data.captions and torch.equal(rebuilt.objects, data.objects)


def test_a_latent_dataset_of_the_other_object_pose_is_encoded_again(tmp_path: Path) -> None:
    from lvstudio.train.common import DistInfo
    from lvstudio.train.data import LatentDataset, latent_dataset

    cfg, run = _latent_run(tmp_path, 64)
    free = latent_dataset(cfg, run, DistInfo())
    assert free.pose == {} and LatentDataset.load(run / "latents.safetensors").pose == {}
    upright_cfg = cfg.model_copy(update={"upright_objects": True, "centred_objects": True})
    with pytest.warns(UserWarning, match=r"objects start as the world draws them \(any angle, anywhere\), the "
                                         r"config asks for upright, centred; .*built again"):
        upright = latent_dataset(upright_cfg, run, DistInfo())
    again = _no_warnings(lambda: latent_dataset(upright_cfg, run, DistInfo()))  # now it matches: read, not rebuilt
    assert upright.pose == again.pose == {"upright": True, "centred": True}
    assert torch.equal(again.latents, upright.latents)
    assert upright.captions == free.captions and not torch.equal(upright.latents, free.latents)
    grid_cfg = upright_cfg.model_copy(update={"object_grid": 16})
    with pytest.warns(UserWarning, match=r"objects start upright, centred, the config asks for upright, centred, on a "
                                         r"16-px grid; .*built again"):
        on_grid = latent_dataset(grid_cfg, run, DistInfo())
    assert on_grid.pose == {"upright": True, "centred": True, "grid": 16}
    late_cfg = grid_cfg.model_copy(update={"late_start_prob": 0.5, "late_start_frames": 40})
    with pytest.warns(UserWarning, match=r"the config asks for upright, centred, on a 16-px grid, 50% of clips up to "
                                         r"40 frames late; .*built again"):
        late = latent_dataset(late_cfg, run, DistInfo())
    assert late.pose == {"upright": True, "centred": True, "grid": 16, "late_prob": 0.5, "late_frames": 40}
    assert _no_warnings(lambda: latent_dataset(late_cfg, run, DistInfo())).pose == late.pose


def test_a_damaged_ode_pair_part_is_made_again_to_the_same_contents(tmp_path: Path) -> None:
    from lvstudio.train.causal_distill import generate_ode_pairs, load_ode_pairs
    from lvstudio.train.self_forcing import load_models
    from tests.test_causal_distill import tiny_cd_cfg
    from tests.test_self_forcing import tiny_files

    cfg = tiny_cd_cfg(tmp_path / "run", tiny_files(tmp_path / "base"))
    models = load_models(cfg, with_critic=False)
    folder = generate_ode_pairs(cfg, models, tmp_path / "run")
    parts = sorted(folder.iterdir())
    good = [_contents(p) for p in parts]
    assert all(DIGEST_KEY in read_metadata(p) for p in parts)
    traj, _, prompts = _no_warnings(lambda: load_ode_pairs(folder))
    _damaged(parts[1], lambda: load_ode_pairs(folder), "makes it again")
    untouched = parts[0].stat().st_mtime_ns
    with pytest.warns(UserWarning, match=r"part_00001\.safetensors is damaged .*built again"):
        generate_ode_pairs(cfg, models, tmp_path / "run")
    assert all(_same(_contents(p), g) for p, g in zip(parts, good, strict=True))
    assert parts[0].stat().st_mtime_ns == untouched
    again, _, again_prompts = load_ode_pairs(folder)
    assert torch.equal(again, traj) and again_prompts == prompts


# ---------------------------------------------------------------------------------------------------------------
# LoRA files (ERFT's export, a preset's lora): verified when they carry a checksum


def test_a_damaged_lora_is_named_with_the_fix_and_one_without_a_checksum_is_still_read(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from lvstudio.models.lora import load_lora, save_lora

    g = torch.Generator().manual_seed(0)
    state = {"blocks.0.self_attn.q.lora_A.weight": torch.randn(2, 32, generator=g),
             "blocks.0.self_attn.q.lora_B.weight": torch.randn(32, 2, generator=g)}
    path = save_lora(tmp_path / "lora.safetensors", state, 2, 4.0)
    loaded, meta = load_lora(path)
    assert _equal(loaded, state) and meta["rank"] == 2 and meta["alpha"] == 4.0
    plain = tmp_path / "plain.safetensors"  # from elsewhere: no checksum, only parsed
    save_file(state, str(plain), metadata={"rank": "2", "alpha": "4.0"})
    assert _equal(load_lora(plain)[0], state)
    _damaged(path, lambda: load_lora(path), "run the export or training that wrote it again")


# ---------------------------------------------------------------------------------------------------------------
# A checkpoint of another recipe: named, with its kind and the way out, before anything is restored or written


def _df_checkpoint(path: Path, recipe: str | None = "diffusion-forcing") -> None:
    from lvstudio.train.diffusion_forcing import build_model

    torch.manual_seed(0)
    model = build_model(tiny_cfg(str(path.parent)), VOCAB, 4)
    save_checkpoint(path, model, _stepped_adamw(model), EMA(model, 0.5), 2, {"recipe": recipe} if recipe else None)


def _refused(call, match: str) -> None:  # noqa: ANN001 - call() must raise an LvError (exit 2) matching `match`
    from lvstudio.errors import LvError

    with pytest.raises(LvError, match=match) as caught:
        call()
    assert caught.value.exit_code == 2 and not isinstance(caught.value, DamagedFileError)


def test_a_checkpoint_of_another_recipe_is_refused_by_every_reader(tmp_path: Path) -> None:
    from lvstudio.train.causal_distill import RECIPE
    from lvstudio.train.diffusion_forcing import build_model, export_checkpoint, train_diffusion_forcing
    from lvstudio.train.erft import _load_state, export_erft_lora
    from lvstudio.train.loop import load_checkpoint
    from lvstudio.train.self_forcing import export_run
    from tests.helpers.df_tiny import tiny_dataset
    from tests.test_erft import _cfg
    from tests.test_self_forcing import tiny_dit, tiny_files, tiny_sf_cfg

    vae_ckpt, df_ckpt, sf_ckpt = (tmp_path / name / CHECKPOINT for name in ("vae", "df", "sf"))
    _vae_checkpoint(vae_ckpt)
    _df_checkpoint(df_ckpt)
    generator = tiny_dit(3)
    save_checkpoint(sf_ckpt, nn.ModuleDict({"generator": generator}), {"generator": _stepped_adamw(generator)},
                    EMA(generator, 0.5), 3, {"recipe": "causvid-dmd"})
    vae_bytes = vae_ckpt.read_bytes()
    # Resume: a VAE run's checkpoint in a diffusion-forcing run's out_dir, and the other way round.
    _refused(lambda: train_diffusion_forcing(tiny_cfg(str(vae_ckpt.parent)), progress=False, dataset=tiny_dataset(),
                                             vocabulary=VOCAB),
             rf"^{vae_ckpt} is a vae checkpoint, not a diffusion-forcing one — point out_dir at a new folder, or use "
             r"the config of the vae run that wrote it \(`lvstudio train vae`\)$")
    assert vae_ckpt.read_bytes() == vae_bytes and sorted(p.name for p in vae_ckpt.parent.iterdir()) == [CHECKPOINT]
    from lvstudio.train.vae_recipe import VAETrainConfig, _load_checkpoint

    vae = TinyVAE(SMALL_VAE)
    _refused(lambda: _load_checkpoint(str(df_ckpt), VAETrainConfig(out_dir=str(tmp_path), model=SMALL_VAE), vae,
                                      torch.optim.AdamW(vae.parameters())),
             "is a diffusion-forcing checkpoint, not a vae one")
    # The other recipes' resume code (ERFT, causal-distill) and the exports.
    _refused(lambda: _load_state(df_ckpt, None, None, {}, {}, 16.0),
             "is a diffusion-forcing checkpoint, not an erft one")
    _refused(lambda: export_erft_lora(_cfg(str(df_ckpt.parent))), "not an erft one")
    model = build_model(tiny_cfg(str(tmp_path)), VOCAB, 4)
    _refused(lambda: load_checkpoint(vae_ckpt, model, None, None, RECIPE), "is a vae checkpoint, not a "
             r"causal-distill-ode one .*\(`lvstudio train vae`\)")
    _refused(lambda: export_checkpoint(tiny_cfg(str(sf_ckpt.parent)), vocabulary=VOCAB),
             r"is a causvid-dmd checkpoint, not a diffusion-forcing or streaming one .*`lvstudio train self-forcing`")
    _refused(lambda: export_run(tiny_sf_cfg(df_ckpt.parent, tiny_files(tmp_path / "base"))),
             "is a diffusion-forcing checkpoint, not a self-forcing or causvid-dmd or mixed-history or "
             "causal-distill-ode one")
    assert not (df_ckpt.parent / "dit.safetensors").exists() and not (sf_ckpt.parent / "dit.safetensors").exists()
    # A checkpoint that names no recipe (not one lvstudio wrote), and one of the right recipe but another model.
    _df_checkpoint(tmp_path / "none" / CHECKPOINT, recipe=None)
    _refused(lambda: load_checkpoint(tmp_path / "none" / CHECKPOINT, model, None, None, "diffusion-forcing"),
             "its metadata names none")
    bigger = build_model(tiny_cfg(str(tmp_path), dit={"dim": 64, "num_heads": 2, "ffn_dim": 64, "num_layers": 2,
                                                       "freq_dim": 32}), VOCAB, 4)
    _refused(lambda: load_checkpoint(df_ckpt, bigger, None, None, "diffusion-forcing"),
             rf"^{df_ckpt}: the checkpoint does not fit this run's models \(shape mismatches: model\.dit\.")


def test_a_checkpoint_of_another_model_size_is_refused_by_the_exports(tmp_path: Path) -> None:
    """The diffusion-forcing and Self-Forcing exports of a checkpoint whose model is not the config's (another DiT
    size): the LvError naming the file and the mis-shaped tensors, before anything is written (the Self-Forcing
    export used to write a dit.safetensors whose config did not describe its tensors)."""
    import json

    from safetensors.torch import save_file

    from lvstudio.models.wan_dit import WanDiT
    from lvstudio.train.diffusion_forcing import export_checkpoint
    from lvstudio.train.self_forcing import export_run
    from tests.test_self_forcing import tiny_dit, tiny_files, tiny_sf_cfg

    wider = {"dim": 64, "num_heads": 2, "ffn_dim": 64, "num_layers": 2, "freq_dim": 32}
    df_ckpt, sf_ckpt = tmp_path / "df" / CHECKPOINT, tmp_path / "sf" / CHECKPOINT
    _df_checkpoint(df_ckpt)  # dim 32
    generator = tiny_dit(3)  # dim 32
    save_checkpoint(sf_ckpt, nn.ModuleDict({"generator": generator}), {"generator": _stepped_adamw(generator)},
                    EMA(generator, 0.5), 3, {"recipe": "self-forcing"})
    wide_dit = WanDiT(generator.cfg.__class__.from_dict(generator.cfg.to_dict() | {"dim": 64}))
    init = tmp_path / "wide.safetensors"
    save_file({k: v.contiguous() for k, v in wide_dit.state_dict().items()}, str(init),
              metadata={"config": json.dumps(wide_dit.cfg.to_dict()), "format": "pt"})
    detail = r"\(shape mismatches: {}\S+ \[\d+(, \d+)*\] \(this run \[\d+(, \d+)*\]\), .* in all\)\) — use the config"
    _refused(lambda: export_checkpoint(tiny_cfg(str(df_ckpt.parent), dit=wider), vocabulary=VOCAB),
             rf"^{df_ckpt}: the checkpoint does not fit this run's models " + detail.format(r"model\.dit\."))
    _refused(lambda: export_run(tiny_sf_cfg(sf_ckpt.parent, tiny_files(tmp_path / "base"), init_dit=str(init))),
             rf"^{sf_ckpt}: the checkpoint does not fit this run's models " + detail.format(r"ema\."))
    assert sorted(p.name for p in df_ckpt.parent.iterdir()) == [CHECKPOINT]
    assert sorted(p.name for p in sf_ckpt.parent.iterdir()) == [CHECKPOINT]


def test_a_checkpoint_of_another_recipe_is_one_line_and_exit_2_at_the_cli(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lvstudio.cli import app
    from tests.helpers.df_tiny import tiny_config_file, tiny_dataset

    # A diffusion-forcing checkpoint in the out_dir of a VAE run ...
    vae_config = small_vae_config_file(tmp_path / "vae.toml", "vae_run")
    df_ckpt = tmp_path / "vae_run" / CHECKPOINT
    _df_checkpoint(df_ckpt)
    # ... and a VAE run's checkpoint in the out_dir of a diffusion-forcing run (its latent cache in place).
    df_config = tiny_config_file(tmp_path / "df.toml", "df_run")
    vae_ckpt = tmp_path / "df_run" / CHECKPOINT
    _vae_checkpoint(vae_ckpt)
    tiny_dataset().save(tmp_path / "df_run" / "latents.safetensors")
    for args, ckpt, words in ((["train", "vae", str(vae_config)], df_ckpt, "diffusion-forcing checkpoint, not a vae"),
                              (["train", "diffusion-forcing", str(df_config), "--no-progress"], vae_ckpt,
                               "vae checkpoint, not a diffusion-forcing")):
        kept = ckpt.read_bytes()
        result = CliRunner().invoke(app, args)
        lines = result.output.strip().splitlines()
        # exit 2 through the CLI's own handling (an escaping exception would be result.exception, exit 1)
        assert result.exit_code == 2 and isinstance(result.exception, SystemExit), (result.exception, result.output)
        assert len(lines) == 1 and "Traceback" not in result.output, result.output
        assert lines[0].startswith(f"{ckpt} is a {words} one — point out_dir at a new folder"), lines[0]
        assert ckpt.read_bytes() == kept


def test_rank_0_encodes_the_dataset_on_every_rank_s_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The other ranks only wait at the barrier while rank 0 encodes, so it encodes on threads x world_size
    threads, then gives the setting back."""
    from lvstudio.train import data as data_module
    from lvstudio.train.common import DistInfo

    cfg, run = _latent_run(tmp_path, 32)
    cfg = cfg.model_copy(update={"threads": 1})
    seen: list[int] = []
    encode = data_module.encode_world_dataset

    def counting(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        seen.append(torch.get_num_threads())
        return encode(*args, **kwargs)

    monkeypatch.setattr(data_module, "encode_world_dataset", counting)
    monkeypatch.setattr(data_module, "barrier", lambda info: None)  # no process group in this test
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        data_module.latent_dataset(cfg, run, DistInfo(rank=0, world_size=3))
        assert seen == [3] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
