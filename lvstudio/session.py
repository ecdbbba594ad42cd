"""The session layer: RenderSession (one run of a backend over a storyboard, with sinks, live prompts, stop,
snapshots and resume), the settings a run is made with (`resolve_settings`) and its manifest (`build_manifest`).

The CLI, the TUI and the web preview are thin shells over this module. A session owns:
  - the Prompt Stream Buffer (storyboard shots + live pushes), identity and anchor caches;
  - a backend (causal-kv, ...) stepping one chunk at a time;
  - sinks: callables receiving every Chunk (the mp4 writer, previews, ...);
  - an evaluator for world presets (the oracle's per-shot scores in the manifest), fed with every finished frame;
  - a job folder (optional) with each chunk's clean latents and periodic snapshots of the backend state, so an
    interrupted render resumes to exactly the video an uninterrupted one would have made.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from lvstudio.backends.base import Chunk, to_uint8_frames
from lvstudio.caches import AnchorCache, CachedAnchor, IdentityCache
from lvstudio.errors import LvError
from lvstudio.job_folder import JOB_FORMAT, JobFolder, JobIdentity, preset_fingerprint
from lvstudio.presets.load import ModelBundle
from lvstudio.prompt_stream import PromptEvent, PromptStreamBuffer, block_start_frame
from lvstudio.storyboard import Storyboard, dump_storyboard
from lvstudio.transitions import BLEND, LIVE_DEFAULT, SWITCH

if TYPE_CHECKING:
    from lvstudio.presets.schema import Preset

Sink = Callable[[Chunk], None]
MANIFEST_FORMAT = "lvstudio.manifest/1"
SCORE_STRIDE = 2  # world presets: the oracle reads every 2nd frame as chunks stream in (the manifest's shot scores)


class ShotEvaluator(Protocol):
    """Scores the shots of a render for its manifest (the world oracle for world presets)."""

    def offer(self, frames: np.ndarray, start: int) -> None:
        """The finished frames [n, H, W, 3] uint8 from video frame `start` on, in order."""

    def score(self, shots: list[dict[str, Any]]) -> None:
        """Add the scores to each shot row of `RenderSession.shot_ranges()`."""


def storyboard_hash(sb: Storyboard) -> str:
    return hashlib.sha256(dump_storyboard(sb).encode()).hexdigest()


@dataclass
class RenderSettings:
    """What is rendered: resolved from the storyboard, the preset and command-line overrides."""

    preset: str
    backend: str
    seed: int
    fps: int
    width: int
    height: int
    num_frames: int  # None of the overrides can make this unbounded; live sessions pass a large number
    extend: str | None = None  # the video this render continues: "<file name> sha256:<hex>" (part of a job's identity)

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps


def resolve_settings(sb: Storyboard, *, preset: str | None = None, backend: str | None = None, seed: int | None = None,
                     duration: float | None = None) -> tuple[Preset, RenderSettings]:
    """The preset and the settings of a run: the storyboard's, with command-line overrides applied (None = keep).

    preset: a name or a preset.toml path; duration: seconds. Raises LvError for sizes and durations that cannot be
    rendered."""
    from lvstudio.presets.schema import load_preset

    p = load_preset(preset or sb.preset)
    backend = backend or sb.backend or p.backend
    width, height = sb.resolution or (p.width, p.height)
    if width % 16 or height % 16:
        raise LvError(f"resolution {width}x{height} is not a multiple of 16 (8x VAE x 2x2 patches)",
                      hint=f"use e.g. {width // 16 * 16}x{height // 16 * 16}")
    duration = duration if duration is not None else sb.duration
    if duration <= 0:
        raise LvError(f"--duration must be positive (got {duration})")
    num_frames = max(1, round(duration * sb.fps))
    seed = seed if seed is not None else sb.seed
    return p, RenderSettings(p.name, backend, seed, sb.fps, width, height, num_frames)


@dataclass
class SessionStats:
    chunks: int = 0
    frames: int = 0
    started: float = field(default_factory=time.perf_counter)
    first_frame_s: float | None = None
    chunk_seconds: list[float] = field(default_factory=list)
    recache_ms: list[float] = field(default_factory=list)

    def realtime_factor(self, fps: int) -> float:
        wall = sum(self.chunk_seconds)
        return (self.frames / fps) / wall if wall > 0 else 0.0


def _default_negative(sb: Storyboard, preset: Preset) -> str:
    """CFG's unconditional prompt for shots without their own: the storyboard's, else the preset's (default "")."""
    return preset.negative_prompt if sb.negative_prompt is None else sb.negative_prompt


