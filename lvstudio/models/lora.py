"""LoRA adapters for our WanDiT through peft (Stable Video Infinity / LongLive targets).

Targets follow SVI's `lora_target_modules "q,k,v,o,ffn.0,ffn.2"`: every name is matched as a dotted suffix of a
linear layer inside `blocks.N`, i.e. `self_attn.{q,k,v,o}`, `cross_attn.{q,k,v,o}` (not `k_img`/`v_img`), `ffn.0`
and `ffn.2` of every block — never the embeddings or the head. Adapters start as peft's default (A kaiming-uniform,
B zeros: the adapted model equals the base model), scale = alpha / rank.

Files are safetensors with plain keys `blocks.N.<module>.lora_A.weight` [r, in] / `lora_B.weight` [out, r] (the
convention `lvstudio.models.wan_components.merge_lora` reads) and metadata `rank`, `alpha`, `targets`, `base`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lvstudio.errors import PresetError

LORA_TARGETS = "q,k,v,o,ffn.0,ffn.2"
LORA_FORMAT = "lvstudio.lora/1"
_BLOCK = re.compile(r"^blocks\.\d+\.")
_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")  # optional peft adapter name


class LoraError(PresetError):
    """A LoRA file or state that does not fit (missing file, wrong format, unknown module, wrong shape)."""


def target_names(dit: nn.Module, targets: str = LORA_TARGETS) -> list[str]:
    """Names of the linear layers inside `blocks.N` that `targets` (comma-separated dotted suffixes) selects."""
    wanted = [t.strip() for t in targets.split(",") if t.strip()]
    if not wanted:
        raise LoraError(f"LoRA targets {targets!r} name no module", hint=f"use e.g. {LORA_TARGETS!r}")
    names = []
    for name, mod in dit.named_modules():
        if isinstance(mod, nn.Linear) and _BLOCK.match(name) and any(name.endswith("." + w) for w in wanted):
            names.append(name)
    if not names:
        linears = sorted(n for n, m in dit.named_modules() if isinstance(m, nn.Linear) and _BLOCK.match(n))[:8]
        raise LoraError(f"LoRA targets {targets!r} match no linear layer in the DiT's blocks",
                        hint=f"block linears are named like: {', '.join(linears)}")
    return names


def add_lora(dit: nn.Module, rank: int, alpha: float, targets: str = LORA_TARGETS) -> nn.Module:
    """Inject trainable LoRA adapters into `dit` in place (peft `inject_adapter_in_model`) and freeze the base.

    The result is still the same WanDiT object, callable as `dit(x, t, cond, attention=..., start_frame=...)`.
    """
    from peft import LoraConfig, inject_adapter_in_model

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1 (got {rank})")
    names = target_names(dit, targets)
    cfg = LoraConfig(r=rank, lora_alpha=float(alpha), lora_dropout=0.0, target_modules=names,
                     init_lora_weights=True)
    dit = inject_adapter_in_model(cfg, dit)
    for name, p in dit.named_parameters():
        p.requires_grad_(".lora_" in name)
    return dit


def plain_key(name: str) -> str | None:
    """peft parameter name -> `blocks.N.<module>.lora_{A,B}.weight` (None for non-LoRA parameters)."""
    name = name.removeprefix("module.").removeprefix("base_model.model.")
    m = _KEY.match(name)
    if m is None or ".lora_" not in name:
        return None
    return f"{m['module']}.lora_{m['ab']}.weight"


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters of a LoRA-injected model, detached, under plain keys `blocks.N.<module>.lora_{A,B}.weight`."""
    out = {}
    for name, p in model.named_parameters():
        key = plain_key(name)
        if key is not None:
            out[key] = p.detach().clone()
    if not out:
        raise LoraError("the model has no LoRA adapters", hint="call add_lora() or apply_lora(merge=False) first")
    return out


def lora_rank(state: Mapping[str, Tensor]) -> int:
    ranks = {int(v.shape[0]) for k, v in state.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise LoraError(f"LoRA has ranks {sorted(ranks)}; expected exactly one")
    return ranks.pop()


def save_lora(path: str | Path, state: Mapping[str, Tensor], rank: int, alpha: float, targets: str = LORA_TARGETS,
              base: Mapping[str, Any] | None = None) -> Path:
    """Write adapters (plain keys, float32) atomically with metadata rank/alpha/targets/base (e.g. dit sha, config)
    and a checksum (`lvstudio.checked_files`)."""
    from lvstudio.checked_files import save_checked

    if lora_rank(state) != rank:
        raise ValueError(f"adapters have rank {lora_rank(state)}, not {rank}")
    meta = {"format": LORA_FORMAT, "rank": str(int(rank)), "alpha": repr(float(alpha)), "targets": targets,
            "base": json.dumps(dict(base or {}))}
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in state.items()}
    return save_checked(tensors, path, meta)


