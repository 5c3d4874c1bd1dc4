#!/usr/bin/python3
"""Remote-snapshot figures against a real S3 server (Ceph's radosgw, scripts/radosgw.sh), each
as a ratio against a baseline measured in the same run on the same server:

- push rate: forkd's Push of a snapshot (memory as 2 MiB content-addressed chunks, hashed,
  HEAD-checked for duplicates, --remote-parallel connections) against curl's own single PUT of
  the same memory.bin bytes;
- pull rate: forkd's Pull (ranged into chunks, every chunk's sha256 checked, written through
  the store) against curl's own GET of that object;
- a second push of the same snapshot under another name: what dedup leaves to send.

Needs no KVM: the snapshot is random bytes laid down in host A's state directory the way the
store writes one. Prints a table and writes JSON (--json PATH).

With --lazy (needs KVM), the lazy Spawn's hot set, against the same snapshot without it, in the
same run on the same server: a guest of --lazy-mib MiB, all of it written at boot (the test
VMM's --boot-memory fill, so every chunk must be fetched), writes flat out into a working set of
--lazy-ws-mib MiB in the middle of its memory (pattern=hotset: 9 writes in 10 to a tenth of it).
Host A branches it LIVE (recording the hot set) and pushes it; a copy of the manifest without
the hot set (as an older forkd would have pushed it) shares its chunks. A fresh forkd then
spawns one lazy fork of each, alternately, --lazy-reps times, and reads the guest's own progress
reports (the test VMM's GET /progress): the time from the Spawn call to the guest's first
progress, to its write rate reaching 90% of its undisturbed rate (over 100 ms; undisturbed: the
same fork's rate once the pull is READY and every page is in), and to READY. A local UFFD Spawn
of the pulled snapshot gives the floor.

    /usr/bin/python3 tests/bench/remote_bench.py --build build [--mib 256] [--parallel 4]
        [--lazy [--lazy-mib 256] [--lazy-ws-mib 32] [--lazy-reps 3]]
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.abspath(os.path.join(HERE, "..", ".."))


RATE_WINDOW_NS = 100 * 1000000  # the write rate is measured over this much of the guest's time
RATE_SHARE = 0.9                # "at its undisturbed rate": at least this share of it


def progress_reports(vm, since_ns):
    """The guest's progress reports (vCPU 0) that arrived after since_ns: [(at_ns, total)]."""
    from forkd_harness import vmm_get
    out = []
    while True:
        answer = vmm_get(vm, "/progress/%d" % since_ns)
        vcpu = answer["vcpus"][0]
        out += list(zip(vcpu["at_ns"], vcpu["progress"]))
        if not answer.get("more") or not vcpu["at_ns"]:
            return out
        since_ns = vcpu["at_ns"][-1]


def rate_figures(reports, start_ns, settled_ns):
    """From one fork's reports: seconds from start_ns to its first report and to its rate over
    RATE_WINDOW_NS first reaching RATE_SHARE of its undisturbed rate (its rate from settled_ns
    on), and that rate (writes per second)."""
    late = [r for r in reports if r[0] >= settled_ns]
    assert len(late) >= 2, "too few reports after the pull was READY"
    undisturbed = (late[-1][1] - late[0][1]) / ((late[-1][0] - late[0][0]) / 1e9)
    j = 0
    for i, (at, total) in enumerate(reports):
        j = max(j, i)
        while j < len(reports) and reports[j][0] < at + RATE_WINDOW_NS:
            j += 1
        if j == len(reports):
            break
        rate = (reports[j][1] - total) / ((reports[j][0] - at) / 1e9)
        if rate >= RATE_SHARE * undisturbed:
            return (reports[0][0] - start_ns) / 1e9, (at - start_ns) / 1e9, undisturbed
    raise AssertionError("the guest never reached %.0f%% of its undisturbed rate"
                         % (100 * RATE_SHARE))


def measure_fork(daemon, name, remote, forkd_pb2):
    """Spawns one UFFD fork of name (lazily from the bucket when remote) and follows it until
    the pull is READY (at once when local) and 2 s more, the last second its undisturbed rate:
    {first, rate, ready, hot_fetched, undisturbed}."""
    stub = daemon.forkd()
    start = time.monotonic_ns()
    fork = stub.Spawn(forkd_pb2.SpawnRequest(snapshot=name, count=1, remote=remote,
                                             backend=forkd_pb2.MEMORY_BACKEND_UFFD),
                      timeout=600).vms[0]
    reports, since, ready_ns, hot_ns = [], start, None if remote else start, 0
    while ready_ns is None or time.monotonic_ns() < ready_ns + 2000 * 1000000:
        got = progress_reports(fork, since)
        if got:
            reports += got
            since = got[-1][0]
        if ready_ns is None:
            snap = stub.GetSnapshot(forkd_pb2.GetSnapshotRequest(name=name), timeout=30)
            if snap.state == forkd_pb2.SNAPSHOT_STATE_READY:
                ready_ns = time.monotonic_ns()
            elif snap.lazy_pull.hot_fetched_ns:
                hot_ns = snap.lazy_pull.hot_fetched_ns
        time.sleep(0.02)
    first, rate, undisturbed = rate_figures(reports, start, ready_ns + 1000 * 1000000)
    stub.StopVm(forkd_pb2.StopVmRequest(vm_id=fork.id), timeout=60)
    return {"first_s": first, "rate_s": rate, "ready_s": (ready_ns - start) / 1e9,
            "hot_fetched_s": hot_ns / 1e9, "undisturbed_per_s": undisturbed}


