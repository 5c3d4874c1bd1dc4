#!/usr/bin/env python3
"""forkd torture: a real daemon and the test VMM, driven at random until something tears.

Boots VMs (on memfds, as forkd boots them), then for --branches branches (or --minutes) picks at
random: a LIVE or FULL branch of any VM that accepts it (booted VMs, MEMFD, FILE and UFFD forks,
forks started paused), cancelled at a random phase or not, with the VMM killed at a random
phase now and then; spawns of every backend from the snapshots kept; stops of forks. Every other
booted VM has a writable drive its guest writes flat out (captured inside each branch's pause: a
reflink where the state directory can, else a copy the branches accept; each fork gets its own),
and of every three, one runs on 2 MiB huge pages (the run reserves them and gives them back),
whose forks take MEMFD or UFFD (FILE cannot give huge pages), and one runs a balloon that hands
pages back and takes them again flat out (the VMM discards each page handed back: MADV_REMOVE
on the memfd, MADV_DONTNEED in forks), as do its forks.
Checks:
- every READY snapshot passes the test VMM's verifier, its captured drive included (memory, vCPU
  state and disk of one instant), and the totals of successive snapshots of one VM never go down
  (torn otherwise);
- a cancel the daemon honoured leaves nothing; a cancel it did not honour (after the point of
  no return, or after the branch ended) leaves a snapshot that must verify; no temporary or WRITING
  snapshot stays behind once a branch ended (leftovers otherwise);
- every branch ends within a guard time, and its VM is back in the state it was in (running,
  or paused if it was paused) unless its VMM was killed (hangs / errors otherwise);
- a LIVE branch of a ballooning VM either verifies (each balloon page in use holds its
  signature) or fails naming the discard that would have torn it (discard_aborts), leaving
  nothing; any other failure is an error.
Prints one line of counts and exits 1 if anything was torn, left over, hung or failed
unexpectedly.

Paths come from the environment, as for the integration tests: FORKD_BIN, FORKD_PROTO_PYTHON,
FORKD_TESTVM, FORKD_GUEST (ctest sets them). Guard times scale with FORKD_TIME_SCALE.
"""
import argparse
import os
import random
import re
import signal
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))

import grpc  # noqa: E402
from forkd_harness import (NR_HUGEPAGES, VmDaemon, forkd_pb2, reserve_huge_pages,  # noqa: E402
                           scaled, verify_snapshot, write_int)

pb = forkd_pb2
LIVE, FULL = pb.BRANCH_MODE_LIVE, pb.BRANCH_MODE_FULL
LIVE_BACKENDS = (pb.MEMORY_BACKEND_ANONYMOUS, pb.MEMORY_BACKEND_MEMFD)
PHASES = [pb.BRANCH_PHASE_STARTED, pb.BRANCH_PHASE_ARMED, pb.BRANCH_PHASE_PAUSED,
          pb.BRANCH_PHASE_VMSTATE_SAVED, pb.BRANCH_PHASE_RESUMED, pb.BRANCH_PHASE_COPYING,
          pb.BRANCH_PHASE_PUBLISHING]
