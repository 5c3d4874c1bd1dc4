"""The two-host walk with real VMs: host A boots a VM, branches it live, forks the snapshot and
branches the fork, and pushes both snapshots to a real S3 server (Ceph's radosgw); host B (its
own forkd and state directory) pulls them and spawns forks from them, and every snapshot and
every fork's branch verifies. Then the lazy Spawn: host B starts UFFD forks of a snapshot that is
only in the bucket, before its memory has arrived; a fork killed while its chunks are in flight
and a chunk corrupted in the bucket. Needs KVM (label kvm: runs in the nested runner, where
radosgw runs inside the runner's guest on its loopback). One radosgw serves the module (it
takes about 107 s to start under nested emulation)."""
import json
import os
import shutil
import signal
import tempfile
import threading
import time

import grpc
import hashlib
import pytest

from forkd_harness import (FORKD_TESTVM, TIME_SCALE, Daemon, VmDaemon, forkd_pb2 as P, scaled,
                           verify_snapshot, vmm_set_state, wait_until)
from remote_harness import CHUNK, FlakyProxy, Radosgw, copy_remote, guest_progress, hot_chunks, \
    userfaultfds_of


@pytest.fixture(scope="module")
def rgw():
    server = Radosgw()
    yield server
    server.down()


def child_chunks_list(path):
    """sha256 of each 2 MiB chunk of a snapshot's memory.bin, "" for an all-zero one."""
    out = []
    with open(os.path.join(path, "memory.bin"), "rb") as f:
        while chunk := f.read(CHUNK):
            out.append("" if chunk.count(0) == len(chunk) else hashlib.sha256(chunk).hexdigest())
    return out


def spawn_while_the_pull_ends(rgw, source):
    """A Spawn whose fork is still starting when the lazy pull's last chunk arrives: the pull
    publishes only once that Spawn has its fork on the pull's files. (It used to publish at
    once, moving the WRITING memory.bin away, and the Spawn failed with NOT_FOUND naming it.)
    Host E's VMM binary is a gate in front of the test VMM that holds one launch until told;
    its proxy holds every chunk GET until released, so the fork is launching when the chunks
    come."""
    gate = tempfile.mkdtemp(prefix="forkd-gate-")
    wrapper = os.path.join(gate, "vmm")
    with open(wrapper, "w") as f:
        f.write('#!/bin/sh\n'
                'if [ -e %(g)s/close ]; then rm -f %(g)s/close; : >%(g)s/waiting\n'
                '  while [ ! -e %(g)s/open ]; do sleep 0.02; done\n'
                'fi\n'
                'exec %(vmm)s "$@"\n' % {"g": gate, "vmm": FORKD_TESTVM})
    os.chmod(wrapper, 0o755)
    expected = child_chunks_list(source)
    proxy = FlakyProxy(rgw.endpoint, lambda n: False, hold_chunks=True)
    e = Daemon("--vmm-binary", wrapper, "--shutdown-grace-ms", "1000", "--remote-endpoint",
               proxy.endpoint, "--remote-bucket", rgw.bucket, "--remote-credentials",
               rgw.credentials)
    try:
        se = e.forkd()
        open(os.path.join(gate, "close"), "w").close()
        result = {}

        def spawn():
            try:
                result["vms"] = se.Spawn(P.SpawnRequest(snapshot="lazy-base", count=1,
                                                        backend=P.MEMORY_BACKEND_UFFD,
                                                        remote=True), timeout=300).vms
            except grpc.RpcError as error:
                result["error"] = error
        caller = threading.Thread(target=spawn)
        caller.start()
        wait_until(lambda: os.path.exists(os.path.join(gate, "waiting")), 60,
                   "the fork's VMM to be launching")
        proxy.release.set()
        snapshots = os.path.join(e.state_dir, "snapshots")

        def every_chunk_written():
            writing = [n for n in os.listdir(snapshots) if n.startswith(".tmp-lazy-base")]
            return len(writing) == 1 and \
                child_chunks_list(os.path.join(snapshots, writing[0])) == expected
        wait_until(every_chunk_written, 300, "every chunk in the WRITING memory.bin")
        open(os.path.join(gate, "open"), "w").close()
        caller.join(scaled(300))
        assert "error" not in result, result["error"].details()
        fork = result["vms"][0]
        wait_until(lambda: guest_progress(fork) > 0, 120, "the fork to run")
        wait_until(lambda: se.GetSnapshot(P.GetSnapshotRequest(name="lazy-base"),
                                          timeout=30).state == P.SNAPSHOT_STATE_READY,
                   120, "the pull to end READY once the Spawn let go")
        assert child_chunks_list(os.path.join(snapshots, "lazy-base")) == expected
        se.StopVm(P.StopVmRequest(vm_id=fork.id), timeout=60)
    finally:
        proxy.release.set()
        open(os.path.join(gate, "open"), "w").close()
        e.cleanup()
        proxy.close()
        shutil.rmtree(gate, ignore_errors=True)


