"""Measures forkd under the abuse cases of the hardening work, for the record (not a test; no
assertions): daemon threads, RSS and the latency of a concurrent GetInfo during 3,000 idle streams
on one connection, during a rapid-reset flood, with 25,000 snapshots in the store, and the peak RSS
while 8 clients send 100 MiB requests at once.

    FORKD_BIN=... FORKD_PROTO_PYTHON=... python3 measure_abuse.py [idle|reset|snapshots|oversize]...
"""
import json
import os
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import grpc  # noqa: E402
from forkd_harness import Daemon, forkd_pb2  # noqa: E402
from h2flood import Flood  # noqa: E402


def status(pid):
    out = {}
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Threads", "VmRSS", "VmHWM"):
                out[key] = value.strip()
    return out


def get_info_ms(daemon, timeout=30):
    start = time.monotonic()
    try:
        daemon.forkd().GetInfo(forkd_pb2.GetInfoRequest(), timeout=timeout)
        return (time.monotonic() - start) * 1000, "OK"
    except grpc.RpcError as error:
        return (time.monotonic() - start) * 1000, error.code().name


def latencies(daemon, count):
    results = [get_info_ms(daemon) for _ in range(count)]
    ms = [r[0] for r in results]
    codes = sorted(set(r[1] for r in results))
    return {"p50_ms": round(statistics.median(ms), 2), "max_ms": round(max(ms), 2),
            "codes": codes}


def idle(daemon):
    flood = Flood(daemon.socket_path)
    flood.open_idle(3000)
    time.sleep(2)
    result = {"during": status(daemon.process.pid), "get_info": latencies(daemon, 20),
              "connection_closed_by_server": flood.closed}
    flood.close()
    return result


def reset(daemon):
    flood = Flood(daemon.socket_path)
    done = threading.Event()
    peak = {"Threads": 0}

    def run():
        flood.rapid_reset(50000)
        done.set()

    t = threading.Thread(target=run)
    start = time.monotonic()
    t.start()
    samples = []
    while not done.is_set() and time.monotonic() - start < 60:
        samples.append(get_info_ms(daemon))
        peak["Threads"] = max(peak["Threads"], int(status(daemon.process.pid)["Threads"]))
    t.join(timeout=60)
    ms = [s[0] for s in samples] or [0]
    result = {"flood_s": round(time.monotonic() - start, 2), "peak_threads": peak["Threads"],
              "after": status(daemon.process.pid),
              "get_info_during": {"n": len(samples), "p50_ms": round(statistics.median(ms), 2),
                                  "max_ms": round(max(ms), 2),
                                  "codes": sorted(set(s[1] for s in samples))}}
    flood.close()
    return result


def oversize(daemon, clients=8, size=100 << 20):
    """clients requests of size bytes at once, each on its own connection, as a real client
    sends them (the whole message, as fast as flow control lets it)."""
    payload = b"\0" * size
    codes = []

    def send():
        options = [("grpc.max_send_message_length", -1)]
        with grpc.insecure_channel(daemon.target, options=options) as channel:
            call = channel.unary_unary("/forkd.v1.Forkd/GetInfo")
            try:
                call(payload, timeout=120)
                codes.append("OK")
            except grpc.RpcError as error:
                codes.append(error.code().name)

    workers = [threading.Thread(target=send) for _ in range(clients)]
    start = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return {"s": round(time.monotonic() - start, 2), "codes": sorted(set(codes)),
            "after": status(daemon.process.pid), "get_info": latencies(daemon, 5)}


SNAPSHOT_JSON = {
    "format_version": 1, "name": None, "source_vm": {"id": "vm-1", "name": "src"},
    "parent_snapshot": "", "mode": "live", "machine": {"vcpu_count": 1, "mem_size_mib": 16},
    "memory_bytes": 0, "vmstate_bytes": 0, "page_size": 4096,
    "regions": [{"guest_phys_addr": 0, "size": 16777216, "file_offset": 0, "page_size": 4096}],
    "figures": {k: 1 for k in ("pause_ns", "arm_ns", "rearm_ns", "rearmed_pages", "vmstate_ns",
                               "copy_ns", "publish_ns", "total_ns", "pages_by_fault",
                               "pages_by_bulk", "bytes_copied", "pause_request_ns",
                               "resume_request_ns")},
    "vmm": {"binary": "/usr/bin/firecracker", "version": "1.12.0"},
    "created_at_unix_ms": 1764640000000, "labels": {"team": "evals", "run": "7"},
}


def plant_snapshots(state_dir, count):
    root = os.path.join(state_dir, "snapshots")
    os.makedirs(root, mode=0o700, exist_ok=True)
    os.chmod(state_dir, 0o700)
    for i in range(count):
        name = "snap-%05d" % i
        d = os.path.join(root, name)
        os.mkdir(d, 0o700)
        meta = dict(SNAPSHOT_JSON, name=name)
        with open(os.path.join(d, "snapshot.json"), "w") as f:
            json.dump(meta, f)
        open(os.path.join(d, "vmstate"), "w").close()
        open(os.path.join(d, "memory.bin"), "w").close()


def snapshots(daemon):
    stub = daemon.forkd()
    options = [("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(daemon.target, options=options) as channel:
        from forkd_harness import forkd_pb2_grpc
        big = forkd_pb2_grpc.ForkdStub(channel)
        start = time.monotonic()
        reply = big.ListSnapshots(forkd_pb2.ListSnapshotsRequest(), timeout=120)
        elapsed = time.monotonic() - start
        size = reply.ByteSize()
        count = len(reply.snapshots)
    result = {"list_s": round(elapsed, 2), "reply_bytes": size, "listed": count,
              "after": status(daemon.process.pid)}
    try:
        stub.ListSnapshots(forkd_pb2.ListSnapshotsRequest(), timeout=120)
        result["default_client"] = "OK"
    except grpc.RpcError as error:
        result["default_client"] = error.code().name
    # Every page, as the clients walk them (a server without pages answers all at once).
    start, token, pages, listed, largest = time.monotonic(), "", 0, 0, 0
    while pages < 1000:
        reply = stub.ListSnapshots(forkd_pb2.ListSnapshotsRequest(page_token=token), timeout=120)
        pages, listed = pages + 1, listed + len(reply.snapshots)
        largest = max(largest, reply.ByteSize())
        token = reply.next_page_token
        if not token:
            break
    result["all_pages"] = {"s": round(time.monotonic() - start, 2), "pages": pages,
                           "listed": listed, "largest_reply_bytes": largest,
                           "after": status(daemon.process.pid)}
    result["get_info"] = latencies(daemon, 10)
    return result


def main(kinds):
    out = {}
    for kind in kinds:
        d = Daemon("--shutdown-grace-ms", "1000", start=False)
        if kind == "snapshots":
            plant_snapshots(d.state_dir, 25000)
        d.start(ready_timeout=120)
        try:
            out[kind] = {"idle_before": status(d.process.pid)}
            out[kind].update(globals()[kind](d))
        finally:
            d.cleanup()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:] or ["idle", "reset", "snapshots", "oversize"])
