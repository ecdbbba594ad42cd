"""The fault suite, training and Hub pulls: a stop signal in the middle of a training run, a full disk when a
checkpoint is written, a damaged checkpoint, and a full or forbidden disk while a preset downloads.

Training runs the real Diffusion Forcing recipe on tiny shapes (tests/helpers/df_tiny.py) under the CLI's own guard
(`lvstudio.cli.training_guard`: stop signals and I/O errors), and checks that the run continued after the fault ends
with the same weights as one that never stopped. Pulls never touch the network: the download is patched to fail as a
full or forbidden disk makes huggingface_hub fail.
"""

from __future__ import annotations

import errno as errnos
import json
import os
import signal
import socket
from pathlib import Path

import pytest

from lvstudio.cli import training_guard
from lvstudio.errors import DamagedFileError, IOFailure
from lvstudio.stop_signals import current_stop
from lvstudio.train.loop import TrainingStopped
from tests.helpers.df_tiny import VOCAB, tiny_cfg, tiny_dataset
from tests.helpers.fault_render import assert_clean_exit, cli
from tests.helpers.faults import ERRNO_WORDS, FailingWrites, Fault, damage, lost_bytes, rng, tree_state

STEPS = 6
COMMAND = "lvstudio train diffusion-forcing run.toml"


def _train(out: Path) -> dict:
    """The recipe as `lvstudio train diffusion-forcing` runs it (under its guard)."""
    from lvstudio.train.diffusion_forcing import train_diffusion_forcing

    with training_guard(COMMAND, Path("run.toml"), str(out)):
        return train_diffusion_forcing(tiny_cfg(str(out), steps=STEPS, ckpt_every=4), progress=False,
                                       dataset=tiny_dataset(), vocabulary=VOCAB)


def _losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, list[float]]:
    out = tmp_path_factory.mktemp("train-ref")
    return _train(out)["weights_sha256"], _losses(out)


