"""VMs with Firecracker's devices, end to end on real KVM: a real forkd launching the real test
VMM with drives, network interfaces, a vsock and an initrd; GetVm, GetSnapshot and the VMM
itself (GET /) describe them, the VM record keeps them across a forkd restart, a Spawn
refuses a read-only drive whose file changed since the branch, and forks of a VM with a tap
and a vsock each get their own through Spawn's overrides."""
import os
import signal
import subprocess

import grpc
import pytest

from forkd_harness import VmDaemon, forkd_pb2, scaled, verify_snapshot, vmm_get, wait_until

P = forkd_pb2


@pytest.fixture
def forkd():
    d = VmDaemon("--shutdown-grace-ms", "5000")
    yield d
    d.cleanup()


def make_file(path, size=1 << 20, fill=b"\0"):
    with open(path, "wb") as f:
        f.write(fill * size)
    return path


def devices_request(d, tmp):
    rootfs = make_file(os.path.join(tmp, "rootfs.ext4"), fill=b"r")
    data = make_file(os.path.join(tmp, "data.img"))
    initrd = make_file(os.path.join(tmp, "initrd.img"), 4096, b"i")
    return dict(
        initrd_path=initrd,
        drives=[P.Drive(drive_id="rootfs", path_on_host=rootfs, is_root_device=True,
                        is_read_only=True),
                P.Drive(drive_id="data", path_on_host=data)],
        network_interfaces=[P.NetworkInterface(iface_id="eth0", host_dev_name="fk-tap0",
                                               guest_mac="06:00:ac:10:00:02")],
        vsock=P.Vsock(guest_cid=7, uds_path=os.path.join(tmp, "v.sock")))


def boot_with(d, vcpus=1, **devices):
    request = P.BootRequest(kernel_image_path=os.environ["FORKD_GUEST"],
                            boot_args="pattern=random",
                            machine=P.MachineConfig(vcpu_count=vcpus, mem_size_mib=64), **devices)
    return d.forkd().Boot(request, timeout=60)


def describe(message):
    """The device fields of a Vm or a Snapshot, comparable across messages."""
    return dict(
        initrd=message.initrd_path,
        drives=[(x.drive_id, x.path_on_host, x.is_read_only, x.is_root_device)
                for x in message.drives],
        nets=[(x.iface_id, x.host_dev_name, x.guest_mac) for x in message.network_interfaces],
        vsock=(message.vsock.guest_cid, message.vsock.uds_path)
        if message.HasField("vsock") else None)


def expected(request):
    return dict(
        initrd=request["initrd_path"],
        drives=[(x.drive_id, x.path_on_host, x.is_read_only, x.is_root_device)
                for x in request["drives"]],
        nets=[(x.iface_id, x.host_dev_name, x.guest_mac) for x in request["network_interfaces"]],
        vsock=(request["vsock"].guest_cid, request["vsock"].uds_path))


def test_boot_with_devices_is_described_completely_and_survives_a_restart(forkd):
    tmp = forkd.workdir
    request = devices_request(forkd, tmp)
    vm = boot_with(forkd, **request)
    assert describe(vm) == expected(request)
    st = os.stat(request["drives"][0].path_on_host)
    assert vm.drives[0].identity.size_bytes == st.st_size
    assert vm.drives[0].identity.inode == st.st_ino
    assert vm.drives[0].identity.mtime_unix_ns == st.st_mtime_ns
    # The VMM got them through Firecracker's endpoints.
    vmm = vmm_get(vm)
    assert [(x["drive_id"], x["path_on_host"], x["is_read_only"], x["is_root_device"])
            for x in vmm["drives"]] == expected(request)["drives"]
    assert [(x["iface_id"], x["host_dev_name"], x["guest_mac"])
            for x in vmm["network_interfaces"]] == expected(request)["nets"]
    assert (vmm["vsock"]["guest_cid"], vmm["vsock"]["uds_path"]) == expected(request)["vsock"]
    assert vmm["initrd_path"] == request["initrd_path"]
    # The durable record keeps them: a forkd killed with -9 and started again describes them.
    forkd.signal(signal.SIGKILL)
    forkd.wait()
    forkd.stop()
    again = VmDaemon("--shutdown-grace-ms", "5000", workdir=forkd.workdir)
    try:
        adopted = again.forkd().GetVm(P.GetVmRequest(vm_id=vm.id), timeout=30)
        assert adopted.state == P.VM_STATE_RUNNING
        assert describe(adopted) == expected(request)
        assert adopted.drives[0].identity == vm.drives[0].identity
        again.forkd().StopVm(P.StopVmRequest(vm_id=vm.id), timeout=60)
    finally:
        again.cleanup()


