#!/usr/bin/env bash
# The GPU measurement of issue 7 (performance): `diffusion-po bench --size full` for every case, on one
# H100/H200, in about 6-9 minutes, with a short GPU correctness check first.
#
# 1. Here (a machine with PyPI), once:      bash scripts/gpu_bench.sh fetch
#    downloads the wheels the device image lacks into .whl/ (~12 MB; ignored by git: .gitignore has .whl/).
# 2. With the device tool:                  run(command="bash scripts/gpu_bench.sh", carry=[".whl"], timeout_s=600)
# 3. Results under $OUT: bench-full.json (every case, merged), bench.log (the tables), gpu_tests.log, gpu.txt.
#
# Environment: BUDGET_S (default 570: seconds for the whole script, under the device tool's 600 s per
# command; a group that would start with under 40 s left is skipped), CASES (space-separated groups, each
# one process, cases within a group comma-separated; default: all, most important first), STEPS / WARMUP
# (timed / untimed steps per measurement, default 5 / 2), SKIP_TESTS=1 (no correctness check), EXTRA
# (e.g. "--set compile=none"), SIZE=tiny (to try the script itself on a CPU).
set -uo pipefail
cd "$(dirname "$0")/.."

# not in the device image (diffusers, open_clip_torch for the CLIP vocabulary, ftfy, wcwidth), or pinned to
# the versions the tests ran with (peft, timm: open_clip needs timm >= 1.0.17)
WHEELS=(diffusers==0.42.1 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 peft==0.21.2 timm==1.0.31)

if [ "${1:-}" = "fetch" ]; then
  mkdir -p .whl
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${WHEELS[@]}"
  ls -la .whl
  exit 0
fi

OUT=${OUT:-$PWD/bench-out}
mkdir -p "$OUT"
WORK=$(mktemp -d)
START=$SECONDS
BUDGET_S=${BUDGET_S:-570}
STEPS=${STEPS:-5}
WARMUP=${WARMUP:-2}
CASES=${CASES:-"sd15-dpo-full,sd15-dpo-lora sd15-sampling sdxl-dpo-full,sdxl-dpo-lora sd15-dro,sd3-dpo-lora"}
EXTRA=${EXTRA:-}
SIZE=${SIZE:-full}

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "no .whl/ carried: using the image's packages (run 'bash scripts/gpu_bench.sh fetch' here first)"
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}  # shared by all cases of the run

{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
  python3 -c "import torch, diffusers, transformers, peft, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| diffusers', diffusers.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__, '| accelerate', accelerate.__version__)"
} 2>&1 | tee "$OUT/gpu.txt"

# 0. correctness on the GPU: compiled (inductor) blocks, channels-last and the inference-mode reference keep
#    the loss and gradients of the plain path; the device prefetcher moves batches (tiny models, ~1 min)
if [ "${SKIP_TESTS:-0}" != "1" ]; then
  timeout -k 10 120 python3 -m pytest -q -x -p no:cacheprovider tests/test_fast.py \
    -k "inductor or prefetcher or channels_last or frozen_weights" 2>&1 | tail -n 40 > "$OUT/gpu_tests.log"
  tail -n 3 "$OUT/gpu_tests.log"
fi

# 1. the benchmark, one process per group of cases (a crash or a CUDA error stays in its group; the JSON
#    is rewritten after every case, so a group cut short keeps its finished cases), most important first
for group in $CASES; do
  left=$((BUDGET_S - 15 - (SECONDS - START)))
  if [ "$left" -lt 40 ]; then
    echo "[$group] skipped: ${left}s left of BUDGET_S=$BUDGET_S" | tee -a "$OUT/bench.log"
    continue
  fi
  # shellcheck disable=SC2086
  timeout -k 10 "$left" python3 -m diffusion_po.cli bench --size "$SIZE" --cases "$group" --steps "$STEPS" \
    --warmup "$WARMUP" --json "$WORK/${group//,/+}.json" $EXTRA 2>&1 | grep -v -E "it/s\]|Loading" | tee -a "$OUT/bench.log"
  echo "[$group] exit ${PIPESTATUS[0]} after $((SECONDS - START))s" | tee -a "$OUT/bench.log"
done

# 2. one JSON with every case, and the table again at the end of the output
python3 - "$WORK" "$OUT/bench-full.json" <<'EOF'
import json, sys
from pathlib import Path
from diffusion_po.bench.runner import CASES, format_case
work, dest = Path(sys.argv[1]), Path(sys.argv[2])
merged = None
for f in sorted(work.glob("*.json")):
    r = json.loads(f.read_text())
    if merged is None:
        merged = {k: v for k, v in r.items() if k != "cases"} | {"cases": {}}
    merged["cases"].update(r["cases"])
if merged is None:
    print("no results")
    sys.exit(1)
merged["cases"] = {k: merged["cases"][k] for k in sorted(merged["cases"], key=list(CASES).index)}
dest.write_text(json.dumps(merged, indent=1))
env = merged["environment"]
print(f"\n== {env['device']} | torch {env['torch']} | diffusers {env['diffusers']} | "
      f"bf16 matmul {merged['matmul_peak']['tflops']:.0f} TFLOP/s ==")
for name, r in merged["cases"].items():
    print(format_case(name, r))
EOF
echo "total $((SECONDS - START))s; results in $OUT"
