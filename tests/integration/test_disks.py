"""VMs with Firecracker's devices, end to end on real KVM: a real forkd launching the real test
VMM with drives, network interfaces, a vsock and an initrd; GetVm, GetSnapshot and the VMM
itself (GET /) describe them, the VM record keeps them across a forkd restart, and a Spawn
refuses a read-only drive whose file changed since the branch."""
import http.client
import json
import os
import signal
import socket

import grpc
import pytest

from forkd_harness import VmDaemon, forkd_pb2, verify_snapshot

P = forkd_pb2


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path):
        super().__init__("localhost")
        self._path = path

    def connect(self):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(self._path)


def vmm_get(vm):
    """The VMM's own description of itself (the test VMM's GET /)."""
    connection = UnixHTTPConnection(vm.api_socket_path)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        assert response.status == 200
        return json.loads(response.read())
    finally:
        connection.close()


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


def boot_with(d, **devices):
    request = P.BootRequest(kernel_image_path=os.environ["FORKD_GUEST"],
                            boot_args="pattern=random",
                            machine=P.MachineConfig(vcpu_count=1, mem_size_mib=64), **devices)
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
        forks = again.forkd().Spawn(P.SpawnRequest(snapshot="base", count=1), timeout=60).vms
        assert describe(forks[0]) == expected(request)
        # The read-only root changes under the snapshot: a fork would see another disk.
        with open(rootfs, "r+b") as f:
            f.write(b"changed")
        with pytest.raises(grpc.RpcError) as error:
            again.forkd().Spawn(P.SpawnRequest(snapshot="base", count=1), timeout=60)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION, error.value.details()
        assert "rootfs" in error.value.details() and "changed" in error.value.details()
        assert len(again.forkd().ListVms(P.ListVmsRequest(), timeout=10).vms) == 2
        for vm_id in (vm.id, forks[0].id):
            again.forkd().StopVm(P.StopVmRequest(vm_id=vm_id), timeout=60)
    finally:
        again.cleanup()


def test_missing_drive_file_is_not_found_and_nothing_starts(forkd):
    tmp = forkd.workdir
    with pytest.raises(grpc.RpcError) as error:
        boot_with(forkd, drives=[P.Drive(drive_id="rootfs",
                                         path_on_host=os.path.join(tmp, "missing.img"))])
    assert error.value.code() == grpc.StatusCode.NOT_FOUND, error.value.details()
    assert "drives[0].path_on_host" in error.value.details()
    assert list(forkd.forkd().ListVms(P.ListVmsRequest(), timeout=10).vms) == []
