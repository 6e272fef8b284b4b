#!/usr/bin/env bash
# One entry point for a fresh Debian 12 machine: installs the Debian packages noisydarts needs,
# configures and builds it, then runs the requested job.
#   scripts/run.sh search [noisydarts search flags...]   the main job: a NoisyDARTS search on Fashion-MNIST
#   scripts/run.sh test                                  build and run the test suite
#   scripts/run.sh build                                 only install and build
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
job="${1:-build}"
shift || true

packages=(cmake make g++ ccache libtorch-dev libcli11-dev nlohmann-json3-dev libgtest-dev
          libbenchmark-dev zlib1g-dev libgloo-dev libstb-dev graphviz dataset-fashion-mnist python3-torch libopenblas0-openmp
          pybind11-dev python3-pytest)
bash "$here/scripts/install_debs.sh" "${packages[@]}"

build="${NOISYDARTS_BUILD_DIR:-$here/build}"
jobs="${NOISYDARTS_JOBS:-2}"
echo "[noisydarts] configuring and building in $build (-j$jobs)" >&2
cmake -S "$here" -B "$build" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$build" -j "$jobs"

case "$job" in
  build) ;;
  search)
    out="runs/search-$(date +%Y%m%d-%H%M%S)"
    has_out=0
    # --out DIR, or --resume (DIR or --out DIR names the run to continue): no fresh directory.
    for a in "$@"; do case "$a" in -o|--out|--out=*|--resume|--resume=*) has_out=1;; esac; done
    if ((has_out)); then exec "$build/noisydarts" search "$@"; fi
    echo "[noisydarts] run directory: $out" >&2
    exec "$build/noisydarts" search --out "$out" "$@" ;;
  test)
    cd "$build"
    exec ctest --output-on-failure -j "${NOISYDARTS_TEST_JOBS:-1}" ;;
  *)
    echo "usage: scripts/run.sh search|test|build [args...]" >&2; exit 2 ;;
esac
