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

    /usr/bin/python3 tests/bench/remote_bench.py --build build [--mib 256] [--parallel 4]
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", default=os.path.join(SOURCE, "build"))
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--json", default="")
    args = parser.parse_args()
    build = os.path.abspath(args.build)
    os.environ["FORKD_BIN"] = os.path.join(build, "service", "forkd")
    os.environ["FORKD_PROTO_PYTHON"] = os.path.join(build, "proto", "python")
    os.environ["FORKD_SOURCE_DIR"] = SOURCE
    sys.path.insert(0, os.path.join(SOURCE, "tests", "integration"))
    from forkd_harness import Daemon, forkd_pb2
    from remote_harness import Radosgw, plant_snapshot

    size = args.mib << 20
    rgw = Radosgw(memory_mib=max(1024, 4 * args.mib + 512))
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
