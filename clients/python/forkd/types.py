"""Plain Python views of the forkd.v1 messages: enums and frozen dataclasses.

Field names are the proto's, so the API reference (proto/forkd/v1/forkd.proto) applies
unchanged: durations in nanoseconds (``*_ns``), sizes in bytes (``*_bytes``), times of day in
Unix epoch milliseconds (``*_unix_ms``). Message fields the daemon may leave unset are ``None``.
"""
from __future__ import annotations

import dataclasses
import enum
import types
import typing
from typing import Any, TypeVar

__all__ = [
    "VmState", "MemoryBackend", "BranchMode", "BranchPhase", "SnapshotState",
    "MachineConfig", "PageServerStats", "FileIdentity", "Drive", "NetworkInterface", "Vsock", "Vm", "SpawnResult", "BranchProgress", "BranchFigures",
    "MemoryRegion", "Snapshot", "BranchEvent", "HostCapabilities", "Info",
]


class VmState(enum.IntEnum):
    UNSPECIFIED = 0
    STARTING = 1
    RUNNING = 2
    PAUSED = 3
    STOPPED = 4
    FAILED = 5


class MemoryBackend(enum.IntEnum):
    """Where a VM's guest memory lives; it decides which branch modes the VM supports."""
    UNSPECIFIED = 0
    ANONYMOUS = 1  # the VMM's own memory: LIVE needs kernel 6.4+, FULL
    FILE = 2       # private map of memory.bin: densest to spawn, FULL only
    MEMFD = 3      # forkd-owned memfd: LIVE and FULL
    UFFD = 4       # filled lazily by the page server: FULL only


class HugePages(enum.IntEnum):
    """The guest's memory pages."""
    NONE = 0  # 4 KiB pages
    HUGE_2M = 1  # 2 MiB hugetlbfs pages: forks take MEMFD or UFFD


class BranchMode(enum.IntEnum):
    UNSPECIFIED = 0  # the daemon treats it as LIVE
    LIVE = 1
    LIVE_ARM_IN_PAUSE = 2
    FULL = 3


class BranchPhase(enum.IntEnum):
    UNSPECIFIED = 0
    STARTED = 1
    ARMED = 2
    PAUSED = 3
    VMSTATE_SAVED = 4
    RESUMED = 5
    COPYING = 6
    PUBLISHING = 7
    DONE = 8
    FAILED = 9
    CANCELLED = 10

    @property
    def terminal(self) -> bool:
        """True for the phases that end a branch."""
        return self in (BranchPhase.DONE, BranchPhase.FAILED, BranchPhase.CANCELLED)


class SnapshotState(enum.IntEnum):
    UNSPECIFIED = 0
    WRITING = 1
    READY = 2
    CORRUPT = 3


M = TypeVar("M", bound="_Message")


class _Message:
    """Conversion between a dataclass below and its protobuf message, and to plain dicts."""

    @classmethod
    def from_proto(cls: type[M], message: Any) -> M:
        hints = typing.get_type_hints(cls)
        return cls(**{f.name: _field_from_proto(hints[f.name], message, f.name)
                      for f in dataclasses.fields(cls)})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: enums become their names, nested messages dicts."""
        return {f.name: _to_plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _field_from_proto(hint: Any, message: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        # "X | None": a message field, None when the daemon left it unset.
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return _value_from_proto(inner, getattr(message, name)) if message.HasField(name) \
            else None
    value = getattr(message, name)
    if origin is list:
        (inner,) = typing.get_args(hint)
        return [_value_from_proto(inner, v) for v in value]
    if origin is dict:
        return dict(value)
    return _value_from_proto(hint, value)


def _value_from_proto(hint: Any, value: Any) -> Any:
    if isinstance(hint, type) and issubclass(hint, _Message):
        return hint.from_proto(value)
    if isinstance(hint, type) and issubclass(hint, enum.IntEnum):
        try:
            return hint(value)
        except ValueError:
            return value  # a value from a newer daemon: keep the number
    return value


def _to_plain(value: Any) -> Any:
    if isinstance(value, _Message):
        return value.to_dict()
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, list):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    return value


@dataclasses.dataclass(frozen=True)
class MachineConfig(_Message):
    vcpu_count: int
    mem_size_mib: int
    huge_pages: HugePages


@dataclasses.dataclass(frozen=True)
class PageServerStats(_Message):
    """Figures of the page server that serves UFFD-backed forks their memory on demand."""
    faults_served: int
    bytes_copied: int
    pages_prefetched: int
    zero_pages: int
    service_p50_ns: int
    service_p99_ns: int
    service_max_ns: int


@dataclasses.dataclass(frozen=True)
class FileIdentity(_Message):
    """A drive file's identity when forkd recorded it (Spawn refuses a changed read-only one)."""
    size_bytes: int
    mtime_unix_ns: int
    ctime_unix_ns: int
    inode: int
    device: int


