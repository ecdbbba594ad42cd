"""The Wan2.1 diffusion transformer, at any scale, with per-frame timesteps and cached block-causal attention.

Parameter names follow the official Wan2.1 checkpoints (`blocks.0.self_attn.q`, `blocks.0.norm3` = the affine
cross-attention norm, `head.modulation`, ...), so Wan2.1, Self-Forcing, CausVid, LongLive and SkyReels-DF weights load
directly; diffusers-format weights load through `lvstudio.models.key_maps`.

Data flow (shapes for B videos, latent [C, F, H, W], patch (1, 2, 2), L_f = H/2 * W/2 tokens per latent frame):

    x [B, C_in, F, H, W] --patch_embedding--> [B, F*L_f, dim]
    t [B, F] (1000-scale, one value per latent frame) --sinusoid, time_embedding--> e [B, F, dim]
                                                        --time_projection--> e0 [B, F, 6, dim]
    context [B, L_txt, text_dim] --text_embedding--> [B, L_txt, dim]     (+ CLIP tokens via img_emb for i2v)
    blocks: adaLN-modulated self-attn (3D RoPE) -> cross-attn -> FFN, modulation broadcast from frames to tokens
    head: modulated LayerNorm + Linear -> unpatchify -> velocity [B, C_out, F, H, W]

Attention topology is chosen per call: bidirectional, block-causal (dense mask, for training), or KV-cached with a
rolling window and an attention sink (`lvstudio.models.kv_cache`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lvstudio.models.kv_cache import AttentionSpec, CachePlan, CrossAttnCache, KVCache, RopeMode, frame_mask, token_mask
from lvstudio.models.rope import Rope3D, apply_rope
from lvstudio.models.wan_config import CONFIGS as CONFIGS  # re-exported: `from lvstudio.models.wan_dit import CONFIGS`
from lvstudio.models.wan_config import WanDiTConfig

# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------


def sinusoidal_embedding(t: Tensor, dim: int) -> Tensor:
    """Wan's timestep sinusoid: cat(cos(t*w), sin(t*w)), w_i = 10000^(-i/(dim/2)). t [...] -> [..., dim] (fp32)."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[..., None] * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1).float()


class RMSNorm(nn.Module):
    """RMSNorm over the full feature dim (Wan applies it across all heads before the head split)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return y.type_as(x) * self.weight


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """q [B, Lq, H, D], k/v [B, Lk, H, D], mask [Lq, Lk] bool or None -> [B, Lq, H*D]."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2).flatten(2)


@dataclass
class _AttnContext:
    """Everything self-attention needs for one forward call (shared by all layers)."""

    rot: Tensor  # [Lq, 1, head_dim/2] complex RoPE rotation of the new tokens (queries and their keys)
    mask: Tensor | None  # [Lq, Lk] bool or None
    cache: KVCache | None = None
    plan: CachePlan | None = None  # how this call reads / writes the cache


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def forward(self, x: Tensor, ctx: _AttnContext, layer: int) -> Tensor:
        # x [B, L, dim] -> q, k, v [B, L, heads, head_dim]
        q = self.norm_q(self.q(x)).unflatten(2, (self.num_heads, -1))
        k = self.norm_k(self.k(x)).unflatten(2, (self.num_heads, -1))
        v = self.v(x).unflatten(2, (self.num_heads, -1))
        q_r = apply_rope(q, ctx.rot)
        k_r = apply_rope(k, ctx.rot)
        keys, values = k_r, v
        if ctx.cache is not None and ctx.plan is not None:
            # Cached frames (keys stored rotated) + the new ones; the cache writes what stays.
            keys, values = ctx.cache.layer_kv(layer, ctx.plan, k_r, v, k)
        return self.o(_attention(q_r, keys, values, ctx.mask))


