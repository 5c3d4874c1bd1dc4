#!/usr/bin/env bash
# The benchmark: sets up a Debian 12 machine, builds forkd-bench and the test VMM, and runs
#   build/tests/bench/forkd-bench "$@"
# (see tests/bench/README.md). Run as root: it drives KVM and userfaultfd.
#   scripts/bench.sh            the full run (256 MiB, 1 GiB, 4 GiB; under 15 minutes)
#   scripts/bench.sh --quick    256 MiB only, fewer repetitions (under 2 minutes)
# The table goes to stdout, the JSON to build/bench.json (--json PATH to change).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh >/dev/null
cmake -S . -B build -DCMAKE_BUILD_TYPE=RelWithDebInfo >/dev/null
cmake --build build -j"$(nproc)" --target forkd-bench >/dev/null
exec build/tests/bench/forkd-bench "$@"
