"""forkctl as people use it, against a real forkd that needs no KVM: piped tables keep every
column, --json errors are JSON on stdout, bad --timeout values are usage errors, positional
arguments have help."""
from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator

import pytest

from conftest import Daemon, forkctl_command, scaled

LONG = "a-rather-long-snapshot-name-that-fills-most-of-the-sixty-four-c"


def _plant(state_dir: str, names: list[str]) -> None:
    """Snapshots as forkd writes them (empty data files), so the listing has rows."""
    root = os.path.join(state_dir, "snapshots")
    os.makedirs(root, mode=0o700)
    for name in names:
        os.mkdir(os.path.join(root, name), 0o700)
        meta = {
            "format_version": 1, "name": name, "source_vm": {"id": "vm-1", "name": "src"},
            "parent_snapshot": "", "mode": "live",
            "machine": {"vcpu_count": 1, "mem_size_mib": 16}, "memory_bytes": 0,
            "vmstate_bytes": 0, "page_size": 4096, "regions": [],
            "figures": {k: 1 for k in (
                "pause_ns", "arm_ns", "rearm_ns", "rearmed_pages", "vmstate_ns", "copy_ns",
                "publish_ns", "total_ns", "pages_by_fault", "pages_by_bulk", "bytes_copied",
                "pause_request_ns", "resume_request_ns")},
            "vmm": {"binary": "/usr/bin/firecracker", "version": "1.12.0"},
            "created_at_unix_ms": 1764640000000, "labels": {}}
        with open(os.path.join(root, name, "snapshot.json"), "w") as f:
            json.dump(meta, f)
        for data in ("vmstate", "memory.bin"):
            open(os.path.join(root, name, data), "w").close()


@pytest.fixture
def planted() -> Iterator[Daemon]:
    with tempfile.TemporaryDirectory(prefix="forkd-usage-") as workdir:
        os.mkdir(os.path.join(workdir, "state"), 0o700)
        _plant(os.path.join(workdir, "state"), [LONG, "short"])
        d = Daemon(workdir)
        try:
            yield d
        finally:
            d.stop()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, COLUMNS="80")
    return subprocess.run(forkctl_command(*args), capture_output=True, text=True, env=env,
                          timeout=scaled(60))


def test_piped_table_keeps_every_column_without_trailing_spaces(planted: Daemon) -> None:
    result = run("--addr", planted.target, "snapshots")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "FROM", "PARENT", "MODE", "SIZE", "PAUSE",
                                "USED", "BY", "CREATED"]
    assert any(line.startswith(LONG + " ") for line in lines), result.stdout
    assert all(line == line.rstrip() for line in lines), repr(result.stdout)
    assert all(not line.endswith("…") for line in lines)


def test_json_errors_are_json_on_stdout(planted: Daemon) -> None:
    result = run("--addr", planted.target, "--json", "snapshots", "no-such-snapshot")
    assert result.returncode == 1
    error = json.loads(result.stdout)["error"]
    assert error["code"] == "NOT_FOUND" and "no-such-snapshot" in error["message"]
    assert "NOT_FOUND" in result.stderr


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_bad_timeout_is_a_usage_error(value: str) -> None:
    result = run("--timeout", value, "info")
    assert result.returncode == 2
    assert "--timeout" in result.stderr


def test_positional_arguments_have_help() -> None:
    for command, argument in (("spawn", "SNAPSHOT"), ("snapshots", "SNAPSHOT"), ("stop", "VM"),
                              ("rm", "SNAPSHOT"), ("branch", "VM")):
        text = run(command, "--help").stdout
        block = text.split("positional arguments:")[1].split("options:")[0]
        line = next(line for line in block.splitlines() if line.strip().startswith(argument))
        assert len(line.split()) > 1, f"{command} {argument} has no help:\n{text}"


def test_one_default_timeout() -> None:
    import forkd
    assert forkd.Client("unix:/nonexistent").timeout == forkd.DEFAULT_TIMEOUT
    for command in ("info", "branch", "stop"):
        text = " ".join(run(command, "--help").stdout.split())
        assert f"(default {forkd.DEFAULT_TIMEOUT:g})" in text, text


def test_cancelled_branch_is_confirmed_within_the_one_timeout() -> None:
    from forkd import cli
    deadlines = []

    class Client:
        timeout = 42.0

        def watch(self, branch_id: str | None = None, **kwargs: object) -> Iterator[object]:
            deadlines.append(kwargs.get("timeout"))
            return iter(())

    class Branch:
        branch_id, snapshot_name = "br-1", "s"

        def cancel(self) -> None:
            pass

    code = cli.interrupted(Client(), Branch(), cli.Output(False),  # type: ignore[arg-type]
                           detach=False)
    assert code == cli.EXIT_INTERRUPTED
    assert deadlines == [42.0]


@pytest.mark.parametrize("flag,value,expected", [
    ("--drive", "id=rootfs", "--drive needs id=ID,path=PATH"),
    ("--drive", "id=rootfs,path=/x,rw", "unknown option 'rw'"),
    ("--net", "id=eth0", "--net needs id=ID,tap=TAP"),
    ("--vsock", "cid=three,path=/v.sock", "--vsock needs cid=N,path=PATH"),
])
def test_bad_device_options_are_usage_errors(flag: str, value: str, expected: str) -> None:
    result = run("boot", "/guest.bin", flag, value)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr


def test_device_options_reach_the_daemon_which_names_a_bad_field(planted: Daemon) -> None:
    result = run("--addr", planted.target, "boot", "/guest.bin",
                 "--drive", "id=rootfs,path=/root.img,ro,root",
                 "--drive", "id=data,path=relative.img",
                 "--net", "id=eth0,tap=tap0,mac=06:00:ac:10:00:02",
                 "--vsock", "cid=3,path=/v.sock")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "drives[1].path_on_host" in result.stderr


@pytest.mark.parametrize("flag,value,expected", [
    ("--tap-pattern", "eth0", "--tap-pattern needs IFACE=PATTERN"),
    ("--tap-pattern", "=tap{i}", "--tap-pattern needs IFACE=PATTERN"),
    ("--vsock-pattern", "", "--vsock-pattern needs a path"),
])
def test_bad_spawn_patterns_are_usage_errors(flag: str, value: str, expected: str) -> None:
    result = run("spawn", "short", "-n", "2", flag, value)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr


@pytest.mark.parametrize("args,field", [
    (("--tap-pattern", "eth0=tap0"), "network_overrides[0].host_dev_name 'tap0': 2 forks"),
    (("--tap-pattern", "eth0=tap{i}", "--vsock-pattern", "v-{i}.sock"),
     "vsock_override.uds_path must be an absolute path"),
])
def test_spawn_patterns_reach_the_daemon_which_names_a_bad_field(
        planted: Daemon, args: tuple[str, ...], field: str) -> None:
    result = run("--addr", planted.target, "spawn", "short", "-n", "2", *args)
    assert result.returncode == 1, result.stdout + result.stderr
    assert field in result.stderr
