"""`mesh-llm service`: the rendered unit and plist, and install/uninstall into a temporary home with stand-in service managers.

The stand-ins (`systemctl`, `journalctl`, `loginctl`, `launchctl`) are small scripts first on PATH
that append their argv to a log as JSON, so a test sees exactly what was run and in which order.
"""

from __future__ import annotations

import io
import json
import os
import plistlib
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from mesh_llm.cli import build_parser
from mesh_llm.service import ENV_FILE_TEXT, LAUNCHD_LABEL, Paths, render_plist, render_unit, service_command, systemd_quote

SRC = Path(__file__).resolve().parents[1] / "src"
HOSTILE = ["my model.gguf", 'say "hi"', "it's", "50%", "%h", "$HOME", "${USER}", "a\\b", "tab\there", ";", "", "ünïcode", "back\\", "new\nline"]


def systemd_split(line: str) -> list[str]:
    """Words of an ExecStart= value the way systemd reads them (quotes, C escapes, then %% and $$), for the cases we emit."""
    words, i = [], 0
    while i < len(line):
        if line[i] == " ":
            i += 1
            continue
        if line[i] == '"':
            m = re.compile(r'"((?:[^"\\]|\\.)*)"').match(line, i)
            assert m, line[i:]
            raw = m.group(1)
            word = re.sub(r"\\(x[0-9a-f]{2}|.)", lambda e: {"n": "\n", "t": "\t"}.get(e.group(1), chr(int(e.group(1)[1:], 16)) if e.group(1).startswith("x") else e.group(1)), raw)
            i = m.end()
        else:
            end = line.find(" ", i)
            end = len(line) if end < 0 else end
            word = line[i:end]
            assert not set(word) & set("\"'\\;"), word
            i = end
        words.append(word.replace("%%", "\0").replace("$$", "$").replace("\0", "%"))
    return words


def test_quoting_round_trips_through_systemds_rules() -> None:
    assert systemd_quote("--model") == "--model" and systemd_quote("Qwen3-8B") == "Qwen3-8B" and systemd_quote("/a/b.gguf") == "/a/b.gguf"
    assert systemd_quote("my model.gguf") == '"my model.gguf"'
    assert systemd_quote('say "hi"') == '"say \\"hi\\""'
    assert systemd_quote("50%") == "50%%" and systemd_quote("%h") == "%%h"  # a specifier stays literal
    assert systemd_quote("$HOME") == "$$HOME" and systemd_quote("") == '""' and systemd_quote(";") == '";"'
    line = " ".join(systemd_quote(w) for w in HOSTILE)
    assert "\n" not in line and systemd_split(line) == HOSTILE
    for word in HOSTILE:
        assert re.search(r"(?<!%)%(?!%)", systemd_quote(word).replace("%%", "")) is None  # no bare % left for systemd to expand


def test_rendered_unit() -> None:
    unit = render_unit(["/opt/mesh llm/bin/mesh-llm", "--model", "my model.gguf", "--join-file", "/home/u/100%.token"],
                       Path("/home/u/.config/mesh-llm/service.env"), Path("/home/u"))
    lines = unit.splitlines()
    assert lines[0] == "[Unit]" and any(line.startswith("Description=mesh-llm") for line in lines)
    for expected in ("Type=simple", "EnvironmentFile=-/home/u/.config/mesh-llm/service.env", "Restart=on-failure", "RestartSec=5",
                     "WantedBy=default.target", "WorkingDirectory=/home/u",
                     'ExecStart="/opt/mesh llm/bin/mesh-llm" --model "my model.gguf" --join-file /home/u/100%%.token'):
        assert expected in lines, expected
    assert lines.index("[Service]") < lines.index("Type=simple") < lines.index("[Install]") < lines.index("WantedBy=default.target")
    with pytest.raises(ValueError):
        render_unit(["mesh-llm", "--model", "x"], Path("/e"), Path("/h"))  # never a bare name: systemd needs the path


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    unit = tmp_path / "mesh-llm.service"
    unit.write_text(render_unit([sys.executable, "-m", "mesh_llm", *[w for w in HOSTILE if "\n" not in w]], tmp_path / "service.env", tmp_path))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False)
    ours = [line for line in proc.stderr.splitlines() if "mesh-llm.service" in line]
    assert proc.returncode == 0 and not ours, proc.stderr


