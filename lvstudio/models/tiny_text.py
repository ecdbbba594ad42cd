"""The tiny preset's text encoder: a word-level transformer over the procedural world's caption vocabulary.

It plays the role umT5 plays for Wan: prompt -> features [B, text_len, text_dim], with positions past the prompt
zeroed (Wan zero-pads T5 features and lets cross-attention see the padding). An empty prompt gives all-zero features,
which is the unconditional branch for classifier-free guidance. Words outside the vocabulary are dropped and reported
so the caller can warn ("the tiny preset does not know: ...").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lvstudio.models.tiny_vocab import PAD, split_words


@dataclass(frozen=True)
class TinyTextConfig:
    vocab: tuple[str, ...]  # index 0 is PAD
    dim: int = 128
    num_layers: int = 2
    num_heads: int = 4
    text_len: int = 24

    @classmethod
    def for_words(cls, words: list[str], **kw: int) -> TinyTextConfig:
        return cls(vocab=(PAD, *sorted(set(words) - {PAD})), **kw)


class TinyTextEncoder(nn.Module):
    def __init__(self, cfg: TinyTextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.index = {w: i for i, w in enumerate(cfg.vocab)}
        self.embed = nn.Embedding(len(cfg.vocab), cfg.dim, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(cfg.text_len, cfg.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            cfg.dim, cfg.num_heads, 4 * cfg.dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, cfg.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.dim)

    def tokenize(self, prompts: list[str]) -> tuple[Tensor, list[list[str]]]:
        """prompts -> token ids [B, text_len] (0 = pad) and, per prompt, the words not in the vocabulary."""
        ids = torch.zeros(len(prompts), self.cfg.text_len, dtype=torch.long)
        unknown: list[list[str]] = []
        for row, prompt in enumerate(prompts):
            words = split_words(prompt)
            known = [self.index[w] for w in words if w in self.index][: self.cfg.text_len]
            unknown.append(sorted({w for w in words if w not in self.index}))
            ids[row, : len(known)] = torch.tensor(known, dtype=torch.long)
        return ids, unknown

    def forward(self, ids: Tensor) -> Tensor:
        """ids [B, text_len] -> features [B, text_len, dim], zero at padding positions."""
        pad = ids == 0  # [B, L]
        h = self.embed(ids) + self.pos[: ids.shape[1]]
        all_pad = pad.all(dim=1)
        # A fully padded row (empty prompt) would give NaNs in attention: let it attend to position 0, then zero it.
        key_mask = pad.clone()
        key_mask[all_pad, 0] = False
        h = self.norm(self.layers(h, src_key_padding_mask=key_mask))
        return h.masked_fill(pad[..., None], 0.0)

    def encode(self, prompts: list[str]) -> tuple[Tensor, list[list[str]]]:
        """Convenience: tokenize + forward. Returns features and the unknown words per prompt."""
        ids, unknown = self.tokenize(prompts)
        return self.forward(ids.to(self.pos.device)), unknown


def config_to_json(cfg: TinyTextConfig) -> str:
    return json.dumps(asdict(cfg))


def config_from_json(text: str) -> TinyTextConfig:
    data = json.loads(text)
    data["vocab"] = tuple(data["vocab"])
    return TinyTextConfig(**data)


def save_text_encoder(model: TinyTextEncoder, path: str | Path) -> None:
    """Weights and config (metadata), atomically, with a checksum (`lvstudio.checked_files`)."""
    from lvstudio.checked_files import save_checked

    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_checked(sd, path, {"config": config_to_json(model.cfg), "format": "pt"})


def load_text_encoder(path: str | Path) -> TinyTextEncoder:
    """A `save_text_encoder` file (or an export's text.safetensors), its checksum verified when it has one."""
    from lvstudio.models.weight_storage import read_weights

    tensors, meta = read_weights(path)
    if "config" not in meta:
        raise ValueError(f"{path}: no text-encoder config in the safetensors metadata")
    model = TinyTextEncoder(config_from_json(meta["config"]))
    model.load_state_dict(tensors)
    return model.train(False)
