"""Guest memory in 2 MiB huge pages (hugetlbfs), end to end on real KVM: a real forkd boots the
test VMM with huge_pages "2M" on a hugetlbfs memfd it owns, LIVE and FULL branches of it (and of
its forks) write-protect and copy 2 MiB pages and pass the verifier, MEMFD and UFFD forks run on
huge pages, FILE forks are refused, and a host short of free huge pages gets a boot refused by
name with nothing left behind.

The test reserves the huge pages it needs (vm.nr_hugepages) and puts the setting back."""
import os

import grpc
import pytest

from forkd_harness import (FREE_HUGEPAGES, NR_HUGEPAGES, RESERVED_HUGEPAGES, VmDaemon, forkd_pb2,
                           read_int, reserve_huge_pages, verify_snapshot, vmm_get, wait_until,
                           write_int)

P = forkd_pb2
HUGE = 2 << 20
GUEST_MIB = 64


@pytest.fixture
def huge_pages():
    """Makes free 2 MiB pages for a few 64 MiB guests (a booted VM, a MEMFD and a UFFD fork,
    and the branches' own maps); puts vm.nr_hugepages back afterwards."""
    try:
        before = reserve_huge_pages(4 * GUEST_MIB * (1 << 20) // HUGE)
    except RuntimeError as e:
        pytest.fail(str(e))
    yield
    write_int(NR_HUGEPAGES, before)


@pytest.fixture
def forkd():
    d = VmDaemon("--shutdown-grace-ms", "5000")
    yield d
    d.cleanup()


def huge_page_mappings(pid):
    """Sizes of the VMM's mappings whose pages are 2 MiB (hugetlbfs): the guest's memory, and
    nothing else of a VMM (a sanitizer's shadow maps are big but of 4 KiB pages)."""
    found, size = [], None
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            key = line.split(":")[0]
            if key == "Size":
                size = int(line.split()[1]) * 1024
            elif key == "KernelPageSize" and int(line.split()[1]) * 1024 == HUGE:
                found.append(size)
    return found


def assert_on_huge_pages(vm):
    mappings = huge_page_mappings(vm.vmm_pid)
    assert sum(mappings) == GUEST_MIB << 20, mappings
    assert vmm_get(vm)["huge_pages"] == "2M"


def progress(vm):
    return sum(vmm_get(vm)["guest_progress"])


def assert_running(vm):
    start = progress(vm)
    wait_until(lambda: progress(vm) > start, 60, "the guest of %s to make progress" % vm.id)


def boot_huge(d, vcpus=2):
    request = P.BootRequest(kernel_image_path=os.environ["FORKD_GUEST"],
                            boot_args="pattern=random",
                            machine=P.MachineConfig(vcpu_count=vcpus, mem_size_mib=GUEST_MIB,
                                                    huge_pages=P.HUGE_PAGES_2M))
    return d.forkd().Boot(request, timeout=60)


def verified_branch(d, vm_id, name, mode=P.BRANCH_MODE_LIVE):
    events = d.branch(vm_id, name, mode=mode)
    assert events[-1].phase == P.BRANCH_PHASE_DONE, events[-1].error_message
    snapshot = events[-1].snapshot
    assert snapshot.machine.huge_pages == P.HUGE_PAGES_2M
    assert events[-1].progress.page_size == HUGE
    code, output = verify_snapshot(snapshot.path)
    assert code == 0, output
    return snapshot


def test_branches_and_forks_of_a_huge_page_vm_verify_on_2mib_pages(huge_pages, forkd):
    vm = boot_huge(forkd)
    assert vm.machine.huge_pages == P.HUGE_PAGES_2M
    assert vm.memory_backend == P.MEMORY_BACKEND_MEMFD
    assert_on_huge_pages(vm)
    assert_running(vm)
    for i in range(2):
        verified_branch(forkd, vm.id, "live-%d" % i)
    verified_branch(forkd, vm.id, "full", mode=P.BRANCH_MODE_FULL)
    assert_running(vm)

    # FILE maps memory.bin privately: no huge pages there. Refused, and nothing starts.
    with pytest.raises(grpc.RpcError) as refused:
        forkd.forkd().Spawn(
            P.SpawnRequest(snapshot="live-0", count=1, backend=P.MEMORY_BACKEND_FILE), timeout=60)
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "2 MiB pages" in refused.value.details()
    assert [v.id for v in forkd.forkd().ListVms(P.ListVmsRequest(), timeout=10).vms] == [vm.id]

    memfd_fork, = forkd.forkd().Spawn(
        P.SpawnRequest(snapshot="live-0", count=1, backend=P.MEMORY_BACKEND_MEMFD), timeout=120).vms
    uffd_fork, = forkd.forkd().Spawn(
        P.SpawnRequest(snapshot="live-1", count=1, backend=P.MEMORY_BACKEND_UFFD), timeout=120).vms
    for fork in (memfd_fork, uffd_fork):
        assert fork.machine.huge_pages == P.HUGE_PAGES_2M
        assert_on_huge_pages(fork)
        assert_running(fork)
    # A fork branches again on its 2 MiB pages: LIVE for MEMFD, FULL for UFFD.
    verified_branch(forkd, memfd_fork.id, "of-memfd-fork")
    verified_branch(forkd, uffd_fork.id, "of-uffd-fork", mode=P.BRANCH_MODE_FULL)
    stats = forkd.forkd().GetVm(P.GetVmRequest(vm_id=uffd_fork.id), timeout=10).page_server
    assert stats.faults_served > 0 and stats.bytes_copied % HUGE == 0, stats


def test_boot_without_enough_free_huge_pages_is_refused_by_name(forkd):
    before = read_int(NR_HUGEPAGES)
    in_use = before - read_int(FREE_HUGEPAGES)
    write_int(NR_HUGEPAGES, in_use + 4)  # 8 MiB free: far from the guest's 64 MiB
    reserved = read_int(RESERVED_HUGEPAGES)
    try:
        with pytest.raises(grpc.RpcError) as refused:
            boot_huge(forkd)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "huge pages" in refused.value.details()
        assert not forkd.forkd().ListVms(P.ListVmsRequest(), timeout=10).vms
        assert read_int(RESERVED_HUGEPAGES) == reserved, "a reservation was left behind"
    finally:
        write_int(NR_HUGEPAGES, before)


def test_odd_memory_size_with_huge_pages_is_an_invalid_argument(forkd):
    request = P.BootRequest(kernel_image_path=os.environ["FORKD_GUEST"],
                            machine=P.MachineConfig(vcpu_count=1, mem_size_mib=65,
                                                    huge_pages=P.HUGE_PAGES_2M))
    with pytest.raises(grpc.RpcError) as refused:
        forkd.forkd().Boot(request, timeout=60)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "2 MiB" in refused.value.details()
