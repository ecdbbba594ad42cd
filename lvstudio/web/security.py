"""Hardened launch settings for `lvstudio preview` (gradio): loopback by default, one allowed folder, no telemetry.

Rules (see /work/shared/reference/ecosystem.md §C.3):
  - bind 127.0.0.1 unless told otherwise; a non-loopback host or `--share` is refused without `--auth`;
  - gradio may serve files from the outputs folder only (`allowed_paths`), plus its own cache, which we put inside
    the outputs folder too; uploads are capped (`max_file_size`);
  - no analytics / version check, no `/monitoring` endpoint, no MCP server, strict CORS, no server-side rendering,
    no error details (tracebacks) sent to the browser.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lvstudio.errors import LvError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_OUTPUTS = Path("out") / "web"
MAX_FILE_SIZE = "20mb"  # uploads (the studio itself takes none; this caps what a client may push)
CACHE_DIR_NAME = ".gradio-cache"  # gradio's copy of served files, kept inside the outputs folder
MIN_PASSWORD_CHARS = 8


def is_loopback(host: str) -> bool:
    """True for `localhost` and loopback addresses (127.0.0.0/8, ::1)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def read_auth(spec: str) -> tuple[str, str]:
    """`USER:PASSWORD_FILE` -> (user, password); the password is the first line of the file.

    The password never appears on the command line (where `ps` would show it).
    """
    user, sep, file = spec.partition(":")
    if not sep or not user.strip() or not file.strip():
        raise LvError(f"--auth {spec!r} is not USER:PASSWORD_FILE",
                      hint="e.g. --auth alice:~/.config/lvstudio/web-password (the file holds the password)")
    path = Path(file).expanduser()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise LvError(f"--auth: cannot read the password file {path} ({type(err).__name__})",
                      hint="create it with the password on its first line, readable only by you (chmod 600)") from None
    lines = text.splitlines()
    password = lines[0].strip() if lines else ""
    if len(password) < MIN_PASSWORD_CHARS:
        raise LvError(f"--auth: the password in {path} is shorter than {MIN_PASSWORD_CHARS} characters",
                      hint="put a longer password on the file's first line")
    try:
        if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise LvError(f"--auth: {path} can be read by other users", hint=f"run: chmod 600 {path}")
    except OSError:
        pass
    return user.strip(), password


@dataclass(frozen=True)
class LaunchPolicy:
    """Where and how the studio listens. Build it with `make_policy`, which applies the refusal rules."""

    host: str
    port: int | None
    share: bool
    auth: tuple[str, str] | None
    outputs: Path  # absolute

    @property
    def cache_dir(self) -> Path:
        return self.outputs / CACHE_DIR_NAME


def make_policy(host: str = DEFAULT_HOST, port: int | None = None, share: bool = False, auth: str | None = None,
                outputs: Path | None = None) -> LaunchPolicy:
    """Check the launch options; raises LvError for an exposed server without authentication."""
    if not host or not host.strip():
        raise LvError("--host is empty", hint=f"leave it out to listen on {DEFAULT_HOST}")
    if port is not None and not 1 <= port <= 65535:
        raise LvError(f"--port {port} is not a TCP port",
                      hint="use 1024-65535 (or under 1024 as root), or leave it out")
    exposed = share or not is_loopback(host)
    if exposed and auth is None:
        what = "--share (a public gradio.live link)" if share else f"--host {host} (reachable from other machines)"
        raise LvError(f"refusing {what} without --auth",
                      hint="add --auth USER:PASSWORD_FILE, or keep the default 127.0.0.1 and use an SSH tunnel")
    credentials = read_auth(auth) if auth is not None else None
    folder = Path(outputs if outputs is not None else DEFAULT_OUTPUTS).expanduser().resolve()
    if folder == Path(folder.anchor) or folder == Path.home().resolve():
        raise LvError(f"--outputs {folder} would expose a whole tree to the browser",
                      hint="use a dedicated folder such as out/web")
    if folder.exists() and not folder.is_dir():
        raise LvError(f"--outputs {folder} is not a folder", hint="give a folder path")
    return LaunchPolicy(host.strip(), port, share, credentials, folder)


def check_listen(policy: LaunchPolicy) -> None:
    """Can the studio listen where the policy says? LvError for a --host that does not resolve or is not an address
    of this machine, and for a --port in use or reserved to root — before gradio tries 100 ports for minutes."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(policy.host, policy.port or 0,
                                                             type=socket.SOCK_STREAM)[0]
    except socket.gaierror as err:
        raise LvError(f"--host {policy.host} cannot be resolved ({err.strerror})",
                      hint="give an IP address or a name of this machine, or leave --host out") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to gradio too
        try:
            probe.bind(address)
        except OSError as err:
            if err.errno == errno.EADDRNOTAVAIL:
                raise LvError(f"--host {policy.host} is not an address of this machine",
                              hint="use one of this machine's addresses, 0.0.0.0 for all of them, or leave --host out "
                                   f"({DEFAULT_HOST})") from None
            if err.errno == errno.EADDRINUSE:
                raise LvError(f"--port {policy.port} is in use on {policy.host}",
                              hint="stop what listens there, choose another --port, or leave it out (the first free "
                                   "port from 7860)") from None
            if err.errno in (errno.EACCES, errno.EPERM):
                raise LvError(f"--port {policy.port} needs root (ports under 1024)",
                              hint="use 1024-65535, or leave --port out") from None
            raise


def gradio_env(policy: LaunchPolicy) -> dict[str, str]:
    """Environment for the gradio process: no telemetry, gradio's file cache inside the outputs folder.

    Set these before the Blocks are built (gradio reads GRADIO_TEMP_DIR when components are created).
    """
    return {
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(policy.cache_dir),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }


def launch_kwargs(policy: LaunchPolicy, *, quiet: bool = True) -> dict[str, Any]:
    """Keyword arguments for `Blocks.launch` that implement the policy (gradio >= 5)."""
    return {
        "server_name": policy.host,
        "server_port": policy.port,
        "share": policy.share,
        "auth": policy.auth,
        "allowed_paths": [str(policy.outputs)],
        "blocked_paths": [],
        "max_file_size": MAX_FILE_SIZE,
        "enable_monitoring": False,
        "strict_cors": True,
        "ssr_mode": False,
        "show_error": False,
        "mcp_server": False,
        "pwa": False,
        "run_history": False,
        "quiet": quiet,
        "inbrowser": False,
    }


def prepare_outputs(policy: LaunchPolicy) -> None:
    """Create the outputs folder (and gradio's cache inside it), private to this user; drop the live segments a
    killed studio left behind for renders finished since (`lvstudio render --resume` made their mp4)."""
    import shutil

    policy.cache_dir.mkdir(parents=True, exist_ok=True)
    for stream in policy.outputs.glob("*/*.stream"):  # <job>/<job>.stream/ next to <job>/<job>.mp4
        if stream.is_dir() and stream.with_name(stream.name.removesuffix(".stream") + ".mp4").is_file():
            shutil.rmtree(stream, ignore_errors=True)
    for folder in (policy.outputs, policy.cache_dir):
        try:
            os.chmod(folder, 0o700)
        except OSError:
            pass
