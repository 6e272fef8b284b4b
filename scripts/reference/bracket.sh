#!/usr/bin/env bash
# The side-by-side measurement of docs/bench.md: for each row, noisydarts, then the reference,
# then noisydarts again (this machine drifts: the speed-up is taken from the slower of our two
# runs), then the dense-convolution and evaluation benches. One JSON file per run in OUT.
#   scripts/reference/bracket.sh [REF_COPY (default /tmp/refcpu)] [OUT (default /tmp/bracket)]
# Env: NOISYDARTS (default build/noisydarts), ROWS=search,train,conv (any subset), THREADS (2),
# EXTRA (flags for both sides, e.g. "--iters 1 --warmup 0" for a quick check of the set-up).
# Needs a reference copy made by setup.sh. Do not run anything else meanwhile.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
ref="${1:-/tmp/refcpu}"
[ -f "$ref/bench_ref.py" ] || { echo "bracket.sh: $ref has no bench_ref.py: run scripts/reference/setup.sh first" >&2; exit 2; }
ref="$(cd "$ref" && pwd)"
out="${2:-/tmp/bracket}"
nd="$(cd "$here" && realpath "${NOISYDARTS:-build/noisydarts}")"
rows="${ROWS:-search,train,conv}"
th="${THREADS:-2}"
extra="${EXTRA:-}"
[ -x "$nd" ] || { echo "bracket.sh: no noisydarts binary at $nd (build it, or set NOISYDARTS)" >&2; exit 2; }
mkdir -p "$out"
py=/usr/bin/python3
stamp() { echo "$(date +%T) $*" | tee -a "$out/log"; }
stamp start
# One row: ours, the reference, ours again. $1: search or train, $2: the row's number, $3: flags.
bracket_row() {
  "$nd" bench "$1-step" $3 --json > "$out/$1$2.ours1.json"
  (cd "$ref" && $py bench_ref.py "$1" $3 | tail -1) > "$out/$1$2.ref.json"
  "$nd" bench "$1-step" $3 --json > "$out/$1$2.ours2.json"
  stamp "$1 row $2"
}
if [[ ",$rows," == *",search,"* ]]; then
  i=0
  for row in "3 32 16 8 64" "3 32 16 8 32" "1 28 16 8 64" "1 28 8 5 64"; do
    set -- $row; i=$((i + 1))
    bracket_row search $i "--in-channels $1 --image-size $2 --channels $3 --layers $4 --batch-size $5 --threads $th $extra"
  done
fi
if [[ ",$rows," == *",train,"* ]]; then
  i=0
  for row in "16 8 32" "36 20 96"; do
    set -- $row; i=$((i + 1))
    bracket_row train $i "--channels $1 --layers $2 --batch-size $3 --threads $th $extra"
  done
fi
if [[ ",$rows," == *",conv,"* ]]; then
  "$nd" bench conv --threads "$th" --json > "$out/conv3.json"
  "$nd" bench conv --forward-only --threads "$th" --json > "$out/conv3_forward.json"
  "$nd" bench conv --kernel 1 --forward-only --threads "$th" --json > "$out/conv1_forward.json"
  "$nd" bench eval-step --threads "$th" --json > "$out/eval.json"
  "$nd" bench eval-step --threads "$th" --precision bf16 --json > "$out/eval_bf16.json"
  stamp conv+eval
fi
# The table: per row ours run 1 / run 2, the reference, speed-up with the slower / faster of ours.
$py - "$out" <<'PY'
import glob, json, os, sys
out = sys.argv[1]
def load(p): return json.loads(open(p).read().strip().splitlines()[-1])
for kind in ("search", "train"):
    for f in sorted(glob.glob(os.path.join(out, kind + "*.ref.json"))):
        stem = f[:-len(".ref.json")]
        a, b, r = load(stem + ".ours1.json"), load(stem + ".ours2.json"), load(f)
        slow, fast = max(a["s_per_iter"], b["s_per_iter"]), min(a["s_per_iter"], b["s_per_iter"])
        mem = max(a["peak_rss_mb"], b["peak_rss_mb"])
        print(f"{os.path.basename(stem)}: ours {a['s_per_iter']:.3f} / {b['s_per_iter']:.3f} s, reference {r['s_per_iter']:.3f} s, "
              f"speed-up {r['s_per_iter'] / slow:.2f}x / {r['s_per_iter'] / fast:.2f}x, memory {mem:.0f} / {r['peak_rss_mb']:.0f} MB = {mem / r['peak_rss_mb']:.3f}")
for name in ("conv3", "conv3_forward", "conv1_forward", "eval", "eval_bf16"):
    p = os.path.join(out, name + ".json")
    if os.path.exists(p):
        d = load(p)
        print(f"{name}: {d['s_per_iter']:.4f} s, {d.get('gflop_per_s', 0):.1f} GFLOP/s, {d['peak_rss_mb']:.0f} MB")
PY