class CrossAttention(nn.Module):
    """Text cross-attention; with `with_image=True` also Wan's i2v image branch (k_img / v_img, summed outputs)."""

    def __init__(self, dim: int, num_heads: int, eps: float, with_image: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)
        if with_image:
            self.k_img = nn.Linear(dim, dim)
            self.v_img = nn.Linear(dim, dim)
            self.norm_k_img = RMSNorm(dim, eps)
        self.with_image = with_image

    def context_kv(self, ctx: Tensor, img: Tensor | None) -> tuple[Tensor, ...]:
        """K/V of the conditioning: ctx [B, L_txt, dim] (+ img [B, L_img, dim]) -> tuple of [B, L, heads, hd]."""
        split = (self.num_heads, -1)
        kv: tuple[Tensor, ...] = (self.norm_k(self.k(ctx)).unflatten(2, split), self.v(ctx).unflatten(2, split))
        if self.with_image:
            if img is None:
                raise ValueError("this is an i2v model: pass clip_fea (CLIP image tokens) to forward()")
            kv = kv + (self.norm_k_img(self.k_img(img)).unflatten(2, split), self.v_img(img).unflatten(2, split))
        return kv

    def forward(self, x: Tensor, kv: tuple[Tensor, ...]) -> Tensor:
        q = self.norm_q(self.q(x)).unflatten(2, (self.num_heads, -1))
        out = _attention(q, kv[0], kv[1], None)
        if self.with_image:
            out = out + _attention(q, kv[2], kv[3], None)
        return self.o(out)


