"""forkctl: the command line for forkd.

Human output by default; ``--json`` prints JSON for scripts (one document per command, or
one event per line for ``branch`` and ``watch``). Exit status: 0 success, 1 the daemon
refused or the branch failed (its message on stderr), 2 bad usage, 130 interrupted.
"""
from __future__ import annotations

import argparse
import io
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from rich.console import Console, RenderableType
from rich.progress import (BarColumn, DownloadColumn, Progress, ProgressColumn, Task, TaskID,
                           TaskProgressColumn, TextColumn)
from rich.table import Table
from rich.text import Text

from . import __version__
from .client import DEFAULT_TIMEOUT, Branch, Client, Transfer, default_target
from .errors import ForkdError, NotFound, Unavailable
from .types import (BranchEvent, BranchMode, BranchPhase, Drive, HugePages, Info, MemoryBackend,
                    NetworkInterface, NetworkOverride, Snapshot, SnapshotState, Vm, VmState,
                    Vsock, VsockOverride)

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

MODES = {"live": BranchMode.LIVE, "live-arm-in-pause": BranchMode.LIVE_ARM_IN_PAUSE,
         "full": BranchMode.FULL}
BACKENDS = {"file": MemoryBackend.FILE, "memfd": MemoryBackend.MEMFD,
            "uffd": MemoryBackend.UFFD}


# -- formatting ----------------------------------------------------------------------------

def fmt_bytes(n: int) -> str:
    """Binary units, as the daemon's sizes are page multiples: 64 MiB, 1.5 GiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def fmt_ns(ns: int) -> str:
    if ns < 1_000_000:
        return f"{ns / 1e3:.0f} µs"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:.3g} ms"
    return f"{ns / 1e9:.3g} s"


def fmt_age(unix_ms: int) -> str:
    if not unix_ms:
        return "-"
    seconds = max(0, time.time() - unix_ms / 1000)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def phase_name(phase: BranchPhase | int) -> str:
    return phase.name.lower().replace("_", " ") if isinstance(phase, BranchPhase) else str(phase)


def enum_name(value: Any) -> str:
    return str(value.name) if hasattr(value, "name") else str(value)


# -- output --------------------------------------------------------------------------------

class Output:
    """Where a command's results go: rich text for people, JSON for scripts."""

    def __init__(self, as_json: bool) -> None:
        self.json = as_json
        self.out = Console(highlight=False)
        self.err = Console(stderr=True, highlight=False)

    def emit(self, data: Any, *, lines: bool = False) -> None:
        """Prints ``data`` as JSON: indented, or compact on one line for event streams."""
        text = json.dumps(data, separators=(",", ":")) if lines else json.dumps(data, indent=2)
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def say(self, text: RenderableType) -> None:
        # Text and tables carry their own style; plain strings are printed verbatim, never
        # parsed as markup (daemon messages and names may contain brackets).
        if self.out.is_terminal:
            self.out.print(text, markup=False)
            return
        # Piped: every column whole (no fitting to 80 columns), no trailing spaces.
        wide = Console(file=io.StringIO(), width=1 << 16, highlight=False, no_color=True)
        wide.print(text, markup=False, soft_wrap=isinstance(text, str))
        lines = wide.file.getvalue().splitlines()  # type: ignore[attr-defined]
        sys.stdout.write("".join(line.rstrip() + "\n" for line in lines))
        sys.stdout.flush()

    def error(self, message: str, code: str = "") -> None:
        self.err.print(Text("forkctl: ", style="bold red") + Text(message))
        if self.json and code:
            # Scripts read stdout: a refused call is a JSON document there too.
            self.emit({"error": {"code": code, "message": message}})


def vm_line(vm: Vm) -> str:
    machine = vm.machine
    shape = f"{machine.vcpu_count} vCPU, {machine.mem_size_mib} MiB" if machine else "?"
    if machine and machine.huge_pages == HugePages.HUGE_2M:
        shape += " in 2 MiB pages"
    return (f"{vm.id} ({vm.name}): {enum_name(vm.state)}, {shape}, "
            f"{enum_name(vm.memory_backend)} memory, VMM pid {vm.vmm_pid}")