MAX_VMS = 4
KEPT_SNAPSHOTS = 3
GUEST_MIB = 32
BALLOON_PAGES = 256
class HugePages:
    """Free 2 MiB pages for every VM the run may hold at once (and one spare guest); the
    setting is put back when the run ends."""

    def __init__(self):
        try:
            self.before = reserve_huge_pages((MAX_VMS + 1) * GUEST_MIB // 2)
        except RuntimeError as e:
            raise SystemExit("torture: %s" % e)

    def restore(self):
        write_int(NR_HUGEPAGES, self.before)


class Torture:
    def __init__(self, args):
        self.args = args
        self.rng = random.Random(args.seed)
        self.daemon = VmDaemon()
        self.stub = self.daemon.forkd()
        self.counts = dict.fromkeys(
            ["branches", "verified", "disks", "torn", "cancels", "cancels_refused", "leftovers",
             "hangs", "spawns", "kills", "failed", "errors", "huge_branches", "balloon_branches",
             "discard_aborts"], 0)
        self.vms = {}            # id -> {"paused": bool, "last_total": int, "balloon": bool}
        self.kept = []           # READY snapshot names kept for spawns
        self.huge = set()        # of them, those of huge-page VMs
        self.ballooned = set()   # of them, those of ballooning VMs
        self.serial = 0
        self.boots = 0

    # ---- reporting ----
    def error(self, what):
        self.counts["errors"] += 1
        print("torture: error: " + what, file=sys.stderr, flush=True)

    def line(self, seconds):
        return "torture: " + " ".join("%s=%d" % kv for kv in self.counts.items()) + \
            " seconds=%d" % seconds

    # ---- VMs ----
    def boot(self):
        self.serial += 1
        vcpus = self.rng.choice([1, 2])
        workload = "pattern=%s seed=%d" % (self.rng.choice(["random", "hotset", "sequential"]),
                                           self.serial)
        drives = []
        self.boots += 1
        if self.boots % 2 == 0:
            path = os.path.join(self.daemon.workdir, "disk-%d.img" % self.serial)
            with open(path, "wb") as f:
                f.truncate(2 << 20)
            drives = [pb.Drive(drive_id="data", path_on_host=path)]
        huge = pb.HUGE_PAGES_2M if self.boots % 3 == 0 else pb.HUGE_PAGES_NONE
        balloon = self.boots % 3 == 1
        if balloon:  # the balloon needs 4 KiB pages
            workload += " balloon=%d" % BALLOON_PAGES
        request = pb.BootRequest(
            name="boot-%d" % self.serial, kernel_image_path=os.environ["FORKD_GUEST"],
            boot_args=workload, drives=drives,
            machine=pb.MachineConfig(vcpu_count=vcpus, mem_size_mib=GUEST_MIB, huge_pages=huge))
        vm = self.stub.Boot(request, timeout=60)
        self.vms[vm.id] = {"paused": False, "last_total": 0, "balloon": balloon}

    def get_vm(self, vm_id):
        try:
            return self.stub.GetVm(pb.GetVmRequest(vm_id=vm_id), timeout=30)
        except grpc.RpcError:
            return None

    def stop(self, vm_id):
        try:
            self.stub.StopVm(pb.StopVmRequest(vm_id=vm_id), timeout=60)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                self.error("stop %s: %s" % (vm_id, e.details()))
        self.vms.pop(vm_id, None)

    def spawn(self):
        if not self.kept:
            return
        snapshot = self.rng.choice(self.kept)
        backends = [pb.MEMORY_BACKEND_MEMFD, pb.MEMORY_BACKEND_UFFD]
        if snapshot not in self.huge:
            backends.append(pb.MEMORY_BACKEND_FILE)
        backend = self.rng.choice(backends)
        paused = self.rng.random() < 0.25
        try:
            reply = self.stub.Spawn(pb.SpawnRequest(snapshot=snapshot, count=1, backend=backend,
                                                    start_paused=paused), timeout=120)
        except grpc.RpcError as e:
            holders = self.huge_page_holders() if "huge pages" in (e.details() or "") else ""
            self.error("spawn from %s: %s%s" % (snapshot, e.details(), holders))
            return
        self.counts["spawns"] += 1
        for vm in reply.vms:
            self.vms[vm.id] = {"paused": paused, "last_total": 0,
                               "balloon": snapshot in self.ballooned}

    def huge_page_holders(self):
        """Who holds 2 MiB pages when a spawn could not have them: the run reserves enough for
        every VM it holds at once, so this says which process or file kept more."""
        base = "/sys/kernel/mm/hugepages/hugepages-2048kB/"
        counts = {n: open(base + n).read().strip()
                  for n in ("nr_hugepages", "free_hugepages", "resv_hugepages")}
        held = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open("/proc/%s/status" % pid) as f:
                    status = dict(l.split(":", 1) for l in f if ":" in l)
                fds = os.listdir("/proc/%s/fd" % pid)
            except OSError:
                continue
            kib = status.get("HugetlbPages", "0 kB").split()[0]
            memfds = []
            for fd in fds:
                try:
                    link = os.readlink("/proc/%s/fd/%s" % (pid, fd))
                except OSError:
                    continue
                if link.startswith("/memfd:forkd-guest"):
                    memfds.append(link[len("/memfd:"):])
            if kib != "0" or memfds:
                held.append("%s %s %s kB mapped%s" % (pid, status["Name"].strip(), kib,
                                                     " fds " + ",".join(memfds) if memfds else ""))
        return "\n  huge pages %s; torture VMs %s; holders:\n  %s" % (
            counts, sorted(self.vms), "\n  ".join(held))

    # ---- the store ----
    def snapshot_dir(self, name):
        return os.path.join(self.daemon.state_dir, "snapshots", name)

    def leftovers(self):
        root = os.path.join(self.daemon.state_dir, "snapshots")
        found = [e for e in os.listdir(root) if e.startswith(".")] if os.path.isdir(root) else []
        try:
            listed = self.stub.ListSnapshots(pb.ListSnapshotsRequest(), timeout=30).snapshots
            found += [s.name for s in listed if s.state != pb.SNAPSHOT_STATE_READY]
        except grpc.RpcError as e:
            self.error("list snapshots: " + e.details())
        return found

    def get_snapshot(self, name):
        try:
            return self.stub.GetSnapshot(pb.GetSnapshotRequest(name=name), timeout=30)
        except grpc.RpcError as e:
            if e.code() != grpc.StatusCode.NOT_FOUND:
                self.error("get snapshot %s: %s" % (name, e.details()))
            return None

    def verify(self, name, vm_id):
        disk = os.path.join(self.snapshot_dir(name), "drive-data")
        if os.path.exists(disk):
            self.counts["disks"] += 1
            result = subprocess.run([os.environ["FORKD_TESTVM"], "verify", self.snapshot_dir(name),
                                     "--disk", disk], capture_output=True, text=True,
                                    timeout=scaled(120))
            rc, output = result.returncode, result.stdout + result.stderr
        else:
            rc, output = verify_snapshot(self.snapshot_dir(name))
        if rc != 0:
            self.counts["torn"] += 1
            print("torture: TORN %s of %s:\n%s" % (name, vm_id, output), file=sys.stderr)
            return
        total = sum(int(t) for t in re.findall(r"vcpu \d+ total (\d+)", output))
        state = self.vms.get(vm_id)
        if state is not None and state["balloon"] and "balloon: " not in output:
            self.error("%s of ballooning VM %s: the verifier did not check the balloon:\n%s" %
                       (name, vm_id, output))
        if state is not None:
            if total < state["last_total"]:
                self.counts["torn"] += 1
                print("torture: TORN %s of %s: total %d after %d" %
                      (name, vm_id, total, state["last_total"]), file=sys.stderr)
                return
            state["last_total"] = total
        self.counts["verified"] += 1

    def keep_or_delete(self, name):
        self.kept.append(name)
        while len(self.kept) > KEPT_SNAPSHOTS:
            old = self.kept[0]
            try:
                self.stub.DeleteSnapshot(pb.DeleteSnapshotRequest(name=old), timeout=60)
                self.kept.pop(0)
                self.huge.discard(old)
                self.ballooned.discard(old)
            except grpc.RpcError:
                break  # forks use it: later

    # ---- a branch ----
    def branch(self):
        vm_id = self.rng.choice(sorted(self.vms))
        vm = self.get_vm(vm_id)
        if vm is None or vm.state not in (pb.VM_STATE_RUNNING, pb.VM_STATE_PAUSED):
            self.stop(vm_id)
            return
        live_ok = vm.memory_backend in LIVE_BACKENDS
        mode = LIVE if live_ok and self.rng.random() < 0.7 else FULL
        roll = self.rng.random()
        cancel_at = self.rng.choice(PHASES) if roll < 0.3 else None
        kill_at = self.rng.choice(PHASES) if 0.3 <= roll < 0.38 else None
        self.serial += 1
        name = "t%d" % self.serial
        self.counts["branches"] += 1
        request = pb.BranchRequest(vm_id=vm_id, snapshot_name=name, mode=mode,
                                   progress_interval_ms=10, allow_disk_copy_in_pause=True)
        call = self.stub.Branch(request, timeout=300)
        branch_id, done, cancelled, killed, code, message = "", False, False, False, None, ""
        try:
            for event in call:
                branch_id = event.branch_id or branch_id
                if event.phase == pb.BRANCH_PHASE_DONE:
                    done = True
                if kill_at and not killed and event.phase >= kill_at:
                    os.kill(vm.vmm_pid, signal.SIGKILL)
                    killed = True
                    self.counts["kills"] += 1
                if cancel_at and not cancelled and event.phase >= cancel_at and not done:
                    time.sleep(self.rng.random() * 0.005)
                    call.cancel()
                    cancelled = True
                    self.counts["cancels"] += 1
                    break
        except grpc.RpcError as e:
            code, message = e.code(), e.details()
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            self.counts["hangs"] += 1
            self.error("branch %s of %s hung: %s" % (name, vm_id, message))
        elif code is not None and self.discarded(vm_id, mode, code, message):
            self.counts["discard_aborts"] += 1
        elif code is not None and not (cancelled and code == grpc.StatusCode.CANCELLED):
            self.counts["failed"] += 1
            if not killed:
                self.error("branch %s (%s) of %s failed: %s: %s" %
                           (name, "LIVE" if mode == LIVE else "FULL", vm_id, code, message))
        self.settle(vm_id, name, branch_id, done, cancelled, killed)

    def discarded(self, vm_id, mode, code, message):
        """A LIVE branch of a ballooning VM that failed because the guest discarded a page
        before it was captured (ABORTED), or discarded so often that write-protect kept being
        refused (UNAVAILABLE): the engine's words, which say so."""
        return (mode == LIVE and self.vms.get(vm_id, {}).get("balloon") and
                code in (grpc.StatusCode.ABORTED, grpc.StatusCode.UNAVAILABLE) and
                ("discarded" in message or "kept discarding" in message))

    def settle(self, vm_id, name, branch_id, done, cancelled, killed):
        """After a branch: wait for its end, then check the VM and the store."""
        deadline = time.monotonic() + scaled(120)
        vm = self.get_vm(vm_id)
        while vm is not None and vm.active_branch_id and time.monotonic() < deadline:
            time.sleep(0.05)
            vm = self.get_vm(vm_id)
        if vm is not None and vm.active_branch_id:
            self.counts["hangs"] += 1
            self.error("branch %s of %s did not end" % (name, vm_id))
            return
        snapshot = self.get_snapshot(name)
        # The daemon honoured the cancel if the branch ended cancelled (its worker logs the
        # engine's words); a cancel after the point of no return, or one that reached the
        # daemon only after the branch had ended, is not honoured and the snapshot stays.
        honoured = cancelled and branch_id and re.search(
            r"%s: branch '%s' of [^:]*: .*cancelled" % (re.escape(branch_id), re.escape(name)),
            self.daemon.log())
        if snapshot is not None:
            if honoured:
                self.counts["leftovers"] += 1
                lines = [l for l in self.daemon.log().splitlines() if branch_id + ":" in l]
                self.error("cancelled branch %s left snapshot %s behind; its log:\n%s" %
                           (branch_id, name, "\n".join(lines)))
            elif cancelled:
                self.counts["cancels_refused"] += 1
            if snapshot.state == pb.SNAPSHOT_STATE_READY:
                self.verify(name, vm_id)
                if snapshot.machine.huge_pages == pb.HUGE_PAGES_2M:
                    self.counts["huge_branches"] += 1
                    self.huge.add(name)
                if self.vms.get(vm_id, {}).get("balloon"):
                    self.counts["balloon_branches"] += 1
                    self.ballooned.add(name)
                self.keep_or_delete(name)
        elif done:
            self.error("branch %s reported DONE but snapshot %s is missing" % (branch_id, name))
        stale = self.leftovers()
        if stale:
            self.counts["leftovers"] += len(stale)
            self.error("left in the store after %s: %s" % (name, ", ".join(stale)))
        if killed:
            self.stop(vm_id)
            return
        expected = pb.VM_STATE_PAUSED if self.vms[vm_id]["paused"] else pb.VM_STATE_RUNNING
        if vm is None or vm.state != expected:
            self.error("after %s, VM %s is %s, not %s" %
                       (name, vm_id, vm and pb.VmState.Name(vm.state), pb.VmState.Name(expected)))

    # ---- the run ----
    def step(self):
        while len(self.vms) < 2:
            self.boot()
        roll = self.rng.random()
        if roll < 0.15 and len(self.vms) < MAX_VMS:
            self.spawn()
        elif roll < 0.2 and len(self.vms) > 2:
            self.stop(self.rng.choice(sorted(self.vms)))
        else:
            self.branch()

    def run(self):
        started = time.monotonic()
        end = started + self.args.minutes * 60 if self.args.minutes else None
        try:
            while (self.counts["branches"] < self.args.branches if end is None
                   else time.monotonic() < end):
                self.step()
        finally:
            seconds = time.monotonic() - started
            print(self.line(seconds), flush=True)
            self.daemon.cleanup()
        bad = sum(self.counts[k] for k in ("torn", "leftovers", "hangs", "errors"))
        return 1 if bad else 0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--branches", type=int, default=200, help="stop after this many branches")
    parser.add_argument("--minutes", type=float, default=0, help="run this long instead")
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args()
    print("torture: seed %d" % args.seed, flush=True)
    huge_pages = HugePages()
    try:
        return Torture(args).run()
    finally:
        huge_pages.restore()


if __name__ == "__main__":
    sys.exit(main())
