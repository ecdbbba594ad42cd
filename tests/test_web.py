"""`lvstudio preview` through its API: gradio_client against the studio launched on 127.0.0.1 (ephemeral port).

Tiny *random* weights (tests/helpers/random_preset.py), 64x64; the studio paces chunks so a test can act mid-render.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("gradio")
pytest.importorskip("gradio_client")

import httpx  # noqa: E402  (a gradio dependency)
import torch  # noqa: E402
from gradio_client import Client  # noqa: E402

from lvstudio.errors import LvError, StoryboardError  # noqa: E402
from lvstudio.prompt_stream import block_start_frame  # noqa: E402
from lvstudio.storyboard import parse_storyboard  # noqa: E402
from lvstudio.video import probe_video  # noqa: E402
from lvstudio.web.app import (  # noqa: E402
    BUSY_MESSAGE,
    FROM_STORYBOARD,
    StudioConfig,
    TabState,
    WebStudio,
    launch_studio,
)
from lvstudio.web.security import gradio_env, launch_kwargs, make_policy, read_auth  # noqa: E402
from tests.helpers.random_preset import write_random_preset  # noqa: E402

BLOCK_FRAMES = 2  # latent frames per block in the random preset -> 4 * 2 = 8 video frames per chunk
CHUNK_FRAMES = 4 * BLOCK_FRAMES
JOB_FILE = re.compile(r"^\d{8}-\d{6}-[0-9a-f]{6}\.(mp4|manifest\.json|storyboard\.toml|rendered\.toml|contact\.png)$")


def story(duration: str = "3s", second_at: str = "1.5s") -> str:
    return (f'title = "web test"\nfps = 16\nduration = "{duration}"\nseed = 3\n\n'
            '[[shots]]\nat = 0\nprompt = "a red ball bouncing over the sea"\n\n'
            f'[[shots]]\nat = "{second_at}"\nprompt = "a red ball resting on the snow"\n')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, outputs: Path, preset: Path, downloads: Path) -> None:
        self.url, self.outputs, self.preset, self.downloads = url, outputs, preset, downloads

    def client(self) -> Client:
        """A new client = a new browser tab (its own session and gr.State)."""
        # A generous HTTP timeout: under load (8 clients on 2 shared cores) an upload can take longer than httpx's 5 s.
        return Client(self.url, verbose=False, download_files=str(self.downloads), httpx_kwargs={"timeout": 120})

    def render(self, client: Client, text: str):  # noqa: ANN201 - gradio_client Job
        return client.submit(text, str(self.preset), FROM_STORYBOARD, None, api_name="/render")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("web")
    preset = write_random_preset(root / "preset")
    policy = make_policy(port=free_port(), outputs=root / "outputs")
    config = StudioConfig(outputs=policy.outputs, story_text=story(), preset=str(preset), story_dir=root,
                          min_chunk_seconds=0.15)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in gradio_env(policy).items():  # restored after the module
            mp.setenv(key, value)
        demo, url = launch_studio(WebStudio(config), policy, block=False)
        try:
            yield Server(url, policy.outputs, preset, root / "downloads")
        finally:
            demo.close()


def final_outputs(job) -> tuple:  # noqa: ANN001
    job.result(timeout=300)  # waits for the end
    outs = job.outputs()
    assert outs, job.status()
    return outs[-1]


def result_video(outputs: tuple) -> str | None:
    """The finished mp4 of a render's outputs (it comes as an update that also shows the result player)."""
    video = outputs[3]
    return video.get("value") if isinstance(video, dict) else video


def is_segment(update: tuple) -> bool:
    """Did this update carry a segment of the live video? (gradio_client downloads the stream's playlist.)"""
    return isinstance(update[6], str)


