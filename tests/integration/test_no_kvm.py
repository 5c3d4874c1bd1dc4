"""forkd on a host that cannot run VMs. Where the host has KVM, forkd runs in a private mount
namespace whose /dev/kvm is /dev/null, so this holds on every machine: GetInfo says why KVM is
unusable, and Boot and Spawn refuse with FAILED_PRECONDITION naming that cause, before any VMM is
launched (the VMM binary here records every launch) and leaving nothing in the state directory."""
import os
import stat

import grpc
import pytest

from forkd_harness import Daemon, forkd_pb2, FORKD_TESTVM, FORKD_GUEST

HIDE_KVM = ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            'if [ -e /dev/kvm ]; then mount --bind /dev/null /dev/kvm || exit 1; fi; exec "$@"',
            "hide-kvm"]


@pytest.fixture
def kvmless(tmp_path):
    marker = tmp_path / "vmm-launched"
    vmm = tmp_path / "recording-vmm"
    vmm.write_text('#!/bin/sh\necho "$@" >> "%s"\nexec "%s" "$@"\n' % (marker, FORKD_TESTVM))
    vmm.chmod(vmm.stat().st_mode | stat.S_IXUSR)
    d = Daemon("--vmm-binary", str(vmm), workdir=str(tmp_path), start=False)
    d.args = HIDE_KVM + d.args
    d.start()
    d.marker = marker
    yield d
    d.cleanup()


def state_files(daemon):
    found = []
    for root, _, files in os.walk(daemon.state_dir):
        found += [os.path.join(root, f) for f in files if f != "forkd.lock"]
    return found


def test_get_info_names_why_kvm_is_unusable(kvmless):
    host = kvmless.forkd().GetInfo(forkd_pb2.GetInfoRequest(), timeout=10).host
    assert not host.kvm_usable
    assert host.kvm_error.startswith(("open /dev/kvm: ", "KVM_GET_API_VERSION: ")), host.kvm_error
    assert not host.live_branch_supported


def test_boot_and_spawn_refuse_before_any_vmm_starts(kvmless):
    host = kvmless.forkd().GetInfo(forkd_pb2.GetInfoRequest(), timeout=10).host
    expected = "KVM is not usable on this host: " + host.kvm_error
    before = state_files(kvmless)
    boot = forkd_pb2.BootRequest(
        kernel_image_path=FORKD_GUEST, boot_args="pattern=random",
        machine=forkd_pb2.MachineConfig(vcpu_count=1, mem_size_mib=32))
    for _ in range(3):
        with pytest.raises(grpc.RpcError) as refused:
            kvmless.forkd().Boot(boot, timeout=30)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert expected in refused.value.details()
    for backend in (forkd_pb2.MEMORY_BACKEND_FILE, forkd_pb2.MEMORY_BACKEND_MEMFD,
                    forkd_pb2.MEMORY_BACKEND_UFFD):
        with pytest.raises(grpc.RpcError) as refused:
            kvmless.forkd().Spawn(forkd_pb2.SpawnRequest(snapshot="any", count=2,
                                                         backend=backend), timeout=30)
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert expected in refused.value.details()
    assert not kvmless.marker.exists(), "a VMM was launched: " + kvmless.marker.read_text()
    assert state_files(kvmless) == before, "refused calls left files behind"
    assert len(kvmless.forkd().ListVms(forkd_pb2.ListVmsRequest(), timeout=10).vms) == 0
