"""A 14B DiT on one GPU: where the weights live, streaming them block by block, loading them in bf16, and timing.

Wan2.1-I2V-14B is 16.4 B parameters: 32.8 GB in bf16, plus activations of ~10 GB for an 81-frame 480x832 clip with
both guidance rows (32 760 tokens x 2). Placement is chosen from the free GPU memory (`plan_memory`):

    resident   everything fits: the DiT, its activations and the encoders (umT5, CLIP, VAE) stay on the GPU;
               encoders that do not fit beside the DiT visit the GPU only while they run ("swap": model-level offload)
               or run on the CPU.
    stream     the DiT does not fit: its embeddings, head and the first K blocks stay on the GPU; the other blocks
               live in pinned CPU memory and are copied in one block ahead of use on a side CUDA stream, then
               dropped (`BlockStreamer`). Each step then moves (40 − K) blocks over PCIe (~0.4 GB each), which
               overlaps with the compute of the previous block.
    cpu        no CUDA GPU: everything on the CPU (a 14B clip takes hours; fine for tiny models and tests).

Sizes come from the model itself (`dit_footprint`), not from constants. `load_dit_lowmem` builds the DiT on the
meta device and fills it tensor by tensor in the target dtype, so a 14B checkpoint stored in fp32 never needs
65 GB of host memory. `StepClock` + `estimate_clip_time` turn the measured first step into minutes per clip.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lvstudio.errors import PresetError
from lvstudio.models.wan_dit import WanDiT, WanDiTConfig

PlacementMode = Literal["resident", "stream", "cpu"]
EncoderPlace = Literal["gpu", "swap", "cpu"]
GB = 1e9


def _gb(n: float) -> str:
    return f"{n / GB:.1f} GB"


# ---------------------------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiTFootprint:
    """Weight bytes of a DiT in a given dtype: per transformer block and for everything else."""

    total_bytes: int
    block_bytes: int  # the largest block
    nonblock_bytes: int  # patch/text/time embeddings, img_emb, head: always on the compute device
    num_blocks: int


def dit_footprint(dit: nn.Module | WanDiTConfig, dtype: torch.dtype = torch.bfloat16) -> DiTFootprint:
    """Bytes of the DiT's weights in `dtype`; a config is built on the meta device (no memory used)."""
    if isinstance(dit, WanDiTConfig):
        with torch.device("meta"):
            dit = WanDiT(dit)
    size = torch.empty((), dtype=dtype).element_size()
    blocks = [sum(p.numel() for p in b.parameters()) * size for b in dit.blocks]
    total = sum(p.numel() for p in dit.parameters()) * size
    return DiTFootprint(total, max(blocks), total - sum(blocks), len(blocks))