class RenderSession:
    def __init__(
        self,
        storyboard: Storyboard,
        bundle: ModelBundle,
        settings: RenderSettings,
        *,
        job_dir: Path | None = None,
        snapshot_every: int = 8,
        score_stride: int = SCORE_STRIDE,
        extend: torch.Tensor | None = None,
    ) -> None:
        """score_stride: world presets have the oracle read every `score_stride`-th frame as it is made, for the
        manifest's per-shot scores (renders of any length; 0 = never score). extend: a video [1, 3, F, H, W] in
        [-1, 1] that this render continues (SkyReels-V2 DF presets; the frames made are the continuation)."""
        from lvstudio.backends import backend_class, make_backend

        self.storyboard = storyboard
        self.bundle = bundle
        self.settings = settings
        self.job_dir = job_dir
        self.job = JobFolder(job_dir) if job_dir is not None else None
        self.snapshot_every = snapshot_every
        self.sinks: list[Sink] = []
        self.stats = SessionStats()
        self._stop = threading.Event()
        self._pause = threading.Event()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self._live_recorded = 0  # live events the job folder holds (in a snapshot or a chunk's metadata)
        self._journal_lock = threading.Lock()  # pushes from several threads write live.safetensors in order
        block_latents = bundle.preset.attention.block_frames
        # Step 1: identities and the prompt timeline.
        self.identities = IdentityCache()
        for name, ident in storyboard.identities.items():
            self.identities.add(name, ident.prompt, ident.image)
        self.buffer = PromptStreamBuffer(bundle.text.encode, self.identities, block_latents=block_latents,
                                         fps=settings.fps,
                                         negative=_default_negative(storyboard, bundle.preset))
        for i, shot in enumerate(storyboard.shots):
            self.buffer.add_shot(shot.at, shot.prompt, shot.transition.kind, shot.transition.seconds, shot=i,
                                 seed=shot.seed, negative=shot.negative_prompt)
        for ident in self.identities.identities.values():
            ident.embedding = self.buffer.embedding(ident.prompt)
        # Step 2: anchors (images encoded by the VAE; "first frame of shot N" captured while rendering).
        self.anchors = AnchorCache()
        for a in storyboard.anchors:
            block = self.buffer.seconds_to_block(a.at)
            if a.image is not None:
                pixels = self._read_image(a.image)  # [1, 3, H, W]
                self.anchors.add(CachedAnchor(block, f"image:{a.image}", self._encode_image(pixels), pixels=pixels))
            else:
                capture = self.buffer.seconds_to_block(storyboard.shots[a.shot - 1].at)
                self.anchors.add(CachedAnchor(block, f"shot:{a.shot}", capture_block=capture))
        # Step 3: the backend.
        options: dict[str, Any] = {}
        if "num_frames" in backend_class(settings.backend).options:
            options["num_frames"] = settings.num_frames  # a backend that plans its segments for the video's length
        if extend is not None:
            options["extend"] = extend
        self.backend = make_backend(settings.backend, bundle, self.buffer, seed=settings.seed, width=settings.width,
                                    height=settings.height, anchors=self.anchors, **options)
        self.frames_done = 0
        # Step 4: the manifest's evaluator (world presets): reads frames as they stream, keeps only its readings.
        self.evaluator: ShotEvaluator | None = None
        if bundle.preset.is_world and score_stride > 0:
            from lvstudio.world.evaluator import OracleEvaluator

            self.evaluator = OracleEvaluator(stride=score_stride)

    # -- inputs -----------------------------------------------------------------------------------------------------
    def _read_image(self, path: Path) -> torch.Tensor:
        """An anchor image at the render size -> [1, 3, H, W] in [-1, 1]."""
        import cv2

        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if img is None:
            raise LvError(f"cannot read anchor image {path}", hint="use a PNG or JPEG file")
        img = cv2.resize(cv2.cvtColor(img, cv2.COLOR_BGR2RGB), (self.settings.width, self.settings.height),
                         interpolation=cv2.INTER_AREA)
        return torch.from_numpy(img).float().div(127.5).sub(1).permute(2, 0, 1)[None]

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """[1, 3, H, W] -> latents [1, C, 2, h, w] of the still image (a first-frame latent and a 4-frame one)."""
        x = pixels[:, :, None]  # [1, 3, 1, H, W]
        still = x.expand(-1, -1, 5, -1, -1)  # 1 + 4 frames of the still image
        with torch.no_grad():
            return self.bundle.vae.encode(still.to(self.bundle.device)).cpu()  # [1, C, 2, h, w]

    def estimate(self) -> str | None:
        """One line on the time per chunk, measured now, for presets far from real time (None for the others)."""
        return None if self.bundle.preset.realtime else self.backend.estimate()

    def add_sink(self, sink: Sink) -> None:
        self.sinks.append(sink)

    def block_frame(self, block: int) -> int:
        """The first video frame of prompt-stream block `block` (where an event at that block shows; the studios
        report live prompts with it)."""
        return self.backend.block_start_frame(block)

    def push(self, prompt: str, transition: str = LIVE_DEFAULT, blend_blocks: int = 2) -> PromptEvent:
        """Live prompt from any thread: lands on the next block not yet generated. `transition` (lvstudio.transitions):
        "switch" (default: the shot you are watching continues under the new prompt), "cut" (a new shot) or "blend"
        (over `blend_blocks` blocks); ValueError for another word, an empty prompt or an unknown {identity}."""
        from lvstudio.storyboard.schema import MAX_PROMPT_CHARS

        if len(prompt) > MAX_PROMPT_CHARS:  # what a storyboard takes: the rendered storyboard must re-render it
            raise ValueError(f"a live prompt is at most {MAX_PROMPT_CHARS} characters (this one has {len(prompt)})")
        event = self.buffer.push(prompt, transition=transition, blend_blocks=blend_blocks)
        self._journal_live()
        return event

    def reroll(self, seed: int | None = None) -> PromptEvent:
        """Re-roll the current shot from the next block on: same prompt, a new seed (random unless given); the shot
        continues (a switch), new noise from there on."""
        import random

        current = self.buffer.events[self.buffer.active_index(max(self.buffer.next_block - 1, 0))]
        new_seed = random.randrange(2**31) if seed is None else seed
        event = self.buffer.push(current.prompt, transition=SWITCH, seed=new_seed)
        self._journal_live()
        return event

    def _journal_live(self) -> None:
        """Write every live event so far to the job folder's live.safetensors at once, so that a crash before the
        next chunk is saved keeps the prompt (a resume lands it where it landed). A job folder not made yet, or gone
        (the render finished), has nothing to keep it for; a disk that refuses the write refuses the next chunk too,
        and that error is reported with the render's own message."""
        if self.job is None or not self.job.info_path.exists():
            return
        with self._journal_lock:
            try:
                self.job.save_live(json.dumps(self._live_events()))
            except (OSError, LvError):
                pass

    def rendered_storyboard(self) -> Storyboard:
        """The storyboard of what was actually rendered: the shots plus live prompts at their times.

        Re-rendering it with `lvstudio render` reproduces the session (live events become shots with their seeds).
        """
        from lvstudio.storyboard import parse_storyboard
        from lvstudio.storyboard.writer import toml_string

        sb = self.storyboard
        fps = self.settings.fps
        duration = max(self.frames_done, 1) / fps
        anchors = [a for a in sb.anchors if a.image is not None and a.at < duration]
        base = sb.model_copy(update={"shots": [], "anchors": anchors, "duration": duration, "seed": self.settings.seed})
        lines = [dump_storyboard(base).rstrip("\n")]
        n = self.bundle.preset.attention.block_frames
        active: dict[int, PromptEvent] = {}
        for ev in self.buffer.events:  # sorted by block; the last event of a block is the one that was active
            active[ev.block] = ev
        prev_at: float | None = None
        for block in sorted(active):
            ev = active[block]
            at = block_start_frame(block, n) / fps
            if at >= duration:
                break
            lines += ["", "[[shots]]", f"at = {at!r}", f"prompt = {toml_string(ev.prompt)}"]
            if prev_at is not None and ev.transition in (BLEND, SWITCH):  # a cut is the storyboard's default
                blend = min(ev.blend_blocks * 4 * n / fps, (at - prev_at) - 1 / fps) if ev.transition == BLEND else 0
                kind = f"blend {blend!r}s" if blend > 0 else SWITCH  # a blend too short to write still continues
                lines.append(f'transition = "{kind}"')
            if ev.seed is not None:
                lines.append(f"seed = {ev.seed}")
            if ev.negative is not None:
                lines.append(f"negative_prompt = {toml_string(ev.negative)}")
            prev_at = at
        return parse_storyboard("\n".join(lines) + "\n", source="<rendered session>")

    def stop(self) -> None:
        self._stop.set()
        self._pause.clear()

    def pause(self, paused: bool = True) -> None:
        if paused:
            self._pause.set()
        else:
            self._pause.clear()

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    @property
    def paused(self) -> bool:
        return self._pause.is_set()

    @property
    def done(self) -> bool:
        return self.frames_done >= self.settings.num_frames

    # -- running ----------------------------------------------------------------------------------------------------
    def run(self) -> SessionStats:
        """Generate until done or stopped (in the calling thread); the current chunk is always finished."""
        while not self.done and not self._stop.is_set():
            if self._pause.is_set():
                time.sleep(0.02)
                continue
            self.step()
        if self.job is not None:
            self.write_snapshot()
        return self.stats

    def start(self) -> threading.Thread:
        """Run in a worker thread; errors are kept in `self.error`."""

        def target() -> None:
            try:
                self.run()
            except BaseException as err:  # noqa: BLE001 - reported to the owner of the session
                self.error = err

        self._thread = threading.Thread(target=target, name="lvstudio-render", daemon=True)
        self._thread.start()
        return self._thread

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def step(self) -> Chunk:
        """Generate one chunk, trim it to the requested length, save it to the job folder and fan it out."""
        t0 = time.perf_counter()
        chunk = self.backend.step()
        keep = self.settings.num_frames - chunk.frame_start
        if keep < chunk.num_frames:
            chunk.frames = chunk.frames[: max(keep, 0)]
        if self.job is not None:
            self._save_chunk(chunk)
        if self.evaluator is not None:
            self.evaluator.offer(chunk.frames, chunk.frame_start)
        for sink in self.sinks:
            sink(chunk)
        # Step: statistics (first-frame latency, per-chunk time, re-cache stalls).
        self.stats.chunks += 1
        self.stats.frames += chunk.num_frames
        self.stats.chunk_seconds.append(time.perf_counter() - t0)
        if self.stats.first_frame_s is None:
            self.stats.first_frame_s = time.perf_counter() - self.stats.started
        if chunk.timings.get("recache", 0.0) > 0:
            self.stats.recache_ms.append(1000 * chunk.timings["recache"])
        self.frames_done = chunk.frame_start + chunk.num_frames
        if self.job is not None and self.backend.next_index % self.snapshot_every == 0:
            self.write_snapshot()
        return chunk

    # -- job folder: per-chunk latents + snapshots (lvstudio.job_folder) ---------------------------------------------
    def job_identity(self) -> JobIdentity:
        """What a job folder of this session must match to be resumed."""
        return JobIdentity(storyboard_hash(self.storyboard), dict(self.settings.__dict__),
                           preset_fingerprint(self.bundle.preset))

    def _live_events(self) -> list[dict[str, Any]]:
        """The live prompt events so far (pushed and re-rolled ones, landed or still waiting), in buffer order."""
        return [e.__dict__ for e in self.buffer.events if e.source == "live"]

    def _save_chunk(self, chunk: Chunk) -> None:
        meta = {"frame_start": str(chunk.frame_start), "num_frames": str(chunk.num_frames),
                "event_id": str(chunk.event_id), "prompt": chunk.prompt, "switched": str(chunk.switched),
                "new_shot": str(chunk.new_shot)}
        live = self._live_events()
        if len(live) != self._live_recorded:  # a live prompt since the last record: the chunk carries them all, so a
            meta["live_events"] = json.dumps(live)  # resume from an older snapshot makes this chunk again the same
        self.job.save_chunk(chunk.index, {"latents": chunk.latents}, meta)
        self._live_recorded = len(live)

    def write_snapshot(self) -> None:
        """Save the backend state after the chunks made so far (no-op without a job folder)."""
        if self.job is None:
            return
        state = {k: v.detach().cpu().contiguous() for k, v in self.backend.state_dict().items()}
        events = self._live_events()
        meta = {"format": JOB_FORMAT, "next_index": str(self.backend.next_index), "frames_done": str(self.frames_done),
                "live_events": json.dumps(events)}
        self.job.save_snapshot(self.backend.next_index, state, meta)
        self._live_recorded = len(events)

    def write_job_info(self, **extra: Any) -> None:
        """Create the job folder and its job.json (identity + `extra`, e.g. the resume command)."""
        if self.job is None:
            raise LvError("this render session has no job folder", hint="create it with job_dir=...")
        self.job.create(self.job_identity(), **extra)

    def resume(self, echo: Callable[[str], None] | None = None) -> list[np.ndarray]:
        """Check the job folder (`JobFolder.validate`), restore the newest usable snapshot and return the frames
        already made (re-decoded from the saved latents, exactly as they were decoded the first time)."""
        if self.job is None:
            raise LvError("this render session has no job folder", hint="create it with job_dir=...")
        point = self.job.validate(self.job_identity(), echo)
        # Live prompts: the newest record among the snapshot and the chunks made again after it (each record holds
        # every live event so far), so the chunks made again see the prompts they saw the first time.
        # Then those pushed later (live.safetensors holds every push, written at the push): they land where they
        # landed the first time, on blocks after the last chunk saved before the crash (or after a damaged chunk).
        records = [m["live_events"] for m in (point.meta, *point.dropped_meta) if "live_events" in m]
        events = json.loads(records[-1] if records else "[]")
        journal, why = self.job.load_live()
        if why is not None and echo is not None:
            echo(f"job check: {self.job.live_path.name} cannot be used: {why}; live prompts pushed after the last "
                 "chunk saved are not in the resumed video")
        pushed = json.loads(journal or "[]")  # pushes only append (each lands after the ones before): the newest list
        if len(pushed) > len(events) and pushed[: len(events)] == events:  # wins, unless its write failed
            events = pushed
        for ev in events:
            self.buffer.add(PromptEvent(**ev))
        # What the folder still records (the dropped chunks are gone): the first chunk made again records them anew.
        self._live_recorded = len(json.loads(point.meta.get("live_events", "[]")))
        # Re-decode the finished chunks through a fresh streaming decoder (exactly what was decoded before; a chunk
        # that started a new shot restarts the decoder, as it did then).
        decoder = self.backend.fresh_decoder()
        frames: list[np.ndarray] = []
        done = 0
        for i in range(point.index):
            tensors, meta = self.job.load_chunk(i)
            if meta.get("new_shot") == "True":
                decoder.new_shot()
            with torch.no_grad():
                video = decoder.decode(tensors["latents"].to(self.bundle.device))
            frames.append(to_uint8_frames(video)[: int(meta["num_frames"])])
            if self.evaluator is not None:
                self.evaluator.offer(frames[-1], done)
            done += frames[-1].shape[0]
        if point.snapshot is not None:
            self.backend.load_state_dict(self.job.load_snapshot(point))
        self.frames_done = done
        self.stats.frames = self.frames_done
        return frames

    # -- summaries --------------------------------------------------------------------------------------------------
    def shot_ranges(self) -> list[dict[str, Any]]:
        """Per prompt event: its frame range in the rendered video."""
        events = self.buffer.events
        out = []
        for i, ev in enumerate(events):
            start = min(self.block_frame(ev.block), self.settings.num_frames)
            end = self.settings.num_frames
            if i + 1 < len(events):
                end = min(self.block_frame(events[i + 1].block), end)
            out.append({"event": i, "source": ev.source, "shot": ev.shot, "prompt": ev.prompt, "resolved": ev.resolved,
                        "transition": ev.transition, "block": ev.block, "frame_start": start, "frame_end": end,
                        "time": round(start / self.settings.fps, 3)})
        return out

    def cache_summary(self) -> dict[str, Any]:
        return {"identities": self.identities.summary(), "anchors": self.anchors.summary(),
                "backend": self.backend.cache_summary()}


