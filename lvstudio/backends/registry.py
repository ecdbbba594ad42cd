"""The backend registry: every backend name lvstudio knows, and where its class lives.

The storyboard and preset schemas, the CLI, the web studio and the eval/bench code read backend names from here and
nowhere else. Classes are imported only when a backend is made, so reading the names costs nothing (no torch).

Adding a backend is one new file in `lvstudio/backends/` (a subclass of `lvstudio.backends.base.BackendBase`) plus
one line below; the conformance suite (`tests/test_backend_conformance.py`) then asks for a test class for it.
"""

from __future__ import annotations

from types import MappingProxyType

# name -> "module:Class" (the class is imported when the backend is made)
REGISTRY = MappingProxyType({
    "causal-kv": "lvstudio.backends.causal_kv:CausalKVBackend",
    "streaming-dit": "lvstudio.backends.streaming_dit:StreamingDiTBackend",
    "erft-crossclip": "lvstudio.backends.erft_crossclip:ERFTCrossClipBackend",
})

BACKENDS: tuple[str, ...] = tuple(REGISTRY)
DEFAULT_BACKEND = "causal-kv"