@dataclasses.dataclass(frozen=True)
class Drive(_Message):
    """A block device, as Firecracker's PUT /drives/{drive_id}."""
    drive_id: str
    path_on_host: str
    is_read_only: bool = False
    is_root_device: bool = False
    identity: FileIdentity | None = None  # set by the daemon in Vm and Snapshot records

    def to_proto(self, pb: Any) -> Any:
        return pb.Drive(drive_id=self.drive_id, path_on_host=self.path_on_host,
                        is_read_only=self.is_read_only, is_root_device=self.is_root_device)


@dataclasses.dataclass(frozen=True)
class NetworkInterface(_Message):
    """A network interface on a host tap device, as Firecracker's PUT /network-interfaces."""
    iface_id: str
    host_dev_name: str
    guest_mac: str = ""  # empty: the VMM picks one

    def to_proto(self, pb: Any) -> Any:
        return pb.NetworkInterface(iface_id=self.iface_id, host_dev_name=self.host_dev_name,
                                   guest_mac=self.guest_mac)


@dataclasses.dataclass(frozen=True)
class Vsock(_Message):
    """A virtio-vsock device, as Firecracker's PUT /vsock."""
    guest_cid: int
    uds_path: str

    def to_proto(self, pb: Any) -> Any:
        return pb.Vsock(guest_cid=self.guest_cid, uds_path=self.uds_path)


@dataclasses.dataclass(frozen=True)
class NetworkOverride(_Message):
    """Spawn: each fork's own tap for one interface of the snapshot's VM.

    ``host_dev_name`` is a pattern: ``{i}`` is the fork's index (0..count-1), required when
    spawning more than one; each expansion a tap name of 1..15 bytes. ``guest_mac`` must stay
    empty: a restored guest keeps its snapshot's MAC (the daemon refuses one), so give each
    fork's tap its own network namespace.
    """
    iface_id: str
    host_dev_name: str
    guest_mac: str = ""

    def to_proto(self, pb: Any) -> Any:
        return pb.NetworkOverride(iface_id=self.iface_id, host_dev_name=self.host_dev_name,
                                  guest_mac=self.guest_mac)


@dataclasses.dataclass(frozen=True)
class VsockOverride(_Message):
    """Spawn: each fork's own vsock socket, an absolute path pattern with ``{i}`` (the fork's
    index) or ``{vm_id}`` (its VM id), one of them required when spawning more than one."""
    uds_path: str

    def to_proto(self, pb: Any) -> Any:
        return pb.VsockOverride(uds_path=self.uds_path)


@dataclasses.dataclass(frozen=True)
class Vm(_Message):
    id: str
    name: str
    state: VmState
    memory_backend: MemoryBackend
    machine: MachineConfig | None
    vmm_pid: int
    api_socket_path: str
    vmm_binary: str
    source_snapshot: str
    created_at_unix_ms: int
    exit_reason: str
    active_branch_id: str
    labels: dict[str, str]
    page_server: PageServerStats | None
    initrd_path: str
    drives: list[Drive]
    network_interfaces: list[NetworkInterface]
    vsock: Vsock | None


@dataclasses.dataclass(frozen=True)
class SpawnResult(_Message):
    vms: list[Vm]  # in index order
    elapsed_ns: int


@dataclasses.dataclass(frozen=True)
class BranchProgress(_Message):
    bytes_copied: int
    bytes_total: int
    pages_by_fault: int
    pages_by_bulk: int
    page_size: int
    faults_served: int  # write faults the handler served (copy mode)
    fault_service_p50_ns: int  # fault read to vCPU wake-up
    fault_service_p99_ns: int
    fault_service_max_ns: int
    faults_left_to_bulk: int  # faults on pages the bulk copier had claimed

    @property
    def fraction(self) -> float:
        """Share of guest memory copied so far, 0.0 to 1.0."""
        return self.bytes_copied / self.bytes_total if self.bytes_total else 0.0


