#!/usr/bin/env bash
# The prepared GPU measurement (issue 13): installs the carried wheels, then runs
# `diffusion-po bench gpu`, whose stages (env, correctness, sdpa, sd15-dpo-full-cold, sd15-dpo-full-warm,
# sd15-dpo-lora, sdxl-dpo-lora) run one process each, in priority order, each under its own time cap,
# each writing $OUT/<stage>.json when it finishes; $OUT/summary.json is rewritten after every stage.
#
# 1. Here (a machine with PyPI), once:      bash scripts/gpu_bench.sh fetch
#    downloads the wheels the device image lacks into .whl/ (~12 MB; ignored by git: .gitignore has .whl/).
# 2. With the device tool:                  run(command="bash scripts/gpu_bench.sh", carry=[".whl"], timeout_s=600)
# 3. Results under $OUT: one <stage>.json per stage and summary.json (8 files: the device tool returns at
#    most 8); the log, with the markdown summary last, is the command's output.
#
# Environment: BUDGET_S (default 480: seconds for all stages, under the device tool's 600 s per command),
# STAGES (comma-separated, default: all of the above), STEPS / WARMUP (timed / untimed steps per
# measurement, default 5 / 2), EXTRA (more arguments, e.g. "--set compile=none" or "--cap sdpa=30"),
# SIZE=tiny (with EXTRA="--device cpu": the dry run of the whole command on a CPU).
# The exit status is 0 only when every stage finished.
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

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "no .whl/ carried: using the installed packages (run 'bash scripts/gpu_bench.sh fetch' here first)"
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error

ARGS=(--out "$OUT" --budget-s "${BUDGET_S:-480}" --size "${SIZE:-full}" --steps "${STEPS:-5}" --warmup "${WARMUP:-2}")
if [ -n "${STAGES:-}" ]; then ARGS+=(--stages "$STAGES"); fi
# shellcheck disable=SC2086
exec python3 -m diffusion_po.cli bench gpu "${ARGS[@]}" ${EXTRA:-}
