"""FSDP training (`--fsdp`): sharded checkpoints (save, load, consolidate), the refusals, and under torchrun (2 CPU
processes, gloo) the same loss curve as DDP, an exact resume and loadable exports."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from lvstudio.checked_folders import MANIFEST
from lvstudio.errors import DamagedFileError, LvError
from lvstudio.train.common import DistInfo
from lvstudio.train.sharding import consolidate, latest_sharded, load_sharded, save_sharded
from tests.helpers.df_tiny import VOCAB, tiny_cfg, tiny_config_file, tiny_dataset
from tests.helpers.faults import flip_in_tensor, rng

ROOT = Path(__file__).resolve().parents[1]


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model.w": torch.randn(5, 3, generator=g), "optim.0.step": torch.tensor(3.0),
            "rng.torch": torch.randint(0, 255, (16,), dtype=torch.uint8, generator=g)}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_sharded_checkpoint_round_trip_in_one_process(tmp_path: Path) -> None:
    meta = {"step": "2", "extra": "{}", "format": "pt"}
    save_sharded(tmp_path, _tensors(0), meta, 2, DistInfo())
    last = save_sharded(tmp_path, _tensors(1), {**meta, "step": "4"}, 4, DistInfo())
    assert latest_sharded(tmp_path) == last and last.name == "step-00000004"
    assert sorted(p.name for p in (tmp_path / "checkpoint.dcp").iterdir()) == ["step-00000004"]  # older step gone
    into = {k: torch.zeros_like(v) for k, v in _tensors(9).items()}
    assert load_sharded(last, into)["step"] == "4"
    assert all(torch.equal(into[k], v) for k, v in _tensors(1).items())
    one = consolidate(last, tmp_path / "one.safetensors")
    assert all(torch.equal(load_file(str(one))[k], v) for k, v in _tensors(1).items())
    with safe_open(str(one), "pt") as f:
        assert f.metadata()["step"] == "4"
    with pytest.raises(LvError, match=r"does not fit.*Size mismatch"):
        load_sharded(last, {"model.w": torch.zeros(4, 3)})


def _step_copy(step_dir: Path, to: Path) -> Path:
    """A copy of a step folder in its own checkpoint.dcp (so that each damage is tried on an intact one)."""
    dest = to / "checkpoint.dcp" / step_dir.name
    shutil.copytree(step_dir, dest)
    return dest


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_a_sharded_checkpoint_lists_its_files_in_a_manifest_and_each_damage_is_named(tmp_path: Path) -> None:
    meta = {"step": "2", "extra": json.dumps({"recipe": "diffusion-forcing"}), "format": "pt"}
    step_dir = save_sharded(tmp_path / "run", _tensors(0), meta, 2, DistInfo())
    # Step 1: checksums.json lists every other file of the folder with its size and sha256.
    manifest = json.loads((step_dir / MANIFEST).read_text())
    files = sorted(p.name for p in step_dir.iterdir() if p.name != MANIFEST)
    assert "meta.json" in files and any(f.endswith(".safetensors") for f in files)
    assert manifest["format"] == "lvstudio.checksums/1" and sorted(manifest["files"]) == files
    for name in files:
        data = (step_dir / name).read_bytes()
        assert manifest["files"][name] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    into = {k: torch.zeros_like(v) for k, v in _tensors(9).items()}
    assert load_sharded(step_dir, into, "diffusion-forcing")["step"] == "2"
    assert all(torch.equal(into[k], v) for k, v in _tensors(0).items())
    with pytest.raises(LvError, match=r"is a diffusion-forcing checkpoint, not a vae one — point out_dir at a new"):
        load_sharded(step_dir, into, "vae")
    # Step 2: each kind of damage, on a copy of the intact folder: resume (load_sharded) and export (consolidate)
    # name the file and the fix before DCP reads anything.
    shard = next(f for f in files if f.endswith(".safetensors"))

    def flip(d: Path) -> None:
        flip_in_tensor(d / shard, rng("fsdp-manifest-shard"))

    def truncate(d: Path) -> None:
        (d / shard).write_bytes((d / shard).read_bytes()[:-3])

    def step_changed(d: Path) -> None:
        (d / "meta.json").write_text((d / "meta.json").read_text().replace('"step": 2', '"step": 4'))

    cases = [(flip, shard, "its contents do not match their checksum in checksums.json (changed bytes)"),
             (truncate, shard, "not the"),
             (lambda d: (d / shard).unlink(), shard, "the file is missing (checksums.json lists it)"),
             (lambda d: (d / "extra.safetensors").write_bytes(b"x"), "extra.safetensors", "is not part of it"),
             (step_changed, "meta.json", "do not match their checksum"),
             (lambda d: (d / MANIFEST).write_text("{not json"), MANIFEST, "cannot be parsed")]
    for i, (damage, name, words) in enumerate(cases):
        copy = _step_copy(step_dir, tmp_path / f"case{i}")
        damage(copy)
        for read in (lambda c=copy: load_sharded(c, dict(into)), lambda c=copy: consolidate(c, c.parent / "x")):
            with pytest.raises(DamagedFileError) as caught:
                read()
            text = str(caught.value)
            assert caught.value.path == copy / name and text.startswith(f"{copy / name} is damaged: "), text
            assert words in text, (words, text)
            assert f"restore {copy} from a backup, or move {copy.parent} away to start the run from step 0" in text
        assert not (copy.parent / "x").exists()
    # Step 3: a folder written before manifests existed is read as before (unchecked).
    old = _step_copy(step_dir, tmp_path / "old")
    (old / MANIFEST).unlink()
    into = {k: torch.zeros_like(v) for k, v in _tensors(9).items()}
    assert load_sharded(old, into)["step"] == "2" and all(torch.equal(into[k], v) for k, v in _tensors(0).items())
    assert load_file(str(consolidate(old, tmp_path / "old.safetensors"))).keys() == _tensors(0).keys()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_export_of_a_damaged_sharded_checkpoint_is_one_line_and_exit_2(tmp_path: Path) -> None:
    from lvstudio.cli import app
    from lvstudio.train.diffusion_forcing import build_model
    from lvstudio.train.loop import EMA, checkpoint_state
    from lvstudio.world import vocabulary

    config = tiny_config_file(tmp_path / "df.toml", "run")
    run = tmp_path / "run"
    torch.manual_seed(0)
    model = build_model(tiny_cfg(str(run)), vocabulary(), 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tensors, meta = checkpoint_state(model, {"": opt}, EMA(model, 0.5), 2, {"recipe": "diffusion-forcing"})
    step_dir = save_sharded(run, tensors, meta, 2, DistInfo())
    result = CliRunner().invoke(app, ["train", "export", str(config)])
    assert result.exit_code == 0, result.output
    (run / "consolidated.safetensors").unlink()
    (run / "dit.safetensors").unlink()
    shard = sorted(step_dir.glob("shard-*.safetensors"))[0]
    flip_in_tensor(shard, rng("fsdp-export-shard"))
    result = CliRunner().invoke(app, ["train", "export", str(config)])
    lines = result.output.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith(f"{shard} is damaged: its contents do not match their checksum"), lines[0]
    assert "move " in lines[0] and "away to start the run from step 0" in lines[0]
    assert not (run / "consolidated.safetensors").exists() and not (run / "dit.safetensors").exists()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_fsdp_is_refused_in_one_process_and_a_run_keeps_its_checkpoint_kind(tmp_path: Path) -> None:
    from lvstudio.train.diffusion_forcing import train_diffusion_forcing

    with pytest.raises(LvError, match="torchrun"):
        train_diffusion_forcing(tiny_cfg(str(tmp_path / "a"), fsdp=True), progress=False, dataset=tiny_dataset(),
                                vocabulary=VOCAB)
    assert not (tmp_path / "a").exists()
    save_sharded(tmp_path / "b", _tensors(0), {"step": "2"}, 2, DistInfo())
    with pytest.raises(LvError, match="--fsdp"):
        train_diffusion_forcing(tiny_cfg(str(tmp_path / "b")), progress=False, dataset=tiny_dataset(),
                                vocabulary=VOCAB)


def test_cli_fsdp_flag_reaches_the_recipe_and_recipes_without_fsdp_say_so(tmp_path: Path) -> None:
    from lvstudio.cli import app

    result = CliRunner().invoke(app, ["train", "diffusion-forcing", str(ROOT / "presets/tiny/train_df.toml"),
                                      "--fsdp"])
    assert result.exit_code == 2 and "torchrun --nproc_per_node" in result.output
    from lvstudio.train.erft import ERFTConfig, train_erft

    with pytest.raises(LvError, match="erft does not run under FSDP"):
        train_erft(ERFTConfig(out_dir=str(tmp_path / "e"), fsdp=True), progress=False)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(os.environ.get("LVSTUDIO_SKIP_DISTRIBUTED") == "1", reason="LVSTUDIO_SKIP_DISTRIBUTED=1")
def test_fsdp_matches_ddp_resumes_exactly_and_exports(tmp_path: Path) -> None:
    from lvstudio.models.tiny_text import load_text_encoder
    from lvstudio.presets.load import load_dit
    from lvstudio.train.diffusion_forcing import export_checkpoint
    from lvstudio.train.self_forcing import export_run
    from tests.test_self_forcing import tiny_files, tiny_sf_cfg

    files = tiny_files(tmp_path / "base")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "helpers" / "dist_fsdp.py"), str(tmp_path), str(tmp_path / "base")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(ranks[0][k]["weights_sha256"] == ranks[1][k]["weights_sha256"] for k in ranks[0])

    def log(name: str) -> list[dict]:
        return [json.loads(x) for x in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]

    # Step 1: the same loss curve (and gradient norms, clipped over the shards) as DDP, within float tolerance.
    ddp, fsdp = log("ddp"), log("fsdp")
    assert [r["step"] for r in fsdp] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in fsdp] == pytest.approx([r[key] for r in ddp], rel=1e-4)
    sf_ddp, sf_fsdp = log("sf_ddp"), log("sf_fsdp")
    for key in ("loss_g", "loss_c"):
        assert [r[key] for r in sf_fsdp] == pytest.approx([r[key] for r in sf_ddp], rel=1e-4)
    # Step 2: a sharded checkpoint (one shard file per rank, checksums.json of them all), and a resume that continues
    # exactly (from a checkpoint its manifest verified).
    step_dir = tmp_path / "fsdp" / "checkpoint.dcp" / "step-00000004"
    assert sorted(p.name for p in step_dir.iterdir()) == [
        "checksums.json", "meta.json", "shard-00001-model-00001-of-00001.safetensors",
        "shard-00002-model-00001-of-00001.safetensors"]
    assert [r["loss"] for r in log("resumed")] == [r["loss"] for r in fsdp]
    assert ranks[0]["resumed"]["weights_sha256"] == ranks[0]["fsdp"]["weights_sha256"]
    # Step 3: export in one process gathers the shards into one file and writes the same EMA weights the run wrote.
    for run, export in (("fsdp", lambda: export_checkpoint(tiny_cfg(str(tmp_path / "fsdp")), vocabulary=VOCAB)),
                        ("sf_fsdp", lambda: export_run(tiny_sf_cfg(tmp_path / "sf_fsdp", files)))):
        written = load_file(str(tmp_path / run / "dit.safetensors"))
        (tmp_path / run / "dit.safetensors").unlink()
        export()
        assert (tmp_path / run / "consolidated.safetensors").exists()
        exported = load_file(str(tmp_path / run / "dit.safetensors"))
        assert exported.keys() == written.keys() and all(torch.equal(exported[k], written[k]) for k in written)
        assert load_dit(tmp_path / run / "dit.safetensors").cfg.dim == 32
    assert load_text_encoder(tmp_path / "fsdp" / "text.safetensors").cfg.vocab[1:] == tuple(sorted(VOCAB))


def _launch_ranks(args: list[str], cwd: Path, timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """`python -m lvstudio ARGS` in 2 processes that join one gloo group as torchrun starts them (RANK, WORLD_SIZE,
    MASTER_ADDR/PORT), so that each rank's own exit code and stderr can be read; a rank still running after
    `timeout` seconds (one waiting in a collective for a rank that gave up) fails the test."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "lvstudio", *args], cwd=cwd, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    done = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank was still running after {timeout} s (a hang): {args}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(os.environ.get("LVSTUDIO_SKIP_DISTRIBUTED") == "1", reason="LVSTUDIO_SKIP_DISTRIBUTED=1")