def chunk_hashes(path):
    """Distinct chunk hashes of a snapshot's memory and their sizes."""
    sizes = {}
    with open(os.path.join(path, "memory.bin"), "rb") as f:
        while chunk := f.read(CHUNK):
            h = "" if chunk.count(0) == len(chunk) else hashlib.sha256(chunk).hexdigest()
            sizes[h] = len(chunk)
    return sizes


def test_branch_push_pull_spawn_across_two_hosts(rgw):
    a = VmDaemon("--shutdown-grace-ms", "1000", *rgw.forkd_args())
    b = VmDaemon("--shutdown-grace-ms", "1000", *rgw.forkd_args())
    try:
        sa, sb = a.forkd(), b.forkd()
        # A working set of a quarter of memory, written mostly in a hot tenth of it.
        vm = a.boot(mem_mib=64, workload="pattern=hotset pages=4096 seed=11")
        base = a.branch(vm.id, "base")[-1]
        assert base.phase == P.BRANCH_PHASE_DONE
        assert verify_snapshot(base.snapshot.path)[0] == 0
        fork = sa.Spawn(P.SpawnRequest(snapshot="base", count=1,
                                       backend=P.MEMORY_BACKEND_MEMFD), timeout=120).vms[0]
        child = a.branch(fork.id, "child")[-1]
        assert child.phase == P.BRANCH_PHASE_DONE and child.snapshot.parent_snapshot == "base"
        assert verify_snapshot(child.snapshot.path)[0] == 0

        pushed = list(sa.Push(P.PushRequest(snapshot_name="base"), timeout=600))[-1].progress
        before = rgw.stored_bytes()
        pushed_child = list(sa.Push(P.PushRequest(snapshot_name="child"),
                                    timeout=600))[-1].progress
        # A branch of a fork stores only the chunks whose bytes are not in the bucket yet:
        # exactly the child's distinct non-zero chunks that the parent does not hold.
        stored_child = rgw.stored_bytes() - before
        parent_chunks, child_chunks = chunk_hashes(base.snapshot.path), \
            chunk_hashes(child.snapshot.path)
        new = {h: n for h, n in child_chunks.items() if h and h not in parent_chunks}
        assert stored_child == sum(new.values())
        assert pushed_child.chunks_skipped == sum(
            1 for h in child_chunks_list(child.snapshot.path) if h and h in parent_chunks)
        print("figure: branch of a fork: %d bytes stored for %d bytes of memory (%.1f%%): "
              "%d of %d chunks new, %d shared with the parent, %d zero; the parent stored "
              "%d non-zero chunks" % (stored_child, child.snapshot.memory_bytes,
                                      100.0 * stored_child / child.snapshot.memory_bytes,
                                      len(new), pushed_child.chunks_total,
                                      pushed_child.chunks_skipped, pushed_child.chunks_zero,
                                      pushed.chunks_total - pushed.chunks_zero))

        names = [s.name for s in sb.ListRemote(P.ListRemoteRequest(), timeout=60).snapshots]
        assert names == ["base", "child"]
        for name in names:
            done = list(sb.Pull(P.PullRequest(snapshot_name=name), timeout=600))[-1]
            assert done.done and done.snapshot.state == P.SNAPSHOT_STATE_READY
            assert verify_snapshot(done.snapshot.path)[0] == 0
        for name, path in (("base", base.snapshot.path), ("child", child.snapshot.path)):
            pulled = sb.GetSnapshot(P.GetSnapshotRequest(name=name), timeout=30).path
            for f in ("memory.bin", "vmstate"):
                with open(os.path.join(path, f), "rb") as x, \
                        open(os.path.join(pulled, f), "rb") as y:
                    assert x.read() == y.read(), (name, f)

        # Host B runs forks of what host A made, with each backend; each fork runs on and
        # its own branch verifies.
        for backend, snapshot in ((P.MEMORY_BACKEND_MEMFD, "child"),
                                  (P.MEMORY_BACKEND_FILE, "base"),
                                  (P.MEMORY_BACKEND_UFFD, "base")):
            forks = sb.Spawn(P.SpawnRequest(snapshot=snapshot, count=2, backend=backend,
                                            name_prefix="b%d" % backend), timeout=300).vms
            assert len(forks) == 2
            mode = P.BRANCH_MODE_LIVE if backend == P.MEMORY_BACKEND_MEMFD else \
                P.BRANCH_MODE_FULL
            done = b.branch(forks[0].id, "b-%d" % backend, mode=mode)[-1]
            assert done.phase == P.BRANCH_PHASE_DONE, done
            assert verify_snapshot(done.snapshot.path)[0] == 0
    finally:
        a.cleanup()
        b.cleanup()


