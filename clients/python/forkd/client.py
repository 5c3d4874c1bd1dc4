"""The forkd client: a thin, typed layer over the generated forkd.v1 stubs."""
from __future__ import annotations

import os
from collections.abc import Generator, Mapping, Sequence
from types import TracebackType
from typing import Any, Callable, TypeVar

import grpc

try:
    from ._gen import forkd_pb2 as pb
    from ._gen import forkd_pb2_grpc as pb_grpc
except ModuleNotFoundError as missing:  # a source checkout where nobody generated them yet
    raise ImportError("forkd's gRPC stubs are not generated: install the package "
                      "(pip install clients/python) or run clients/python/gen_stubs.py"
                      ) from missing
from .errors import ForkdError, Unavailable
from .types import (BranchEvent, BranchMode, BranchPhase, DeleteRemoteResult, Drive, Info,
                    MemoryBackend, NetworkInterface, NetworkOverride, RemoteSnapshot, Snapshot,
                    SpawnResult, TransferEvent, Vm, Vsock, VsockOverride)

__all__ = ["Client", "Branch", "Transfer", "DEFAULT_TARGET", "DEFAULT_TIMEOUT", "default_target"]

#: Where forkd listens unless told otherwise (forkd --listen's default).
DEFAULT_TARGET = "unix:/run/forkd/forkd.sock"

#: Seconds a call that answers once may take, unless the client or the call says otherwise;
#: forkctl's --timeout default too. Branch and watch streams last as long as the branch.
DEFAULT_TIMEOUT = 60.0

T = TypeVar("T")


class _Default:
    """Marks "use the client's default timeout"; None already means "no deadline"."""

    def __repr__(self) -> str:
        return "DEFAULT"


_DEFAULT: Any = _Default()


def default_target() -> str:
    """$FORKD_ADDR if set, else forkd's default Unix socket."""
    return normalize_target(os.environ.get("FORKD_ADDR") or DEFAULT_TARGET)


def normalize_target(target: str) -> str:
    """Accepts a bare socket path as well as a gRPC target (unix:PATH, HOST:PORT)."""
    return "unix:" + target if target.startswith("/") else target


def _id(vm: str | Vm) -> str:
    return vm.id if isinstance(vm, Vm) else vm


