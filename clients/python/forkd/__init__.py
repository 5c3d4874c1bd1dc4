"""Python client for forkd, the daemon that live-branches running microVMs.

    import forkd

    with forkd.Client() as client:                     # $FORKD_ADDR or unix:/run/forkd/forkd.sock
        vm = client.boot("/path/to/guest", mem_size_mib=64)
        branch = client.branch(vm, "base")
        for event in branch:                           # typed events, phases in order
            print(event.phase.name, event.progress and event.progress.bytes_copied)
        forks = client.spawn(branch.snapshot, count=4, backend=forkd.MemoryBackend.MEMFD)

The ``forkctl`` command line (``python3 -m forkd``) is built on the same client.
"""
from .client import DEFAULT_TARGET, DEFAULT_TIMEOUT, Branch, Client, Transfer, default_target
from .errors import (AlreadyExists, Cancelled, DataLoss, DeadlineExceeded, FailedPrecondition,
                     ForkdError, Internal, InvalidArgument, NotFound, PermissionDenied,
                     ResourceExhausted, Unauthenticated, Unavailable, Unimplemented)
from .types import (BranchEvent, BranchFigures, BranchMode, BranchPhase, BranchProgress,
                    DeleteRemoteResult, Drive, FileIdentity, HostCapabilities, HugePages, Info,
                    MachineConfig, MemoryBackend, MemoryRegion, NetworkInterface,
                    NetworkOverride, PageServerStats, RemoteSnapshot, Snapshot, SnapshotState,
                    SpawnResult, TransferEvent, TransferProgress, Vm, VmState, Vsock,
                    VsockOverride)

__version__ = "0.1.0"

__all__ = [
    "Client", "Branch", "DEFAULT_TARGET", "DEFAULT_TIMEOUT", "default_target",
    "ForkdError", "InvalidArgument", "NotFound", "AlreadyExists", "FailedPrecondition",
    "ResourceExhausted", "Unavailable", "Cancelled", "DeadlineExceeded", "Internal",
    "Unimplemented", "Unauthenticated", "PermissionDenied", "DataLoss",
    "Transfer", "TransferEvent", "TransferProgress", "RemoteSnapshot", "DeleteRemoteResult",
    "VmState", "MemoryBackend", "HugePages", "BranchMode", "BranchPhase", "SnapshotState",
    "MachineConfig", "PageServerStats", "Vm", "SpawnResult", "BranchProgress", "BranchFigures",
    "MemoryRegion", "Snapshot", "BranchEvent", "HostCapabilities", "Info",
    "FileIdentity", "Drive", "NetworkInterface", "Vsock", "NetworkOverride", "VsockOverride",
]
