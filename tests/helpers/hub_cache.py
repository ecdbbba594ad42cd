"""Build a Hugging Face Hub cache by hand (no network) holding tiny random weights in each upstream format.

Layout (what huggingface_hub itself writes): `models--owner--name/blobs/<etag>` holds the bytes, where the etag is
the sha256 for LFS files (weights) and git's blob sha1 for small files (JSON); `snapshots/<commit>/<path>` is a
relative symlink to the blob; `refs/main` holds the commit.

Upstream formats reproduced at tiny size:
  * Self-Forcing: `checkpoints/self_forcing_dmd.pt` = torch.save({"generator": sd, "generator_ema": sd_ema}), keys
    prefixed "model." (the EMA weights differ, so a test can tell which were taken);
  * CausVid: `autoregressive_checkpoint/model.pt` = {"generator": {"model." + key: ...}};
  * LongLive: `models/longlive_base.pt` = {"generator": {"model." + key}} (one copy, no EMA, as published) and
    `models/lora.pt` = {"generator_lora": peft's get_peft_model_state_dict of a rank-4 LoRA on every block linear};
  * Wan2.1 diffusers repo: `text_encoder/` (UMT5EncoderModel.save_pretrained, tiny config), `tokenizer/`
    (tokenizer.json + tokenizer_config.json + special_tokens_map.json), `vae/` (AutoencoderKLWan.save_pretrained).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lvstudio.models.wan_dit import WanDiT, WanDiTConfig

WAN_REPO = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
TEXT_DIM = 16
TEXT_LEN = 16
TINY_DIT = dict(model_type="t2v", dim=32, ffn_dim=64, num_heads=2, num_layers=2, in_dim=16, out_dim=16, freq_dim=32,
                text_dim=TEXT_DIM, text_len=TEXT_LEN)
VAE_CONFIG = dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                  temperal_downsample=[False, True, True])
LORA_RANK = 4
LORA_TARGETS = r"blocks\.\d+\.(self_attn\.(q|k|v|o)|cross_attn\.(q|k|v|o)|ffn\.(0|2))"
WORDS = "a red ball blue green on the sea grass snow sky moving right left bouncing resting at dusk over".split()


def commit_for(repo_id: str) -> str:
    """A fixed fake 40-hex commit per repository."""
    return hashlib.sha1(repo_id.encode()).hexdigest()


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


def add_file(cache: Path, repo_id: str, commit: str, path: str, data: bytes, ref: str | None = "main") -> Path:
    """Write one file into the cache layout (and point `refs/<ref>` at the commit); returns its blob path."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    lfs = not path.endswith(".json")
    etag = hashlib.sha256(data).hexdigest() if lfs else git_sha1(data)
    blob = repo / "blobs" / etag
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo / "snapshots" / commit / path
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return blob


def add_folder(cache: Path, repo_id: str, commit: str, prefix: str, folder: Path) -> None:
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            add_file(cache, repo_id, commit, f"{prefix}/{f.relative_to(folder).as_posix()}", f.read_bytes())


def _pt_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def tiny_dit(seed: int) -> WanDiT:
    torch.manual_seed(seed)
    dit = WanDiT(WanDiTConfig.from_dict(TINY_DIT))
    with torch.no_grad():
        dit.head.head.weight.normal_(0, 0.05)
    return dit


def tiny_lora(base: WanDiT, seed: int) -> tuple[dict[str, torch.Tensor], torch.nn.Module]:
    """A rank-4 LoRA on a copy of `base` in peft's own naming; returns (state dict, the peft model)."""
    import copy

    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(base), LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, lora_dropout=0.0,
                                                          target_modules=LORA_TARGETS))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    sd = {"base_model.model." + k if not k.startswith("base_model.") else k: v.clone()
          for k, v in get_peft_model_state_dict(model).items()}
    return sd, model.eval()


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0 - i * 0.01) for i, w in enumerate(WORDS)]
    vocab += [(c, -5.0) for c in "abcdefghijklmnopqrstuvwxyz"] + [("\u2581", -6.0)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5Tokenizer", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>",
         "model_max_length": 512, "extra_ids": 0}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}))


