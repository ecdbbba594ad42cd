"""Backends: one file per backend (causal_kv, streaming_dit, erft_crossclip), all deriving from
`lvstudio.backends.base.BackendBase`, all listed in `lvstudio.backends.registry`.

`make_backend(name, ...)` builds one by name; importing this package stays cheap (no torch) because backend classes
are imported only when one is made.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lvstudio.backends.registry import BACKENDS, DEFAULT_BACKEND, REGISTRY
from lvstudio.errors import LvError

if TYPE_CHECKING:
    from lvstudio.backends.base import BackendBase
    from lvstudio.caches import AnchorCache
    from lvstudio.presets.load import ModelBundle
    from lvstudio.prompt_stream import PromptStreamBuffer

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "backend_class", "make_backend"]


def backend_class(name: str) -> type[BackendBase]:
    """The class registered under `name` (imported now); LvError naming the choices for an unknown name."""
    if name not in REGISTRY:
        raise LvError(f"unknown backend {name!r}", hint=f"choose one of: {', '.join(BACKENDS)}")
    module, _, cls = REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module), cls)


def make_backend(name: str, bundle: ModelBundle, buffer: PromptStreamBuffer, *, seed: int, width: int, height: int,
                 anchors: AnchorCache | None = None, cfg_scale: float | None = None,
                 **options: Any) -> BackendBase:
    """Instantiate a backend by name.

    cfg_scale: classifier-free guidance (None = the preset's for this backend). options: backend-specific keywords
    (`BackendBase.options`), e.g. `lora` for erft-crossclip: None = the preset's ERFT LoRA if it names one,
    False = none, True = required, or a path. An option given as None counts as not given.
    """
    cls = backend_class(name).variant_for(bundle)
    given = {k: v for k, v in options.items() if v is not None}
    for key in given:
        if key not in cls.options:
            takers = [n for n in BACKENDS if key in backend_class(n).options]
            if name in takers:  # a variant of the backend for this kind of preset (SVI) takes no such option
                raise LvError(f"the {key!r} option does not apply to {name!r} with preset {bundle.preset.name!r} "
                              f"(run by {cls.__name__})", hint=f"drop {key}; this preset's LoRA is merged as it loads")
            raise LvError(f"the {key!r} option applies to the {', '.join(takers) or 'no'} backend, not {name!r}",
                          hint=f"drop {key} or use backend = \"{takers[0]}\"" if takers else f"drop {key}")
    return cls(bundle, buffer, seed=seed, width=width, height=height, anchors=anchors, cfg_scale=cfg_scale, **given)
