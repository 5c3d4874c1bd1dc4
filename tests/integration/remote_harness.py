"""A real S3 server (scripts/radosgw.sh: Ceph's radosgw) for the remote-snapshot tests, a direct
S3 client to look into its bucket (curl, signing with SigV4), and snapshots laid down in a state
directory the way the store writes them (the store loads them when forkd starts)."""
import http.client
import json
import os
import subprocess
import tempfile
from urllib.parse import quote

from forkd_harness import scaled, vmm_get

SOURCE_DIR = os.environ.get("FORKD_SOURCE_DIR") or os.path.abspath(
    os.path.join(os.path.dirname(__file__), "..", ".."))
RADOSGW_SH = os.path.join(SOURCE_DIR, "scripts", "radosgw.sh")
CHUNK = 2 << 20


class Radosgw:
    """One radosgw instance in its own directory, on its own ports."""

    def __init__(self, memory_mib=1024):
        self._tmp = tempfile.TemporaryDirectory(prefix="forkd-rgw-")
        self.dir = os.path.join(self._tmp.name, "rgw")
        result = subprocess.run(["bash", RADOSGW_SH, "up", self.dir, "--memory-mib",
                                 str(memory_mib)], capture_output=True, text=True,
                                timeout=scaled(300))
        if result.returncode != 0:
            raise AssertionError("radosgw.sh up failed:\n" + result.stdout + result.stderr)
        fields = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
        self.endpoint = fields["endpoint"]
        self.credentials = fields["credentials"]
        self.bucket = fields["bucket"]
        self.start_ms = int(fields.get("start_ms", "0"))
        keys = {}
        with open(self.credentials) as f:
            for line in f:
                if "=" in line:
                    k, v = line.split("=", 1)
                    keys[k.strip()] = v.strip()
        self.access_key = keys["aws_access_key_id"]
        self.secret_key = keys["aws_secret_access_key"]
        # curl reads the secret from this file, never from its command line.
        self._curl_config = os.path.join(self._tmp.name, "curl.conf")
        with open(self._curl_config, "w") as f:
            f.write('user = "%s:%s"\n' % (self.access_key, self.secret_key))
        os.chmod(self._curl_config, 0o600)

    def forkd_args(self, credentials=None):
        return ["--remote-endpoint", self.endpoint, "--remote-bucket", self.bucket,
                "--remote-credentials", credentials or self.credentials]

    def gateway_stop(self):
        subprocess.run(["bash", RADOSGW_SH, "gateway-stop", self.dir], check=True,
                       timeout=scaled(120))

    def gateway_start(self):
        subprocess.run(["bash", RADOSGW_SH, "gateway-start", self.dir], check=True,
                       timeout=scaled(300))

    def request(self, method, key="", data=None, query=""):
        """(HTTP status, body bytes) of one signed request to the bucket."""
        url = "%s/%s/%s%s" % (self.endpoint, self.bucket, key, "?" + query if query else "")
        args = ["curl", "-s", "-K", self._curl_config, "--aws-sigv4", "aws:amz:us-east-1:s3",
                "-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD", "-X", method,
                "-w", "\n%{http_code}", url]
        if method == "HEAD":
            args[args.index("-X"):args.index("-X") + 2] = ["-I"]
        if data is not None:
            args += ["--data-binary", "@-"]
        result = subprocess.run(args, input=data, capture_output=True, timeout=scaled(120))
        body, _, status = result.stdout.rpartition(b"\n")
        return int(status or 0), body

    def keys(self, prefix=""):
        """Every key in the bucket under prefix."""
        import re
        keys, token = [], ""
        while True:
            query = "list-type=2&prefix=" + quote(prefix, safe="")
            if token:
                query = "continuation-token=%s&%s" % (quote(token, safe=""), query)
            status, body = self.request("GET", "", query=query)
            assert status == 200, (status, body)
            text = body.decode()
            keys += re.findall(r"<Key>([^<]*)</Key>", text)
            more = re.search(r"<NextContinuationToken>([^<]*)<", text)
            if "<IsTruncated>true" not in text or not more:
                return keys
            token = more.group(1)

    def stored_bytes(self, prefix="chunks/"):
        import re
        status, body = self.request("GET", "", query="list-type=2&prefix=" + quote(prefix, safe=""))
        assert status == 200
        return sum(int(s) for s in re.findall(r"<Size>(\d+)</Size>", body.decode()))

    def down(self):
        subprocess.run(["bash", RADOSGW_SH, "down", self.dir], timeout=scaled(120))
        self._tmp.cleanup()


FIGURES = ("pause_ns", "arm_ns", "rearm_ns", "rearmed_pages", "vmstate_ns", "copy_ns",
           "publish_ns", "total_ns", "pages_by_fault", "pages_by_bulk", "bytes_copied",
           "pause_request_ns", "resume_request_ns")


