"""FSDP for the training recipes (`--fsdp`): torch's `fully_shard` over the Wan DiT, and sharded checkpoints written
with `torch.distributed.checkpoint` (DCP) in the safetensors layout.

Sharding (`shard_model`): every `WanDiT` block is one FSDP unit, and so is each block's cross-attention (the DiT
computes every block's text K/V before the blocks run, through `context_kv`, which is registered as an FSDP forward
method); the rest of the model (embeddings, head, a text encoder trained with it) is the root unit. Parameters,
gradients, AdamW states and the EMA copy live sharded on dim 0 across the ranks (DTensors); a block's whole weights
exist only while it runs. FSDP's reduce-scatter averages the gradients, so recipes that average by hand (Self-Forcing)
skip that under FSDP.

Checkpoints (`save_run_checkpoint` / `resume_run_checkpoint`): one process or DDP write `checkpoint.safetensors`
(rank 0); under FSDP each rank writes its own shards with `dcp.save(..., HuggingFaceStorageWriter(
save_distributed=True))`:

    out_dir/checkpoint.dcp/step-00000120/shard-00001-model-00001-of-00001.safetensors   rank 0's pieces
                                         shard-00002-model-00001-of-00001.safetensors   rank 1's pieces, ...
                                         meta.json   format, step, world size, the checkpoint's string metadata
                                         checksums.json   sha256 and size of each file above (written last)

The tensors have the names of a one-file checkpoint (`model.*`, `ema.*`, `optim[_<name>].<param>.<state>`,
`rng.torch`, see `lvstudio.train.loop.checkpoint_state`), so `consolidate` gathers them into exactly that file. A
step folder is written as `.step-N.partial` and renamed once every rank is done, then older steps are deleted: an
interrupted save leaves the previous checkpoint. Nothing is pickled: DCP reads the shard offsets from the
safetensors headers. The out_dir must be one folder every rank can reach (a shared file system across machines).

Rank 0 writes checksums.json (`lvstudio.checked_folders`) once every rank's shards and meta.json are in the folder.
A resume and `consolidate` verify every file against it before DCP reads anything: a missing, extra or changed file
is a DamagedFileError naming it, raised on every rank alike (rank 0 checks, the others get its verdict). Step folders
of versions that wrote no checksums.json are read unchecked.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from lvstudio.errors import DamagedFileError, LvError
from lvstudio.train.loop import (
    CHECKPOINT,
    CONSOLIDATED,
    EMA,
    check_checkpoint_kind,
    checkpoint_state,
    misfit,
    restore_checkpoint_state,
)

if TYPE_CHECKING:
    from lvstudio.train.common import DistInfo

SHARDED_DIR = "checkpoint.dcp"
META = "meta.json"
FORMAT = "lvstudio.sharded-checkpoint/1"


def check_fsdp(fsdp: bool, recipe: str) -> None:
    """FSDP shards across the processes of a torchrun launch: refuse it in one process (before any work)."""
    if fsdp and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        raise LvError(f"{recipe}: --fsdp shards the model across the processes of a torchrun launch, and this is one "
                      "process", hint=f"launch it with torchrun --nproc_per_node=N (N >= 2) -m lvstudio train {recipe} "
                      "CONFIG.toml --fsdp, or leave out --fsdp")


def refuse_fsdp(fsdp: bool, recipe: str, why: str) -> None:
    """Recipes without an FSDP path say so instead of silently running unsharded."""
    if fsdp:
        raise LvError(f"{recipe} does not run under FSDP: {why}",
                      hint="remove `fsdp = true` from the config (diffusion-forcing, streaming and self-forcing take "
                           "--fsdp)")


# ---------------------------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------------------------


def shard_model(model: nn.Module) -> nn.Module:
    """Apply `fully_shard` in place (module docstring): each WanDiT block and its cross-attention, then the root.

    The model's parameters must be on the device it will run on (the device mesh follows them)."""
    import torch.distributed as tdist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    from lvstudio.models.wan_dit import WanDiT

    # The cross-attention unit returns its K/V as views (unflatten); nothing changes them in place (they go straight
    # into scaled_dot_product_attention), so FSDP's warning about in-place ops on view outputs does not apply.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPCrossAttention\) returned a view")
    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (tdist.get_world_size(),))
    for dit in [m for m in model.modules() if isinstance(m, WanDiT)]:
        for block in dit.blocks:
            fully_shard(block.cross_attn, mesh=mesh)
            register_fsdp_forward_method(block.cross_attn, "context_kv")
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def whole_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Whole copies of possibly sharded tensors (a collective under FSDP: every rank must call it)."""
    from lvstudio.train.loop import whole

    return {k: whole(v.detach()).clone() for k, v in tensors.items()}


def init_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Create an optimizer's per-parameter state (AdamW: step, exp_avg, exp_avg_sq) without moving a parameter, so
    that a sharded checkpoint can be loaded into it: one step with zero gradients at learning rate 0."""
    if opt.state:
        return
    lrs = [group["lr"] for group in opt.param_groups]
    for group in opt.param_groups:
        group["lr"] = 0.0
        for p in group["params"]:
            p.grad = torch.zeros_like(p)
    opt.step()
    for group, lr in zip(opt.param_groups, lrs, strict=True):
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)


