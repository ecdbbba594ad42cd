"""A 14B DiT on one GPU, checked on CPU: sizes, the placement decision (faked memory figures), block streaming
equals the plain forward, the low-memory bf16 loader, and the minutes-per-clip estimate."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lvstudio.errors import PresetError
from lvstudio.models.key_maps import official_to_diffusers
from lvstudio.models.offload import (
    BlockStreamer,
    DiTFootprint,
    StepClock,
    activation_bytes,
    cast_dit,
    dit_footprint,
    estimate_clip_time,
    load_dit_lowmem,
    place_dit,
    plan_memory,
)
from lvstudio.models.wan_dit import CONFIGS, WanDiT, WanDiTConfig
from lvstudio.models.wan_i2v import I2VSampling, sample_i2v

GB = 10**9


# -- sizes ------------------------------------------------------------------------------------------------------


def test_footprint_of_wan_i2v_14b_in_bf16() -> None:
    fp = dit_footprint(CONFIGS["wan2.1-i2v-14b"])  # built on the meta device
    assert fp.num_blocks == 40
    assert 32.7 * GB < fp.total_bytes < 32.9 * GB  # the published bf16 single file is 32.8 GB
    assert 0.80 * GB < fp.block_bytes < 0.82 * GB
    assert fp.nonblock_bytes == fp.total_bytes - 40 * fp.block_bytes
    act = activation_bytes(CONFIGS["wan2.1-i2v-14b"], (21, 60, 104), batch=2)  # 81 frames, 480x832, CFG rows
    assert 12.8 * GB < act < 14 * GB  # one such call peaked at 12.8 GB on an H200 (benchmarks/svi_speed.py)


# -- the decision -----------------------------------------------------------------------------------------------

DIT = DiTFootprint(total_bytes=40 * GB, block_bytes=1 * GB, nonblock_bytes=4 * GB, num_blocks=36)
ACT = 10 * GB
ENC = {"umt5": 11 * GB, "clip": 1 * GB, "vae": 3 * GB}


def _plan(free_gb: float | None):
    return plan_memory(None if free_gb is None else int(free_gb * GB), DIT, ACT, ENC, reserve=2 * GB)


def test_plan_everything_resident() -> None:
    plan = _plan(80)  # 40 + 10 + 2 + 15 = 67 GB needed
    assert (plan.mode, plan.resident_blocks, plan.streamed_blocks) == ("resident", 36, 0)
    assert plan.encoders == {"umt5": "gpu", "clip": "gpu", "vae": "gpu"}
    assert "all weights on cuda" in plan.message


def test_plan_dit_resident_encoders_offloaded() -> None:
    # 18 GB beside the DiT: CLIP and VAE stay (4 GB + 11 GB visiting <= 18), umT5 visits while it runs.
    assert _plan(60).encoders == {"clip": "gpu", "vae": "gpu", "umt5": "swap"}
    assert _plan(60).mode == "resident"
    # 10 GB beside the DiT: only the activations fit; CLIP and VAE visit, umT5 (11 GB) runs on the CPU.
    plan = _plan(52)
    assert plan.mode == "resident" and plan.encoders == {"clip": "swap", "vae": "swap", "umt5": "cpu"}
    assert "umt5 on the CPU" in plan.message


def test_plan_streams_blocks_that_do_not_fit() -> None:
    # base = 4 (non-block) + 2 (two block buffers) + 2 (reserve); the largest visitor (umT5, 11 GB) or the
    # activations (10 GB) need room too: 24 - 8 - 11 = 5 blocks stay.
    plan = _plan(24)
    assert (plan.mode, plan.resident_blocks, plan.streamed_blocks) == ("stream", 5, 31)
    assert plan.encoders == {"umt5": "swap", "clip": "swap", "vae": "swap"}
    assert "5 of 36 blocks stay on the GPU, 31 (31.0 GB) are copied" in plan.message
    # 18.5 GB: no room for umT5 beside the stream buffers -> encoders on the CPU, 0 blocks resident.
    plan = _plan(18.5)
    assert (plan.mode, plan.resident_blocks) == ("stream", 0)
    assert set(plan.encoders.values()) == {"cpu"}


def test_plan_refuses_too_little_memory_and_runs_on_cpu_without_gpu() -> None:
    with pytest.raises(PresetError, match=r"17\.0 GB free .* at least 18\.0 GB") as err:
        _plan(17)
    assert "smaller resolution" in str(err.value)
    plan = _plan(None)
    assert plan.mode == "cpu" and set(plan.encoders.values()) == {"cpu"} and "no CUDA GPU" in plan.message


def test_real_14b_on_a_24gb_gpu_streams() -> None:
    cfg = CONFIGS["wan2.1-i2v-14b"]
    plan = plan_memory(22 * GB, dit_footprint(cfg), activation_bytes(cfg, (21, 60, 104)),
                       {"umt5": int(11.4 * GB), "clip": int(1.3 * GB), "vae": 2 * GB})
    assert plan.mode == "stream" and 0 <= plan.resident_blocks < 40
    assert plan_memory(141 * GB, dit_footprint(cfg), activation_bytes(cfg, (21, 60, 104))).mode == "resident"


# -- block streaming --------------------------------------------------------------------------------------------


def _dit(model_type: str = "i2v", layers: int = 4, seed: int = 0) -> WanDiT:
    torch.manual_seed(seed)
    cfg = WanDiTConfig(model_type=model_type, dim=24, ffn_dim=32, num_heads=2, num_layers=layers,
                       in_dim=36 if model_type == "i2v" else 16, out_dim=16, freq_dim=32, text_dim=16, image_dim=8)
    dit = WanDiT(cfg).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in dit.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return dit


def _inputs(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 3, 4, 4, generator=g), torch.rand(1, 3, generator=g) * 1000,
            torch.randn(1, 6, 16, generator=g), torch.randn(1, 5, 8, generator=g),
            torch.randn(1, 20, 3, 4, 4, generator=g))


@pytest.mark.parametrize(("resident", "prefetch"), [(1, 1), (0, 0), (2, 2), (4, 1)])
def test_streamed_forward_equals_plain_forward(resident: int, prefetch: int) -> None:
    dit = _dit()
    x, t, ctx, clip, y = _inputs()
    with torch.no_grad():
        plain = dit(x, t, dit.new_conditioning(ctx, clip, y))
    streamer = BlockStreamer(dit, "cpu", resident, prefetch=prefetch)
    hosts = {i: [p.data_ptr() for p in dit.blocks[i].parameters()] for i in streamer.streamed}
    seen: dict[int, bool] = {}
    for i in streamer.streamed:  # runs after the streamer's own pre-hook: the block must hold its copy by now
        dit.blocks[i].register_forward_pre_hook(
            lambda m, a, i=i: seen.__setitem__(i, all(p.data_ptr() not in hosts[i] for p in m.parameters())))
    with torch.no_grad():
        for _ in range(2):  # twice: the second call reuses the wrap-around prefetch
            out = dit(x, t, dit.new_conditioning(ctx, clip, y))
            assert torch.equal(out, plain)
    assert all(seen.values()) and set(seen) == set(streamer.streamed)
    for i in streamer.streamed:  # between calls the streamed blocks point at their CPU storage again
        assert [p.data_ptr() for p in dit.blocks[i].parameters()] == hosts[i]
    assert streamer.peak_live <= (1 + prefetch if streamer.streamed else 0)
    if streamer.streamed:
        assert streamer.fetches >= 2 * 2 * len(streamer.streamed) - prefetch  # K/V pass + block pass, per call
    streamer.detach()
    with torch.no_grad():
        assert torch.equal(dit(x, t, dit.new_conditioning(ctx, clip, y)), plain)


def test_streamed_sampling_equals_plain_and_refuses_autograd() -> None:
    dit = _dit(layers=3)
    x, _, ctx, clip, y = _inputs()
    sampling = I2VSampling(steps=2, guidance=4.0)
    with torch.no_grad():
        plain = sample_i2v(copy.deepcopy(dit), x, ctx, clip, y, sampling, negative_text=ctx.flip(1))
        BlockStreamer(dit, "cpu", resident_blocks=1)
        streamed = sample_i2v(dit, x, ctx, clip, y, sampling, negative_text=ctx.flip(1))
    assert torch.equal(streamed, plain)
    with pytest.raises(RuntimeError, match="no_grad"):
        dit(x, torch.zeros(1, 3), dit.new_conditioning(ctx, clip, y))


def test_place_dit_follows_the_plan() -> None:
    dit = _dit(layers=6)
    fp = dit_footprint(dit)
    assert place_dit(dit, plan_memory(10**12, fp, 0), "cpu") is None  # resident: moved as a whole
    assert place_dit(dit, plan_memory(None, fp, 0), "cpu") is None
    # room for the non-block weights and 4.5 blocks: 2 block buffers (prefetch 1) + 2 resident blocks
    plan = plan_memory(fp.nonblock_bytes + int(4.5 * fp.block_bytes), fp, 0, reserve=0)
    assert (plan.mode, plan.resident_blocks) == ("stream", 2)
    streamer = place_dit(dit, plan, "cpu")
    assert isinstance(streamer, BlockStreamer) and streamer.streamed == [2, 3, 4, 5]


# -- loading in bf16 --------------------------------------------------------------------------------------------


def test_lowmem_loader_reads_shards_in_bf16(tmp_path: Path) -> None:
    dit = _dit(layers=2)
    sd = official_to_diffusers({k: v.contiguous() for k, v in dit.state_dict().items()})
    keys = sorted(sd)
    half = len(keys) // 2
    save_file({k: sd[k] for k in keys[:half]}, str(tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    save_file({k: sd[k] for k in keys[half:]}, str(tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors"))
    paths = sorted(tmp_path.glob("*.safetensors"))
    loaded = load_dit_lowmem(paths, dit.cfg, torch.bfloat16)
    for name, p in loaded.named_parameters():
        assert p.device.type == "cpu" and p.dtype == (torch.float32 if ".norm3." in name else torch.bfloat16), name
        assert torch.equal(p, dit.state_dict()[name].to(p.dtype)), name
    x, t, ctx, clip, y = _inputs()
    with torch.no_grad():
        out = loaded(x, t, loaded.new_conditioning(ctx, clip, y))
        assert torch.isfinite(out).all()
        casted = cast_dit(copy.deepcopy(dit), torch.bfloat16)  # the same dtypes as the loader
        assert torch.equal(casted(x, t, casted.new_conditioning(ctx, clip, y)), out)
        BlockStreamer(casted, "cpu", resident_blocks=1)  # bf16 weights streamed: same result
        assert torch.equal(casted(x, t, casted.new_conditioning(ctx, clip, y)), out)

    official = tmp_path / "official.safetensors"
    save_file({f"model.{k}": v.contiguous() for k, v in dit.state_dict().items()}, str(official))
    assert torch.equal(load_dit_lowmem([official], dit.cfg, torch.float32).head.head.weight, dit.head.head.weight)
    with pytest.raises(PresetError, match=r"shape mismatches: blocks\.0\.cross_attn\.k\.bias \[24\] \(model \[48\]\)"):
        load_dit_lowmem(paths, WanDiTConfig(**{**dit.cfg.to_dict(), "dim": 48, "patch_size": (1, 2, 2)}))
    with pytest.raises(PresetError, match="safetensors only"):
        load_dit_lowmem([tmp_path / "model.pt"], dit.cfg)


# -- minutes per clip -------------------------------------------------------------------------------------------


def test_minutes_per_clip_from_the_first_step() -> None:
    times = iter([100.0, 112.5, 122.5])
    reports = []
    clock = StepClock(steps=50, overhead_seconds=30.0, on_estimate=reports.append, clock=lambda: next(times))
    clock(0, 999.0, torch.zeros(1))
    assert len(reports) == 1 and reports[0].step_seconds == 12.5
    est = reports[0]
    assert est.seconds == 50 * 12.5 + 30 and round(est.minutes, 2) == 10.92
    text = est.message(frames_per_clip=81, fps=16, clips=10)
    assert text.startswith("≈ 10.9 min per 81-frame clip (50 steps × 12.5 s + 30 s encode/decode)")
    assert "10 clips ≈ 1 h 49 min" in text
    clock(1, 980.0, torch.zeros(1))
    assert len(reports) == 1 and clock.estimate().step_seconds == 10.0  # later steps refine, report once
    with pytest.raises(ValueError):
        estimate_clip_time(0.0, 50)


def test_swap_on_call_visits_the_device_only_while_it_runs() -> None:
    from lvstudio.models.offload import SwapOnCall

    class Moves(torch.nn.Linear):
        def __init__(self) -> None:
            super().__init__(2, 2)
            self.seen: list[str] = []

        def to(self, device):  # noqa: ANN001 - records where the model is sent
            self.seen.append(str(device))
            return self

    class Encoder:
        def __init__(self, module: Moves) -> None:
            self.module, self.dim = module, 7

        def encode(self, x: torch.Tensor) -> list[str]:
            return list(self.module.seen)

    module = Moves()
    swapped = SwapOnCall(Encoder(module), module, torch.device("cpu"), ("encode",))
    assert module.seen == ["cpu"] and swapped.dim == 7  # parked on the CPU; other attributes pass through
    assert swapped.encode(torch.zeros(1)) == ["cpu", "cpu"]  # inside the call: sent to the device
    assert module.seen == ["cpu", "cpu", "cpu"]  # and back afterwards
