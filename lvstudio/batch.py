"""`lvstudio render A.toml B.toml DIR/ --out-dir out/`: a batch of storyboards, in one process or spread over the
processes of a torchrun launch (one machine or several), each a plain `lvstudio.render.render()` of one storyboard.

Work split. Rank 0 reads every storyboard, estimates its cost (frames left to make x pixels: a finished output
costs 0, an interrupted one what it has left, an unreadable one 0) and publishes the list, dearest first, in the
torch.distributed store of the launch (the rendezvous store torchrun already runs). Every rank then takes the next
job with an atomic `store.add` until none is left: each storyboard is rendered by exactly one rank, the longest
start first and a rank that finishes early takes the next one, so the ranks finish close together. No process group
is needed: the store also carries every rank's results to all ranks (JSON), and rank 0 writes the index. Each rank
renders on its own device: `--device cuda` (or `auto`) means cuda:LOCAL_RANK under torchrun.

What a job does with its output `<out-dir>/<stem>.mp4` (the rules of `lvstudio render`, decided per job):
  - `--force`: render it again from scratch;
  - a job folder with its job.json (`<stem>.job/`, an interrupted render; lvstudio.job_folder): resume it (the render
    checks the job: the same storyboard, settings and preset, intact chunks and snapshots);
  - the video and its manifest, made from this storyboard with these settings: skip it; made from another version
    or other settings: fail with the way out (`--force`), nothing is overwritten;
  - a video without a manifest (not ours, or the render died in its last step): fail, nothing is overwritten;
  - else render it (a job folder without job.json is not a job: the render refuses to remove it without --force).
A failing storyboard (unreadable, invalid, a missing preset, a disk that refuses a write) is reported in the index
with its exit code (2 bad input, 74 I/O; lvstudio.io_errors) and the others go on. SIGINT, SIGTERM or SIGHUP
(torchrun passes them on to every rank; lvstudio.stop_signals) finish the chunk in flight, keep the job folder, start
no further job and write the index; the batch exits 128 + the signal number and the same command resumes.

The index, `<out-dir>/batch.json` (written atomically by rank 0): see `BATCH_FORMAT` and `write_index`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lvstudio.cli_options import check_folder_path
from lvstudio.errors import Interrupted, IOFailure, LvError
from lvstudio.stop_signals import exit_code_for

if TYPE_CHECKING:
    from lvstudio.job_folder import JobFolder

BATCH_FORMAT = "lvstudio.batch/2"  # 2: job folders of lvstudio.job_folder, per-job exit codes
INDEX = "batch.json"
EXIT_INTERNAL = 1  # a bug in a job (exit codes 2, 74 and 128 + N come from lvstudio.errors)
STORE_TIMEOUT = timedelta(days=7)  # a rank waits this long for the others' results (the longest job, at most)


@dataclass
class BatchRequest:
    stories: list[Path]  # storyboard files and folders (their *.toml)
    out_dir: Path
    preset: str | None = None
    backend: str | None = None
    seed: int | None = None
    duration: float | None = None
    force: bool = False
    progress: bool = True
    keep_job: bool = False
    device: str | None = None
    threads: int = 1


@dataclass
class Job:
    """One storyboard of the batch; `index` is its place on the command line (and in the index)."""

    index: int
    story: str
    out: str  # file name inside out_dir
    cost: float = 0.0


@dataclass
class JobResult:
    index: int
    story: str
    out: str
    status: str  # rendered | resumed | skipped | failed | interrupted
    rank: int
    host: str
    device: str
    order: int  # position in the claim order (0 = taken first)
    started_at: float  # epoch seconds on the rank's clock
    seconds: float
    frames: int = 0  # frames of the finished video
    video_s: float = 0.0  # seconds of video made by this run (a resumed job counts what it had left)
    realtime_factor: float | None = None
    manifest: str | None = None
    contact_sheet: str | None = None
    error: str | None = None
    internal: bool = False  # the error is a bug (not the storyboard's or the options' fault)
    exit_code: int = 0  # what `lvstudio render` of this storyboard alone would exit with (2, 74, 128 + N; 1: a bug)


@dataclass
class BatchOutcome:
    index: Path | None  # batch.json (rank 0; None on the other ranks)
    results: list[JobResult] = field(default_factory=list)
    exit_code: int = 0


# ---------------------------------------------------------------------------------------------------------------
# The ranks: one process, or a torchrun launch (its rendezvous store)
# ---------------------------------------------------------------------------------------------------------------


class Ranks:
    """Who this process is in the batch, and the store the ranks share (None in one process)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, store: Any = None) -> None:
        self.rank, self.world_size, self.local_rank, self.store = rank, world_size, local_rank, store
        self._next = 0

    @classmethod
    def join(cls) -> Ranks:
        """The ranks of this launch: torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR...), else one process."""
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        import torch.distributed as dist

        store, rank, world_size = next(dist.rendezvous("env://", timeout=STORE_TIMEOUT))
        store.set_timeout(STORE_TIMEOUT)
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return cls(rank, world_size, int(os.environ.get("LOCAL_RANK", "0")),
                   dist.PrefixStore(f"lvstudio-batch/{restart}/", store))

    def claim(self) -> int:
        """The claim-order position of this rank's next job (atomic across ranks)."""
        if self.store is None:
            self._next += 1
            return self._next - 1
        return int(self.store.add("next", 1)) - 1

    def share(self, key: str, value: Any) -> None:
        if self.store is not None:
            self.store.set(key, json.dumps(value))

    def read(self, key: str) -> Any:
        """What a rank shared under `key` (waits for it)."""
        return json.loads(self.store.get(key).decode("utf-8"))

    def finish(self) -> None:
        """Rank 0 may host the store (launches without torchrun's agent store): it leaves last."""
        if self.store is None:
            return
        self.store.add("finished", 1)
        if self.rank == 0:
            while int(self.store.add("finished", 0)) < self.world_size:
                time.sleep(0.05)


