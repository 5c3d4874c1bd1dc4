"""The Forkd service end to end on real KVM: a real forkd launching the real test VMM, driven
through generated stubs; every snapshot checked by the test VMM's verifier."""
import os
import signal
import threading
import time

import grpc
import pytest

from forkd_harness import VmDaemon, forkd_pb2, verify_snapshot, wait_until

P = forkd_pb2
LIVE_PHASES = [P.BRANCH_PHASE_STARTED, P.BRANCH_PHASE_ARMED, P.BRANCH_PHASE_PAUSED,
               P.BRANCH_PHASE_VMSTATE_SAVED, P.BRANCH_PHASE_RESUMED, P.BRANCH_PHASE_COPYING,
               P.BRANCH_PHASE_PUBLISHING, P.BRANCH_PHASE_DONE]


@pytest.fixture
def forkd():
    d = VmDaemon("--shutdown-grace-ms", "5000")
    yield d
    d.cleanup()


def phases(events):
    """Phase sequence with repeated COPYING progress events folded into one."""
    out = []
    for event in events:
        if not out or out[-1] != event.phase or event.phase != P.BRANCH_PHASE_COPYING:
            out.append(event.phase)
    return out


def leftovers(d):
    snapshots = os.path.join(d.state_dir, "snapshots")
    return [n for n in os.listdir(snapshots) if n.startswith(".")]


def test_boot_branch_spawn_list_delete_stop(forkd):
    stub = forkd.forkd()
    vm = stub.Boot(P.BootRequest(
        name="agent", kernel_image_path=os.environ["FORKD_GUEST"],
        boot_args="pattern=random seed=1", labels={"team": "evals", "run": "7"},
        machine=P.MachineConfig(vcpu_count=2, mem_size_mib=64)), timeout=60)
    assert vm.state == P.VM_STATE_RUNNING and vm.memory_backend == P.MEMORY_BACKEND_MEMFD
    assert dict(stub.GetVm(P.GetVmRequest(vm_id="agent"), timeout=10).labels) == \
        {"team": "evals", "run": "7"}
    assert vm.name == "agent" and vm.vmm_pid > 0

    events = forkd.branch(vm.id, "base", progress_interval_ms=10)
    assert phases(events) == LIVE_PHASES
    assert len({e.branch_id for e in events}) == 1 and events[0].branch_id
    done = events[-1]
    assert done.snapshot.state == P.SNAPSHOT_STATE_READY
    assert done.snapshot.memory_bytes == 64 << 20
    assert done.figures.pause_ns > 0
    assert done.snapshot.progress.pages_by_fault + done.snapshot.progress.pages_by_bulk == \
        (64 << 20) // 4096
    rc, output = verify_snapshot(done.snapshot.path)
    assert rc == 0, output

    forks = []
    for backend in (P.MEMORY_BACKEND_FILE, P.MEMORY_BACKEND_MEMFD):
        reply = stub.Spawn(P.SpawnRequest(snapshot="base", count=4, backend=backend,
                                          name_prefix="f%d" % backend), timeout=120)
        assert len(reply.vms) == 4 and reply.elapsed_ns > 0
        assert all(v.memory_backend == backend and v.source_snapshot == "base" for v in reply.vms)
        assert all(v.machine.vcpu_count == 2 for v in reply.vms)
        forks.extend(reply.vms)
    assert stub.GetSnapshot(P.GetSnapshotRequest(name="base"), timeout=10).vms_using == 8

    memfd_fork = [v for v in forks if v.memory_backend == P.MEMORY_BACKEND_MEMFD][0]
    child = forkd.branch(memfd_fork.id, "child")
    assert child[-1].phase == P.BRANCH_PHASE_DONE
    assert child[-1].snapshot.parent_snapshot == "base"
    assert verify_snapshot(child[-1].snapshot.path)[0] == 0

    listed = stub.ListVms(P.ListVmsRequest(), timeout=10).vms
    assert {v.id for v in listed} == {vm.id} | {v.id for v in forks}
    names = [s.name for s in stub.ListSnapshots(P.ListSnapshotsRequest(), timeout=10).snapshots]
    assert names == ["base", "child"]

    with pytest.raises(grpc.RpcError) as error:
        stub.DeleteSnapshot(P.DeleteSnapshotRequest(name="base"), timeout=10)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    for fork in forks:
        last = stub.StopVm(P.StopVmRequest(vm_id=fork.id), timeout=30).vm
        assert last.state == P.VM_STATE_STOPPED and last.vmm_pid == 0
        assert not os.path.exists("/proc/%d" % fork.vmm_pid) or \
            open("/proc/%d/stat" % fork.vmm_pid).read().split()[2] == "Z"
    stub.DeleteSnapshot(P.DeleteSnapshotRequest(name="base"), timeout=10)
    with pytest.raises(grpc.RpcError) as error:
        stub.GetSnapshot(P.GetSnapshotRequest(name="base"), timeout=10)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert stub.GetVm(P.GetVmRequest(vm_id="agent"), timeout=10).state == P.VM_STATE_RUNNING


