"""Starts and stops a real forkd for integration tests, and gives typed stubs to talk to it.

Paths come from the environment ctest sets: FORKD_BIN (the daemon) and FORKD_PROTO_PYTHON (the
stubs generated from proto/ at build time).
"""
import http.client
import json
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.environ["FORKD_PROTO_PYTHON"])

import grpc  # noqa: E402
from forkd.v1 import forkd_pb2, forkd_pb2_grpc  # noqa: E402,F401
from health.v1 import health_pb2, health_pb2_grpc  # noqa: E402,F401

FORKD_BIN = os.environ["FORKD_BIN"]

# Guard times grow with the machine: the nested-KVM runner emulates the CPU and sets
# FORKD_TIME_SCALE. Tests wait for conditions and never assert how fast anything is.
TIME_SCALE = max(1.0, float(os.environ.get("FORKD_TIME_SCALE", "1") or 1))


def scaled(seconds):
    """A guard time in seconds, scaled for this machine."""
    return seconds * TIME_SCALE


class _ScaledStub:
    """A generated stub whose calls get their timeout= guard scaled for this machine."""

    def __init__(self, stub):
        self._stub = stub

    def __getattr__(self, name):
        method = getattr(self._stub, name)

        def call(*args, **kwargs):
            if kwargs.get("timeout") is not None:
                kwargs["timeout"] = scaled(kwargs["timeout"])
            return method(*args, **kwargs)

        return call


class Daemon:
    """One forkd process on a private socket and state directory."""

    def __init__(self, *extra_args, workdir=None, start=True):
        self._tmp = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="forkd-it-")
            workdir = self._tmp.name
        self.workdir = workdir
        self.socket_path = os.path.join(workdir, "forkd.sock")
        self.state_dir = os.path.join(workdir, "state")
        self.log_path = os.path.join(workdir, "forkd.log")
        self.args = [FORKD_BIN, "--listen", "unix:" + self.socket_path,
                     "--state-dir", self.state_dir, "--log-level", "debug",
                     "--timeout-scale", str(math.ceil(TIME_SCALE)), *extra_args]
        self.process = None
        self.channel = None
        if start:
            self.start()

    @property
    def target(self):
        return "unix:" + self.socket_path

    def start(self, ready_timeout=20.0):
        self._log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.args, stdout=self._log, stderr=subprocess.STDOUT)
        self.channel = grpc.insecure_channel(self.target)
        try:
            # Blocks until the daemon answers (or fails clearly if it exited).
            grpc.channel_ready_future(self.channel).result(timeout=scaled(ready_timeout))
        except grpc.FutureTimeoutError:
            raise AssertionError("forkd did not come up; log:\n" + self.log())
        return self

    def forkd(self):
        return _ScaledStub(forkd_pb2_grpc.ForkdStub(self.channel))

    def health(self):
        return _ScaledStub(health_pb2_grpc.HealthStub(self.channel))

    def log(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def signal(self, signum=signal.SIGTERM):
        self.process.send_signal(signum)

    def wait(self, timeout=30.0):
        return self.process.wait(timeout=scaled(timeout))

    def stop(self):
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=scaled(30))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.process is not None:
            self._log.close()

    def cleanup(self):
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()


def run_forkd(*args, timeout=20.0):
    """Runs forkd to completion (for flags that make it exit) and returns the result."""
    return subprocess.run([FORKD_BIN, *args], capture_output=True, text=True,
                          timeout=scaled(timeout))


def wait_until(predicate, timeout, what):
    timeout = scaled(timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError("timed out after %.1fs waiting for %s" % (timeout, what))


FORKD_TESTVM = os.environ.get("FORKD_TESTVM", "")
FORKD_GUEST = os.environ.get("FORKD_GUEST", "")


class VmDaemon(Daemon):
    """A forkd that launches the test VMM for its VMs."""

    def __init__(self, *extra_args, **kwargs):
        super().__init__("--vmm-binary", FORKD_TESTVM, *extra_args, **kwargs)

    def boot(self, mem_mib=64, vcpus=1, workload="pattern=random", name="", timeout=60):
        request = forkd_pb2.BootRequest(
            name=name, kernel_image_path=FORKD_GUEST, boot_args=workload,
            machine=forkd_pb2.MachineConfig(vcpu_count=vcpus, mem_size_mib=mem_mib))
        return self.forkd().Boot(request, timeout=timeout)

    def branch(self, vm_id, name, mode=forkd_pb2.BRANCH_MODE_LIVE, timeout=120, **kwargs):
        """Runs a branch to its end; returns the list of events."""
        request = forkd_pb2.BranchRequest(vm_id=vm_id, snapshot_name=name, mode=mode, **kwargs)
        return list(self.forkd().Branch(request, timeout=timeout))


def verify_snapshot(path):
    """Runs the test VMM's verifier on a snapshot directory."""
    result = subprocess.run([FORKD_TESTVM, "verify", path], capture_output=True, text=True,
                            timeout=scaled(120))
    return result.returncode, result.stdout + result.stderr


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost")
        self._path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self._path)


def vmm_get(vm, path="/"):
    """The VMM's own description of itself (the test VMM's GET /), as a dict; or another GET's
    answer (GET /progress/<since_ns>: the guest's progress reports)."""
    connection = _UnixHTTPConnection(vm.api_socket_path)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        assert response.status == 200, response.status
        return json.loads(response.read())
    finally:
        connection.close()


def vmm_set_state(vm, state):
    """PATCH /vm {"state": state} ("Paused" or "Resumed") on the VM's VMM (the test VMM's API,
    as Firecracker's): forkd has no call to resume a fork spawned paused."""
    connection = _UnixHTTPConnection(vm.api_socket_path)
    try:
        connection.request("PATCH", "/vm", body=json.dumps({"state": state}),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        body = response.read()
        assert response.status == 204, (response.status, body)
    finally:
        connection.close()


NR_HUGEPAGES = "/proc/sys/vm/nr_hugepages"
FREE_HUGEPAGES = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages"
RESERVED_HUGEPAGES = "/sys/kernel/mm/hugepages/hugepages-2048kB/resv_hugepages"


def read_int(path):
    with open(path) as f:
        return int(f.read())


def write_int(path, value):
    with open(path, "w") as f:
        f.write("%d\n" % value)


def reserve_huge_pages(free):
    """Makes `free` 2 MiB pages free on top of those in use (vm.nr_hugepages); returns the
    earlier setting, for write_int(NR_HUGEPAGES, it) afterwards. Raises when the host cannot
    give them (memory too small or too fragmented)."""
    before = read_int(NR_HUGEPAGES)
    want = before - read_int(FREE_HUGEPAGES) + free
    write_int(NR_HUGEPAGES, want)
    if read_int(NR_HUGEPAGES) < want:
        got = read_int(NR_HUGEPAGES)
        write_int(NR_HUGEPAGES, before)
        raise RuntimeError("could not reserve %d huge pages (got %d)" % (want, got))
    return before
