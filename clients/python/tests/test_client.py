"""The Python client against a real forkd and real KVM VMs."""
from __future__ import annotations

import os

import grpc
import pytest

import forkd
from forkd import BranchPhase as Phase
from forkd._gen import forkd_pb2
from conftest import Daemon, wait_until

LIVE_PHASES = [Phase.STARTED, Phase.ARMED, Phase.PAUSED, Phase.VMSTATE_SAVED, Phase.RESUMED,
               Phase.COPYING, Phase.PUBLISHING, Phase.DONE]


def folded(events: list[forkd.BranchEvent]) -> list[Phase]:
    """The phase sequence with the repeated COPYING progress events folded into one."""
    out: list[Phase] = []
    for event in events:
        if not (out and out[-1] == event.phase == Phase.COPYING):
            out.append(event.phase)
    return out


def test_enums_mirror_the_proto() -> None:
    for enum_type, proto_enum, prefix in [
            (forkd.VmState, forkd_pb2.VmState, "VM_STATE_"),
            (forkd.MemoryBackend, forkd_pb2.MemoryBackend, "MEMORY_BACKEND_"),
            (forkd.BranchMode, forkd_pb2.BranchMode, "BRANCH_MODE_"),
            (forkd.BranchPhase, forkd_pb2.BranchPhase, "BRANCH_PHASE_"),
            (forkd.SnapshotState, forkd_pb2.SnapshotState, "SNAPSHOT_STATE_")]:
        assert {m.name: m.value for m in enum_type} == {
            v.name.removeprefix(prefix): v.number for v in proto_enum.DESCRIPTOR.values}


def test_default_target(monkeypatch: pytest.MonkeyPatch, daemon: Daemon) -> None:
    monkeypatch.delenv("FORKD_ADDR", raising=False)
    assert forkd.Client().target == forkd.DEFAULT_TARGET == "unix:/run/forkd/forkd.sock"
    monkeypatch.setenv("FORKD_ADDR", daemon.socket_path)  # a bare path is a Unix socket
    with forkd.Client() as client:
        assert client.target == daemon.target
        info = client.info()
    assert isinstance(info, forkd.Info) and info.version and info.pid == daemon.process.pid
    assert info.host is not None and info.host.kvm_usable and info.host.live_branch_supported


