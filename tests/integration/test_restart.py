"""forkd dies or is restarted while its VMs run: the next forkd adopts them (real daemon, real
test VMMs). Every VM is listed again with its id, UFFD forks are served again, MEMFD VMs can be
live-branched, a branch cut short is reported failed with its VM running, nothing leaks."""
import json
import os
import signal
import subprocess
import sys
import time

import grpc

from forkd_harness import (FORKD_TESTVM, Daemon, VmDaemon, forkd_pb2, forkd_pb2_grpc, scaled,
                           verify_snapshot, wait_until)

P = forkd_pb2
# The guest writes pages one after another at a bounded rate, so a UFFD fork keeps faulting
# missing pages in for as long as the test runs.
SLOW_WRITER = "pattern=sequential rate=300"


def run_dir(d):
    return os.path.join(d.state_dir, "vms")


def vms_by_id(d):
    return {v.id: v for v in d.forkd().ListVms(P.ListVmsRequest(), timeout=10).vms}


def get_vm(d, vm_id):
    return d.forkd().GetVm(P.GetVmRequest(vm_id=vm_id), timeout=10)


def cpu_ticks(pid):
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def start_time(pid):
    with open("/proc/%d/stat" % pid) as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def guest_runs(pid, what):
    """The VMM's vCPU makes progress: its CPU time grows (a vCPU blocked on a fault nobody
    serves, or on a write-protected page nobody unprotects, sleeps and uses none)."""
    before = cpu_ticks(pid)
    wait_until(lambda: cpu_ticks(pid) >= before + 20, 30, what)


def forkd_holds(d, kinds=("memfd:forkd-guest", "userfaultfd")):
    """What the running forkd holds open of kinds (guest memfds, userfaultfds, pidfds)."""
    held = []
    fd_dir = "/proc/%d/fd" % d.process.pid
    for name in os.listdir(fd_dir):
        try:
            link = os.readlink(os.path.join(fd_dir, name))
        except FileNotFoundError:
            continue
        if any(kind in link for kind in kinds):
            held.append(link)
    return held


def leftovers(d):
    snapshots = os.path.join(d.state_dir, "snapshots")
    return [n for n in os.listdir(snapshots) if n.startswith(".")]


def kill9(d):
    d.signal(signal.SIGKILL)
    d.wait()
    d.stop()


def restart(d, *args):
    again = VmDaemon("--shutdown-grace-ms", "2000", *args, workdir=d.workdir)
    return again


def stop_all(d):
    for vm in list(vms_by_id(d).values()):
        d.forkd().StopVm(P.StopVmRequest(vm_id=vm.id), timeout=60)


def faults_served(d, vm_id):
    return get_vm(d, vm_id).page_server.faults_served


def kill_leftovers(pids):
    for pid in pids:
        if pid and alive(pid):
            os.kill(pid, signal.SIGKILL)


def make_forks(d):
    """A booted VM, a LIVE snapshot of it, a MEMFD fork and two UFFD forks that keep faulting."""
    stub = d.forkd()
    booted = stub.Boot(P.BootRequest(
        name="agent", kernel_image_path=os.environ["FORKD_GUEST"], boot_args=SLOW_WRITER,
        labels={"team": "evals"}, machine=P.MachineConfig(vcpu_count=1, mem_size_mib=32)),
        timeout=60)
    done = d.branch(booted.id, "base")[-1]
    assert done.phase == P.BRANCH_PHASE_DONE, done.error_message
    memfd = stub.Spawn(P.SpawnRequest(snapshot="base", count=1, name_prefix="m",
                                      backend=P.MEMORY_BACKEND_MEMFD), timeout=120).vms[0]
    uffd = stub.Spawn(P.SpawnRequest(snapshot="base", count=2, name_prefix="u",
                                     labels={"kind": "lazy"},
                                     backend=P.MEMORY_BACKEND_UFFD), timeout=120).vms
    return booted, memfd, uffd[0], uffd[1]