class WanBlock(nn.Module):
    """One transformer block. norm1 -> self-attn, norm3 (affine) -> cross-attn, norm2 -> FFN (official naming)."""

    def __init__(self, cfg: WanDiTConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.self_attn = SelfAttention(d, cfg.num_heads, cfg.eps)
        self.norm3 = nn.LayerNorm(d, cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.eps, with_image=cfg.model_type == "i2v")
        self.norm2 = nn.LayerNorm(d, cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(self, x: Tensor, e0: Tensor, ctx_kv: tuple[Tensor, ...], attn: _AttnContext, layer: int) -> Tensor:
        # x [B, F*L_f, dim] (fp32 residual stream); e0 [B, F, 6, dim] (fp32)
        b, n_f = e0.shape[0], e0.shape[1]
        mod = (self.modulation.float().unsqueeze(1) + e0).chunk(6, dim=2)  # 6 x [B, F, 1, dim]
        shift_msa, scale_msa, gate_msa, shift_ffn, scale_ffn, gate_ffn = mod
        dtype = self.self_attn.q.weight.dtype

        def per_frame(h: Tensor) -> Tensor:  # [B, F*L_f, dim] -> [B, F, L_f, dim]
            return h.view(b, n_f, -1, h.shape[-1])

        # Step 1: modulated self-attention, gated residual.
        h = per_frame(self.norm1(x.float())) * (1 + scale_msa) + shift_msa
        y = self.self_attn(h.flatten(1, 2).to(dtype), attn, layer)
        x = x + (per_frame(y.float()) * gate_msa).flatten(1, 2)
        # Step 2: cross-attention on the affine-normed stream (no modulation, no gate). The norm runs in fp32 with fp32
        # weights whatever dtype they are stored in (Wan: fp32 autocast; diffusers: FP32LayerNorm).
        n3 = self.norm3
        normed = F.layer_norm(x.float(), n3.normalized_shape, n3.weight.float(), n3.bias.float(), n3.eps)
        x = x + self.cross_attn(normed.to(dtype), ctx_kv).float()
        # Step 3: modulated FFN, gated residual.
        h = per_frame(self.norm2(x.float())) * (1 + scale_ffn) + shift_ffn
        y = self.ffn(h.flatten(1, 2).to(dtype))
        return x + (per_frame(y.float()) * gate_ffn).flatten(1, 2)


class Head(nn.Module):
    def __init__(self, cfg: WanDiTConfig) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: Tensor, e: Tensor) -> Tensor:
        # x [B, F*L_f, dim]; e [B, F, dim] (the time embedding, not the 6-way projection)
        b, n_f = e.shape[:2]
        shift, scale = (self.modulation.float().unsqueeze(1) + e.float().unsqueeze(2)).chunk(2, dim=2)  # [B,F,1,dim]
        h = self.norm(x.float()).view(b, n_f, -1, x.shape[-1]) * (1 + scale) + shift
        return self.head(h.flatten(1, 2).to(self.head.weight.dtype))


class MLPProj(nn.Module):
    """i2v CLIP-token projection: LayerNorm, Linear, GELU, Linear, LayerNorm (official `img_emb.proj`)."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


def fps_class(fps: float) -> int:
    """SkyReels-V2 sample-info class of a frame rate (`fps_index`): 0 for 16 fps, 1 for anything else."""
    return 0 if fps == 16 else 1


@dataclass
class Conditioning:
    """Embedded conditioning for `WanDiT.forward`, reusable across calls (its cross-attn K/V cache lives here)."""

    context: Tensor  # [B, L_txt, text_dim] text-encoder features
    clip_fea: Tensor | None = None  # [B, 257, image_dim] (i2v)
    y: Tensor | None = None  # [B, 20, F, H, W] mask + image latents (i2v), concatenated to x on channels
    cache: CrossAttnCache | None = None
    fps_index: int | Tensor | None = None  # SkyReels sample info, int or [B] long: 0 = 16 fps, 1 = any other fps


class WanDiT(nn.Module):
    """Wan2.1 DiT with per-frame timesteps and three attention topologies (see module docstring)."""

    def __init__(self, cfg: WanDiTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList([WanBlock(cfg) for _ in range(cfg.num_layers)])
        self.head = Head(cfg)
        if cfg.model_type == "i2v":
            self.img_emb = MLPProj(cfg.image_dim, d)
        if cfg.inject_sample_info:
            # SkyReels-V2: fps class (2 classes) -> [B, 6*dim], added to every frame's modulation e0.
            self.fps_embedding = nn.Embedding(2, d)
            self.fps_projection = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, 6 * d))
        self.rope = Rope3D(cfg.head_dim, cfg.rope_theta)
        self._rotation_memo: dict[tuple, Tensor] = {}  # (first frame, frames, hp, wp, device) -> RoPE rotation
        self.init_weights()

    def init_weights(self) -> None:
        """Official init: xavier-uniform linears, normal(0.02) embeddings, zero output head."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)

    # -- helpers ----------------------------------------------------------------------------------------------
    def new_kv_cache(self, spec: AttentionSpec, latent_hw: tuple[int, int]) -> KVCache:
        """An empty rolling KV cache for latents of spatial size latent_hw = (h, w)."""
        _, ph, pw = self.cfg.patch_size
        return KVCache(self.cfg.num_layers, spec, (latent_hw[0] // ph) * (latent_hw[1] // pw))

    def new_conditioning(
        self, context: Tensor, clip_fea: Tensor | None = None, y: Tensor | None = None, *,
        fps_index: int | Tensor | None = None,
    ) -> Conditioning:
        """Wrap conditioning with its own cross-attention cache (filled on first use)."""
        return Conditioning(context, clip_fea, y, CrossAttnCache(self.cfg.num_layers), fps_index)

    def default_attention(self) -> AttentionSpec:
        """Topology of a call without an explicit spec: block-causal if the config sets num_frame_per_block > 1."""
        n = self.cfg.num_frame_per_block
        return AttentionSpec(block_frames=n) if n > 1 else AttentionSpec()

    def _sample_info(self, cond: Conditioning, batch: int, device: torch.device) -> Tensor:
        """SkyReels fps modulation [B or 1, 1, 6, dim] (fp32), added to e0 of every frame."""
        if cond.fps_index is None:
            raise ValueError(
                "this DiT injects sample info (SkyReels-V2 DF, inject_sample_info=true): set the conditioning's "
                "fps_index (0 for 16 fps, 1 for any other fps; 24 fps -> 1)"
            )
        idx = torch.as_tensor(cond.fps_index, dtype=torch.long, device=device).reshape(-1)  # [B] or [1]
        if idx.numel() not in (1, batch) or bool(((idx < 0) | (idx > 1)).any()):
            raise ValueError(f"fps_index must be 0 or 1, one value or one per sample (got {cond.fps_index!r})")
        emb = self.fps_embedding(idx)  # [B, dim]
        proj = self.fps_projection(emb.to(self.fps_projection[0].weight.dtype)).float()  # [B, 6*dim]
        return proj.view(-1, 1, 6, self.cfg.dim)

    def _cross_kv(self, cond: Conditioning) -> list[tuple[Tensor, ...]]:
        use_cache = cond.cache is not None and not torch.is_grad_enabled()  # never reuse K/V without their graph
        if use_cache and cond.cache.is_filled:
            return cond.cache.layers  # type: ignore[return-value]
        dtype = self.text_embedding[0].weight.dtype
        ctx = self.text_embedding(cond.context.to(dtype))  # [B, L_txt, dim]
        img = self.img_emb(cond.clip_fea.to(dtype)) if (cond.clip_fea is not None and self.cfg.model_type == "i2v") else None
        kvs = [blk.cross_attn.context_kv(ctx, img) for blk in self.blocks]
        if use_cache:
            cond.cache.layers = list(kvs)
        return kvs

    def _positions(self, frames: Tensor, rope_mode: RopeMode, cached: bool) -> Tensor:
        """RoPE time positions of the new frames.

        Absolute: the frame ids, checked against the RoPE table. Rebase without a cache: from 0. Rebase with a cache:
        the frame ids as well, unchecked: the cache moves only its sink (see `lvstudio.models.kv_cache`), and since
        RoPE sees only position differences this equals re-basing the whole window.
        """
        if rope_mode == "absolute":
            top = int(frames.max()) + 1
            if top > self.cfg.rope_max_frames:
                raise ValueError(
                    f"latent frame {top - 1} is past the {self.cfg.rope_max_frames}-frame RoPE table this model was "
                    "trained with; use rope_mode='rebase' (relative positions inside the rolling window) for longer videos"
                )
            return frames
        if rope_mode != "rebase":
            raise ValueError(f"rope_mode must be 'absolute' or 'rebase' (got {rope_mode!r})")
        return frames if cached else frames - frames.min()

    # -- forward ------------------------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        t: Tensor,
        cond: Conditioning,
        *,
        attention: AttentionSpec | None = None,
        kv_cache: KVCache | None = None,
        start_frame: int = 0,
        write_cache: bool = False,
        rope_mode: RopeMode = "absolute",
    ) -> Tensor:
        """Predict the flow velocity.

        x: [B, C_in, F, H, W] noisy latents (for i2v, `cond.y` [B, 20, F, H, W] is concatenated on channels).
        t: [B, F] per-frame timesteps in 1000-scale (a [B] tensor means one timestep for all frames).
        attention: topology for the new frames (default: `default_attention()`, bidirectional unless the config sets
            num_frame_per_block > 1). With `kv_cache`, the new frames also attend to the cached frames (sink + rolling
            window) and, if `write_cache`, their K/V are stored in the cache, which then keeps exactly what the next
            block will see.
        start_frame: absolute index of the first new latent frame (RoPE offset and cache bookkeeping).
        Returns the velocity [B, C_out, F, H, W].
        """
        cfg = self.cfg
        spec = attention or self.default_attention()
        if cond.y is not None:
            x = torch.cat([x, cond.y.to(x.dtype)], dim=1)
        if x.shape[1] != cfg.in_dim:
            raise ValueError(f"expected {cfg.in_dim} input channels, got {x.shape[1]}")
        b, _, n_f, h, w = x.shape
        pt, ph, pw = cfg.patch_size
        fp, hp, wp = n_f // pt, h // ph, w // pw
        if t.ndim == 1:
            t = t[:, None].expand(b, fp)
        if t.shape != (b, fp):
            raise ValueError(f"timesteps must be [B, F] = [{b}, {fp}], got {list(t.shape)}")
        dtype = self.patch_embedding.weight.dtype

        # Step 1: patchify -> tokens [B, F*L_f, dim] (fp32 residual stream).
        tokens = self.patch_embedding(x.to(dtype)).flatten(2).transpose(1, 2).float()
        # Step 2: per-frame time embedding e [B, F, dim] and its 6-way projection e0 [B, F, 6, dim].
        e = self.time_embedding(sinusoidal_embedding(t, cfg.freq_dim).to(dtype)).float()
        e0 = self.time_projection(e.to(dtype)).float().unflatten(2, (6, cfg.dim))
        if cfg.inject_sample_info:
            e0 = e0 + self._sample_info(cond, b, tokens.device)  # SkyReels fps class, same for every frame
        # Step 3: conditioning K/V for every block (cached per Conditioning).
        ctx_kv = self._cross_kv(cond)
        # Step 4: RoPE and the attention mask for this topology.
        attn = self._attention_context(spec, kv_cache, start_frame, fp, hp, wp, write_cache, rope_mode, tokens.device)
        # Step 5: transformer blocks.
        for i, blk in enumerate(self.blocks):
            tokens = blk(tokens, e0, ctx_kv[i], attn, i)
        if attn.cache is not None and attn.plan is not None:
            attn.cache.commit(attn.plan)
        # Step 6: head and unpatchify -> [B, C_out, F, H, W].
        out = self.head(tokens, e)  # [B, F*L_f, pt*ph*pw*C_out]
        out = out.view(b, fp, hp, wp, pt, ph, pw, cfg.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(b, cfg.out_dim, fp * pt, hp * ph, wp * pw)

    def _rotation(self, pos: Tensor, hp: int, wp: int, device: torch.device) -> Tensor:
        """RoPE rotation of frames `pos` (consecutive) [F*hp*wp, 1, head_dim/2]; the last few are remembered, since
        every denoising step of a block and its context pass use the same positions."""
        key = (int(pos[0]), len(pos), hp, wp, str(device))
        rot = self._rotation_memo.get(key)
        if rot is None:
            if len(self._rotation_memo) >= 4:
                self._rotation_memo.clear()
            rot = self._rotation_memo[key] = self.rope.rotation(pos.to(device), hp, wp)
        return rot

    def _attention_context(
        self,
        spec: AttentionSpec,
        cache: KVCache | None,
        start_frame: int,
        n_frames: int,
        hp: int,
        wp: int,
        write: bool,
        rope_mode: RopeMode,
        device: torch.device,
    ) -> _AttnContext:
        frames = torch.arange(start_frame, start_frame + n_frames)
        pos = self._positions(frames, rope_mode, cached=cache is not None)
        rot = self._rotation(pos, hp, wp, device)
        lf = hp * wp
        if cache is None:
            allowed = frame_mask(frames, frames, spec)
            mask = None if bool(allowed.all()) else token_mask(allowed, lf, lf).to(device)
            return _AttnContext(rot, mask)
        if cache.tokens_per_frame != lf:
            raise ValueError(f"KV cache holds {cache.tokens_per_frame} tokens per frame, input has {lf}")
        plan = cache.plan(frames.tolist(), spec, write=write, rope_mode=rope_mode)
        if plan.sink_positions is not None:  # rebase: the window slid, the sink follows
            sink_pos = torch.tensor(plan.sink_positions, dtype=torch.int64, device=device)
            plan.sink_rotation = self.rope.rotation(sink_pos, hp, wp)
        mask = None if plan.mask is None else token_mask(plan.mask, lf, lf).to(device)
        return _AttnContext(rot, mask, cache, plan)

    # -- re-cache ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def recache(
        self,
        kv_cache: KVCache,
        frames: Tensor,
        start_frame: int,
        cond: Conditioning,
        *,
        keep_sink: bool = True,
        block_frames: int | None = None,
        rope_mode: RopeMode = "absolute",
        t_context: float = 0.0,
    ) -> None:
        """Re-encode already generated clean latent frames under new conditioning (LongLive's KV re-cache).

        frames: [B, C, n, H, W] clean latents of frames start_frame .. start_frame+n-1 (normally the window).
        keep_sink: keep the sink's K/V from the original conditioning (LongLive `global_sink=True`); otherwise the
            cache is cleared and the first re-encoded frames become the new sink.
        block_frames: causal blocks inside the re-encoded frames; None (default) = every re-encoded frame attends to
            every other, as upstream LongLive does (its KV-cache path ignores the block mask).
        """
        if keep_sink and kv_cache.num_sink:
            kv_cache.keep_only_sink()
            sink_end = kv_cache.frame_ids[-1] + 1
            if start_frame < sink_end:  # never re-encode sink frames we keep
                frames = frames[:, :, sink_end - start_frame :]
                start_frame = sink_end
        else:
            kv_cache.reset()
        if frames.shape[2] == 0:
            return
        b, n = frames.shape[0], frames.shape[2]
        t = torch.full((b, n), float(t_context), device=frames.device)
        spec = AttentionSpec(block_frames=block_frames)
        self.forward(frames, t, cond, attention=spec, kv_cache=kv_cache, start_frame=start_frame, write_cache=True, rope_mode=rope_mode)
