#!/usr/bin/env bash
# Makes a CPU-runnable copy of the Python reference (xiaomi-automl/NoisyDARTS) for the
# side-by-side benchmark (docs/bench.md). Nothing of the reference is part of this repository:
# pass a local clone (or bare repository) of it; the copy is written to OUT (default /tmp/refcpu) and patched there.
#   scripts/reference/setup.sh PATH/TO/NoisyDARTS [OUT]
# The patches: its `.cuda()` calls and CUDA tensors become CPU ones, the checkpoint loader maps
# to CPU, a missing matplotlib is tolerated. It also installs Debian's python3-torch and
# python3-torchvision (the reference imports torchvision).
set -euo pipefail
src="${1:?usage: setup.sh PATH/TO/NoisyDARTS-clone [OUT]}"
out="${2:-/tmp/refcpu}"
if [ ! -f "$src/model_search.py" ] && ! git -C "$src" cat-file -e HEAD:model_search.py 2>/dev/null; then
  echo "setup.sh: $src has no model_search.py: pass a clone (or bare repository) of xiaomi-automl/NoisyDARTS" >&2; exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
bash "$here/../install_debs.sh" python3-torch python3-torchvision
rm -rf "$out" && mkdir -p "$out"
if git -C "$src" rev-parse --git-dir >/dev/null 2>&1; then git -C "$src" archive HEAD | tar -x -C "$out"
else cp -r "$src"/. "$out"/; fi
cd "$out"
sed -i 's/device=torch.device("cuda")/device=x.device/; s/noise = torch.normal(means, std, out=None).cuda()/noise = torch.normal(means, std, out=None)/; s/\.cuda()//g' model_search.py
sed -i 's/\.cuda()//g' architect.py
sed -i 's/torch.cuda.FloatTensor(x.size(0), 1, 1, 1)/torch.FloatTensor(x.size(0), 1, 1, 1)/; s/map_location=.cuda:0./map_location="cpu"/' utils.py
/usr/bin/python3 - "$out/utils.py" <<'PY'
import sys
p = sys.argv[1]
s = open(p).read()
s = s.replace("import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt",
              "try:\n\timport matplotlib\n\tmatplotlib.use('Agg')\n\timport matplotlib.pyplot as plt\nexcept Exception:\n\tplt = None")
open(p, "w").write(s)
PY
cp "$here/bench_ref.py" "$out/"
echo "reference copy ready in $out: /usr/bin/python3 $out/bench_ref.py search|train [--in-channels ...]" >&2