def job_device(requested: str | None, ranks: Ranks) -> str:
    """The device this rank renders on: an explicit cuda:N as given; cuda/auto mean cuda:LOCAL_RANK under torchrun."""
    name = requested or os.environ.get("LVSTUDIO_DEVICE", "cpu")
    if ranks.world_size > 1 and name in ("cuda", "auto"):
        import torch

        if torch.cuda.is_available():
            torch.cuda.set_device(ranks.local_rank)
            return f"cuda:{ranks.local_rank}"
    return name


# ---------------------------------------------------------------------------------------------------------------
# Planning (rank 0)
# ---------------------------------------------------------------------------------------------------------------


def collect_stories(paths: list[Path]) -> list[Path]:
    """The storyboards named on the command line: files as given (missing ones too: they fail as jobs), folders
    as their *.toml files in name order; each file once."""
    stories: list[Path] = []
    for path in paths:
        found = sorted(path.glob("*.toml")) if path.is_dir() else [path]
        if path.is_dir() and not found:
            raise LvError(f"{path}: the folder holds no *.toml storyboard", hint="name storyboard files or folders")
        stories.extend(p for p in found if p.resolve() not in {s.resolve() for s in stories})
    return stories


def plan_jobs(req: BatchRequest) -> list[Job]:
    """Every storyboard's job with its output name and cost, dearest first (ties: command-line order)."""
    stories = collect_stories(req.stories)
    by_name: dict[str, Path] = {}
    for story in stories:
        name = f"{story.stem}.mp4"
        if name in by_name:
            raise LvError(f"{by_name[name]} and {story} would both render to {req.out_dir / name}",
                          hint="rename one of them, or render them in two batches with different --out-dir")
        by_name[name] = story
    jobs = [Job(i, str(story), f"{story.stem}.mp4", _cost(story, req)) for i, story in enumerate(stories)]
    return sorted(jobs, key=lambda j: (-j.cost, j.index))


def _cost(story: Path, req: BatchRequest) -> float:
    """Frames still to make x pixels per frame (0 for a finished output or a storyboard that cannot be read)."""
    from lvstudio.session import resolve_settings
    from lvstudio.storyboard import load_storyboard

    try:
        _, settings = resolve_settings(load_storyboard(story), preset=req.preset, backend=req.backend,
                                       seed=req.seed, duration=req.duration)
    except (LvError, OSError, ValueError):
        return 0.0
    out = req.out_dir / f"{story.stem}.mp4"
    done = None if req.force else _job(out).frames_saved()
    if done is not None:
        left = settings.num_frames - done
    else:
        left = 0 if (out.exists() and not req.force) else settings.num_frames
    return float(max(left, 0) * settings.width * settings.height)