def test_uffd_forks_are_served_by_the_page_server(forkd):
    stub = forkd.forkd()
    vm = forkd.boot(mem_mib=64, workload="pattern=hotset seed=3")
    forkd.branch(vm.id, "template")
    reply = stub.Spawn(P.SpawnRequest(snapshot="template", count=3,
                                      backend=P.MEMORY_BACKEND_UFFD, prefetch_record_ms=200),
                       timeout=120)
    assert [v.memory_backend for v in reply.vms] == [P.MEMORY_BACKEND_UFFD] * 3
    # A UFFD fork runs on: branch it (FULL: its memory is not write-protectable) and verify.
    done = forkd.branch(reply.vms[0].id, "uffd-child", mode=P.BRANCH_MODE_FULL)[-1]
    assert done.phase == P.BRANCH_PHASE_DONE
    assert verify_snapshot(done.snapshot.path)[0] == 0
    fork = stub.GetVm(P.GetVmRequest(vm_id=reply.vms[0].id), timeout=10)
    assert fork.page_server.faults_served > 0 and fork.page_server.bytes_copied > 0
    template = stub.GetSnapshot(P.GetSnapshotRequest(name="template"), timeout=10)
    assert template.page_server.faults_served >= fork.page_server.faults_served
    with pytest.raises(grpc.RpcError) as error:
        forkd.branch(reply.vms[1].id, "live-of-uffd")
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    for v in reply.vms:
        stub.StopVm(P.StopVmRequest(vm_id=v.id), timeout=30)
    assert stub.GetVm(P.GetVmRequest(vm_id=vm.id), timeout=10).state == P.VM_STATE_RUNNING


def test_full_branch_and_live_refused_on_file_memory(forkd):
    vm = forkd.boot()
    events = forkd.branch(vm.id, "full", mode=P.BRANCH_MODE_FULL)
    assert [e.phase for e in events] == [P.BRANCH_PHASE_STARTED, P.BRANCH_PHASE_PAUSED,
                                         P.BRANCH_PHASE_VMSTATE_SAVED, P.BRANCH_PHASE_RESUMED,
                                         P.BRANCH_PHASE_PUBLISHING, P.BRANCH_PHASE_DONE]
    assert verify_snapshot(events[-1].snapshot.path)[0] == 0
    fork = forkd.forkd().Spawn(P.SpawnRequest(snapshot="full", count=1), timeout=60).vms[0]
    with pytest.raises(grpc.RpcError) as error:
        forkd.branch(fork.id, "live-of-file")
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "FILE memory" in error.value.details()
    assert leftovers(forkd) == []


def test_cancel_mid_copy_leaves_vm_running_and_store_clean(forkd):
    stub = forkd.forkd()
    vm = forkd.boot(mem_mib=256, workload="pattern=random")
    stream = stub.Branch(P.BranchRequest(vm_id=vm.id, snapshot_name="cancelled"), timeout=120)
    for event in stream:
        if event.phase == P.BRANCH_PHASE_COPYING:
            break
    stream.cancel()
    wait_until(lambda: stub.GetVm(P.GetVmRequest(vm_id=vm.id), timeout=10).active_branch_id
               == "", 30, "the branch to wind down")
    assert stub.GetVm(P.GetVmRequest(vm_id=vm.id), timeout=10).state == P.VM_STATE_RUNNING
    assert len(stub.ListSnapshots(P.ListSnapshotsRequest(), timeout=10).snapshots) == 0
    assert leftovers(forkd) == []
    watched = []
    with pytest.raises(grpc.RpcError) as error:
        for event in stub.WatchBranch(P.WatchBranchRequest(snapshot_name="cancelled"),
                                      timeout=30):
            watched.append(event)
    assert error.value.code() == grpc.StatusCode.CANCELLED
    assert watched[-1].phase == P.BRANCH_PHASE_CANCELLED
    assert "cancelled" in watched[-1].error_message
    # Unprotected and running: it branches again cleanly.
    again = forkd.branch(vm.id, "after-cancel")
    assert verify_snapshot(again[-1].snapshot.path)[0] == 0