def test_branch_records_devices_and_spawn_refuses_a_changed_read_only_drive(forkd):
    tmp = forkd.workdir
    request = devices_request(forkd, tmp)
    del request["drives"][1]  # read-only root only: nothing to capture
    vm = boot_with(forkd, **request)
    events = forkd.branch(vm.id, "base")
    assert events[-1].phase == P.BRANCH_PHASE_DONE, events[-1].error_message
    snapshot = forkd.forkd().GetSnapshot(P.GetSnapshotRequest(name="base"), timeout=10)
    assert describe(snapshot) == expected(request)
    rootfs = request["drives"][0].path_on_host
    assert snapshot.drives[0].identity.size_bytes == os.stat(rootfs).st_size
    code, output = verify_snapshot(snapshot.path)
    assert code == 0, output
    # snapshot.json keeps them: a forkd started again on the state directory reads them back.
    forkd.signal(signal.SIGKILL)
    forkd.wait()
    forkd.stop()
    again = VmDaemon("--shutdown-grace-ms", "5000", workdir=forkd.workdir)
    try:
        reread = again.forkd().GetSnapshot(P.GetSnapshotRequest(name="base"), timeout=10)
        assert describe(reread) == expected(request)
        assert reread.drives[0].identity == snapshot.drives[0].identity
        # Two forks cannot share the tap or the vsock socket: without overrides, refused
        # saying which override to give.
        with pytest.raises(grpc.RpcError) as error:
            again.forkd().Spawn(P.SpawnRequest(snapshot="base", count=2), timeout=60)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
        assert ("interface 'eth0' uses tap fk-tap0, which two forks cannot share: give "
                "network_overrides {iface_id: \"eth0\"") in error.value.details()
        # One fork cannot have them either while the source VM runs: a VMM opens a tap for
        # itself alone and binds its socket path.
        with pytest.raises(grpc.RpcError) as error:
            again.forkd().Spawn(P.SpawnRequest(snapshot="base", count=1), timeout=60)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION, error.value.details()
        assert ("fork 0's interface 'eth0' would use tap fk-tap0, which VM %s uses" % vm.id
                ) in error.value.details()
        one = P.SpawnRequest(snapshot="base", count=1,
                             network_overrides=[P.NetworkOverride(iface_id="eth0",
                                                                  host_dev_name="fk-one")],
                             vsock_override=P.VsockOverride(uds_path=os.path.join(tmp, "1.sock")))
        forks = list(again.forkd().Spawn(one, timeout=60).vms)
        assert describe(forks[0]) == dict(
            expected(request), nets=[("eth0", "fk-one", "06:00:ac:10:00:02")],
            vsock=(request["vsock"].guest_cid, os.path.join(tmp, "1.sock")))
        forks += spawn_with_overrides(again, tmp, request)
        one.network_overrides[0].host_dev_name = "fk-two"
        with pytest.raises(grpc.RpcError) as error:
            again.forkd().Spawn(one, timeout=60)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION, error.value.details()
        assert ("fork 0's vsock would bind socket %s, which VM %s uses"
                % (os.path.join(tmp, "1.sock"), forks[0].id)) in error.value.details()
        # The read-only root changes under the snapshot: a fork would see another disk.
        with open(rootfs, "r+b") as f:
            f.write(b"changed")
        with pytest.raises(grpc.RpcError) as error:
            again.forkd().Spawn(P.SpawnRequest(snapshot="base", count=1), timeout=60)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION, error.value.details()
        assert "rootfs" in error.value.details() and "changed" in error.value.details()
        assert len(again.forkd().ListVms(P.ListVmsRequest(), timeout=10).vms) == 1 + len(forks)
        for vm_id in [vm.id] + [f.id for f in forks]:
            again.forkd().StopVm(P.StopVmRequest(vm_id=vm_id), timeout=60)
    finally:
        again.cleanup()