def lazy_figures(args, rgw, work, daemons):
    """The --lazy section (see the top of this file)."""
    import statistics
    from forkd_harness import Daemon, forkd_pb2, wait_until
    from remote_harness import copy_remote, guest_progress, hot_chunks
    import json as json_module
    wrapper = os.path.join(work, "forkd-testvm-filled")
    with open(wrapper, "w") as f:
        f.write('#!/bin/sh\nexec %s "$@" --boot-memory fill\n'
                % os.path.join(os.path.abspath(args.build), "tests", "vmm", "forkd-testvm"))
    os.chmod(wrapper, 0o755)
    flags = ["--vmm-binary", wrapper, "--shutdown-grace-ms", "1000", *rgw.forkd_args(),
             "--remote-parallel", str(args.parallel)]
    a = Daemon(*flags)
    daemons.append(a)
    ws_pages = (args.lazy_ws_mib << 20) // 4096
    skip = ((args.lazy_mib - args.lazy_ws_mib) << 20) // 2 // 4096  # the working set mid-memory
    guest = os.path.join(os.path.abspath(args.build), "tests", "vmm", "guest.bin")
    vm = a.forkd().Boot(forkd_pb2.BootRequest(
        name="lazy-src", kernel_image_path=guest,
        boot_args="pattern=hotset pages=%d skip=%d seed=41" % (ws_pages, skip),
        machine=forkd_pb2.MachineConfig(vcpu_count=1, mem_size_mib=args.lazy_mib)), timeout=120)
    # Well into its loop (10^7 writes: a fraction of a second flat out), as a guest one branches
    # would be: the branch's 20 ms window then sees it write.
    wait_until(lambda: guest_progress(vm) > 10 ** 7, 120, "the source guest to run")
    branch = list(a.forkd().Branch(forkd_pb2.BranchRequest(vm_id=vm.id, snapshot_name="hot"),
                                   timeout=600))[-1]
    assert branch.phase == forkd_pb2.BRANCH_PHASE_DONE, branch
    list(a.forkd().Push(forkd_pb2.PushRequest(snapshot_name="hot"), timeout=3600))
    copy_remote(rgw, "hot", "cold", hot=None)
    with open(os.path.join(branch.snapshot.path, "snapshot.json")) as f:
        hot = json_module.load(f).get("hot")
    runs = {"hot": [], "cold": [], "local": []}
    for rep in range(args.lazy_reps):
        for name in (("hot", "cold") if rep % 2 == 0 else ("cold", "hot")):
            b = Daemon(*flags)
            try:
                runs[name].append(measure_fork(b, name, True, forkd_pb2))
                if name == "hot":  # the floor: the same snapshot, all of it local now
                    runs["local"].append(measure_fork(b, name, False, forkd_pb2))
            finally:
                b.cleanup()
    med = {k: {f: statistics.median(r[f] for r in v) for f in v[0]} for k, v in runs.items()}
    return {
        "lazy_memory_mib": args.lazy_mib, "lazy_working_set_mib": args.lazy_ws_mib,
        "lazy_reps": args.lazy_reps, "hot_bytes": branch.snapshot.hot_bytes,
        "hot_chunks": len(hot_chunks(hot)), "chunks": (args.lazy_mib << 20) // (2 << 20),
        "runs": runs, "median": med,
        "rate_cold_vs_hot": med["cold"]["rate_s"] / med["hot"]["rate_s"],
    }


