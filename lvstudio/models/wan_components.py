"""Real Wan2.1 components behind the bundle's small adapters: the umT5 text encoder, the Wan VAE with a streaming
decoder that keeps its causal-conv cache across blocks, LoRA merging through peft, and device/dtype choices.

Text (`UMT5Text`): prompts, cleaned as Wan cleans them (`clean_prompt`), -> umT5 encoder features [B, text_len,
d_model] (4096 for umT5-XXL, text_len 512), zero beyond each prompt's tokens, exactly like Wan (`context =
[u[:len] for u in ...]`, then zero-padded).

VAE (`WanVAE`): works on *normalised* latents z = (mu - mean) / std with Wan's 16 per-channel mean/std (read from the
VAE config), like the tiny VAE. `streaming_decoder()` decodes block by block: diffusers' `AutoencoderKLWan` decodes
one latent frame at a time through its decoder with a per-conv feature cache (reference mechanisms §2.3); the
streaming decoder keeps that cache between calls instead of clearing it, so the concatenated output equals a full
decode (first block of n latents -> 1 + 4(n-1) frames, later blocks 4n). `new_shot()` (a cut) restarts it from zero
history while keeping 4 frames per latent: every conv cache is empty (zero padding) and the temporal upsamplers are
primed with diffusers' "Rep" marker, which makes them double frames from a zero history.
"""

from __future__ import annotations

import functools
import html
import json
import math
import re
import struct
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lvstudio.errors import PresetError

