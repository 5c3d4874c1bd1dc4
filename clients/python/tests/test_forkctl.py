"""forkctl end to end: JSON output parsed, the live progress display and Ctrl-C exercised in a
pseudo-terminal, all against a real forkd and real KVM VMs."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import termios
import time
from collections.abc import Callable
from typing import Any

from conftest import Daemon, forkctl_command, scaled

LIVE_PHASES = ["STARTED", "ARMED", "PAUSED", "VMSTATE_SAVED", "RESUMED", "COPYING",
               "PUBLISHING", "DONE"]


def forkctl(daemon: Daemon, *args: str, check: bool = True,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(forkctl_command("--addr", daemon.target, *args),
                            capture_output=True, text=True, timeout=scaled(timeout))
    if check:
        assert result.returncode == 0, result.stderr
    return result


def forkctl_json(daemon: Daemon, *args: str) -> Any:
    return json.loads(forkctl(daemon, *args, "--json").stdout)


def forkctl_events(daemon: Daemon, *args: str) -> list[dict[str, Any]]:
    """A branch or watch with --json: one event per line."""
    return [json.loads(line) for line in forkctl(daemon, *args, "--json").stdout.splitlines()]


def folded(events: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for event in events:
        if not (out and out[-1] == event["phase"] == "COPYING"):
            out.append(event["phase"])
    return out


def run_in_pty(argv: list[str], on_output: Callable[[str, int], None] | None = None,
               timeout: float = 60) -> tuple[int, str]:
    """Runs argv on a fresh pseudo-terminal (its controlling terminal, so ^C written to it
    raises SIGINT as on a real one); returns (exit status, everything it printed). A child
    still running at the deadline is made to print every thread's stack (SIGABRT with the
    fault handler on) before it is killed, so a hang shows where it hangs."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: exec at once
        try:
            os.execve(argv[0], argv, {**os.environ, "TERM": "xterm-256color",
                                      "COLUMNS": "120", "LINES": "40",
                                      "PYTHONFAULTHANDLER": "1"})
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    output = b""
    deadline = time.monotonic() + scaled(timeout)
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 65536)
            except OSError as error:  # EIO: the child closed the terminal
                if error.errno != errno.EIO:
                    raise
                break
            if not chunk:
                break
            output += chunk
            if on_output:
                on_output(output.decode(errors="replace"), fd)
        else:
            os.kill(pid, signal.SIGABRT)
            output += read_for(fd, scaled(5))
            os.kill(pid, signal.SIGKILL)
            raise AssertionError("timed out; output:\n" + output.decode(errors="replace"))
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace")


def read_for(fd: int, seconds: float) -> bytes:
    """What a pseudo-terminal prints within seconds (or until it closes)."""
    output = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    return output


def ctrl_c_once(marker: str) -> Callable[[str, int], None]:
    """An on_output hook that types ^C once the output shows marker."""
    sent = False

    def hook(text: str, fd: int) -> None:
        nonlocal sent
        if not sent and marker in text:
            os.write(fd, b"\x03")
            sent = True
    return hook


def plain(text: str) -> str:
    """Terminal output without colour and cursor control sequences."""
    return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", text)


def test_json_end_to_end(daemon: Daemon) -> None:
    info = forkctl_json(daemon, "info")
    assert info["version"] and info["host"]["live_branch_supported"] is True

    vm = forkctl_json(daemon, "boot", daemon.guest, "--name", "agent", "--mem", "64",
                      "--vcpus", "2", "--boot-args", "pattern=random")
    assert vm["name"] == "agent" and vm["state"] == "RUNNING"
    assert vm["memory_backend"] == "MEMFD" and vm["machine"]["mem_size_mib"] == 64

    events = forkctl_events(daemon, "branch", "agent", "base", "--label", "k=v")
    assert folded(events) == LIVE_PHASES
    done = events[-1]
    assert done["snapshot"]["state"] == "READY" and done["snapshot"]["labels"] == {"k": "v"}
    assert done["figures"]["pause_ns"] > 0
    daemon.verify(done["snapshot"]["path"])
    # Common options go before or after the command.
    assert [s["name"] for s in json.loads(forkctl(daemon, "--json", "snapshots").stdout)] == \
        ["base"]

    spawned = forkctl_json(daemon, "spawn", "base", "-n", "2", "--backend", "memfd",
                           "--prefix", "w")
    assert [v["name"] for v in spawned["vms"]] == ["w-0", "w-1"]
    assert all(v["memory_backend"] == "MEMFD" for v in spawned["vms"])
    assert {v["name"] for v in forkctl_json(daemon, "vms")} == {"agent", "w-0", "w-1"}
    assert forkctl_json(daemon, "vms", "w-1")["source_snapshot"] == "base"
    assert forkctl_json(daemon, "snapshots", "base")["vms_using"] == 2

    full = forkctl_events(daemon, "branch", "w-0", "full", "--mode", "full")
    assert full[-1]["phase"] == "DONE" and full[-1]["snapshot"]["mode"] == "FULL"
    assert full[-1]["snapshot"]["parent_snapshot"] == "base"
    watched = forkctl_events(daemon, "watch", full[0]["branch_id"])
    assert watched[-1]["phase"] == "DONE", "a finished branch replays"

    stopped = forkctl_json(daemon, "stop", "w-0", "w-1")
    assert [v["state"] for v in stopped] == ["STOPPED", "STOPPED"]
    assert forkctl_json(daemon, "rm", "base", "full") == {"deleted": ["base", "full"]}
    assert forkctl_json(daemon, "snapshots") == []
    assert [v["name"] for v in forkctl_json(daemon, "vms")] == ["agent"]