def vm_table(vms: Sequence[Vm]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("ID", "NAME", "STATE", "MEMORY", "VCPU", "MIB", "FROM", "PID", "BRANCH"):
        table.add_column(column, no_wrap=True)
    for vm in vms:
        state = Text(enum_name(vm.state),
                     style={VmState.RUNNING: "green", VmState.FAILED: "red"}.get(vm.state, ""))
        table.add_row(vm.id, vm.name, state, enum_name(vm.memory_backend),
                      str(vm.machine.vcpu_count if vm.machine else "-"),
                      str(vm.machine.mem_size_mib if vm.machine else "-"),
                      vm.source_snapshot or "-", str(vm.vmm_pid or "-"),
                      vm.active_branch_id or "-")
    return table


def snapshot_table(snapshots: Sequence[Snapshot]) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("NAME", "STATE", "FROM", "PARENT", "MODE", "SIZE", "PAUSE", "USED BY",
                   "CREATED"):
        table.add_column(column, no_wrap=True)
    for s in snapshots:
        state = Text(enum_name(s.state),
                     style="green" if s.state == SnapshotState.READY else "yellow")
        table.add_row(s.name, state, s.source_vm_name or s.source_vm_id or "-",
                      s.parent_snapshot or "-", enum_name(s.mode).lower().replace("_", "-"),
                      fmt_bytes(s.memory_bytes),
                      fmt_ns(s.figures.pause_ns) if s.figures and s.figures.pause_ns else "-",
                      f"{s.vms_using} VMs", fmt_age(s.created_at_unix_ms))
    return table


def details(pairs: Sequence[tuple[str, Any]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    for key, value in pairs:
        grid.add_row(key, Text(str(value)))
    return grid


def snapshot_summary(s: Snapshot) -> str:
    f, p = s.figures, s.progress
    parts = [f"snapshot {s.name} {enum_name(s.state)}: {fmt_bytes(s.memory_bytes)}"]
    if f:
        parts.append(f"paused {fmt_ns(f.pause_ns)}")
        if f.copy_ns:
            rate = s.memory_bytes / (f.copy_ns / 1e9)
            parts.append(f"copied in {fmt_ns(f.copy_ns)} ({fmt_bytes(int(rate))}/s)")
        parts.append(f"total {fmt_ns(f.total_ns)}")
    if p and (p.pages_by_fault or p.pages_by_bulk):
        parts.append(f"{p.pages_by_fault} pages by write fault, {p.pages_by_bulk} by bulk copy")
    return ", ".join(parts)


# -- the live branch view ------------------------------------------------------------------

class RateColumn(ProgressColumn):
    """Copy rate in binary units, matching the sizes next to it."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{fmt_bytes(int(speed))}/s" if speed else "-", style="progress.data.speed")


class BranchView:
    """A branch on the console: one line per phase, and a progress bar with the phase,
    bytes copied, the copy rate and the pause window. On a terminal the bar is redrawn in
    place; elsewhere (logs, CI) only its final state is printed."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[cyan]{task.fields[phase]:<13}"),
            BarColumn(bar_width=None),
            TaskProgressColumn(),
            DownloadColumn(binary_units=True),
            RateColumn(),
            TextColumn("pause {task.fields[pause]}"),
            console=console, refresh_per_second=10)
        self.task: TaskID = self.progress.add_task("branch", total=None, phase="started",
                                                   pause="-")
        self.last_phase: BranchPhase | None = None

    def start(self) -> BranchView:
        self.progress.start()
        return self

    def stop(self) -> None:
        self.progress.stop()

    def update(self, event: BranchEvent) -> None:
        fields: dict[str, Any] = {"phase": phase_name(event.phase)}
        if event.figures and event.figures.pause_ns and event.phase >= BranchPhase.RESUMED:
            fields["pause"] = fmt_ns(event.figures.pause_ns)
        if event.progress and event.progress.bytes_total:
            fields["completed"] = event.progress.bytes_copied
            fields["total"] = event.progress.bytes_total
        self.progress.update(self.task, **fields)
        if event.phase != self.last_phase and event.phase != BranchPhase.COPYING:
            self.console.print(Text("  ") + Text(self.describe(event)))
        self.last_phase = event.phase

    @staticmethod
    def describe(event: BranchEvent) -> str:
        f = event.figures
        match event.phase:
            case BranchPhase.STARTED:
                return f"started {event.branch_id}: {event.vm_id} -> {event.snapshot_name}"
            case BranchPhase.ARMED if f:
                return f"armed write-protect in {fmt_ns(f.arm_ns)} while the VM ran"
            case BranchPhase.VMSTATE_SAVED if f:
                return f"vCPU and device state saved in {fmt_ns(f.vmstate_ns)}"
            case BranchPhase.RESUMED if f:
                return f"resumed: the VM was paused for {fmt_ns(f.pause_ns)}"
            case BranchPhase.PUBLISHING if f and f.copy_ns:
                return f"memory copied in {fmt_ns(f.copy_ns)}; publishing"
            case BranchPhase.DONE if event.snapshot:
                return snapshot_summary(event.snapshot)
            case BranchPhase.FAILED | BranchPhase.CANCELLED:
                return f"{phase_name(event.phase)}: {event.error_message}"
        return phase_name(event.phase)


def follow(branch: Branch, out: Output) -> None:
    """Prints a branch's events until it ends; raises its error or KeyboardInterrupt."""
    if out.json:
        for event in branch:
            out.emit(event.to_dict(), lines=True)
        return
    # The view appears with the first event, so a refused branch prints only its error.
    view: BranchView | None = None
    try:
        for event in branch:
            if view is None:
                view = BranchView(out.out).start()
            view.update(event)
    finally:
        if view is not None:
            view.stop()


def follow_transfer(verb: str, transfer: Transfer, out: Output) -> int:
    """Shows a Push or Pull until it ends (a bar with bytes and rate, then a summary line);
    raises its error. Ctrl-C leaves the stream, which stops the transfer."""
    if out.json:
        for event in transfer:
            out.emit(event.to_dict(), lines=True)
        return EXIT_OK
    progress = Progress(TextColumn(f"[cyan]{verb:<5}"), BarColumn(bar_width=None),
                        TaskProgressColumn(), DownloadColumn(binary_units=True), RateColumn(),
                        console=out.out, refresh_per_second=10)
    task = progress.add_task(verb, total=None)
    progress.start()
    try:
        for event in transfer:
            p = event.progress
            if p and p.bytes_total:
                progress.update(task, completed=p.bytes_done, total=p.bytes_total)
    except KeyboardInterrupt:
        transfer.cancel()
        progress.stop()
        out.error(f"{verb} stopped")
        return EXIT_INTERRUPTED
    finally:
        progress.stop()
    last = transfer.last
    if last and last.progress:
        p = last.progress
        moved = p.chunks_total - p.chunks_skipped - p.chunks_zero
        out.say(f"{verb} {transfer.snapshot_name}: {fmt_bytes(p.bytes_total)} in "
                f"{fmt_ns(p.elapsed_ns)}, {fmt_bytes(p.bytes_transferred)} over the network "
                f"({fmt_bytes(p.bytes_per_second)}/s); chunks: {moved} moved, "
                f"{p.chunks_skipped} already there, {p.chunks_zero} zero")
    return EXIT_OK


# -- commands ------------------------------------------------------------------------------

def cmd_info(client: Client, args: argparse.Namespace, out: Output) -> int:
    info: Info = client.info()
    if out.json:
        out.emit(info.to_dict())
        return EXIT_OK
    host = info.host
    pairs: list[tuple[str, Any]] = [
        ("forkd", f"{info.version} (pid {info.pid}) at {client.target}, "
                  f"started {fmt_age(info.started_at_unix_ms)}"),
        ("state dir", info.state_dir), ("VMM", info.vmm_binary),
        ("branches at once", info.max_concurrent_branches)]
    if host:
        pairs += [
            ("kernel", host.kernel_release),
            ("KVM", f"usable (API {host.kvm_api_version})" if host.kvm_usable
             else f"NOT usable: {host.kvm_error}"),
            ("userfaultfd", f"usable (features {host.userfaultfd_features:#x}); write-protect "
                            f"anonymous {'yes' if host.userfaultfd_wp_anonymous else 'no'}, "
                            f"shmem {'yes' if host.userfaultfd_wp_shmem else 'no'}"
             if host.userfaultfd_usable else f"NOT usable: {host.userfaultfd_error}"),
            ("live branch", "supported" if host.live_branch_supported else "NOT supported")]
    out.say(details(pairs))
    return EXIT_OK


def cmd_boot(client: Client, args: argparse.Namespace, out: Output) -> int:
    vm = client.boot(args.kernel, name=args.name, vcpu_count=args.vcpus,
                     mem_size_mib=args.mem, boot_args=args.boot_args, labels=args.labels,
                     initrd_path=args.initrd, drives=args.drives, network_interfaces=args.nets,
                     vsock=args.vsock, huge_pages=args.huge_pages)
    if out.json:
        out.emit(vm.to_dict())
    else:
        out.say("booted " + vm_line(vm))
    return EXIT_OK


class CtrlC:
    """Ctrl-C while following a stream. The handler only notes the key and cancels the call
    from another thread; the stream then ends at a clean point. Python's default, raising
    KeyboardInterrupt at whatever bytecode runs, can leave a lock taken (the progress display's
    console lock, acquired in a `with` the exception interrupts), after which stopping the
    display waits forever. A second Ctrl-C raises KeyboardInterrupt as usual."""

    def __init__(self, branch: Branch) -> None:
        self.branch = branch
        self.pressed = False
        self._previous: Any = None

    def __enter__(self) -> CtrlC:
        self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        signal.signal(signal.SIGINT, self._previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        threading.Thread(target=self.branch.cancel, name="ctrl-c", daemon=True).start()


def follow_until_ctrl_c(branch: Branch, out: Output) -> bool:
    """Follows a branch or watch; False when Ctrl-C ended it (the stream is cancelled)."""
    with CtrlC(branch) as ctrl_c:
        try:
            follow(branch, out)
        except ForkdError:
            if not ctrl_c.pressed:
                raise
        return not ctrl_c.pressed


def cmd_branch(client: Client, args: argparse.Namespace, out: Output) -> int:
    branch = client.branch(args.vm, args.snapshot, mode=MODES[args.mode], detach=args.detach,
                           progress_interval=args.interval, labels=args.labels,
                           allow_disk_copy_in_pause=args.allow_disk_copy_in_pause)
    if not follow_until_ctrl_c(branch, out):
        return interrupted(client, branch, out, detach=args.detach)
    if not out.json:
        assert branch.snapshot is not None
        out.say(f"{branch.snapshot.path}")
    return EXIT_OK


def interrupted(client: Client, branch: Branch, out: Output, *, detach: bool) -> int:
    """Ctrl-C during a branch: leave the stream, and say what became of the branch."""
    branch.cancel()
    again = (f"forkctl watch {branch.branch_id}" if branch.branch_id
             else f"forkctl watch --snapshot {branch.snapshot_name}")
    if detach:
        out.error(f"detached; the branch goes on. Follow it with: {again}")
        return EXIT_OK
    # The daemon aborts the branch when its stream goes away; confirm it from the record it
    # keeps of finished branches, so the user knows whether a snapshot was left. The watch
    # gets the client's own deadline (--timeout): aborting a copy can take a while on a
    # loaded host.
    last = None
    try:
        watch = (client.watch(branch.branch_id, timeout=client.timeout) if branch.branch_id
                 else client.watch(snapshot_name=branch.snapshot_name, timeout=client.timeout))
        for last in watch:
            pass
    except ForkdError:
        pass
    if last is not None and last.phase == BranchPhase.DONE and last.snapshot:
        out.error("interrupted, but the branch had already finished: "
                  + snapshot_summary(last.snapshot))
        return EXIT_OK
    if last is not None and last.phase == BranchPhase.CANCELLED:
        out.error(f"branch cancelled: {last.error_message}; the VM runs on, no snapshot left")
    else:
        out.error("branch cancelled")
    return EXIT_INTERRUPTED


def cmd_watch(client: Client, args: argparse.Namespace, out: Output) -> int:
    branch = (client.watch(args.branch_id, progress_interval=args.interval) if args.branch_id
              else client.watch(snapshot_name=args.snapshot, progress_interval=args.interval))
    if not follow_until_ctrl_c(branch, out):
        out.error("stopped watching; the branch goes on")
        return EXIT_INTERRUPTED
    return EXIT_OK


def cmd_push(client: Client, args: argparse.Namespace, out: Output) -> int:
    return follow_transfer("push", client.push(args.snapshot, progress_interval=args.interval),
                           out)


def cmd_pull(client: Client, args: argparse.Namespace, out: Output) -> int:
    return follow_transfer("pull", client.pull(args.snapshot, progress_interval=args.interval),
                           out)


def cmd_remotes(client: Client, args: argparse.Namespace, out: Output) -> int:
    remotes = client.remotes()
    if out.json:
        out.emit([r.to_dict() for r in remotes])
        return EXIT_OK
    if not remotes:
        out.say("no remote snapshots")
        return EXIT_OK
    table = Table(box=None, header_style="bold")
    for column in ("NAME", "PARENT", "MEMORY", "CHUNKS", "ZERO", "CREATED"):
        table.add_column(column)
    for r in remotes:
        table.add_row(r.name, r.parent_snapshot or "-", fmt_bytes(r.memory_bytes),
                      str(r.chunk_count), str(r.zero_chunks), fmt_age(r.created_at_unix_ms))
    out.say(table)
    return EXIT_OK


def cmd_delete_remote(client: Client, args: argparse.Namespace, out: Output) -> int:
    results = {name: client.delete_remote(name) for name in args.snapshots}
    if out.json:
        out.emit({name: r.to_dict() for name, r in results.items()})
        return EXIT_OK
    for name, r in results.items():
        out.say(f"deleted remote {name}: {r.chunks_deleted} chunks deleted, {r.chunks_kept} "
                "kept (used by other remote snapshots)")
    return EXIT_OK


def cmd_spawn(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.lazy and args.backend != "uffd":
        out.error("spawn --lazy needs --backend uffd (forks served by forkd as memory arrives)")
        return EXIT_USAGE
    if args.remote and not args.lazy:
        # A snapshot this host does not have is pulled from the remote bucket first.
        try:
            client.snapshot(args.snapshot)
        except NotFound:
            transfer = client.pull(args.snapshot)
            if out.json:
                transfer.wait()  # one JSON document: the spawn's
            elif (pulled := follow_transfer("pull", transfer, out)) != EXIT_OK:
                return pulled
    result = client.spawn(args.snapshot, args.count, backend=BACKENDS[args.backend],
                          name_prefix=args.prefix, start_paused=args.paused,
                          labels=args.labels, network_overrides=args.tap_patterns,
                          vsock_override=args.vsock_pattern, remote=args.lazy)
    if out.json:
        out.emit(result.to_dict())
        return EXIT_OK
    out.say(f"spawned {len(result.vms)} VMs from {args.snapshot} "
            f"({args.backend.upper()}) in {fmt_ns(result.elapsed_ns)}")
    out.say(vm_table(result.vms))
    return EXIT_OK


def cmd_vms(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.vm:
        vm = client.vm(args.vm)
        if out.json:
            out.emit(vm.to_dict())
        else:
            out.say(details(list(vars_of(vm).items())))
        return EXIT_OK
    vms = client.vms()
    if out.json:
        out.emit([vm.to_dict() for vm in vms])
    elif vms:
        out.say(vm_table(vms))
    else:
        out.say("no VMs")
    return EXIT_OK


def cmd_snapshots(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.name:
        snapshot = client.snapshot(args.name)
        if out.json:
            out.emit(snapshot.to_dict())
        else:
            out.say(details(list(vars_of(snapshot).items())))
        return EXIT_OK
    snapshots = client.snapshots()
    if out.json:
        out.emit([s.to_dict() for s in snapshots])
    elif snapshots:
        out.say(snapshot_table(snapshots))
    else:
        out.say("no snapshots")
    return EXIT_OK


def vars_of(message: Vm | Snapshot) -> dict[str, Any]:
    """Flat key/values of a record for the detail view; nested figures as compact text."""
    flat: dict[str, Any] = {}
    for key, value in message.to_dict().items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        elif isinstance(value, list):
            value = "; ".join(json.dumps(v, separators=(",", ":")) for v in value) or "-"
        flat[key] = "-" if value in ("", None) else value
    return flat


def cmd_stop(client: Client, args: argparse.Namespace, out: Output) -> int:
    stopped = [client.stop(vm, grace=args.grace) for vm in args.vms]
    if out.json:
        out.emit([vm.to_dict() for vm in stopped])
        return EXIT_OK
    for vm in stopped:
        reason = f": {vm.exit_reason}" if vm.exit_reason else ""
        out.say(f"stopped {vm.id} ({vm.name}){reason}")
    return EXIT_OK


def cmd_rm(client: Client, args: argparse.Namespace, out: Output) -> int:
    for name in args.snapshots:
        client.delete_snapshot(name, force=args.force)
        if not out.json:
            out.say(f"deleted {name}")
    if out.json:
        out.emit({"deleted": args.snapshots})
    return EXIT_OK


# -- argument parsing ----------------------------------------------------------------------

def _label(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _options(text: str, what: str, keys: set[str], flags: set[str]) -> dict[str, str | bool]:
    """"k=v,k=v,flag" -> {k: v, flag: True}; unknown keys are an error naming them."""
    out: dict[str, str | bool] = {}
    for part in filter(None, text.split(",")):
        key, sep, value = part.partition("=")
        if sep and key in keys:
            out[key] = value
        elif not sep and key in flags:
            out[key] = True
        else:
            known = ", ".join(sorted(f"{k}=..." for k in keys) + sorted(flags))
            raise argparse.ArgumentTypeError(f"{what}: unknown option {part!r} (known: {known})")
    return out


def _drive(text: str) -> Drive:
    """id=ID,path=PATH[,ro][,root]"""
    o = _options(text, "--drive", {"id", "path"}, {"ro", "root"})
    if "id" not in o or "path" not in o:
        raise argparse.ArgumentTypeError("--drive needs id=ID,path=PATH[,ro][,root]")
    return Drive(drive_id=str(o["id"]), path_on_host=str(o["path"]),
                 is_read_only=bool(o.get("ro")), is_root_device=bool(o.get("root")))


def _net(text: str) -> NetworkInterface:
    """id=ID,tap=TAP[,mac=MAC]"""
    o = _options(text, "--net", {"id", "tap", "mac"}, set())
    if "id" not in o or "tap" not in o:
        raise argparse.ArgumentTypeError("--net needs id=ID,tap=TAP[,mac=MAC]")
    return NetworkInterface(iface_id=str(o["id"]), host_dev_name=str(o["tap"]),
                            guest_mac=str(o.get("mac", "")))


def _vsock(text: str) -> Vsock:
    """cid=CID,path=PATH"""
    o = _options(text, "--vsock", {"cid", "path"}, set())
    try:
        return Vsock(guest_cid=int(str(o["cid"])), uds_path=str(o["path"]))
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError("--vsock needs cid=N,path=PATH") from None


def _tap_pattern(text: str) -> NetworkOverride:
    """IFACE=PATTERN"""
    iface, sep, pattern = text.partition("=")
    if not sep or not iface or not pattern:
        raise argparse.ArgumentTypeError("--tap-pattern needs IFACE=PATTERN, e.g. eth0=tap{i}")
    return NetworkOverride(iface_id=iface, host_dev_name=pattern)


def _vsock_pattern(text: str) -> VsockOverride:
    if not text:
        raise argparse.ArgumentTypeError("--vsock-pattern needs a path, e.g. /run/v-{i}.sock")
    return VsockOverride(uds_path=text)


def _seconds(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds, 0 or more, got {text}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # The common options are accepted before or after the command ("forkctl --json vms" and
    # "forkctl vms --json"); SUPPRESS keeps a subcommand's parser from resetting a value the
    # main parser already set.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--addr", default=argparse.SUPPRESS, metavar="TARGET",
                        help="forkd's address: unix:PATH, a socket path or HOST:PORT "
                             f"(default: $FORKD_ADDR or {default_target()})")
    common.add_argument("--timeout", type=_seconds, default=argparse.SUPPRESS,
                        metavar="SECONDS",
                        help="deadline of every call that answers once, and of the wait for "
                             "a cancelled branch to end; 0 for none (default "
                             f"{DEFAULT_TIMEOUT:g}). The streams of branch and watch last as "
                             "long as the branch")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print JSON for scripts instead of text")

    parser = argparse.ArgumentParser(
        prog="forkctl", parents=[common],
        description="Drive forkd: boot VMs, live-branch them into snapshots, spawn forks.",
        epilog="Exit status: 0 ok, 1 the daemon refused or the branch failed, 2 bad usage, "
               "130 interrupted.")
    parser.add_argument("--version", action="version", version=f"forkctl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Callable[..., int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help, description=help)
        sub.set_defaults(handler=handler)
        return sub

    command("info", cmd_info, "show the daemon's version and what its host can do")

    boot = command("boot", cmd_boot, "boot a fresh VM")
    boot.add_argument("kernel", metavar="KERNEL",
                      help="kernel image (or test VMM guest program), absolute path on the "
                           "daemon's host")
    boot.add_argument("--name", default="", help="unique name (default: generated)")
    boot.add_argument("--vcpus", type=_positive, default=1, help="vCPUs (default 1)")
    boot.add_argument("--mem", type=_positive, default=128, metavar="MIB",
                      help="guest memory in MiB (default 128)")
    boot.add_argument("--huge-pages", action="store_true",
                      help="back guest memory with 2 MiB huge pages (the host needs that many "
                      "free: vm.nr_hugepages); forks then take --backend memfd or uffd")
    boot.add_argument("--boot-args", default="", metavar="ARGS",
                      help="kernel command line, or the test guest's workload")
    boot.add_argument("--initrd", default="", metavar="PATH", help="initial RAM disk")
    boot.add_argument("--drive", dest="drives", type=_drive, action="append", default=[],
                      metavar="id=ID,path=PATH[,ro][,root]",
                      help="a block device (repeatable): read-only with ro, the root with root")
    boot.add_argument("--net", dest="nets", type=_net, action="append", default=[],
                      metavar="id=ID,tap=TAP[,mac=MAC]",
                      help="a network interface on a host tap device (repeatable)")
    boot.add_argument("--vsock", type=_vsock, default=None, metavar="cid=CID,path=PATH",
                      help="a vsock device: guest CID (3 or more), host Unix socket")
    boot.add_argument("--label", dest="labels", type=_label, action="append", default=[],
                      metavar="KEY=VALUE", help="label kept with the VM (repeatable)")

    branch = command("branch", cmd_branch,
                     "branch a running VM into a new snapshot, showing its progress")
    branch.add_argument("vm", metavar="VM", help="id or name of a running VM")
    branch.add_argument("snapshot", metavar="SNAPSHOT", help="name of the new snapshot")
    branch.add_argument("--mode", choices=list(MODES), default="live",
                        help="live (default), live-arm-in-pause or full (stop-and-copy)")
    branch.add_argument("--allow-disk-copy-in-pause", action="store_true",
                        help="where the state directory cannot reflink, copy writable drives "
                             "inside the pause instead of refusing the branch")
    branch.add_argument("--detach", action="store_true",
                        help="keep the branch going if forkctl stops; Ctrl-C detaches "
                             "instead of cancelling")
    branch.add_argument("--interval", type=float, default=0.1, metavar="SECONDS",
                        help="least time between two progress updates (default 0.1)")
    branch.add_argument("--label", dest="labels", type=_label, action="append", default=[],
                        metavar="KEY=VALUE", help="label stored in the snapshot (repeatable)")

    watch = command("watch", cmd_watch, "follow a running (or finished) branch")
    target = watch.add_mutually_exclusive_group(required=True)
    target.add_argument("branch_id", nargs="?", metavar="BRANCH_ID", help="the branch's id")
    target.add_argument("--snapshot", help="the name of the snapshot the branch writes")
    watch.add_argument("--interval", type=float, default=0.1, metavar="SECONDS",
                       help="least time between two progress updates (default 0.1)")

    spawn = command("spawn", cmd_spawn, "start VMs restored from a snapshot")
    spawn.add_argument("snapshot", metavar="SNAPSHOT", help="name of a READY snapshot")
    spawn.add_argument("-n", "--count", type=_positive, default=1, help="how many (default 1)")
    spawn.add_argument("--backend", choices=list(BACKENDS), default="file",
                       help="guest memory: file (default, densest), memfd (live-branchable) "
                            "or uffd (lazy, served by forkd)")
    spawn.add_argument("--prefix", default="", help="name them PREFIX-0, PREFIX-1, ...")
    spawn.add_argument("--paused", action="store_true", help="leave them paused")
    spawn.add_argument("--label", dest="labels", type=_label, action="append", default=[],
                       metavar="KEY=VALUE", help="label kept with the VMs (repeatable)")
    spawn.add_argument("--tap-pattern", dest="tap_patterns", type=_tap_pattern,
                       action="append", default=[], metavar="IFACE=PATTERN",
                       help="each fork's tap for interface IFACE ({i}: the fork's index), "
                            "e.g. eth0=tap{i} (repeatable); needed for more than one fork, "
                            "or while another VM has the tap")
    spawn.add_argument("--vsock-pattern", type=_vsock_pattern, default=None, metavar="PATH",
                       help="each fork's vsock socket ({i}: the fork's index, {vm_id}: its "
                            "id), e.g. /run/forkd/vsock-{i}.sock; needed for more than one "
                            "fork, or while another VM has the socket")

    spawn.add_argument("--remote", action="store_true",
                       help="pull the snapshot from the daemon's remote bucket first when "
                            "this host does not have it")
    spawn.add_argument("--lazy", action="store_true",
                       help="with --backend uffd: start the VMs before the snapshot's memory "
                            "has arrived from the remote bucket (fetched chunk by chunk as they "
                            "touch it, the rest in the background); implies --remote")

    push = command("push", cmd_push,
                   "upload a snapshot to the daemon's remote bucket (forkd --remote-*)")
    push.add_argument("snapshot", metavar="SNAPSHOT", help="name of a READY snapshot")
    push.add_argument("--interval", type=float, default=0.1, metavar="SECONDS",
                      help="least time between two progress updates (default 0.1)")

    pull = command("pull", cmd_pull,
                   "download a snapshot from the daemon's remote bucket into its store")
    pull.add_argument("snapshot", metavar="SNAPSHOT", help="name of a remote snapshot")
    pull.add_argument("--interval", type=float, default=0.1, metavar="SECONDS",
                      help="least time between two progress updates (default 0.1)")

    command("remotes", cmd_remotes, "list the snapshots in the daemon's remote bucket")

    delete_remote = command("delete-remote", cmd_delete_remote,
                            "delete remote snapshots (chunks other snapshots use stay)")
    delete_remote.add_argument("snapshots", nargs="+", metavar="SNAPSHOT",
                               help="name of a remote snapshot")

    vms = command("vms", cmd_vms, "list VMs, or show one")
    vms.add_argument("vm", nargs="?", metavar="VM", help="id or name of one VM")

    snapshots = command("snapshots", cmd_snapshots, "list snapshots, or show one")
    snapshots.add_argument("name", nargs="?", metavar="SNAPSHOT",
                           help="name of one snapshot (default: list them all)")

    stop = command("stop", cmd_stop, "stop VMs and forget them")
    stop.add_argument("vms", nargs="+", metavar="VM", help="id or name of a VM")
    stop.add_argument("--grace", type=float, default=None, metavar="SECONDS",
                      help="time between SIGTERM and SIGKILL (daemon default 2)")

    rm = command("rm", cmd_rm, "delete snapshots")
    rm.add_argument("snapshots", nargs="+", metavar="SNAPSHOT", help="name of a snapshot")
    rm.add_argument("--force", action="store_true",
                    help="also when VMs use it or a branch writes it (aborts that branch)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "labels"):
        args.labels = dict(args.labels)
    out = Output(getattr(args, "json", False))
    timeout = getattr(args, "timeout", DEFAULT_TIMEOUT)
    client = Client(getattr(args, "addr", None), timeout=timeout or None)
    try:
        with client:
            return int(args.handler(client, args, out))
    except ForkdError as error:
        out.error(f"{error.code.name}: {error.message}", error.code.name)
        if isinstance(error, Unavailable) and "connect" in error.message:
            out.error(f"is forkd running at {client.target}? (--addr or $FORKD_ADDR)")
        return EXIT_FAILED
    except KeyboardInterrupt:
        # A second Ctrl-C while winding down a branch, or one outside any branch.
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