OffloadMode = Literal["never", "cpu", "swap"]
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# ---------------------------------------------------------------------------------------------------------------
# Device and dtype
# ---------------------------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`auto` -> cuda if available (else mps, else cpu); anything else as given, checked to exist."""
    name = "cpu" if device is None else str(device)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):  # meta, xla, ... cannot run a model here
        raise PresetError(f"unknown device {name!r}", hint="use cpu, cuda, cuda:N, mps or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PresetError(f"device {name!r} requested but no CUDA GPU is available",
                          hint="use --device cpu (slow for Hub presets) or run on a machine with a GPU")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise PresetError(f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA GPU(s)",
                          hint=f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    mps = getattr(torch.backends, "mps", None)
    if dev.type == "mps" and not (mps is not None and mps.is_available()):
        raise PresetError(f"device {name!r} requested but this machine has no Apple GPU (MPS)",
                          hint="use --device cpu, or auto to take the best device there is")
    return dev


def cpu_computes_bfloat16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AVX512-BF16 or AMX): without it torch emulates bfloat16 matmuls,
    several times slower than float32 (a 5.5x slower render of the tiny preset on an AVX2 EPYC)."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in checks)


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 on CUDA (float16 where bf16 is unsupported), float32 on CPU/MPS. `bfloat16-if-native`:
    bfloat16 where the device computes it (CUDA with bf16, a CPU with AVX512-BF16/AMX), float32 elsewhere.
    Else the named dtype."""
    if requested == "bfloat16-if-native":
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else \
            device.type == "cpu" and cpu_computes_bfloat16()
        return torch.bfloat16 if native else torch.float32
    if requested != "auto":
        if requested not in _DTYPES:
            raise PresetError(f"unknown dtype {requested!r}",
                              hint=f"use one of: auto, bfloat16-if-native, {', '.join(_DTYPES)}")
        return _DTYPES[requested]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def choose_text_offload(mode: str, device: torch.device, text_bytes: int, other_bytes: int,
                        free_bytes: int | None, reserve: int = 8 << 30) -> OffloadMode:
    """Where the text encoder lives: on the device ("never" offloaded), on the CPU ("cpu"), or moved in per call.

    auto: keep it on the GPU when the text encoder, the other models and `reserve` bytes (KV cache, activations,
    VAE decode at 480p) fit in free memory; else swap it in per prompt if it fits alone; else run it on the CPU.
    """
    if mode in ("never", "cpu", "swap"):
        return "never" if device.type == "cpu" else mode  # type: ignore[return-value]
    if mode != "auto":
        raise PresetError(f"text_offload must be auto, never, cpu or swap (got {mode!r})")
    if device.type != "cuda" or free_bytes is None:
        return "never"
    if text_bytes + other_bytes + reserve <= free_bytes:
        return "never"
    if text_bytes + (2 << 30) <= free_bytes - other_bytes:
        return "swap"
    return "cpu"


_SAFETENSORS_FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def loaded_bytes(folder: Path, dtype: torch.dtype, keep_fp32: tuple[str, ...] = ()) -> int:
    """Memory the safetensors weights under `folder` take once loaded in `dtype`, read from the file headers only.

    Floating-point tensors count at `dtype`'s size (those inside a module named in `keep_fp32` at 4 bytes:
    transformers keeps `_keep_in_fp32_modules` in float32 for float16 loads); other tensors as stored.
    """
    size = torch.empty((), dtype=dtype).element_size()
    total = 0
    for path in sorted(Path(folder).rglob("*.safetensors")):
        try:
            with open(path, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > 100 << 20:
                    raise ValueError(f"header of {n} bytes")
                header = json.loads(fh.read(n))
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] in _SAFETENSORS_FLOATS:
                    keep = any(part in keep_fp32 for part in name.split("."))
                    total += math.prod(info["shape"]) * (4 if keep else size)
                else:
                    start, end = info["data_offsets"]
                    total += end - start
        except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
            raise PresetError(f"cannot read the safetensors header of {path}: {err}",
                              hint="pull the preset again (`lvstudio presets pull NAME --force`)") from None
    return total


def text_offload_for(text_dir: Path, *, mode: str, device: torch.device, dtype: torch.dtype, other_bytes: int,
                     keep_fp32: tuple[str, ...] = ()) -> OffloadMode:
    """Where umT5 from `text_dir`, loaded in `dtype`, should live (see `choose_text_offload`), judged now.

    other_bytes: the other models (DiT, VAE). Those already on the GPU are part of `memory_allocated` and so already
    missing from the free memory; only the rest is counted against it.
    """
    free = None
    pending = other_bytes
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        pending = max(0, other_bytes - torch.cuda.memory_allocated(device))
    return choose_text_offload(mode, device, loaded_bytes(text_dir, dtype, keep_fp32), pending, free)


# ---------------------------------------------------------------------------------------------------------------
# Text encoder
# ---------------------------------------------------------------------------------------------------------------


@functools.cache
def _fix_text() -> Callable[[str], str] | None:
    """ftfy.fix_text, or None (with one warning) when ftfy is not installed."""
    try:
        import ftfy
    except ImportError:
        warnings.warn("ftfy is not installed: prompts are cleaned without ftfy.fix_text (mojibake such as 'cafÃ©' "
                      "stays as typed); install it with pip install 'lvstudio[wan]'", stacklevel=3)
        return None
    return ftfy.fix_text


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning before umT5 (`prompt_clean` = `whitespace_clean(basic_clean(text))`).

    ftfy.fix_text (mojibake, odd quotes; skipped with a warning without ftfy), HTML entities unescaped twice
    ('&amp;amp;' -> '&'), then every run of whitespace (tabs, newlines, no-break and ideographic spaces) becomes one
    space, trimmed.
    """
    fix = _fix_text()
    if fix is not None:
        text = fix(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class UMT5Text:
    """umT5 encoder + tokenizer (diffusers repo layout) with Wan's zero padding; the bundle's text adapter."""

    def __init__(self, model: Any, tokenizer: Any, text_len: int, device: torch.device, offload: OffloadMode) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.device = device  # where features are returned (the DiT's device)
        self.offload = offload
        self.dim = int(model.config.d_model)

    @property
    def compute_device(self) -> torch.device:
        return torch.device("cpu") if self.offload == "cpu" else self.device

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> Tensor:
        """prompts -> features [B, text_len, d_model] (float32, on the bundle device), zero past each prompt."""
        cleaned = [clean_prompt(p) for p in prompts]
        tok = self.tokenizer(cleaned, max_length=self.text_len, padding="max_length", truncation=True,
                             add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        dev = self.compute_device
        if self.offload == "swap":
            self.model.to(dev)
        try:
            ids, mask = tok["input_ids"].to(dev), tok["attention_mask"].to(dev)
            hidden = self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, L, d_model]
            feats = hidden.float() * mask[..., None].float()  # Wan: keep the real tokens, zeros after
        finally:
            if self.offload == "swap":
                self.model.to("cpu")
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        return feats.to(self.device)

    def unknown_words(self, prompt: str) -> list[str]:
        """umT5's sentencepiece vocabulary covers any text."""
        return []


def load_umt5(text_dir: Path, tokenizer_dir: Path, *, text_len: int, device: torch.device, dtype: torch.dtype,
              offload: str = "auto", other_bytes: int = 0) -> UMT5Text:
    """Load `UMT5EncoderModel` (safetensors only) and its tokenizer from diffusers-layout folders, no network."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    if not (Path(tokenizer_dir) / "tokenizer.json").is_file():
        raise PresetError(f"{tokenizer_dir} has no tokenizer.json",
                          hint="lvstudio loads the fast tokenizer from tokenizer.json (JSON only, never sentencepiece "
                               "or code); pull the preset again")
    # Sized as loaded (bf16 on a GPU: 11.4 GB for umT5-XXL), not as downloaded (fp32: 22.7 GB).
    keep = tuple(getattr(UMT5EncoderModel, "_keep_in_fp32_modules", None) or ()) if dtype == torch.float16 else ()
    mode = text_offload_for(text_dir, mode=offload, device=device, dtype=dtype, other_bytes=other_bytes,
                            keep_fp32=keep)
    try:
        model = UMT5EncoderModel.from_pretrained(str(text_dir), dtype=dtype, local_files_only=True,
                                                 use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except (OSError, ValueError) as err:
        raise PresetError(f"cannot load the umT5 text encoder from {text_dir}: {str(err).splitlines()[0]}",
                          hint="pull the preset again (`lvstudio presets pull NAME --force`)") from None
    model.train(False).requires_grad_(False)
    model.to("cpu" if mode in ("cpu", "swap") else device)
    return UMT5Text(model, tokenizer, text_len, device, mode)


# ---------------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------------


def _stat(values: Any, like: Tensor) -> Tensor:  # list[z] -> [1, z, 1, 1, 1] float32
    return torch.tensor(list(values), dtype=torch.float32, device=like.device).view(1, -1, 1, 1, 1)


class WanVAE:
    """diffusers `AutoencoderKLWan` on normalised latents; the bundle's VAE adapter."""

    def __init__(self, model: Any, device: torch.device, dtype: torch.dtype) -> None:
        self.model = model
        self.device = device
        self.dtype = dtype
        cfg = model.config
        self.z_dim = int(cfg.z_dim)
        probe = torch.empty(0, device=device)
        self.mean = _stat(cfg.latents_mean, probe)
        self.std = _stat(cfg.latents_std, probe)
        if self.mean.shape[1] != self.z_dim or self.std.shape[1] != self.z_dim:
            raise PresetError(f"VAE config has {self.mean.shape[1]} latents_mean values for z_dim {self.z_dim}")

    def _check_latents(self, z: Tensor) -> None:
        if z.ndim != 5 or z.shape[1] != self.z_dim:
            raise ValueError(f"latents must be [B, {self.z_dim}, f, h, w], got {tuple(z.shape)}")

    def raw(self, z: Tensor) -> Tensor:
        """Normalised -> raw latents (VAE dtype, VAE device)."""
        return (z.to(self.device, torch.float32) * self.std + self.mean).to(self.dtype)

    @torch.no_grad()
    def encode(self, video: Tensor) -> Tensor:
        """[B, 3, F, H, W] in [-1, 1], F = 1+4k -> normalised latents [B, z, 1+k, H/8, W/8] (posterior mean)."""
        if video.ndim != 5 or video.shape[1] != 3 or (video.shape[2] - 1) % 4:
            raise ValueError(f"video must be [B, 3, 1+4k, H, W], got {tuple(video.shape)}")
        mu = self.model.encode(video.to(self.device, self.dtype)).latent_dist.mode()
        return (mu.float() - self.mean) / self.std

    @torch.no_grad()
    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents [B, z, f, h, w] -> video [B, 3, 1+4(f-1), 8h, 8w] in [-1, 1] (float32)."""
        self._check_latents(z)
        return self.model.decode(self.raw(z)).sample.float()

    def streaming_decoder(self) -> WanStreamingDecoder:
        return WanStreamingDecoder(self)


class WanStreamingDecoder:
    """Decode a video block by block with a persistent causal-conv cache; equals `WanVAE.decode` of everything."""

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        decoder = vae.model.decoder
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        self._slots = sum(isinstance(m, WanCausalConv3d) for m in decoder.modules())
        self._cache: list[Any] = [None] * self._slots
        self._frames = 0  # latent frames decoded so far in this video (0: the next call starts the video)
        self._rep_slots: list[int] | None = None  # cache slots of the temporal upsamplers, found on first need

    def reset(self) -> None:
        """Forget the video: the next call starts a new one."""
        self._cache = [None] * self._slots
        self._frames = 0

    def new_shot(self) -> None:
        """A hard cut: forget the previous shot's frames (zero history) but keep decoding 4 frames per latent.

        Every causal conv starts from zero padding, as at the start of a video; the temporal upsamplers get the
        "Rep" marker that diffusers leaves after a video's first latent, so they run their time conv (zero history)
        and double frames instead of passing the first latent through as one frame.
        """
        self._cache = [None] * self._slots
        for i in self._time_up_slots():
            self._cache[i] = "Rep"
        self._frames = max(self._frames, 1)  # a restarted shot is never the video's first chunk

    @torch.no_grad()
    def _time_up_slots(self) -> list[int]:
        """The cache slots of the temporal upsamplers: those a fresh decode of one latent marks "Rep" (a 2x2 probe,
        so the slot order is diffusers' own, whatever the decoder's layout)."""
        if self._rep_slots is None:
            vae, model = self.vae, self.vae.model
            probe = torch.zeros(1, vae.z_dim, 1, 2, 2, device=vae.device, dtype=vae.dtype)
            cache: list[Any] = [None] * self._slots
            model.decoder(model.post_quant_conv(probe), feat_cache=cache, feat_idx=[0], first_chunk=True)
            self._rep_slots = [i for i, slot in enumerate(cache) if isinstance(slot, str) and slot == "Rep"]
        return self._rep_slots

    @torch.no_grad()
    def decode(self, z_block: Tensor) -> Tensor:
        """Normalised latents [B, z, n, h, w] -> frames [B, 3, 1+4(n-1) on the first call else 4n, 8h, 8w]."""
        vae = self.vae
        vae._check_latents(z_block)
        model = vae.model
        x = model.post_quant_conv(vae.raw(z_block))  # 1x1x1 conv: no time mixing, safe per block
        outs = []
        for i in range(x.shape[2]):
            # Step i: one latent frame through the decoder, reading and updating the per-conv cache.
            out = model.decoder(x[:, :, i : i + 1], feat_cache=self._cache, feat_idx=[0], first_chunk=self._frames == 0)
            self._frames += 1
            outs.append(out)
        video = torch.cat(outs, dim=2)
        if getattr(model.config, "patch_size", None) is not None:  # Wan2.2-style patchified VAEs
            from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

            video = unpatchify(video, patch_size=model.config.patch_size)
        return video.clamp(-1.0, 1.0).float()

    def state_dict(self) -> dict[str, Tensor]:
        """A copy of the causal caches (tensors only, so a render snapshot can be saved with safetensors)."""
        state: dict[str, Tensor] = {"frames": torch.tensor(self._frames)}
        for i, slot in enumerate(self._cache):
            if isinstance(slot, Tensor):
                state[f"feat.{i}"] = slot.detach().clone(memory_format=torch.contiguous_format)
            elif slot == "Rep":  # diffusers' marker: the first frame skipped this upsampler's time conv
                state[f"rep.{i}"] = torch.tensor(1)
        return state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore caches from `state_dict()` (resume exactly where the snapshot was taken)."""
        cache: list[Any] = [None] * self._slots
        for key, value in state.items():
            if key == "frames":
                continue
            kind, _, idx = key.partition(".")
            if kind not in ("feat", "rep") or not idx.isdigit() or int(idx) >= self._slots:
                raise ValueError(f"unknown cache key {key!r}")
            cache[int(idx)] = "Rep" if kind == "rep" else value.to(self.vae.device, self.vae.dtype).clone()
        self._cache = cache
        self._frames = int(state.get("frames", torch.tensor(0)))


def load_wan_vae(vae_dir: Path, *, device: torch.device, dtype: torch.dtype) -> WanVAE:
    """diffusers `AutoencoderKLWan.from_pretrained(vae_dir)` (local files, safetensors) behind the adapter."""
    from diffusers import AutoencoderKLWan

    try:
        model = AutoencoderKLWan.from_pretrained(str(vae_dir), torch_dtype=dtype, local_files_only=True,
                                                 use_safetensors=True)
    except (OSError, ValueError) as err:
        raise PresetError(f"cannot load the Wan VAE from {vae_dir}: {str(err).splitlines()[0]}",
                          hint="pull the preset again (`lvstudio presets pull NAME --force`)") from None
    model.train(False).requires_grad_(False).to(device)
    return WanVAE(model, device, dtype)


# ---------------------------------------------------------------------------------------------------------------
# DiT weights and LoRA
# ---------------------------------------------------------------------------------------------------------------


def load_dit_weights(paths: list[Path], config: Any) -> Any:
    """Build a WanDiT (no random init: meta device, then empty CPU storage) and load safetensors into it strictly."""
    from safetensors.torch import load_file

    from lvstudio.models.key_maps import WeightsError, load_dit_state_dict
    from lvstudio.models.wan_dit import WanDiT

    with torch.device("meta"):
        dit = WanDiT(config)
    dit = dit.to_empty(device="cpu")
    sd: dict[str, Tensor] = {}
    for p in paths:
        sd.update(load_file(str(p)))
    try:
        load_dit_state_dict(dit, sd, source=", ".join(str(p) for p in paths))
    except WeightsError as err:
        raise PresetError(str(err), hint="the preset's dit_config does not match the checkpoint") from None
    return dit.float().train(False)


@dataclass(frozen=True)
class LoraReport:
    rank: int
    alpha: float
    modules: int  # linears that received an adapter


def merge_lora(dit: torch.nn.Module, lora: Mapping[str, Tensor], *, target_modules: str, rank: int | None = None,
               alpha: float | None = None) -> tuple[torch.nn.Module, LoraReport]:
    """Apply a LoRA (keys `blocks.N.<module>.lora_{A,B}.weight`) through peft and merge it into the base weights."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    ranks = {int(v.shape[0]) for k, v in lora.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise PresetError(f"LoRA has ranks {sorted(ranks)}; expected exactly one")
    r = rank or ranks.pop()
    a = float(alpha if alpha is not None else r)
    cfg = LoraConfig(r=r, lora_alpha=a, lora_dropout=0.0, target_modules=target_modules)
    try:
        model = get_peft_model(dit, cfg)
    except ValueError as err:  # peft: "Target modules ... not found in the base model"
        linears = sorted(n for n, m in dit.named_modules() if isinstance(m, torch.nn.Linear))[:12]
        raise PresetError(f"LoRA target_modules {target_modules!r} match nothing in the DiT ({err})",
                          hint=f"linear layers are named like: {', '.join(linears)}") from None
    result = set_peft_model_state_dict(model, {"base_model.model." + k: v.float() for k, v in lora.items()})
    unexpected = [k for k in result.unexpected_keys if "lora_" in k]
    missing = [k for k in result.missing_keys if "lora_" in k]
    if unexpected or missing:
        shown = ", ".join((unexpected or missing)[:6])
        raise PresetError(f"LoRA does not fit the DiT: {len(unexpected)} unexpected, {len(missing)} missing adapter "
                          f"weights (e.g. {shown})", hint="check lora.target_modules and the preset's dit_config")
    modules = sum(1 for k in lora if ".lora_A." in k)
    merged = model.merge_and_unload()
    return merged, LoraReport(r, a, modules)