def check_adopted(d, before, exited_id):
    listed = vms_by_id(d)
    assert set(listed) == set(before), listed.keys()
    for vm_id, old in before.items():
        now = listed[vm_id]
        assert now.name == old.name and dict(now.labels) == dict(old.labels)
        assert now.memory_backend == old.memory_backend
        if vm_id == exited_id:
            assert now.state == P.VM_STATE_FAILED and now.vmm_pid == 0
            assert "exited" in now.exit_reason, now.exit_reason
        else:
            assert now.state == P.VM_STATE_RUNNING, (vm_id, now.state, now.exit_reason)
            assert now.vmm_pid == old.vmm_pid


def check_usable_and_clean(d, booted, memfd, uffd, pids):
    """UFFD fork served and its FULL snapshot consistent, MEMFD fork live-branched, a new VM
    gets a new id; then everything stopped leaves no process, fd, record or temporary file."""
    full = d.branch(uffd.id, "of-uffd", mode=P.BRANCH_MODE_FULL, timeout=600)[-1]
    assert full.phase == P.BRANCH_PHASE_DONE, full.error_message
    assert verify_snapshot(full.snapshot.path)[0] == 0
    live = d.branch(memfd.id, "of-memfd")[-1]
    assert live.phase == P.BRANCH_PHASE_DONE, live.error_message
    assert verify_snapshot(live.snapshot.path)[0] == 0
    fresh = d.boot(mem_mib=16)
    taken = {booted.id, memfd.id, uffd.id}
    assert fresh.id not in taken and int(fresh.id[3:]) > max(int(i[3:]) for i in taken)
    pids.append(fresh.vmm_pid)
    stop_all(d)
    for pid in pids:
        wait_until(lambda: not alive(pid), 30, "VMM %d to be gone" % pid)
    try:
        wait_until(lambda: forkd_holds(d) == [], 10, "forkd to close the memfds and userfaultfds")
    except AssertionError:
        raise AssertionError("forkd still holds %s; log:\n%s" % (forkd_holds(d), d.log()))
    # A finished branch is remembered for WatchBranch with its VM (and that VM's pidfd): only
    # the two VMs branched here may still have one. The reaper drops its own reference (and
    # with the last one the pidfd) just after it has closed the memfd and woken the stop.
    try:
        wait_until(lambda: len(forkd_holds(d, ("pidfd",))) <= 2, 10,
                   "forkd to close the pidfds of VMs no branch remembers")
    except AssertionError:
        raise AssertionError("forkd still holds %s" % forkd_holds(d, ("pidfd",)))
    assert [n for n in os.listdir(run_dir(d)) if n.endswith(".vm") or ".tmp" in n] == []
    assert leftovers(d) == []


def test_kill9_while_idle_and_while_uffd_forks_fault_in():
    d = VmDaemon("--shutdown-grace-ms", "2000")
    pids = []
    again = None
    try:
        booted, memfd, uffd, doomed = make_forks(d)
        pids = [booted.vmm_pid, memfd.vmm_pid, uffd.vmm_pid, doomed.vmm_pid]
        before = vms_by_id(d)
        served = faults_served(d, uffd.id)
        wait_until(lambda: faults_served(d, uffd.id) > served, 30, "the UFFD fork to fault")
        killed_at = time.monotonic()
        kill9(d)
        assert all(alive(pid) for pid in pids), "VMMs outlive a forkd killed with -9"
        os.kill(doomed.vmm_pid, signal.SIGKILL)
        wait_until(lambda: not alive(doomed.vmm_pid), 10, "the killed VMM to exit")
        again = restart(d)
        wait_until(lambda: faults_served(again, uffd.id) > 0, 60,
                   "the adopted UFFD fork to be served again")
        stall = time.monotonic() - killed_at
        print("UFFD fork stall across the restart (kill -9 to a fault served again): "
              "%.3f s" % stall)
        check_adopted(again, before, doomed.id)
        assert "1 adopted" not in again.log()  # several were
        guest_runs(uffd.vmm_pid, "the adopted UFFD fork to run")
        check_usable_and_clean(again, booted, memfd, uffd, pids)
    finally:
        d.stop()
        if again:
            again.cleanup()
        kill_leftovers(pids)