def print_lazy(lazy):
    med = lazy["median"]
    print("lazy Spawn, %d MiB guest (all written), %d MiB working set mid-memory, hot set %d "
          "bytes in %d of %d chunks; medians of %d runs each" % (
              lazy["lazy_memory_mib"], lazy["lazy_working_set_mib"], lazy["hot_bytes"],
              lazy["hot_chunks"], lazy["chunks"], lazy["lazy_reps"]))
    print("  %-26s %9s %12s %9s %12s" % ("", "first (s)", "90% rate (s)", "READY (s)",
                                         "hot in (s)"))
    for key, label in (("hot", "lazy, hot set first"), ("cold", "lazy, no hot set"),
                       ("local", "local UFFD (pulled)")):
        m = med[key]
        print("  %-26s %9.2f %12.2f %9.2f %12s" % (label, m["first_s"], m["rate_s"],
                                                    m["ready_s"],
                                                    "%.2f" % m["hot_fetched_s"]
                                                    if key == "hot" else "-"))
    print("  time to 90%% of the undisturbed rate: %.2fx shorter with the hot set"
          % lazy["rate_cold_vs_hot"])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", default=os.path.join(SOURCE, "build"))
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--json", default="")
    parser.add_argument("--lazy", action="store_true")
    parser.add_argument("--lazy-mib", type=int, default=256)
    parser.add_argument("--lazy-ws-mib", type=int, default=32)
    parser.add_argument("--lazy-reps", type=int, default=3)
    args = parser.parse_args()
    build = os.path.abspath(args.build)
    os.environ["FORKD_BIN"] = os.path.join(build, "service", "forkd")
    os.environ["FORKD_PROTO_PYTHON"] = os.path.join(build, "proto", "python")
    os.environ["FORKD_SOURCE_DIR"] = SOURCE
    sys.path.insert(0, os.path.join(SOURCE, "tests", "integration"))
    from forkd_harness import Daemon, forkd_pb2
    from remote_harness import Radosgw, plant_snapshot

    size = args.mib << 20
    lazy_memory = 2 * args.lazy_mib if args.lazy else 0
    rgw = Radosgw(memory_mib=max(1024, 4 * args.mib + lazy_memory + 512))
    work = tempfile.mkdtemp(prefix="forkd-remote-bench-")
    daemons = []
    try:
        memory = os.urandom(size)
        vmstate = os.urandom(64 << 10)
        flags = rgw.forkd_args() + ["--remote-parallel", str(args.parallel)]

        def plant(state_dir):
            plant_snapshot(state_dir, "bench", memory, vmstate)
            plant_snapshot(state_dir, "bench-again", memory, vmstate)

        a = Daemon("--shutdown-grace-ms", "1000", *flags, start=False)
        plant(a.state_dir)
        a.start()
        b = Daemon("--shutdown-grace-ms", "1000", *flags)
        daemons += [a, b]
        path = os.path.join(work, "memory.bin")
        with open(path, "wb") as f:
            f.write(memory)
        curl = ["curl", "-sf", "-K", rgw._curl_config, "--aws-sigv4", "aws:amz:us-east-1:s3",
                "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"]
        url = "%s/%s/baseline/memory.bin" % (rgw.endpoint, rgw.bucket)

        start = time.monotonic()
        subprocess.run(curl + ["-T", path, url], check=True)
        curl_put_s = time.monotonic() - start
        start = time.monotonic()
        subprocess.run(curl + ["-o", os.path.join(work, "got.bin"), url], check=True)
        curl_get_s = time.monotonic() - start
        os.unlink(os.path.join(work, "got.bin"))

        def transfer(method, request):
            start = time.monotonic()
            last = list(method(request, timeout=3600))[-1].progress
            return time.monotonic() - start, last

        push_s, push = transfer(a.forkd().Push, forkd_pb2.PushRequest(snapshot_name="bench"))
        again_s, again = transfer(a.forkd().Push,
                                  forkd_pb2.PushRequest(snapshot_name="bench-again"))
        pull_s, pull = transfer(b.forkd().Pull, forkd_pb2.PullRequest(snapshot_name="bench"))

        mib = size / (1 << 20)
        figures = {
            "memory_mib": args.mib, "parallel": args.parallel,
            "radosgw_start_ms": rgw.start_ms,
            "curl_put_mib_s": mib / curl_put_s, "curl_get_mib_s": mib / curl_get_s,
            "push_mib_s": mib / push_s, "pull_mib_s": mib / pull_s,
            "push_vs_curl_put": curl_put_s / push_s, "pull_vs_curl_get": curl_get_s / pull_s,
            "second_push_s": again_s, "second_push_chunks_skipped": again.chunks_skipped,
            "second_push_bytes_sent": again.bytes_transferred,
            "second_push_vs_first": again_s / push_s,
        }
        print("remote snapshots, %d MiB of random memory, %d connections, radosgw on loopback"
              % (args.mib, args.parallel))
        print("  radosgw cold start            %8.0f ms" % rgw.start_ms)
        print("  curl PUT (one object)         %8.1f MiB/s" % figures["curl_put_mib_s"])
        print("  forkd Push                    %8.1f MiB/s   %.2fx curl PUT"
              % (figures["push_mib_s"], figures["push_vs_curl_put"]))
        print("  curl GET (one object)         %8.1f MiB/s" % figures["curl_get_mib_s"])
        print("  forkd Pull (hash-checked)     %8.1f MiB/s   %.2fx curl GET"
              % (figures["pull_mib_s"], figures["pull_vs_curl_get"]))
        print("  Push of the same bytes again  %8.2f s       %.2fx the first push, %d of %d "
              "chunks skipped, %d bytes sent" % (again_s, figures["second_push_vs_first"],
                                                 again.chunks_skipped, again.chunks_total,
                                                 again.bytes_transferred))
        if args.lazy:
            figures["lazy"] = lazy_figures(args, rgw, work, daemons)
            print_lazy(figures["lazy"])
        if args.json:
            with open(args.json, "w") as f:
                json.dump(figures, f, indent=2)
    finally:
        for d in daemons:
            d.cleanup()
        rgw.down()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
