"""The live-branch demo: boots a guest that writes memory flat out, live-branches it while
showing progress, spawns forks from the branch, branches a fork, checks every snapshot with the
test VMM's verifier and prints the figures. Talks to forkd only through the project's Python
client (clients/python: forkd.Client), as a user would."""
import os
import subprocess
import sys
import time

import forkd

TESTVM = os.environ["FORKD_TESTVM"]
GUEST = os.environ["FORKD_GUEST"]
MEM_MIB = int(os.environ.get("FORKD_DEMO_MEM_MIB", "512"))
# Time limits grow on slow machines: the nested-KVM runner emulates the CPU and sets this.
SCALE = max(1.0, float(os.environ.get("FORKD_TIME_SCALE", "1") or 1))


def ms(ns):
    return "%.3f ms" % (ns / 1e6)


class Progress:
    """One redrawn line on a terminal; a line per quarter otherwise (logs, CI)."""

    def __init__(self):
        self.tty = sys.stdout.isatty()
        self.shown = -1
        self.drawn = False

    def show(self, event, started):
        p = event.progress
        done = p.bytes_copied / p.bytes_total if p.bytes_total else 0
        step = int(done * 4)
        if not self.tty and step == self.shown:
            return
        self.shown = step
        rate = p.bytes_copied / max(time.time() - started, 1e-6) / 2**20
        line = "  copying [%-30s] %5.1f%%  %6.0f MiB/s  fault %d / bulk %d pages" % (
            "#" * int(done * 30), done * 100, rate, p.pages_by_fault, p.pages_by_bulk)
        sys.stdout.write(("\r" + line) if self.tty else (line + "\n"))
        sys.stdout.flush()
        self.drawn = self.tty

    def end(self):
        if self.drawn:
            sys.stdout.write("\n")
        self.drawn = False


def branch(client, vm, name):
    """Runs a live branch, printing its phases; returns the DONE event."""
    started = time.time()
    progress = Progress()
    running = client.branch(vm, name, mode=forkd.BranchMode.LIVE, progress_interval=0.05,
                            timeout=300 * SCALE)
    for event in running:
        if event.phase == forkd.BranchPhase.COPYING:
            progress.show(event, started)
        else:
            progress.end()
            detail = ""
            if event.phase == forkd.BranchPhase.RESUMED:
                detail = "  (paused for %s)" % ms(event.figures.pause_ns)
            print("  %s%s" % (event.phase.name.lower(), detail))
    return running.last


def verify(path):
    result = subprocess.run([TESTVM, "verify", path], capture_output=True, text=True)
    summary = (result.stdout or result.stderr).strip().splitlines()[-1]
    print("  verify %-40s %s" % (os.path.basename(path), summary))
    return result.returncode == 0


def figures(done):
    f, s = done.figures, done.snapshot
    p = s.progress
    copy_rate = s.memory_bytes / max(f.copy_ns, 1) * 1e9 / 2**20
    print("  pause window      %s: pause request %s, vmstate %s, re-arm %s of %d pages, "
          "resume request %s" % (ms(f.pause_ns), ms(f.pause_request_ns), ms(f.vmstate_ns),
                                 ms(f.rearm_ns), f.rearmed_pages, ms(f.resume_request_ns)))
    print("  arm (VM running)  %s" % ms(f.arm_ns))
    print("  copy              %d MiB in %s = %.0f MiB/s, while the guest ran" %
          (s.memory_bytes >> 20, ms(f.copy_ns), copy_rate))
    print("  pages captured    %d by write fault, %d by the bulk copier" %
          (p.pages_by_fault, p.pages_by_bulk))
    e = done.progress
    print("  write faults      %d served, p50 %.1f us, p99 %.1f us (fault read to vCPU wake-up)" %
          (e.faults_served, e.fault_service_p50_ns / 1e3, e.fault_service_p99_ns / 1e3))
    print("  total             %s" % ms(f.total_ns))


def main(target):
    with forkd.Client(target, timeout=10 * SCALE) as client:
        return demo(client, target)


def demo(client, target):
    client.wait_ready(timeout=30 * SCALE)
    info = client.info()
    print("forkd %s on %s (kernel %s, live branch %s)" % (
        info.version, target, info.host.kernel_release,
        "supported" if info.host.live_branch_supported else "NOT supported"))

    vm = client.boot(GUEST, name="demo", vcpu_count=2, mem_size_mib=MEM_MIB,
                     boot_args="pattern=random rate=0", timeout=120 * SCALE)
    print("booted %s: 2 vCPUs, %d MiB, guest writing random pages flat out" % (vm.id, MEM_MIB))

    print("live branch of %s into 'demo-branch':" % vm.id)
    done = branch(client, vm, "demo-branch")
    figures(done)

    forks = client.spawn("demo-branch", 3, backend=forkd.MemoryBackend.MEMFD,
                         name_prefix="fork", timeout=300 * SCALE)
    print("spawned %d forks (MEMFD) in %s: %s" % (len(forks.vms), ms(forks.elapsed_ns),
                                                  ", ".join(v.name for v in forks.vms)))
    print("live branch of %s (a fork) into 'demo-fork-branch':" % forks.vms[0].name)
    child = branch(client, forks.vms[0], "demo-fork-branch")
    print("  pause window      %s" % ms(child.figures.pause_ns))

    print("checking every snapshot (vCPU totals against per-page counters):")
    ok = all(verify(s.path) for s in client.snapshots())
    for v in client.vms():
        client.stop(v, timeout=60 * SCALE)
    print("stopped every VM; %s" % ("all snapshots consistent" if ok else "INCONSISTENT"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
