"""Latent training data of the tiny presets: procedural-world clips encoded once by the tiny VAE into a
`LatentDataset` (latents, per-latent captions, object masks), and batches of training windows drawn from it.

Shared by the diffusion-forcing, streaming, ERFT and Self-Forcing recipes.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from lvstudio.train.common import DistInfo, barrier

if TYPE_CHECKING:
    from lvstudio.train.diffusion_forcing import DFConfig
    from lvstudio.world import Pose


LATENTS_HINT = ("a latent dataset is derived data: delete it, and the training run that wrote it encodes it again "
                "(`lvstudio train diffusion-forcing CONFIG.toml` for the out_dir it is in)")


@dataclass
class LatentDataset:
    latents: Tensor  # [N, C, L, h, w] normalised VAE latents
    captions: list[list[str]]  # per clip, per latent frame ("" where the frames of a latent disagree)
    objects: Tensor | None = None  # [N, L, h, w] 1 where an object covers the latent pixel (world ground truth)
    seeds: list[int] | None = None  # world seed of each clip
    pose: dict[str, bool | int | float] = field(default_factory=dict)  # how clips started (`lvstudio.world.Pose`)

    def save(self, path: Path) -> None:
        """Atomically, with a checksum (`lvstudio.checked_files`)."""
        from lvstudio.checked_files import save_checked

        tensors = {"latents": self.latents}
        if self.objects is not None:
            tensors["objects"] = self.objects
        meta = {"captions": json.dumps(self.captions), "seeds": json.dumps(self.seeds),
                "pose": json.dumps(self.pose)}
        save_checked(tensors, path, meta)

    @classmethod
    def load(cls, path: Path) -> LatentDataset:
        """A file written by save(), verified (DamagedFileError; files of versions that wrote no checksum are only
        parsed)."""
        from lvstudio.checked_files import load_checked

        t, meta = load_checked(path, require_digest=False, hint=LATENTS_HINT)
        return cls(t["latents"], json.loads(meta["captions"]), t.get("objects"), json.loads(meta.get("seeds", "null")),
                   json.loads(meta.get("pose", "{}")))


def pose_dict(pose: Pose | None) -> dict[str, bool | int | float]:
    """A pose as recorded in a dataset: the fields that differ from the world's own (empty: the world's own)."""
    from lvstudio.world import Pose

    default, pose = Pose(), pose or Pose()
    return {k: v for k, v in asdict(pose).items() if v != getattr(default, k)}


def _pose_words(pose: dict[str, bool | int | float]) -> str:
    """"upright, centred, on a 16-px grid" / "as the world draws them" for a recorded pose."""
    from lvstudio.world import Pose

    return Pose(**pose).words() or "as the world draws them (any angle, anywhere)"


def object_masks(truth: list, num_latents: int, size: int) -> Tensor:
    """[L, h, w] coverage of a clip's objects on the latent grid (union over each latent's pixel frames, dilated
    1 px)."""
    import cv2

    h = size // 8
    out = np.zeros((num_latents, h, h), np.uint8)
    for k in range(num_latents):
        frames = [0] if k == 0 else range(4 * k - 3, 4 * k + 1)
        for f in frames:
            for ob in truth[f].objects:
                r = int(round(ob.size / 16 + 1))
                cv2.circle(out[k], (int(round(ob.x / 8 - 0.5)), int(round(ob.y / 8 - 0.5))), r, 1, -1)
    return torch.from_numpy(out)


def latent_captions(frame_captions: list[str], num_latents: int) -> list[str]:
    """Caption per latent frame: latent 0 <- pixel frame 0; latent k <- pixel frames 4k-3..4k ("" if they differ)."""
    out = [frame_captions[0]]
    for k in range(1, num_latents):
        group = set(frame_captions[4 * k - 3 : 4 * k + 1])
        out.append(group.pop() if len(group) == 1 else "")
    return out


def trim_heap() -> None:
    """Give freed heap memory back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Encoding thousands of clips allocates a ~20 MB float video per batch. After the first one is freed, glibc raises
    its mmap threshold, so later ones come from the heap, where small numpy/opencv allocations between them keep the
    freed space from shrinking: an 8,000-clip dataset grew to 22 GB and was OOM-killed. Trimming after each batch
    keeps the process at a few hundred MB."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "malloc_trim"):
            libc.malloc_trim(0)
    except OSError:
        pass


