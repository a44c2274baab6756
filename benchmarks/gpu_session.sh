#!/usr/bin/env bash
# The one script a GPU session runs, from the project root (a bare GPU machine: ../shared/gpu/README.md).
#
#   On a machine with PyPI, once:  bash benchmarks/gpu_session.sh prepare   # .whl/: wheels.sh's + soxr (~25 MB)
#   On the GPU machine:            bash benchmarks/gpu_session.sh          # ~9 min; carry .whl/ with the checkout
#   Only some parts:               bash benchmarks/gpu_session.sh bench cards
#
# Parts, in order of value, each under its own `timeout` within BUDGET seconds for the whole (default 570,
# under the 600 s a device command may run); a part that would get under MIN_PART (30) s is skipped:
#   check  the packages import, and which versions (seconds)
#   bench  benchmarks/gpu.py profile=true: xlsr_300m and xlsr_1b, bf16, with the HF Trainer (~5 min on an H200)
#   tests  pytest -m gpu on the two files that hold GPU tests (others import packages the image lacks);
#          the cards test deselected: the next part runs the same command
#   cards  python -m asr.tools.memory cards=true: each model card's batch, its peak memory
#   extra  what is left of the budget: 300m with model.compile=encoder, then with model.expandable_segments=true
# Logs: one per part in $OUT (default: a new temporary folder); the summary is printed last.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
BUDGET=${BUDGET:-570}
MIN_PART=${MIN_PART:-30}
PEAK_TFLOPS=${PEAK_TFLOPS:-790}  # the H200's bf16 dense matrix rate as measured (Lightning's table lacks the H200)
mkdir -p "$OUT"

if [ "${1:-}" = prepare ]; then  # on a machine with PyPI
  wheels=${WHEELS_SH:-../shared/gpu/wheels.sh}; [ -f "$wheels" ] || wheels=shared/gpu/wheels.sh
  bash "$wheels" || exit 1
  pin=$(grep -i "^soxr==" requirements.txt | cut -d' ' -f1)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${pin:-soxr}" 2>&1 | grep -v "^WARNING" || true
  ls .whl | grep -q "^soxr-" || { echo "soxr's wheel did not download"; exit 1; }
  du -sh .whl; exit 0
fi

PARTS=${*:-check bench tests cards extra}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then  # as ../shared/gpu/wheels.sh's header says
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl > "$OUT/install.log" 2>&1 \
    || { echo "installing .whl/ failed: $OUT/install.log"; tail -5 "$OUT/install.log"; }
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 ASR_CACHE_DIR=${ASR_CACHE_DIR:-/tmp/asr-cache}

summary=()
part() {  # part NAME LIMIT_SECONDS COMMAND...: the command under timeout, its log in $OUT/NAME.log
  local name=$1 limit=$2; shift 2
  local left=$((BUDGET - SECONDS))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -lt "$MIN_PART" ]; then summary+=("$(printf '%-8s skipped (%d s of the budget left)' "$name" "$left")"); return; fi
  local start=$SECONDS
  echo "== $name (up to ${limit} s): $*"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local verdict=ok; [ $rc -ne 0 ] && verdict="FAILED rc=$rc"; [ $rc -eq 124 ] && verdict="TIMED OUT after ${limit} s"
  summary+=("$(printf '%-8s %-24s %4d s  %s' "$name" "$verdict" $((SECONDS - start)) "$OUT/$name.log")")
}

for p in $PARTS; do
  case $p in
    check) part check 60 "$PYTHON" -c "
import hydra, omegaconf, soundfile, soxr, torch, transformers, lightning
import asr.core.audio, asr.run.training
print('torch', torch.__version__, '| transformers', transformers.__version__, '| lightning', lightning.__version__,
      '| cuda', torch.cuda.is_available() and torch.cuda.get_device_name())
try:
    import datasets; print('datasets', datasets.__version__, '(the HF side)')
except ImportError:
    print('no datasets: the HF Trainer side cannot run')" ;;
    bench) part bench 320 "$PYTHON" benchmarks/gpu.py 'models=[xlsr_300m,xlsr_1b]' precisions=bf16 hf=true \
             profile=true peak_tflops="$PEAK_TFLOPS" ;;
    tests) part tests 200 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py tests/test_ctc.py \
             --deselect tests/test_gpu.py::test_the_cards_memory_table_runs_on_the_gpu ;;
    cards) part cards 90 "$PYTHON" -m asr.tools.memory cards=true ;;
    extra) part compile 90 "$PYTHON" benchmarks/gpu.py models=xlsr_300m compile=encoder quick=true profile=true \
             peak_tflops="$PEAK_TFLOPS"
           part segments 60 "$PYTHON" benchmarks/gpu.py models=xlsr_300m quick=true peak_tflops="$PEAK_TFLOPS" \
             model.expandable_segments=true ;;
    *) echo "no part $p (check bench tests cards extra)"; exit 2 ;;
  esac
done

echo; echo "==================== summary ($SECONDS s; logs in $OUT) ===================="
printf '%s\n' "${summary[@]}"
[ -f "$OUT/check.log" ] && { echo; tail -3 "$OUT/check.log"; }
for log in bench compile segments; do  # the table and, with profile=true, the details after it
  [ -f "$OUT/$log.log" ] && { echo; echo "-- $log"; sed -n '/^random weights/,$p' "$OUT/$log.log" | grep -v "Warning\|warn(" | head -80; }
done
[ -f "$OUT/tests.log" ] && { echo; echo "-- pytest -m gpu"; grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/tests.log" | tail -12; }
[ -f "$OUT/cards.log" ] && { echo; echo "-- cards"; sed -n '/^the cards/,$p' "$OUT/cards.log"; }
exit 0
