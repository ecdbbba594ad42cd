"""The tiny text encoder's vocabulary, without torch: how prompts split into words, and which words a trained
encoder knows (read from its safetensors header), so `lvstudio check` can warn before anything is loaded."""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

PAD = "<pad>"
_WORD = re.compile(r"[a-z]+")
_MAX_HEADER = 100 * 2**20  # a safetensors header larger than this is not a text encoder file


def split_words(prompt: str) -> list[str]:
    """Lower-case words of a prompt (punctuation and digits dropped)."""
    return _WORD.findall(prompt.lower())


def read_vocabulary(path: str | Path) -> frozenset[str]:
    """The words a tiny text-encoder file knows (its config in the safetensors metadata), PAD excluded.

    Raises ValueError when the file is not a safetensors file with a text-encoder config."""
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", head)
        if size > _MAX_HEADER:
            raise ValueError(f"{path}: not a safetensors file (header of {size} bytes)")
        raw = fh.read(size)
    try:
        meta = json.loads(raw).get("__metadata__") or {}
        vocab = json.loads(meta["config"])["vocab"]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: no tiny text-encoder config in the safetensors metadata") from None
    return frozenset(vocab) - {PAD}


def unknown_words(prompt: str, vocabulary: frozenset[str]) -> list[str]:
    """Words of `prompt` the vocabulary does not know (sorted, unique): the encoder drops them."""
    return sorted({w for w in split_words(prompt) if w not in vocabulary})