def load_lora(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read a LoRA file -> (state with plain keys, meta {rank, alpha, targets, base}); clear errors otherwise.

    A file that carries a checksum (`save_lora` writes one) is verified: DamagedFileError naming it and the fix when
    its tensors changed or are cut short; files without one (from elsewhere, older) are only parsed."""
    from safetensors import SafetensorError, safe_open

    from lvstudio.checked_files import WEIGHTS_HINT, load_checked

    p = Path(path)
    if not p.is_file():
        raise LoraError(f"LoRA file {p} does not exist", hint="train one with `lvstudio train erft CONFIG.toml` or "
                                                             "fix the preset's [files] entry")
    try:
        with safe_open(str(p), "pt"):
            pass  # a header that parses: a safetensors file (anything else is no LoRA file, not a damaged one)
    except (SafetensorError, OSError, ValueError) as err:
        raise LoraError(f"{p} is not a safetensors LoRA file ({str(err).splitlines()[0]})",
                        hint="LoRA files are safetensors (pickled .pt/.ckpt files are not read)") from None
    state, raw_meta = load_checked(p, require_digest=False, hint=WEIGHTS_HINT)
    plain: dict[str, Tensor] = {}
    for k, v in state.items():
        key = plain_key(k)
        if key is None:
            raise LoraError(f"{p}: key {k!r} is not a LoRA weight",
                            hint="expected keys like blocks.0.self_attn.q.lora_A.weight")
        plain[key] = v
    if not plain:
        raise LoraError(f"{p} holds no LoRA weights")
    rank = int(raw_meta.get("rank", lora_rank(plain)))
    meta = {"rank": rank, "alpha": float(raw_meta.get("alpha", rank)), "targets": raw_meta.get("targets"),
            "base": json.loads(raw_meta.get("base", "{}"))}
    return plain, meta


def check_lora(dit: nn.Module, state: Mapping[str, Tensor]) -> list[str]:
    """Check every adapter against the DiT; returns the adapted module names. Raises LoraError naming the first
    key whose module does not exist (or is no linear layer) or whose shape does not fit."""
    modules = dict(dit.named_modules())
    rank = lora_rank(state)
    names: list[str] = []
    for key in sorted(state):
        m = _KEY.match(key)
        if m is None:
            raise LoraError(f"LoRA key {key!r} is not a LoRA weight", hint="expected blocks.N.<module>.lora_A.weight")
        mod = modules.get(m["module"])
        if getattr(mod, "base_layer", None) is not None:
            mod = mod.base_layer  # already injected
        if not isinstance(mod, nn.Linear):
            linears = sorted(n for n, x in modules.items() if isinstance(x, nn.Linear) and _BLOCK.match(n))[:8]
            what = "is not a linear layer" if mod is not None else "matches no module"
            raise LoraError(f"LoRA key {key!r}: {m['module']!r} {what} of the DiT",
                            hint=f"block linears are named like: {', '.join(linears)}")
        want = (rank, mod.in_features) if m["ab"] == "A" else (mod.out_features, rank)
        if tuple(state[key].shape) != want:
            raise LoraError(f"LoRA key {key!r} has shape {list(state[key].shape)}, the DiT expects {list(want)}",
                            hint="the LoRA was trained for another DiT config (dim/ffn_dim) or rank")
        if m["ab"] == "A":
            other = f"{m['module']}.lora_B.weight"
            if other not in state:
                raise LoraError(f"LoRA key {key!r} has no matching {other!r}")
            names.append(m["module"])
    return names


def apply_lora(dit: nn.Module, lora: str | Path | Mapping[str, Tensor], *, merge: bool, alpha: float | None = None,
               ) -> nn.Module:
    """Apply adapters from a file or a plain-key state to `dit` (modified in place; copy it first to keep it).

    merge=True: W += (alpha/r)·B·A through `wan_components.merge_lora`; returns the plain DiT.
    merge=False: injects peft adapters holding the weights; returns the same DiT with live adapters.
    alpha: default from the file's metadata, else = rank.
    """
    from lvstudio.models.wan_components import merge_lora

    if isinstance(lora, (str, Path)):
        state, meta = load_lora(lora)
        a = float(meta["alpha"]) if alpha is None else float(alpha)
    else:
        state = dict(lora.items())
        a = float(lora_rank(state)) if alpha is None else float(alpha)
    names = check_lora(dit, state)
    rank = lora_rank(state)
    regex = "|".join(re.escape(n) for n in names)
    if merge:
        merged, _ = merge_lora(dit, state, target_modules=f"^(?:{regex})$", rank=rank, alpha=a)
        return merged
    from peft import LoraConfig, inject_adapter_in_model

    cfg = LoraConfig(r=rank, lora_alpha=a, lora_dropout=0.0, target_modules=names)
    dit = inject_adapter_in_model(cfg, dit)
    params = dict(dit.named_parameters())
    with torch.no_grad():
        for key, value in state.items():
            m = _KEY.match(key)
            target = params[f"{m['module']}.lora_{m['ab']}.default.weight"]  # type: ignore[index]
            target.copy_(value.to(target.dtype))
    return dit
