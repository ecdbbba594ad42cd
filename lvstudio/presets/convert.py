"""Convert upstream pickle checkpoints (`.pt`) into safetensors, once — the only place lvstudio unpickles anything.

Self-Forcing, CausVid and LongLive publish their generators as `torch.save` pickles: `{"generator": sd,
"generator_ema": sd, ...}` with keys prefixed by their training wrappers (`model.`, `_fsdp_wrapped_module.`), and
LongLive's LoRA as `{"generator_lora": peft_state_dict}`. A pickle can run code when it is loaded, so:

  * this module is the only one that calls `torch.load`, always with `weights_only=True` (torch >= 2.10 refuses
    anything but tensors and plain containers), and only on a file whose sha256 was checked first;
  * the output is safetensors (a JSON header plus raw buffers) with official Wan key names, written atomically,
    and a small JSON record beside it (`<file>.lvstudio.json`: sha256 of the output, source repo/commit/path and
    source sha256) that `lvstudio.presets.hub.verify` checks before every load (its hash is stamped as it is
    written, so that check reads nothing while the file is unchanged).
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lvstudio.atomic import atomic_write_json, save_safetensors_atomic
from lvstudio.errors import OutputExistsError, PresetError

FORMAT_DIT = "lvstudio-dit"
FORMAT_LORA = "lvstudio-lora"
FORMAT_TENSORS = "lvstudio-tensors"
CONVERTER_VERSION = "1"
Kind = Literal["dit", "lora", "tensors"]

_LORA_KEY = re.compile(r"blocks\.\d+\.[A-Za-z0-9_.]+\.lora_(A|B)\.weight")


@dataclass(frozen=True)
class Converted:
    """One converted file."""

    source: Path
    output: Path
    kind: str
    num_tensors: int
    sha256: str
    skipped: bool = False  # True when an up-to-date output already existed


def load_pickled_checkpoint(path: Path) -> Any:
    """`torch.load(path, weights_only=True)` (memory-mapped when the file allows it); refusals become PresetError."""
    import pickle

    import torch

    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # legacy (non-zip) files cannot be memory-mapped
            if "mmap" not in str(err).lower():
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise PresetError(
            f"{path} is not a plain weights checkpoint; refusing to unpickle it ({_refusal_reason(err)})",
            hint="only tensors and plain containers are accepted (torch.load(weights_only=True)); get the weights "
                 "from the official repository",
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise PresetError(f"cannot read checkpoint {path}: {err}",
                          hint="the file is truncated or not a torch checkpoint; pull it again with --force") from None


def _refusal_reason(err: Exception) -> str:
    """Why torch.load(weights_only=True) refused a pickle, without PyTorch's advice to load it with
    weights_only=False (lvstudio never does: that runs the pickle's code)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return f"it needs {found.group(1).rstrip('.,')}, which is code, not a tensor"
    found = re.search(r"WeightsUnpickler error: ([^\n]+)", text)
    if found:
        return found.group(1).split(". Please")[0].strip().rstrip(".")
    return "it holds objects other than tensors and plain containers"


def check_single_output(output: Path) -> None:
    """`lvstudio presets convert FILE.pt --output OUTPUT`: OUTPUT must name a .safetensors file (PresetError)."""
    if output.is_dir():
        raise PresetError(f"--output {output} is a folder",
                          hint=f"give a file name inside it, e.g. --output {output / 'model.safetensors'}")
    if output.suffix.lower() != ".safetensors":
        raise PresetError(f"--output {output} does not end in .safetensors: convert writes safetensors files",
                          hint=f"name the output e.g. --output {output.with_suffix('.safetensors')}")


def _pick(ckpt: Any, state_key: str | None, path: Path) -> Mapping[str, Any]:
    if not isinstance(ckpt, Mapping):
        raise PresetError(f"{path} holds a {type(ckpt).__name__}, not a state dict")
    if state_key is None:
        return ckpt
    if state_key not in ckpt or not isinstance(ckpt[state_key], Mapping):
        top = ", ".join(sorted(str(k) for k in ckpt)[:12])
        raise PresetError(f"{path} has no {state_key!r} state dict (top-level keys: {top})",
                          hint="fix files.<role>.state_key in the preset")
    return ckpt[state_key]


def _tensors_only(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Contiguous tensors that share no storage (safetensors refuses shared buffers)."""
    import torch

    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor):
            continue
        v = v.detach()
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        if ptr in seen:
            v = v.clone()
        elif ptr != -1:
            seen.add(ptr)
        out[k] = v.contiguous()
    return out


def dit_state_dict(ckpt: Any, *, state_key: str | None = None, path: Path = Path("checkpoint")) -> dict[str, Any]:
    """An upstream DiT checkpoint -> official-name state dict (EMA preferred, wrappers stripped, diffusers mapped)."""
    from lvstudio.models.key_maps import diffusers_to_official, looks_like_diffusers, strip_wrappers

    inner = _pick(ckpt, state_key, path)
    sd = strip_wrappers(inner)  # picks generator_ema > generator > model when state_key is None
    if looks_like_diffusers(sd):
        sd = diffusers_to_official(sd)
    return _tensors_only(sd)


def check_dit_keys(sd: Mapping[str, Any], config: Any, source: str) -> None:
    """Raise PresetError unless `sd` fits a WanDiT of `config` exactly (names and shapes; checked on meta tensors)."""
    import torch

    from lvstudio.models.key_maps import WeightsError, load_dit_state_dict
    from lvstudio.models.wan_dit import WanDiT

    with torch.device("meta"):
        model = WanDiT(config)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "copying into a meta parameter is a no-op": intended, keys only
            load_dit_state_dict(model, sd, source=source)
    except WeightsError as err:
        raise PresetError(str(err), hint="the preset's dit_config does not match this checkpoint") from None


def lora_state_dict(ckpt: Any, *, state_key: str | None = "generator_lora",
                    path: Path = Path("lora")) -> dict[str, Any]:
    """LongLive-style LoRA -> `blocks.N.<module>.lora_{A,B}.weight` keys (peft wrappers and adapter names removed)."""
    inner: Mapping[str, Any]
    if isinstance(ckpt, Mapping) and state_key is not None and isinstance(ckpt.get(state_key), Mapping):
        inner = ckpt[state_key]
    else:
        inner = _pick(ckpt, None, path)
    out: dict[str, Any] = {}
    for key, value in _tensors_only(inner).items():
        if "lora_" not in key:
            continue
        k = key[key.index("blocks.") :] if "blocks." in key else key
        k = re.sub(r"\.lora_(A|B)\.[^.]+\.weight$", r".lora_\1.weight", k)  # drop a peft adapter name ("default")
        k = k.replace("._fsdp_wrapped_module", "")
        if not _LORA_KEY.fullmatch(k):
            raise PresetError(f"{path}: unexpected LoRA key {key!r}",
                              hint="expected peft keys like base_model.model.blocks.0.self_attn.q.lora_A.weight")
        out[k] = value
    if not out:
        raise PresetError(f"{path} holds no LoRA weights (no '*lora_A*' keys)",
                          hint="check files.lora.state_key in the preset (LongLive: generator_lora)")
    return out


def lora_rank(sd: Mapping[str, Any]) -> int:
    ranks = {int(v.shape[0]) for k, v in sd.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise PresetError(f"LoRA adapters have mixed ranks {sorted(ranks)}", hint="lvstudio supports one rank per file")
    return ranks.pop()


def convert_checkpoint(
    source: Path,
    output: Path,
    *,
    kind: Kind = "dit",
    state_key: str | None = None,
    dit_config: Any = None,
    source_info: Mapping[str, str] | None = None,
    force: bool = False,
    replace: bool = True,
) -> Converted:
    """Convert one upstream `.pt` into safetensors + its JSON record. Skips work when the record is up to date.

    kind: "dit" (official Wan keys, checked against `dit_config` when given), "lora" (LongLive adapter) or
    "tensors" (every tensor, wrappers stripped). source_info (repo, commit, path, sha256) goes into the record.
    force: convert again even when up to date. replace=False (an output the user named): an existing output that
    is not an up-to-date conversion of `source` is an OutputExistsError unless `force`.
    """
    from lvstudio.presets.hub import sidecar_path
    from lvstudio.presets.integrity import Stamps, sha256_file

    source, output = Path(source), Path(output)
    if not source.is_file():
        raise PresetError(f"checkpoint {source} does not exist")
    info = dict(source_info or {})
    src_sha = info.get("source_sha256") or sha256_file(source)
    record_path = sidecar_path(output)
    if not force and output.is_file() and record_path.is_file():
        record = json.loads(record_path.read_text(encoding="utf-8"))
        if record.get("source_sha256") == src_sha and record.get("kind") == kind and record.get("sha256"):
            return Converted(source, output, kind, int(record.get("num_tensors", 0)), record["sha256"], skipped=True)
    if not (replace or force) and (output.exists() or record_path.exists()):
        what = output if output.exists() else record_path
        raise OutputExistsError(what, f"{what} already exists and is not an up-to-date {kind} conversion of {source}",
                                hint=f"pass --force to convert again and replace it (and {record_path.name}), "
                                     "or choose another --output")
    # Step 1: unpickle safely; Step 2: map keys; Step 3: write safetensors + record.
    ckpt = load_pickled_checkpoint(source)
    meta: dict[str, str] = {"converter": f"lvstudio.convert/{CONVERTER_VERSION}", "source_sha256": src_sha}
    if kind == "dit":
        sd = dit_state_dict(ckpt, state_key=state_key, path=source)
        if dit_config is not None:
            check_dit_keys(sd, dit_config, str(source))
            meta["config"] = json.dumps(dit_config.to_dict())
        meta["format"] = FORMAT_DIT
    elif kind == "lora":
        sd = lora_state_dict(ckpt, state_key=state_key or "generator_lora", path=source)
        meta["format"] = FORMAT_LORA
        meta["rank"] = str(lora_rank(sd))
    elif kind == "tensors":
        from lvstudio.models.key_maps import strip_wrappers

        sd = _tensors_only(strip_wrappers(_pick(ckpt, state_key, source)))
        meta["format"] = FORMAT_TENSORS
    else:
        raise ValueError(f"kind must be 'dit', 'lora' or 'tensors' (got {kind!r})")
    output.parent.mkdir(parents=True, exist_ok=True)
    save_safetensors_atomic(sd, output, meta)
    del ckpt, sd
    out_sha = sha256_file(output)
    stamps = Stamps(trust=True)  # the first load after a pull need not hash the converted file again
    stamps.remember(output, out_sha)
    stamps.save()
    atomic_write_json(record_path, {**info, "source_sha256": src_sha, "sha256": out_sha, "kind": kind,
                                     "num_tensors": len(_read_keys(output)), "converter": CONVERTER_VERSION},
                      sort_keys=True)
    return Converted(source, output, kind, len(_read_keys(output)), out_sha)


def _read_keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def role_kind(preset: Any, role: str) -> Kind:
    """What a preset's `.pt` role holds: the LoRA file, the DiT, or plain tensors."""
    if preset.lora is not None and role == preset.lora.file:
        return "lora"
    return "dit" if role == "dit" else "tensors"


def convert_preset(preset: Any, *, force: bool = False) -> list[Converted]:
    """Convert every `.pt` file of a pulled preset (verifying each source's sha256 first)."""
    from lvstudio.models.wan_dit import WanDiTConfig
    from lvstudio.presets.hub import hub_entries, require_ok, resolve, verify_resolved

    resolved = resolve(preset, require_converted=False)
    pt_roles = [e.role for e in hub_entries(preset) if e.kind == "pt"]
    # Step 1: every pickle's bytes must be the ones the Hub (or the preset) vouches for before any is opened.
    checks = {c.path: c for c in verify_resolved(resolved, use_stamps=True, include_sources=True, roles=pt_roles)
              if c.path in {resolved.sources[r] for r in pt_roles}}
    require_ok(preset, list(checks.values()))
    out: list[Converted] = []
    for role in pt_roles:
        # Step 2: convert each source once (skipped when its record is up to date).
        entry = preset.files[role]
        src = resolved.sources[role]
        repo = preset.file_repo(role)
        kind = role_kind(preset, role)
        cfg = WanDiTConfig.from_dict(preset.dit_config) if (kind == "dit" and preset.dit_config) else None
        info = {"repo_id": repo, "commit": resolved.commits[repo], "path": entry.path}
        if src in checks:
            info["source_sha256"] = checks[src].sha256
        out.append(convert_checkpoint(src, resolved.paths[role], kind=kind, state_key=entry.state_key,
                                      dit_config=cfg, source_info=info, force=force))
    return out
