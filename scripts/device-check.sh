#!/usr/bin/env bash
# One-call check on a machine with an NVIDIA GPU: install, MLX-vs-torch parity on CUDA, and
# `bench step` / `bench peer` (quick sizes) with MLX's CUDA backend against TRL on CUDA.
#
#   bash scripts/device-check.sh                      # GPU machine (installs what it needs)
#   DEVICE_CHECK_CPU=1 bash scripts/device-check.sh   # same stages, tiny, on the CPU, installs nothing
#   bash scripts/device-check.sh --cpu                # the same as DEVICE_CHECK_CPU=1
#
# Writes under $OUT (default ./device-out): device-check.log (everything), <stage>.log, env.json,
# parity.json, bench-step.json, bench-peer.json, stages.tsv and summary.json. Every stage has
# its own timeout and the run goes on after a failed stage; the whole run keeps within
# DEVICE_CHECK_BUDGET seconds (default 470, under 8 minutes): a stage that would start with
# too little time left is recorded as "no-time". Exit status: 0 when every stage passed,
# 1 otherwise; the last lines printed are the summary.
#
# Offline: with a .whl/ folder in the repository root, every pip install runs with
# `--no-index --find-links .whl` (nothing else is reachable there). It must then hold wheels
# for Python 3.12 / manylinux x86_64 of: mlx and mlx-cuda-12 or mlx-cuda-13 (with their
# nvidia-* dependencies), mlx-lm, trl, datasets, accelerate, transformers and their
# dependencies, plus setuptools and wheel (to build this package in editable mode). Example,
# on a connected machine:
#   pip download -d .whl --python-version 3.12 --only-binary=:all: \
#       --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
#       'mlx[cuda12]' mlx-lm trl datasets 'transformers>=4.45' setuptools wheel typer pyyaml
# torch itself is expected to be on the GPU machine already (it is not reinstalled; pip is
# told to keep its version).
#
# Environment: OUT, PYTHON (the interpreter; GPU mode otherwise makes a venv with
# --system-site-packages at DEVICE_CHECK_VENV, default /tmp/aropd-device-venv, so a
# preinstalled torch is reused), DEVICE_CHECK_MLX_EXTRA (cuda12 | cuda13; default from the
# driver's CUDA version in nvidia-smi), DEVICE_CHECK_BUDGET, DEVICE_CHECK_PEER_ARGS (extra
# arguments of `bench peer`), DEVICE_CHECK_WHEELS (the wheel folder, default .whl),
# DEVICE_CHECK_SIZES (quick, the default: smoke sizes; full: `bench step` and `bench peer` at
# their default sizes, peer 5 rounds). MLX's CUDA library finds the nvidia-* libraries by a path
# relative to its own folder, so where torch's nvidia-* packages live in the interpreter's own
# site-packages (the H200 image: /opt/torch/.venv), set PYTHON=python3: a venv would hold mlx
# but not them. Torch on CUDA multiplies fp32 in full precision, MLX in TF32 unless
# MLX_ENABLE_TF32=0; `parity` sets it to 0 unless it is set (docs/PARITY.md).
set -u

cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)

MODE=${DEVICE_CHECK_MODE:-gpu}  # DEVICE_CHECK_MODE: how the driver tells its stage children
[ "${DEVICE_CHECK_CPU:-0}" = "1" ] && MODE=cpu
STAGE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) MODE=cpu ;;
    --stage) STAGE=$2; shift ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "device-check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done

OUT=${OUT:-./device-out}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
LOG=$OUT/device-check.log
VENV=${DEVICE_CHECK_VENV:-/tmp/aropd-device-venv}
DEVICE_CHECK_MODE=$MODE
SIZES=${DEVICE_CHECK_SIZES:-quick}
case $SIZES in quick|full) ;; *) echo "device-check: DEVICE_CHECK_SIZES must be quick or full" >&2; exit 2 ;; esac
export OUT VENV DEVICE_CHECK_MODE SIZES