def test_keep_vms_then_the_next_forkd_adopts_them():
    d = VmDaemon("--shutdown-grace-ms", "2000", "--keep-vms")
    pids = []
    again = None
    try:
        booted, memfd, uffd, other = make_forks(d)
        pids = [booted.vmm_pid, memfd.vmm_pid, uffd.vmm_pid, other.vmm_pid]
        before = vms_by_id(d)
        d.signal(signal.SIGTERM)
        assert d.wait() == 0
        d.stop()
        assert all(alive(pid) for pid in pids), "--keep-vms leaves the VMMs running"
        again = restart(d)
        check_adopted(again, before, None)
        served = faults_served(again, uffd.id)
        wait_until(lambda: faults_served(again, uffd.id) > served, 60,
                   "the kept UFFD fork to be served by the next forkd")
        guest_runs(uffd.vmm_pid, "the kept UFFD fork to run")
        # Branching adopted VMs is covered after kill -9; here: stopped, nothing is left.
        stop_all(again)
        for pid in pids:
            wait_until(lambda: not alive(pid), 30, "VMM %d to be gone" % pid)
        wait_until(lambda: forkd_holds(again, ("memfd:forkd-guest", "userfaultfd", "pidfd"))
                   == [], 10, "forkd to close what it held for the VMs")
        assert [n for n in os.listdir(run_dir(again)) if n.endswith(".vm")] == []
    finally:
        d.stop()
        if again:
            again.cleanup()
        kill_leftovers(pids)


def test_kill9_mid_live_branch_fails_it_and_leaves_the_vm_running_unprotected():
    d = VmDaemon("--shutdown-grace-ms", "2000")
    pid = 0
    again = None
    try:
        vm = d.boot(mem_mib=128, workload="pattern=random")
        pid = vm.vmm_pid
        stream = d.forkd().Branch(P.BranchRequest(vm_id=vm.id, snapshot_name="cut",
                                                  progress_interval_ms=10), timeout=300)
        for event in stream:
            if event.phase == P.BRANCH_PHASE_COPYING:
                break
        assert event.phase == P.BRANCH_PHASE_COPYING and get_vm(d, vm.id).active_branch_id
        cut_id = event.branch_id
        kill9(d)
        # The write-protect userfaultfd closed with forkd: nothing holds the guest any more.
        guest_runs(pid, "the source VM to run on without forkd")
        again = restart(d)
        now = get_vm(again, vm.id)
        assert now.state == P.VM_STATE_RUNNING and now.vmm_pid == pid
        assert now.active_branch_id == ""
        watch = []
        try:
            for event in again.forkd().WatchBranch(P.WatchBranchRequest(snapshot_name="cut"),
                                                   timeout=30):
                watch.append(event)
            raise AssertionError("a branch cut short by the restart ended without an error")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.ABORTED and "forkd restarted" in e.details()
        assert watch[-1].phase == P.BRANCH_PHASE_FAILED and watch[-1].vm_id == vm.id
        # Branch ids are never reused on a state directory: the old id names the old branch.
        assert watch[-1].branch_id != cut_id, cut_id
        assert "forkd restarted" in watch[-1].error_message
        names = [s.name for s in
                 again.forkd().ListSnapshots(P.ListSnapshotsRequest(), timeout=10).snapshots]
        assert "cut" not in names and leftovers(again) == []
        guest_runs(pid, "the source VM to run under the new forkd")
        done = again.branch(vm.id, "after", timeout=300)
        assert done[-1].phase == P.BRANCH_PHASE_DONE, done[-1].error_message
        assert done[-1].branch_id != watch[-1].branch_id
        assert verify_snapshot(done[-1].snapshot.path)[0] == 0
        stop_all(again)
        wait_until(lambda: not alive(pid), 30, "the VMM to be gone")
        wait_until(lambda: forkd_holds(again) == [], 10, "forkd to close what it held")
        assert len(forkd_holds(again, ("pidfd",))) <= 1
    finally:
        d.stop()
        if again:
            again.cleanup()
        kill_leftovers([pid])


