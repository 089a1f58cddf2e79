#!/bin/bash
# The checks of a lent GPU session (issue 9/9), run from the repository root on the device:
#   OUT=dir bash benches/gpu_session.sh install gpu_tests bench tune adopt sanitize suite
# Each named step runs under its own time limit and logs to $OUT/session.log, so a step that
# fails or hangs does not cost the others. Bench JSON and tuned configs also land in $OUT.
set -u
repo=$(pwd)
log=$OUT/session.log
t0=$SECONDS
export PYTHONUNBUFFERED=1 FASTDUME_CACHE=/tmp/fdcache HF_HUB_OFFLINE=1

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (start at $((SECONDS - t0)) s)" >>"$log"
    (cd /tmp && timeout "$limit" "$@") >>"$log" 2>&1
    echo "=== $name rc=$? (end at $((SECONDS - t0)) s)" | tee -a "$log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv >>"$log"
python3 -c 'import torch, triton, transformers as t; print(torch.__version__, triton.__version__,
t.__version__, torch.cuda.get_device_name())' >>"$log" 2>&1
pytest=(python3 -m pytest -p no:cacheprovider -q -rfE --tb=short)
for s in "$@"; do
    case $s in
    install) step install 240 env MAX_JOBS=16 python3 -m pip install --no-build-isolation --no-deps "$repo" ;;
    gpu_tests) step gpu_tests 180 python3 -X faulthandler "${pytest[@]:1}" "$repo/tests" -m gpu ;;
    bench) step bench 240 "${pytest[@]}" "$repo/benches" --benchmark-only -m gpu \
        --benchmark-json="$OUT/bench.json" --benchmark-columns=median,rounds ;;
    bench_all) step bench_all 300 "${pytest[@]}" "$repo/benches" --benchmark-only \
        --benchmark-json="$OUT/bench.json" --benchmark-columns=median,rounds ;;
    tune) step tune "${TUNE_LIMIT:-240}" python3 "$repo/benches/tune_moe.py" --out "$OUT" \
        --budget "$((${TUNE_LIMIT:-240} - 60))" ${TUNE_ARGS:-} ;;
    adopt) step adopt 30 python3 -c "import glob, os, shutil, fastdume.ops.moe_configs as m
for f in glob.glob('$OUT/NVIDIA_*.json'): shutil.copy(f, os.path.dirname(m.__file__)); print(f)" ;;
    ridge_diag) step ridge_diag 150 python3 "$repo/benches/tune_ridge.py" ;;
    sanitize)
        step memcheck 90 compute-sanitizer --tool memcheck --error-exitcode 9 \
            python3 "$repo/benches/sanitize.py"
        step racecheck 120 compute-sanitizer --tool racecheck --error-exitcode 9 \
            python3 "$repo/benches/sanitize.py" ;;
    suite)  # interpreter kernels as in CI (CPU tensors), everything else with CUDA visible
        step zoo 120 python3 -c "from fastdume.data.zoo import build_zoo; build_zoo('test')"
        step suite 300 env TRITON_INTERPRET=1 "${pytest[@]}" "$repo/tests" -m "not gpu" -n 8 \
            --maxfail=10 ;;
    *) echo "unknown step $s" | tee -a "$log" ;;
    esac
done