@pytest.mark.slow
def test_a_stop_signal_ends_training_after_the_step_with_a_checkpoint(reference, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from lvstudio.train import diffusion_forcing

    k = rng("train-signal").randint(1, STEPS - 1)
    calls = {"n": 0}
    real_loss = diffusion_forcing.df_loss

    def loss(*args, **kw):  # noqa: ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] == k:  # SIGTERM arrives while step k-1 is computed
            assert current_stop() is not None
            signal.raise_signal(signal.SIGTERM)
        return real_loss(*args, **kw)

    fault = Fault("training: SIGTERM mid-step")
    with monkeypatch.context() as mp:
        mp.setattr(diffusion_forcing, "df_loss", loss)
        with pytest.raises(TrainingStopped) as stopped:
            _train(tmp_path)
    assert stopped.value.exit_code == 143
    assert f"SIGTERM: training stopped after step {k} of {STEPS}; a checkpoint of step {k} is saved" in str(
        stopped.value) and f"continue with: {COMMAND}" in str(stopped.value)
    from lvstudio.checked_files import read_metadata

    assert read_metadata(tmp_path / "checkpoint.safetensors")["step"] == str(k)
    done = _train(tmp_path)
    assert (done["weights_sha256"], _losses(tmp_path)) == reference
    fault.survived()


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_the_run_continues(reference, tmp_path: Path) -> None:
    fault = Fault("training: ENOSPC writing a checkpoint")
    with FailingWrites(at=2, code=errnos.ENOSPC) as writes, pytest.raises(IOFailure) as failed:
        _train(tmp_path)  # the checkpoint of step 6 hits the full disk (the one of step 4 was written)
    assert writes.failed and "checkpoint.safetensors" in str(failed.value)
    assert failed.value.exit_code == 74
    text = str(failed.value)
    assert "no space left on the device" in text and "The last checkpoint is intact" in text
    assert f"continue with: {COMMAND}" in text and "set out_dir in run.toml to another disk" in text
    assert not list(tmp_path.glob(".*partial"))
    from lvstudio.checked_files import read_metadata

    assert read_metadata(tmp_path / "checkpoint.safetensors")["step"] == "4"
    done = _train(tmp_path)
    assert done["weights_sha256"] == reference[0]
    fault.survived()


@pytest.mark.slow
def test_a_damaged_checkpoint_is_named_before_anything_loads(reference, tmp_path: Path) -> None:
    from lvstudio.train.diffusion_forcing import train_diffusion_forcing

    train_diffusion_forcing(tiny_cfg(str(tmp_path), steps=4, ckpt_every=4), progress=False, dataset=tiny_dataset(),
                            vocabulary=VOCAB)
    ckpt = tmp_path / "checkpoint.safetensors"
    good = ckpt.read_bytes()
    fault = Fault("training: damaged checkpoint")
    damage(ckpt, "flip", rng("train-damage"))
    with pytest.raises(DamagedFileError) as caught:
        _train(tmp_path)
    assert caught.value.exit_code == 2 and str(ckpt) in str(caught.value)
    assert "move it away to start the run from step 0" in str(caught.value)
    ckpt.write_bytes(good)  # restored from a backup
    log = tmp_path / "train_log.jsonl"
    log.write_text("\n".join(log.read_text().splitlines()[:4]) + "\n")  # the log of the 4 steps the checkpoint holds
    assert _train(tmp_path)["weights_sha256"] == reference[0]
    fault.survived()


# ---------------------------------------------------------------------------------------------------------------
# Pulls


@pytest.fixture()
def hub_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    from tests.helpers.hub_cache import write_test_preset

    def refuse(*_a, **_k):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    write_test_preset(tmp_path / "presets", "causvid-1.3b")
    cache = tmp_path / "hub"
    older = cache / "models--someone--else" / "blobs"
    older.mkdir(parents=True)
    (older / "0123abcd").write_bytes(os.urandom(2048))  # what the user's Hub cache already held
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("LVSTUDIO_CACHE", str(tmp_path / "lv"))
    monkeypatch.setenv("LVSTUDIO_PRESET_PATH", str(tmp_path / "presets"))
    return cache


@pytest.mark.parametrize("code", [errnos.ENOSPC, errnos.EACCES])
def test_a_disk_error_while_pulling_is_one_clear_message(hub_env: Path, monkeypatch: pytest.MonkeyPatch,
                                                         code: int) -> None:
    from types import SimpleNamespace

    import huggingface_hub

    from lvstudio.presets import hub
    from tests.helpers.hub_cache import commit_for

    before = tree_state(hub_env)
    # The Hub answers what 'main' is (pull resolves an unpinned repository once), then the download fails.
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info",
                        lambda _self, repo_id, **_k: SimpleNamespace(id=repo_id, sha=commit_for(repo_id)))
    monkeypatch.setattr(hub, "download_plan", lambda *a, **k: [("autoregressive_checkpoint/model.pt", 4096, False)])

    def download(repo_id: str, **_kw) -> str:
        # huggingface_hub writes into blobs/<etag>.incomplete and fails there when the disk does.
        blob = hub_env / ("models--" + repo_id.replace("/", "--")) / "blobs" / "feedbeef.incomplete"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(b"\0" * 1000)
        raise OSError(code, os.strerror(code), str(blob))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    fault = Fault(f"pull: {errnos.errorcode[code]}")
    r = cli("presets", "pull", "hubtest-causvid-1.3b", "--revision", "main")
    assert_clean_exit(r, 74, ERRNO_WORDS[code], "downloading tianweiy/CausVid", "HF_HUB_CACHE",
                      "lvstudio presets pull hubtest-causvid-1.3b")
    fault.survived(lost_bytes(before, hub_env))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(os.environ.get("LVSTUDIO_SKIP_DISTRIBUTED") == "1", reason="LVSTUDIO_SKIP_DISTRIBUTED=1")
def test_a_signal_to_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))

    def torchrun(out: Path, stop_at: int) -> list[list[str]]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(root / "tests" / "helpers" / "dist_df_stop.py"), str(out), str(stop_at)]
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [(out / f"rank{r}.txt").read_text().split() for r in (0, 1)]

    k = rng("torchrun-stop").randint(1, 3)
    fault = Fault("training: SIGTERM to one torchrun rank")
    full = torchrun(tmp_path / "full", -1)
    stopped = torchrun(tmp_path / "cut", k)
    assert stopped == [["stopped", str(k), "143"]] * 2  # both ranks, the same step
    from lvstudio.checked_files import read_metadata

    assert read_metadata(tmp_path / "cut" / "checkpoint.safetensors")["step"] == str(k)
    resumed = torchrun(tmp_path / "cut", -1)
    assert resumed == full and full[0][0] == "done"
    fault.survived()