def test_boot_branch_spawn_list_delete(daemon: Daemon, client: forkd.Client) -> None:
    vm = client.boot(daemon.guest, name="agent", vcpu_count=2, mem_size_mib=64,
                     boot_args="pattern=random seed=1")
    assert isinstance(vm, forkd.Vm) and vm.name == "agent"
    assert vm.state == forkd.VmState.RUNNING
    assert vm.memory_backend == forkd.MemoryBackend.MEMFD

    branch = client.branch(vm, "base", progress_interval=0.005, labels={"step": "1"})
    events = []

    def consume():  # the snapshot is the generator's return value: "yield from" works
        snapshot = yield from branch
        events.append(snapshot)

    for event in consume():
        assert isinstance(event, forkd.BranchEvent) and isinstance(event.phase, Phase)
        events.append(event)
    snapshot = events.pop()
    assert folded(events) == LIVE_PHASES
    assert {e.branch_id for e in events} == {branch.branch_id} and branch.branch_id
    copied = [e.progress.bytes_copied for e in events if e.progress]
    assert copied == sorted(copied), "progress only grows"
    assert events[-1].progress and events[-1].progress.fraction == 1.0
    assert snapshot is branch.snapshot and snapshot == events[-1].snapshot
    assert branch.done and branch.wait() is snapshot  # waiting again: same answer
    assert isinstance(snapshot, forkd.Snapshot) and snapshot.state == forkd.SnapshotState.READY
    assert snapshot.memory_bytes == 64 << 20 and snapshot.source_vm_name == "agent"
    assert snapshot.labels["step"] == "1"
    assert snapshot.figures and 0 < snapshot.figures.pause_ns < snapshot.figures.total_ns
    daemon.verify(snapshot.path)

    memfd = client.spawn(snapshot, 2, backend=forkd.MemoryBackend.MEMFD, name_prefix="m")
    assert isinstance(memfd, forkd.SpawnResult) and memfd.elapsed_ns > 0
    assert [v.name for v in memfd.vms] == ["m-0", "m-1"]
    assert all(v.memory_backend == forkd.MemoryBackend.MEMFD and v.source_snapshot == "base"
               for v in memfd.vms)
    (file_fork,) = client.spawn("base", backend=forkd.MemoryBackend.FILE).vms
    assert {v.id for v in client.vms()} == {vm.id, file_fork.id} | {v.id for v in memfd.vms}
    assert client.vm("m-1").id == memfd.vms[1].id
    assert client.snapshot("base").vms_using == 3

    # A fork of a fork: a MEMFD fork branches live; its snapshot records its parent.
    child = client.branch(memfd.vms[0], "child").wait()
    assert child.parent_snapshot == "base"
    assert [s.name for s in client.snapshots()] == ["base", "child"]

    with pytest.raises(forkd.FailedPrecondition):
        client.delete_snapshot("base")  # VMs still use it
    for fork in [*memfd.vms, file_fork]:
        last = client.stop(fork, grace=5)
        assert last.state == forkd.VmState.STOPPED and last.vmm_pid == 0
    client.delete_snapshot("base")
    with pytest.raises(forkd.NotFound):
        client.snapshot("base")
    assert client.vm("agent").state == forkd.VmState.RUNNING


def test_cancel_branch(daemon: Daemon, client: forkd.Client) -> None:
    vm = client.boot(daemon.guest, mem_size_mib=256, boot_args="pattern=random")
    with client.branch(vm, "cancelled", progress_interval=0.01) as branch:
        for event in branch:
            if event.phase == Phase.COPYING:
                break  # leaving the block cancels the branch
    with pytest.raises(forkd.Cancelled):
        branch.wait()
    wait_until(lambda: client.vm(vm).active_branch_id == "", 30, "the branch to wind down")
    assert client.vm(vm).state == forkd.VmState.RUNNING
    assert client.snapshots() == []

    watched = client.watch(branch.branch_id)
    with pytest.raises(forkd.Cancelled) as error:
        watched.wait()
    assert error.value.code == grpc.StatusCode.CANCELLED and error.value.message
    assert watched.last and watched.last.phase == Phase.CANCELLED
    assert "cancel" in watched.last.error_message

    # Explicit cancel() before reading anything.
    early = client.branch(vm, "early")
    early.cancel()
    with pytest.raises(forkd.Cancelled):
        early.wait()
    # The daemon may take the call up after the client left it: then "early" runs until its
    # follower sees the cancel, and holds the VM until it has wound down. Nothing else may.
    again = []

    def branch_again() -> bool:
        try:
            again.append(client.branch(vm, "again").wait())
            return True
        except forkd.FailedPrecondition as refused:
            assert "(early)" in refused.message, refused
            return False

    wait_until(branch_again, 30, "the cancelled branch to let go of the VM")
    # The VM was resumed and unprotected: it branches cleanly again.
    daemon.verify(again[0].path)
    assert "early" not in [s.name for s in client.snapshots()]


def test_detach_and_watch(daemon: Daemon, client: forkd.Client) -> None:
    vm = client.boot(daemon.guest, mem_size_mib=64)
    branch = client.branch(vm, "detached", detach=True)
    first = next(iter(branch))
    assert first.phase == Phase.STARTED and branch.branch_id == first.branch_id
    branch.cancel()  # the client leaves; the branch goes on
    watched = client.watch(snapshot_name="detached")
    snapshot = watched.wait()
    assert folded(watched.events) == LIVE_PHASES, "replayed from the start"
    assert snapshot.state == forkd.SnapshotState.READY and watched.branch_id == first.branch_id
    with pytest.raises(ValueError):
        client.watch()


