"""The two-host walk with real VMs: host A boots a VM, branches it live, forks the snapshot and
branches the fork, and pushes both snapshots to a real S3 server (Ceph's radosgw); host B (its
own forkd and state directory) pulls them and spawns forks from them, and every snapshot and
every fork's branch verifies. Needs KVM (label kvm: runs in the nested runner, where radosgw
runs inside the runner's guest on its loopback)."""
import os

from forkd_harness import VmDaemon, forkd_pb2 as P, verify_snapshot
from remote_harness import Radosgw


def test_branch_push_pull_spawn_across_two_hosts():
    rgw = Radosgw()
    a = VmDaemon("--shutdown-grace-ms", "1000", *rgw.forkd_args())
    b = VmDaemon("--shutdown-grace-ms", "1000", *rgw.forkd_args())
    try:
        sa, sb = a.forkd(), b.forkd()
        # A working set of 8 MiB in 64 MiB: a fork rewrites those chunks, the rest it shares.
        vm = a.boot(mem_mib=64, workload="pattern=random pages=2048 seed=11")
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
        # A branch of a fork stores only the chunks the fork changed.
        stored_child = rgw.stored_bytes() - before
        assert pushed_child.chunks_skipped > 0
        assert stored_child < child.snapshot.memory_bytes
        print("figure: branch of a fork: %d bytes stored for %d bytes of memory (%.1f%%); "
              "base: %d chunks, %d zero" % (stored_child, child.snapshot.memory_bytes,
                                            100.0 * stored_child / child.snapshot.memory_bytes,
                                            pushed.chunks_total, pushed.chunks_zero))

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
