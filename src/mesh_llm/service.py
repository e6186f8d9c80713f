"""`mesh-llm service install | uninstall | status | logs`: a node that keeps running, as a systemd --user unit or a launchd agent.

The unit (or plist) is rendered by pure functions; the shell around them writes
the file and calls systemctl/launchctl. The node's arguments are checked with
mesh-llm's own parser at install time, so a typo fails now and not at boot.
Secrets belong in the env file (`~/.config/mesh-llm/service.env`, mode 0600),
which the service reads at start: `MESH_LLM_TOKEN=...` keeps an invite token
out of the unit file and the process list.
"""

from __future__ import annotations

import argparse
import os
import plistlib
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from rich.console import Console

from mesh_llm.errors import UserError

UNIT_NAME = "mesh-llm.service"
LAUNCHD_LABEL = "com.mesh-llm.node"
DESCRIPTION = "mesh-llm node: pooled llama.cpp models behind an OpenAI-compatible API"
RESTART_SECS = 5

ENV_FILE_TEXT = """\
# Environment of the mesh-llm service, read each time it starts: one NAME=value a line, # for comments.
# Secrets go here rather than on the command line (the unit file and `ps` show those to everyone), e.g.
# MESH_LLM_TOKEN=<invite token>        joins the mesh, instead of --join TOKEN
# HF_TOKEN=<Hugging Face token>        for gated models
# MESH_LLM_BIN_DIR=/path/to/llama.cpp/build/bin
"""


# ---- pure: paths and rendering ----

@dataclass(frozen=True)
class Paths:
    home: Path
    config: Path  # $XDG_CONFIG_HOME or ~/.config

    @classmethod
    def of(cls, home: Path, env: Mapping[str, str] | None = None) -> Paths:
        env = os.environ if env is None else env
        xdg = env.get("XDG_CONFIG_HOME", "")
        return cls(home=home, config=Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".config")

    @property
    def unit(self) -> Path:
        return self.config / "systemd" / "user" / UNIT_NAME

    @property
    def env_file(self) -> Path:
        return self.config / "mesh-llm" / "service.env"

    @property
    def plist(self) -> Path:
        return self.home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"

    @property
    def launchd_log(self) -> Path:
        return self.home / "Library" / "Logs" / "mesh-llm" / "service.log"


_PLAIN_WORD = re.compile(r"[A-Za-z0-9_@+=:,./-]+")


def systemd_quote(word: str) -> str:
    """One word of an ExecStart= line, as systemd splits it back: specifiers (%) and variables ($) stay literal."""
    word = word.replace("%", "%%").replace("$", "$$")  # unit specifiers and ${VAR} expansion act inside quotes too
    if word and _PLAIN_WORD.fullmatch(word.replace("%%", "").replace("$$", "")):
        return word
    out = []
    for ch in word:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _unit_path_value(path: Path) -> str:
    """A path as the value of a unit setting: specifiers escaped; a path with a newline cannot be said at all."""
    text = str(path)
    if "\n" in text:
        raise UserError(f"{text!r} has a line break: a systemd unit cannot name it")
    return text.replace("%", "%%")


def render_unit(command: Sequence[str], env_file: Path, workdir: Path) -> str:
    """The systemd --user unit that runs command (the absolute mesh-llm executable, then the node's arguments)."""
    if not command or not command[0].startswith("/"):
        raise ValueError("the unit needs the absolute path of the executable first")
    exec_start = " ".join(systemd_quote(word) for word in command)
    return f"""\
[Unit]
Description={DESCRIPTION}

[Service]
Type=simple
EnvironmentFile=-{_unit_path_value(env_file)}
WorkingDirectory={_unit_path_value(workdir)}
ExecStart={exec_start}
Restart=on-failure
RestartSec={RESTART_SECS}

[Install]
WantedBy=default.target
"""


# launchd has no env file: a POSIX shell reads it (exported), then becomes the node with exec
_LAUNCHD_SHELL = 'env_file="$1"; shift; if [ -r "$env_file" ]; then set -a; . "$env_file"; set +a; fi; exec "$@"'


def render_plist(command: Sequence[str], env_file: Path, log: Path, workdir: Path) -> str:
    """The launchd agent (macOS) that runs command at login and again when it fails (not after a clean exit)."""
    doc: dict[str, Any] = {
        "Label": LAUNCHD_LABEL,
        "ProgramArguments": ["/bin/sh", "-c", _LAUNCHD_SHELL, "mesh-llm-service", str(env_file), *command],
        "RunAtLoad": True,
        "KeepAlive": {"SuccessfulExit": False},
        "ThrottleInterval": RESTART_SECS,
        "WorkingDirectory": str(workdir),
        "StandardOutPath": str(log),
        "StandardErrorPath": str(log),
        "ProcessType": "Interactive",
    }
    return plistlib.dumps(doc, sort_keys=False).decode()