def test_render_gives_playable_h264_with_previews_and_job_named_files(server: Server) -> None:
    client = server.client()
    try:
        job = server.render(client, story())
        updates = list(job)
    finally:
        client.close()
    firsts = [i for i, u in enumerate(updates[:-1]) if isinstance(u[0], str)]
    segments = [i for i, u in enumerate(updates) if is_segment(u)]
    assert len(firsts) == 1 and firsts[0] < segments[0]  # the first frame goes out before the first segment
    assert len(segments) == 7  # one per chunk: 5 + 8 + 8 + 8 + 8 + 8 + 3 frames (the last 3 at the end)
    # gradio_client fetches the stream's HLS playlist (what a browser polls): every segment, 3 s in all.
    playlist = Path(updates[segments[-1]][6]).read_text()
    durations = [float(d) for d in re.findall(r"#EXTINF:([\d.]+),", playlist)]
    assert len(durations) == 7 and abs(sum(durations) - 3.0) < 1e-3, playlist
    preview, status, progress, _, sheet, files, live, timeline = updates[-1]
    video = result_video(updates[-1])
    assert status.startswith("Done (complete)"), status
    assert live == {"visible": False, "__type__": "update"} and updates[-1][3]["visible"]  # the mp4 replaces it
    assert "generated 0:03 (f48)" in timeline and "<span>2</span>" in timeline
    info = probe_video(video)  # downloaded through the server's /gradio_api/file= route
    assert (info.codec, info.pix_fmt, info.num_frames, info.width, info.height) == ("h264", "yuv420p", 48, 64, 64)
    assert info.faststart
    assert Path(sheet).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "shot 2" in progress and "<script" not in progress
    # Files on the server: one folder per job id, every name from the job id (never from prompt text).
    [folder] = [p for p in server.outputs.iterdir() if p.is_dir() and not p.name.startswith(".")
                and (p / f"{p.name}.mp4").exists() and p.name in status]
    names = sorted(p.name for p in folder.iterdir())
    assert all(JOB_FILE.match(n) for n in names), names
    assert len(names) == 5 and len(files) == 5
    manifest = json.loads((folder / f"{folder.name}.manifest.json").read_text())
    assert manifest["job_id"] == folder.name and manifest["frames"] == 48 and not manifest["stopped"]
    assert [s["source"] for s in manifest["shots"]] == ["storyboard", "storyboard"]


def test_live_prompt_lands_in_manifest_at_its_block(server: Server) -> None:
    client = server.client()
    live = "a red ball moving right on the grass"
    try:
        job = server.render(client, story(duration="4s", second_at="0.5s"))
        message, seen_chunks = None, 0
        for update in job:
            seen_chunks += is_segment(update)
            if seen_chunks == 2 and message is None:
                message = client.predict(live, "blend", api_name="/push")
        final = final_outputs(job)
    finally:
        client.close()
    assert message is not None
    m = re.search(r"lands at block (\d+): frame (\d+)", message)
    assert m, message
    block, frame = int(m.group(1)), int(m.group(2))
    assert block >= 2 and frame == block_start_frame(block, BLOCK_FRAMES)  # after the chunks already seen
    assert final[1].startswith("Done (complete)"), final[1]
    manifest = json.loads(Path(next(f for f in final[5] if f.endswith(".manifest.json"))).read_text())
    [event] = [s for s in manifest["shots"] if s["source"] == "live"]
    assert (event["prompt"], event["block"], event["frame_start"], event["transition"]) == (live, block, frame,
                                                                                            "blend")
    rendered = Path(next(f for f in final[5] if f.endswith(".rendered.toml"))).read_text()
    assert live in rendered  # the storyboard of what was rendered includes the live prompt


def test_stop_ends_within_one_chunk_and_keeps_a_playable_video(server: Server) -> None:
    client = server.client()
    try:
        job = server.render(client, story(duration="30s", second_at="10s"))
        reply, seen = None, 0
        for update in job:
            seen += is_segment(update)
            if seen == 2 and reply is None:
                reply = client.predict(api_name="/stop")
        final = final_outputs(job)
        after = client.predict(api_name="/stop")
    finally:
        client.close()
    m = re.search(r"frame (\d+) done", reply or "")
    assert m, reply
    at_stop = int(m.group(1))
    assert "stopped at frame" in final[1], final[1]
    info = probe_video(result_video(final))
    assert (info.codec, info.pix_fmt) == ("h264", "yuv420p")
    assert at_stop <= info.num_frames <= at_stop + CHUNK_FRAMES  # at most the chunk in flight was finished
    assert info.num_frames < 30 * 16
    manifest = json.loads(Path(next(f for f in final[5] if f.endswith(".manifest.json"))).read_text())
    assert manifest["stopped"] and manifest["frames"] == info.num_frames
    assert all(s["frame_end"] <= info.num_frames for s in manifest["shots"])
    assert after.startswith("Nothing to stop")