# ---------------------------------------------------------------------------------------------------------------
# Sharded checkpoints
# ---------------------------------------------------------------------------------------------------------------


def latest_sharded(out_dir: str | Path) -> Path | None:
    """The newest complete step folder of out_dir/checkpoint.dcp (None if there is none)."""
    root = Path(out_dir) / SHARDED_DIR
    steps = sorted(p for p in root.glob("step-*") if (p / META).is_file()) if root.is_dir() else []
    return steps[-1] if steps else None


def save_sharded(out_dir: str | Path, tensors: dict[str, Tensor], metadata: dict[str, str], step: int,
                 dist: DistInfo) -> Path:
    """Every rank writes its shards of `tensors` into a new step folder; rank 0 adds meta.json, renames the folder
    into place and deletes older steps. A collective: every rank calls it with the same names."""
    import torch.distributed.checkpoint as dcp

    from lvstudio.atomic import atomic_write_json, fsync_dir
    from lvstudio.checked_folders import write_manifest
    from lvstudio.train.common import barrier

    root = Path(out_dir) / SHARDED_DIR
    final, tmp = root / f"step-{step:08d}", root / f".step-{step:08d}.partial"
    if dist.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(dist)
    dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(tmp), save_distributed=True))
    barrier(dist)
    if dist.is_main:
        atomic_write_json(tmp / META, {"format": FORMAT, "step": step, "world_size": dist.world_size,
                                       "metadata": metadata})
        write_manifest(tmp)  # last: a step folder with checksums.json is complete (lvstudio.checked_folders)
        if final.exists():  # the same step saved again (a finished run relaunched)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        for old in root.glob("step-*"):
            if old.name != final.name:
                shutil.rmtree(old, ignore_errors=True)
    barrier(dist)
    return final


def sharded_hint(step_dir: Path) -> str:
    """What to do about a damaged sharded checkpoint (the wording of `lvstudio.train.loop.CHECKPOINT_HINT`)."""
    return ("checkpoints are written atomically, so a crash does not do this (a disk or a copy did): restore "
            f"{step_dir} from a backup, or move {step_dir.parent} away to start the run from step 0")


def read_meta(step_dir: Path) -> dict[str, Any]:
    path = Path(step_dir) / META
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise DamagedFileError(path, f"it cannot be parsed ({_last_line(err)})", hint=sharded_hint(step_dir)) from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise LvError(f"{step_dir}: not an lvstudio sharded checkpoint (format "
                      f"{info.get('format') if isinstance(info, dict) else None!r})", hint="use a fresh out_dir")
    return info


def verify_sharded(step_dir: Path) -> None:
    """Check a step folder against its checksums.json before DCP reads it (a folder without one, written before
    manifests existed, is not checked).

    Under torch.distributed, rank 0 hashes the files and sends its verdict to every rank, and every rank raises the
    same DamagedFileError: no rank is left waiting in a collective (DCP's load) for one that gave up. Any other
    failure of rank 0's check (a file it may not read) is raised there as it is, and as an LvError on the others."""
    import torch.distributed as tdist

    from lvstudio.checked_folders import verify_manifest

    group = tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1
    failure: Exception | None = None
    verdict: list[tuple[str, str, str | None] | None] = [None]  # (damaged path or "", reason, hint)
    if not group or tdist.get_rank() == 0:
        try:
            verify_manifest(step_dir, hint=sharded_hint(step_dir))
        except Exception as err:  # noqa: BLE001 - every rank must hear of it before anyone raises
            failure = err
            verdict[0] = ((str(err.path), err.reason, err.hint) if isinstance(err, DamagedFileError)
                          else ("", _last_line(err), None))
    if group:
        tdist.broadcast_object_list(verdict, src=0)
    if failure is not None:
        raise failure
    if verdict[0] is not None:
        path, reason, hint = verdict[0]
        if path:
            raise DamagedFileError(path, reason, hint=hint)
        raise LvError(f"{step_dir}: rank 0 could not check the checkpoint's files ({reason})",
                      hint="see rank 0's message")


