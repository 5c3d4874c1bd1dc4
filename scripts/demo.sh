#!/usr/bin/env bash
# The live-branch demo: sets up a Debian 12 machine, builds forkd and its test VMM, starts forkd
# on a private socket and state directory, and runs scripts/demo.py against it (boot, live
# branch with progress, forks, verification, figures); then stops everything. Run as root
# (forkd drives KVM and userfaultfd).
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

PYTHONPATH="$PWD/build/clients/python/lib" FORKD_TESTVM="$PWD/build/tests/vmm/forkd-testvm" \
  FORKD_GUEST="$PWD/build/tests/vmm/guest.bin" \
  /usr/bin/python3 scripts/demo.py "unix:$workdir/forkd.sock" \
  || { echo "--- forkd log ---"; cat "$workdir/forkd.log"; exit 1; }