def activation_bytes(cfg: WanDiTConfig, latent_shape: Sequence[int], batch: int = 2,
                     dtype: torch.dtype = torch.bfloat16) -> int:
    """An estimate of the peak activation memory of one DiT call, a little above what was measured.

    latent_shape (f, h, w); batch = rows per call (2 with batched guidance). Per token: five fp32 copies of the
    residual stream (the stream, its norm, the modulated copy, a gated output, the new stream: 5 x dim x 4),
    q/k/v/attention output in the compute dtype (4 x dim), and the FFN hidden before and after GELU (2 x ffn_dim).
    Flash/SDPA attention needs no L x L matrix. Wan2.1-I2V-14B, 81 frames at 480x832, 2 rows, bf16: 13.0 GB; one
    call peaked at 12.8 GB above the weights and cross-attention K/V on an H200 (benchmarks/svi_speed.py).
    """
    f, h, w = latent_shape
    pt, ph, pw = cfg.patch_size
    tokens = (f // pt) * (h // ph) * (w // pw)
    item = torch.empty((), dtype=dtype).element_size()
    per_token = 5 * cfg.dim * 4 + 4 * cfg.dim * item + 2 * cfg.ffn_dim * item
    return int(batch * tokens * per_token)


def gpu_free_bytes(device: torch.device | str) -> int | None:
    """Free memory of a CUDA device (None for CPU / no CUDA)."""
    dev = torch.device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return None
    return int(torch.cuda.mem_get_info(dev)[0])


# ---------------------------------------------------------------------------------------------------------------
# The placement decision
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    mode: PlacementMode
    resident_blocks: int  # blocks kept on the GPU (all of them when resident)
    num_blocks: int
    encoders: dict[str, EncoderPlace]  # e.g. {"umt5": "swap", "clip": "gpu", "vae": "gpu"}
    message: str  # one line for the user: what was chosen and why

    @property
    def streamed_blocks(self) -> int:
        return self.num_blocks - self.resident_blocks


def _place_encoders(encoders: Mapping[str, int], budget: int, busy: int) -> dict[str, EncoderPlace] | None:
    """Encoders into `budget` bytes while the DiT's `busy` bytes (activations or stream buffers) are not in use:
    kept on the GPU smallest first, else swapped in alone, else on the CPU. None if even `busy` does not fit."""
    if busy > budget:
        return None
    kept = 0
    places: dict[str, EncoderPlace] = {}
    order = sorted(encoders, key=lambda k: encoders[k])
    for name in order:
        size = encoders[name]
        rest = [encoders[n] for n in order if n not in places and n != name]
        if kept + size + max([busy] + rest) <= budget:  # stays, and the rest can still visit
            kept += size
            places[name] = "gpu"
    for name in order:
        if name not in places:
            places[name] = "swap" if kept + encoders[name] <= budget else "cpu"
    return places


def _describe(places: Mapping[str, EncoderPlace]) -> str:
    words = {"gpu": "on the GPU", "swap": "swapped in while it runs", "cpu": "on the CPU"}
    return "; ".join(f"{name} {words[p]}" for name, p in places.items())


def plan_memory(free_bytes: int | None, dit: DiTFootprint, activations: int,
                encoders: Mapping[str, int] | None = None, *, reserve: int = 3 * 1024**3, prefetch: int = 1,
                device: str = "cuda") -> MemoryPlan:
    """Choose where the DiT and the encoders live from `free_bytes` of GPU memory (None: no GPU).

    dit: weight bytes (`dit_footprint`); activations: peak bytes of one DiT call (`activation_bytes`);
    encoders: name -> bytes incl. their own working memory (umT5, CLIP, VAE decode); reserve: headroom for the
    allocator, the cross-attention K/V kept for a clip (14B, both guidance rows: 1.3 GB) and the latents.
    prefetch: blocks copied ahead when streaming (1 + prefetch block buffers). Raises PresetError when even
    streaming cannot fit.
    """
    enc = dict(encoders or {})
    n = dit.num_blocks
    if free_bytes is None:
        return MemoryPlan("cpu", n, n, {k: "cpu" for k in enc},
                          f"no CUDA GPU: the {_gb(dit.total_bytes)} DiT runs on the CPU (very slow for a 14B model)")
    # 1) Everything resident.
    need_all = dit.total_bytes + activations + reserve + sum(enc.values())
    if need_all <= free_bytes:
        return MemoryPlan("resident", n, n, {k: "gpu" for k in enc},
                          f"all weights on {device}: DiT {_gb(dit.total_bytes)} + encoders {_gb(sum(enc.values()))} "
                          f"+ activations {_gb(activations)} fit in {_gb(free_bytes)} free")
    # 2) DiT resident, encoders offloaded (model-level).
    places = _place_encoders(enc, free_bytes - dit.total_bytes - reserve, activations)
    if places is not None:
        return MemoryPlan("resident", n, n, places,
                          f"DiT {_gb(dit.total_bytes)} stays on {device} ({_gb(free_bytes)} free); encoders "
                          f"offloaded: {_describe(places)}")
    # 3) Stream the blocks that do not fit.
    buffers = min(1 + prefetch, n) * dit.block_bytes
    base = dit.nonblock_bytes + buffers + reserve
    largest_swap = max(enc.values(), default=0)
    for swap, busy in ((True, max(activations, largest_swap)), (False, activations)):  # encoders swapped, else CPU
        room = free_bytes - base - busy
        if room >= 0:
            resident = min(n - 1, int(room // dit.block_bytes))
            kept = resident * dit.block_bytes
            budget = free_bytes - dit.nonblock_bytes - kept - reserve
            places = {k: ("swap" if swap and v <= budget else "cpu") for k, v in enc.items()}
            streamed = n - resident
            return MemoryPlan("stream", resident, n, places,
                              f"DiT {_gb(dit.total_bytes)} + activations {_gb(activations)} do not fit in "
                              f"{_gb(free_bytes)} free on {device}: streaming weights block by block — {resident} of "
                              f"{n} blocks stay on the GPU, {streamed} ({_gb(streamed * dit.block_bytes)}) are copied "
                              f"from pinned CPU memory every step" + (f"; {_describe(places)}" if places else ""))
    need = base + activations
    raise PresetError(
        f"not enough GPU memory: {_gb(free_bytes)} free on {device}, streaming the DiT needs at least {_gb(need)} "
        f"(non-block weights {_gb(dit.nonblock_bytes)}, {min(1 + prefetch, n)} block buffers {_gb(buffers)}, "
        f"activations {_gb(activations)}, headroom {_gb(reserve)})",
        hint="use a smaller resolution or fewer frames per clip, close other programs using the GPU, or use a GPU "
             "with more memory",
    )


# ---------------------------------------------------------------------------------------------------------------
# Streaming blocks
# ---------------------------------------------------------------------------------------------------------------


class BlockStreamer:
    """Keeps the first `resident_blocks` blocks and all non-block modules of a WanDiT on `device`; the others stay
    on the CPU (pinned when `device` is CUDA) and are copied in just before use, `prefetch` blocks ahead, on a side
    stream, and dropped right after. Inference only (raises under autograd). The model keeps its normal call API.

    Do not move the DiT with `.to()` while attached; call `detach()` first.
    """

    def __init__(self, dit: WanDiT, device: torch.device | str, resident_blocks: int, *, prefetch: int = 1,
                 pin_memory: bool | None = None) -> None:
        self.dit = dit
        self.device = torch.device(device)
        n = len(dit.blocks)
        if not 0 <= resident_blocks <= n:
            raise ValueError(f"resident_blocks must be in 0..{n} (got {resident_blocks})")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 (got {prefetch})")
        self.resident_blocks = resident_blocks
        self.prefetch = prefetch
        self.streamed = list(range(resident_blocks, n))
        cuda = self.device.type == "cuda"
        self.pin = cuda if pin_memory is None else pin_memory
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._host: dict[int, list[tuple[Tensor, Tensor]]] = {}  # block -> [(parameter/buffer, its CPU storage)]
        self._live: dict[int, tuple[list[Tensor], Any]] = {}  # block -> (device copies, copy-done event)
        self._done: deque[Any] = deque()  # compute-done events of released blocks (CUDA): bounds the run-ahead
        self._hooks: list[Any] = []
        self._wrapped: dict[int, Callable[..., Any]] = {}
        self.fetches = 0  # block copies made (a measure of traffic)
        self.peak_live = 0  # most streamed blocks on the device at once
        self._attach()

    # -- setup --------------------------------------------------------------------------------------------------
    def _attach(self) -> None:
        dit = self.dit
        for name, child in dit.named_children():
            if name != "blocks":
                child.to(self.device)
        for i, block in enumerate(dit.blocks):
            if i < self.resident_blocks:
                block.to(self.device)
                continue
            block.to("cpu")
            tensors = list(block.parameters()) + list(block.buffers())
            pairs = []
            for t in tensors:
                host = t.data.pin_memory() if self.pin else t.data
                t.data = host
                pairs.append((t, host))
            self._host[i] = pairs
            self._hooks.append(block.register_forward_pre_hook(partial(self._before_block, i)))
            self._hooks.append(block.register_forward_hook(partial(self._after_block, i)))
            # The DiT computes every block's cross-attention K/V up front (WanDiT._cross_kv): stream those too.
            original = block.cross_attn.context_kv
            self._wrapped[i] = original
            block.cross_attn.context_kv = partial(self._context_kv, i, original)

    def detach(self) -> None:
        """Remove the hooks; streamed blocks stay on the CPU (their home)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for i in list(self._live):
            self._release(i)
        for i in self._wrapped:
            del self.dit.blocks[i].cross_attn.context_kv  # back to the class method
        self._wrapped.clear()

    # -- traffic ---------------------------------------------------------------------------------------------------
    def _fetch(self, i: int) -> None:
        """Start copying block i to the device (no-op if it is there)."""
        if i in self._live:
            return
        hosts = [host for _, host in self._host[i]]
        if self._copy_stream is not None:
            with torch.cuda.stream(self._copy_stream):
                copies = [h.to(self.device, non_blocking=True) for h in hosts]
                event = torch.cuda.Event()
                event.record(self._copy_stream)
        else:
            copies = [h.to(self.device, copy=True) for h in hosts]
            event = None
        self._live[i] = (copies, event)
        self.fetches += 1
        self.peak_live = max(self.peak_live, len(self._live))

    def _use(self, i: int) -> None:
        """Block i's parameters point at its device copies (after the copy finished, as seen by the compute stream)."""
        if torch.is_grad_enabled():
            raise RuntimeError("block streaming is for inference: run the DiT under torch.no_grad()")
        self._fetch(i)
        copies, event = self._live[i]
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for c in copies:
                c.record_stream(stream)  # the allocator may reuse the memory only after this stream is done
        for (t, _), c in zip(self._host[i], copies, strict=True):
            t.data = c

    def _release(self, i: int) -> None:
        """Block i's parameters point at their CPU storage again; its device copies are freed (once the compute
        stream is done with them). The host thread may queue at most 1 + prefetch blocks ahead of the GPU, so freed
        but still-pending copies cannot pile up in the allocator."""
        for t, host in self._host[i]:
            t.data = host
        self._live.pop(i, None)
        if self._copy_stream is not None:
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            self._done.append(done)
            while len(self._done) > 1 + self.prefetch:
                self._done.popleft().synchronize()

    def _prefetch_after(self, i: int) -> None:
        pos = self.streamed.index(i)
        ahead = self.streamed[pos + 1 : pos + 1 + self.prefetch]
        if len(ahead) < self.prefetch and self.streamed:  # wrap: the next call starts with the first streamed block
            ahead += self.streamed[: self.prefetch - len(ahead)]
        for j in ahead:
            if j != i:
                self._fetch(j)

    def _before_block(self, i: int, module: nn.Module, args: Any) -> None:
        self._use(i)

    def _after_block(self, i: int, module: nn.Module, args: Any, output: Any) -> None:
        self._release(i)
        self._prefetch_after(i)

    def _context_kv(self, i: int, original: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        self._use(i)
        try:
            return original(*args, **kwargs)
        finally:
            self._release(i)
            self._prefetch_after(i)


def place_dit(dit: WanDiT, plan: MemoryPlan, device: torch.device | str, *, prefetch: int = 1) -> BlockStreamer | None:
    """Put the DiT where `plan` says: all on `device` (resident), streamed (returns the streamer), or left on CPU."""
    if plan.mode == "cpu":
        dit.to("cpu")
        return None
    if plan.mode == "resident":
        dit.to(device)
        return None
    return BlockStreamer(dit, device, plan.resident_blocks, prefetch=prefetch)


# ---------------------------------------------------------------------------------------------------------------
# Loading a large DiT in its compute dtype
# ---------------------------------------------------------------------------------------------------------------


FP32_PARAMS = (".norm3.",)  # small affine norms kept at full precision (WanBlock computes norm3 in fp32 anyway)


def keep_fp32_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a DiT parameter is stored in when the model runs in `dtype`: float32 for the affine norm3 (a few
    KB; Wan computes its norms in fp32, and WanBlock casts norm3's weights to fp32 whatever their dtype, so a plain
    `.to(bf16)` runs too), `dtype` for the rest."""
    return torch.float32 if any(tag in name for tag in FP32_PARAMS) else dtype


def cast_dit(dit: WanDiT, dtype: torch.dtype) -> WanDiT:
    """`dit.to(dtype)` that keeps the parameters `keep_fp32_dtype` names in float32 (use this, not `.to(bf16)`)."""
    for name, p in dit.named_parameters():
        p.data = p.data.to(keep_fp32_dtype(name, dtype))
    return dit


def load_dit_lowmem(paths: Sequence[Path], config: WanDiTConfig, dtype: torch.dtype = torch.bfloat16) -> WanDiT:
    """Build a WanDiT on the meta device and fill it from safetensors shards tensor by tensor, converted to `dtype`.

    Peak host memory is the model in `dtype` plus one tensor (a 14B model in bf16: ~33 GB, even from fp32 shards).
    Official or diffusers key names (lvstudio.models.key_maps); every key and shape is checked before any tensor is
    read, and a mismatch raises PresetError naming the keys. The affine cross-attention norms stay float32
    (`keep_fp32_dtype`).
    """
    from safetensors import safe_open

    from lvstudio.models.key_maps import diffusers_to_official_key, looks_like_diffusers, strip_wrappers

    with torch.device("meta"):
        dit = WanDiT(config)
    expected = {k: tuple(v.shape) for k, v in dit.state_dict().items()}
    # Step 1: names and shapes of every stored tensor (no data read).
    index: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for path in paths:
        if Path(path).suffix != ".safetensors":
            raise PresetError(f"{path} is not a .safetensors file", hint="lvstudio reads weights from safetensors only")
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a dict
                index[key] = (Path(path), key, tuple(f.get_slice(key).get_shape()))
    plain_of = {stored: next(iter(strip_wrappers({stored: torch.empty(0)}))) for stored in index}  # drop `model.`...
    if looks_like_diffusers(dict.fromkeys(plain_of.values())):  # type: ignore[arg-type]
        plain_of = {s: diffusers_to_official_key(p) for s, p in plain_of.items()}
    by_name = {p: s for s, p in plain_of.items()}
    missing = sorted(set(expected) - set(by_name))
    unexpected = sorted(set(by_name) - set(expected))
    shapes = sorted(f"{k} {list(index[by_name[k]][2])} (model {list(expected[k])})"
                    for k in set(expected) & set(by_name) if index[by_name[k]][2] != expected[k])
    if missing or unexpected or shapes:
        parts = [f"{label}: {', '.join(items[:8])}" + (f", ... ({len(items) - 8} more)" if len(items) > 8 else "")
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes))
                 if items]
        raise PresetError(f"{', '.join(str(p) for p in paths)} does not fit this DiT config — " + "; ".join(parts),
                          hint="the preset's dit_config does not match the checkpoint")
    # Step 2: read each tensor once, converted to the target dtype, file by file.
    state: dict[str, Tensor] = {}
    for path in dict.fromkeys(p for p, _, _ in index.values()):
        with safe_open(str(path), "pt") as f:
            for name, stored in by_name.items():
                if index[stored][0] == path:
                    state[name] = f.get_tensor(stored).to(keep_fp32_dtype(name, dtype))
    dit.load_state_dict(state, strict=True, assign=True)
    return dit.train(False).requires_grad_(False)


# ---------------------------------------------------------------------------------------------------------------
# Timing: minutes per clip from the first step
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipTimeEstimate:
    step_seconds: float
    steps: int
    overhead_seconds: float  # per clip outside the steps: CLIP + VAE encode, decode, text encoding

    @property
    def seconds(self) -> float:
        return self.steps * self.step_seconds + self.overhead_seconds

    @property
    def minutes(self) -> float:
        return self.seconds / 60.0

    def message(self, frames_per_clip: int = 81, fps: float = 16.0, clips: int | None = None) -> str:
        """e.g. '≈ 9.3 min per 81-frame clip (50 steps × 10.8 s + 45 s encode/decode) — 0.009× real time'."""
        speed = frames_per_clip / fps / self.seconds if self.seconds > 0 else math.inf
        text = (f"≈ {self.minutes:.1f} min per {frames_per_clip}-frame clip ({self.steps} steps × "
                f"{self.step_seconds:.1f} s + {self.overhead_seconds:.0f} s encode/decode) — {speed:.3f}× real time")
        if clips:
            total = clips * self.seconds
            text += f"; {clips} clips ≈ {int(total // 3600)} h {int(total % 3600 // 60)} min"
        return text


def estimate_clip_time(first_step_seconds: float, steps: int, overhead_seconds: float = 0.0) -> ClipTimeEstimate:
    """Minutes per clip from one measured sampling step (every step costs the same: same tokens, same weights).

    The first step also pays one-time costs (cross-attention K/V, kernel selection, the first block copies), so the
    estimate errs high by a few percent; re-estimate from a later step for a tighter number.
    """
    if first_step_seconds <= 0 or steps < 1:
        raise ValueError(f"need a positive step time and steps >= 1 (got {first_step_seconds}, {steps})")
    return ClipTimeEstimate(float(first_step_seconds), int(steps), float(overhead_seconds))


class StepClock:
    """A sampler callback that times each step (synchronising CUDA first) and reports after the first one.

    clock = StepClock(steps=50, overhead_seconds=encode_s, on_estimate=lambda e: print(e.message()))
    sample_i2v(..., callback=clock)
    """

    def __init__(self, steps: int, overhead_seconds: float = 0.0,
                 on_estimate: Callable[[ClipTimeEstimate], None] | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        self.steps = steps
        self.overhead_seconds = overhead_seconds
        self.on_estimate = on_estimate
        self._clock = clock
        self._last = clock()
        self.step_seconds: list[float] = []

    def restart(self) -> None:
        """Call right before sampling when the clock was made earlier."""
        self._last = self._clock()

    def __call__(self, i: int, t: float, x: Tensor) -> None:
        if x.is_cuda:
            torch.cuda.synchronize(x.device)
        now = self._clock()
        self.step_seconds.append(now - self._last)
        self._last = now
        if len(self.step_seconds) == 1 and self.on_estimate is not None:
            self.on_estimate(self.estimate())

    def estimate(self) -> ClipTimeEstimate:
        """From the latest measured step (the first one right after step 0)."""
        if not self.step_seconds:
            raise ValueError("no step measured yet")
        return estimate_clip_time(self.step_seconds[-1], self.steps, self.overhead_seconds)


# ---------------------------------------------------------------------------------------------------------------
# Model-level offload for an encoder
# ---------------------------------------------------------------------------------------------------------------


class SwapOnCall:
    """An encoder adapter (WanVAE, ClipVisionEncoder) whose `module` lives on the CPU and visits `device` only while
    one of `methods` runs ("swap" in a MemoryPlan). Every other attribute is the adapter's own."""

    def __init__(self, inner: Any, module: nn.Module, device: torch.device, methods: Sequence[str]) -> None:
        self._inner, self._module, self._device, self._methods = inner, module, torch.device(device), set(methods)
        module.to("cpu")

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name not in self._methods:
            return attr

        def visiting(*args: Any, **kwargs: Any) -> Any:
            self._module.to(self._device)
            try:
                return attr(*args, **kwargs)
            finally:
                self._module.to("cpu")
                if self._device.type == "cuda":
                    torch.cuda.empty_cache()

        return visiting