def test_invalid_storyboard_returns_the_cli_message_not_a_traceback(server: Server) -> None:
    bad = story().replace('at = "1.5s"', 'at = "0:99"')
    with pytest.raises(StoryboardError) as expected:
        parse_storyboard(bad, source="storyboard.toml")
    before = sorted(p.name for p in server.outputs.iterdir())
    client = server.client()
    try:
        final = final_outputs(server.render(client, bad))
        panel = client.predict(bad, api_name="/validate")
    finally:
        client.close()
    assert final[1] == f"Storyboard error, nothing rendered:\n{expected.value}"
    assert panel == str(expected.value) and "storyboard.toml:" in panel
    assert "Traceback" not in final[1] and result_video(final) is None
    assert sorted(p.name for p in server.outputs.iterdir()) == before  # nothing written


def test_one_render_per_process_busy_message_and_tabs_are_separate(server: Server) -> None:
    tab_a, tab_b = server.client(), server.client()
    try:
        job = server.render(tab_a, story(duration="30s", second_at="10s"))
        busy = push_b = None
        for update in job:
            if is_segment(update) and busy is None:
                busy = final_outputs(server.render(tab_b, story()))
                push_b = tab_b.predict("a red ball", "cut", api_name="/push")
                assert tab_b.predict(api_name="/stop").startswith("Nothing to stop")  # B cannot stop A
                tab_a.predict(api_name="/stop")
        final = final_outputs(job)
    finally:
        tab_a.close()
        tab_b.close()
    assert busy is not None and busy[1] == BUSY_MESSAGE.format(n=1) and result_video(busy) is None
    assert push_b.startswith("No render is running in this tab")
    assert "stopped at frame" in final[1]


def test_eight_clients_at_once_get_busy_or_their_own_render_and_the_server_stays_up(server: Server) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tests.helpers.faults import Fault

    def one(_: int) -> tuple:
        client = server.client()
        try:
            return final_outputs(server.render(client, story(duration="1s", second_at="0.5s")))  # bounded: 300 s
        finally:
            client.close()

    fault = Fault("web studio: 8 clients at once")
    with ThreadPoolExecutor(8) as pool:
        finals = list(pool.map(one, range(8)))
    busy = [f for f in finals if f[1] == BUSY_MESSAGE.format(n=1)]
    done = [f for f in finals if f[1].startswith("Done (complete)")]
    assert len(busy) + len(done) == 8 and done, [f[1] for f in finals]
    assert len({result_video(f) for f in done}) == len(done)  # each render its own job folder and video
    assert all(probe_video(result_video(f)).num_frames == 16 for f in done)
    assert not [p for p in server.outputs.glob("*/*.job")]  # finished renders leave no job folder
    # The server is still up and serves the next render.
    assert final_outputs(server.render(server.client(), story("1s", "0.5s")))[1].startswith("Done (complete)")
    fault.survived()


def test_a_full_disk_during_a_web_render_is_explained_and_the_job_resumes_from_the_cli(server: Server,
                                                                                       tmp_path: Path) -> None:
    import hashlib

    from tests.helpers.fault_render import assert_clean_exit, cli
    from tests.helpers.faults import FailingWrites, Fault

    fault = Fault("web studio: ENOSPC mid-render")
    client = server.client()
    try:
        with FailingWrites(at=9) as writes:  # a few chunks in: chunk files and mp4 writes alternate
            final = final_outputs(server.render(client, story()))
    finally:
        client.close()
    assert writes.failed
    status = final[1]
    assert status.startswith("Render failed: rendering") and "no space left on the device" in status, status
    assert "Traceback" not in status and result_video(final) is None
    command = re.search(r"finish it with: (lvstudio render \S+ --out \S+ --resume)", status)
    assert command, status
    assert_clean_exit(cli(*command.group(1).split()[1:], "--no-progress"), 0, "resuming")
    video = Path(command.group(1).split("--out ")[1].split()[0])
    ref_story = tmp_path / "ref.toml"
    ref_story.write_text(story())
    assert_clean_exit(cli("render", str(ref_story), "--preset", str(server.preset), "--out", str(tmp_path / "ref.mp4"),
                          "--no-progress"), 0)
    assert hashlib.sha256(video.read_bytes()).digest() == hashlib.sha256((tmp_path / "ref.mp4").read_bytes()).digest()
    fault.survived()


