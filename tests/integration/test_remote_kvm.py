"""The two-host walk with real VMs: host A boots a VM, branches it live, forks the snapshot and
branches the fork, and pushes both snapshots to a real S3 server (Ceph's radosgw); host B (its
own forkd and state directory) pulls them and spawns forks from them, and every snapshot and
every fork's branch verifies. Needs KVM (label kvm: runs in the nested runner, where radosgw
runs inside the runner's guest on its loopback)."""
import os

import hashlib

from forkd_harness import VmDaemon, forkd_pb2 as P, verify_snapshot
from remote_harness import CHUNK, Radosgw


def child_chunks_list(path):
    """sha256 of each 2 MiB chunk of a snapshot's memory.bin, "" for an all-zero one."""
    out = []
    with open(os.path.join(path, "memory.bin"), "rb") as f:
        while chunk := f.read(CHUNK):
            out.append("" if chunk.count(0) == len(chunk) else hashlib.sha256(chunk).hexdigest())
    return out


def chunk_hashes(path):
    """Distinct chunk hashes of a snapshot's memory and their sizes."""
    sizes = {}
    with open(os.path.join(path, "memory.bin"), "rb") as f:
        while chunk := f.read(CHUNK):
            h = "" if chunk.count(0) == len(chunk) else hashlib.sha256(chunk).hexdigest()
            sizes[h] = len(chunk)
    return sizes


def test_branch_push_pull_spawn_across_two_hosts():
    rgw = Radosgw()
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
        rgw.down()
