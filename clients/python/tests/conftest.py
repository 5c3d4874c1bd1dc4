"""A real forkd with the KVM test VMM for the client tests.

ctest sets FORKD_BIN, FORKD_TESTVM and FORKD_GUEST (clients/CMakeLists.txt) and puts the
package, stubs generated, on PYTHONPATH. A missing one fails the tests: nothing is skipped.
"""
from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest

import forkd

# Guard times grow with the machine: the nested-KVM runner emulates the CPU and sets
# FORKD_TIME_SCALE. Tests wait for conditions; none asserts how fast anything is.
TIME_SCALE = max(1.0, float(os.environ.get("FORKD_TIME_SCALE", "1") or 1))


def scaled(seconds: float) -> float:
    """A guard time in seconds, scaled for this machine."""
    return seconds * TIME_SCALE


def required_path(name: str) -> str:
    value = os.environ.get(name, "")
    if not value or not os.path.exists(value):
        pytest.fail(f"${name} must name an existing file (set by ctest; got {value!r})")
    return value


class Daemon:
    """One forkd on a private socket and state directory, launching forkd-testvm."""

    def __init__(self, workdir: str, extra_args: tuple[str, ...] = (),
                 plant: Callable[[str], None] | None = None) -> None:
        self.workdir = workdir
        self.socket_path = os.path.join(workdir, "forkd.sock")
        self.state_dir = os.path.join(workdir, "state")
        self.log_path = os.path.join(workdir, "forkd.log")
        self.testvm = required_path("FORKD_TESTVM")
        self.guest = required_path("FORKD_GUEST")
        if plant is not None:  # lays down snapshots the store loads at start-up
            plant(self.state_dir)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [required_path("FORKD_BIN"), "--listen", self.target, "--state-dir",
                 self.state_dir, "--vmm-binary", self.testvm, "--log-level", "debug",
                 "--timeout-scale", str(math.ceil(TIME_SCALE)), *extra_args],
                stdout=log, stderr=subprocess.STDOUT)
        # Wait for the socket first: a connection refused now would put the channel into
        # reconnect backoff and cost a second.
        deadline = time.monotonic() + scaled(20)
        while not os.path.exists(self.socket_path) and time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail("forkd exited at start-up; log:\n" + self.log())
            time.sleep(0.01)
        with forkd.Client(self.target) as client:
            try:
                client.wait_ready(timeout=scaled(20))
            except forkd.Unavailable:
                pytest.fail("forkd did not come up; log:\n" + self.log())

    @property
    def target(self) -> str:
        return "unix:" + self.socket_path

    def log(self) -> str:
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=scaled(30))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def verify(self, snapshot_path: str) -> None:
        """Asserts that the test VMM's verifier finds the snapshot consistent."""
        result = subprocess.run([self.testvm, "verify", snapshot_path], capture_output=True,
                                text=True, timeout=scaled(120))
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def daemon() -> Iterator[Daemon]:
    with tempfile.TemporaryDirectory(prefix="forkd-client-") as workdir:
        d = Daemon(workdir)
        try:
            yield d
        finally:
            d.stop()


@pytest.fixture
def client(daemon: Daemon) -> Iterator[forkd.Client]:
    with forkd.Client(daemon.target, timeout=scaled(60)) as c:
        yield c


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def forkctl_command(*args: str) -> list[str]:
    """forkctl as ctest runs it: the package on PYTHONPATH, this interpreter."""
    return [sys.executable, "-m", "forkd", *args]