def spawn_with_overrides(d, tmp, request):
    """Forks of a snapshot whose VM has a tap and a vsock, each with its own: what a Spawn's
    overrides must cover is checked against the snapshot before any fork starts, and each fork
    (GetVm and its VMM's GET /) names its own tap and socket, with the snapshot's MAC."""
    stub = d.forkd()
    tap = P.NetworkOverride(iface_id="eth0", host_dev_name="fk-t{i}")
    sockets = os.path.join(tmp, "vsock-{i}-{vm_id}.sock")
    refusals = [
        (dict(network_overrides=[tap]),
         "vsock uses socket %s, which two forks cannot share: give vsock_override"
         % request["vsock"].uds_path),
        (dict(network_overrides=[tap, P.NetworkOverride(iface_id="eth1",
                                                        host_dev_name="fk-u{i}")],
              vsock_override=P.VsockOverride(uds_path=sockets)),
         "network_overrides[1].iface_id 'eth1': the VM of snapshot base has no such interface "
         "(its interfaces: eth0)"),
    ]
    for overrides, message in refusals:
        with pytest.raises(grpc.RpcError) as error:
            stub.Spawn(P.SpawnRequest(snapshot="base", count=2, **overrides), timeout=60)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
        assert message in error.value.details()
    forks = stub.Spawn(P.SpawnRequest(snapshot="base", count=2, name_prefix="own",
                                      network_overrides=[tap],
                                      vsock_override=P.VsockOverride(uds_path=sockets)),
                       timeout=120).vms
    mac = request["network_interfaces"][0].guest_mac
    for i, fork in enumerate(forks):
        own_tap, own_socket = "fk-t%d" % i, sockets.format(i=i, vm_id=fork.id)
        for seen in (fork, stub.GetVm(P.GetVmRequest(vm_id=fork.id), timeout=10)):
            assert describe(seen)["nets"] == [("eth0", own_tap, mac)]
            assert describe(seen)["vsock"] == (request["vsock"].guest_cid, own_socket)
        vmm = vmm_get(fork)
        assert [(x["iface_id"], x["host_dev_name"], x["guest_mac"])
                for x in vmm["network_interfaces"]] == [("eth0", own_tap, mac)]
        assert vmm["vsock"]["uds_path"] == own_socket
    # The same patterns again while those forks run: their taps are taken.
    with pytest.raises(grpc.RpcError) as error:
        stub.Spawn(P.SpawnRequest(snapshot="base", count=1, network_overrides=[tap],
                                  vsock_override=P.VsockOverride(uds_path=sockets)), timeout=60)
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION, error.value.details()
    assert "would use tap fk-t0, which VM %s uses" % forks[0].id in error.value.details()
    return list(forks)


def test_missing_drive_file_is_not_found_and_nothing_starts(forkd):
    tmp = forkd.workdir
    with pytest.raises(grpc.RpcError) as error:
        boot_with(forkd, drives=[P.Drive(drive_id="rootfs",
                                         path_on_host=os.path.join(tmp, "missing.img"))])
    assert error.value.code() == grpc.StatusCode.NOT_FOUND, error.value.details()
    assert "drives[0].path_on_host" in error.value.details()
    assert list(forkd.forkd().ListVms(P.ListVmsRequest(), timeout=10).vms) == []


# ---- writable drives: captured inside the pause, forks get their own ---------------------------

@pytest.fixture
def xfs(tmp_path):
    """A fresh XFS file system (reflink on: mkfs.xfs's default) on a loop device, mounted for
    the test: forkd's state directory and the drives live there."""
    image = tmp_path / "xfs.img"
    mount = tmp_path / "mnt"
    mount.mkdir()
    with open(image, "wb") as f:
        f.truncate(1 << 30)
    loop = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                          capture_output=True, text=True).stdout.strip()
    try:
        subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", loop], check=True)
        subprocess.run(["mount", loop, str(mount)], check=True)
        try:
            yield str(mount)
        finally:
            subprocess.run(["umount", "-l", str(mount)], check=False)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


def disk_word(path, vcpu):
    """What the guest last wrote to its disk for a vCPU (tests/vmm/guest_layout.h)."""
    with open(path, "rb") as f:
        f.seek(4096 + 8 * vcpu)
        data = f.read(8)
    return int.from_bytes(data.ljust(8, b"\0"), "little")


def verify_with_disk(snapshot_dir, disk):
    result = subprocess.run([os.environ["FORKD_TESTVM"], "verify", snapshot_dir, "--disk", disk],
                            capture_output=True, text=True, timeout=scaled(120))
    return result.returncode, result.stdout + result.stderr


def boot_writing_disk(d, data, vcpus=2):
    vm = boot_with(d, drives=[P.Drive(drive_id="data", path_on_host=data)], vcpus=vcpus)
    wait_until(lambda: all(disk_word(data, v) for v in range(vcpus)), 60,
               "the guest to write its disk")
    return vm


