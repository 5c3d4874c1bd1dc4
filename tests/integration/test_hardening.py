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
    # 3,000 calls whose request never comes, on 47 connections (one connection may open 64
    # streams at once). At most 4 x (--max-calls 64 + --max-streams 32) = 384 calls may wait
    # and each newer one ends the oldest, so once 3,000 - 384 of them have been ended forkd
    # has taken in every call and holds the last 384, each of which would cost a thread if
    # waiting for a request did. The request deadline is stretched so that only evictions end
    # calls.
    plain.args += ["--request-timeout-ms", str(int(scaled(600000)))]
    plain.start()
    baseline = threads(plain)
    floods = [Flood(plain.socket_path) for _ in range(47)]
    try:
        for i, flood in enumerate(floods):
            flood.open_idle(min(64, 3000 - 64 * i))
        evicted = 3000 - 4 * (64 + 32)
        ended = lambda: sum(flood.resets_received for flood in floods)  # noqa: E731
        wait_until(lambda: ended() >= evicted, 30, "forkd to take in every idle call")
        assert ended() == evicted
        assert threads(plain) < baseline + 16, "an idle stream costs a thread"
        assert get_info(plain).pid == plain.process.pid
    finally:
        for flood in floods:
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


def test_rapid_reset_flood_does_not_stall_other_callers(plain):
    # gRPC does its I/O on the threads that wait on a polling completion queue. While the
    # dispatcher was that thread, a GetInfo waited behind the flood's HEADERS+RST_STREAM pairs
    # and at most two were answered while the flood lasted (the rest hit their deadline); now
    # the dispatcher never polls and the flood holds one of two I/O threads. This counts calls
    # answered before the flood is through, not how long they took.
    plain.start()
    flood = Flood(plain.socket_path)
    sender = threading.Thread(target=flood.rapid_reset, args=(50000,))
    answered = 0
    try:
        sender.start()
        while sender.is_alive():
            assert get_info(plain, timeout=60).pid == plain.process.pid
            answered += sender.is_alive()
    finally:
        sender.join()
        flood.close()
    assert answered >= 10, "only %d GetInfo answered during the flood" % answered


def test_calls_waiting_for_their_request_are_bounded(plain):
    # --max-calls 1 + --max-streams 1: at most 4 x 2 calls may wait for their request; beyond
    # that the oldest waiting call is ended, and callers that send their request are served.
    plain.args += ["--max-calls", "1", "--max-streams", "1",
                   "--request-timeout-ms", str(int(scaled(30000)))]
    plain.start()
    flood = Flood(plain.socket_path)
    try:
        # The ninth ends the first: once it has, forkd has taken in all nine, and the eight
        # that may wait are still waiting.
        flood.open_idle(9)
        wait_until(lambda: flood.resets_received >= 1, 10, "the oldest idle call to be ended")
        assert flood.resets_received == 1
        assert get_info(plain).pid == plain.process.pid
        wait_until(lambda: flood.resets_received >= 2, 10, "GetInfo to end the next oldest")
        # Seven wait now: the first of 20 more fills the eighth place, the other 19 each end
        # an older one.
        flood.open_idle(20)
        wait_until(lambda: flood.resets_received >= 21, 10, "older idle calls to be ended")
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


# 3. Listen addresses.

def run_until_exit(args, timeout=10):
    """Runs forkd expecting it to refuse to start; a forkd that serves instead is stopped."""
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = process.communicate(timeout=scaled(timeout))
    except subprocess.TimeoutExpired:
        process.terminate()
        output, _ = process.communicate()
        raise AssertionError("forkd started instead of refusing; output:\n" + output)
    return process.returncode, output


def forkd_args(tmp_path, listen, *extra):
    from forkd_harness import FORKD_BIN
    return [FORKD_BIN, "--listen", listen, "--state-dir", str(tmp_path / "state"), *extra]


@pytest.mark.parametrize("listen", ["unix:", "unix-abstract:forkd-test", "unix:@forkd-test"])
def test_empty_and_abstract_unix_names_are_refused(tmp_path, listen):
    code, output = run_until_exit(forkd_args(tmp_path, listen))
    assert code != 0
    assert "any local user can reach" in output, output


