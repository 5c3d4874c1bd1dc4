#!/usr/bin/env bash
# The live-branch demo: sets up a Debian 12 machine, builds forkd and its test VMM, starts forkd
# on a private socket and state directory, and runs scripts/demo.py against it (boot, live
# branch with progress, forks, verification, figures); then stops everything. Run as root
# (forkd drives KVM and userfaultfd). On a host without a usable /dev/kvm the demo runs itself
# inside the nested-KVM runner (scripts/kvm-runner.sh) and says so.
#   scripts/demo.sh             set up, build, run
#   scripts/demo.sh --no-setup  run what is built (how the runner starts it inside its VM)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" != "--no-setup" ]; then
  bash scripts/setup.sh
  cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
  cmake --build build -j"$(nproc)" >/dev/null
  if ! bash scripts/kvm-usable.sh; then
    echo "demo: /dev/kvm is not usable on this host, so the demo runs inside a QEMU VM with" \
         "nested KVM (scripts/kvm-runner.sh, Debian 12's kernel): expect it to be much slower"
    exec bash scripts/kvm-runner.sh --quiet --timeout 3600 -- bash scripts/demo.sh --no-setup
  fi
fi

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

# forkd takes a whole factor; the runner's FORKD_TIME_SCALE may be fractional: round it up.
timeout_scale=$(/usr/bin/python3 -c 'import math, sys; print(max(1, math.ceil(float(sys.argv[1]))))' \
  "${FORKD_TIME_SCALE:-1}")
./build/service/forkd --listen "unix:$workdir/forkd.sock" --state-dir "$workdir/state" \
  --vmm-binary "$PWD/build/tests/vmm/forkd-testvm" --timeout-scale "$timeout_scale" \
  2>"$workdir/forkd.log" &
forkd_pid=$!

PYTHONPATH="$PWD/build/clients/python/lib" FORKD_TESTVM="$PWD/build/tests/vmm/forkd-testvm" \
  FORKD_GUEST="$PWD/build/tests/vmm/guest.bin" \
  /usr/bin/python3 scripts/demo.py "unix:$workdir/forkd.sock" \
  || { echo "--- forkd log ---"; cat "$workdir/forkd.log"; exit 1; }