def done(events):
    assert events[-1].phase == P.BRANCH_PHASE_DONE, events[-1].error_message
    return events[-1]


def test_live_branch_of_a_vm_writing_its_disk_verifies_memory_vcpus_and_disk(xfs):
    os.makedirs(os.path.join(xfs, "forkd"))
    d = VmDaemon("--shutdown-grace-ms", "5000", workdir=os.path.join(xfs, "forkd"))
    try:
        # The pause window without and with a writable drive, on the same daemon and file
        # system (printed for the record; medians of three LIVE branches, no assertion).
        plain = boot_with(d, vcpus=2)
        data = make_file(os.path.join(xfs, "data.img"), 8 << 20)
        vm = boot_writing_disk(d, data)
        pauses = {}
        for label, target in (("no drive", plain), ("writable 8 MiB drive", vm)):
            figures = []
            for i in range(3):
                name = "pause-%s-%d" % (target.id, i)
                figures.append(done(d.branch(target.id, name)).figures)
                d.forkd().DeleteSnapshot(P.DeleteSnapshotRequest(name=name), timeout=30)
            pauses[label] = sorted(f.pause_ns for f in figures)[1]
            capture = sorted(f.disk_capture_ns for f in figures)[1]
            print("LIVE branch pause on XFS, %s: median %.3f ms (disk capture %.3f ms)"
                  % (label, pauses[label] / 1e6, capture / 1e6))
        for mode in (P.BRANCH_MODE_LIVE, P.BRANCH_MODE_FULL):
            name = "live" if mode == P.BRANCH_MODE_LIVE else "full"
            event = done(d.branch(vm.id, name, mode=mode))
            figures = event.figures
            assert figures.disk_capture_ns > 0
            assert figures.disk_copied_bytes == 0, "reflinks on XFS: no copy inside the pause"
            assert figures.disk_capture_ns < figures.pause_ns
            print("%s branch with a writable 8 MiB drive (XFS reflink): pause %.3f ms, of which "
                  "disk capture %.3f ms" % (name, figures.pause_ns / 1e6,
                                             figures.disk_capture_ns / 1e6))
            snapshot = event.snapshot
            captured = os.path.join(snapshot.path, "drive-data")
            code, output = verify_with_disk(snapshot.path, captured)
            assert code == 0, output
            assert "disk agrees" in output
            again = d.forkd().GetSnapshot(P.GetSnapshotRequest(name=name), timeout=10)
            assert again.figures.disk_capture_ns == figures.disk_capture_ns
        # A capture from another instant than the snapshot's memory is caught.
        code, output = verify_with_disk(snapshot.path, data)
        assert code == 1, output
    finally:
        d.cleanup()


def test_forks_of_a_branch_each_write_their_own_disk(xfs):
    os.makedirs(os.path.join(xfs, "forkd"))
    d = VmDaemon("--shutdown-grace-ms", "5000", workdir=os.path.join(xfs, "forkd"))
    try:
        data = make_file(os.path.join(xfs, "data.img"), 8 << 20)
        vm = boot_writing_disk(d, data)
        base = done(d.branch(vm.id, "base")).snapshot
        captured = os.path.join(base.path, "drive-data")
        with open(captured, "rb") as f:
            captured_bytes = f.read()
        forks = d.forkd().Spawn(P.SpawnRequest(snapshot="base", count=2,
                                               backend=P.MEMORY_BACKEND_MEMFD), timeout=120).vms
        paths = [f.drives[0].path_on_host for f in forks]
        assert len(set(paths + [data, captured])) == 4, paths
        start = [disk_word(captured, v) for v in range(2)]
        for path in paths:
            wait_until(lambda: all(disk_word(path, v) != start[v] for v in range(2)), 60,
                       "a fork to write its own disk")
        # The snapshot's capture is untouched by the forks.
        with open(captured, "rb") as f:
            assert f.read() == captured_bytes
        # A snapshot deleted under running forks breaks none of them: their disks are theirs.
        d.forkd().DeleteSnapshot(P.DeleteSnapshotRequest(name="base", force=True), timeout=30)
        for i, fork in enumerate(forks):
            snapshot = done(d.branch(fork.id, "fork%d" % i)).snapshot
            code, output = verify_with_disk(snapshot.path,
                                            os.path.join(snapshot.path, "drive-data"))
            assert code == 0, output
        d.forkd().StopVm(P.StopVmRequest(vm_id=forks[0].id), timeout=60)
        assert not os.path.exists(paths[0]), "a stopped fork's disk is removed"
        assert os.path.exists(paths[1])
    finally:
        d.cleanup()