pick_python() {
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"
  elif [ "$MODE" = gpu ] && [ -x "$VENV/bin/python" ]; then echo "$VENV/bin/python"
  else echo python3
  fi
}

# ------------------------------------------------------------------ stages (run as children)

WHEELS=${DEVICE_CHECK_WHEELS:-$ROOT/.whl}

pip_install() {  # pip install with the offline switches when the wheel folder exists
  local py=$1; shift
  if [ -d "$WHEELS" ]; then
    "$py" -m pip install --disable-pip-version-check --no-index --find-links "$WHEELS" "$@"
  else
    "$py" -m pip install --disable-pip-version-check "$@"
  fi
}

stage_install() {
  set -x
  local base=${PYTHON:-python3} py cuda extra torch_pin
  if [ -z "${PYTHON:-}" ]; then
    "$VENV/bin/python" -m pip --version >/dev/null 2>&1 \
      || "$base" -m venv --system-site-packages "$VENV"
    if "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
      py=$VENV/bin/python
    else  # no usable venv (ensurepip missing): the interpreter itself, PEP 668 marker overridden
      [ -f "$VENV/pyvenv.cfg" ] && rm -rf "$VENV"  # a half-made venv would be picked later
      py=$base
      export PIP_BREAK_SYSTEM_PACKAGES=1
    fi
  else
    py=$base
  fi
  cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -1)
  extra=${DEVICE_CHECK_MLX_EXTRA:-}
  if [ -z "$extra" ]; then
    if [ -n "$cuda" ] && [ "$cuda" -ge 13 ]; then extra=cuda13; else extra=cuda12; fi
  fi
  echo "driver CUDA version: ${cuda:-unknown}; MLX extra: $extra"
  # the installed distribution's version ("2.11.0"), not torch.__version__ ("2.11.0+cu130"):
  # pip finds no distribution for a local-label pin offline
  torch_pin=$("$py" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null)
  # mlx-cpu and mlx-cuda-* both provide mlx/lib (libmlx.so): remove the CPU one first, not after
  if "$py" -m pip show mlx-cpu >/dev/null 2>&1; then
    "$py" -m pip uninstall -y mlx-cpu || return 1
  fi
  pip_install "$py" "mlx[$extra]" || return 1
  pip_install "$py" -e . --no-deps || pip_install "$py" -e . --no-deps --no-build-isolation \
    || return 1
  # this package's dependencies, minus mlx-lm's cpu extra (it would bring mlx-cpu back)
  pip_install "$py" "mlx-lm>=0.32.2" "numpy>=1.24" "huggingface-hub>=0.24" "typer>=0.12" \
    "pyyaml>=6" "safetensors>=0.4" "tokenizers>=0.19" "transformers>=4.45" trl datasets \
    "torch${torch_pin:+==$torch_pin}" || return 1
  "$py" -c 'import mlx.core as mx, torch, trl, aropd_mlx
assert mx.cuda.is_available(), "MLX has no CUDA backend"
assert torch.cuda.is_available(), "torch sees no CUDA device"
print("mlx", mx.__version__, mx.default_device(), "| torch", torch.__version__, "| trl", trl.__version__)'
}

stage_env() {
  "$(pick_python)" -m aropd_mlx.bench.device_check env "$OUT/env.json"
}

torch_device() { if [ "$MODE" = gpu ]; then echo cuda; else echo cpu; fi; }

stage_parity() {
  # a fresh tiny llama built offline; torch on the GPU (CPU mode: CPU), MLX on its device
  "$(pick_python)" -m aropd_mlx.cli.main parity --device "$(torch_device)" \
    --json-out "$OUT/parity.json"
}

quick() { [ "$SIZES" = full ] || echo --quick; }

stage_bench_step() {
  # shellcheck disable=SC2046
  "$(pick_python)" -m aropd_mlx.cli.main bench step $(quick) --device "$(torch_device)" \
    --json "$OUT/bench-step.json"
}