def first_progress_s(start, vm, what):
    """Seconds from start (monotonic) until the guest of vm has made progress."""
    wait_until(lambda: guest_progress(vm) > 0, 120, what)
    return time.monotonic() - start


def local_snapshots(daemon):
    """Names in the daemon's store, and any temporary directory a write left behind."""
    names = [s.name for s in daemon.forkd().ListSnapshots(P.ListSnapshotsRequest(),
                                                          timeout=30).snapshots]
    root = os.path.join(daemon.state_dir, "snapshots")
    return names, [e for e in os.listdir(root) if e.startswith(".")] if os.path.isdir(root) \
        else []


def test_lazy_spawn_runs_forks_before_their_memory_arrives(rgw):
    a = VmDaemon("--shutdown-grace-ms", "1000", *rgw.forkd_args())
    b = VmDaemon("--shutdown-grace-ms", "1000", *rgw.forkd_args())
    c = VmDaemon("--shutdown-grace-ms", "1000", *rgw.forkd_args())
    try:
        sa, sb, sc = a.forkd(), b.forkd(), c.forkd()
        vm = a.boot(mem_mib=32, workload="pattern=hotset pages=2048 seed=12")
        made = {}
        for name in ("lazy-base", "lazy-bad"):
            made[name] = a.branch(vm.id, name)[-1].snapshot.path
            assert verify_snapshot(made[name])[0] == 0
            list(sa.Push(P.PushRequest(snapshot_name=name), timeout=600))

        # The API's refusals.
        for request, code in (
                (P.SpawnRequest(snapshot="nowhere", count=1, backend=P.MEMORY_BACKEND_UFFD,
                                remote=True), grpc.StatusCode.NOT_FOUND),
                (P.SpawnRequest(snapshot="lazy-base", count=1, backend=P.MEMORY_BACKEND_FILE,
                                remote=True), grpc.StatusCode.INVALID_ARGUMENT)):
            with pytest.raises(grpc.RpcError) as refused:
                sb.Spawn(request, timeout=60)
            assert refused.value.code() == code, refused.value.details()
        assert local_snapshots(b) == ([], [])

        # Figure: the guest's first progress, lazily (host B) against a full pull then a local
        # spawn (host C), of the same snapshot from the same server.
        start = time.monotonic()
        forks = list(sb.Spawn(P.SpawnRequest(snapshot="lazy-base", count=1, name_prefix="lazy",
                                             backend=P.MEMORY_BACKEND_UFFD, remote=True),
                              timeout=300).vms)
        lazy_s = first_progress_s(start, forks[0], "a lazy fork's first progress")

        # A Spawn while the pull may still proceed shares it (one pull, one cache).
        forks += sb.Spawn(P.SpawnRequest(snapshot="lazy-base", count=1, name_prefix="again",
                                         backend=P.MEMORY_BACKEND_UFFD, remote=True),
                          timeout=300).vms

        # A fork killed while its chunks are in flight: host D reaches the server through a
        # proxy that holds every chunk GET, so its fork starts with none of its memory (its
        # guest cannot make progress) and the pull is WRITING when the fork is killed. Once the
        # chunks are let through, the pull ends READY and a new fork of it runs; nothing of the
        # killed fork is left.
        proxy = FlakyProxy(rgw.endpoint, lambda n: False, hold_chunks=True)
        d = VmDaemon("--shutdown-grace-ms", "1000", "--remote-endpoint", proxy.endpoint,
                     "--remote-bucket", rgw.bucket, "--remote-credentials", rgw.credentials)
        try:
            sd = d.forkd()
            victim = sd.Spawn(P.SpawnRequest(snapshot="lazy-base", count=1, name_prefix="victim",
                                             backend=P.MEMORY_BACKEND_UFFD, remote=True),
                              timeout=300).vms[0]
            assert proxy.held > 0 and guest_progress(victim) == 0
            assert sd.GetSnapshot(P.GetSnapshotRequest(name="lazy-base"),
                                  timeout=30).state == P.SNAPSHOT_STATE_WRITING
            os.kill(victim.vmm_pid, signal.SIGKILL)
            wait_until(lambda: sd.GetVm(P.GetVmRequest(vm_id=victim.id), timeout=30).state ==
                       P.VM_STATE_FAILED, 60, "the killed fork to be seen exited")
            proxy.release.set()
            wait_until(lambda: sd.GetSnapshot(P.GetSnapshotRequest(name="lazy-base"),
                                              timeout=30).state == P.SNAPSHOT_STATE_READY,
                       300, "the lazy pull to end READY after the kill")
            after = sd.Spawn(P.SpawnRequest(snapshot="lazy-base", count=1,
                                            backend=P.MEMORY_BACKEND_UFFD, remote=True),
                             timeout=300).vms[0]
            wait_until(lambda: guest_progress(after) > 0, 120, "a fork after the kill to run")
            assert not os.path.exists(os.path.join(d.state_dir, "vms", victim.id + ".uffd"))
            for v in sd.ListVms(P.ListVmsRequest(), timeout=30).vms:
                sd.StopVm(P.StopVmRequest(vm_id=v.id), timeout=60)
            wait_until(lambda: userfaultfds_of(d.process.pid) == 0, 60,
                       "forkd to hold no userfaultfd")
        finally:
            proxy.release.set()
            d.cleanup()
            proxy.close()

        spawn_while_the_pull_ends(rgw, made["lazy-base"])

        start = time.monotonic()
        list(sc.Pull(P.PullRequest(snapshot_name="lazy-base"), timeout=600))
        pulled_s = time.monotonic() - start
        full = sc.Spawn(P.SpawnRequest(snapshot="lazy-base", count=1,
                                       backend=P.MEMORY_BACKEND_UFFD), timeout=300).vms[0]
        full_s = first_progress_s(start, full, "a pulled fork's first progress")
        print("figure: lazy spawn of a %d MiB snapshot from radosgw: guest's first progress "
              "after %.2f s; full pull (%.2f s) then local spawn: after %.2f s; ratio %.2f"
              % (32, lazy_s, pulled_s, full_s, full_s / lazy_s))

        # Every lazy fork runs on and its branch (which reads all of its memory) verifies; the
        # lazy pull ends READY in B's store with A's bytes; nothing of the killed fork is left.
        for i, fork in enumerate(forks):
            done = b.branch(fork.id, "lazy-copy-%d" % i, mode=P.BRANCH_MODE_FULL, timeout=300)[-1]
            assert done.phase == P.BRANCH_PHASE_DONE, done
            assert verify_snapshot(done.snapshot.path)[0] == 0
        wait_until(lambda: sb.GetSnapshot(P.GetSnapshotRequest(name="lazy-base"),
                                          timeout=30).state == P.SNAPSHOT_STATE_READY,
                   300, "the lazy pull to end READY")
        pulled = sb.GetSnapshot(P.GetSnapshotRequest(name="lazy-base"), timeout=30)
        for f in ("memory.bin", "vmstate"):
            with open(os.path.join(made["lazy-base"], f), "rb") as x, \
                    open(os.path.join(pulled.path, f), "rb") as y:
                assert x.read() == y.read(), f

        # A chunk corrupted in the bucket: the fork that needs it is killed with the reason,
        # never served wrong bytes; the store is left clean; the other forks are unaffected.
        only_bad = sorted({h for h in child_chunks_list(made["lazy-bad"]) if h} -
                          set(child_chunks_list(made["lazy-base"])))
        assert only_bad, "the second branch holds no chunk of its own"
        status, _ = rgw.request("PUT", "chunks/" + only_bad[0], data=b"\0" * CHUNK)
        assert status == 200
        try:
            bad = sb.Spawn(P.SpawnRequest(snapshot="lazy-bad", count=1,
                                          backend=P.MEMORY_BACKEND_UFFD, remote=True),
                           timeout=300).vms[0]
        except grpc.RpcError as refused:  # killed before the Spawn returned
            assert refused.code() == grpc.StatusCode.DATA_LOSS, refused.details()
            reason = refused.details()
        else:
            # Its branch reads every page, so the fork faults in the corrupt chunk.
            with pytest.raises(grpc.RpcError):
                b.branch(bad.id, "bad-copy", mode=P.BRANCH_MODE_FULL, timeout=300)
            wait_until(lambda: sb.GetVm(P.GetVmRequest(vm_id=bad.id), timeout=30).state ==
                       P.VM_STATE_FAILED, 60, "the fork needing the corrupt chunk to end")
            reason = sb.GetVm(P.GetVmRequest(vm_id=bad.id), timeout=30).exit_reason
        assert "corrupt" in reason and only_bad[0][:16] in reason, reason
        wait_until(lambda: local_snapshots(b)[1] == [], 300,
                   "the failed lazy pull to leave nothing")
        assert sorted(local_snapshots(b)[0]) == ["lazy-base", "lazy-copy-0", "lazy-copy-1"]
        for fork in forks:
            assert sb.GetVm(P.GetVmRequest(vm_id=fork.id), timeout=30).state == \
                P.VM_STATE_RUNNING
            before = guest_progress(fork)
            wait_until(lambda: guest_progress(fork) > before, 60, "a lazy fork to run on")

        # Stopping every fork leaves the page server holding no userfaultfd.
        for v in sb.ListVms(P.ListVmsRequest(), timeout=30).vms:
            sb.StopVm(P.StopVmRequest(vm_id=v.id), timeout=60)
        wait_until(lambda: userfaultfds_of(b.process.pid) == 0, 60,
                   "forkd to hold no userfaultfd")
    finally:
        a.cleanup()
        b.cleanup()
        c.cleanup()