def plant_snapshot(state_dir, name, memory, vmstate, parent="", hot=None):
    """Lays down a READY snapshot the way the store writes one; forkd loads it at start-up.
    hot: its snapshot.json's "hot" value (None: none, as before the hot set existed)."""
    root = os.path.join(state_dir, "snapshots")
    os.makedirs(root, mode=0o700, exist_ok=True)
    os.chmod(state_dir, 0o700)
    d = os.path.join(root, name)
    os.mkdir(d, 0o700)
    with open(os.path.join(d, "memory.bin"), "wb") as f:
        f.write(memory)
    with open(os.path.join(d, "vmstate"), "wb") as f:
        f.write(vmstate)
    meta = {
        "format_version": 1, "name": name, "source_vm": {"id": "vm-1", "name": "src"},
        "parent_snapshot": parent, "mode": "live",
        "machine": {"vcpu_count": 1, "mem_size_mib": len(memory) >> 20},
        "memory_bytes": len(memory), "vmstate_bytes": len(vmstate), "page_size": 4096,
        "regions": [{"guest_phys_addr": 0, "size": len(memory), "file_offset": 0,
                     "page_size": 4096}],
        "figures": {k: 1 for k in FIGURES},
        "vmm": {"binary": "/usr/bin/forkd-testvm", "version": "1.0"},
        "created_at_unix_ms": 1764640000000, "labels": {"origin": "host-a"},
    }
    if hot is not None:
        meta["hot"] = hot
    with open(os.path.join(d, "snapshot.json"), "w") as f:
        json.dump(meta, f)
    return d


def memory_image(chunks, seed):
    """A memory image of len(chunks) 2 MiB chunks: 'z' zero, 'r' random, an int repeats that
    index's chunk, bytes objects are used as they are."""
    import random
    rng = random.Random(seed)
    out = []
    for c in chunks:
        if c == "z":
            out.append(bytes(CHUNK))
        elif c == "r":
            out.append(rng.randbytes(CHUNK))
        elif isinstance(c, int):
            out.append(out[c])
        else:
            out.append(c)
    return b"".join(out)


class FlakyProxy:
    """An HTTP/1.1 proxy in front of the real server that answers some requests itself with
    503 SlowDown (S3's "retry later") instead of forwarding them: fail(request_number) decides.
    Everything else goes to the server unchanged (the signature covers the Host header, which
    is forwarded as the client sent it). With hold_chunks, every GET of a chunk waits (counted
    in held) until release is set: chunk fetches stay in flight as long as a test needs;
    hold_chunk(hash) holds only the chunks it says. chunk_gets lists the hash of every chunk GET
    in the order they came in."""

    def __init__(self, endpoint, fail, hold_chunks=False, hold_chunk=None):
        import http.client
        import http.server
        import threading
        import urllib.parse
        target = urllib.parse.urlparse(endpoint)
        proxy = self
        self.requests = 0
        self.failed = 0
        self.held = 0
        self.chunk_gets = []
        self.release = threading.Event()
        self._lock = threading.Lock()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with proxy._lock:
                    proxy.requests += 1
                    refuse = fail(proxy.requests)
                    proxy.failed += refuse
                chunk = self.path.split("/chunks/", 1)[1].split("?")[0] \
                    if self.command == "GET" and "/chunks/" in self.path else None
                if chunk:
                    with proxy._lock:
                        proxy.chunk_gets.append(chunk)
                if chunk and (hold_chunks or (hold_chunk and hold_chunk(chunk))):
                    with proxy._lock:
                        proxy.held += 1
                    proxy.release.wait(scaled(600))
                if refuse:
                    text = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown'
                            b'</Code></Error>')
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(text)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(text)
                    return
                upstream = http.client.HTTPConnection(target.hostname, target.port, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                upstream.request(self.command, self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                length = answer.getheader("Content-Length") if self.command == "HEAD" else None
                self.send_header("Content-Length", length or str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any


        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = "http://127.0.0.1:%d" % self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def close(self):
        self._server.shutdown()
        self._server.server_close()


def copy_remote(rgw, source, target, hot=None):
    """A second remote snapshot `target` holding what `source` holds (its manifest renamed, its
    vmstate copied; the chunks are shared), with its snapshot.json's hot set replaced by hot (a
    list of [offset, length] ranges, or a whole "hot" value when a dict; None drops it, as in a
    manifest pushed before the hot set existed). Returns the new manifest."""
    status, body = rgw.request("GET", "snapshots/%s/manifest.json" % source)
    assert status == 200, status
    manifest = json.loads(body)
    manifest["name"] = manifest["snapshot"]["name"] = target
    manifest["snapshot"].pop("hot", None)
    if isinstance(hot, dict):
        manifest["snapshot"]["hot"] = hot
    elif hot is not None:
        manifest["snapshot"]["hot"] = {"version": 1, "ranges": hot}
    status, vmstate = rgw.request("GET", "snapshots/%s/vmstate" % source)
    assert status == 200, status
    assert rgw.request("PUT", "snapshots/%s/vmstate" % target, data=vmstate)[0] == 200
    assert rgw.request("PUT", "snapshots/%s/manifest.json" % target,
                       data=json.dumps(manifest).encode())[0] == 200
    return manifest


def hot_chunks(hot, chunk=CHUNK):
    """The chunk indices a snapshot.json "hot" value touches, ascending."""
    out = set()
    for offset, length in (hot or {}).get("ranges", []):
        out.update(range(offset // chunk, (offset + length - 1) // chunk + 1))
    return sorted(out)


def guest_progress(vm):
    """The sum of the guest's vCPU progress counters, as the test VMM reports them (GET /); 0
    before the guest has run (or when the VMM does not answer)."""
    try:
        return sum(vmm_get(vm).get("guest_progress") or [])
    except (OSError, AssertionError):
        return 0


def userfaultfds_of(pid):
    """How many userfaultfds the process holds."""
    count = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, fd)) == "anon_inode:[userfaultfd]":
                count += 1
        except OSError:
            pass
    return count
