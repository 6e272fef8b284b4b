#!/usr/bin/env bash
# Builds the whole project (library, CLI, test suite) with GCC's AddressSanitizer and
# UndefinedBehaviorSanitizer in its own build directory and runs the test suite there. The tests
# that drive the CLI run the instrumented CLI too. Not part of CI (slow). docs/reliability.md
# describes every option below and the last measured result.
#   scripts/sanitize.sh [ctest -R regex]     default: every test except the SIGKILL resume test
# Environment: NOISYDARTS_ASAN_BUILD_DIR (default build-asan), NOISYDARTS_JOBS (default 1),
#   NOISYDARTS_SANITIZE_EXCLUDE (ctest -E regex; default the SIGKILL test, set to '' for all).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
build="${NOISYDARTS_ASAN_BUILD_DIR:-$here/build-asan}"
jobs="${NOISYDARTS_JOBS:-1}"
exclude="${NOISYDARTS_SANITIZE_EXCLUDE-Sigkill}"

# LibTorch itself is not instrumented, hence:
#   detect_leaks=0           LibTorch (and oneDNN/OpenMP) keep process-lifetime allocations
#                            that LeakSanitizer reports at exit; they are not ours and would make
#                            every test fail.
#   alloc_dealloc_mismatch=0 memory allocated in uninstrumented LibTorch code with one allocator
#                            family and released by inlined header code with another is reported
#                            as a mismatch, falsely.
#   detect_odr_violation=0   LibTorch's shared libraries define a few globals in more than one
#                            library; ASan's ODR check would abort at start-up.
#   abort_on_error=1         a finding kills the process with SIGABRT, so ctest sees it as a
#                            failure even inside the CLI child processes the tests start.
#   allocator_may_return_null=1  an allocation no machine can serve returns null, as glibc's
#                            malloc does, instead of aborting: the CPU allocator's test asks for
#                            2^60 bytes and checks the one-line out-of-memory error.
# UBSAN_OPTIONS:
#   halt_on_error=1          the first undefined behaviour aborts (by default UBSan only prints).
#   print_stacktrace=1       with a stack trace.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:alloc_dealloc_mismatch=0:detect_odr_violation=0:abort_on_error=1:allocator_may_return_null=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"

flags="-fsanitize=address,undefined -fno-omit-frame-pointer -g1"
echo "[sanitize] configuring and building in $build (-j$jobs): $flags" >&2
cmake -S "$here" -B "$build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_COMPILER=g++ \
      -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_EXE_LINKER_FLAGS="-fsanitize=address,undefined" \
      -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" -DNOISYDARTS_BUILD_BENCH=OFF -DNOISYDARTS_PYTHON=OFF >/dev/null
cmake --build "$build" -j "$jobs"

cd "$build"
args=(--output-on-failure -j 1 --timeout 1800)
[ -n "$exclude" ] && args+=(-E "$exclude")
[ $# -gt 0 ] && args+=(-R "$1")
echo "[sanitize] ctest ${args[*]} (ASAN_OPTIONS=$ASAN_OPTIONS UBSAN_OPTIONS=$UBSAN_OPTIONS)" >&2
start=$(date +%s)
ctest "${args[@]}"
echo "[sanitize] all selected tests passed under ASan+UBSan in $(( $(date +%s) - start )) s" >&2
