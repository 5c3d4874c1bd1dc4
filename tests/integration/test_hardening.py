"""forkd under load and abuse (no KVM needed): bounded calls, request deadlines, listen addresses,
signals, oversized requests, mutual TLS. The real daemon over real sockets."""
import os
import signal
import subprocess
import threading
import time

import grpc
import pytest

from forkd_harness import Daemon, forkd_pb2, health_pb2, run_forkd, scaled, wait_until
from h2flood import Flood


def proc_status(pid, field):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def threads(daemon):
    return proc_status(daemon.process.pid, "Threads")


class _Held:
    """A client-streaming call whose request never comes until released: an idle stream made
    with the real gRPC client."""

    def __init__(self, channel, path="/forkd.v1.Forkd/GetInfo", timeout=30):
        self.release = threading.Event()
        method = channel.stream_unary(path)
        self.future = method.future(self._requests(), timeout=scaled(timeout))

    def _requests(self):
        self.release.wait(scaled(60))
        return
        yield  # noqa: unreachable: makes this a generator that sends nothing

    def code(self, timeout=30):
        try:
            self.future.result(timeout=scaled(timeout))
            return grpc.StatusCode.OK, ""
        except grpc.RpcError as error:
            return error.code(), error.details()

    def close(self):
        self.release.set()
        self.future.cancel()


@pytest.fixture
def plain(tmp_path):
    d = Daemon("--shutdown-grace-ms", "1000", workdir=str(tmp_path), start=False)
    yield d
    d.cleanup()


def get_info(daemon, timeout=10):
    return daemon.forkd().GetInfo(forkd_pb2.GetInfoRequest(), timeout=timeout)


# 1. Bounded concurrency.

def test_idle_stream_flood_costs_no_threads_and_others_are_served(plain):
    plain.start()
    baseline = threads(plain)
    flood = Flood(plain.socket_path)
    try:
        flood.open_idle(3000)
        time.sleep(scaled(1))
        assert threads(plain) < baseline + 16, "an idle stream costs a thread"
        assert get_info(plain).pid == plain.process.pid
    finally:
        flood.close()
    assert get_info(plain).pid == plain.process.pid


def test_rapid_reset_flood_leaves_the_daemon_serving(plain):
    plain.start()
    baseline = threads(plain)
    flood = Flood(plain.socket_path)
    try:
        flood.rapid_reset(20000)
        assert get_info(plain, timeout=30).pid == plain.process.pid
        assert threads(plain) < baseline + 16
    finally:
        flood.close()
    assert get_info(plain).pid == plain.process.pid


def test_calls_waiting_for_their_request_are_bounded(plain):
    # --max-calls 1 + --max-streams 1: at most 4 x 2 calls may wait for their request; beyond
    # that the oldest waiting call is ended, and callers that send their request are served.
    plain.args += ["--max-calls", "1", "--max-streams", "1",
                   "--request-timeout-ms", str(int(scaled(30000)))]
    plain.start()
    flood = Flood(plain.socket_path)
    try:
        flood.open_idle(8)
        time.sleep(scaled(0.5))
        assert flood.resets_received == 0
        assert get_info(plain).pid == plain.process.pid
        wait_until(lambda: flood.resets_received >= 1, 10, "the oldest idle call to be ended")
        flood.open_idle(20)
        wait_until(lambda: flood.resets_received >= 20, 10, "older idle calls to be ended")
        assert get_info(plain).pid == plain.process.pid
    finally:
        flood.close()


def _refused(daemon):
    try:
        get_info(daemon, timeout=5)
        return False
    except grpc.RpcError as error:
        return error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def _answers(daemon):
    try:
        get_info(daemon, timeout=5)
        return True
    except grpc.RpcError:
        return False


def test_request_that_never_arrives_times_out(plain):
    plain.args += ["--request-timeout-ms", "300"]
    plain.start()
    held = _Held(plain.channel, timeout=60)
    try:
        code, details = held.code(timeout=30)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED, details
        assert "request" in details
    finally:
        held.close()


def test_streams_cannot_starve_unary_calls(plain):
    plain.args += ["--max-streams", "2"]
    plain.start()
    watch = plain.health().Watch
    streams = [watch(health_pb2.HealthCheckRequest(), timeout=60) for _ in range(2)]
    try:
        for s in streams:
            next(s)
        with pytest.raises(grpc.RpcError) as refused:
            next(watch(health_pb2.HealthCheckRequest(), timeout=10))
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "--max-streams" in refused.value.details()
        for _ in range(5):
            assert get_info(plain).pid == plain.process.pid
    finally:
        for s in streams:
            s.cancel()


def test_sigterm_during_idle_flood_exits_cleanly(plain):
    plain.start()
    flood = Flood(plain.socket_path)
    try:
        flood.open_idle(500)
        time.sleep(scaled(0.5))
        plain.signal(signal.SIGTERM)
        assert plain.wait(timeout=30) == 0
    finally:
        flood.close()
    assert not os.path.exists(plain.socket_path)
