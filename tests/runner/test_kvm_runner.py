"""scripts/kvm-runner.sh, driven as a user drives it: a real QEMU VM booting Debian 12's kernel.
Its promises: the command runs in the same directory and its output and exit status come back;
a command that never ends, a guest that never boots, a kernel that panics and a package that
cannot be had each end in a clear message and a non-zero exit within the time limit, and no
QEMU process is left behind."""
import os
import subprocess

import pytest

SOURCE_DIR = os.environ["FORKD_SOURCE_DIR"]
RUNNER = os.path.join(SOURCE_DIR, "scripts", "kvm-runner.sh")
SCALE = max(1.0, float(os.environ.get("FORKD_TIME_SCALE", "1") or 1))


def run(*args, guard=600, cwd=None):
    # The runner makes its run directory (and so its QEMU's command line) under $TMPDIR: a
    # directory of this test's own, so no_qemu_left counts this test's QEMUs and never those
    # of other runners on the machine (CI runs two legs side by side).
    env = {**os.environ, "TMPDIR": RUN_DIRS}
    result = subprocess.run(["bash", RUNNER, *args], capture_output=True, text=True,
                            timeout=guard * SCALE, cwd=cwd or SOURCE_DIR, env=env)
    return result


def qemu_processes(run_dir_prefix):
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % pid, "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        if "qemu-system" in cmdline and run_dir_prefix in cmdline:
            found.append(pid)
    return found


RUN_DIRS = ""


@pytest.fixture(autouse=True)
def no_qemu_left(tmp_path_factory):
    global RUN_DIRS
    RUN_DIRS = str(tmp_path_factory.mktemp("runs"))
    yield
    prefix = os.path.join(RUN_DIRS, "forkd-kvm-runner.")
    assert not qemu_processes(prefix), "a QEMU process was left running"


def test_command_runs_in_the_same_directory_with_kvm_and_loopback_and_its_status_comes_back(
        tmp_path):
    loopback = ("import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); "
                "socket.create_connection(s.getsockname()); print('loopback-works')")
    script = ("pwd; test -c /dev/kvm && echo kvm-present; uname -r; /usr/bin/python3 -c \"%s\"; "
              "exit 7" % loopback)
    result = run("--", "sh", "-c", script, cwd=str(tmp_path))
    assert result.returncode == 7, result.stderr
    lines = result.stdout.split()
    assert lines[0] == str(tmp_path)
    assert "kvm-present" in lines
    assert lines[2].endswith("-amd64")
    assert "loopback-works" in lines
    assert "kernel " + lines[2] in result.stderr


def test_a_command_that_never_ends_is_stopped_at_the_timeout():
    result = run("--timeout", "5", "--", "sleep", "100000")
    assert result.returncode == 124, result.stderr
    assert "did not finish within 5 s" in result.stderr


def test_a_guest_that_does_not_boot_in_time_is_reported():
    result = run("--boot-timeout", "1", "--", "true")
    assert result.returncode == 125, result.stderr
    assert "did not start the command within 1 s" in result.stderr


def test_a_kernel_that_panics_is_reported():
    result = run("--kernel-arg", "rdinit=/no/such/init", "--", "true")
    assert result.returncode == 125, result.stderr
    assert "panicked" in result.stderr
    assert "last lines of the guest console" in result.stderr


def test_a_package_that_cannot_be_had_is_named():
    result = run("--kernel-package", "linux-image-0.0.0-no-such-amd64", "--", "true")
    assert result.returncode == 2, result.stderr
    assert "cannot download the Debian package linux-image-0.0.0-no-such-amd64" in result.stderr


def test_bad_options_are_usage_errors():
    for args in (["--timeout", "0", "--", "true"], ["--mem", "lots", "--", "true"], [],
                 ["--no-such-option", "--", "true"]):
        result = run(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("kvm-runner: "), result.stderr
