#!/usr/bin/env bash
# The GPU checks of "Make every evaluation cheap", in at most ~6 minutes of run time, printing the
# figures (bench.md of each row set) and leaving bench.json files under $OUT (default gpu-check/):
#   1. toy: teacher-forced vs generated evaluation (same verdicts checked), early cut at 2 of 8
#      (same search checked), roofline, rebuild-per-candidate ratio, apply cost;
#   2. random-mixtral-width (Mixtral-8x7B's layer shape, --layers N, default 2, bf16): the same
#      rows plus the export rows, each row freeing the memory of the ones before (no OOM);
#   3. benchmarks/width_check.py on the same model: a decode step with eep's experts kernel kept and
#      with transformers' decode-time swap to batched_mm, and the operators one evaluation runs;
#   4. benchmarks/latency_check.py on the toy: what a latency frontier times (compacted, CUDA
#      synchronised) against the exported checkpoint and the hooked application (~30 s).
#
# Here (with network) fetch the wheels the device machine lacks into .whl/ (git-ignored):
#   bash benchmarks/gpu_check.sh --fetch-wheels
# There (run tool, carry [".whl"]; $OUT takes at most 8 files: this leaves 6 and the log):
#   set -o pipefail; bash benchmarks/gpu_check.sh 2>&1 | tee $OUT/gpu_check.log
# On a CPU, to try the script itself:  bash benchmarks/gpu_check.sh --device cpu --model random-mixtral
# --steps toy,width,kernel,latency picks the parts (default all four); --skip-swap leaves out width_check's
# decode step with transformers' swap (~45 GiB a layer at width: for --layers 8 on one GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=cuda MODEL=random-mixtral-width LAYERS=2 OUT_DIR=${OUT:-gpu-check} STEPS=toy,width,kernel,latency
SWAP=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --layers) LAYERS=$2; shift 2 ;;
    --steps) STEPS=$2; shift 2 ;;
    --skip-swap) SWAP=(--skip-swap); shift ;;
    --fetch-wheels)
      mkdir -p .whl
      for spec in deap==1.4.4 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing-extensions==4.16.0; do
        python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
          --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
          -d .whl "$spec"
      done
      ls -la .whl; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (--device D, --model M, --layers N, --steps S, --skip-swap, --fetch-wheels)" >&2; exit 2 ;;
  esac
done
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] && PY=.venv/bin/python
if ! "$PY" -c "import deap, pydantic" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT_DIR"
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__,
  'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
LAYER_FLAG=()
[ "$MODEL" = random-mixtral-width ] && LAYER_FLAG=(--layers "$LAYERS")
start=$(date +%s)
step() { [[ ",$STEPS," == *",$1,"* ]]; }
if step toy; then
  "$PY" -m eep bench --model toy --device "$DEVICE" --no-ray --no-export --repeats 3 --cut-evaluations 200 \
    --out "$OUT_DIR/toy" 2>&1 | grep -v "Loading weights\|Writing model"
fi
if step width; then
  "$PY" -m eep bench --model "$MODEL" "${LAYER_FLAG[@]}" --device "$DEVICE" --no-ray --repeats 3 --evaluations 10 \
    --cut-evaluations 40 --out "$OUT_DIR/width" 2>&1 | grep -v "Loading weights\|Writing model"
fi
if step kernel; then
  "$PY" benchmarks/width_check.py --model "$MODEL" "${LAYER_FLAG[@]}" "${SWAP[@]}" --device "$DEVICE" \
    --out "$OUT_DIR/kernel" 2>&1 | grep -v "Loading weights\|Writing model"
fi
if step latency; then
  "$PY" benchmarks/latency_check.py --set "model.device=$DEVICE" --rounds 10 2>&1 \
    | grep -v "Loading weights\|Writing model"
fi
echo "gpu_check: done in $(( $(date +%s) - start )) s; figures in $OUT_DIR/{toy,width}/bench.{md,json}, $OUT_DIR/kernel/"
