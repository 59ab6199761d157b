#!/usr/bin/env bash
# The one prepared command for a session lent a GPU machine: everything #9 asks of a GPU, in < 10 min.
#
#   1. gpu_bench.py: BERT-base from config, seq 128, bf16: samples/s, MFU on real tokens, peak memory for
#      ftdist and the raw loop, ftdist under ZeRO-2 on one GPU, length grouping (budget 270 s).
#   2. throughput.py --model base: ftdist / raw loop / HF Trainer with identical batches on the GPU,
#      where a 35 ms step makes each tool's per-step host work count (budget 200 s).
#
# Here, once: the wheels the GPU machine lacks (it has torch, transformers, accelerate; Python 3.12;
# this set ran ftdist and ZeRO there in the first session) and the model folder it lacks, in .whl/
# (git-ignored; the device tool carries it):
#     pip download --no-deps --python-version 3.12 --only-binary=:all: -d .whl datasets==5.2.0 dill==0.4.1 \
#         multiprocess==0.70.19 pyarrow==26.0.1 evaluate==0.4.6 deepspeed==0.19.8 hjson==3.1.0 pydantic==2.14.4 \
#         pydantic_core==2.50.5 annotated_types==0.8.0 typing_inspection==0.4.5
#     python benchmarks/gpu_bench.py --prepare .whl/gpu_bench_assets
# Then, through the device tool:  run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=590)
# Results land in $OUT (gpu_bench.json, throughput_gpu.json and both logs).
# On a CPU machine `bash benchmarks/gpu_session.sh --smoke` runs the same pipeline with tiny sizes.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d /tmp/gpu-session-XXXX)}
mkdir -p "$OUT"
ASSETS=.whl/gpu_bench_assets
if ! python3 -c "import datasets, evaluate" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; python3 -c \
  "import torch, transformers, accelerate; print(torch.__version__, transformers.__version__, accelerate.__version__)") \
  > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
if [ "${1:-}" = "--smoke" ]; then
  bench=(--smoke --budget-s 300)   # its own tiny model: the carried folder is BERT-base-sized
  thr=(--model tiny --precision no --threads 1 --reps 1 --steps 3 --rows 300)
else
  bench=(--budget-s 270)
  thr=(--model base --precision bf16 --threads 0 --reps 3 --steps 60 --rows 4000)
  [ -d "$ASSETS/model" ] && bench+=(--assets "$ASSETS")
fi
[ -d "$ASSETS/model" ] && thr+=(--model-dir "$ASSETS/model")
timeout 300 python3 benchmarks/gpu_bench.py "${bench[@]}" --out "$OUT/gpu_bench.json" > "$OUT/gpu_bench.log" 2>&1
echo "gpu_bench.py exit $?"; tail -30 "$OUT/gpu_bench.log"
timeout 230 python3 benchmarks/throughput.py --batching identical "${thr[@]}" --json "$OUT/throughput_gpu.json" \
  > "$OUT/throughput_gpu.log" 2>&1
echo "throughput.py exit $?"; tail -14 "$OUT/throughput_gpu.log"
echo "results in $OUT"
