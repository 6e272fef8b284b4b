#!/usr/bin/env bash
# Builds the libFuzzer targets of fuzz/ with clang (ASan + UBSan + libFuzzer; CMake option
# NOISYDARTS_FUZZ in its own build directory) and runs each for a while on a seed corpus made
# from tests/data/corpus. Not part of CI. docs/reliability.md has the details and results.
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]    default: 60 s, all targets
# Environment: NOISYDARTS_FUZZ_BUILD_DIR (default build-fuzz), NOISYDARTS_JOBS (default 1).
# Crashes, leaks and timeouts go to fuzz/artifacts/<target>/ (gitignored); the exit status is
# non-zero when a target found something.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
seconds="${1:-60}"
shift || true
targets=("$@")
((${#targets[@]})) || targets=(fuzz_idx fuzz_cifar fuzz_genotype fuzz_checkpoint)
build="${NOISYDARTS_FUZZ_BUILD_DIR:-$here/build-fuzz}"
jobs="${NOISYDARTS_JOBS:-1}"

echo "[fuzz] building ${targets[*]} in $build (-j$jobs)" >&2
cmake -S "$here" -B "$build" -DNOISYDARTS_FUZZ=ON -DCMAKE_BUILD_TYPE=Release \
      -DCMAKE_CXX_COMPILER=clang++ -DNOISYDARTS_BUILD_TESTS=OFF -DNOISYDARTS_BUILD_BENCH=OFF >/dev/null
build_targets=("${targets[@]}")
[[ " ${targets[*]} " == *" fuzz_checkpoint "* ]] && build_targets+=(make_checkpoint_seeds)
cmake --build "$build" -j "$jobs" --target "${build_targets[@]}"

# Seeds: the corpus files in the input layout of each target (see the comment at the top of
# each fuzz/*.cpp). The running corpus (what libFuzzer adds) stays in the build directory.
seeds="$build/seeds"
rm -rf "$seeds"
mkdir -p "$seeds/fuzz_idx" "$seeds/fuzz_cifar" "$seeds/fuzz_genotype" "$seeds/fuzz_checkpoint"
# fuzz_checkpoint: real archives written by LibTorch (header only; tensors + a nested module
# archive) and the corpus' broken "checkpoints".
if [ -x "$build/make_checkpoint_seeds" ]; then
  "$build/make_checkpoint_seeds" "$seeds/fuzz_checkpoint"
  cp "$here"/tests/data/corpus/checkpoint/*.pt "$seeds/fuzz_checkpoint/"
fi
python3 - "$here/tests/data/corpus" "$seeds" <<'PY'
import os, struct, sys
corpus, seeds = sys.argv[1], sys.argv[2]
read = lambda p: open(p, "rb").read()
valid_img = read(os.path.join(corpus, "idx/valid/t10k-images-idx3-ubyte"))
valid_lab = read(os.path.join(corpus, "idx/valid/t10k-labels-idx1-ubyte"))
def idx_seed(name, img, lab):
    img = img[:65535]
    open(os.path.join(seeds, "fuzz_idx", name), "wb").write(struct.pack(">H", len(img)) + img + lab)
idx_seed("valid", valid_img, valid_lab)
for f in sorted(os.listdir(os.path.join(corpus, "idx"))):
    p = os.path.join(corpus, "idx", f)
    if not os.path.isfile(p) or f.endswith(".gz") or "gzip" in f:
        continue  # parse_idx takes raw bytes (gzip is zlib's business)
    if f.startswith("images"):
        idx_seed(f, read(p), valid_lab)
    else:
        idx_seed(f, valid_img, read(p))
for f in sorted(os.listdir(os.path.join(corpus, "cifar"))):
    b = read(os.path.join(corpus, "cifar", f))
    open(os.path.join(seeds, "fuzz_cifar", f + ".c10"), "wb").write(b"\x00" + b)
    open(os.path.join(seeds, "fuzz_cifar", f + ".c100"), "wb").write(b"\x01" + b)
for f in sorted(os.listdir(os.path.join(corpus, "genotype"))):
    open(os.path.join(seeds, "fuzz_genotype", f), "wb").write(read(os.path.join(corpus, "genotype", f)))
PY

# ASan/UBSan settings for the fuzzers (LibTorch itself is not instrumented):
#   detect_leaks=0           LibTorch keeps global allocations (registries, thread pools) for the
#                            process lifetime; libFuzzer's leak check would blame them.
#   alloc_dealloc_mismatch=0 new/free pairs inside the uninstrumented LibTorch are not ours.
#   detect_odr_violation=0   LibTorch's shared libraries define some globals twice.
#   halt_on_error / print_stacktrace: stop at the first UBSan report, with a stack.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=0:alloc_dealloc_mismatch=0:detect_odr_violation=0}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"
status=0
for t in "${targets[@]}"; do
  work="$build/corpus-$t"
  artifacts="$here/fuzz/artifacts/$t"
  mkdir -p "$work" "$artifacts"
  max_len=4096
  [ "$t" = fuzz_cifar ] && max_len=16384   # a CIFAR record is 3073/3074 bytes
  [ "$t" = fuzz_idx ] && max_len=16384
  [ "$t" = fuzz_checkpoint ] && max_len=8192   # the seed archives are 1-3 KB
  echo "[fuzz] $t: ${seconds}s (max_len $max_len), artifacts in $artifacts" >&2
  log="$build/$t.log"
  if "$build/$t" "$work" "$seeds/$t" -max_total_time="$seconds" -max_len="$max_len" -timeout=10 \
       -rss_limit_mb=4096 -print_final_stats=1 -artifact_prefix="$artifacts/" >"$log" 2>&1; then
    echo "[fuzz] $t: no findings; $(grep -E '^stat::number_of_executed_units' "$log" | awk '{print $2}') executions, $(grep -E '^stat::peak_rss_mb' "$log" | awk '{print $2}') MB peak" >&2
  else
    status=1
    echo "[fuzz] $t: FOUND A PROBLEM (log: $log); last lines:" >&2
    tail -n 30 "$log" >&2
  fi
done
exit $status