def _job(out: Path) -> JobFolder:
    """The job folder `lvstudio render` keeps for this output (lvstudio.job_folder)."""
    from lvstudio.job_folder import JobFolder

    return JobFolder(out.with_name(out.stem + ".job"))


def _manifest(out: Path) -> Path:
    return out.with_name(out.stem + ".manifest.json")


# ---------------------------------------------------------------------------------------------------------------
# One job
# ---------------------------------------------------------------------------------------------------------------


def job_action(story: Path, out: Path, req: BatchRequest) -> str:
    """"render", "resume" or "skip" for this output (module docstring); raises OutputExistsError where the only
    way on would overwrite something."""
    from lvstudio.errors import OutputExistsError

    if req.force:
        return "render"
    if _job(out).info_path.is_file():
        return "resume"
    if out.exists():
        if not _manifest(out).exists():
            raise OutputExistsError(out, f"{out} exists without its manifest (not made by lvstudio, or its render "
                                         "stopped in the last step)", hint="pass --force to render it again")
        if not _same_render(story, out, req):
            raise OutputExistsError(out, f"{out} was rendered from another version of {story} or with other options",
                                    hint="pass --force to render it again")
        return "skip"
    return "render"  # a folder <stem>.job without job.json is not ours to remove: render() refuses it (or --force)