def test_abstract_socket_allowed_only_by_its_flag(tmp_path):
    name = "forkd-test-%d" % os.getpid()
    d = Daemon("--allow-abstract-socket", workdir=str(tmp_path), start=False)
    d.args[d.args.index("--listen") + 1] = "unix-abstract:" + name
    d.socket_path = "\0" + name
    try:
        d.process = subprocess.Popen(d.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        channel = grpc.insecure_channel("unix-abstract:" + name)
        grpc.channel_ready_future(channel).result(timeout=scaled(20))
        channel.close()
    finally:
        d.process.terminate()
        d.process.wait(timeout=scaled(30))


def test_socket_path_too_long_is_refused_with_its_length(tmp_path):
    path = str(tmp_path / ("s" * 120)) + ".sock"
    code, output = run_until_exit(forkd_args(tmp_path, "unix:" + path))
    assert code != 0
    assert "%d bytes" % len(path) in output, output


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_second_forkd_on_the_same_tcp_port_is_refused(tmp_path):
    listen = "127.0.0.1:%d" % _free_port()
    first = Daemon("--insecure-tcp", workdir=str(tmp_path / "a"), start=False)
    os.makedirs(first.workdir)
    first.args[first.args.index("--listen") + 1] = listen
    first.process = subprocess.Popen(first.args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        channel = grpc.insecure_channel(listen)
        grpc.channel_ready_future(channel).result(timeout=scaled(20))
        channel.close()
        code, output = run_until_exit(forkd_args(tmp_path, listen, "--insecure-tcp"))
        assert code != 0
        assert "cannot listen on %s: Address already in use" % listen in output, output
    finally:
        first.process.terminate()
        first.process.wait(timeout=scaled(30))


def test_cannot_listen_names_the_reason(tmp_path):
    code, output = run_until_exit(forkd_args(tmp_path, "192.0.2.1:1", "--insecure-tcp"))
    assert code != 0
    assert "cannot listen on 192.0.2.1:1: Cannot assign requested address" in output, output


# 7. Signals and memory.

@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGQUIT])
def test_hup_and_quit_stop_the_daemon_cleanly(plain, signum):
    plain.start()
    assert get_info(plain).pid == plain.process.pid
    plain.signal(signum)
    assert plain.wait(timeout=30) == 0, plain.log()
    assert not os.path.exists(plain.socket_path)
    assert "stopped" in plain.log()


def test_oversized_requests_are_cut_off_while_they_arrive(plain):
    # gRPC checks --max-message-bytes only once a message is whole, and grants flow-control
    # window up to the length a message declares: without a bound on receive memory each of
    # these streams is taken in full (400 MiB buffered) and only then refused. The request
    # deadline is stretched so that only the memory bound can end them early.
    plain.args += ["--request-timeout-ms", str(int(scaled(600000)))]
    plain.start()
    declared = 100 << 20
    results = []

    def send():
        flood = Flood(plain.socket_path)
        try:
            results.append(flood.send_large(declared, stall_timeout=scaled(60)))
        finally:
            flood.close()

    senders = [threading.Thread(target=send) for _ in range(4)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    assert len(results) == 4
    for sent, ended in results:
        assert ended, "forkd neither took nor ended an oversized request"
        assert sent < declared, "forkd took a 100 MiB request whole before refusing it"
    # Under memory pressure gRPC also closes idle connections (the test's own channel among
    # them); a client that reconnects is served.
    wait_until(lambda: _answers(plain), 10, "forkd to answer after the oversized requests")


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM])
def test_other_deadly_signals_are_ignored(plain, signum):
    plain.start()
    plain.signal(signum)
    wait_until(lambda: "ignored" in plain.log(), 10, "the signal to be logged")
    assert plain.process.poll() is None
    assert get_info(plain).pid == plain.process.pid


# 2. Mutual TLS.

def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True,
                   timeout=scaled(60))