stage_bench_peer() {
  local py rounds steps require
  py=$(pick_python)
  if [ "$MODE" = gpu ]; then rounds=3; steps=2; require=--require-trl; else rounds=2; steps=1; require=""; fi
  [ "$SIZES" = full ] && rounds=5
  if [ "$MODE" = cpu ] && ! "$py" -c 'import trl' >/dev/null 2>&1; then
    echo "trl not installed: our side only" > "$OUT/bench-peer.note"  # CPU mode installs nothing
  fi
  # shellcheck disable=SC2086
  "$py" -m aropd_mlx.cli.main bench peer $(quick) --no-install --device "$(torch_device)" \
    --rounds "$rounds" --steps-per-round "$steps" ${DEVICE_CHECK_PEER_ARGS:-} \
    --json "$OUT/bench-peer.json" || return 1
  "$py" -m aropd_mlx.bench.device_check check-peer "$OUT/bench-peer.json" $require
}

if [ -n "$STAGE" ]; then
  "stage_${STAGE//-/_}"
  exit $?
fi

# ------------------------------------------------------------------ the driver

BUDGET=${DEVICE_CHECK_BUDGET:-470}
START=$SECONDS
: > "$LOG"
: > "$OUT/stages.tsv"

say() { echo "[device-check $(date -u +%H:%M:%S) +$((SECONDS - START))s] $*" | tee -a "$LOG"; }

record() {  # name status rc seconds note
  printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" >> "$OUT/stages.tsv"
}

run_stage() {  # name limit_seconds
  local name=$1 limit=$2 left t0 rc status note=""
  left=$((BUDGET - (SECONDS - START)))
  if [ "$left" -lt 30 ]; then
    say "== $name: not started, ${left}s left of the ${BUDGET}s budget"
    record "$name" no-time "-" 0 "budget spent"
    return
  fi
  [ "$limit" -gt $((left - 10)) ] && limit=$((left - 10))
  say "== $name (limit ${limit}s)"
  t0=$SECONDS
  rm -f "$OUT/$name.note"
  timeout -k 10 "$limit" bash "$0" --stage "$name" > "$OUT/$name.log" 2>&1
  rc=$?
  cat "$OUT/$name.log" >> "$LOG"
  case $rc in
    0) status=ok ;;
    124|137) status=timeout; note="killed after ${limit}s" ;;
    *) status=failed ;;
  esac
  [ -f "$OUT/$name.note" ] && note=$(head -n 1 "$OUT/$name.note")
  if [ "$status" != ok ]; then
    [ -z "$note" ] && note=$(grep -v '^+' "$OUT/$name.log" | tail -n 1 | tr '\t' ' ' | cut -c1-120)
    echo "---- last lines of $OUT/$name.log:"
    tail -n 15 "$OUT/$name.log"
  fi
  say "== $name: $status (exit $rc, $((SECONDS - t0))s)"
  record "$name" "$status" "$rc" "$((SECONDS - t0))" "$note"
}

say "mode $MODE, sizes $SIZES, output in $OUT, budget ${BUDGET}s, repository $ROOT"
if [ "$MODE" = gpu ]; then
  command -v nvidia-smi >/dev/null && nvidia-smi 2>&1 | head -n 15 | tee -a "$LOG"
  run_stage install 200
else
  say "== install: skipped (CPU mode installs nothing; using $(pick_python))"
  record install skipped - 0 "cpu mode"
fi
run_stage env 60
run_stage parity 120
if [ "$SIZES" = full ]; then run_stage bench-step 150; else run_stage bench-step 120; fi
run_stage bench-peer 300
"$(pick_python)" -m aropd_mlx.bench.device_check summary "$OUT" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
if awk -F'\t' '$2 != "ok" && $2 != "skipped" { bad = 1 } END { exit !bad }' "$OUT/stages.tsv"; then
  rc=1  # a stage failed, whatever the summary managed to say
fi
exit "$rc"