def vmm_pids_of(d):
    """Processes whose arguments name d's run directory: its VMMs."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                if run_dir(d).encode() + b"/" in f.read():
                    pids.append(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def spawn_records(d, prefix):
    """The records of VMs named <prefix>-<n> in the run directory, by id."""
    found = {}
    for name in os.listdir(run_dir(d)):
        if not name.endswith(".vm"):
            continue
        try:
            with open(os.path.join(run_dir(d), name)) as f:
                record = json.load(f)
        except (FileNotFoundError, ValueError):
            continue  # replaced or removed while read
        if record["name"].startswith(prefix + "-"):
            found[record["id"]] = record
    return found


def test_kill9_mid_spawn_stops_every_fork_of_it():
    """A Spawn is all or none: forkd killed after the first fork was restored (the second VMM
    is up) leaves forks nobody was told about; the next forkd stops them all and keeps the
    rest, and the snapshot they held is free again."""
    d = VmDaemon("--shutdown-grace-ms", "2000")
    pids = []
    again = None
    try:
        booted = d.boot(mem_mib=32, workload=SLOW_WRITER)
        pids.append(booted.vmm_pid)
        done = d.branch(booted.id, "base")[-1]
        assert done.phase == P.BRANCH_PHASE_DONE, done.error_message
        spawn = forkd_pb2_grpc.ForkdStub(d.channel).Spawn.future(P.SpawnRequest(
            snapshot="base", count=8, name_prefix="half", backend=P.MEMORY_BACKEND_UFFD),
            timeout=scaled(600))
        wait_until(lambda: len(spawn_records(d, "half")) >= 2 or spawn.done(), 120,
                   "the Spawn's second VMM to be up")
        if spawn.done():
            raise AssertionError("the Spawn ended before forkd was killed: %s" %
                                 spawn.exception())
        kill9(d)
        cut = spawn_records(d, "half")
        pids += [r["vmm"]["pid"] for r in cut.values()]
        assert len(cut) >= 2
        again = restart(d)
        listed = vms_by_id(again)
        assert set(listed) == {booted.id}, "forks of the cut Spawn were adopted: %s" % [
            (v.id, v.name, v.state) for v in listed.values() if v.id != booted.id]
        assert listed[booted.id].state == P.VM_STATE_RUNNING
        # Every record of the cut Spawn was read and its VMM proven forkd's (and stopped).
        assert "left alone" not in again.log(), "records %s; the next forkd's log:\n%s" % (
            cut, again.log())
        for record in cut.values():
            pid = record["vmm"]["pid"]
            try:
                wait_until(lambda: not alive(pid), 30, "VMM %d of the cut Spawn to be gone" % pid)
            except AssertionError as e:
                raise AssertionError("%s; records %s; the next forkd's log:\n%s"
                                     % (e, cut, again.log()))
        assert spawn_records(again, "half") == {}
        again.forkd().DeleteSnapshot(P.DeleteSnapshotRequest(name="base"), timeout=30)
        assert leftovers(again) == []
        stop_all(again)
    finally:
        d.stop()
        if again:
            again.cleanup()
        # A VMM launched in the instant before its record was written is known by its
        # arguments only (they name the run directory).
        kill_leftovers(pids + vmm_pids_of(d))


def slow_vmm(workdir):
    """A VMM that takes its time to start: a script that writes its pid, then blocks in a shell
    builtin (no child process) until its FIFO is written, and only then becomes the test VMM."""
    fifo, pidfile = os.path.join(workdir, "start.fifo"), os.path.join(workdir, "vmm.pid")
    os.mkfifo(fifo)
    path = os.path.join(workdir, "slow-vmm")
    with open(path, "w") as f:
        f.write("#!/bin/bash\necho $$ > %s\nread -t 600 <> %s\nexec %s \"$@\"\n"
                % (pidfile, fifo, FORKD_TESTVM))
    os.chmod(path, 0o755)
    return path, pidfile


def test_kill9_while_a_vmm_is_launching_stops_it():
    """forkd killed after it spawned a VMM and before the VMM's API answered (a slow start):
    the VMM is recorded as soon as it is spawned, so the next forkd finds it, proves it its
    own (its arguments name the VM's socket in forkd's run directory) and stops it. Before,
    the first record came only once the API answered, and such a VMM was left running with
    nobody able to prove it was forkd's. The record names the launched process's executable
    (its identity is taken once its exec is complete, not when posix_spawn returns)."""
    home = Daemon(start=False)  # owns the temporary directory both daemons use
    vmm, pidfile = slow_vmm(home.workdir)
    d = Daemon("--vmm-binary", vmm, "--shutdown-grace-ms", "2000", workdir=home.workdir)
    again, pid = None, 0
    try:
        boot = forkd_pb2_grpc.ForkdStub(d.channel).Boot.future(P.BootRequest(
            kernel_image_path=os.environ["FORKD_GUEST"],
            machine=P.MachineConfig(vcpu_count=1, mem_size_mib=16)), timeout=scaled(600))
        wait_until(lambda: os.path.exists(pidfile) and os.path.getsize(pidfile) > 0, 60,
                   "the VMM to be launched")
        with open(pidfile) as f:
            pid = int(f.read())
        wait_until(lambda: os.path.exists(os.path.join(run_dir(d), "vm-1.vm")) or boot.done(),
                   30, "the launching VMM's record")
        assert not boot.done(), "Boot ended before forkd was killed: %s" % boot.exception()
        with open(os.path.join(run_dir(d), "vm-1.vm")) as f:
            launched = json.load(f)["vmm"]
        # Taken once the exec is complete: the launched process's executable, never forkd's.
        live_exe = os.readlink("/proc/%d/exe" % pid)
        assert (launched["pid"], launched["exe"]) == (pid, live_exe), launched
        kill9(d)
        assert alive(pid), "the launching VMM died with forkd"
        again = Daemon("--vmm-binary", vmm, "--shutdown-grace-ms", "2000", workdir=d.workdir)
        wait_until(lambda: not alive(pid), 30, "the launching VMM %d to be stopped" % pid)
        assert vms_by_id(again) == {}
        assert [n for n in os.listdir(run_dir(again))
                if n.startswith("vm-1.") and not n.endswith(".log")] == []
        assert "start was cut short" in again.log(), again.log()
    finally:
        d.stop()
        if again:
            again.cleanup()
        kill_leftovers([pid])
        home.cleanup()


def test_a_planted_record_naming_another_process_is_ignored():
    d = VmDaemon("--shutdown-grace-ms", "2000", start=False)
    os.makedirs(run_dir(d), mode=0o700)
    os.chmod(d.state_dir, 0o700)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(%f)" % scaled(60)])
    planted = os.path.join(run_dir(d), "vm-7.vm")
    try:
        record = {"format_version": 1, "id": "vm-7", "name": "planted",
                  "vmm": {"pid": other.pid, "start_time": start_time(other.pid),
                          "exe": os.readlink("/proc/%d/exe" % other.pid)},
                  "starting": False, "memory": 3, "vcpu_count": 1, "mem_size_mib": 16,
                  "memory_bytes": 16 << 20, "source_snapshot": "", "created_at_unix_ms": 0,
                  "labels": {}, "regions": [], "held": {"memfd_inode": 1, "uffd": False},
                  "branch": "", "exit_reason": ""}
        with open(planted, "w") as f:
            json.dump(record, f)
        os.chmod(planted, 0o600)
        d.start()
        assert vms_by_id(d) == {}
        assert other.poll() is None, "forkd acted on a process it did not start"
        assert os.path.exists(planted), "a record not proven ours is left alone"
        assert "not provably its VMM" in d.log()
        try:
            d.forkd().StopVm(P.StopVmRequest(vm_id="vm-7"), timeout=10)
            raise AssertionError("a planted record's VM is listed")
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.NOT_FOUND
        assert other.poll() is None
    finally:
        d.cleanup()
        other.kill()
        other.wait()