def load_sharded(step_dir: Path, tensors: dict[str, Tensor], expected: str | Collection[str] | None = None,
                 ) -> dict[str, str]:
    """Fill `tensors` (this rank's DTensor shards, or whole tensors in one process) in place from a step folder
    (DCP reads the pieces each one needs, whatever the number of ranks that saved them); returns the metadata.

    The folder's files are verified first (`verify_sharded`: DamagedFileError on every rank), then the recipe that
    wrote it must be one of `expected` (`lvstudio.train.loop.check_checkpoint_kind`)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    verify_sharded(step_dir)
    info = read_meta(step_dir)
    check_checkpoint_kind(step_dir, info.get("metadata", {}), expected)
    try:
        dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(step_dir)))
    except (CheckpointException, ValueError, RuntimeError, KeyError) as err:
        # DCP gathers every rank's failure (a missing name, another shape) into a CheckpointException.
        failures = getattr(err, "failures", None)
        cause = next(iter(failures.values())) if failures else err
        raise misfit(step_dir, _last_line(cause)) from None
    return info["metadata"]


def _last_line(err: BaseException) -> str:
    lines = [line for line in str(err).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(err).__name__


def consolidate(step_dir: Path, dest: Path) -> Path:
    """Gather a sharded checkpoint into one safetensors file, with the names and metadata of a one-file checkpoint
    (one process, no process group; holds every tensor whole in memory once). Its files are verified first."""
    import torch.distributed.checkpoint as dcp

    from lvstudio.checked_files import save_checked
    from lvstudio.checked_folders import verify_manifest

    verify_manifest(step_dir, hint=sharded_hint(step_dir))  # DamagedFileError before anything is gathered
    info = read_meta(step_dir)
    layout = dcp.HuggingFaceStorageReader(str(step_dir)).read_metadata().state_dict_metadata
    tensors = {name: torch.empty(md.size, dtype=md.properties.dtype) for name, md in layout.items()}
    with warnings.catch_warnings():  # "no process group: assuming a load in one process" is what this is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(step_dir)))
    return save_checked(tensors, dest, info["metadata"])  # atomic, with its checksum (lvstudio.checked_files)


# ---------------------------------------------------------------------------------------------------------------
# A run's checkpoint: one file, or sharded under FSDP
# ---------------------------------------------------------------------------------------------------------------


def save_run_checkpoint(out: Path, model: nn.Module, optimizers: dict[str, torch.optim.Optimizer], ema: EMA | None,
                        step: int, extra: dict[str, Any], dist: DistInfo, fsdp: bool) -> None:
    """Sharded (every rank) under FSDP, else out/checkpoint.safetensors (rank 0; `save_checkpoint`: atomic, with the
    checksum that a resume verifies)."""
    from lvstudio.train.loop import save_checkpoint

    if fsdp:
        tensors, meta = checkpoint_state(model, optimizers, ema, step, extra, copy=False)
        save_sharded(out, tensors, meta, step, dist)
    elif dist.is_main:
        save_checkpoint(out / CHECKPOINT, model, optimizers, ema, step, extra)


def resume_run_checkpoint(out: Path, model: nn.Module, optimizers: dict[str, torch.optim.Optimizer],
                          ema: EMA | None, fsdp: bool, recipe: str) -> int:
    """Load the run's latest checkpoint of the kind this launch writes; returns its step (0: nothing to resume).

    A run keeps the kind it was started with: an FSDP checkpoint is refused without --fsdp and a one-file checkpoint
    with it, each with the way out; so is a checkpoint another recipe than `recipe` wrote. A damaged one is a
    DamagedFileError (on every rank)."""
    from lvstudio.train.loop import load_checkpoint

    sharded, single = latest_sharded(out), out / CHECKPOINT
    if fsdp and sharded is None and single.exists():
        raise LvError(f"{out} holds a checkpoint of a run without --fsdp ({single.name})",
                      hint="continue it without --fsdp, or start the FSDP run in a fresh out_dir")
    if not fsdp and sharded is not None:
        raise LvError(f"{out} holds a sharded checkpoint of an FSDP run ({sharded.relative_to(out)})",
                      hint="continue it with --fsdp, or gather it into one file with `lvstudio train export`")
    if sharded is not None:
        for opt in optimizers.values():
            init_optimizer_state(opt)
        tensors, _ = checkpoint_state(model, optimizers, ema, 0, copy=False)
        meta = load_sharded(sharded, tensors, recipe)
        return restore_checkpoint_state(sharded, tensors, meta, model, optimizers, ema)[0]
    if single.exists():
        return load_checkpoint(single, model, optimizers, ema, recipe)[0]
    return 0


def consolidated_checkpoint(out: Path) -> Path | None:
    """The run's checkpoint as one file: out/checkpoint.safetensors, or its sharded checkpoint gathered into
    out/consolidated.safetensors (rebuilt when the sharded one is newer); None if the run has none."""
    sharded = latest_sharded(out)
    if sharded is None:
        single = out / CHECKPOINT
        return single if single.exists() else None
    dest = out / CONSOLIDATED
    if not dest.exists() or dest.stat().st_mtime < (sharded / META).stat().st_mtime:
        consolidate(sharded, dest)
    return dest
