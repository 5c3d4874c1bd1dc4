"""The forkd daemon skeleton end to end: a real forkd on a temporary Unix socket, called through
generated gRPC stubs."""
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap

import grpc
import pytest

from forkd_harness import (Daemon, forkd_pb2, health_pb2, run_forkd, scaled, wait_until,
                           FORKD_BIN)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_get_info_reports_version_and_probed_host(daemon):
    info = daemon.forkd().GetInfo(forkd_pb2.GetInfoRequest(), timeout=10)
    assert "forkd " + info.version == run_forkd("--version").stdout.strip()
    assert info.pid == daemon.process.pid
    assert info.state_dir == daemon.state_dir
    assert info.host.kernel_release == os.uname().release
    # These machines have KVM and userfaultfd write-protect: anything else is a failure.
    assert info.host.kvm_usable, info.host.kvm_error
    assert info.host.kvm_api_version == 12
    assert info.host.userfaultfd_usable, info.host.userfaultfd_error
    assert info.host.userfaultfd_wp_anonymous and info.host.userfaultfd_wp_shmem
    assert info.host.live_branch_supported
    with open("/proc/sys/vm/unprivileged_userfaultfd") as f:
        assert info.host.unprivileged_userfaultfd == int(f.read())


def test_health_check_serving(daemon):
    health = daemon.health()
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
    named = health_pb2.HealthCheckRequest(service="forkd.v1.Forkd")
    assert health.Check(named, timeout=10).status == SERVING
    with pytest.raises(grpc.RpcError) as error:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_socket_is_private(daemon):
    mode = os.stat(daemon.socket_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_unknown_method_is_unimplemented_not_a_hang(daemon):
    call = daemon.channel.unary_unary("/forkd.v1.Forkd/NoSuchMethod")
    with pytest.raises(grpc.RpcError) as error:
        call(b"", timeout=10)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "/forkd.v1.Forkd/NoSuchMethod" in error.value.details()
    other = daemon.channel.unary_stream("/other.Service/Stream")
    with pytest.raises(grpc.RpcError) as error:
        list(other(b"", timeout=10))
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_malformed_request_is_invalid_argument_and_daemon_serves_on(daemon):
    raw = daemon.channel.unary_unary("/forkd.v1.Forkd/GetInfo")
    for garbage in (b"\xff\xff\xff", b"\x0a\x64\x01", b"\x08" + b"\xff" * 11):
        with pytest.raises(grpc.RpcError) as error:
            raw(garbage, timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "forkd.v1.GetInfoRequest" in error.value.details()
    assert daemon.forkd().GetInfo(forkd_pb2.GetInfoRequest(), timeout=10).version


def test_oversized_request_is_refused_and_daemon_serves_on(daemon):
    raw = daemon.channel.unary_unary("/forkd.v1.Forkd/GetInfo")
    with pytest.raises(grpc.RpcError) as error:
        raw(b"\x00" * (5 << 20), timeout=20)
    assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert daemon.forkd().GetInfo(forkd_pb2.GetInfoRequest(), timeout=10).version


def test_deadline_ends_a_long_call(daemon):
    watch = daemon.health().Watch(health_pb2.HealthCheckRequest(), timeout=0.5)
    assert next(watch).status == SERVING
    with pytest.raises(grpc.RpcError) as error:
        next(watch)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: "Health/Watch -> 1" in daemon.log(), 10, "the server to end the call")


def test_cancelled_call_is_released(daemon):
    watch = daemon.health().Watch(health_pb2.HealthCheckRequest())
    assert next(watch).status == SERVING
    watch.cancel()
    # The server's call thread notices the cancel and finishes the call.
    wait_until(lambda: "Health/Watch -> 1" in daemon.log(), 10, "the server to end the call")
    assert daemon.forkd().GetInfo(forkd_pb2.GetInfoRequest(), timeout=10).version
    # With nothing running, shutdown needs no grace period and cancels nothing.
    daemon.signal(signal.SIGTERM)
    assert daemon.wait() == 0
    assert "cancelling them" not in daemon.log()


def test_client_that_disappears_mid_call(daemon):
    client = textwrap.dedent("""
        import sys, grpc
        sys.path.insert(0, %r)
        from health.v1 import health_pb2, health_pb2_grpc
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(%r))
        stream = stub.Watch(health_pb2.HealthCheckRequest())
        next(stream)
        print("watching", flush=True)
        sys.stdin.read()
        """ % (os.environ["FORKD_PROTO_PYTHON"], daemon.target))
    proc = subprocess.Popen([sys.executable, "-c", client], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "watching"
    finally:
        proc.kill()
        proc.wait()
    wait_until(lambda: "Health/Watch -> 1" in daemon.log(), 10, "the server to drop the call")
    assert daemon.health().Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING


def test_sigterm_during_a_call(daemon):
    watch = daemon.health().Watch(health_pb2.HealthCheckRequest())
    assert next(watch).status == SERVING
    daemon.signal(signal.SIGTERM)
    # Running calls see the shutdown, then are cancelled when the grace period ends.
    assert next(watch).status == NOT_SERVING
    with pytest.raises(grpc.RpcError) as error:
        next(watch)
    assert error.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert daemon.wait() == 0
    log = daemon.log()
    assert "grace period: cancelling them" in log
    assert "stopped" in log
    assert not os.path.exists(daemon.socket_path)


def test_sigint_stops_an_idle_daemon(daemon):
    daemon.signal(signal.SIGINT)
    assert daemon.wait() == 0


def test_second_daemon_on_the_same_state_dir_refuses(daemon):
    other = os.path.join(daemon.workdir, "other.sock")
    result = run_forkd("--listen", "unix:" + other, "--state-dir", daemon.state_dir)
    assert result.returncode != 0
    assert "in use by another forkd (pid %d)" % daemon.process.pid in result.stderr
    assert daemon.health().Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING


def test_second_daemon_on_the_same_socket_refuses(daemon):
    result = run_forkd("--listen", daemon.target,
                       "--state-dir", os.path.join(daemon.workdir, "state2"))
    assert result.returncode != 0
    assert "already listening on " + daemon.socket_path in result.stderr
    assert daemon.health().Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING


def test_stale_socket_is_replaced(tmp_path):
    stale = tmp_path / "forkd.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()  # bound, never listening: what a crashed daemon leaves behind
    d = Daemon(workdir=str(tmp_path))
    try:
        assert d.health().Check(health_pb2.HealthCheckRequest(), timeout=10).status == SERVING
    finally:
        d.cleanup()


def test_socket_path_that_is_a_file_is_not_replaced(tmp_path):
    path = tmp_path / "forkd.sock"
    path.write_text("precious")
    result = run_forkd("--listen", "unix:" + str(path), "--state-dir", str(tmp_path / "s"))
    assert result.returncode != 0
    assert "is not a socket" in result.stderr
    assert path.read_text() == "precious"


def free_tcp_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_tcp_needs_tls_or_explicit_insecure(tmp_path):
    port = free_tcp_port()
    result = run_forkd("--listen", "127.0.0.1:%d" % port, "--state-dir", str(tmp_path / "s"))
    assert result.returncode != 0
    assert "--insecure-tcp" in result.stderr


def test_insecure_tcp_when_asked(tmp_path):
    port = free_tcp_port()
    proc = subprocess.Popen([FORKD_BIN, "--listen", "tcp:127.0.0.1:%d" % port, "--insecure-tcp",
                             "--state-dir", str(tmp_path / "s")], stderr=subprocess.PIPE)
    try:
        channel = grpc.insecure_channel("127.0.0.1:%d" % port)
        grpc.channel_ready_future(channel).result(timeout=scaled(20))
        stub = forkd_pb2.DESCRIPTOR.services_by_name["Forkd"]
        assert stub.methods_by_name["GetInfo"]
        from forkd.v1 import forkd_pb2_grpc
        info = forkd_pb2_grpc.ForkdStub(channel).GetInfo(forkd_pb2.GetInfoRequest(),
                                                         timeout=scaled(10))
        assert info.pid == proc.pid
        channel.close()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=scaled(30)) == 0


def test_bad_flags_exit_with_usage_error():
    result = run_forkd("--max-branches", "zero")
    assert result.returncode == 2
    assert "invalid value 'zero' for --max-branches" in result.stderr
    result = run_forkd("--help")
    assert result.returncode == 0 and "--listen" in result.stdout
