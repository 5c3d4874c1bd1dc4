"""Boot's device fields (drives, network interfaces, vsock, initrd) and Spawn's per-fork
overrides (network_overrides, vsock_override) checked up front: a real forkd refuses bad ones
with INVALID_ARGUMENT naming the field, before any VMM starts. Needs no KVM: the service checks
them before the engine looks at the host (what needs the snapshot's devices is checked by the
engine, tests/unit/devices_test.cc and tests/integration/test_disks.py)."""
import grpc
import pytest

from forkd_harness import VmDaemon, forkd_pb2

P = forkd_pb2


@pytest.fixture
def forkd():
    d = VmDaemon("--shutdown-grace-ms", "1000")
    yield d
    d.cleanup()


def boot_request(**devices):
    return P.BootRequest(kernel_image_path="/guest.bin",
                         machine=P.MachineConfig(vcpu_count=1, mem_size_mib=64), **devices)


def drive(drive_id="rootfs", path="/disk.img", **kwargs):
    return P.Drive(drive_id=drive_id, path_on_host=path, **kwargs)


def nic(iface_id="eth0", tap="tap0", mac="06:00:ac:10:00:02"):
    return P.NetworkInterface(iface_id=iface_id, host_dev_name=tap, guest_mac=mac)


BAD = [
    ("drives[0].drive_id", dict(drives=[drive(drive_id="")])),
    ("drives[0].drive_id", dict(drives=[drive(drive_id="a/b")])),
    ("drives[0].drive_id", dict(drives=[drive(drive_id="x" * 64)])),
    ("drives[1].drive_id", dict(drives=[drive(), drive(path="/other.img")])),
    ("drives[0].path_on_host", dict(drives=[drive(path="")])),
    ("drives[0].path_on_host", dict(drives=[drive(path="relative/disk.img")])),
    ("drives[0].path_on_host", dict(drives=[drive(path="/a/../etc/shadow")])),
    ("drives[0].path_on_host", dict(drives=[drive(path="/" + "p" * 2000)])),
    ("drives[1].is_root_device", dict(drives=[drive(is_root_device=True),
                                              drive("data", "/d.img", is_root_device=True)])),
    ("drives: at most 8", dict(drives=[drive("d%d" % i, "/d%d" % i) for i in range(9)])),
    ("network_interfaces[0].iface_id", dict(network_interfaces=[nic(iface_id="")])),
    ("network_interfaces[0].host_dev_name", dict(network_interfaces=[nic(tap="")])),
    ("network_interfaces[0].host_dev_name", dict(network_interfaces=[nic(tap="t" * 16)])),
    ("network_interfaces[0].host_dev_name", dict(network_interfaces=[nic(tap="../tap")])),
    ("network_interfaces[0].guest_mac", dict(network_interfaces=[nic(mac="06:00:ac:10:00")])),
    ("network_interfaces[0].guest_mac", dict(network_interfaces=[nic(mac="zz:00:ac:10:00:02")])),
    ("network_interfaces[0].guest_mac", dict(network_interfaces=[nic(mac="01:00:ac:10:00:02")])),
    ("network_interfaces[1].iface_id", dict(network_interfaces=[nic(), nic(tap="tap1",
                                                                           mac="")])),
    ("network_interfaces[1].host_dev_name",
     dict(network_interfaces=[nic(), nic(iface_id="eth1", mac="06:00:ac:10:00:03")])),
    ("network_interfaces[1].guest_mac", dict(network_interfaces=[nic(), nic("eth1", "tap1")])),
    ("network_interfaces: at most 4",
     dict(network_interfaces=[nic("e%d" % i, "tap%d" % i, "") for i in range(5)])),
    ("vsock.guest_cid", dict(vsock=P.Vsock(guest_cid=2, uds_path="/v.sock"))),
    ("vsock.guest_cid", dict(vsock=P.Vsock(uds_path="/v.sock"))),
    ("vsock.uds_path", dict(vsock=P.Vsock(guest_cid=3, uds_path="v.sock"))),
    ("vsock.uds_path", dict(vsock=P.Vsock(guest_cid=3, uds_path="/" + "s" * 120))),
    ("initrd_path", dict(initrd_path="initrd.img")),
]