def test_file_route_serves_only_the_outputs_folder(server: Server, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"  # under the system temp dir, but outside the outputs folder
    secret.write_text("do not serve")
    inside = server.outputs / "hello.txt"
    inside.write_text("ok")
    base = f"{server.url}gradio_api/file="
    with httpx.Client(timeout=30) as http:
        assert http.get(base + str(inside)).status_code == 200
        for path in ("/etc/passwd", str(secret), f"{server.outputs}/../{secret.parent.name}/secret.txt",
                     str(server.preset), str(Path(__file__).resolve())):
            r = http.get(base + path)
            assert r.status_code == 403, (path, r.status_code)
            assert "do not serve" not in r.text
        # No monitoring endpoint, strict CORS (no foreign or "null" origin is echoed back).
        for route in ("monitoring", "gradio_api/monitoring", "monitoring/summary"):
            assert http.get(server.url + route).status_code in (403, 404)
        for origin in ("http://evil.example", "null"):
            r = http.get(server.url + "config", headers={"Origin": origin})
            assert r.headers.get("access-control-allow-origin") != origin
        page = http.get(server.url).text
        assert "fonts.googleapis" not in page


def test_the_studio_checks_it_can_listen_before_gradio_tries(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A --host that is not this machine's made gradio try 100 ports for minutes, then blame GRADIO_SERVER_PORT."""
    from lvstudio.web.security import LaunchPolicy, check_listen

    def policy(host: str, port: int | None = None) -> LaunchPolicy:
        return LaunchPolicy(host, port, False, ("u", "password"), tmp_path)

    check_listen(policy("127.0.0.1"))
    with pytest.raises(LvError, match="is not an address of this machine"):
        check_listen(policy("10.255.255.1"))  # TEST-NET-ish private address no test machine has
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        with pytest.raises(LvError, match=f"--port {taken.getsockname()[1]} is in use"):
            check_listen(policy("127.0.0.1", taken.getsockname()[1]))

    def no_dns(*_a, **_k):  # noqa: ANN202 - no lookup leaves the test machine
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    with pytest.raises(LvError, match="cannot be resolved"):
        check_listen(policy("bogus.invalid"))


def test_a_new_studio_drops_the_live_segments_of_renders_finished_from_the_cli(tmp_path: Path) -> None:
    """After kill -9 and `lvstudio render --resume`, the killed studio's <job>.stream/ stayed for good."""
    from lvstudio.web.security import LaunchPolicy, prepare_outputs

    (tmp_path / "done" / "done.stream").mkdir(parents=True)
    (tmp_path / "done" / "done.mp4").write_bytes(b"mp4")
    (tmp_path / "open" / "open.stream").mkdir(parents=True)  # no mp4 yet: another studio may be streaming it
    prepare_outputs(LaunchPolicy("127.0.0.1", None, False, None, tmp_path))
    assert not (tmp_path / "done" / "done.stream").exists() and (tmp_path / "done" / "done.mp4").exists()
    assert (tmp_path / "open" / "open.stream").is_dir()


def test_launch_policy_refuses_exposed_servers_without_auth(tmp_path: Path) -> None:
    out = tmp_path / "o"
    assert make_policy(outputs=out).host == "127.0.0.1"
    for host in ("0.0.0.0", "192.168.1.5", "example.com", "::"):
        with pytest.raises(LvError, match="without --auth"):
            make_policy(host=host, outputs=out)
    with pytest.raises(LvError, match="--share"):
        make_policy(share=True, outputs=out)
    assert make_policy(host="localhost", outputs=out).auth is None
    assert make_policy(host="::1", outputs=out).auth is None
    pw = tmp_path / "pw"
    pw.write_text("correct horse battery\n")
    os.chmod(pw, 0o600)
    policy = make_policy(host="0.0.0.0", share=False, auth=f"alice:{pw}", outputs=out)
    assert policy.auth == ("alice", "correct horse battery")
    kw = launch_kwargs(policy)
    assert kw["allowed_paths"] == [str(out.resolve())] and kw["enable_monitoring"] is False
    assert kw["strict_cors"] is True and kw["max_file_size"] and kw["show_error"] is False
    assert gradio_env(policy)["GRADIO_ANALYTICS_ENABLED"] == "False"
    os.chmod(pw, 0o644)
    with pytest.raises(LvError, match="chmod 600"):
        read_auth(f"alice:{pw}")
    pw.write_text("short\n")
    os.chmod(pw, 0o600)
    for spec in (f"alice:{pw}", "alice", f":{pw}", f"alice:{tmp_path / 'missing'}"):
        with pytest.raises(LvError):
            read_auth(spec)
    with pytest.raises(LvError, match="whole tree"):
        make_policy(outputs=Path("/"))


def test_the_validation_panel_says_what_render_would_and_probes_nothing_outside(tmp_path: Path) -> None:
    """The panel said OK for a storyboard Render then refused, and told a visitor whether /etc/passwd exists."""
    folder = tmp_path / "stories"
    folder.mkdir()
    studio = WebStudio(StudioConfig(outputs=tmp_path / "out", story_dir=folder))
    anchor = 'title = "t"\nduration = 2\n[[shots]]\nat = 0\nprompt = "a red ball"\n[[anchors]]\nat = 0\nimage = "{}"\n'
    for outside in ("/etc/passwd", "/root/no-such-file.png", "../elsewhere.png"):
        said = studio.validate(anchor.format(outside))
        assert "is outside the storyboard folder" in said, said
        assert "not found" not in said and "is not a PNG" not in said
    said = studio.validate(story().replace('title = ', 'preset = "nosuch"\ntitle = ', 1))
    assert "preset = 'nosuch': unknown preset 'nosuch'" in said and not said.startswith("OK")


def test_studio_config_rejects_bad_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_renders"):
        StudioConfig(outputs=tmp_path, max_renders=0)
    with pytest.raises(ValueError, match="min_chunk_seconds"):
        StudioConfig(outputs=tmp_path, min_chunk_seconds=-1)
    studio = WebStudio(StudioConfig(outputs=tmp_path))
    assert studio.validate(story()).startswith("OK: 2 shot(s)")
    with pytest.raises(LvError, match="whole number"):
        WebStudio._seed("-1")
    with pytest.raises(LvError, match="whole number"):
        WebStudio._seed(str(2**63))
    assert (WebStudio._seed(""), WebStudio._seed(None), WebStudio._seed(" 42 ")) == (None, None, 42)
    # Stop pressed while a render is still loading its models ends it before its first chunk.
    tab = TabState()
    assert studio.stop(tab).startswith("Nothing to stop")
    tab.loading = True
    assert studio.stop(tab).startswith("Stopping") and tab.stop_early
    assert studio.push("a red ball", "cut", TabState()).startswith("No render is running")


def test_live_transition_offers_switch_cut_and_blend_with_switch_first(tmp_path: Path) -> None:
    import gradio as gr

    demo = WebStudio(StudioConfig(outputs=tmp_path)).build()
    [radio] = [b for b in demo.blocks.values() if isinstance(b, gr.Radio) and b.elem_id == "live-transition"]
    assert [c[1] for c in radio.choices] == ["switch", "cut", "blend"] and radio.value == "switch"


def test_preview_command_refuses_before_launching(tmp_path: Path) -> None:
    from lvstudio.web.cli import preview_command

    with pytest.raises(LvError, match="without --auth"):
        preview_command(None, None, "0.0.0.0", False, None, None, tmp_path / "o")
    with pytest.raises(LvError, match="without --auth"):
        preview_command(None, None, "127.0.0.1", True, None, None, tmp_path / "o")
    with pytest.raises(LvError, match="no such storyboard"):
        preview_command(tmp_path / "missing.toml", None, "127.0.0.1", False, None, None, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_preview_command_without_ffmpeg_names_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from typer.testing import CliRunner

    from lvstudio.cli import app

    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None if name == "ffprobe" else real_which(name, *a, **k))
    result = CliRunner().invoke(app, ["preview", "--outputs", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert "ffprobe, not found on the PATH" in result.output and "install FFmpeg" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "o").exists()
