"""Pull, lock, pin and verify with the Hub online — faked at huggingface_hub's function boundary (`HfApi.model_info`,
`snapshot_download`, served from a hand-built remote cache in tmp_path; sockets refuse to connect).

An unpinned preset's first pull resolves `main` once, says so, downloads exactly that commit, checks every byte and
locks the commit with the sha256 and size of every file; later pulls and loads use the lock (no resolution, no
download) until `--revision main` moves it; `lvstudio presets pin` writes the commits into a pin file in the user's
preset folder; loads check every file against the lock, hashing nothing that a pull or convert already hashed."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
from pathlib import Path

import pytest
import torch

from lvstudio.errors import PresetError
from lvstudio.presets.lock import read_lock
from tests.helpers.hub_cache import WAN_REPO, FakeHub, build_hub_cache, tiny_dit, write_test_preset

SF = "gdhe17/Self-Forcing"
NAME = "hubtest-self-forcing-1.3b"


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a, **_k):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def remote(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repositories 'on the Hub' (a Hub cache layout), and test presets naming them."""
    root = tmp_path_factory.mktemp("remote")
    build_hub_cache(root / "hub")
    for shipped in ("self-forcing-1.3b", "longlive-1.3b"):
        write_test_preset(root / "presets", shipped)
    write_test_preset(root / "presets", "causvid-1.3b", name="hubtest-missing-repo", repo_id="nobody/nothing")
    return root