def test_a_damaged_shard_stops_every_rank_with_exit_2_and_an_old_folder_still_resumes(tmp_path: Path) -> None:
    from tests.helpers.faults import tree_state

    run, old = tmp_path / "run", tmp_path / "old"
    run.mkdir()
    tiny_dataset().save(run / "latents.safetensors")  # the run's latent cache: no VAE needed

    def train(out_dir: str, steps: int) -> list[subprocess.CompletedProcess]:
        config = tiny_config_file(tmp_path / f"{out_dir}{steps}.toml", out_dir, steps=steps)
        return _launch_ranks(["train", "diffusion-forcing", str(config), "--fsdp", "--no-progress"], tmp_path)

    # Step 1: two steps under FSDP; the step folder lists its files in checksums.json.
    ranks = train("run", 2)
    assert [p.returncode for p in ranks] == [0, 0], ranks[0].stderr[-3000:] + ranks[1].stderr[-3000:]
    step_dir = run / "checkpoint.dcp" / "step-00000002"
    files = sorted(p.name for p in step_dir.iterdir())
    assert files == ["checksums.json", "meta.json", "shard-00001-model-00001-of-00001.safetensors",
                     "shard-00002-model-00001-of-00001.safetensors"]
    assert sorted(json.loads((step_dir / MANIFEST).read_text())["files"]) == [f for f in files if f != MANIFEST]
    # A copy as a version without manifests would have left it.
    shutil.copytree(run, old)
    (old / "checkpoint.dcp" / "step-00000002" / MANIFEST).unlink()
    # Step 2: a bit flipped in rank 1's shard: both ranks stop at the resume, exit 2, with the same one line; no rank
    # hangs (every rank gets rank 0's verdict), nothing in out_dir changes.
    shard = step_dir / "shard-00002-model-00001-of-00001.safetensors"
    flip_in_tensor(shard, rng("fsdp-resume-shard"))
    before = tree_state(run)
    ranks = train("run", 4)
    for p in ranks:
        lines = p.stderr.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr + p.stdout, p.stderr[-3000:]
        assert lines[0].startswith(f"{shard} is damaged: its contents do not match their checksum in checksums.json")
        assert f"move {run / 'checkpoint.dcp'} away to start the run from step 0" in lines[0], lines[0]
    assert tree_state(run) == before
    # Step 3: the folder without a manifest resumes as before (steps 3 and 4), and its next save writes one.
    ranks = train("old", 4)
    assert [p.returncode for p in ranks] == [0, 0], ranks[0].stderr[-3000:] + ranks[1].stderr[-3000:]
    assert [json.loads(x)["step"] for x in (old / "train_log.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert (old / "checkpoint.dcp" / "step-00000004" / MANIFEST).is_file()