@dataclasses.dataclass(frozen=True)
class BranchFigures(_Message):
    pause_ns: int
    arm_ns: int
    rearm_ns: int
    rearmed_pages: int
    vmstate_ns: int
    copy_ns: int
    publish_ns: int
    total_ns: int
    pause_request_ns: int  # inside pause_ns: the VMM answering the pause request
    resume_request_ns: int  # inside pause_ns: the VMM answering the resume request
    disk_capture_ns: int  # inside pause_ns: capturing the writable drives (reflinks)
    disk_copied_bytes: int  # drive bytes copied inside the pause instead (0: none)


@dataclasses.dataclass(frozen=True)
class MemoryRegion(_Message):
    guest_phys_addr: int
    size_bytes: int
    file_offset: int
    page_size: int


@dataclasses.dataclass(frozen=True)
class Snapshot(_Message):
    name: str
    state: SnapshotState
    source_vm_id: str
    source_vm_name: str
    parent_snapshot: str
    mode: BranchMode
    machine: MachineConfig | None
    memory_bytes: int
    vmstate_bytes: int
    regions: list[MemoryRegion]
    figures: BranchFigures | None
    progress: BranchProgress | None
    vmm_binary: str
    vmm_version: str
    created_at_unix_ms: int
    path: str
    labels: dict[str, str]
    vms_using: int
    page_server: PageServerStats | None
    corrupt_reason: str
    initrd_path: str
    drives: list[Drive]  # read-only ones with their identity at branch time
    network_interfaces: list[NetworkInterface]
    vsock: Vsock | None


@dataclasses.dataclass(frozen=True)
class BranchEvent(_Message):
    """One event of a branch's stream. ``progress`` is set on COPYING, RESUMED and DONE,
    ``snapshot`` on DONE, ``error_message`` on FAILED and CANCELLED."""
    branch_id: str
    phase: BranchPhase
    vm_id: str
    snapshot_name: str
    time_unix_ms: int
    figures: BranchFigures | None
    progress: BranchProgress | None
    snapshot: Snapshot | None
    error_message: str


@dataclasses.dataclass(frozen=True)
class HostCapabilities(_Message):
    kernel_release: str
    kvm_usable: bool
    kvm_api_version: int
    kvm_error: str
    userfaultfd_usable: bool
    userfaultfd_features: int
    userfaultfd_wp_anonymous: bool
    userfaultfd_wp_shmem: bool
    userfaultfd_wp_unpopulated: bool
    userfaultfd_error: str
    unprivileged_userfaultfd: int
    live_branch_supported: bool


@dataclasses.dataclass(frozen=True)
class Info(_Message):
    version: str
    host: HostCapabilities | None
    started_at_unix_ms: int
    state_dir: str
    vmm_binary: str
    max_concurrent_branches: int
    pid: int


@dataclasses.dataclass(frozen=True)
class TransferProgress(_Message):
    """Where a Push or Pull stands: bytes of memory plus vmstate, and the memory's chunks
    (``chunks_skipped``: already in the bucket; ``chunks_zero``: all-zero, never stored)."""
    bytes_total: int
    bytes_done: int
    bytes_transferred: int
    chunks_total: int
    chunks_done: int
    chunks_skipped: int
    chunks_zero: int
    elapsed_ns: int
    bytes_per_second: int
    chunk_size: int


@dataclasses.dataclass(frozen=True)
class TransferEvent(_Message):
    """One event of a Push or Pull stream; the last has ``done`` (and, for a Pull, the local
    ``snapshot``)."""
    snapshot_name: str
    progress: TransferProgress | None
    done: bool
    snapshot: Snapshot | None


@dataclasses.dataclass(frozen=True)
class RemoteSnapshot(_Message):
    """A complete snapshot in the remote bucket."""
    name: str
    parent_snapshot: str
    memory_bytes: int
    vmstate_bytes: int
    chunk_count: int
    zero_chunks: int
    created_at_unix_ms: int


@dataclasses.dataclass(frozen=True)
class DeleteRemoteResult(_Message):
    chunks_deleted: int
    chunks_kept: int