def build_manifest(session: RenderSession, story: Path, video: Path, *, probe: Path | None = None) -> dict[str, Any]:
    """The manifest of a finished (or stopped) render: storyboard hash, settings, per-shot frame ranges (with the
    evaluator's scores for world presets), the mp4's codec as read back (from `probe`, default `video`: the finished
    file before it is moved to `video`), timings and cache summaries."""
    from lvstudio.video import probe_video

    st, s, sb = session.stats, session.settings, session.storyboard
    shots = session.shot_ranges()
    if session.evaluator is not None:
        session.evaluator.score(shots)
    info = probe_video(probe or video)
    chunk_s = st.chunk_seconds
    return {
        "format": MANIFEST_FORMAT,
        "storyboard": str(story),
        "storyboard_sha256": storyboard_hash(sb),
        "title": sb.title,
        "preset": s.preset,
        "backend": s.backend,
        "seed": s.seed,
        "fps": s.fps,
        "width": s.width,
        "height": s.height,
        "frames": info.num_frames,
        "video": {"path": str(video), "codec": info.codec, "pix_fmt": info.pix_fmt, "faststart": info.faststart},
        "shots": shots,
        "timings": {
            "chunks": st.chunks,
            "seconds_total": round(sum(chunk_s), 3),
            "seconds_per_chunk_mean": round(float(np.mean(chunk_s)), 4) if chunk_s else None,
            "first_frame_s": round(st.first_frame_s, 4) if st.first_frame_s is not None else None,
            "realtime_factor": round(st.realtime_factor(s.fps), 3),
            "recache_stall_ms": [round(x, 2) for x in st.recache_ms],
        },
        "caches": session.cache_summary(),
        **({"extends": s.extend} if s.extend else {}),  # the video this render continues (it comes first)
    }
