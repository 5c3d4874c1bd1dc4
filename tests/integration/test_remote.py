"""Remote snapshots through a real S3 server (Ceph's radosgw, scripts/radosgw.sh): two forkd
daemons with their own state directories stand for two hosts. A pushes, B pulls; the bytes B
gets are the bytes A had. Faults: the gateway stopped mid-push, a chunk corrupted or missing in
the bucket, wrong credentials, a client that leaves. No VM is needed: the snapshots are laid down
in A's state directory the way the store writes them (it loads them at start-up)."""
import hashlib
import json
import os

import grpc
import pytest

from forkd_harness import Daemon, forkd_pb2, wait_until
from remote_harness import CHUNK, Radosgw, copy_remote, memory_image, plant_snapshot


@pytest.fixture(scope="module")
def rgw():
    server = Radosgw()
    yield server
    server.down()


def started(daemon_args, plant=None):
    """A forkd with the given flags; plant(state_dir) lays down snapshots before it starts."""
    d = Daemon("--shutdown-grace-ms", "1000", *daemon_args, start=False)
    if plant:
        plant(d.state_dir)
    d.start()
    return d


def read(path):
    with open(path, "rb") as f:
        return f.read()


def snapshot_files(daemon, name):
    d = os.path.join(daemon.state_dir, "snapshots", name)
    return read(os.path.join(d, "memory.bin")), read(os.path.join(d, "vmstate"))


def push(daemon, name, **kwargs):
    return list(daemon.forkd().Push(forkd_pb2.PushRequest(snapshot_name=name, **kwargs),
                                    timeout=300))


def pull(daemon, name, **kwargs):
    return list(daemon.forkd().Pull(forkd_pb2.PullRequest(snapshot_name=name, **kwargs),
                                    timeout=300))


def store_is_clean(daemon):
    """No snapshot listed and no leftover directory (temporary or not) in the store."""
    listed = daemon.forkd().ListSnapshots(forkd_pb2.ListSnapshotsRequest(), timeout=30)
    left = os.listdir(os.path.join(daemon.state_dir, "snapshots"))
    return not listed.snapshots and not left