def test_detach_and_watch(forkd):
    stub = forkd.forkd()
    vm = forkd.boot(mem_mib=128)
    stream = stub.Branch(P.BranchRequest(vm_id=vm.id, snapshot_name="detached", detach=True),
                         timeout=120)
    first = next(stream)
    assert first.phase == P.BRANCH_PHASE_STARTED
    stream.cancel()
    watched = list(stub.WatchBranch(P.WatchBranchRequest(branch_id=first.branch_id),
                                    timeout=120))
    assert phases(watched) == LIVE_PHASES, "replayed from the start, followed to the end"
    assert verify_snapshot(watched[-1].snapshot.path)[0] == 0
    by_name = list(stub.WatchBranch(P.WatchBranchRequest(snapshot_name="detached"), timeout=30))
    assert by_name[-1].phase == P.BRANCH_PHASE_DONE
    with pytest.raises(grpc.RpcError) as error:
        list(stub.WatchBranch(P.WatchBranchRequest(branch_id="br-999"), timeout=10))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def test_a_client_that_reads_nothing_does_not_hold_up_the_branch(forkd):
    vm = forkd.boot(mem_mib=64)
    stream = forkd.forkd().Branch(P.BranchRequest(vm_id=vm.id, snapshot_name="slow",
                                                  progress_interval_ms=10), timeout=120)
    # The branch finishes while the client reads nothing; the daemon's log says when.
    wait_until(lambda: "snapshot slow of %s READY" % vm.id in forkd.log(), 60,
               "the branch to finish without a reader")
    started_reading = time.time() * 1000
    events = list(stream)
    assert phases(events) == LIVE_PHASES, "no phase event lost to a slow reader"
    assert events[-1].time_unix_ms <= started_reading


def test_concurrent_branches_and_limits():
    d = VmDaemon("--max-branches", "2")
    try:
        stub = d.forkd()
        vms = [d.boot(mem_mib=128, name="c%d" % i) for i in range(3)]
        # Two branches of different VMs at once.
        streams = [stub.Branch(P.BranchRequest(vm_id=v.id, snapshot_name="s-" + v.name),
                               timeout=120) for v in vms[:2]]
        firsts = [next(s) for s in streams]
        assert all(f.phase == P.BRANCH_PHASE_STARTED for f in firsts)
        with pytest.raises(grpc.RpcError) as error:
            d.branch(vms[2].id, "over-the-limit")
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with pytest.raises(grpc.RpcError) as error:
            d.branch(vms[0].id, "same-vm")
        assert error.value.code() in (grpc.StatusCode.FAILED_PRECONDITION,
                                      grpc.StatusCode.RESOURCE_EXHAUSTED)
        for s in streams:
            last = list(s)[-1]
            assert last.phase == P.BRANCH_PHASE_DONE
            assert verify_snapshot(last.snapshot.path)[0] == 0
        # With the slots free again, one branch per VM is what stops a second one.
        stream = stub.Branch(P.BranchRequest(vm_id=vms[0].id, snapshot_name="one"), timeout=120)
        next(stream)
        with pytest.raises(grpc.RpcError) as error:
            d.branch(vms[0].id, "two")
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert list(stream)[-1].phase == P.BRANCH_PHASE_DONE
    finally:
        d.cleanup()


def expect_code(code, fn, *args):
    with pytest.raises(grpc.RpcError) as error:
        result = fn(*args, timeout=30)
        if hasattr(result, "__iter__") and not hasattr(result, "DESCRIPTOR"):
            list(result)
    assert error.value.code() == code, error.value.details()
    assert error.value.details()
    return error.value.details()