def test_rendered_plist_reads_the_env_file_and_restarts_on_failure(tmp_path: Path) -> None:
    env_file = tmp_path / "my env" / "service.env"
    doc = plistlib.loads(render_plist(["/usr/local/bin/mesh-llm", "--model", "a b"], env_file, tmp_path / "log", tmp_path).encode())
    assert doc["Label"] == LAUNCHD_LABEL and doc["RunAtLoad"] is True and doc["KeepAlive"] == {"SuccessfulExit": False}
    assert doc["ThrottleInterval"] == 5 and doc["StandardErrorPath"] == str(tmp_path / "log")
    shell, flag, script, name, *rest = doc["ProgramArguments"]
    assert (shell, flag) == ("/bin/sh", "-c") and rest == [str(env_file), "/usr/local/bin/mesh-llm", "--model", "a b"]
    # the same wrapper here, with a stand-in for mesh-llm: the env file's variables reach it, the arguments arrive intact
    env_file.parent.mkdir()
    env_file.write_text("# comment\nMESH_LLM_TOKEN=tok-123\n")
    probe = [sys.executable, "-c", "import os, sys, json; print(json.dumps([os.environ.get('MESH_LLM_TOKEN'), sys.argv[1:]]))", "--model", "a b"]
    got = subprocess.run(["/bin/sh", "-c", script, name, str(env_file), *probe], capture_output=True, text=True, timeout=30, check=True, env={"PATH": os.defpath})
    assert json.loads(got.stdout) == ["tok-123", ["--model", "a b"]]


# ---- install / uninstall with stand-in service managers ----

FAKE = """\
#!{python}
import json, os, sys
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps([os.path.basename(sys.argv[0]), *sys.argv[1:]]) + "\\n")
if {fail!r} and sys.argv[1:3] == ["--user", "show-environment"]:
    print("Failed to connect to bus: No medium found", file=sys.stderr)
    sys.exit(1)
if os.path.basename(sys.argv[0]) == "loginctl":
    print({linger!r})
"""


def fake_bin(tmp_path: Path, names: tuple[str, ...] = ("systemctl", "journalctl", "loginctl"), no_bus: bool = False, linger: str = "no") -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name in names:
        path = bin_dir / name
        path.write_text(FAKE.format(python=sys.executable, fail=no_bus, linger=linger))
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return bin_dir