def mesh_llm_command() -> list[str]:
    """The absolute command of the mesh-llm in use: this script, else the one on PATH, else this Python with -m."""
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if argv0 is not None and argv0.name == "mesh-llm" and argv0.is_file():
        return [os.path.abspath(argv0)]
    found = shutil.which("mesh-llm")
    if found:
        return [os.path.abspath(found)]
    return [os.path.abspath(sys.executable), "-m", "mesh_llm"]


def check_node_args(node_args: Sequence[str]) -> None:
    """The arguments must start a node as `mesh-llm ARGS` would: parsed by mesh-llm's own parser, here and now."""
    if not node_args:
        raise UserError("service install needs the node's arguments, e.g. `mesh-llm service install --model Qwen3-8B` (or `--client` with a token in the env file)")
    from mesh_llm.cli import build_parser  # cli imports this module

    parser = build_parser()
    try:
        parsed = parser.parse_args(list(node_args))
    except SystemExit as exc:  # the parser already said what is wrong, on stderr
        if exc.code in (0, None):
            raise UserError("service install: --help and --version do not start a node; nothing was installed") from None
        raise UserError(f"service install: `mesh-llm {shlex.join(node_args)}` would not start a node (see above); nothing was installed", exit_code=2) from None
    if parsed.command is not None:
        raise UserError(f"service install: `{parsed.command}` is a command, not a node; pass the options a node runs with (e.g. --model M, --join TOKEN)")


# ---- the shell: files and service managers ----

class NoServiceManager(UserError):
    pass


def _run(cmd: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=120, check=False)
    except FileNotFoundError:
        raise NoServiceManager(f"{cmd[0]} is not installed here") from None
    except subprocess.TimeoutExpired:
        raise UserError(f"`{' '.join(cmd)}` did not finish within 120 s") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise UserError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}): {detail[-1] if detail else 'no output'}")
    return proc


def _no_systemd(reason: str) -> NoReturn:
    raise NoServiceManager(f"systemd --user is not available here ({reason}): `mesh-llm service install --print ARGS` shows the unit to set up by hand")