@pytest.fixture
def online(remote: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeHub:
    """A fresh local Hub cache, lvstudio cache and user folder; the Hub online (faked) over a copy of `remote`."""
    import huggingface_hub

    shutil.copytree(remote / "hub", tmp_path / "remote", symlinks=True)
    fake = FakeHub(tmp_path / "remote")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", lambda _self, *a, **k: fake.model_info(*a, **k))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake.snapshot_download)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("LVSTUDIO_CACHE", str(tmp_path / "lv"))
    monkeypatch.setenv("LVSTUDIO_CONFIG", str(tmp_path / "config"))
    monkeypatch.setenv("LVSTUDIO_PRESET_PATH", str(remote / "presets"))
    monkeypatch.setenv("LVSTUDIO_DEVICE", "cpu")
    return fake


def _pull(name: str = NAME, revision: list[str] | None = None, **kw) -> list[str]:
    from lvstudio.presets.cli import presets_pull

    lines: list[str] = []
    presets_pull(name, revision, echo=lines.append, **kw)
    return lines


def _new_dit_bytes(seed: int) -> bytes:
    buf = io.BytesIO()
    torch.save({"generator_ema": {"model." + k: v for k, v in tiny_dit(seed).state_dict().items()}}, buf)
    return buf.getvalue()


def test_first_pull_resolves_main_once_checks_every_byte_and_locks_it(online: FakeHub) -> None:
    from lvstudio.presets import hub, load_preset
    from lvstudio.presets.integrity import sha256_file

    first = {repo: online.commit(repo, "main") for repo in (SF, WAN_REPO)}
    lines = _pull()
    # Step 1: main resolved once per repository, said so, and exactly that commit downloaded.
    assert online.resolved == [(SF, "main"), (WAN_REPO, "main")]
    assert sorted(online.downloads) == sorted(first.items())
    for repo, commit in first.items():
        assert any(repo in line and "not pinned" in line and commit in line for line in lines), lines
    assert any("presets pin" in line for line in lines)
    # Step 2: the lock holds the commit and the sha256 and size of every file pulled.
    lock = read_lock(NAME)
    resolved = hub.resolve(load_preset(NAME))
    for repo, commit in first.items():
        assert (lock[repo].commit, lock[repo].requested) == (commit, "main")
        snap = resolved.snapshots[repo]
        files = {f.relative_to(snap).as_posix(): f for f in snap.rglob("*") if f.is_file()}
        assert set(lock[repo].files) == set(files)
        for path, f in files.items():
            assert lock[repo].files[path].size == f.stat().st_size
            assert lock[repo].files[path].sha256 == sha256_file(f)
    # Step 3: later pulls use the lock: no resolution, no download — even after main moved on the Hub.
    moved = online.move_branch(SF, {"checkpoints/self_forcing_dmd.pt": _new_dit_bytes(21)})
    again = _pull()
    assert online.resolved == [(SF, "main"), (WAN_REPO, "main")] and len(online.downloads) == 2
    assert any("locked by an earlier pull" in line and "from the cache" in line for line in again)
    assert read_lock(NAME)[SF].commit == first[SF]
    # Step 4: `--revision main` moves it (and keeps the other repository where main still is).
    _pull(revision=["main"])
    assert read_lock(NAME)[SF].commit == moved and (SF, moved) in online.downloads
    assert read_lock(NAME)[WAN_REPO].commit == first[WAN_REPO]
    assert hub.resolve(load_preset(NAME)).commits[SF] == moved


def test_pin_writes_the_locked_commits_into_the_user_preset_folder(online: FakeHub, tmp_path: Path) -> None:
    import tomli
    from typer.testing import CliRunner

    from lvstudio.cli import app
    from lvstudio.presets import load_preset
    from lvstudio.presets.cli import presets_pin

    _pull()
    lock = read_lock(NAME)
    target = presets_pin(NAME, echo=lambda _m: None)
    assert target == tmp_path / "config" / "presets" / f"{NAME}.toml"
    data = tomli.loads(target.read_text())
    assert data["base"] == data["name"] == NAME and data["revision"] == lock[SF].commit
    assert data["revisions"] == {WAN_REPO: lock[WAN_REPO].commit}
    pt = lock[SF].files["checkpoints/self_forcing_dmd.pt"]
    assert data["files"] == {"dit": {"sha256": pt.sha256, "size": pt.size}}
    # The pin file is found first and merged over the preset: it pins, everything else is the preset's.
    p = load_preset(NAME)
    assert p.sources[0] == target and p.pinned_revision(SF) == lock[SF].commit
    assert p.files["dit"].sha256 == pt.sha256 and p.files["dit"].state_key == "generator_ema" and p.sampler.shift == 5
    # Pinned: main moving on the Hub changes nothing; --revision main is refused with the way out.
    online.move_branch(SF, {"checkpoints/self_forcing_dmd.pt": _new_dit_bytes(22)})
    resolved_before = list(online.resolved)
    _pull()
    assert online.resolved == resolved_before and read_lock(NAME)[SF].commit == lock[SF].commit
    with pytest.raises(PresetError, match="would be ignored") as err:
        _pull(revision=["main"])
    assert "presets pin" in str(err.value)
    # Pinning again replaces its own pin file; a file of the user's own is replaced only with --force.
    presets_pin(NAME, echo=lambda _m: None)
    target.write_text(f'name = "{NAME}"\nbase = "{NAME}"\n# mine\n')
    result = CliRunner().invoke(app, ["presets", "pin", NAME])
    assert result.exit_code == 2 and "not a pin file" in result.output and "--force" in result.output
    assert "# mine" in target.read_text()
    result = CliRunner().invoke(app, ["presets", "pin", NAME, "--force"])
    assert result.exit_code == 0, result.output
    assert tomli.loads(target.read_text())["revision"] == lock[SF].commit


def test_loads_check_the_lock_and_rehash_nothing_a_pull_already_hashed(online: FakeHub, monkeypatch) -> None:
    from lvstudio.presets import hub, integrity, load_preset
    from lvstudio.presets.load import load_bundle

    monkeypatch.setattr(integrity, "SMALL_FILE", 0)  # treat the tiny test files as the large files they stand for
    _pull("hubtest-longlive-1.3b")  # pull + convert: every file hashed once, stamps written
    hashed: list[str] = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p: hashed.append(str(p)) or real(p))
    load_bundle("hubtest-longlive-1.3b")
    assert hashed == []  # the first load after a pull reads no file to hash it
    resolved = hub.resolve(load_preset("hubtest-longlive-1.3b"))
    # A truncated file: caught by its size against the lock, still without hashing anything.
    vae = Path(os.path.realpath(resolved.files("vae")[-1]))
    data = vae.read_bytes()
    vae.write_bytes(data[:-10])
    with pytest.raises(PresetError, match="bytes, expected") as err:
        load_bundle("hubtest-longlive-1.3b")
    assert "from lock" in str(err.value) and "--force" in str(err.value) and hashed == []
    vae.write_bytes(data)
    # A file the lock lists that is gone from the cache (not one that resolve itself needs).
    gone = resolved.snapshots[WAN_REPO] / "tokenizer" / "special_tokens_map.json"
    gone.unlink()
    with pytest.raises(PresetError, match="listed in the lock, missing"):
        load_bundle("hubtest-longlive-1.3b")


