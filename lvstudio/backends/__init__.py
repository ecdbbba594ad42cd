"""Backends: causal-kv, streaming-dit, erft-crossclip — one protocol (`lvstudio.backends.base.Backend`)."""

from __future__ import annotations

BACKENDS = ("causal-kv", "streaming-dit", "erft-crossclip")


def make_backend(name: str, bundle, buffer, *, seed: int, width: int, height: int, anchors=None,
                 lora=None):
    """Instantiate a backend by name (lazy imports keep `import lvstudio.backends` cheap).

    lora: erft-crossclip only — None = the preset's ERFT LoRA if it names one, False = none, True = required, or a path.
    """
    from lvstudio.errors import LvError

    if lora is not None and name != "erft-crossclip":
        raise LvError(f"a LoRA override applies to the erft-crossclip backend, not {name!r}",
                      hint="drop the lora option or use backend = \"erft-crossclip\"")
    if name == "causal-kv":
        from lvstudio.backends.causal_kv import CausalKVBackend

        return CausalKVBackend(bundle, buffer, seed=seed, width=width, height=height, anchors=anchors)
    if name == "streaming-dit":
        from lvstudio.backends.streaming_dit import StreamingDiTBackend

        return StreamingDiTBackend(bundle, buffer, seed=seed, width=width, height=height, anchors=anchors)
    if name == "erft-crossclip":
        from lvstudio.backends.erft_crossclip import ERFTCrossClipBackend

        return ERFTCrossClipBackend(bundle, buffer, seed=seed, width=width, height=height, anchors=anchors, lora=lora)
    if name in BACKENDS:
        raise LvError(f"backend {name!r} is not available in this build yet", hint="use backend = \"causal-kv\"")
    raise LvError(f"unknown backend {name!r}", hint=f"choose one of: {', '.join(BACKENDS)}")