def render_world_clips(clip_seeds: list[int], clip_latents: int, size: int, switch_prob: float,
                       pose: Pose | None = None) -> tuple[np.ndarray, list[list[str]], Tensor]:
    """World clips of these seeds: frames uint8 [b, F, H, W, 3] (F = 1 + 4*(clip_latents-1)), per-latent captions,
    object masks [b, L, h, w]. A top-level function so that worker processes can run it."""
    from lvstudio.world import Pose, sample_clip

    num_frames = 1 + 4 * (clip_latents - 1)
    clips = [sample_clip(s, num_frames, size=size, switch_prob=switch_prob, pose=pose or Pose()) for s in clip_seeds]
    captions = [latent_captions(c.captions, clip_latents) for c in clips]
    masks = torch.stack([object_masks(c.truth, clip_latents, size) for c in clips])
    return np.stack([c.frames for c in clips]), captions, masks


def _render_job(job: tuple[list[int], int, int, float, Pose | None]) -> tuple[np.ndarray, list[list[str]], Tensor]:
    return render_world_clips(*job)


@torch.no_grad()
def encode_world_dataset(vae: torch.nn.Module, num_clips: int, clip_latents: int, size: int, switch_prob: float,
                         seed: int, batch: int = 16, workers: int = 0, pose: Pose | None = None) -> LatentDataset:
    """Render `num_clips` world clips and encode them with the VAE (on the VAE's device); `pose`: how their objects
    start (`lvstudio.world.Pose`; None: the world's own).

    With `workers` > 0, that many processes render the clips while this one encodes; the dataset is the same
    (clip i has seed `seed * 1_000_003 + i`, batches stay in order)."""
    import multiprocessing

    device = next(vae.parameters()).device
    jobs = [([seed * 1_000_003 + i for i in range(start, min(num_clips, start + batch))], clip_latents, size,
             switch_prob, pose) for start in range(0, num_clips, batch)]
    latents, captions, objects, seeds = [], [], [], []
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 0 else None
    try:
        rendered = pool.imap(_render_job, jobs) if pool is not None else map(_render_job, jobs)
        for (clip_seeds, *_), (frames, caps, masks) in zip(jobs, rendered, strict=True):
            video = torch.from_numpy(frames).to(device).permute(0, 4, 1, 2, 3).float() / 127.5 - 1  # [b,3,F,H,W]
            latents.append(vae.encode(video).cpu())  # [b, C, L, h, w]
            captions += caps
            objects.append(masks)
            seeds += clip_seeds
            del frames, video
            trim_heap()
    finally:
        if pool is not None:
            pool.terminate()
    return LatentDataset(torch.cat(latents), captions, torch.cat(objects), seeds, pose_dict(pose))


def add_object_masks(data: LatentDataset, cfg: DFConfig) -> LatentDataset:
    """Re-render the (deterministic) world clips of a dataset built without masks, to add them."""
    from lvstudio.world import Pose, sample_clip

    n, length = data.latents.shape[0], data.latents.shape[2]
    num_frames = 1 + 4 * (length - 1)
    masks = [object_masks(sample_clip(cfg.seed * 1_000_003 + i, num_frames, size=cfg.size,
                                      switch_prob=cfg.switch_prob, pose=Pose(**data.pose)).truth, length, cfg.size)
             for i in range(n)]
    seeds = [cfg.seed * 1_000_003 + i for i in range(n)]
    return LatentDataset(data.latents, data.captions, torch.stack(masks), seeds, data.pose)