# 12 chunks: zeros, random, a chunk repeated inside the image, a short last chunk.
LAYOUT = ["r", "z", "r", "r", 0, "z", "r", "r", "r", "z", "r", os.urandom(CHUNK // 2)]


def test_push_then_pull_moves_the_same_bytes_between_hosts(rgw):
    memory = memory_image(LAYOUT, seed=1)
    vmstate = os.urandom(123457)
    a = started(rgw.forkd_args(),
                lambda s: plant_snapshot(s, "walk", memory, vmstate))
    b = started(rgw.forkd_args())
    try:
        events = push(a, "walk", progress_interval_ms=10)
        assert events[-1].done and all(not e.done for e in events[:-1])
        last = events[-1].progress
        assert last.chunks_total == len(LAYOUT)
        assert last.chunks_zero == 3
        assert last.bytes_done == last.bytes_total == len(memory) + len(vmstate)
        # The repeated chunk is stored once: 8 distinct non-zero chunks in the bucket.
        chunks = [k for k in rgw.keys("chunks/")]
        assert len(chunks) == 8
        for key in chunks:
            status, body = rgw.request("GET", key)
            assert status == 200 and hashlib.sha256(body).hexdigest() == key.split("/")[1]
        assert "snapshots/walk/manifest.json" in rgw.keys("snapshots/")

        listed = b.forkd().ListRemote(forkd_pb2.ListRemoteRequest(), timeout=60)
        assert [s.name for s in listed.snapshots] == ["walk"]
        assert listed.snapshots[0].memory_bytes == len(memory)
        assert listed.snapshots[0].zero_chunks == 3

        events = pull(b, "walk", progress_interval_ms=10)
        assert events[-1].done
        assert events[-1].snapshot.name == "walk"
        assert events[-1].snapshot.state == forkd_pb2.SNAPSHOT_STATE_READY
        assert events[-1].snapshot.labels["origin"] == "host-a"
        assert snapshot_files(b, "walk") == (memory, vmstate)
        got = b.forkd().GetSnapshot(forkd_pb2.GetSnapshotRequest(name="walk"), timeout=30)
        assert got.state == forkd_pb2.SNAPSHOT_STATE_READY

        # A second pull of a name the store has is refused and changes nothing.
        with pytest.raises(grpc.RpcError) as e:
            pull(b, "walk")
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        # So is a second push of a name the bucket has.
        with pytest.raises(grpc.RpcError) as e:
            push(a, "walk")
        assert e.value.code() == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(grpc.RpcError) as e:
            pull(b, "nowhere")
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        a.cleanup()
        b.cleanup()
        _delete_everything(rgw)  # the bucket is shared by the module's tests


def _delete_everything(rgw):
    for key in rgw.keys():
        rgw.request("DELETE", key)


def test_a_branch_of_a_fork_stores_only_what_changed_and_delete_keeps_shared_chunks(rgw):
    parent = memory_image(["r"] * 16, seed=2)
    changed = bytearray(parent)
    changed[5 * CHUNK + 100] ^= 0xFF  # one page of chunk 5 written by the fork
    changed[9 * CHUNK:10 * CHUNK] = bytes(CHUNK)  # chunk 9 freed (zero)
    child = bytes(changed)

    def plant(s):
        plant_snapshot(s, "parent", parent, b"P" * 4096)
        plant_snapshot(s, "child", child, b"C" * 4096, parent="parent")

    a = started(rgw.forkd_args(), plant)
    b = started(rgw.forkd_args())
    try:
        push(a, "parent")
        before = rgw.stored_bytes()
        last = push(a, "child")[-1].progress
        assert last.chunks_skipped == 14 and last.chunks_zero == 1
        # Only the one changed chunk went up (plus the manifest and the vmstate).
        assert rgw.stored_bytes() - before == CHUNK
        assert last.bytes_transferred < 2 * CHUNK
        # DeleteRemote of the parent keeps the 14 chunks the child shares, drops its own 2.
        reply = b.forkd().DeleteRemote(forkd_pb2.DeleteRemoteRequest(snapshot_name="parent"),
                                       timeout=120)
        assert (reply.chunks_deleted, reply.chunks_kept) == (2, 14)
        listed = b.forkd().ListRemote(forkd_pb2.ListRemoteRequest(), timeout=60)
        assert [s.name for s in listed.snapshots] == ["child"]
        pull(b, "child")
        assert snapshot_files(b, "child") == (child, b"C" * 4096)
        reply = b.forkd().DeleteRemote(forkd_pb2.DeleteRemoteRequest(snapshot_name="child"),
                                       timeout=120)
        assert (reply.chunks_deleted, reply.chunks_kept) == (15, 0)
        assert rgw.keys() == []
        with pytest.raises(grpc.RpcError) as e:
            b.forkd().DeleteRemote(forkd_pb2.DeleteRemoteRequest(snapshot_name="child"),
                                   timeout=60)
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        a.cleanup()
        b.cleanup()
        _delete_everything(rgw)


@pytest.mark.parametrize("damage", ["corrupt", "missing", "short"])
def test_pull_refuses_a_damaged_chunk_and_leaves_nothing(rgw, damage):
    memory = memory_image(["r", "r", "z", "r", "r", "r"], seed=3)
    a = started(rgw.forkd_args(), lambda s: plant_snapshot(s, "fragile", memory, b"V" * 999))
    b = started(rgw.forkd_args())
    try:
        push(a, "fragile")
        victim = "chunks/" + hashlib.sha256(memory[3 * CHUNK:4 * CHUNK]).hexdigest()
        if damage == "corrupt":
            body = bytearray(memory[3 * CHUNK:4 * CHUNK])
            body[4096] ^= 1
            assert rgw.request("PUT", victim, data=bytes(body))[0] == 200
        elif damage == "short":
            assert rgw.request("PUT", victim, data=memory[3 * CHUNK:3 * CHUNK + 4096])[0] == 200
        else:
            assert rgw.request("DELETE", victim)[0] == 204
        with pytest.raises(grpc.RpcError) as e:
            pull(b, "fragile", progress_interval_ms=10)
        assert e.value.code() == grpc.StatusCode.DATA_LOSS
        assert victim in e.value.details()
        assert store_is_clean(b)
    finally:
        a.cleanup()
        b.cleanup()
        _delete_everything(rgw)


def test_wrong_credentials_fail_clearly(rgw, tmp_path):
    bad = tmp_path / "bad-credentials"
    bad.write_text("[default]\naws_access_key_id = %s\naws_secret_access_key = %s\n"
                   % (rgw.access_key, "0" * 40))
    unknown = tmp_path / "unknown-credentials"
    unknown.write_text("[default]\naws_access_key_id = NOSUCHKEY\naws_secret_access_key = x\n")
    memory = memory_image(["r"], seed=4)
    for creds in (bad, unknown):
        a = started(rgw.forkd_args(credentials=str(creds)),
                    lambda s: plant_snapshot(s, "locked", memory, b"v"))
        try:
            for call in (lambda: push(a, "locked"), lambda: pull(a, "other"),
                         lambda: a.forkd().ListRemote(forkd_pb2.ListRemoteRequest(), timeout=60),
                         lambda: a.forkd().DeleteRemote(
                             forkd_pb2.DeleteRemoteRequest(snapshot_name="locked"), timeout=60)):
                with pytest.raises(grpc.RpcError) as e:
                    call()
                assert e.value.code() in (grpc.StatusCode.UNAUTHENTICATED,
                                          grpc.StatusCode.PERMISSION_DENIED), e.value
                assert "403" in e.value.details()
            # The secret never reaches the log.
            assert "0" * 40 not in a.log()
        finally:
            a.cleanup()
    assert rgw.keys() == []


def test_no_remote_store_names_the_flags():
    d = started([])
    try:
        for call in (lambda: push(d, "x"), lambda: pull(d, "x"),
                     lambda: d.forkd().ListRemote(forkd_pb2.ListRemoteRequest(), timeout=30)):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "--remote-endpoint" in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            push(d, "../x")
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        # A Spawn from the bucket is refused before anything is looked at: no remote store.
        with pytest.raises(grpc.RpcError) as e:
            d.forkd().Spawn(forkd_pb2.SpawnRequest(snapshot="x", count=1, remote=True,
                                                   backend=forkd_pb2.MEMORY_BACKEND_UFFD),
                            timeout=30)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--remote-endpoint" in e.value.details()
    finally:
        d.cleanup()


def test_a_spawn_from_the_bucket_needs_the_uffd_backend(rgw):
    d = started(rgw.forkd_args())
    try:
        for backend in (forkd_pb2.MEMORY_BACKEND_UNSPECIFIED, forkd_pb2.MEMORY_BACKEND_FILE,
                        forkd_pb2.MEMORY_BACKEND_MEMFD):
            with pytest.raises(grpc.RpcError) as e:
                d.forkd().Spawn(forkd_pb2.SpawnRequest(snapshot="x", count=1, remote=True,
                                                       backend=backend), timeout=30)
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "UFFD" in e.value.details()
    finally:
        d.cleanup()


def test_a_client_that_leaves_stops_the_push_and_no_manifest_appears(rgw):
    memory = memory_image(["r"] * 64, seed=5)
    a = started(rgw.forkd_args() + ["--remote-parallel", "1"],
                lambda s: plant_snapshot(s, "left", memory, b"v" * 100))
    try:
        stream = a.forkd().Push(forkd_pb2.PushRequest(snapshot_name="left",
                                                      progress_interval_ms=10), timeout=300)
        for event in stream:
            if event.progress.chunks_done >= 1:
                break
        stream.cancel()
        # The daemon logs the push's end; wait for it rather than for a time.
        wait_until(lambda: "push left: " in a.log() and "cancelled" in a.log(), 60,
                   "the push to end after the client left")
        assert "snapshots/left/manifest.json" not in rgw.keys("snapshots/")
        listed = a.forkd().ListRemote(forkd_pb2.ListRemoteRequest(), timeout=60)
        assert not listed.snapshots
    finally:
        a.cleanup()
        _delete_everything(rgw)


def test_gateway_stopped_mid_push_fails_the_push_and_leaves_no_snapshot():
    server = Radosgw(memory_mib=1024)
    memory = memory_image(["r"] * 128, seed=6)
    a = started(server.forkd_args() + ["--remote-parallel", "1"],
                lambda s: plant_snapshot(s, "halfway", memory, b"v" * 100))
    try:
        stream = a.forkd().Push(forkd_pb2.PushRequest(snapshot_name="halfway",
                                                      progress_interval_ms=10), timeout=300)
        with pytest.raises(grpc.RpcError) as e:
            for event in stream:
                if event.progress.chunks_done >= 1 and event.progress.chunks_done < 128:
                    server.gateway_stop()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE, e.value
        assert "PUT chunks/" in e.value.details() or "HEAD chunks/" in e.value.details()
        server.gateway_start()
        assert "snapshots/halfway/manifest.json" not in server.keys("snapshots/")
        listed = a.forkd().ListRemote(forkd_pb2.ListRemoteRequest(), timeout=60)
        assert not listed.snapshots
        # The push can be made again and completes, reusing the chunks already up.
        last = push(a, "halfway")[-1].progress
        assert last.chunks_skipped >= 1
        assert [s.name for s in a.forkd().ListRemote(forkd_pb2.ListRemoteRequest(),
                                                     timeout=60).snapshots] == ["halfway"]
    finally:
        a.cleanup()
        server.down()


def test_a_large_vmstate_goes_up_in_parts(rgw):
    memory = memory_image(["r", "z"], seed=7)
    vmstate = os.urandom(12 << 20)  # three parts of 5 MiB
    a = started(rgw.forkd_args() + ["--remote-multipart-bytes", str(5 << 20)],
                lambda s: plant_snapshot(s, "parts", memory, vmstate))
    b = started(rgw.forkd_args())
    try:
        push(a, "parts")
        status, headers = rgw.request("HEAD", "snapshots/parts/vmstate")
        assert status == 200
        # S3 names a multipart object's ETag after its part count.
        assert b'-3"' in headers, headers
        pull(b, "parts")
        assert snapshot_files(b, "parts") == (memory, vmstate)
    finally:
        a.cleanup()
        b.cleanup()
        _delete_everything(rgw)


def test_server_errors_are_retried_and_named_when_they_persist(rgw):
    from remote_harness import FlakyProxy
    memory = memory_image(["r"] * 6, seed=8)
    # Every third request answered 503 by the proxy: the retries carry push and pull through.
    flaky = FlakyProxy(rgw.endpoint, lambda n: n % 3 == 0)
    # Every request answered 503.
    dead = FlakyProxy(rgw.endpoint, lambda n: True)

    def args(endpoint):
        return ["--remote-endpoint", endpoint, "--remote-bucket", rgw.bucket,
                "--remote-credentials", rgw.credentials]

    a = started(args(flaky.endpoint), lambda s: plant_snapshot(s, "flaky", memory, b"v" * 10))
    b = started(args(flaky.endpoint))
    c = started(args(dead.endpoint))
    try:
        push(a, "flaky")
        pull(b, "flaky")
        assert snapshot_files(b, "flaky") == (memory, b"v" * 10)
        assert flaky.failed > 0
        with pytest.raises(grpc.RpcError) as e:
            pull(c, "flaky")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "503 SlowDown (after retries)" in e.value.details()
        assert dead.requests > 1  # retried before giving up
        assert store_is_clean(c)
    finally:
        for d in (a, b, c):
            d.cleanup()
        flaky.close()
        dead.close()
        _delete_everything(rgw)


def test_a_client_that_leaves_stops_the_pull_and_the_store_stays_clean(rgw):
    memory = memory_image(["r"] * 64, seed=9)
    a = started(rgw.forkd_args(), lambda s: plant_snapshot(s, "gone", memory, b"v" * 100))
    b = started(rgw.forkd_args() + ["--remote-parallel", "1"])
    try:
        push(a, "gone")
        stream = b.forkd().Pull(forkd_pb2.PullRequest(snapshot_name="gone",
                                                      progress_interval_ms=10), timeout=300)
        for event in stream:
            if event.progress.chunks_done >= 1:
                break
        stream.cancel()
        wait_until(lambda: "pull gone: " in b.log() and "cancelled" in b.log(), 60,
                   "the pull to end after the client left")
        assert store_is_clean(b)
        # Pulled again to the end, it is whole.
        pull(b, "gone")
        assert snapshot_files(b, "gone") == (memory, b"v" * 100)
    finally:
        a.cleanup()
        b.cleanup()
        _delete_everything(rgw)


def read_metadata(daemon, name):
    with open(os.path.join(daemon.state_dir, "snapshots", name, "snapshot.json")) as f:
        return json.load(f)


# A hot set over LAYOUT's memory (11.5 chunks): a page of chunk 2, then chunk 6 and a page more.
HOT = {"version": 1, "ranges": [[2 * CHUNK, 8192], [6 * CHUNK + 4096, CHUNK]]}


def test_the_hot_set_travels_in_the_manifest_and_the_pull_keeps_it(rgw):
    memory = memory_image(LAYOUT, seed=21)
    a = started(rgw.forkd_args(),
                lambda s: plant_snapshot(s, "warm", memory, b"w" * 1000, hot=HOT))
    b = started(rgw.forkd_args())
    try:
        got = a.forkd().GetSnapshot(forkd_pb2.GetSnapshotRequest(name="warm"), timeout=30)
        assert (got.hot_bytes, got.hot_ranges) == (8192 + CHUNK, 2)
        push(a, "warm")
        status, body = rgw.request("GET", "snapshots/warm/manifest.json")
        assert status == 200 and json.loads(body)["snapshot"]["hot"] == HOT
        listed = b.forkd().ListRemote(forkd_pb2.ListRemoteRequest(), timeout=60)
        assert [(s.name, s.hot_bytes) for s in listed.snapshots] == [("warm", 8192 + CHUNK)]

        assert pull(b, "warm")[-1].snapshot.hot_bytes == 8192 + CHUNK
        assert read_metadata(b, "warm")["hot"] == HOT
        got = b.forkd().GetSnapshot(forkd_pb2.GetSnapshotRequest(name="warm"), timeout=30)
        assert (got.hot_bytes, got.hot_ranges) == (8192 + CHUNK, 2)

        # A manifest from before the hot set (its snapshot.json has none) pulls as it did.
        copy_remote(rgw, "warm", "cold", hot=None)
        assert pull(b, "cold")[-1].snapshot.hot_bytes == 0
        assert "hot" not in read_metadata(b, "cold")
        assert snapshot_files(b, "cold") == (memory, b"w" * 1000)
    finally:
        a.cleanup()
        b.cleanup()
        _delete_everything(rgw)


BAD_HOT = [
    ({"version": 1, "ranges": [[11 * CHUNK, CHUNK]]},
     "hot: ranges[0] ends at %d, beyond memory_bytes (%d)" % (12 * CHUNK, 11 * CHUNK + CHUNK // 2)),
    ({"version": 2, "ranges": []}, "hot: version 2 is not supported"),
    ({"version": 1, "ranges": [[CHUNK, 4096], [0, 4096]]},
     "hot: ranges[1] starts at 0, before ranges[0] ends (%d)" % (CHUNK + 4096)),
    ({"version": 1, "ranges": [[0, 100]]}, "hot: ranges[0]: offset and length must be multiples"),
    ({"version": 1, "ranges": [[0, 4096]] * 257}, "at most 256"),
]


@pytest.mark.parametrize("hot,why", BAD_HOT, ids=["beyond", "version", "order", "unaligned",
                                                  "too-many"])
def test_a_corrupt_hot_set_is_refused_naming_it_and_leaves_nothing(rgw, hot, why):
    memory = memory_image(LAYOUT, seed=22)
    a = started(rgw.forkd_args(), lambda s: (plant_snapshot(s, "good", memory, b"g" * 100),
                                             plant_snapshot(s, "bad", memory, b"g" * 100,
                                                            hot=hot)))
    b = started(rgw.forkd_args())
    try:
        # In a local snapshot.json: the snapshot is CORRUPT, saying why; Push refuses it.
        listed = a.forkd().ListSnapshots(forkd_pb2.ListSnapshotsRequest(), timeout=30).snapshots
        bad = [s for s in listed if s.name == "bad"][0]
        assert bad.state == forkd_pb2.SNAPSHOT_STATE_CORRUPT
        assert why in bad.corrupt_reason and "snapshot.json" in bad.corrupt_reason, \
            bad.corrupt_reason
        with pytest.raises(grpc.RpcError) as e:
            a.forkd().GetSnapshot(forkd_pb2.GetSnapshotRequest(name="bad"), timeout=30)
        assert e.value.code() == grpc.StatusCode.DATA_LOSS and why in e.value.details()
        with pytest.raises(grpc.RpcError) as e:
            push(a, "bad")
        assert why in e.value.details(), e.value.details()
        assert not rgw.keys("snapshots/bad/")

        # In a manifest: the pull is refused before anything moves and the store stays clean.
        push(a, "good")
        copy_remote(rgw, "good", "tampered", hot=hot)
        with pytest.raises(grpc.RpcError) as e:
            pull(b, "tampered")
        assert e.value.code() == grpc.StatusCode.DATA_LOSS
        assert "tampered" in e.value.details() and why in e.value.details(), e.value.details()
        assert store_is_clean(b)
        # ListRemote still names it, without a hot set it cannot read.
        listed = b.forkd().ListRemote(forkd_pb2.ListRemoteRequest(), timeout=60)
        assert [(s.name, s.hot_bytes) for s in listed.snapshots] == [("good", 0),
                                                                      ("tampered", 0)]
    finally:
        a.cleanup()
        b.cleanup()
        _delete_everything(rgw)
