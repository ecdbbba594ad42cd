"""State-dict key conversion for Wan2.1 DiTs: official names <-> diffusers names, and upstream wrapper stripping.

SkyReels-V2 checkpoints use the same names plus `fps_embedding` / `fps_projection.{0,2}` (diffusers
`SkyReelsV2Transformer3DModel`: `fps_projection.net.{0.proj,2}`); `dit_config_from_diffusers` / `dit_config_from_official`
turn either layout's config.json into a `WanDiTConfig` field dict.

Our `WanDiT` uses the official names. diffusers' `WanTransformer3DModel` renames almost everything and swaps
norm2/norm3 (official norm3 is the affine cross-attention norm; diffusers calls that norm2). The rules below are
substring replacements applied in order; the reverse direction applies the inverse rules in reverse order.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

# (official substring, diffusers substring), applied top to bottom official -> diffusers.
_RULES: tuple[tuple[str, str], ...] = (
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("fps_projection.0", "fps_projection.net.0.proj"),  # SkyReels-V2 sample info (fps_embedding keeps its name)
    ("fps_projection.2", "fps_projection.net.2"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    ("modulation", "scale_shift_table"),
    ("ffn.0", "ffn.net.0.proj"),
    ("ffn.2", "ffn.net.2"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    ("self_attn.o", "attn1.to_out.0"),
    ("self_attn.norm_q", "attn1.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k"),
    ("self_attn.q", "attn1.to_q"),
    ("self_attn.k", "attn1.to_k"),
    ("self_attn.v", "attn1.to_v"),
    ("cross_attn.o", "attn2.to_out.0"),
    ("cross_attn.norm_q", "attn2.norm_q"),
    ("cross_attn.norm_k_img", "attn2.norm_added_k"),
    ("cross_attn.norm_k", "attn2.norm_k"),
    ("cross_attn.k_img", "attn2.add_k_proj"),
    ("cross_attn.v_img", "attn2.add_v_proj"),
    ("cross_attn.q", "attn2.to_q"),
    ("cross_attn.k", "attn2.to_k"),
    ("cross_attn.v", "attn2.to_v"),
)

# Upstream training wrappers put these in front of (or inside) the real names.
_WRAPPER_PREFIXES = ("module.", "model.", "_fsdp_wrapped_module.", "_orig_mod.", "base_model.model.")
_CHECKPOINT_DICTS = ("generator_ema", "generator", "model", "state_dict", "module")


def _swap_norm23(key: str) -> str:
    # Official norm3 (affine, cross-attn) <-> diffusers norm2, inside blocks only; non-affine norms carry no keys.
    if not key.startswith("blocks."):
        return key
    if ".norm3." in key:
        return key.replace(".norm3.", ".norm2.")
    if ".norm2." in key:
        return key.replace(".norm2.", ".norm3.")
    return key


def official_to_diffusers_key(key: str) -> str:
    """Official Wan2.1 key -> diffusers `WanTransformer3DModel` key."""
    key = _swap_norm23(key)
    for old, new in _RULES:
        if old in key:
            key = key.replace(old, new)
            if old in ("head.modulation", "head.head"):
                break
    return key


def diffusers_to_official_key(key: str) -> str:
    """diffusers `WanTransformer3DModel` key -> official Wan2.1 key (the inverse of official_to_diffusers_key)."""
    if key == "scale_shift_table":
        return "head.modulation"
    if key.startswith("proj_out."):
        return "head.head." + key[len("proj_out.") :]
    for old, new in reversed(_RULES):
        if old.startswith("head."):
            continue
        if new in key:
            key = key.replace(new, old)
    return _swap_norm23(key)


def official_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {official_to_diffusers_key(k): v for k, v in sd.items()}


def diffusers_to_official(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {diffusers_to_official_key(k): v for k, v in sd.items()}


def strip_wrappers(checkpoint: Mapping[str, object], prefer_ema: bool = True) -> dict[str, Tensor]:
    """Unwrap an upstream training checkpoint into a plain official-name state dict.

    Handles `{"generator_ema": ...}` / `{"generator": ...}` / `{"model": ...}` dicts (Self-Forcing, CausVid, LongLive)
    and key prefixes such as `model.` and `_fsdp_wrapped_module.` (anywhere in the key, as FSDP nests them).
    """
    sd: Mapping[str, object] = checkpoint
    order = _CHECKPOINT_DICTS if prefer_ema else tuple(n for n in _CHECKPOINT_DICTS if n != "generator_ema")
    for name in order:
        inner = sd.get(name) if isinstance(sd, Mapping) else None
        if isinstance(inner, Mapping) and inner:
            sd = inner
            break
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        if not hasattr(value, "shape"):
            continue  # step counters, configs, optimizer scalars
        k = key.replace("._fsdp_wrapped_module", "").replace("_fsdp_wrapped_module.", "")
        changed = True
        while changed:
            changed = False
            for p in _WRAPPER_PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = value  # type: ignore[assignment]
    return out


def looks_like_diffusers(sd: Mapping[str, Tensor]) -> bool:
    return any(k.startswith("condition_embedder.") or ".attn1." in k for k in sd)


class WeightsError(ValueError):
    """A state dict does not fit the model: names the missing / unexpected / mis-shaped keys."""


def _listing(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_dit_state_dict(model: torch.nn.Module, sd: Mapping[str, object], source: str = "checkpoint") -> None:
    """Load official- or diffusers-named weights (wrappers stripped) into a WanDiT, strictly.

    Raises WeightsError naming the missing, unexpected and mis-shaped keys.
    """
    plain = strip_wrappers(sd)
    if looks_like_diffusers(plain):
        plain = diffusers_to_official(plain)
    own = model.state_dict()
    missing = sorted(set(own) - set(plain))
    unexpected = sorted(set(plain) - set(own))
    shapes = sorted(
        f"{k} {list(plain[k].shape)} (model {list(own[k].shape)})"
        for k in set(own) & set(plain)
        if tuple(plain[k].shape) != tuple(own[k].shape)
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if shapes:
        problems.append(f"shape mismatches: {_listing(shapes)}")
    if problems:
        raise WeightsError(
            f"{source} does not fit this DiT config — " + "; ".join(problems)
            + ". Check that the preset's model config matches the checkpoint."
        )
    model.load_state_dict(plain, strict=True)


# ---------------------------------------------------------------------------------------------------------------
# config.json -> WanDiTConfig fields
# ---------------------------------------------------------------------------------------------------------------

# diffusers `WanTransformer3DModel` / `SkyReelsV2Transformer3DModel` config key -> WanDiTConfig field.
_DIFFUSERS_FIELDS = {
    "in_channels": "in_dim", "out_channels": "out_dim", "text_dim": "text_dim", "freq_dim": "freq_dim",
    "ffn_dim": "ffn_dim", "num_layers": "num_layers", "eps": "eps", "patch_size": "patch_size",
    "rope_max_seq_len": "rope_max_frames", "inject_sample_info": "inject_sample_info",
    "num_frame_per_block": "num_frame_per_block",
}
# official `WanModel` (Wan2.1 / SkyReels-V2 original layout) config keys that are WanDiTConfig fields as they are.
_OFFICIAL_FIELDS = ("model_type", "patch_size", "text_len", "in_dim", "dim", "ffn_dim", "freq_dim", "text_dim",
                    "out_dim", "num_heads", "num_layers", "eps", "inject_sample_info")


def _require(config: Mapping[str, object], key: str, allowed: tuple[object, ...], source: str) -> None:
    value = config.get(key, allowed[0])
    if isinstance(value, list):
        value = tuple(value)
    if value not in allowed:
        raise ValueError(f"{source} config has {key}={value!r}; this DiT supports only {allowed[0]!r}")


def dit_config_from_diffusers(config: Mapping[str, object]) -> dict[str, object]:
    """diffusers transformer config.json (Wan or SkyReels-V2) -> WanDiTConfig fields (`WanDiTConfig.from_dict`)."""
    source = "diffusers transformer"
    known = set(_DIFFUSERS_FIELDS) | {"num_attention_heads", "attention_head_dim", "image_dim", "added_kv_proj_dim",
                                      "qk_norm", "cross_attn_norm", "pos_embed_seq_len"}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"{source} config has keys this DiT does not implement: {unknown}")
    _require(config, "qk_norm", ("rms_norm_across_heads",), source)
    _require(config, "cross_attn_norm", (True,), source)
    _require(config, "pos_embed_seq_len", (None,), source)
    out: dict[str, object] = {field: config[key] for key, field in _DIFFUSERS_FIELDS.items() if key in config}
    heads, head_dim = int(config.get("num_attention_heads", 40)), int(config.get("attention_head_dim", 128))
    out["num_heads"], out["dim"] = heads, heads * head_dim
    if config.get("added_kv_proj_dim") is not None or config.get("image_dim") is not None:
        out["model_type"] = "i2v"
        if config.get("image_dim") is not None:
            out["image_dim"] = config["image_dim"]
    if "patch_size" in out:
        out["patch_size"] = tuple(out["patch_size"])  # type: ignore[arg-type]
    return out


def dit_config_from_official(config: Mapping[str, object]) -> dict[str, object]:
    """Official `WanModel` config.json (Wan2.1, SkyReels-V2 original layout) -> WanDiTConfig fields."""
    source = "official Wan"
    known = set(_OFFICIAL_FIELDS) | {"window_size", "qk_norm", "cross_attn_norm"}
    unknown = sorted(k for k in config if not k.startswith("_") and k not in known)
    if unknown:
        raise ValueError(f"{source} config has keys this DiT does not implement: {unknown}")
    _require(config, "window_size", ((-1, -1),), source)
    _require(config, "qk_norm", (True,), source)
    _require(config, "cross_attn_norm", (True,), source)
    out: dict[str, object] = {k: config[k] for k in _OFFICIAL_FIELDS if k in config}
    if "patch_size" in out:
        out["patch_size"] = tuple(out["patch_size"])  # type: ignore[arg-type]
    return out
