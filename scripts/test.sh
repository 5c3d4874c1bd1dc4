#!/usr/bin/env bash
# Sets up a Debian 12 machine, builds forkd and runs the whole test suite with ctest.
#   scripts/test.sh                  the normal build (build/)
#   scripts/test.sh --sanitize       an AddressSanitizer + UndefinedBehaviorSanitizer build
#                                    (build-sanitize/), same tests
#   scripts/test.sh --debian-kernel  only the KVM and userfaultfd tests, inside the nested-KVM
#                                    runner on Debian 12's stock kernel, whatever the host has
#                                    (CI's second kernel leg); combines with --sanitize.
#                                    --debian-kernel=LABELS picks other ctest labels (a regex)
#   scripts/test.sh --build-dir=DIR  build and test in DIR instead (CI's nested leg, which runs
#                                    beside the native ones where /dev/kvm works)
#   scripts/test.sh --nested-exclude=LABELS
#                                    in the nested-KVM runner, leave out tests with these labels
#                                    (a regex; CI's sanitizer leg leaves out the clients' tests,
#                                    which run in the normal leg, where it has no /dev/kvm)
# Extra arguments after the flags go to ctest (for instance -R integration).
#
# Tests labelled "kvm" need /dev/kvm. Where it works they run natively with the rest; where it
# does not, everything else runs natively and the "kvm" tests run inside scripts/kvm-runner.sh (a
# QEMU VM with nested KVM). They never skip. Each leg ends with one line saying which kernel ran,
# how, and the counts; the last line is the total. FORKD_TEST_NESTED=1 forces the runner even
# where /dev/kvm works.
set -euo pipefail
cd "$(dirname "$0")/.."

build_dir=build
cmake_flags=(-DCMAKE_BUILD_TYPE=RelWithDebInfo)
debian_kernel_labels=
nested_exclude=()
build_dir_override=
while [ $# -gt 0 ]; do
  case "$1" in
    --sanitize)
      build_dir=build-sanitize
      cmake_flags+=(-DFORKD_SANITIZE=ON)
      # Leaks fail the run.
      export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:${ASAN_OPTIONS:-}"
      export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
      shift ;;
    --build-dir=?*) build_dir_override=${1#--build-dir=}; shift ;;
    --debian-kernel) debian_kernel_labels='kvm|uffd'; shift ;;
    --debian-kernel=?*) debian_kernel_labels=${1#--debian-kernel=}; shift ;;
    --nested-exclude=?*) nested_exclude=(-LE "${1#--nested-exclude=}"); shift ;;
    *) break ;;
  esac
done

build_dir=${build_dir_override:-$build_dir}
bash scripts/setup.sh
cmake -S . -B "$build_dir" "${cmake_flags[@]}"
cmake --build "$build_dir" -j"$(nproc)"

legs=()
total_passed=0
total_failed=0
status=0

# Runs ctest (natively or through the runner), then records one summary line for the leg.
run_leg() { # description, then the command
  local description=$1; shift
  local log started rc run passed failed kernel
  log=$(mktemp /tmp/forkd-test-leg.XXXXXX)
  started=$SECONDS
  set +e
  "$@" 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  set -e
  run=0 failed=0
  if line=$(grep -E '^[0-9]+% tests passed, [0-9]+ tests? failed out of [0-9]+' "$log" | tail -n1)
  then
    failed=$(sed -E 's/.* ([0-9]+) tests? failed.*/\1/' <<<"$line")
    run=$(sed -E 's/.* out of ([0-9]+).*/\1/' <<<"$line")
  fi
  passed=$((run - failed))
  kernel=$(sed -n 's/^kvm-runner: kernel \([^ ]*\) .*/\1/p' "$log" | tail -n1)
  kernel=${kernel:-$(uname -r)}
  rm -f "$log"
  if [ "$rc" -ne 0 ] && [ "$failed" -eq 0 ]; then
    failed=1 # the runner or ctest itself failed (a timeout, a guest that did not boot)
  fi
  [ "$rc" -eq 0 ] || status=1
  total_passed=$((total_passed + passed))
  total_failed=$((total_failed + failed))
  legs+=("leg: kernel $kernel, $build_dir, $description: $run run, $passed passed, $failed failed," \
         "exit $rc, $((SECONDS - started)) s")
}

kvm_native=0
if [ "${FORKD_TEST_NESTED:-0}" != 1 ] && bash scripts/kvm-usable.sh; then
  kvm_native=1
fi
ctest_args=(--test-dir "$build_dir" --output-on-failure --timeout 1200)
runner=(bash scripts/kvm-runner.sh --timeout 4200 --)

if [ -n "$debian_kernel_labels" ]; then
  run_leg "nested KVM under QEMU, tests labelled $debian_kernel_labels" \
    "${runner[@]}" ctest "${ctest_args[@]}" --no-tests=error -L "$debian_kernel_labels" \
    "${nested_exclude[@]}" "$@"
elif [ "$kvm_native" = 1 ]; then
  run_leg "native KVM, every test" ctest "${ctest_args[@]}" "$@"
else
  echo "test: /dev/kvm is not usable here: the kvm tests run inside the nested-KVM runner"
  run_leg "native, no KVM: every test but the kvm ones" ctest "${ctest_args[@]}" -LE kvm "$@"
  run_leg "nested KVM under QEMU, kvm tests${nested_exclude:+ except those labelled ${nested_exclude[1]}}" \
    "${runner[@]}" ctest "${ctest_args[@]}" -L kvm "${nested_exclude[@]}" "$@"
fi

printf '%s\n' "${legs[@]}"
[ -n "${FORKD_LEG_SUMMARY:-}" ] && printf '%s\n' "${legs[@]}" >>"$FORKD_LEG_SUMMARY"
echo "tests: $total_passed passed, $total_failed failed"
exit "$status"