def test_hub_errors_while_resolving_main_are_clear(online: FakeHub) -> None:
    with pytest.raises(PresetError, match="was not found on the Hub") as err:
        _pull("hubtest-missing-repo")
    assert err.value.hint and online.downloads == []


def test_a_format_1_lock_is_still_read(online: FakeHub, tmp_path: Path) -> None:
    from lvstudio.presets.lock import lock_path, read_lock

    lock_path(NAME).parent.mkdir(parents=True)
    lock_path(NAME).write_text(json.dumps({"preset": NAME, "revisions": {SF: "a" * 40, WAN_REPO: "b" * 40}}))
    lock = read_lock(NAME)
    assert {r: rec.commit for r, rec in lock.items()} == {SF: "a" * 40, WAN_REPO: "b" * 40}
    assert all(rec.files == {} for rec in lock.values())


def test_longlive_preset_takes_the_generator_weights_not_ema(tmp_path: Path) -> None:
    """Upstream LongLive runs `generator` (use_ema: false); the preset must not fall back to an EMA copy."""
    from safetensors.torch import load_file

    from lvstudio.presets import load_preset
    from lvstudio.presets.convert import convert_checkpoint

    entry = load_preset("longlive-1.3b").files["dit"]
    gen, ema = tiny_dit(31), tiny_dit(32)
    src = tmp_path / "longlive_base.pt"
    torch.save({"generator": {"model." + k: v for k, v in gen.state_dict().items()},
                "generator_ema": {"model._fsdp_wrapped_module." + k: v for k, v in ema.state_dict().items()}}, src)
    out = convert_checkpoint(src, tmp_path / "base.safetensors", kind="dit", state_key=entry.state_key).output
    got, want = load_file(str(out)), gen.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    only_ema = tmp_path / "ema_only.pt"
    torch.save({"generator_ema": {"model." + k: v for k, v in ema.state_dict().items()}}, only_ema)
    with pytest.raises(PresetError, match="has no 'generator' state dict"):
        convert_checkpoint(only_ema, tmp_path / "x.safetensors", kind="dit", state_key=entry.state_key)


def test_a_hub_that_cannot_be_reached_says_so_and_how_to_go_on(online: FakeHub,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """No DNS (a machine without network): the HTTP client's connect error is not an OSError, and once ended in the
    catch-all 'reading or writing failed: Name or service not known' (exit 74) naming neither the Hub nor a fix."""
    import huggingface_hub

    from lvstudio.presets.hub import _transport_errors

    errors = _transport_errors()
    assert errors, "huggingface_hub talks through httpx or httpx2"
    connect = errors[0].__module__.split(".")[0]

    def unreachable(_self, *_a, **_k):  # noqa: ANN001, ANN202
        import importlib

        raise importlib.import_module(connect).ConnectError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    with pytest.raises(PresetError) as caught:
        _pull()
    text = str(caught.value)
    assert caught.value.exit_code == 2 and "cannot reach the Hub (https://huggingface.co)" in text
    assert "Name or service not known" in text and "HF_HUB_OFFLINE=1" in text and f"presets pull {NAME}" in text
