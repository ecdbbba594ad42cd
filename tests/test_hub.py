"""Hub presets offline: a hand-built Hugging Face cache (HF_HUB_OFFLINE=1, tmp_path) holding tiny random weights in
each upstream format — Self-Forcing / CausVid pickles with `generator_ema` / `model.` prefixes, LongLive base + peft
LoRA, the Wan diffusers layout for umT5 and the VAE. pull resolves from the cache, verify catches a flipped byte,
convert writes safetensors, and `lvstudio render` runs a storyboard with a Hub preset end to end on CPU.
No test touches the network (connections raise)."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import socket
from pathlib import Path

import pytest
import torch

from lvstudio.errors import PresetError
from lvstudio.presets.lock import read_lock
from tests.helpers.hub_cache import WAN_REPO, build_hub_cache, commit_for, tiny_dit, write_test_preset, write_vae

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("self-forcing-1.3b", "causvid-1.3b", "longlive-1.3b")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a, **_k):
        raise OSError("network access in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def hubenv(tmp_path_factory: pytest.TempPathFactory):
    """The cache, three test presets (shipped presets at tiny size) pulled from it offline, and converted."""
    from lvstudio.presets.cli import presets_pull

    root = tmp_path_factory.mktemp("hub")
    hc = build_hub_cache(root / "hub")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_CACHE", str(root / "hub"))
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("LVSTUDIO_CACHE", str(root / "lv"))
        mp.setenv("LVSTUDIO_PRESET_PATH", str(root / "presets"))
        mp.setenv("LVSTUDIO_DEVICE", "cpu")
        for name in SHIPPED:
            write_test_preset(root / "presets", name)
        logs: dict[str, list[str]] = {}
        sf_repo = "gdhe17/Self-Forcing"
        # Explicit commits for one preset, an explicit `--revision main` for one, nothing (unpinned: main resolved
        # once, here offline from the cache's ref) for the third.
        revs = {"self-forcing-1.3b": [hc.commits[sf_repo], f"{WAN_REPO}={hc.commits[WAN_REPO]}"],
                "causvid-1.3b": ["main"]}
        for name in SHIPPED:
            lines: list[str] = []
            presets_pull(f"hubtest-{name}", revs.get(name), echo=lines.append)
            logs[name] = lines
        yield hc, root, logs


def _fresh_lv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LVSTUDIO_CACHE", str(tmp_path / "lv-fresh"))


# ---------------------------------------------------------------------------------------------------------------
# Preset files


def test_shipped_hub_presets_are_pinned_or_unpinned_and_fetch_no_code() -> None:
    from lvstudio.models.wan_dit import CONFIGS
    from lvstudio.presets import load_preset
    from lvstudio.presets.hub import allow_patterns

    full = CONFIGS["wan2.1-t2v-1.3b"].to_dict()
    for name in SHIPPED:
        p = load_preset(name)
        assert p.is_hub and (p.text_encoder, p.vae, p.backend) == ("umt5", "wan", "causal-kv")
        assert (p.width, p.height, p.fps) == (832, 480, 16)
        assert {k: full[k] for k in p.dit_config} == p.dit_config and p.dit_config["num_layers"] == 30
        assert "Apache-2.0" in p.licence and WAN_REPO in p.hub_repos()
        assert "FILL-ME" not in (ROOT / "presets" / f"{name}.toml").read_text()  # unpinned = no revision at all
        for repo in p.hub_repos():  # never on a branch: a pinned 40-hex commit, or unpinned (locked by the pull)
            raw = p.revisions.get(repo, p.revision if repo == p.repo_id else None)
            assert raw is None or len(raw) == 40
            for pattern in allow_patterns(p, repo):
                assert pattern.endswith((".safetensors", ".json", ".pt")), pattern
        assert p.files["dit"].kind == "pt"
    sf, cv, ll = (load_preset(n) for n in ("self-forcing", "causvid", "longlive"))  # unique prefixes resolve
    assert (sf.sampler.step_list, sf.sampler.shift, sf.sampler.warp) == ([1000, 750, 500, 250], 5.0, True)
    assert (cv.sampler.step_list, cv.sampler.shift, cv.sampler.warp) == ([1000, 757, 522], 8.0, False)
    assert (ll.attention.window_frames, ll.attention.sink_frames, ll.attention.recache_on_switch) == (12, 3, True)
    assert ll.lora is not None and (ll.lora.rank, ll.lora.alpha) == (256, 256.0)
    # Which weights inside each upstream pickle: Self-Forcing's EMA, CausVid's and LongLive's generator (use_ema false).
    assert [p.files["dit"].state_key for p in (sf, cv, ll)] == ["generator_ema", "generator", "generator"]
    assert "CC-BY-NC-SA-4.0" in sf.licence and "CC-BY-NC-4.0" in cv.licence and "not confirmed" in ll.licence
    assert all(p.attention.block_frames == 3 for p in (sf, cv, ll))
    assert not load_preset("tiny").is_hub


@pytest.mark.parametrize("change, words", [
    ('files.dit.path = "pipeline.py"', "never code"),
    ('files.dit.path = "../outside.safetensors"', "relative path"),
    ('revision = "main"', "40-hex"),
    ('files.dit.sha256 = "abc"', "64 hex"),
])
def test_preset_validation_rejects_code_branches_and_bad_hashes(tmp_path: Path, change: str, words: str) -> None:
    from lvstudio.presets import load_preset

    key, value = change.split(" = ")
    body = 'name = "bad"\nrepo_id = "o/r"\nrevision = "FILL-ME"\n'
    dit = {"path": '"dit.safetensors"'}
    if key.startswith("files.dit."):
        dit[key.split(".")[-1]] = value
    else:
        body = body.replace('revision = "FILL-ME"', f"{key} = {value}")
    body += "[files.dit]\n" + "".join(f"{k} = {v}\n" for k, v in dit.items())
    (tmp_path / "bad.toml").write_text(body)
    with pytest.raises(PresetError, match=words):
        load_preset(tmp_path / "bad.toml")


# ---------------------------------------------------------------------------------------------------------------
# pull / convert / verify


def test_pull_resolves_from_the_offline_cache_locks_commits_and_converts(hubenv) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    from lvstudio.presets import hub, load_preset
    from lvstudio.presets.cli import presets_pull

    hc, root, logs = hubenv
    for name in SHIPPED:
        p = load_preset(f"hubtest-{name}")
        assert {r: rec.commit for r, rec in read_lock(p.name).items()} == {r: hc.commits[r] for r in p.hub_repos()}
        assert any("from the cache" in line for line in logs[name]) and "ready:" in logs[name][-1]
        resolved = hub.resolve(p)
        dit_file = resolved.paths["dit"]
        assert dit_file.suffix == ".safetensors" and str(root / "lv") in str(dit_file)
        with safe_open(str(dit_file), "pt") as f:
            assert f.metadata()["format"] == "lvstudio-dit" and json.loads(f.metadata()["config"])["dim"] == 32
        sd = load_file(str(dit_file))
        want = hc.dits[name].state_dict()  # EMA weights for Self-Forcing, wrappers stripped everywhere
        assert set(sd) == set(want) and all(torch.equal(sd[k], want[k]) for k in want)
    # A second pull reuses the cache (no network) and the conversion.
    lines: list[str] = []
    presets_pull("hubtest-longlive-1.3b", echo=lines.append)
    assert any("cached" in line for line in lines) and any("up to date" in line for line in lines)
    lora = load_file(str(hub.resolve(load_preset("hubtest-longlive-1.3b")).paths["lora"]))
    assert lora and all(k.startswith("blocks.") and ".lora_" in k for k in lora)


def test_a_preset_never_pulled_says_pull_and_an_unpinned_pull_locks_main(hubenv, tmp_path, monkeypatch) -> None:
    from lvstudio.presets import hub, load_preset
    from lvstudio.presets.load import load_bundle

    hc, _, logs = hubenv
    _fresh_lv(monkeypatch, tmp_path)
    with pytest.raises(PresetError, match="is not pulled yet") as err:  # no pin, no lock: loading names the command
        load_bundle("hubtest-self-forcing-1.3b")
    assert "lvstudio presets pull hubtest-self-forcing-1.3b" in str(err.value)
    # The fixture pulled longlive with no --revision at all: main was read once (offline: from the cache's ref),
    # the pull said so, and the lock holds the commit and every file's sha256 and size.
    assert any("not pinned" in line and "'main'" in line for line in logs["longlive-1.3b"])
    monkeypatch.setenv("LVSTUDIO_CACHE", str(hubenv[1] / "lv"))
    lock = read_lock("hubtest-longlive-1.3b")
    ll = "Efficient-Large-Model/LongLive-1.3B"
    assert lock[ll].commit == hc.commits[ll] and lock[ll].requested == "main"
    snap = hub.resolve(load_preset("hubtest-longlive-1.3b")).snapshots[ll]
    base = Path(os.path.realpath(snap / "models/longlive_base.pt"))
    assert lock[ll].files["models/longlive_base.pt"].size == base.stat().st_size
    assert lock[ll].files["models/longlive_base.pt"].sha256 == base.name  # = the Hub's LFS sha256 (blob name)
    assert {"vae/config.json", "tokenizer/tokenizer.json"} <= set(lock[WAN_REPO].files)


def test_not_converted_yet_names_the_command(hubenv, tmp_path, monkeypatch) -> None:
    from lvstudio.presets.cli import presets_pull
    from lvstudio.presets.load import load_bundle

    _fresh_lv(monkeypatch, tmp_path)
    presets_pull("hubtest-causvid-1.3b", ["main"], convert=False, echo=lambda _m: None)
    with pytest.raises(PresetError, match="lvstudio presets convert hubtest-causvid-1.3b"):
        load_bundle("hubtest-causvid-1.3b")


def test_offline_and_not_cached_is_a_clear_error(hubenv, tmp_path, monkeypatch) -> None:
    from lvstudio.presets.cli import presets_pull

    _fresh_lv(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    with pytest.raises(PresetError, match="offline") as err:
        presets_pull("hubtest-self-forcing-1.3b", ["main"], echo=lambda _m: None)
    assert "not in the Hub cache" in str(err.value) and "lvstudio presets pull" in str(err.value)


def test_verify_catches_a_flipped_byte_before_anything_is_loaded(hubenv, monkeypatch) -> None:
    import os

    import safetensors.torch

    from lvstudio.presets import hub, load_preset
    from lvstudio.presets.cli import presets_verify
    from lvstudio.presets.convert import convert_preset
    from lvstudio.presets.load import load_bundle

    p = load_preset("hubtest-longlive-1.3b")
    resolved = hub.resolve(p)
    presets_verify(p.name, echo=lambda _m: None)  # clean
    loads: list[str] = []
    real_load_file = safetensors.torch.load_file
    monkeypatch.setattr(safetensors.torch, "load_file",
                        lambda *a, **k: loads.append(str(a[0])) or real_load_file(*a, **k))
    unpickles: list[str] = []
    real_torch_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickles.append(str(a[0])) or real_torch_load(*a, **k))
    targets = {
        "VAE weights (Hub etag)": resolved.files("vae")[-1],
        "converted DiT (record)": resolved.paths["dit"],
        "LoRA pickle (Hub etag)": resolved.sources["lora"],
    }
    for what, path in targets.items():
        real = Path(os.path.realpath(path))
        data = bytearray(real.read_bytes())
        data[len(data) // 2] ^= 0x01
        original = real.read_bytes()
        try:
            real.write_bytes(bytes(data))
            with pytest.raises(PresetError, match="checksum mismatch") as err:
                presets_verify(p.name, echo=lambda _m: None)
            assert str(path) in str(err.value), what
            if "pickle" in what:  # convert re-checks the source before it unpickles anything
                with pytest.raises(PresetError, match="checksum mismatch"):
                    convert_preset(p, force=True)
                assert unpickles == []
            else:
                with pytest.raises(PresetError, match="checksum mismatch"):
                    load_bundle(p)
                assert loads == [], what  # rejected before load_file
        finally:
            real.write_bytes(original)
    presets_verify(p.name, echo=lambda _m: None)


def test_disk_space_is_checked_before_downloading(hubenv, tmp_path, monkeypatch) -> None:
    import huggingface_hub

    from lvstudio.presets import hub
    from lvstudio.presets.cli import presets_pull

    _fresh_lv(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(hub, "resolve_commit", lambda _p, repo, _rev: commit_for(repo))  # the Hub says main = ...
    monkeypatch.setattr(hub, "download_plan", lambda *a, **k: [("checkpoints/self_forcing_dmd.pt", 6 << 30, False)])
    monkeypatch.setattr(hub, "free_bytes", lambda _p: 3 << 30)

    def no_download(*_a, **_k):
        raise AssertionError("downloaded despite too little disk")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_download)
    with pytest.raises(PresetError, match="not enough disk space") as err:
        presets_pull("hubtest-self-forcing-1.3b", ["main"], echo=lambda _m: None)
    assert "6.0 GiB to download + 6.0 GiB for the converted" in str(err.value) and "HF_HUB_CACHE" in str(err.value)


def _http_error(cls, status: int):
    import importlib

    from huggingface_hub import errors

    # The HTTP client huggingface_hub itself uses (httpx in 1.x, httpx2 in 2.x): its Response is errors.Response.
    http = importlib.import_module(errors.Response.__module__.split(".")[0])
    response = http.Response(status, request=http.Request("GET", "https://huggingface.co/api/models/o/r"))
    return cls(f"{status} Client Error", response=response)


@pytest.mark.parametrize("make, words", [
    (lambda e: _http_error(e.GatedRepoError, 403), "gated repository"),
    (lambda e: _http_error(e.RepositoryNotFoundError, 404), "was not found on the Hub"),
    (lambda e: _http_error(e.RevisionNotFoundError, 404), "does not exist in"),
    (lambda e: _http_error(e.RemoteEntryNotFoundError, 404), "is not in"),
])
def test_hub_errors_become_clear_preset_errors(hubenv, tmp_path, monkeypatch, make, words) -> None:
    from huggingface_hub import errors

    from lvstudio.presets import hub
    from lvstudio.presets.cli import presets_pull

    _fresh_lv(monkeypatch, tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    err = make(errors)

    def failing_plan(*_a, **_k):
        if isinstance(err, errors.RepositoryNotFoundError):  # the dry run wraps repo errors (huggingface_hub 2.x)
            raise errors.DryRunError("Dry run cannot be performed") from err
        raise err

    monkeypatch.setattr(hub, "resolve_commit", lambda _p, repo, _rev: commit_for(repo))
    monkeypatch.setattr(hub, "download_plan", failing_plan)
    with pytest.raises(PresetError, match=words) as caught:
        presets_pull("hubtest-causvid-1.3b", ["main"], echo=lambda _m: None)
    assert caught.value.hint


def test_convert_refuses_code_in_a_pickle_and_is_the_only_unpickler(tmp_path: Path) -> None:
    from lvstudio.presets.cli import presets_convert

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    bad = tmp_path / "evil.pt"
    torch.save({"generator": {"w": torch.zeros(1)}, "x": Payload()}, bad)
    with pytest.raises(PresetError, match="refusing to unpickle"):
        presets_convert(str(bad), tmp_path / "evil.safetensors", echo=lambda _m: None)
    assert not marker.exists() and not (tmp_path / "evil.safetensors").exists()
    # AST scan of the Hub code: torch.load appears only in convert.py, always with weights_only=True.
    for rel in ("lvstudio/presets/hub.py", "lvstudio/presets/cli.py", "lvstudio/presets/convert.py",
                "lvstudio/presets/load.py", "lvstudio/presets/schema.py", "lvstudio/models/wan_components.py"):
        tree = ast.parse((ROOT / rel).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name = node.func.attr
                kw = {k.arg: k.value for k in node.keywords}
                unpickler = isinstance(node.func.value, ast.Name) and node.func.value.id in ("torch", "pickle")
                if name == "load" and unpickler:
                    assert rel == "lvstudio/presets/convert.py" and node.func.value.id == "torch", rel
                    assert isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                assert not (name == "from_pretrained" and "trust_remote_code" in kw), rel


def test_convert_single_checkpoint_maps_upstream_keys(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from lvstudio.models.key_maps import official_to_diffusers
    from lvstudio.presets.cli import presets_convert

    dit = tiny_dit(3)
    want = dit.state_dict()
    src = tmp_path / "diffusers_style.pt"  # diffusers key names inside a training wrapper
    torch.save({"generator": {"module." + k: v for k, v in official_to_diffusers(want).items()}}, src)
    done = presets_convert(str(src), tmp_path / "out.safetensors", state_key="generator", echo=lambda _m: None)
    got = load_file(str(done[0].output))
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    again = presets_convert(str(src), tmp_path / "out.safetensors", state_key="generator", echo=lambda _m: None)
    assert again[0].skipped


# ---------------------------------------------------------------------------------------------------------------
# Components


def test_streaming_vae_decode_equals_full_decode(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    from lvstudio.models.wan_components import load_wan_vae

    write_vae(tmp_path / "vae")
    vae = load_wan_vae(tmp_path / "vae", device=torch.device("cpu"), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(1, 16, 7, 4, 6, generator=gen)  # normalised latents
    full = vae.decode(z)  # diffusers' own full decode
    assert full.shape == (1, 3, 1 + 4 * 6, 32, 48)
    dec = vae.streaming_decoder()
    parts = [dec.decode(z[:, :, :3])]
    snapshot = dec.state_dict()
    parts.append(dec.decode(z[:, :, 3:6]))
    parts.append(dec.decode(z[:, :, 6:]))
    assert [p.shape[2] for p in parts] == [9, 12, 4]
    stream = torch.cat(parts, dim=2)
    assert torch.allclose(stream, full, atol=1e-5, rtol=0), (stream - full).abs().max()
    resumed = vae.streaming_decoder()  # snapshot (through safetensors) / resume mid-video gives the same frames
    save_file(snapshot, str(tmp_path / "snap.safetensors"))
    resumed.load_state_dict(load_file(str(tmp_path / "snap.safetensors")))
    rest = torch.cat([resumed.decode(z[:, :, 3:6]), resumed.decode(z[:, :, 6:])], dim=2)
    assert torch.equal(rest, stream[:, :, 9:])
    one = vae.streaming_decoder()  # a 1-frame first block leaves diffusers' "Rep" marker in the cache
    head = one.decode(z[:, :, :1])
    assert any(k.startswith("rep.") for k in one.state_dict())
    other = vae.streaming_decoder()
    other.load_state_dict(one.state_dict())
    assert torch.allclose(torch.cat([head, other.decode(z[:, :, 1:])], dim=2), full, atol=1e-5, rtol=0)
    dec.reset()
    assert torch.equal(dec.decode(z[:, :, :3]), parts[0])
    video = torch.rand(1, 3, 5, 32, 48) * 2 - 1  # encode returns normalised latents [B, 16, 2, h, w]
    assert vae.encode(video).shape == (1, 16, 2, 4, 6)


def test_wan_streaming_decoder_new_shot_has_zero_history_and_4_frames_per_latent(tmp_path: Path) -> None:
    """A cut on the Hub presets' Wan VAE (diffusers AutoencoderKLWan, tiny random weights): after `new_shot()` every
    latent decodes to 4 frames; another history (or none) gives bit-identical frames, so nothing of the previous
    latents reaches the output; and the frames equal those of a decoder whose every causal cache holds zeros — the
    literal zero history, built by zeroing the caches of a decoder that has decoded something (diffusers pads with
    zeros where a cache is missing, so the two must agree)."""
    from safetensors.torch import load_file, save_file

    from lvstudio.models.wan_components import load_wan_vae

    write_vae(tmp_path / "vae")
    vae = load_wan_vae(tmp_path / "vae", device=torch.device("cpu"), dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    before_a, before_b, shot = (torch.randn(1, 16, n, 4, 6, generator=gen) for n in (3, 1, 3))
    outs = []
    for history in (before_a, before_b, None):
        dec = vae.streaming_decoder()
        if history is not None:
            dec.decode(history)
        dec.new_shot()
        outs.append(torch.cat([dec.decode(shot[:, :, :2]), dec.decode(shot[:, :, 2:])], dim=2))
    assert outs[0].shape == (1, 3, 4 * 3, 32, 48)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    zeroed = vae.streaming_decoder()
    zeroed.decode(before_a)
    state = zeroed.state_dict()
    assert not any(k.startswith("rep.") for k in state)  # after 3 latents every slot holds frames
    zeroed.load_state_dict({k: v if k == "frames" else torch.zeros_like(v) for k, v in state.items()})
    want = torch.cat([zeroed.decode(shot[:, :, :2]), zeroed.decode(shot[:, :, 2:])], dim=2)
    torch.testing.assert_close(outs[0], want, atol=1e-6, rtol=0)
    carried = vae.streaming_decoder()  # without the restart the previous shot reaches the new one's frames
    carried.decode(before_a)
    assert not torch.allclose(carried.decode(shot), outs[0], atol=1e-3)
    dec = vae.streaming_decoder()  # a snapshot taken right after the cut (through safetensors) resumes the restart
    dec.decode(before_a)
    dec.new_shot()
    save_file(dec.state_dict(), str(tmp_path / "snap.safetensors"))
    resumed = vae.streaming_decoder()
    resumed.load_state_dict(load_file(str(tmp_path / "snap.safetensors")))
    assert torch.equal(torch.cat([resumed.decode(shot[:, :, :2]), resumed.decode(shot[:, :, 2:])], dim=2), outs[0])


def test_hub_bundle_text_zero_padding_and_longlive_lora(hubenv) -> None:
    from lvstudio.presets.load import load_bundle

    hc, _, _ = hubenv
    b = load_bundle("hubtest-longlive-1.3b", device="cpu")
    assert b.spatial_stride == 8 and b.latent_channels == 16 and next(b.dit.parameters()).dtype == torch.float32
    feats = b.text.encode(["a red ball", "a red ball on the blue sea at dusk"])
    assert feats.shape == (2, 16, 16)
    n_short = len(b.text.tokenizer("a red ball")["input_ids"])
    assert feats[0, n_short:].abs().sum() == 0 and feats[0, :n_short].abs().sum() > 0
    assert b.text.unknown_words("zebra crossing") == []
    # LongLive: base + LoRA merged through peft equals the adapter model itself.
    x = torch.randn(1, 16, 3, 4, 4)
    t = torch.full((1, 3), 500.0)
    ctx = torch.randn(1, 16, 16)
    with torch.no_grad():
        merged = b.dit(x, t, b.dit.new_conditioning(ctx))
        peft_out = hc.lora_model(x, t, hc.lora_model.base_model.model.new_conditioning(ctx))
        base_out = hc.dits["longlive-1.3b"](x, t, hc.dits["longlive-1.3b"].new_conditioning(ctx))
    assert torch.allclose(merged, peft_out, atol=1e-5) and not torch.allclose(merged, base_out, atol=1e-4)


def test_device_dtype_and_text_offload_choices() -> None:
    from lvstudio.models.wan_components import choose_text_offload, resolve_device, resolve_dtype

    assert resolve_device(None).type == "cpu" and resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("float16", torch.device("cpu")) == torch.float16
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(PresetError, match="no CUDA GPU"):
            resolve_device("cuda")
    gib = 1 << 30
    cuda = torch.device("cuda")
    assert choose_text_offload("auto", torch.device("cpu"), 11 * gib, 3 * gib, None) == "never"
    assert choose_text_offload("auto", cuda, 11 * gib, 3 * gib, 70 * gib) == "never"
    assert choose_text_offload("auto", cuda, 11 * gib, 3 * gib, 20 * gib) == "swap"
    assert choose_text_offload("auto", cuda, 11 * gib, 3 * gib, 12 * gib) == "cpu"
    assert choose_text_offload("cpu", cuda, 11 * gib, 3 * gib, 70 * gib) == "cpu"


# ---------------------------------------------------------------------------------------------------------------
# End to end


@pytest.mark.parametrize("name, seconds", [("longlive-1.3b", 9), ("self-forcing-1.3b", 2), ("causvid-1.3b", 2)])
def test_render_storyboard_with_a_hub_preset_by_changing_preset_only(hubenv, tmp_path: Path, name: str,
                                                                       seconds: int) -> None:
    from typer.testing import CliRunner

    from lvstudio.cli import app
    from lvstudio.video import probe_video

    demo = (ROOT / "storyboards" / "demo.toml").read_text()
    assert 'preset = "tiny"' in demo
    story = tmp_path / "story.toml"
    story.write_text(demo.replace('preset = "tiny"', f'preset = "hubtest-{name}"'))
    out = tmp_path / "hub.mp4"
    grad = torch.is_grad_enabled()
    try:  # LongLive: 9 s of the demo, a blend at 4 s and a cut at 8 s (re-cache of window + sink under the new prompt)
        result = CliRunner().invoke(app, ["render", str(story), "--out", str(out), "--duration", f"{seconds}s",
                                          "--no-progress"])
    finally:
        torch.set_grad_enabled(grad)
    assert result.exit_code == 0, result.output
    info = probe_video(out)
    assert (info.codec, info.width, info.height, info.num_frames) == ("h264", 64, 64, seconds * 16)
    manifest = json.loads((tmp_path / "hub.manifest.json").read_text())
    assert f"hubtest-{name}" in json.dumps(manifest)


def test_presets_list_says_whether_files_are_present_and_verified(hubenv, tmp_path, monkeypatch) -> None:
    """`presets list` status column: local presets ready or missing a file; Hub presets unpinned, verified after a
    pull, "pulled, not verified" when no hash is remembered (nothing large is hashed by `list`)."""
    from typer.testing import CliRunner

    from lvstudio.cli import app
    from lvstudio.presets import integrity
    from lvstudio.presets.cli import presets_list, presets_verify

    _, root, _ = hubenv
    broken = tmp_path / "presets"
    broken.mkdir()
    (broken / "half.toml").write_text('name = "half"\n[files.dit]\npath = "nowhere.safetensors"\n')
    monkeypatch.setenv("LVSTUDIO_PRESET_PATH", os.pathsep.join([str(root / "presets"), str(broken)]))
    status = dict(presets_list(echo=lambda _m: None))
    assert status["tiny"] == "ready" and status["half"] == "missing nowhere.safetensors"
    assert status["self-forcing-1.3b"] == "not pulled"  # the shipped preset: unpinned, and nothing pulled here
    assert {status[f"hubtest-{n}"] for n in SHIPPED} == {"verified"}
    stamps = root / "lv" / "verified.json"
    assert not stamps.exists()  # files this small are hashed every time, never stamped
    try:  # as if they were large: `list` hashes nothing large, so a file never hashed since the pull is unchecked
        monkeypatch.setattr(integrity, "SMALL_FILE", 0)
        assert dict(presets_list(echo=lambda _m: None))["hubtest-longlive-1.3b"] == "pulled, not verified"
        presets_verify("hubtest-longlive-1.3b", echo=lambda _m: None)  # hashes (and stamps) every file
        assert dict(presets_list(echo=lambda _m: None))["hubtest-longlive-1.3b"] == "verified"
    finally:
        stamps.unlink(missing_ok=True)
    result = CliRunner().invoke(app, ["presets", "list"])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("hubtest-causvid-1.3b "))
    assert "verified" in line and "causal-kv" in line


def test_hub_cli_commands_exit_2_with_one_clear_line(hubenv, tmp_path, monkeypatch) -> None:
    import typer
    from typer.testing import CliRunner

    from lvstudio.cli import _LvGroup
    from lvstudio.presets.cli import presets_app

    root = typer.Typer(cls=_LvGroup)
    root.add_typer(presets_app, name="presets")
    runner = CliRunner()
    ok = runner.invoke(root, ["presets", "verify", "hubtest-self-forcing-1.3b"])
    assert ok.exit_code == 0, ok.output
    _fresh_lv(monkeypatch, tmp_path)
    bad = runner.invoke(root, ["presets", "pin", "hubtest-causvid-1.3b"])  # nothing pulled, nothing to pin
    assert bad.exit_code == 2 and "pull it first" in bad.output and "Traceback" not in bad.output
    good = runner.invoke(root, ["presets", "pull", "hubtest-causvid-1.3b"])
    assert good.exit_code == 0, good.output


def test_speed_benchmark_says_when_no_gpu(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    import sys

    spec = importlib.util.spec_from_file_location("wan_speed", ROOT / "benchmarks" / "wan_speed.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "wan_speed", bench)
    spec.loader.exec_module(bench)
    if not torch.cuda.is_available():
        assert bench.main([]) == 0
        assert "no CUDA GPU" in capsys.readouterr().out
    # The measured code path itself, at tiny size on the CPU (a smoke test, not a measurement).
    assert bench.main(["--allow-cpu", "--tiny", "--blocks", "2", "--warmup", "0", "--no-vae"]) == 0
    out = capsys.readouterr().out
    assert "window21" in out and "window12+sink3" in out


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"), [(False, False, torch.float32),
                                                              (True, False, torch.bfloat16),
                                                              (False, True, torch.bfloat16)])
def test_bfloat16_if_native_follows_the_cpu(monkeypatch: pytest.MonkeyPatch, avx512_bf16: bool, amx: bool,
                                            expected: torch.dtype) -> None:
    """`bfloat16-if-native` (the tiny presets): bfloat16 only where the CPU has bfloat16 arithmetic, since torch
    emulates it elsewhere, several times slower than float32; `auto` stays float32 on every CPU."""
    from lvstudio.models.wan_components import resolve_dtype

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_dtype("bfloat16-if-native", torch.device("cpu")) == expected
    assert resolve_dtype("bfloat16-if-native", torch.device("mps")) == torch.float32
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(PresetError, match="bfloat16-if-native"):
        resolve_dtype("bf16", torch.device("cpu"))
