#!/usr/bin/env bash
# bench/gpu.sh: the prepared benchmark for one NVIDIA H100/H200 (about 5 minutes; 8 at most).
#
#   bash bench/gpu.sh            # on the GPU machine, from anywhere; results in $OUT
#   bash bench/gpu.sh --tiny     # the same steps at toy sizes, on any machine (CPU check)
#
# Plans for a machine with no network whose python3 (3.12 or newer, as the package
# requires) already holds jax 0.12+ (CUDA plugin), flax, optax, orbax-checkpoint, pandas,
# scikit-learn, matplotlib, etils, tqdm, absl-py; PYTHON=/path/to/python3.12 picks another.
#
# GPU settings, the ones docs/skypilot.yaml and the GPU overlay use (JAX's GPU performance
# tips), unless already set: XLA_FLAGS gains --xla_gpu_enable_latency_hiding_scheduler=true
# (collectives overlap compute; NVIDIA's JAX image sets it too), and
# XLA_PYTHON_CLIENT_MEM_FRACTION=0.90 lets JAX preallocate 90% of the GPU (default 75%).
# Not applied with --tiny (CPU).
# The two pure-Python dependencies such an image lacks come as wheels vendored in
# bench/wheels/ (or $JAXJOB_WHEELS): ml_collections-1.1.0 (configs) and tensorboardX-2.6.5
# (the trainer's TensorBoard writer); `pip download --no-deps -d bench/wheels
# ml_collections==1.1.0 tensorboardX==2.6.5` refreshes them. The project itself is
# installed with `pip install --no-deps --no-build-isolation -e .` (no build download).
#
# Steps, each under its own timeout so one failure does not stop the rest:
#   1. the device (nvidia-smi), python, jax and its devices;
#   2. python -m bench.gpu: bf16 matmul and streaming ceilings, then GPT-2 small (124M,
#      T=1024, bf16) with the trainer vs a bare loop: tokens/s, MFU, trainer/bare ratio;
#   3. the default job and the mobile_price job end to end (one process each), and a
#      check of their run directories (python -m bench.check_run);
#   4. if time is left, GPT-2 small again at batch 32.
# Writes $OUT/perf.jsonl (every JSON line), $OUT/gpu.log, $OUT/*-summary.json.
# Exit status: the number of failed steps (0 = all ran and every run check passed).

set -uo pipefail
cd "$(dirname "$0")/.."

TINY=0
[[ "${1:-}" == "--tiny" ]] && TINY=1
PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d /tmp/jaxjob-gpu-XXXXXX)}
RUNS=$(mktemp -d /tmp/jaxjob-gpu-runs-XXXXXX)  # run directories are too deep for $OUT
DATA="${JAXJOB_DATA_DIR:-../shared/data}/mobile-price/train.csv"
WHEELS=${JAXJOB_WHEELS:-bench/wheels}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu.log") 2>&1
if [[ $TINY == 0 ]]; then
  if [[ " ${XLA_FLAGS:-} " != *" --xla_gpu_enable_latency_hiding_scheduler="* ]]; then
    export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_enable_latency_hiding_scheduler=true"
  fi
  export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}
fi
failed=0
step() { echo; echo "== [$SECONDS s] $*"; }
fail() { echo "FAILED: $*"; failed=$((failed + 1)); }
# Echo everything (into gpu.log); keep the JSON lines, not the trainer's progress rows.
json_lines() { tee >(grep --line-buffered '^{"bench"' >>"$OUT/perf.jsonl"); }

step "1. device and software"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,power.limit,memory.total,driver_version \
    --format=csv || fail "nvidia-smi"
else
  echo "no nvidia-smi on this machine"
fi
for module in ml_collections tensorboardX; do
  if ! "$PY" -c "import $module" 2>/dev/null; then
    wheel=$(ls "$WHEELS"/*.whl 2>/dev/null | grep -i "/${module}-" | head -1)
    if [[ -n "$wheel" ]]; then
      "$PY" -m pip install --quiet --no-deps --no-index "$wheel" || fail "install $wheel"
    else
      fail "python module $module is missing and no wheel for it is in $WHEELS"
    fi
  fi
done
if [[ "${JAXJOB_SKIP_INSTALL:-$TINY}" == 0 ]]; then
  timeout 120 "$PY" -m pip install --quiet --no-deps --no-index --no-build-isolation -e . \
    || echo "pip install -e . failed; running from the source tree (PYTHONPATH)"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
echo "XLA_FLAGS=${XLA_FLAGS:-} XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-}"
timeout 120 "$PY" -c "
import jax, flax, optax, orbax.checkpoint as ocp, sys
print('python', sys.version.split()[0], 'jax', jax.__version__, 'flax', flax.__version__,
      'optax', optax.__version__, 'orbax', ocp.__version__)
assert sys.version_info >= (3, 12), 'jaxjob needs Python 3.12 or newer'
print('devices', jax.devices())" || fail "jax does not start (or Python is older than 3.12)"

step "2. ceilings and GPT-2 small, trainer vs bare (batch 16)"
if [[ $TINY == 1 ]]; then bench_args=(--tiny --block 0.2); else bench_args=(); fi
timeout 300 "$PY" -m bench.gpu --batch 16 "${bench_args[@]}" | json_lines \
  || fail "bench.gpu batch 16"

step "3. end-to-end jobs on this device"
if [[ $TINY == 1 ]]; then
  e2e=(--config.train.steps=100 --config.train.eval_every=50 --config.train.checkpoint_every=50)
  steps=100 platform=cpu digits_min=0.5 mobile_min=0.5
else
  e2e=() steps=1000 platform=gpu digits_min=0.9 mobile_min=0.95
fi
timeout 150 "$PY" -m trainer --workdir="$RUNS/default" "${e2e[@]}" || fail "default job"
"$PY" -m bench.check_run "$RUNS/default" --platform "$platform" --steps "$steps" \
  --min-accuracy "$digits_min" || fail "default job's run directory"
cp "$RUNS/default/summary.json" "$OUT/default-summary.json" 2>/dev/null
if [[ -f "$DATA" ]]; then
  timeout 150 "$PY" -m trainer --config=trainer/configs/mobile_price.py \
    --config.data.path="$DATA" --workdir="$RUNS/mobile_price" "${e2e[@]}" || fail "mobile_price job"
  "$PY" -m bench.check_run "$RUNS/mobile_price" --platform "$platform" --steps "$steps" \
    --min-accuracy "$mobile_min" || fail "mobile_price job's run directory"
  cp "$RUNS/mobile_price/summary.json" "$OUT/mobile_price-summary.json" 2>/dev/null
else
  fail "no mobile-price data at $DATA (set JAXJOB_DATA_DIR)"
fi

left=$((450 - SECONDS))
if [[ $left -gt 120 ]]; then
  step "4. GPT-2 small at batch 32 (${left} s left)"
  timeout "$left" "$PY" -m bench.gpu --batch 32 --skip-ceilings "${bench_args[@]}" \
    | json_lines || fail "bench.gpu batch 32"
else
  step "4. skipped: GPT-2 small at batch 32 (only ${left} s left)"
fi

step "done: $failed failed step(s); results in $OUT"
rm -rf "$RUNS"
exit "$failed"