def _issue(cwd, name, ca, extensions=None):
    _openssl("req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", name + ".key",
             "-out", name + ".csr", "-subj", "/CN=" + name, cwd=cwd)
    args = ["x509", "-req", "-in", name + ".csr", "-CA", ca + ".crt", "-CAkey", ca + ".key",
            "-CAcreateserial", "-days", "2", "-out", name + ".crt"]
    if extensions:
        with open(os.path.join(cwd, name + ".ext"), "w") as f:
            f.write(extensions)
        args += ["-extfile", name + ".ext"]
    _openssl(*args, cwd=cwd)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a server certificate for 127.0.0.1, a client certificate from the CA and one from
    another CA, all made by openssl."""
    d = str(tmp_path_factory.mktemp("pki"))
    for ca in ("ca", "rogue-ca"):
        _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca + ".key",
                 "-out", ca + ".crt", "-days", "2", "-subj", "/CN=" + ca, cwd=d)
    _issue(d, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _issue(d, "client", "ca")
    _issue(d, "rogue", "rogue-ca")

    def read(name):
        with open(os.path.join(d, name), "rb") as f:
            return f.read()
    return d, read


def _tls_daemon(tmp_path, pki_dir, *extra):
    listen = "127.0.0.1:%d" % _free_port()
    args = forkd_args(tmp_path, listen, "--tls-cert", os.path.join(pki_dir, "server.crt"),
                      "--tls-key", os.path.join(pki_dir, "server.key"), *extra)
    return listen, args


def _tls_get_info(listen, read, client=None):
    credentials = grpc.ssl_channel_credentials(
        root_certificates=read("ca.crt"),
        private_key=read(client + ".key") if client else None,
        certificate_chain=read(client + ".crt") if client else None)
    with grpc.secure_channel(listen, credentials) as channel:
        from forkd_harness import forkd_pb2_grpc
        stub = forkd_pb2_grpc.ForkdStub(channel)
        return stub.GetInfo(forkd_pb2.GetInfoRequest(), timeout=scaled(10))


def test_tls_requires_client_certificates(tmp_path, pki):
    pki_dir, read = pki
    listen, args = _tls_daemon(tmp_path, pki_dir, "--tls-client-ca",
                               os.path.join(pki_dir, "ca.crt"))
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _tls_answers(listen, read, "client"), 20, "forkd to serve over TLS")
        assert _tls_get_info(listen, read, "client").pid == process.pid
        for client in (None, "rogue"):
            with pytest.raises(grpc.RpcError) as refused:
                _tls_get_info(listen, read, client)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        process.terminate()
        process.wait(timeout=scaled(30))


def _tls_answers(listen, read, client):
    try:
        _tls_get_info(listen, read, client)
        return True
    except grpc.RpcError:
        return False


def test_server_only_tls_needs_its_explicit_flag(tmp_path, pki):
    pki_dir, read = pki
    listen, args = _tls_daemon(tmp_path, pki_dir)
    code, output = run_until_exit(args)
    assert code != 0
    assert "--tls-client-ca" in output and "--tls-no-client-auth" in output, output
    listen, args = _tls_daemon(tmp_path, pki_dir, "--tls-no-client-auth")
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: _tls_answers(listen, read, None), 20, "server-only TLS to serve")
    finally:
        process.terminate()
        process.wait(timeout=scaled(30))


# 4. Strings.

def _field(number, payload):
    assert len(payload) < 128
    return bytes([number << 3 | 2, len(payload)]) + payload


def _raw_call(daemon, method, payload):
    call = daemon.channel.unary_unary("/forkd.v1.Forkd/" + method)
    with pytest.raises(grpc.RpcError) as error:
        call(payload, timeout=scaled(10))
    return error.value


def test_string_with_nul_byte_is_refused_not_cut(plain):
    plain.start()
    error = _raw_call(plain, "DeleteSnapshot", _field(1, b"good-1\0../../etc"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "DeleteSnapshotRequest.name holds a NUL byte" in error.details()
    boot = _field(3, b"guest.bin\0junk")
    error = _raw_call(plain, "Boot", boot)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
    assert "kernel_image_path holds a NUL byte" in error.details()


@pytest.mark.parametrize("bad", [b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"ok\xe2\x82"])
def test_invalid_utf8_is_refused(plain, bad):
    plain.start()
    error = _raw_call(plain, "GetSnapshot", _field(1, bad))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "GetSnapshotRequest.name is not valid UTF-8" in error.details()


def test_nested_strings_are_checked(plain):
    plain.start()
    entry = _field(1, b"k") + _field(2, b"v\0x")
    error = _raw_call(plain, "Boot", _field(5, entry))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "holds a NUL byte" in error.details()


def test_duplicate_label_keys_are_refused(plain):
    plain.start()
    entry = _field(1, b"team") + _field(2, b"a")
    other = _field(1, b"team") + _field(2, b"b")
    error = _raw_call(plain, "Boot", _field(3, b"/x") + _field(5, entry) + _field(5, other))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "repeats the key 'team'" in error.details()


def test_control_characters_are_escaped_in_messages_and_logs(plain):
    plain.start()
    error = _raw_call(plain, "GetVm", _field(1, b"x\n\x1b[31mFAKE"))
    assert "\n" not in error.details() and "\x1b" not in error.details()
    assert "\\x0a\\x1b[31mFAKE" in error.details(), error.details()
    assert "\x1b" not in plain.log()


# 6. State directory safety.

def test_state_dir_writable_by_others_is_refused(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(0o777)
    code, output = run_until_exit(forkd_args(tmp_path, "unix:" + str(tmp_path / "s.sock")))
    assert code != 0
    assert "writable by others" in output, output
    state.chmod(0o700)
    tmp_path.chmod(0o775)
    code, output = run_until_exit(forkd_args(tmp_path, "unix:" + str(tmp_path / "s.sock")))
    assert code != 0
    assert "parent" in output and "writable by others" in output, output


LISTENER = ("import socket, sys, time\n"
            "s = socket.socket(socket.AF_UNIX)\n"
            "s.bind(sys.argv[1])\n"
            "s.listen()\n"
            "print('ready', flush=True)\n"
            "time.sleep(float(sys.argv[2]))\n")


def _listener(path):
    import sys
    process = subprocess.Popen([sys.executable, "-c", LISTENER, path, str(scaled(60))],
                               stdout=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    return process


def test_stale_vm_cleanup_never_kills_what_it_did_not_start(tmp_path):
    vms = tmp_path / "state" / "vms"
    vms.mkdir(parents=True, mode=0o700)
    (tmp_path / "state").chmod(0o700)
    elsewhere = _listener(str(tmp_path / "someone-else.sock"))
    planted = _listener(str(vms / "vm-2.sock"))
    os.symlink(str(tmp_path / "someone-else.sock"), str(vms / "vm-1.sock"))
    d = Daemon(workdir=str(tmp_path), start=False)
    try:
        d.start()
        assert get_info(d).pid == d.process.pid
        assert elsewhere.poll() is None, "forkd followed a symlink and killed its target"
        assert planted.poll() is None, "forkd killed a process it did not start"
        assert "1 processes on VM sockets spared" in d.log(), d.log()
    finally:
        d.cleanup()
        for p in (elsewhere, planted):
            p.kill()
            p.wait()


def test_corrupt_snapshots_are_logged_and_listed_as_such(tmp_path):
    broken = tmp_path / "state" / "snapshots" / "broken"
    broken.mkdir(parents=True)
    for p in (tmp_path / "state", tmp_path / "state" / "snapshots", broken):
        p.chmod(0o700)
    (broken / "snapshot.json").write_text("{ not json")
    d = Daemon(workdir=str(tmp_path), start=False)
    try:
        d.start()
        assert "snapshot 'broken' is corrupt" in d.log()
        listed = d.forkd().ListSnapshots(forkd_pb2.ListSnapshotsRequest(), timeout=10).snapshots
        assert [s.name for s in listed] == ["broken"]
        assert listed[0].state == forkd_pb2.SNAPSHOT_STATE_CORRUPT
        assert "not valid JSON" in listed[0].corrupt_reason
    finally:
        d.cleanup()


# 8. Status codes and messages.

def test_corrupt_snapshot_is_data_loss(tmp_path):
    broken = tmp_path / "state" / "snapshots" / "broken"
    broken.mkdir(parents=True)
    for p in (tmp_path / "state", tmp_path / "state" / "snapshots", broken):
        p.chmod(0o700)
    (broken / "snapshot.json").write_text("{ not json")
    d = Daemon(workdir=str(tmp_path), start=False)
    try:
        d.start()
        with pytest.raises(grpc.RpcError) as error:
            d.forkd().GetSnapshot(forkd_pb2.GetSnapshotRequest(name="broken"), timeout=10)
        assert error.value.code() == grpc.StatusCode.DATA_LOSS, error.value.details()
        assert "corrupt" in error.value.details()
    finally:
        d.cleanup()


def _boot(daemon, **fields):
    request = forkd_pb2.BootRequest(
        kernel_image_path="/guest.bin",
        machine=forkd_pb2.MachineConfig(vcpu_count=1, mem_size_mib=32), **fields)
    with pytest.raises(grpc.RpcError) as error:
        daemon.forkd().Boot(request, timeout=10)
    return error.value


def test_vm_name_errors_name_the_vm(plain):
    plain.start()
    error = _boot(plain, name="-bad")
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "VM name '-bad'" in error.details() and "snapshot" not in error.details()


def test_backends_are_named_not_numbered(plain):
    plain.start()
    for backend, expected in ((forkd_pb2.MEMORY_BACKEND_ANONYMOUS, "backend ANONYMOUS is not"),
                              (99, "backend 99 is not a MemoryBackend")):
        with pytest.raises(grpc.RpcError) as error:
            plain.forkd().Spawn(forkd_pb2.SpawnRequest(snapshot="s", count=1, backend=backend),
                                timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert expected in error.value.details(), error.value.details()
        assert "FILE, MEMFD or UFFD" in error.value.details()


def test_boot_args_length_is_checked_by_forkd(plain):
    plain.start()
    error = _boot(plain, boot_args="x" * (1 << 20))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "boot_args is 1048576 bytes" in error.details(), error.details()


# 5. Listing at scale.

def test_list_snapshots_pages(tmp_path):
    from measure_abuse import plant_snapshots
    d = Daemon(workdir=str(tmp_path), start=False)
    plant_snapshots(d.state_dir, 25)
    try:
        d.start()
        names, token, pages = [], "", 0
        while True:
            reply = d.forkd().ListSnapshots(
                forkd_pb2.ListSnapshotsRequest(page_size=10, page_token=token), timeout=10)
            assert len(reply.snapshots) <= 10
            names += [s.name for s in reply.snapshots]
            pages += 1
            token = reply.next_page_token
            if not token:
                break
        assert pages == 3
        assert names == ["snap-%05d" % i for i in range(25)]
        whole = d.forkd().ListSnapshots(forkd_pb2.ListSnapshotsRequest(), timeout=10)
        assert len(whole.snapshots) == 25 and whole.next_page_token == ""
        with pytest.raises(grpc.RpcError) as error:
            d.forkd().ListSnapshots(forkd_pb2.ListSnapshotsRequest(page_token="../x"), timeout=10)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        d.cleanup()


def test_list_vms_page_token_is_checked(plain):
    plain.start()
    reply = plain.forkd().ListVms(forkd_pb2.ListVmsRequest(page_size=5), timeout=10)
    assert len(reply.vms) == 0 and reply.next_page_token == ""
    with pytest.raises(grpc.RpcError) as error:
        plain.forkd().ListVms(forkd_pb2.ListVmsRequest(page_token="nope"), timeout=10)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


# The branch-id counter in the state directory (ids are never reused across restarts).

def _state_with_counter(tmp_path, plant):
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    plant(state / "branch-ids")
    return state


def test_branch_id_counter_that_is_a_link_is_refused_and_its_target_untouched(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("precious\n")
    state = _state_with_counter(tmp_path, lambda p: p.symlink_to(target))
    code, output = run_until_exit(forkd_args(tmp_path, "unix:" + str(tmp_path / "s.sock")))
    assert code != 0
    assert str(state / "branch-ids") in output and "symbolic links" in output, output
    assert target.read_text() == "precious\n"


def test_branch_id_counter_with_garbage_is_refused_by_name(tmp_path):
    state = _state_with_counter(tmp_path, lambda p: p.write_text("twelve\n"))
    code, output = run_until_exit(forkd_args(tmp_path, "unix:" + str(tmp_path / "s.sock")))
    assert code != 0
    assert "%s does not hold a counter" % (state / "branch-ids") in output, output