def snapshot_hot(path):
    """The "hot" value of a snapshot's snapshot.json, or None."""
    with open(os.path.join(path, "snapshot.json")) as f:
        return json.load(f).get("hot")


def covered(ranges, offset):
    return any(o <= offset < o + n for o, n in ranges)


def test_a_live_branch_records_the_guests_hot_region_and_it_survives_push_and_pull(rgw):
    a = VmDaemon("--shutdown-grace-ms", "1000", *rgw.forkd_args())
    b = VmDaemon("--shutdown-grace-ms", "1000", *rgw.forkd_args())
    try:
        sa, sb = a.forkd(), b.forkd()
        # Every page above 1 MiB is in the working set; 9 writes in 10 go to its middle tenth.
        mem_mib = 128
        pages = ((mem_mib - 1) << 20) // 4096
        vm = a.boot(mem_mib=mem_mib, workload="pattern=hotset seed=31")
        wait_until(lambda: guest_progress(vm) > 10 ** 7, 120, "the guest to be well into its loop")
        live = a.branch(vm.id, "warm")[-1]
        assert live.phase == P.BRANCH_PHASE_DONE, live
        hot = snapshot_hot(live.snapshot.path)
        assert hot is not None and hot["version"] == 1, hot
        ranges = hot["ranges"]
        # memory.bin is guest-physical memory (one region): the hot tenth's pages are at
        # 1 MiB + (pages - hot_pages) / 2 pages on.
        hot_pages = pages // 10
        first = (1 << 20) + (pages - hot_pages) // 2 * 4096
        end = first + hot_pages * 4096
        # The hot set holds every chunk of the hot tenth (what a lazy Spawn fetches first) ...
        chunks = set(hot_chunks(hot))
        assert set(range(first // CHUNK, (end - 1) // CHUNK + 1)) <= chunks, (first, end, ranges)
        # ... and its pages far more densely than the rest of the working set: it is what the
        # guest was writing (in the branch's window, a write fault per page), not memory at large.
        in_hot = sum(1 for p in range(first, end, 4096) if covered(ranges, p))
        elsewhere = sum(n for _, n in ranges) // 4096 - in_hot
        assert in_hot / hot_pages >= 4 * elsewhere / (pages - hot_pages), (in_hot, elsewhere)
        assert live.snapshot.hot_bytes == sum(n for _, n in ranges)
        assert live.snapshot.hot_ranges == len(ranges) <= 256
        # Local UFFD forks with prefetch on get the hot set copied in before they run, from the
        # first fork on (before, only forks after a recording window were prefetched).
        first = sa.Spawn(P.SpawnRequest(snapshot="warm", count=1, backend=P.MEMORY_BACKEND_UFFD,
                                        prefetch_record_ms=1000), timeout=120).vms[0]
        assert first.page_server.pages_prefetched >= live.snapshot.hot_bytes // 4096, \
            first.page_server
        sa.StopVm(P.StopVmRequest(vm_id=first.id), timeout=60)
        # A FULL branch does not watch the guest write: it records none.
        full = a.branch(vm.id, "warm-full", mode=P.BRANCH_MODE_FULL)[-1]
        assert full.phase == P.BRANCH_PHASE_DONE, full
        assert full.snapshot.hot_bytes == 0 and snapshot_hot(full.snapshot.path) is None

        list(sa.Push(P.PushRequest(snapshot_name="warm"), timeout=600))
        listed = sb.ListRemote(P.ListRemoteRequest(), timeout=60).snapshots
        assert [s.hot_bytes for s in listed if s.name == "warm"] == [live.snapshot.hot_bytes]
        pulled = list(sb.Pull(P.PullRequest(snapshot_name="warm"), timeout=600))[-1].snapshot
        assert snapshot_hot(pulled.path) == hot
        assert (pulled.hot_bytes, pulled.hot_ranges) == (live.snapshot.hot_bytes, len(ranges))
    finally:
        a.cleanup()
        b.cleanup()


def test_a_lazy_spawn_fetches_the_hot_chunks_before_the_others(rgw):
    a = VmDaemon("--shutdown-grace-ms", "1000", *rgw.forkd_args())
    proxy, d = None, None
    try:
        sa = a.forkd()
        # A guest writing slowly all over its memory, 9 times in 10 to its hot tenth: by the
        # branch most chunks hold something, but only the chunks it wrote while the branch
        # armed write-protect are hot. forkd's window for that grows with the host's time
        # scale, so the guest writes as much slower (else it writes everywhere in the window).
        rate = max(1, int(5000 / TIME_SCALE))
        vm = a.boot(mem_mib=64, workload="pattern=hotset rate=%d seed=32" % rate)
        wait_until(lambda: guest_progress(vm) > 3 * rate, 120, "the guest to write all over")
        made = a.branch(vm.id, "ordered")[-1].snapshot
        list(sa.Push(P.PushRequest(snapshot_name="ordered"), timeout=600))
        hashes = child_chunks_list(made.path)
        hot = set(hot_chunks(snapshot_hot(made.path)))
        present = [i for i, h in enumerate(hashes) if h]
        hot_first = [i for i in present if i in hot]
        rest = [i for i in present if i not in hot]
        assert hot_first and rest, (hot_first, rest)
        assert hot_first + rest != present, "the hot chunks come first in file order anyway"

        # Host D fetches through a proxy that holds the cold chunks, with one connection: the
        # order of its GETs is the order the pull takes the chunks in. Its fork is spawned
        # paused, so no fault asks for a chunk out of turn.
        cold = {hashes[i] for i in rest}
        proxy = FlakyProxy(rgw.endpoint, lambda n: False, hold_chunk=lambda h: h in cold)
        d = VmDaemon("--shutdown-grace-ms", "1000", "--remote-parallel", "1",
                     "--remote-endpoint", proxy.endpoint, "--remote-bucket", rgw.bucket,
                     "--remote-credentials", rgw.credentials)
        sd = d.forkd()
        fork = sd.Spawn(P.SpawnRequest(snapshot="ordered", count=1, start_paused=True,
                                       backend=P.MEMORY_BACKEND_UFFD, remote=True),
                        timeout=300).vms[0]

        def pulled(name="ordered"):
            return sd.GetSnapshot(P.GetSnapshotRequest(name=name), timeout=30)

        wait_until(lambda: pulled().lazy_pull.hot_chunks_fetched == len(hot_first), 120,
                   "every hot chunk to arrive while the cold ones are held")
        status = pulled()
        assert status.state == P.SNAPSHOT_STATE_WRITING
        progress = status.lazy_pull
        assert progress.hot_chunks == len(hot_first) and progress.hot_fetched_ns > 0
        assert progress.chunks_fetched == len(hot_first) and progress.chunks_demanded == 0
        assert progress.chunks_total == len(hashes)
        assert progress.chunks_zero == len(hashes) - len(present)
        assert proxy.chunk_gets[:len(hot_first)] == [hashes[i] for i in hot_first]

        proxy.release.set()
        wait_until(lambda: pulled().state == P.SNAPSHOT_STATE_READY, 300,
                   "the lazy pull to end READY")
        gets = [h for i, h in enumerate(proxy.chunk_gets)
                if i == 0 or h != proxy.chunk_gets[i - 1]]  # a retried GET counts once
        assert gets == [hashes[i] for i in hot_first + rest]
        assert not pulled().HasField("lazy_pull")
        with open(os.path.join(made.path, "memory.bin"), "rb") as x, \
                open(os.path.join(pulled().path, "memory.bin"), "rb") as y:
            assert x.read() == y.read()
        vmm_set_state(fork, "Resumed")
        wait_until(lambda: guest_progress(fork) > 0, 120, "the fork to run once resumed")

        # A manifest from before the hot set spawns lazily as it did (file order, no hot chunk).
        copy_remote(rgw, "ordered", "ordered-old", hot=None)
        old = sd.Spawn(P.SpawnRequest(snapshot="ordered-old", count=1,
                                      backend=P.MEMORY_BACKEND_UFFD, remote=True),
                       timeout=300).vms[0]
        wait_until(lambda: guest_progress(old) > 0, 120, "a fork of an old manifest to run")
        wait_until(lambda: pulled("ordered-old").state == P.SNAPSHOT_STATE_READY, 300,
                   "the old manifest's lazy pull to end READY")

        # A hot set that does not fit the snapshot is refused before anything is fetched, naming
        # what is wrong, and leaves nothing.
        copy_remote(rgw, "ordered", "ordered-bad", hot=[[0, 4096], [made.memory_bytes, 4096]])
        with pytest.raises(grpc.RpcError) as refused:
            sd.Spawn(P.SpawnRequest(snapshot="ordered-bad", count=1,
                                    backend=P.MEMORY_BACKEND_UFFD, remote=True), timeout=300)
        assert refused.value.code() == grpc.StatusCode.DATA_LOSS, refused.value.details()
        assert "ordered-bad" in refused.value.details()
        assert "hot: ranges[1] ends at %d, beyond memory_bytes (%d)" % (
            made.memory_bytes + 4096, made.memory_bytes) in refused.value.details()
        assert local_snapshots(d) == (["ordered", "ordered-old"], [])
        assert len(sd.ListVms(P.ListVmsRequest(), timeout=30).vms) == 2
    finally:
        if proxy:
            proxy.release.set()
        if d:
            d.cleanup()
        if proxy:
            proxy.close()
        a.cleanup()
