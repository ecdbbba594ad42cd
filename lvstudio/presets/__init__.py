"""Presets, in one place: what a preset is, where its files come from, and how it becomes models.

    schema   the preset TOML schema (pydantic), finding presets by name (`load_preset`, `available_presets`)
    hub      Hugging Face Hub files: pull, resolve (offline), verify (sha256), the lock of pinned commits
    convert  upstream `.pt` pickles -> safetensors, once (the only place that unpickles anything)
    load     a preset -> `ModelBundle` (DiT + text encoder + VAE on a device)
    cli      `lvstudio presets list | info | pull | verify | convert`

The commonly used names are importable from here (`from lvstudio.presets import load_preset, load_bundle`). They are
resolved on first use, so importing this package (as `lvstudio --help` does, for the `presets` sub-command) loads
neither pydantic nor torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lvstudio.presets.load import ModelBundle, TinyTextAdapter, load_bundle, load_dit
    from lvstudio.presets.schema import (
        AttentionSettings,
        CrossClipSettings,
        FileEntry,
        LoraSettings,
        Preset,
        SamplerSettings,
        StreamingSettings,
        available_presets,
        load_preset,
        presets_dir,
    )

_EXPORTS = {
    **dict.fromkeys(("AttentionSettings", "CrossClipSettings", "FileEntry", "LoraSettings", "Preset", "SamplerSettings",
                     "StreamingSettings", "available_presets", "load_preset", "presets_dir"), "schema"),
    **dict.fromkeys(("ModelBundle", "TinyTextAdapter", "load_bundle", "load_dit"), "load"),
}

__all__ = [
    "AttentionSettings",
    "CrossClipSettings",
    "FileEntry",
    "LoraSettings",
    "ModelBundle",
    "Preset",
    "SamplerSettings",
    "StreamingSettings",
    "TinyTextAdapter",
    "available_presets",
    "load_bundle",
    "load_dit",
    "load_preset",
    "presets_dir",
]


def __getattr__(name: str) -> Any:
    """Resolve a re-exported name from its submodule on first access (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