def test_branch_is_refused_before_any_pause_where_the_state_directory_cannot_reflink(forkd):
    # The test's default directory: tmpfs (or overlayfs on tmpfs, or ext4): no FICLONE.
    data = make_file(os.path.join(forkd.workdir, "data.img"), 4 << 20)
    vm = boot_writing_disk(forkd, data)
    with pytest.raises(grpc.RpcError) as error:
        forkd.branch(vm.id, "refused")
    assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION, error.value.details()
    assert "XFS" in error.value.details() and "reflink" in error.value.details()
    # Nothing was paused, nothing is left in the store, the VM runs on.
    assert vmm_get(vm)["pause_count"] == 0
    snapshots = os.path.join(forkd.state_dir, "snapshots")
    assert os.listdir(snapshots) == []
    assert list(forkd.forkd().ListSnapshots(P.ListSnapshotsRequest(), timeout=10).snapshots) == []
    now = disk_word(data, 0)
    wait_until(lambda: disk_word(data, 0) != now, 60, "the guest to go on writing")
    # Accepting a copy inside the pause: done, and the figures say the pause included it.
    event = done(forkd.branch(vm.id, "copied", allow_disk_copy_in_pause=True))
    assert event.figures.disk_copied_bytes == 4 << 20
    print("LIVE branch with a 4 MiB drive copied inside the pause: pause %.3f ms, of which disk "
          "copy %.3f ms" % (event.figures.pause_ns / 1e6, event.figures.disk_capture_ns / 1e6))
    code, output = verify_with_disk(event.snapshot.path,
                                    os.path.join(event.snapshot.path, "drive-data"))
    assert code == 0, output


def test_a_fork_of_a_stopped_fork_gets_its_disk_and_a_gone_user_drive_is_named(forkd):
    """The VMM reopens each drive at the path the snapshot's state names before forkd re-points
    it. A snapshot of a fork names the fork's own clone, removed when that fork stopped: a
    Spawn from it still starts (forkd puts a stand-in there for the load, then removes it),
    and its fork writes a disk of its own that verifies. A user's drive file that is gone is a
    FAILED_PRECONDITION naming it, with nothing started."""
    stub = forkd.forkd()
    data = make_file(os.path.join(forkd.workdir, "data.img"), 4 << 20)
    vm = boot_writing_disk(forkd, data, vcpus=1)
    done(forkd.branch(vm.id, "base", allow_disk_copy_in_pause=True))
    fork, = stub.Spawn(P.SpawnRequest(snapshot="base", count=1,
                                      backend=P.MEMORY_BACKEND_MEMFD), timeout=120).vms
    clone = fork.drives[0].path_on_host
    done(forkd.branch(fork.id, "of-fork", allow_disk_copy_in_pause=True))
    stub.StopVm(P.StopVmRequest(vm_id=fork.id), timeout=60)
    assert not os.path.exists(clone)
    second, = stub.Spawn(P.SpawnRequest(snapshot="of-fork", count=1,
                                        backend=P.MEMORY_BACKEND_MEMFD), timeout=120).vms
    own = second.drives[0].path_on_host
    assert own != clone and not os.path.exists(clone), "the stand-in is removed"
    start = disk_word(own, 0)
    wait_until(lambda: disk_word(own, 0) != start, 60, "the second fork to write its own disk")
    event = done(forkd.branch(second.id, "of-second", allow_disk_copy_in_pause=True))
    code, output = verify_with_disk(event.snapshot.path,
                                    os.path.join(event.snapshot.path, "drive-data"))
    assert code == 0, output

    stub.StopVm(P.StopVmRequest(vm_id=vm.id), timeout=60)
    os.unlink(data)
    before = {v.id for v in stub.ListVms(P.ListVmsRequest(), timeout=10).vms}
    with pytest.raises(grpc.RpcError) as gone:
        stub.Spawn(P.SpawnRequest(snapshot="base", count=1, backend=P.MEMORY_BACKEND_MEMFD),
                   timeout=120)
    assert gone.value.code() == grpc.StatusCode.FAILED_PRECONDITION, gone.value.details()
    assert data in gone.value.details() and "no longer exists" in gone.value.details()
    assert {v.id for v in stub.ListVms(P.ListVmsRequest(), timeout=10).vms} == before