@pytest.mark.parametrize("field,devices", BAD, ids=[b[0] + "-%d" % i for i, b in enumerate(BAD)])
def test_bad_device_is_refused_naming_the_field(forkd, field, devices):
    stub = forkd.forkd()
    with pytest.raises(grpc.RpcError) as error:
        stub.Boot(boot_request(**devices), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert field in error.value.details()
    assert list(stub.ListVms(P.ListVmsRequest(), timeout=10).vms) == []


def test_nul_in_a_drive_path_is_refused(forkd):
    with pytest.raises(grpc.RpcError) as error:
        forkd.forkd().Boot(boot_request(drives=[drive(path="/disk.img\0../../etc")]), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "path_on_host" in error.value.details()


def tap(iface_id="eth0", pattern="tap{i}", mac=""):
    return P.NetworkOverride(iface_id=iface_id, host_dev_name=pattern, guest_mac=mac)


def vsock_at(pattern):
    return P.VsockOverride(uds_path=pattern)


BAD_SPAWN = [
    ("network_overrides[0].guest_mac: a fork's MAC cannot be changed",
     2, dict(network_overrides=[tap(mac="06:00:ac:10:00:09")])),
    ("network_overrides[0].host_dev_name 'tap0': 2 forks would share this tap",
     2, dict(network_overrides=[tap(pattern="tap0")])),
    ("{vm_id} is not allowed in a tap name", 1, dict(network_overrides=[tap(pattern="t{vm_id}")])),
    ("network_overrides[0].host_dev_name 'tap{x}': unknown placeholder",
     2, dict(network_overrides=[tap(pattern="tap{x}")])),
    ("network_overrides[0].host_dev_name 'tap-abcdefghi{i}' for fork 100",
     101, dict(network_overrides=[tap(pattern="tap-abcdefghi{i}")])),
    ("network_overrides[0].host_dev_name: 300 bytes, at most 255",
     1, dict(network_overrides=[tap(pattern="t" * 300)])),
    ("network_overrides[0].iface_id", 1, dict(network_overrides=[tap(iface_id="a/b")])),
    ("network_overrides[1].iface_id 'eth0' is also network_overrides[0]'s",
     2, dict(network_overrides=[tap(), tap(pattern="u{i}")])),
    ("network_overrides[1].host_dev_name 'a1{i}' gives fork 0 tap a10",
     12, dict(network_overrides=[tap(pattern="a{i}"), tap("eth1", "a1{i}")])),
    ("network_overrides: at most 4",
     1, dict(network_overrides=[tap("e%d" % i, "t%d" % i) for i in range(5)])),
    ("vsock_override.uds_path must be an absolute path",
     2, dict(vsock_override=vsock_at("vsock-{i}.sock"))),
    ("vsock_override.uds_path '/run/v.sock': 2 forks would share this socket",
     2, dict(vsock_override=vsock_at("/run/v.sock"))),
    ("longest VM id) vsock_override.uds_path",
     1, dict(vsock_override=vsock_at("/" + "s" * 90 + "{vm_id}"))),
    ("vsock_override.uds_path: a path is required", 1, dict(vsock_override=vsock_at(""))),
]


@pytest.mark.parametrize("message,count,overrides", BAD_SPAWN,
                         ids=["spawn-%d" % i for i in range(len(BAD_SPAWN))])
def test_bad_spawn_override_is_refused_naming_the_field(forkd, message, count, overrides):
    stub = forkd.forkd()
    with pytest.raises(grpc.RpcError) as error:
        stub.Spawn(P.SpawnRequest(snapshot="base", count=count, **overrides), timeout=30)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert message in error.value.details()
    assert list(stub.ListVms(P.ListVmsRequest(), timeout=10).vms) == []


def test_good_spawn_overrides_pass_the_request_checks(forkd):
    """Patterns that fit go on to the engine, which then looks at the host and the snapshot
    (this one has neither KVM nor the snapshot, or not both): never INVALID_ARGUMENT."""
    request = P.SpawnRequest(snapshot="base", count=256,
                             network_overrides=[tap(pattern="tap-abcdefg{i}"),
                                                tap("eth1", "fk{i}-eth1")],
                             vsock_override=vsock_at("/run/forkd/vsock-{i}-{vm_id}.sock"))
    with pytest.raises(grpc.RpcError) as error:
        forkd.forkd().Spawn(request, timeout=30)
    assert error.value.code() in (grpc.StatusCode.FAILED_PRECONDITION,
                                  grpc.StatusCode.NOT_FOUND), error.value.details()
