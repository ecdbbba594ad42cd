"""The parts the fault suite stands on, one by one: io_errors' messages per errno, the atomic writer's errors,
self-checking files (every bit flip and every truncation found), stop-signal handling, job identities."""

from __future__ import annotations

import errno as errnos
import os
import signal
import threading
from pathlib import Path

import pytest
import torch

from lvstudio.checked_files import DIGEST_KEY, load_checked, save_checked
from lvstudio.errors import DamagedFileError, IOFailure
from lvstudio.io_errors import as_os_error, io_failure, translated_io
from lvstudio.job_folder import JobIdentity
from lvstudio.stop_signals import StopNow, current_stop, exit_code_for, graceful_stop
from tests.helpers.faults import rng


@pytest.mark.parametrize(("code", "words"), [
    (errnos.ENOSPC, ["no space left on the device", "free some space"]),
    (errnos.EDQUOT, ["disk quota is used up"]),
    (errnos.EACCES, ["permission denied", "fix the permissions of /data/out"]),
    (errnos.EPERM, ["permission denied"]),
    (errnos.EROFS, ["/data/out is on a read-only file system", "remount"]),
    (errnos.ENOENT, ["does not exist (moved or deleted while lvstudio ran?)"]),
    (errnos.ENOTDIR, ["a part of that path is a file"]),
    (errnos.EISDIR, ["it is a folder"]),
    (errnos.EMFILE, ["too many open files", "ulimit -n"]),
    (errnos.ENAMETOOLONG, ["the file name is too long"]),
    (errnos.EIO, ["the disk reported an I/O error"]),
    (errnos.EBUSY, [os.strerror(errnos.EBUSY)]),
])
def test_every_errno_gets_what_failed_which_path_and_what_to_do(code: int, words: list[str]) -> None:
    err = io_failure(OSError(code, os.strerror(code), "/data/out/x.mp4"), action="writing the video",
                     resume="lvstudio render s.toml --resume")
    text = str(err)
    assert isinstance(err, IOFailure) and err.exit_code == 74 and err.errno == code
    assert text.startswith("writing the video /data/out/x.mp4 failed: ")
    assert text.endswith("then continue with: lvstudio render s.toml --resume")
    for w in words:
        assert w in text, text


def test_the_default_hint_names_no_option_the_command_may_not_have() -> None:
    # `presets hash --write` and the web studio once told users to "write somewhere else (--out)": they have no --out.
    err = io_failure(OSError(errnos.EACCES, "Permission denied", "/data/preset.toml"), action="writing")
    assert "--out" not in str(err) and "or write somewhere else" in str(err)


def test_os_errors_are_found_inside_safetensors_errors_and_cause_chains() -> None:
    from safetensors import SafetensorError

    rust = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert as_os_error(rust).errno == errnos.ENOSPC
    try:
        try:
            raise PermissionError(errnos.EACCES, "Permission denied", "/x")
        except PermissionError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert as_os_error(outer).errno == errnos.EACCES
    assert as_os_error(ValueError("no")) is None
    with pytest.raises(IOFailure, match="saving /y failed: no space left"), translated_io("saving", path="/y"):
        raise rust
    with pytest.raises(ValueError), translated_io("saving"):
        raise ValueError("not an I/O error: unchanged")


def test_the_atomic_writer_reports_the_errno_and_the_final_path_and_leaves_no_temp_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors.torch
    from safetensors import SafetensorError

    from lvstudio.atomic import save_safetensors_atomic

    def full(*_a, **_k) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(OSError) as caught:
        save_safetensors_atomic({"x": torch.zeros(2)}, tmp_path / "a.safetensors")
    assert caught.value.errno == errnos.ENOSPC and caught.value.filename == str(tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(FileNotFoundError) as missing:
        save_safetensors_atomic({"x": torch.zeros(2)}, tmp_path / "no" / "b.safetensors")
    assert missing.value.filename == str(tmp_path / "no" / "b.safetensors")


def test_checked_files_find_every_bit_flip_and_every_truncation(tmp_path: Path) -> None:
    path = tmp_path / "c.safetensors"
    save_checked({"a": torch.arange(6, dtype=torch.float32), "b": torch.ones(2, dtype=torch.bfloat16)}, path,
                 {"index": "3"})
    tensors, meta = load_checked(path)
    assert meta["index"] == "3" and DIGEST_KEY in meta and torch.equal(tensors["a"], torch.arange(6.0))
    good = path.read_bytes()
    r = rng("checked-files")
    flips = [(i, 0) for i in range(len(good))] + [(r.randrange(len(good)), r.randrange(8)) for _ in range(200)]
    for i, bit in flips:  # every byte once, and 200 more bits anywhere
        bad = bytearray(good)
        bad[i] ^= 1 << bit
        path.write_bytes(bytes(bad))
        with pytest.raises(DamagedFileError):
            load_checked(path)
    for n in range(len(good)):
        path.write_bytes(good[:n])
        with pytest.raises(DamagedFileError):
            load_checked(path)
    path.unlink()
    with pytest.raises(DamagedFileError, match="missing"):
        load_checked(path)


def test_a_second_signal_stops_at_once_and_blocks_nest() -> None:
    calls: list[tuple[str, int]] = []
    with graceful_stop(lambda s: calls.append(("outer", s)), quiet=True) as outer:
        with graceful_stop(lambda s: calls.append(("inner", s)), quiet=True) as inner:
            assert inner is outer and current_stop() is outer
            signal.raise_signal(signal.SIGTERM)
            assert outer.requested and outer.exit_code == 143 and calls == [("outer", 15), ("inner", 15)]
            with pytest.raises(StopNow) as now:
                signal.raise_signal(signal.SIGTERM)
            assert now.value.exit_code == 143 and isinstance(now.value, KeyboardInterrupt)
        assert len(outer.callbacks) == 1
    assert current_stop() is None and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert exit_code_for(signal.SIGINT) == 130 and exit_code_for(signal.SIGHUP) == 129


def test_an_ignored_sighup_stays_ignored_and_other_threads_install_nothing() -> None:
    old = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with graceful_stop(quiet=True) as stop:
            assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN  # nohup's choice is kept
            signal.raise_signal(signal.SIGHUP)
            assert not stop.requested
    finally:
        signal.signal(signal.SIGHUP, old)
    seen: dict[str, object] = {}

    def worker() -> None:
        with graceful_stop(quiet=True) as stop:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            stop.request(signal.SIGTERM)
            seen["code"] = stop.exit_code

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == {"handler": signal.SIG_DFL, "code": 143}


def test_a_job_identity_names_each_difference() -> None:
    settings = {"preset": "tiny", "backend": "causal-kv", "seed": 7, "fps": 16, "width": 64, "height": 64,
                "num_frames": 48}
    mine = JobIdentity("a" * 64, settings, "p" * 64)
    assert mine.differences(mine.as_dict()) == []
    saved = {**mine.as_dict(), "lvstudio": "0.0.1", "storyboard_sha256": "b" * 64,
             "settings": {**settings, "seed": 3}, "preset": "q" * 64}
    diffs = mine.differences(saved)
    assert diffs[0].startswith("it was made by lvstudio 0.0.1") and "the storyboard changed" in diffs[1]
    assert "seed: the job has 3, this command asks for 7" in diffs
    assert "the preset's configuration or weight files changed since" in diffs