def mesh_llm(home: Path, path: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {"HOME": str(home), "PATH": path, "USER": "tester", "PYTHONPATH": str(SRC), "FAKE_LOG": str(home.parent / "calls.jsonl"), "LANG": "C.UTF-8"}
    return subprocess.run([sys.executable, "-m", "mesh_llm", *args], capture_output=True, text=True, timeout=120, env=env, check=False)


def calls(home: Path) -> list[list[str]]:
    log = home.parent / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_install_then_uninstall_with_systemd(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    path = f"{fake_bin(tmp_path)}{os.pathsep}{os.defpath}"
    proc = mesh_llm(home, path, "service", "install", "--model", "my model.gguf", "--port", "9444", "--join", "TOKEN")
    assert proc.returncode == 0, proc.stderr
    unit = home / ".config" / "systemd" / "user" / "mesh-llm.service"
    env_file = home / ".config" / "mesh-llm" / "service.env"
    text = unit.read_text()
    exec_start = next(line for line in text.splitlines() if line.startswith("ExecStart="))
    words = systemd_split(exec_start.removeprefix("ExecStart="))
    assert words[0].startswith("/") and words[-6:] == ["--model", "my model.gguf", "--port", "9444", "--join", "TOKEN"]
    assert f"EnvironmentFile=-{env_file}" in text
    assert env_file.read_text() == ENV_FILE_TEXT and stat.S_IMODE(env_file.stat().st_mode) == 0o600
    assert calls(home) == [["systemctl", "--user", "show-environment"], ["systemctl", "--user", "daemon-reload"],
                           ["systemctl", "--user", "enable", "mesh-llm.service"], ["systemctl", "--user", "restart", "mesh-llm.service"],
                           ["loginctl", "show-user", "tester", "--property=Linger", "--value"]]
    assert "loginctl enable-linger tester" in proc.stdout and "MESH_LLM_TOKEN" in proc.stdout  # the token in the unit is pointed out

    env_file.write_text("MESH_LLM_TOKEN=mine\n")  # a second install keeps the user's env file
    assert mesh_llm(home, path, "service", "install", "--client").returncode == 0
    assert env_file.read_text() == "MESH_LLM_TOKEN=mine\n" and " --client" in unit.read_text()

    (home.parent / "calls.jsonl").unlink()
    assert mesh_llm(home, path, "service", "status").returncode == 0
    assert mesh_llm(home, path, "service", "logs").returncode == 0
    assert mesh_llm(home, path, "service", "logs", "--follow").returncode == 0
    proc = mesh_llm(home, path, "service", "uninstall")
    assert proc.returncode == 0, proc.stderr
    assert [c for c in calls(home) if c[1:] != ["--user", "show-environment"]] == [
        ["systemctl", "--user", "status", "mesh-llm.service", "--no-pager"],
        ["journalctl", "--user", "-u", "mesh-llm", "-n", "100", "--no-pager"],
        ["journalctl", "--user", "-u", "mesh-llm", "-f", "--no-pager"],
        ["systemctl", "--user", "stop", "mesh-llm.service"], ["systemctl", "--user", "disable", "mesh-llm.service"],
        ["systemctl", "--user", "daemon-reload"]]
    assert not unit.exists() and env_file.read_text() == "MESH_LLM_TOKEN=mine\n"


def test_linger_already_on_needs_no_hint(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    proc = mesh_llm(home, f"{fake_bin(tmp_path, linger='yes')}{os.pathsep}{os.defpath}", "service", "install", "--model", "x")
    assert proc.returncode == 0 and "enable-linger" not in proc.stdout and "token is now in the unit" not in proc.stdout


@pytest.mark.parametrize("setup", ["no systemctl", "no user bus"])
def test_without_systemd_one_line_and_nothing_written(tmp_path: Path, setup: str) -> None:
    home = tmp_path / "home"
    home.mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    path = str(empty) if setup == "no systemctl" else str(fake_bin(tmp_path, no_bus=True))
    proc = mesh_llm(home, path, "service", "install", "--model", "Qwen3-8B")
    assert proc.returncode != 0 and proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "systemd --user is not available" in lines[0] and "--print" in lines[0], proc.stderr
    assert all_files(home) == []
    assert [c for c in calls(home) if c[1:] != ["--user", "show-environment"]] == []
    for action in ("status", "logs", "uninstall"):
        other = mesh_llm(home, path, "service", action)
        assert other.returncode != 0 and len(other.stderr.splitlines()) == 1 and "not available" in other.stderr

    printed = mesh_llm(home, path, "service", "install", "--print", "--model", "Qwen3-8B", "--listen-all")
    assert printed.returncode == 0, printed.stderr
    assert printed.stdout.startswith("[Unit]\n") and printed.stdout.rstrip().endswith("WantedBy=default.target")
    assert re.search(r"^ExecStart=/\S+.* --model Qwen3-8B --listen-all$", printed.stdout, re.M)
    assert all_files(home) == []


@pytest.mark.parametrize("args", [["--model", "x", "--no-such-option"], ["--max-inflight", "many"], ["status"], [], ["--model", "x", "--version"]])
def test_bad_node_arguments_fail_at_install(tmp_path: Path, args: list[str]) -> None:
    home = tmp_path / "home"
    home.mkdir()
    proc = mesh_llm(home, f"{fake_bin(tmp_path)}{os.pathsep}{os.defpath}", "service", "install", *args)
    assert proc.returncode != 0, proc.stderr
    assert any(why in proc.stderr for why in ("nothing was installed", "needs the node's arguments", "is a command")), proc.stderr
    assert all_files(home) == [] and calls(home) == []


def test_print_and_node_options_may_come_in_any_order() -> None:
    args = build_parser().parse_args(["service", "install", "--model", "m", "--print", "--port", "9444"])
    assert args.command == "service" and args.service_action == "install" and args.print_only
    assert args.node_args == ["--model", "m", "--port", "9444"]
    args = build_parser().parse_args(["service", "install", "--", "--model", "--print"])  # after --, everything is the node's
    assert not args.print_only and args.node_args == ["--model", "--print"]
    args = build_parser().parse_args(["service", "logs", "-f"])
    assert args.service_action == "logs" and args.follow and args.lines == 100


def test_install_and_uninstall_on_macos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("PATH", f"{fake_bin(tmp_path, names=('launchctl',))}{os.pathsep}{os.defpath}")
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.jsonl"))
    out = Console(file=io.StringIO())
    run: Any = lambda *argv: service_command(build_parser().parse_args(["service", *argv]), out, home=home, system="darwin")  # noqa: E731
    assert run("install", "--model", "m") == 0
    paths = Paths.of(home, {})
    doc = plistlib.loads(paths.plist.read_bytes())
    assert doc["ProgramArguments"][-2:] == ["--model", "m"] and paths.env_file.exists() and paths.launchd_log.parent.is_dir()
    assert run("install", "--model", "n") == 0  # a reinstall unloads the old agent first
    assert run("uninstall") == 0 and not paths.plist.exists() and paths.env_file.exists()
    assert calls(home) == [["launchctl", "load", "-w", str(paths.plist)], ["launchctl", "unload", str(paths.plist)],
                           ["launchctl", "load", "-w", str(paths.plist)], ["launchctl", "unload", "-w", str(paths.plist)]]