def test_human_output(daemon: Daemon) -> None:
    assert "live branch" in forkctl(daemon, "info").stdout
    assert "booted vm-1 (h)" in forkctl(daemon, "boot", daemon.guest, "--name", "h",
                                        "--mem", "64").stdout
    out = forkctl(daemon, "branch", "h", "snap").stdout
    assert "resumed: the VM was paused for" in out and "snapshot snap READY" in out
    assert re.search(r"NAME\s+STATE.*\n\s*snap\s+READY", forkctl(daemon, "snapshots").stdout)
    assert re.search(r"vm-1\s+h\s+RUNNING", forkctl(daemon, "vms").stdout)
    assert forkctl(daemon, "rm", "snap").stdout.strip() == "deleted snap"


def test_failures_exit_non_zero_with_the_daemons_message(daemon: Daemon) -> None:
    result = forkctl(daemon, "branch", "vm-404", "x", check=False)
    assert result.returncode == 1 and result.stdout == ""
    assert "NOT_FOUND" in result.stderr and "vm-404" in result.stderr
    forkctl(daemon, "boot", daemon.guest, "--name", "v", "--mem", "64")
    forkctl(daemon, "branch", "v", "s", "--mode", "full")
    forkctl(daemon, "spawn", "s", "--prefix", "file")
    # LIVE on FILE memory: refused with the daemon's reason.
    result = forkctl(daemon, "branch", "file-0", "live", check=False)
    assert result.returncode == 1 and "FAILED_PRECONDITION" in result.stderr
    assert "FILE" in result.stderr
    result = forkctl(daemon, "rm", "s", check=False)
    assert result.returncode == 1 and "FAILED_PRECONDITION" in result.stderr
    assert forkctl(daemon, "branch", "v", check=False).returncode == 2  # usage
    absent = subprocess.run(forkctl_command("--addr", daemon.workdir + "/none.sock", "vms"),
                            capture_output=True, text=True, timeout=scaled(60))
    assert absent.returncode == 1 and "UNAVAILABLE" in absent.stderr


def test_progress_display_on_a_terminal(daemon: Daemon) -> None:
    forkctl(daemon, "boot", daemon.guest, "--name", "t", "--mem", "128")
    status, output = run_in_pty(forkctl_command("--addr", daemon.target, "branch", "t", "tty",
                                                "--interval", "0.02"))
    text = plain(output)
    assert status == 0, text
    assert "\x1b[" in output, "drawn with terminal control sequences"
    assert "━" in text and "100%" in text, "a progress bar"
    assert "128.0/128.0 MiB" in text and re.search(r"[\d.]+ [KMG]iB/s", text), "bytes, rate"
    assert re.search(r"pause [\d.]+ [µm]s", text), "the pause window"
    for line in ("started br-", "resumed: the VM was paused for", "snapshot tty READY"):
        assert line in text


def test_ctrl_c_cancels_the_branch(daemon: Daemon) -> None:
    forkctl(daemon, "boot", daemon.guest, "--name", "c", "--mem", "256")
    status, output = run_in_pty(
        forkctl_command("--addr", daemon.target, "branch", "c", "gone"),
        on_output=ctrl_c_once("started br-"))
    text = plain(output)
    assert status == 130, text
    assert "branch cancelled" in text and "no snapshot left" in text
    assert forkctl_json(daemon, "snapshots") == []
    vm = forkctl_json(daemon, "vms", "c")
    assert vm["state"] == "RUNNING" and vm["active_branch_id"] == ""


def test_ctrl_c_with_detach_leaves_the_branch_running(daemon: Daemon) -> None:
    forkctl(daemon, "boot", daemon.guest, "--name", "d", "--mem", "256")
    status, output = run_in_pty(
        forkctl_command("--addr", daemon.target, "branch", "d", "kept", "--detach"),
        on_output=ctrl_c_once("started br-"))
    text = plain(output)
    assert status == 0, text
    match = re.search(r"forkctl watch (br-\d+)", text)
    assert match and "detached" in text
    events = forkctl_events(daemon, "watch", match.group(1))
    assert folded(events) == LIVE_PHASES
    daemon.verify(events[-1]["snapshot"]["path"])