class Client:
    """A connection to one forkd daemon.

    >>> with Client() as client:                       # $FORKD_ADDR or the default socket
    ...     vm = client.boot("/path/to/kernel", mem_size_mib=256)
    ...     for event in (branch := client.branch(vm, "base")):
    ...         print(event.phase.name, event.progress)
    ...     print(branch.snapshot.path)

    Unary calls get ``timeout`` seconds (default ``DEFAULT_TIMEOUT``, 60; None: no deadline)
    unless a call passes its own;
    branch streams have no deadline unless given one. Failures raise ``ForkdError``
    subclasses carrying the daemon's status code and message.
    """

    def __init__(self, target: str | None = None, *, timeout: float | None = DEFAULT_TIMEOUT,
                 credentials: grpc.ChannelCredentials | None = None,
                 options: Sequence[tuple[str, Any]] = ()) -> None:
        self.target = normalize_target(target) if target else default_target()
        self.timeout = timeout
        if credentials is not None:
            self._channel = grpc.secure_channel(self.target, credentials, options=options)
        else:
            # forkd serves plaintext only on a Unix socket (or TCP with --insecure-tcp).
            self._channel = grpc.insecure_channel(self.target, options=options)
        self.stub = pb_grpc.ForkdStub(self._channel)
        """The generated stub, for anything this class does not wrap."""

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Closes the channel; running branch streams are cancelled."""
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client({self.target!r})"

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Blocks until the daemon answers; raises Unavailable after ``timeout`` seconds."""
        try:
            grpc.channel_ready_future(self._channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(grpc.StatusCode.UNAVAILABLE,
                              f"forkd at {self.target} did not answer within {timeout:g}s"
                              ) from None

    # -- calls -------------------------------------------------------------------------------

    def _unary(self, method: Callable[..., T], request: Any, timeout: float | None) -> T:
        try:
            return method(request, timeout=self.timeout if timeout is _DEFAULT else timeout)
        except grpc.RpcError as error:
            raise ForkdError.from_rpc_error(error) from error

    def info(self, *, timeout: float | None = _DEFAULT) -> Info:
        """The daemon's version and what its host can do."""
        return Info.from_proto(self._unary(self.stub.GetInfo, pb.GetInfoRequest(), timeout))

    def boot(self, kernel_image_path: str, *, name: str = "", vcpu_count: int = 1,
             mem_size_mib: int = 128, boot_args: str = "",
             labels: Mapping[str, str] | None = None, initrd_path: str = "",
             drives: Sequence[Drive] = (), network_interfaces: Sequence[NetworkInterface] = (),
             vsock: Vsock | None = None, huge_pages: bool = False,
             timeout: float | None = _DEFAULT) -> Vm:
        """Boots a fresh VM; returns it once its vCPUs run.

        ``kernel_image_path`` is an absolute path on the daemon's host (a kernel, or the test
        VMM's guest program, whose workload ``boot_args`` describes). ``drives``,
        ``network_interfaces``, ``vsock`` and ``initrd_path`` are Firecracker's devices; the
        daemon checks them before any VMM starts. ``huge_pages`` backs guest memory with 2 MiB
        hugetlbfs pages (the host needs that many free: ``vm.nr_hugepages``).
        """
        request = pb.BootRequest(
            name=name, kernel_image_path=kernel_image_path, boot_args=boot_args,
            machine=pb.MachineConfig(
                vcpu_count=vcpu_count, mem_size_mib=mem_size_mib,
                huge_pages=pb.HUGE_PAGES_2M if huge_pages else pb.HUGE_PAGES_NONE),
            labels=dict(labels or {}), initrd_path=initrd_path,
            drives=[d.to_proto(pb) for d in drives],
            network_interfaces=[n.to_proto(pb) for n in network_interfaces],
            vsock=vsock.to_proto(pb) if vsock else None)
        return Vm.from_proto(self._unary(self.stub.Boot, request, timeout))

    def spawn(self, snapshot: str | Snapshot, count: int = 1, *,
              backend: MemoryBackend = MemoryBackend.FILE, name_prefix: str = "",
              start_paused: bool = False, labels: Mapping[str, str] | None = None,
              network_overrides: Sequence[NetworkOverride] = (),
              vsock_override: VsockOverride | None = None, remote: bool = False,
              timeout: float | None = _DEFAULT) -> SpawnResult:
        """Starts ``count`` VMs restored from a READY snapshot (all or none).

        Two forks cannot share a tap or a vsock socket: with ``count`` > 1, a snapshot whose VM
        has network interfaces or a vsock needs a ``NetworkOverride`` per interface and a
        ``VsockOverride`` (patterns expanded per fork), and so does a fork whose tap or socket
        a live VM has (``FailedPrecondition`` otherwise); each fork's ``Vm`` names its own.

        ``remote``: from the daemon's remote bucket, chunk by chunk (``MemoryBackend.UFFD``
        only): a local READY snapshot of that name is used as it is, otherwise the VMs start
        before the snapshot's memory has arrived, while the daemon pulls it into its store.
        A VM that needs a chunk that cannot be fetched is killed (its ``exit_reason`` says
        why).
        """
        request = pb.SpawnRequest(
            snapshot=snapshot.name if isinstance(snapshot, Snapshot) else snapshot,
            count=count, backend=_enum(backend), name_prefix=name_prefix,
            start_paused=start_paused, labels=dict(labels or {}),
            network_overrides=[n.to_proto(pb) for n in network_overrides],
            vsock_override=vsock_override.to_proto(pb) if vsock_override else None,
            remote=remote)
        return SpawnResult.from_proto(self._unary(self.stub.Spawn, request, timeout))

    def branch(self, vm: str | Vm, snapshot_name: str, *, mode: BranchMode = BranchMode.LIVE,
               detach: bool = False, progress_interval: float = 0.1,
               labels: Mapping[str, str] | None = None,
               allow_disk_copy_in_pause: bool = False,
               timeout: float | None = None) -> Branch:
        """Branches a running VM into a new snapshot; returns the running branch.

        Iterate the result for its events (``BranchEvent``, phases in order, COPYING
        progress coalesced to at most one per ``progress_interval`` seconds) or call
        ``wait()``; both end with the READY snapshot or raise the branch's error. Cancelling
        the branch (``cancel()``, leaving its ``with`` block early, closing the client) aborts
        it and leaves no snapshot, unless ``detach`` was set: then it goes on without the
        client and ``watch()`` re-attaches. Writable drives are captured inside the pause by
        reflink clones; where the daemon's state directory cannot reflink the branch is refused
        (``FailedPrecondition``) unless ``allow_disk_copy_in_pause`` accepts a copy there.
        """
        request = pb.BranchRequest(
            vm_id=_id(vm), snapshot_name=snapshot_name, mode=_enum(mode), detach=detach,
            progress_interval_ms=_interval_ms(progress_interval), labels=dict(labels or {}),
            allow_disk_copy_in_pause=allow_disk_copy_in_pause)
        return Branch(self.stub.Branch(request, timeout=timeout), snapshot_name)

    def watch(self, branch_id: str | None = None, *, snapshot_name: str | None = None,
              progress_interval: float = 0.1, timeout: float | None = None) -> Branch:
        """Re-attaches to a branch by id or by the snapshot it writes: replays its phases so
        far, then follows it. Leaving a watch does not cancel the branch."""
        if (branch_id is None) == (snapshot_name is None):
            raise ValueError("watch() takes either a branch id or snapshot_name=")
        request = pb.WatchBranchRequest(progress_interval_ms=_interval_ms(progress_interval))
        if branch_id is not None:
            request.branch_id = branch_id
        elif snapshot_name is not None:
            request.snapshot_name = snapshot_name
        return Branch(self.stub.WatchBranch(request, timeout=timeout), snapshot_name)

    def vms(self, *, timeout: float | None = _DEFAULT) -> list[Vm]:
        """Every VM the daemon started, including exited ones not yet stopped."""
        return [Vm.from_proto(v) for v in
                self._pages(self.stub.ListVms, pb.ListVmsRequest, "vms", timeout)]

    def _pages(self, method: Any, request_type: Any, field: str,
               timeout: float | None) -> list[Any]:
        """Every item of a paged List call: follows next_page_token to the last page."""
        items: list[Any] = []
        token = ""
        while True:
            reply = self._unary(method, request_type(page_token=token), timeout)
            items.extend(getattr(reply, field))
            token = reply.next_page_token
            if not token:
                return items

    def vm(self, vm: str | Vm, *, timeout: float | None = _DEFAULT) -> Vm:
        """One VM by id or name."""
        return Vm.from_proto(self._unary(self.stub.GetVm, pb.GetVmRequest(vm_id=_id(vm)),
                                         timeout))

    def stop(self, vm: str | Vm, *, grace: float | None = None,
             timeout: float | None = _DEFAULT) -> Vm:
        """Stops a VM and forgets it; returns its last record. ``grace`` is how long (seconds)
        its VMM gets after SIGTERM before SIGKILL (daemon default: 2 s)."""
        request = pb.StopVmRequest(vm_id=_id(vm),
                                   grace_ms=0 if grace is None else max(1, round(grace * 1000)))
        return Vm.from_proto(self._unary(self.stub.StopVm, request, timeout).vm)

    def snapshots(self, *, timeout: float | None = _DEFAULT) -> list[Snapshot]:
        """Every snapshot, READY, WRITING and CORRUPT, sorted by name."""
        return [Snapshot.from_proto(s) for s in
                self._pages(self.stub.ListSnapshots, pb.ListSnapshotsRequest, "snapshots",
                            timeout)]

    def snapshot(self, name: str, *, timeout: float | None = _DEFAULT) -> Snapshot:
        """One snapshot by name."""
        return Snapshot.from_proto(self._unary(self.stub.GetSnapshot,
                                               pb.GetSnapshotRequest(name=name), timeout))

    def delete_snapshot(self, name: str | Snapshot, *, force: bool = False,
                        timeout: float | None = _DEFAULT) -> None:
        """Deletes a snapshot; ``force`` also when VMs use it or a branch writes it."""
        name = name.name if isinstance(name, Snapshot) else name
        self._unary(self.stub.DeleteSnapshot, pb.DeleteSnapshotRequest(name=name, force=force),
                    timeout)

    # -- remote snapshots (the daemon's --remote-* S3 bucket) --------------------------------

    def push(self, snapshot: str | Snapshot, *, progress_interval: float = 0.1,
             timeout: float | None = None) -> Transfer:
        """Uploads a READY snapshot to the remote bucket; iterate the returned Transfer for
        its progress. Leaving it early (cancel) stops the upload: no remote snapshot."""
        name = snapshot.name if isinstance(snapshot, Snapshot) else snapshot
        request = pb.PushRequest(snapshot_name=name,
                                 progress_interval_ms=_interval_ms(progress_interval))
        return Transfer(self.stub.Push(request, timeout=timeout), name)

    def pull(self, name: str, *, progress_interval: float = 0.1,
             timeout: float | None = None) -> Transfer:
        """Downloads a remote snapshot into the daemon's store; ``Transfer.snapshot`` is the
        local READY snapshot once done."""
        request = pb.PullRequest(snapshot_name=name,
                                 progress_interval_ms=_interval_ms(progress_interval))
        return Transfer(self.stub.Pull(request, timeout=timeout), name)

    def remotes(self, *, timeout: float | None = _DEFAULT) -> list[RemoteSnapshot]:
        """The complete snapshots in the remote bucket, sorted by name."""
        reply = self._unary(self.stub.ListRemote, pb.ListRemoteRequest(), timeout)
        return [RemoteSnapshot.from_proto(s) for s in reply.snapshots]

    def delete_remote(self, name: str, *, timeout: float | None = _DEFAULT) -> DeleteRemoteResult:
        """Deletes a remote snapshot and the chunks no other remote snapshot uses."""
        return DeleteRemoteResult.from_proto(self._unary(
            self.stub.DeleteRemote, pb.DeleteRemoteRequest(snapshot_name=name), timeout))


def _enum(value: int) -> Any:
    # The generated stubs type enum fields as their own wrapper; ours are IntEnums of the
    # same numbers, which protobuf accepts.
    return int(value)


def _interval_ms(seconds: float) -> int:
    # 0 would mean the daemon's default (100 ms); the smallest explicit interval is 1 ms.
    return max(1, round(seconds * 1000))


class Branch:
    """A branch in progress, as a stream of ``BranchEvent``.

    Iterating yields the events as they arrive; the iteration's return value (``yield from``)
    and ``snapshot`` are the READY snapshot once DONE arrived. If the branch fails, iteration
    yields the FAILED (or CANCELLED) event and then raises the ``ForkdError`` of the call's
    status. Used as a context manager, leaving the block before the branch ended cancels it.
    """

    def __init__(self, call: Any, snapshot_name: str | None) -> None:
        self._call = call
        self.snapshot_name = snapshot_name
        self.branch_id: str | None = None
        self.events: list[BranchEvent] = []
        self.snapshot: Snapshot | None = None
        self._error: ForkdError | None = None
        self._ended = False

    def __iter__(self) -> Generator[BranchEvent, None, Snapshot]:
        # Several loops over one Branch continue the same stream, they do not restart it.
        while not self._ended:
            try:
                message = next(self._call)
            except StopIteration:
                self._ended = True
                if self.snapshot is None:
                    self._error = ForkdError(grpc.StatusCode.UNKNOWN,
                                             "the branch stream ended without a DONE event")
                break
            except grpc.RpcError as error:
                self._ended = True
                self._error = ForkdError.from_rpc_error(error)
                break
            event = BranchEvent.from_proto(message)
            self.events.append(event)
            self.branch_id = self.branch_id or event.branch_id or None
            self.snapshot_name = self.snapshot_name or event.snapshot_name or None
            if event.phase == BranchPhase.DONE:
                self.snapshot = event.snapshot
            yield event
        if self._error is not None:
            raise self._error
        assert self.snapshot is not None
        return self.snapshot

    def wait(self) -> Snapshot:
        """Follows the branch to its end; returns the READY snapshot or raises its error."""
        for _ in self:
            pass
        assert self.snapshot is not None
        return self.snapshot

    def cancel(self) -> None:
        """Leaves the stream. The daemon aborts the branch (VM resumed, no snapshot left)
        unless it was started detached or this is a watch."""
        if not self._ended:
            self._call.cancel()

    @property
    def done(self) -> bool:
        """True once the stream ended, with a snapshot or an error."""
        return self._ended

    @property
    def last(self) -> BranchEvent | None:
        """The latest event received."""
        return self.events[-1] if self.events else None

    def __enter__(self) -> Branch:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cancel()

    def __repr__(self) -> str:
        phase = self.last.phase.name if self.last else "pending"
        return f"<Branch {self.branch_id or '?'} -> {self.snapshot_name or '?'}: {phase}>"



class Transfer:
    """A Push or Pull in progress, as a stream of ``TransferEvent``.

    Iterating yields the events; the last one has ``done``. A failure raises the
    ``ForkdError`` of the call's status after the events so far. ``wait()`` follows it to its
    end; ``cancel()`` (or leaving a ``with`` block early) stops it.
    """

    def __init__(self, call: Any, snapshot_name: str) -> None:
        self._call = call
        self.snapshot_name = snapshot_name
        self.events: list[TransferEvent] = []
        self.snapshot: Snapshot | None = None
        self._ended = False

    def __iter__(self) -> Generator[TransferEvent, None, None]:
        while not self._ended:
            try:
                message = next(self._call)
            except StopIteration:
                self._ended = True
                if not self.events or not self.events[-1].done:
                    raise ForkdError(grpc.StatusCode.UNKNOWN,
                                     "the transfer stream ended without a done event") from None
                return
            except grpc.RpcError as error:
                self._ended = True
                raise ForkdError.from_rpc_error(error) from error
            event = TransferEvent.from_proto(message)
            self.events.append(event)
            if event.done:
                self.snapshot = event.snapshot
            yield event

    def wait(self) -> TransferEvent:
        """Follows the transfer to its end; returns the last (done) event or raises."""
        for _ in self:
            pass
        return self.events[-1]

    def cancel(self) -> None:
        if not self._ended:
            self._call.cancel()

    @property
    def last(self) -> TransferEvent | None:
        return self.events[-1] if self.events else None

    def __enter__(self) -> Transfer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cancel()
