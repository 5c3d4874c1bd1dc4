#!/usr/bin/env bash
# Sets up a Debian 12 machine, builds forkd, starts it on a private socket and runs the demo
# client against it, then stops the daemon. Run as root (forkd drives KVM and userfaultfd).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)" >/dev/null

workdir=$(mktemp -d /tmp/forkd-demo.XXXXXX)
forkd_pid=
cleanup() {
  if [ -n "$forkd_pid" ] && kill -0 "$forkd_pid" 2>/dev/null; then
    kill -TERM "$forkd_pid"
    wait "$forkd_pid" || true
  fi
  rm -rf "$workdir"
}
trap cleanup EXIT

./build/service/forkd --listen "unix:$workdir/forkd.sock" --state-dir "$workdir/state" \
  --vmm-binary "$PWD/build/tests/vmm/forkd-testvm" 2>"$workdir/forkd.log" &
forkd_pid=$!

FORKD_PROTO_PYTHON="$PWD/build/proto/python" /usr/bin/python3 scripts/demo.py "unix:$workdir/forkd.sock" \
  || { echo "--- forkd log ---"; cat "$workdir/forkd.log"; exit 1; }