def require_systemd() -> None:
    """systemctl on PATH, and a user manager that answers (containers and CI often have neither)."""
    if shutil.which("systemctl") is None:
        _no_systemd("no systemctl")
    try:
        proc = subprocess.run(["systemctl", "--user", "show-environment"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        _no_systemd(f"`systemctl --user` did not answer: {type(exc).__name__}")
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        _no_systemd(f"`systemctl --user` failed: {lines[-1] if lines else f'exit {proc.returncode}'}")


def _say(out: Console, line: str) -> None:
    out.print(line, markup=False, highlight=False)


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.chmod(mode)
    tmp.replace(path)


def _ensure_env_file(paths: Paths, out: Console) -> None:
    if not paths.env_file.exists():
        _write(paths.env_file, ENV_FILE_TEXT, 0o600)
        _say(out, f"Wrote {paths.env_file} (empty: put MESH_LLM_TOKEN=… and other secrets there)")


def _token_note(node_args: Sequence[str], paths: Paths, out: Console) -> None:
    if any(a == "--join" or a.startswith("--join=") for a in node_args):
        _say(out, f"Note: the invite token is now in the unit file in plain text; MESH_LLM_TOKEN=TOKEN in {paths.env_file} keeps it out of it (and of `ps`).")


def install(node_args: Sequence[str], paths: Paths, system: str, print_only: bool, out: Console) -> int:
    check_node_args(node_args)
    command = [*mesh_llm_command(), *node_args]
    darwin = system == "darwin"
    text = render_plist(command, paths.env_file, paths.launchd_log, paths.home) if darwin else render_unit(command, paths.env_file, paths.home)
    if print_only:
        out.file.write(text)
        out.file.flush()
        return 0
    if darwin:
        if shutil.which("launchctl") is None:
            raise NoServiceManager("launchctl is not available here: `mesh-llm service install --print ARGS` shows the agent's plist")
        _ensure_env_file(paths, out)
        paths.launchd_log.parent.mkdir(parents=True, exist_ok=True)
        if paths.plist.exists():
            _run(["launchctl", "unload", str(paths.plist)], check=False)
        _write(paths.plist, text)
        _run(["launchctl", "load", "-w", str(paths.plist)])
        _say(out, f"Installed and started {paths.plist}; it starts again at each login. Logs: mesh-llm service logs (or {paths.launchd_log})")
        _token_note(node_args, paths, out)
        return 0
    require_systemd()
    _ensure_env_file(paths, out)
    _write(paths.unit, text)
    for verb in ("daemon-reload", "enable", "restart"):
        _run(["systemctl", "--user", verb, *([] if verb == "daemon-reload" else [UNIT_NAME])])
    _say(out, f"Installed {paths.unit} and started it: `mesh-llm service status`, `mesh-llm service logs --follow`")
    _token_note(node_args, paths, out)
    _linger_hint(out)
    return 0


def _linger_hint(out: Console) -> None:
    user = os.environ.get("USER") or os.environ.get("LOGNAME") or ""
    if user and shutil.which("loginctl"):
        try:
            proc = subprocess.run(["loginctl", "show-user", user, "--property=Linger", "--value"], capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            proc = None
        if proc is not None and proc.returncode == 0 and proc.stdout.strip() == "yes":
            return
    _say(out, f"To keep it running while you are logged out (and start it at boot): loginctl enable-linger {user or '$USER'}")


def uninstall(paths: Paths, system: str, out: Console) -> int:
    if system == "darwin":
        if not paths.plist.exists():
            _say(out, f"No mesh-llm service installed ({paths.plist} does not exist)")
            return 0
        _run(["launchctl", "unload", "-w", str(paths.plist)], check=False)
        paths.plist.unlink()
        _say(out, f"Stopped and removed {paths.plist}; kept {paths.env_file}")
        return 0
    require_systemd()
    if not paths.unit.exists():
        _say(out, f"No mesh-llm service installed ({paths.unit} does not exist)")
        return 0
    _run(["systemctl", "--user", "stop", UNIT_NAME], check=False)  # already stopped is fine
    _run(["systemctl", "--user", "disable", UNIT_NAME], check=False)
    paths.unit.unlink()
    _run(["systemctl", "--user", "daemon-reload"])
    _say(out, f"Stopped, disabled and removed {paths.unit}; kept {paths.env_file}")
    return 0


def _passthrough(cmd: Sequence[str]) -> int:
    """A service manager's own view, straight to this terminal."""
    try:
        return subprocess.call(list(cmd))
    except FileNotFoundError:
        raise NoServiceManager(f"{cmd[0]} is not installed here") from None
    except KeyboardInterrupt:
        return 0


def status(paths: Paths, system: str) -> int:
    if system == "darwin":
        return _passthrough(["launchctl", "list", LAUNCHD_LABEL])
    require_systemd()
    return _passthrough(["systemctl", "--user", "status", UNIT_NAME, "--no-pager"])


def logs(paths: Paths, system: str, follow: bool, lines: int) -> int:
    if system == "darwin":
        return _passthrough(["tail", "-n", str(lines), *(["-f"] if follow else []), str(paths.launchd_log)])
    require_systemd()
    if shutil.which("journalctl") is None:
        _no_systemd("no journalctl")
    return _passthrough(["journalctl", "--user", "-u", "mesh-llm", *(["-f"] if follow else ["-n", str(lines)]), "--no-pager"])


# ---- argparse ----

class _ServiceParser(argparse.ArgumentParser):
    """The service commands' parsers; with raw_tail (install) every word but --print (and a first -h) is the node's, options included."""

    def __init__(self, *args: Any, raw_tail: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.raw_tail = raw_tail

    def parse_known_args(  # type: ignore[override]  # one signature for typeshed's overloads; argparse calls it as (args, None)
            self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        if not self.raw_tail:
            return super().parse_known_args(args, namespace)
        words = list(sys.argv[1:] if args is None else args)
        namespace = argparse.Namespace() if namespace is None else namespace
        if words[:1] in (["-h"], ["--help"]):
            self.print_help()
            self.exit()
        cut = words.index("--") if "--" in words else len(words)
        head, tail = words[:cut], words[cut + 1:]
        namespace.print_only = "--print" in head
        namespace.node_args = [w for w in head if w != "--print"] + tail
        return namespace, []

    def error(self, message: str) -> NoReturn:  # one line, like the CLI's other errors
        self.exit(2, f"mesh-llm: error: {message} (see: {self.prog} --help)\n")


def add_parser(sub: Any) -> None:
    """`mesh-llm service …` on the CLI's subcommands (sub: its add_subparsers())."""
    svc = sub.add_parser("service", help="run a node as a background service: `service install ARGS…` (systemd --user / launchd), uninstall, status, logs")
    actions = svc.add_subparsers(dest="service_action", metavar="ACTION", required=True, parser_class=_ServiceParser)
    actions.add_parser("install", raw_tail=True, usage="mesh-llm service install [--print] ARGS…",
                       help="install and start a service running `mesh-llm ARGS…` (--print: show the unit, write nothing)",
                       description="Install and start a service that runs `mesh-llm ARGS…` (the options a node takes, e.g. --model M --join TOKEN), "
                                   "restarted when it fails. --print shows the unit and writes nothing.")
    actions.add_parser("uninstall", help="stop and remove the service (the env file stays)")
    actions.add_parser("status", help="the service manager's view of it")
    lg = actions.add_parser("logs", help="the service's log (last 100 lines; --follow to keep reading)")
    lg.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    lg.add_argument("-n", "--lines", type=int, default=100, metavar="N", help="lines of history (default 100)")


def service_command(args: argparse.Namespace, out: Console, home: Path | None = None, system: str | None = None) -> int:
    paths = Paths.of(home or Path.home())
    system = system or sys.platform
    action = args.service_action
    if action == "install":
        return install(args.node_args, paths, system, args.print_only, out)
    if action == "uninstall":
        return uninstall(paths, system, out)
    if action == "status":
        return status(paths, system)
    return logs(paths, system, args.follow, args.lines)