@dataclass
class Batch:
    x0: Tensor  # [B, C, F, h, w]
    prompts: list[str]
    loss_mask: Tensor  # [B, F] 1 where the frame is trained
    objects: Tensor | None = None  # [B, F, h, w] object coverage

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with its tensors on `device`."""
        objects = None if self.objects is None else self.objects.to(device)
        return Batch(self.x0.to(device), self.prompts, self.loss_mask.to(device), objects)


def sample_batch(data: LatentDataset, cfg: DFConfig, rng: np.random.Generator) -> Batch:
    """A batch of training windows (deterministic given rng)."""
    n, _, length = data.latents.shape[:3]
    if cfg.latent_frames > length:
        raise ValueError(f"latent_frames={cfg.latent_frames} is longer than the encoded clips ({length} latents)")
    offsets = list(range(0, length - cfg.latent_frames + 1, cfg.block_frames))
    xs, prompts, masks, objs = [], [], [], []
    for _ in range(cfg.batch_size):
        i = int(rng.integers(n))
        o = 0 if rng.random() < cfg.first_window_prob else int(rng.choice(offsets))
        caps = data.captions[i][o : o + cfg.latent_frames]
        prompt = caps[-1] or next((c for c in reversed(caps) if c), "")
        masks.append(torch.tensor([1.0 if c == prompt else 0.0 for c in caps]))
        prompts.append("" if rng.random() < cfg.cfg_dropout else prompt)
        xs.append(data.latents[i, :, o : o + cfg.latent_frames])
        if data.objects is not None:
            objs.append(data.objects[i, o : o + cfg.latent_frames])
    objects = torch.stack(objs).float() if objs else None
    return Batch(torch.stack(xs).float(), prompts, torch.stack(masks), objects)


@contextmanager
def _encoding_threads(threads: int) -> Iterator[None]:
    """torch CPU threads while rank 0 encodes the dataset: the other ranks only wait at the barrier, so their cores
    encode too (0: leave the setting alone). The thread count is fixed by the config and the world size, so a
    rebuilt cache holds the same latents."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def latent_dataset(cfg: DFConfig, out: Path, dist: DistInfo) -> LatentDataset:
    """The run's latent dataset in out/latents.safetensors: encoded once by rank 0 (world clips through the VAE of
    `cfg.vae`), object masks added to a dataset built before they existed, then loaded by every rank.

    It is a cache: one found damaged (checksum) is encoded again, with a warning; the clips are deterministic, so the
    rebuilt file holds the same latents."""
    path = out / "latents.safetensors"
    data = None
    if dist.is_main:
        from lvstudio.checked_files import load_cache

        data = load_cache(path, LatentDataset.load)
        if data is not None and data.pose != pose_dict(cfg.pose()):
            warnings.warn(f"{path} holds clips whose objects start {_pose_words(data.pose)}, the config asks for "
                          f"{_pose_words(pose_dict(cfg.pose()))}; it is a cache, so it is built again", stacklevel=2)
            data = None
        if data is None:
            from lvstudio.models.tiny_vae import load_vae
            from lvstudio.train.common import train_device

            device = train_device(cfg.device)
            vae = load_vae(cfg.vae).train(False).to(device)
            with _encoding_threads(cfg.threads * dist.world_size if cfg.threads and device.type == "cpu" else 0):
                data = encode_world_dataset(vae, cfg.dataset_clips, cfg.clip_latents, cfg.size, cfg.switch_prob,
                                            cfg.seed, batch=4 if device.type == "cpu" else 64,
                                            workers=cfg.data_workers, pose=cfg.pose())
            data.save(path)
        elif cfg.object_weight > 0 and data.objects is None:
            data = add_object_masks(data, cfg)  # datasets built before masks existed
            data.save(path)
    barrier(dist)
    return data if data is not None else LatentDataset.load(path)