def write_text_encoder(folder: Path, vocab_size: int) -> None:
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(1)
    cfg = UMT5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                     relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0)
    UMT5EncoderModel(cfg).eval().save_pretrained(str(folder), safe_serialization=True)


def write_vae(folder: Path) -> None:
    from diffusers import AutoencoderKLWan

    torch.manual_seed(2)
    AutoencoderKLWan(**VAE_CONFIG).eval().save_pretrained(str(folder), safe_serialization=True)


@dataclass
class HubCache:
    """The hand-built cache and what went into it (for assertions)."""

    root: Path
    commits: dict[str, str] = field(default_factory=dict)
    dits: dict[str, WanDiT] = field(default_factory=dict)  # preset -> the DiT whose weights should load
    lora_model: torch.nn.Module | None = None  # LongLive base + LoRA as peft sees it


def build_hub_cache(root: Path) -> HubCache:
    """Every upstream repo of the three Hub presets, tiny and random, in a Hub cache at `root`."""
    hc = HubCache(root)
    # Wan2.1 diffusers components.
    wan = commit_for(WAN_REPO)
    hc.commits[WAN_REPO] = wan
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        write_tokenizer(t / "tokenizer")
        write_text_encoder(t / "text_encoder", vocab_size=3 + len(WORDS) + 27)
        write_vae(t / "vae")
        for sub in ("tokenizer", "text_encoder", "vae"):
            add_folder(root, WAN_REPO, wan, sub, t / sub)
    # Self-Forcing: generator + generator_ema, "model." prefix.
    sf_repo = "gdhe17/Self-Forcing"
    hc.commits[sf_repo] = commit_for(sf_repo)
    ema, raw = tiny_dit(10), tiny_dit(11)
    hc.dits["self-forcing-1.3b"] = ema
    add_file(root, sf_repo, hc.commits[sf_repo], "checkpoints/self_forcing_dmd.pt", _pt_bytes({
        "generator": {"model." + k: v for k, v in raw.state_dict().items()},
        "generator_ema": {"model." + k: v for k, v in ema.state_dict().items()},
        "step": 600,
    }))
    # CausVid: generator only.
    cv_repo = "tianweiy/CausVid"
    hc.commits[cv_repo] = commit_for(cv_repo)
    cv = tiny_dit(12)
    hc.dits["causvid-1.3b"] = cv
    add_file(root, cv_repo, hc.commits[cv_repo], "autoregressive_checkpoint/model.pt",
             _pt_bytes({"generator": {"model." + k: v for k, v in cv.state_dict().items()}}))
    # LongLive: the generator only (upstream use_ema: false) + peft LoRA.
    ll_repo = "Efficient-Large-Model/LongLive-1.3B"
    hc.commits[ll_repo] = commit_for(ll_repo)
    base = tiny_dit(13)
    hc.dits["longlive-1.3b"] = base
    lora_sd, hc.lora_model = tiny_lora(base, 14)
    add_file(root, ll_repo, hc.commits[ll_repo], "models/longlive_base.pt",
             _pt_bytes({"generator": {"model." + k: v for k, v in base.state_dict().items()}}))
    add_file(root, ll_repo, hc.commits[ll_repo], "models/lora.pt", _pt_bytes({"generator_lora": lora_sd}))
    return hc


# ---------------------------------------------------------------------------------------------------------------
# Test presets: the shipped Hub presets with tiny model sizes (same repos, files and settings otherwise).


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} to TOML")


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """A small TOML writer for preset and training-config dicts (scalars, lists, nested tables)."""
    lines = [f"{json.dumps(k)} = {_toml_value(v)}" for k, v in data.items()
             if not isinstance(v, dict) and v is not None]
    out = "\n".join(lines) + ("\n" if lines else "")
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{prefix}.{json.dumps(k)}" if prefix else json.dumps(k)
            out += f"\n[{name}]\n" + to_toml(v, name)
    return out


