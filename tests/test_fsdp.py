"""FSDP training (`--fsdp`): sharded checkpoints (save, load, consolidate), the refusals, and under torchrun (2 CPU
processes, gloo) the same loss curve as DDP, an exact resume and loadable exports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from lvstudio.errors import LvError
from lvstudio.train.common import DistInfo
from lvstudio.train.sharding import consolidate, latest_sharded, load_sharded, save_sharded
from tests.helpers.df_tiny import VOCAB, tiny_cfg, tiny_dataset

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
    # Step 2: a sharded checkpoint (one shard file per rank), and a resume that continues exactly.
    step_dir = tmp_path / "fsdp" / "checkpoint.dcp" / "step-00000004"
    assert sorted(p.name for p in step_dir.iterdir()) == [
        "meta.json", "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
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
