#!/usr/bin/env bash
# Sets up a Debian 12 machine, builds forkd and runs the whole test suite with ctest.
#   scripts/test.sh              the normal build (build/)
#   scripts/test.sh --sanitize   an AddressSanitizer + UndefinedBehaviorSanitizer build
#                                (build-sanitize/), same tests
# Extra arguments after the flags go to ctest (for instance -L unit, -R integration).
set -euo pipefail
cd "$(dirname "$0")/.."

build_dir=build
cmake_flags=(-DCMAKE_BUILD_TYPE=RelWithDebInfo)
if [ "${1:-}" = "--sanitize" ]; then
  shift
  build_dir=build-sanitize
  cmake_flags+=(-DFORKD_SANITIZE=ON)
  # Leaks fail the run.
  export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:${ASAN_OPTIONS:-}"
  export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
fi

bash scripts/setup.sh
cmake -S . -B "$build_dir" "${cmake_flags[@]}"
cmake --build "$build_dir" -j"$(nproc)"
ctest --test-dir "$build_dir" --output-on-failure --timeout 1200 "$@"