def write_test_preset(folder: Path, shipped: str, *, name: str | None = None, size: int = 64,
                      **overrides: Any) -> Path:
    """presets/<shipped>.toml with tiny dit_config and size, written as `<folder>/<name>.toml`."""
    import tomli

    from lvstudio.presets import presets_dir

    data = tomli.loads((presets_dir() / f"{shipped}.toml").read_text(encoding="utf-8"))
    data["name"] = name or f"hubtest-{shipped}"
    data["width"] = data["height"] = size
    data["dit_config"] = dict(TINY_DIT)
    if "lora" in data:
        data["lora"] = {**data["lora"], "rank": LORA_RANK, "alpha": float(LORA_RANK)}
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{data['name']}.toml"
    path.write_text(to_toml(data), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# The online Hub, faked at huggingface_hub's function boundary (HfApi.model_info, snapshot_download)


class FakeHub:
    """Serves repositories from a hand-built Hub cache (`remote`) as the Hub would: `model_info(...).sha` resolves a
    branch, `snapshot_download` copies exactly the allowed files of a commit into the caller's cache (or, with
    `dry_run`, lists them). Counts what it is asked."""

    def __init__(self, remote: Path) -> None:
        self.remote = remote
        self.resolved: list[tuple[str, str]] = []  # (repo, revision) asked of model_info
        self.downloads: list[tuple[str, str]] = []  # (repo, commit) actually downloaded

    def commit(self, repo_id: str, revision: str) -> str:
        from huggingface_hub import errors

        folder = self.remote / ("models--" + repo_id.replace("/", "--"))
        if not folder.is_dir():
            raise errors.RepositoryNotFoundError(f"404: {repo_id}", response=_response(404))
        ref = folder / "refs" / revision
        commit = ref.read_text().strip() if ref.is_file() else revision
        if not (folder / "snapshots" / commit).is_dir():
            raise errors.RevisionNotFoundError(f"404: {repo_id}@{revision}", response=_response(404))
        return commit

    def move_branch(self, repo_id: str, files: dict[str, bytes], branch: str = "main") -> str:
        """A new commit on the remote: the branch's files with `files` replaced or added."""
        old = self.commit(repo_id, branch)
        new = hashlib.sha1((old + json.dumps(sorted(files))).encode()).hexdigest()
        snap = self.remote / ("models--" + repo_id.replace("/", "--")) / "snapshots" / old
        for f in sorted(snap.rglob("*")):
            if f.is_file() and f.relative_to(snap).as_posix() not in files:
                add_file(self.remote, repo_id, new, f.relative_to(snap).as_posix(), f.read_bytes(), ref=None)
        for path, data in files.items():
            add_file(self.remote, repo_id, new, path, data, ref=None)
        (self.remote / ("models--" + repo_id.replace("/", "--")) / "refs" / branch).write_text(new)
        return new

    def model_info(self, repo_id: str, revision: str | None = None, **_kw: Any) -> Any:
        from types import SimpleNamespace

        self.resolved.append((repo_id, revision or "main"))
        return SimpleNamespace(id=repo_id, sha=self.commit(repo_id, revision or "main"))

    def snapshot_download(self, repo_id: str, *, revision: str, cache_dir: str, allow_patterns: list[str],
                          dry_run: bool = False, force_download: bool = False, **_kw: Any) -> Any:
        from fnmatch import fnmatch
        from types import SimpleNamespace

        commit = self.commit(repo_id, revision)
        snap = self.remote / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commit
        files = [f for f in sorted(snap.rglob("*"))
                 if f.is_file() and any(fnmatch(f.relative_to(snap).as_posix(), p) for p in allow_patterns)]
        local = Path(cache_dir) / ("models--" + repo_id.replace("/", "--")) / "snapshots" / commit
        if dry_run:
            return [SimpleNamespace(filename=f.relative_to(snap).as_posix(), file_size=f.stat().st_size,
                                    commit_hash=commit, is_cached=(local / f.relative_to(snap)).is_file(),
                                    will_download=True) for f in files]
        self.downloads.append((repo_id, commit))
        for f in files:
            add_file(Path(cache_dir), repo_id, commit, f.relative_to(snap).as_posix(), f.read_bytes(), ref=None)
        return str(local)


def _response(status: int) -> Any:
    import importlib

    from huggingface_hub import errors

    http = importlib.import_module(errors.Response.__module__.split(".")[0])  # httpx (hub 1.x) or httpx2 (2.x)
    return http.Response(status, request=http.Request("GET", "https://huggingface.co/api/models/x"))
