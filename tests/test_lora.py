"""LoRA adapters for the WanDiT: targets, save/load round trip, merged == unmerged, clear errors."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lvstudio.models.lora import (
    LORA_TARGETS,
    LoraError,
    add_lora,
    apply_lora,
    load_lora,
    lora_state_dict,
    save_lora,
    target_names,
)
from lvstudio.models.wan_dit import WanDiT, WanDiTConfig


def _dit(seed: int = 0, dim: int = 32) -> WanDiT:
    torch.manual_seed(seed)
    dit = WanDiT(WanDiTConfig(dim=dim, ffn_dim=64, num_heads=2, num_layers=2, in_dim=4, out_dim=4, freq_dim=32,
                              text_dim=16, text_len=8)).train(False)
    with torch.no_grad():  # the official init zeroes the head
        dit.head.head.weight.normal_(0, 0.05)
    return dit


def _run(dit: torch.nn.Module, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 4, 4, 4, generator=g)
    t = torch.rand(2, 4, generator=g) * 1000
    ctx = torch.randn(2, 8, 16, generator=g)
    with torch.no_grad():
        return dit(x, t, dit.new_conditioning(ctx), attention=None, start_frame=0)


def _randomise_b(dit: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def test_targets_are_svi_block_linears() -> None:
    names = target_names(_dit(), LORA_TARGETS)
    per_block = [n.removeprefix("blocks.0.") for n in names if n.startswith("blocks.0.")]
    assert per_block == ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                         "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]
    assert len(names) == 20 and all(n.startswith("blocks.") for n in names)
    assert target_names(_dit(), "ffn.0") == ["blocks.0.ffn.0", "blocks.1.ffn.0"]
    with pytest.raises(LoraError, match="match no linear layer"):
        target_names(_dit(), "qq,zz")


def test_fresh_adapters_are_identity_and_only_lora_trains() -> None:
    base = _dit()
    ref = _run(base)
    dit = add_lora(copy.deepcopy(base), rank=4, alpha=4.0)
    assert torch.equal(_run(dit), ref)  # B starts at zero
    trainable = [n for n, p in dit.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    sd = lora_state_dict(dit)
    assert len(sd) == 40
    assert sd["blocks.0.self_attn.q.lora_A.weight"].shape == (4, 32)
    assert sd["blocks.1.ffn.0.lora_B.weight"].shape == (64, 4)
    assert sd["blocks.0.self_attn.q.lora_A.weight"].abs().sum() > 0  # A: kaiming, not zero


def test_save_load_round_trip_and_merge_equals_unmerged(tmp_path: Path) -> None:
    base = _dit()
    dit = add_lora(copy.deepcopy(base), rank=4, alpha=8.0)
    _randomise_b(dit)
    want = _run(dit)
    assert not torch.allclose(want, _run(base))
    path = save_lora(tmp_path / "l.safetensors", lora_state_dict(dit), 4, 8.0, base={"dit_sha256": "abc"})
    state, meta = load_lora(path)
    assert meta == {"rank": 4, "alpha": 8.0, "targets": LORA_TARGETS, "base": {"dit_sha256": "abc"}}
    assert all(torch.equal(state[k], v) for k, v in lora_state_dict(dit).items())
    unmerged = apply_lora(copy.deepcopy(base), path, merge=False)
    assert torch.equal(_run(unmerged), want)
    merged = apply_lora(copy.deepcopy(base), path, merge=True)
    assert isinstance(merged, WanDiT) and not any(".lora_" in n for n, _ in merged.named_parameters())
    assert torch.allclose(_run(merged), want, atol=1e-5)
    # a plain state (no file) with an explicit alpha works the same
    assert torch.allclose(_run(apply_lora(copy.deepcopy(base), state, merge=True, alpha=8.0)), want, atol=1e-5)


def test_clear_errors(tmp_path: Path) -> None:
    base = _dit()
    dit = add_lora(copy.deepcopy(base), rank=4, alpha=4.0)
    state = lora_state_dict(dit)
    with pytest.raises(LoraError, match="does not exist"):
        load_lora(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file at all")
    with pytest.raises(LoraError, match="not a safetensors"):
        load_lora(bad)
    renamed = {k.replace("self_attn.q", "self_attn.qq"): v for k, v in state.items()}
    with pytest.raises(LoraError, match=r"blocks\.0\.self_attn\.qq\.lora_A\.weight.*matches no module"):
        apply_lora(copy.deepcopy(base), renamed, merge=True)
    not_linear = {k.replace("ffn.2", "norm3"): v for k, v in state.items()}
    with pytest.raises(LoraError, match="is not a linear layer"):
        apply_lora(copy.deepcopy(base), not_linear, merge=False)
    wider = _dit(dim=48)
    with pytest.raises(LoraError, match=r"blocks\.0\.cross_attn\.k\.lora_A\.weight' has shape \[4, 32\], the DiT "
                                        r"expects \[4, 48\]"):
        apply_lora(wider, state, merge=True)
    path = save_lora(tmp_path / "ok.safetensors", state, 4, 4.0)
    with pytest.raises(ValueError, match="rank 4, not 8"):
        save_lora(tmp_path / "x.safetensors", state, 8, 8.0)
    assert load_lora(path)[1]["rank"] == 4