def test_errors_carry_status_code_and_message(daemon: Daemon, client: forkd.Client) -> None:
    def expect(kind: type[forkd.ForkdError], code: grpc.StatusCode, call, *args, **kwargs):
        with pytest.raises(kind) as error:
            result = call(*args, **kwargs)
            if isinstance(result, forkd.Branch):
                result.wait()  # a stream's status arrives while reading it
        assert isinstance(error.value, forkd.ForkdError)
        assert error.value.code == code and error.value.message
        assert code.name in str(error.value)
        return error.value.message

    assert "vm-404" in expect(forkd.NotFound, grpc.StatusCode.NOT_FOUND, client.vm, "vm-404")
    expect(forkd.NotFound, grpc.StatusCode.NOT_FOUND, client.branch, "vm-404", "x")
    expect(forkd.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT,
           client.boot, daemon.guest, name="../escape", mem_size_mib=64)
    expect(forkd.NotFound, grpc.StatusCode.NOT_FOUND, client.boot, "/no/such/guest")
    vm = client.boot(daemon.guest, name="taken", mem_size_mib=64)
    expect(forkd.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS,
           client.boot, daemon.guest, name="taken", mem_size_mib=64)
    expect(forkd.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, client.branch, vm, "a/b")
    client.branch(vm, "full", mode=forkd.BranchMode.FULL).wait()
    (file_fork,) = client.spawn("full").vms
    message = expect(forkd.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION,
                     client.branch, file_fork, "live-of-file")
    assert "FILE" in message
    expect(forkd.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, client.spawn, "full", 0)

    # Timeouts: a deadline too short for the call. (A client-wide default is not asserted: a
    # unary call here can finish within any deadline short enough to be sure to miss.)
    expect(forkd.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED,
           client.branch, vm, "too-slow", timeout=0.001)
    # The client's default applies when a call names none: a branch cannot end within 1 ms
    # (a unary call might, so none is used here).
    # No daemon at all.
    with forkd.Client(os.path.join(daemon.workdir, "nobody.sock"), timeout=5) as absent:
        expect(forkd.Unavailable, grpc.StatusCode.UNAVAILABLE, absent.info)
        with pytest.raises(forkd.Unavailable):
            absent.wait_ready(timeout=0.2)


def test_boot_with_devices_and_branch_describe_them(daemon: Daemon, client: forkd.Client) -> None:
    root = os.path.join(daemon.workdir, "root.img")
    with open(root, "wb") as f:
        f.truncate(1 << 20)
    vm = client.boot(daemon.guest, mem_size_mib=64, boot_args="pattern=random",
                     drives=[forkd.Drive("rootfs", root, is_read_only=True, is_root_device=True)],
                     network_interfaces=[forkd.NetworkInterface("eth0", "fk-tap0")],
                     vsock=forkd.Vsock(5, os.path.join(daemon.workdir, "v.sock")))
    assert [(d.drive_id, d.path_on_host, d.is_read_only, d.is_root_device)
            for d in vm.drives] == [("rootfs", root, True, True)]
    assert vm.drives[0].identity is not None and vm.drives[0].identity.size_bytes == 1 << 20
    assert vm.network_interfaces == [forkd.NetworkInterface("eth0", "fk-tap0", "")]
    assert vm.vsock == forkd.Vsock(5, os.path.join(daemon.workdir, "v.sock"))
    snapshot = client.branch(vm, "with-devices").wait()
    assert snapshot.drives[0].path_on_host == root and snapshot.vsock is not None
    assert snapshot.figures is not None and snapshot.figures.disk_copied_bytes == 0
    assert client.vm(vm.id).to_dict()["drives"][0]["drive_id"] == "rootfs"