def _same_render(story: Path, out: Path, req: BatchRequest) -> bool:
    """Does the finished output's manifest say it was made from this storyboard with these settings?"""
    from lvstudio.session import resolve_settings, storyboard_hash
    from lvstudio.storyboard import load_storyboard

    sb = load_storyboard(story)
    _, s = resolve_settings(sb, preset=req.preset, backend=req.backend, seed=req.seed, duration=req.duration)
    try:
        m = json.loads(_manifest(out).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    made = (m.get("storyboard_sha256"), m.get("preset"), m.get("backend"), m.get("seed"), m.get("frames"),
            m.get("fps"), m.get("width"), m.get("height"))
    return made == (storyboard_hash(sb), s.preset, s.backend, s.seed, s.num_frames, s.fps, s.width, s.height)


def run_job(job: Job, req: BatchRequest, ranks: Ranks, device: str, order: int,
            echo: Callable[[str], None]) -> JobResult:
    """Render, resume or skip one storyboard; every problem becomes the job's error (the batch goes on)."""
    from lvstudio.render import RenderRequest, render

    story, out = Path(job.story), req.out_dir / job.out
    res = JobResult(job.index, job.story, job.out, "failed", ranks.rank, socket.gethostname(), device, order,
                    time.time(), 0.0)
    t0 = time.perf_counter()
    try:
        action = job_action(story, out, req)
        if action == "skip":
            m = json.loads(_manifest(out).read_text(encoding="utf-8"))
            res.status, res.frames, res.manifest = "skipped", int(m["frames"]), _manifest(out).name
            res.contact_sheet = out.with_name(out.stem + ".contact.png").name
        else:
            before = (_job(out).frames_saved() or 0) if action == "resume" else 0
            rr = RenderRequest(story, out, req.preset, req.backend, req.seed, req.duration,
                               resume=action == "resume", force=req.force,
                               progress=req.progress and ranks.world_size == 1, keep_job=req.keep_job,
                               device=device, threads=req.threads)
            done = render(rr, echo=echo)
            if done.interrupted:
                res.status, res.exit_code = "interrupted", done.exit_code
            else:
                m = json.loads(Path(done.manifest).read_text(encoding="utf-8"))
                res.status = "resumed" if action == "resume" else "rendered"
                res.frames, res.video_s = int(m["frames"]), (int(m["frames"]) - before) / m["fps"]
                res.realtime_factor = done.stats.get("realtime_factor")
                res.manifest, res.contact_sheet = Path(done.manifest).name, Path(done.contact_sheet).name
    except Interrupted as err:  # a second stop signal inside the render: stopped at once, the job kept
        res.status, res.error, res.exit_code = "interrupted", str(err), err.exit_code
    except LvError as err:
        res.error, res.exit_code = str(err), err.exit_code
    except Exception as err:  # noqa: BLE001 - a bug in one job must not stop the batch; the index reports it
        _job_failure(res, err, story)
    res.seconds = round(time.perf_counter() - t0, 3)
    return res


def _job_failure(res: JobResult, err: Exception, story: Path) -> None:
    """An error that is not an LvError: a disk that refused a read or write (explained by lvstudio.io_errors, exit
    74), else a bug (exit 1)."""
    from lvstudio.io_errors import io_failure, is_io_error

    if is_io_error(err):
        failure = io_failure(err, action=f"rendering {story}", elsewhere="give the batch another --out-dir")
        res.error, res.exit_code = str(failure), failure.exit_code
    else:
        res.error, res.internal = f"internal error: {type(err).__name__}: {err}", True
        res.exit_code = EXIT_INTERNAL


# ---------------------------------------------------------------------------------------------------------------
# The batch
# ---------------------------------------------------------------------------------------------------------------


def run_batch(req: BatchRequest, echo: Callable[[str], None] = print) -> BatchOutcome:
    """Render every storyboard of the request across the ranks of this launch; rank 0 writes the index."""
    import lvstudio.render  # noqa: F401 - torch and the render stack: imported before the clock starts, on every rank
    import lvstudio.session  # noqa: F401
    from lvstudio.stop_signals import graceful_stop

    ranks = Ranks.join()
    t0, started = time.perf_counter(), time.time()
    # Step 1: rank 0 plans (and makes the folder); every rank reads the plan, or the problem that stops the batch.
    jobs = _shared_plan(req, ranks)
    device = job_device(req.device, ranks)
    say = echo if ranks.world_size == 1 else (lambda m: echo(f"[rank {ranks.rank}] {m}"))
    # Step 2: take the next job until none is left. A stop signal (SIGINT, SIGTERM, SIGHUP) lets the render in flight
    # finish its chunk and keep its job folder (each render's own stop block nests in this one); no job starts after.
    mine: list[JobResult] = []
    with graceful_stop(what="the chunk in flight") as stop:
        while not stop.requested and (not mine or mine[-1].status != "interrupted"):
            order = ranks.claim()
            if order >= len(jobs):
                break
            try:
                mine.append(run_job(jobs[order], req, ranks, device, order, say))
            except KeyboardInterrupt as err:  # a second signal outside a render (StopNow): stop at once
                mine.append(JobResult(jobs[order].index, jobs[order].story, jobs[order].out, "interrupted",
                                      ranks.rank, socket.gethostname(), device, order, time.time(), 0.0,
                                      exit_code=getattr(err, "exit_code", exit_code_for(signal.SIGINT))))
            say(job_line(mine[-1], req.out_dir))
    # Step 3: every rank's results to every rank; rank 0 writes the index.
    results = mine
    if ranks.store is not None:
        ranks.share(f"results/{ranks.rank}", [asdict(r) for r in mine])
        results = [JobResult(**r) for k in range(ranks.world_size) for r in ranks.read(f"results/{k}")]
    index = None
    if ranks.rank == 0:
        index = write_index(req, ranks.world_size, jobs, results, started, time.perf_counter() - t0)
    ranks.finish()
    return BatchOutcome(index, sorted(results, key=lambda r: r.index), exit_code(results))


def _shared_plan(req: BatchRequest, ranks: Ranks) -> list[Job]:
    """Rank 0's plan (module docstring), read by every rank; a problem that stops the whole batch is raised on every
    rank with its exit code (2: the storyboards or options; 74: the output folder cannot be made)."""
    if ranks.rank == 0:
        try:
            check_folder_path(req.out_dir, "--out-dir")
            plan: dict[str, Any] = {"jobs": [asdict(j) for j in plan_jobs(req)]}
            req.out_dir.mkdir(parents=True, exist_ok=True)
        except LvError as err:
            plan = {"error": str(err), "exit_code": err.exit_code}
        except OSError as err:
            from lvstudio.io_errors import io_failure

            failure = io_failure(err, action="creating the batch's output folder", path=req.out_dir,
                                 elsewhere="give the batch another --out-dir")
            plan = {"error": str(failure), "exit_code": failure.exit_code}
        ranks.share("plan", plan)
    else:
        plan = ranks.read("plan")
    if "error" in plan:
        ranks.finish()
        raise (IOFailure if plan["exit_code"] == IOFailure.exit_code else LvError)(plan["error"])
    return [Job(**j) for j in plan["jobs"]]


def exit_code(results: list[JobResult]) -> int:
    """The batch's exit code: a stop signal's (128 + N) when one stopped a rank; 1 when a job hit a bug; 74 when a
    disk refused a job's read or write; 2 when a storyboard or the options were at fault; else 0."""
    stopped = [r.exit_code for r in results if r.status == "interrupted"]
    if stopped:
        return stopped[0] or exit_code_for(signal.SIGINT)
    if any(r.internal for r in results):
        return EXIT_INTERNAL
    failed = {r.exit_code for r in results if r.status == "failed"}
    if IOFailure.exit_code in failed:
        return IOFailure.exit_code
    return LvError.exit_code if failed else 0


def job_line(r: JobResult, out_dir: Path) -> str:
    """One line per finished job, as the rank that ran it prints it."""
    if r.status == "failed":
        return f"{r.story}: failed — {r.error}"
    if r.status in ("skipped", "interrupted"):
        return f"{r.story}: {r.status}" + (" (finished earlier)" if r.status == "skipped" else "")
    return (f"{r.story} -> {out_dir / r.out}: {r.status}, {r.video_s:.1f} s of video in {r.seconds:.1f} s "
            f"(x{r.realtime_factor} real time)")


def write_index(req: BatchRequest, world_size: int, jobs: list[Job], results: list[JobResult], started: float,
                wall_s: float) -> Path:
    """`<out_dir>/batch.json`: every storyboard of the batch in command-line order with its output, status, rank,
    device, host, claim order, timings and error; per-rank load; totals (video seconds made per wall second)."""
    from lvstudio.atomic import atomic_write_json

    by_index = {r.index: r for r in results}
    rows = [asdict(by_index[j.index]) if j.index in by_index else
            {"index": j.index, "story": j.story, "out": j.out, "status": "pending"}
            for j in sorted(jobs, key=lambda j: j.index)]
    made = sum(r.video_s for r in results)
    per_rank = [{"rank": k, "host": next((r.host for r in results if r.rank == k), None),
                 "jobs": sum(r.rank == k for r in results),
                 "busy_s": round(sum(r.seconds for r in results if r.rank == k), 3)} for k in range(world_size)]
    counts = {s: sum(row["status"] == s for row in rows)
              for s in ("rendered", "resumed", "skipped", "failed", "interrupted", "pending")}
    data = {"format": BATCH_FORMAT, "out_dir": str(req.out_dir), "world_size": world_size,
            "started_at": started, "wall_s": round(wall_s, 3), "video_s": round(made, 3),
            "video_s_per_wall_s": round(made / wall_s, 4) if wall_s > 0 else None,
            "counts": counts, "ranks": per_rank, "jobs": rows}
    return atomic_write_json(req.out_dir / INDEX, data)


def summary_lines(index: Path) -> list[str]:
    """What rank 0 prints at the end: the counts, the throughput, each failure, the index path."""
    data = json.loads(index.read_text(encoding="utf-8"))
    counts = ", ".join(f"{n} {s}" for s, n in data["counts"].items() if n)
    lines = [f"batch: {len(data['jobs'])} storyboard(s) on {data['world_size']} rank(s) in {data['wall_s']:.1f} s: "
             f"{counts}; {data['video_s']:.1f} s of video made, {data['video_s_per_wall_s'] or 0:.3f} video-s per "
             "wall-s"]
    for j in data["jobs"]:
        if j["status"] == "failed":  # a storyboard's own error already starts with its file (`file:line:col: ...`)
            named = str(j["error"]).startswith(str(j["story"]))
            lines.append(f"  failed: {j['error']}" if named else f"  failed: {j['story']}: {j['error']}")
    return [*lines, f"index: {index}"]
