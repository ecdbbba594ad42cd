"""umT5 for the Hub presets: the offload decision is sized as the model loads, prompts are cleaned as Wan does."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from lvstudio.models import wan_components
from lvstudio.models.wan_components import loaded_bytes, text_offload_for

GB = 10**9


def _header_only(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> None:
    """A safetensors file with only its header (enough for sizing; no data behind it)."""
    header, offset = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = 4 * int(torch.tensor(shape).prod()) if dtype == "F32" else 8 * int(torch.tensor(shape).prod())
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)


def test_loaded_bytes_follow_the_load_dtype(tmp_path: Path) -> None:
    _header_only(tmp_path / "a.safetensors", {"encoder.block.0.layer.1.DenseReluDense.wo.weight": ("F32", [10, 20]),
                                              "shared.weight": ("F32", [100, 20])})
    _header_only(tmp_path / "b.safetensors", {"steps": ("I64", [3])})
    assert loaded_bytes(tmp_path, torch.float32) == 4 * 2200 + 24
    assert loaded_bytes(tmp_path, torch.bfloat16) == 2 * 2200 + 24
    assert loaded_bytes(tmp_path, torch.float16, keep_fp32=("wo",)) == 4 * 200 + 2 * 2000 + 24


def test_umt5_stays_on_a_24_gb_gpu(tmp_path: Path, monkeypatch) -> None:
    """Wan2.1's umT5-XXL: 5.68 B parameters, 22.7 GB as downloaded (fp32), 11.4 GB once loaded in bf16."""
    _header_only(tmp_path / "model.safetensors", {"shared.weight": ("F32", [5_680_000_000])})
    cuda = torch.device("cuda")
    other = int(3.3 * GB)  # DiT 1.3B in bf16 + the VAE, already on the GPU
    monkeypatch.setattr(wan_components.torch.cuda, "mem_get_info", lambda device=None: (int(20.5 * GB), 24 * GB))
    monkeypatch.setattr(wan_components.torch.cuda, "memory_allocated", lambda device=None: other)
    kw = {"mode": "auto", "device": cuda, "other_bytes": other}
    assert text_offload_for(tmp_path, dtype=torch.bfloat16, **kw) == "never"
    assert text_offload_for(tmp_path, dtype=torch.float32, **kw) == "cpu"  # what the fp32 sizing decided
    # Models not on the GPU yet still count against the free memory.
    monkeypatch.setattr(wan_components.torch.cuda, "memory_allocated", lambda device=None: 0)
    assert text_offload_for(tmp_path, dtype=torch.bfloat16, **kw) == "swap"


TRICKY = [
    "  a  red\tball\n\n over   the sea  ",  # whitespace runs, tabs, newlines
    "Tom &amp; Jerry &quot;run&quot; &#39;fast&#39;",  # HTML entities
    "&amp;lt;b&amp;gt;bold&amp;lt;/b&amp;gt;",  # escaped twice
    "a\u00a0b\u3000c\u2009d",  # no-break, ideographic and thin spaces
    "一只猫在草地上奔跑 🐈",  # not ASCII: kept as is
    "cafÃ©  au lait",  # mojibake (fixed by ftfy)
    "",
    " \n\t ",
]


def test_prompts_are_cleaned_like_wan(recwarn) -> None:
    from lvstudio.models.wan_components import clean_prompt

    assert clean_prompt(TRICKY[0]) == "a red ball over the sea"
    assert clean_prompt(TRICKY[1]) == "Tom & Jerry \"run\" 'fast'"
    assert clean_prompt(TRICKY[2]) == "<b>bold</b>"
    assert clean_prompt(TRICKY[3]) == "a b c d"
    assert clean_prompt(TRICKY[4]) == TRICKY[4]
    assert clean_prompt(TRICKY[6]) == clean_prompt(TRICKY[7]) == ""
    # The same function as Wan's / diffusers' pipeline (which also uses ftfy only when it is installed).
    wan = __import__("pytest").importorskip("diffusers.pipelines.wan.pipeline_wan")
    assert [clean_prompt(p) for p in TRICKY] == [wan.prompt_clean(p) for p in TRICKY]


def test_ftfy_fixes_mojibake_when_installed() -> None:
    import pytest

    pytest.importorskip("ftfy")
    from lvstudio.models.wan_components import _fix_text, clean_prompt

    _fix_text.cache_clear()
    assert clean_prompt("cafÃ©  au lait") == "café au lait"


def test_without_ftfy_the_rest_still_runs_and_says_so(monkeypatch) -> None:
    import sys

    import pytest

    from lvstudio.models.wan_components import _fix_text, clean_prompt

    monkeypatch.setitem(sys.modules, "ftfy", None)  # import ftfy -> ImportError
    _fix_text.cache_clear()
    try:
        with pytest.warns(UserWarning, match="ftfy is not installed"):
            assert clean_prompt("cafÃ©  &amp; \n tea") == "cafÃ© & tea"
    finally:
        _fix_text.cache_clear()