def test_bad_input_for_every_rpc(forkd):
    stub = forkd.forkd()
    INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    expect_code(INVALID, stub.Boot, P.BootRequest())
    machine = P.MachineConfig(vcpu_count=1, mem_size_mib=64)
    expect_code(INVALID, stub.Boot, P.BootRequest(machine=machine, kernel_image_path="rel/x"))
    expect_code(INVALID, stub.Boot, P.BootRequest(machine=P.MachineConfig(vcpu_count=99,
                                                                          mem_size_mib=64),
                                                  kernel_image_path="/x"))
    expect_code(INVALID, stub.Boot, P.BootRequest(name="../x", machine=machine,
                                                  kernel_image_path="/x"))
    expect_code(NOT_FOUND, stub.Boot, P.BootRequest(machine=machine,
                                                    kernel_image_path="/no/such/guest"))
    assert "zigzag" in expect_code(INVALID, forkd.boot, 64, 1, "pattern=zigzag")
    expect_code(INVALID, stub.Spawn, P.SpawnRequest(snapshot="s", count=0))
    expect_code(INVALID, stub.Spawn, P.SpawnRequest(snapshot="s", count=100000))
    expect_code(INVALID, stub.Spawn, P.SpawnRequest(snapshot="a/b", count=1))
    expect_code(INVALID, stub.Spawn, P.SpawnRequest(snapshot="s", count=1, backend=77))
    expect_code(NOT_FOUND, stub.Spawn, P.SpawnRequest(snapshot="nope", count=1))
    expect_code(INVALID, stub.Branch, P.BranchRequest())
    expect_code(INVALID, stub.Branch, P.BranchRequest(vm_id="x", snapshot_name=".."))
    expect_code(INVALID, stub.Branch, P.BranchRequest(vm_id="x", snapshot_name="ok", mode=9))
    expect_code(NOT_FOUND, stub.Branch, P.BranchRequest(vm_id="vm-404", snapshot_name="ok"))
    expect_code(INVALID, stub.WatchBranch, P.WatchBranchRequest())
    expect_code(INVALID, stub.GetVm, P.GetVmRequest())
    expect_code(NOT_FOUND, stub.GetVm, P.GetVmRequest(vm_id="vm-404"))
    expect_code(NOT_FOUND, stub.StopVm, P.StopVmRequest(vm_id="vm-404"))
    expect_code(INVALID, stub.GetSnapshot, P.GetSnapshotRequest(name=""))
    expect_code(NOT_FOUND, stub.GetSnapshot, P.GetSnapshotRequest(name="nope"))
    expect_code(INVALID, stub.DeleteSnapshot, P.DeleteSnapshotRequest(name="../../etc"))
    expect_code(NOT_FOUND, stub.DeleteSnapshot, P.DeleteSnapshotRequest(name="nope"))
    vm = forkd.boot()
    forkd.branch(vm.id, "taken")
    expect_code(grpc.StatusCode.ALREADY_EXISTS, stub.Branch,
                P.BranchRequest(vm_id=vm.id, snapshot_name="taken"))
    expect_code(grpc.StatusCode.RESOURCE_EXHAUSTED, stub.Boot,
                P.BootRequest(name="x" * (5 << 20)))
    # After all of it the daemon serves on.
    assert stub.GetVm(P.GetVmRequest(vm_id=vm.id), timeout=10).state == P.VM_STATE_RUNNING


def vmm_pids(d):
    return [v.vmm_pid for v in d.forkd().ListVms(P.ListVmsRequest(), timeout=10).vms]


def test_sigterm_mid_branch_exits_cleanly_and_restarts_consistent():
    d = VmDaemon("--shutdown-grace-ms", "100")
    try:
        done = d.branch(d.boot(mem_mib=64).id, "kept")[-1]
        assert done.phase == P.BRANCH_PHASE_DONE
        vm = d.boot(mem_mib=512, name="big")
        pids = vmm_pids(d)
        stream = d.forkd().Branch(P.BranchRequest(vm_id=vm.id, snapshot_name="interrupted"),
                                  timeout=120)
        for event in stream:
            if event.phase == P.BRANCH_PHASE_COPYING:
                break
        d.signal(signal.SIGTERM)
        assert d.wait(timeout=60) == 0
        for pid in pids:
            assert not os.path.exists("/proc/%d" % pid), "VMM %d left running" % pid
    finally:
        d.stop()
    again = VmDaemon("--shutdown-grace-ms", "100", workdir=d.workdir)
    try:
        names = [s.name for s in
                 again.forkd().ListSnapshots(P.ListSnapshotsRequest(), timeout=10).snapshots]
        assert "interrupted" not in names
        assert "kept" in names
        assert leftovers(again) == []
        assert verify_snapshot(os.path.join(again.state_dir, "snapshots", "kept"))[0] == 0
    finally:
        again.cleanup()
