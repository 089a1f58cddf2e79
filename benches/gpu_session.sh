#!/bin/bash
# The checks of a lent GPU session, run from the repository root on the device:
#   OUT=dir bash benches/gpu_session.sh                  # all: everything below in <= 9 minutes
#   OUT=dir bash benches/gpu_session.sh --rerun-failed [FILE]   # <= 4 minutes: what failed
#   OUT=dir bash benches/gpu_session.sh STEP...          # named steps, one after the other
# Steps: install gpu_tests bench (bench_moe, bench_ridge, bench_grouped_linear, bench_quant,
# bench_wire, bench_stager) bench_all tune adopt ridge_diag sanitize (memcheck, racecheck)
# memcheck_pipeline suite (zoo, suite).
# `all` runs install, then two lanes at once until a deadline (BUDGET, default 520 s): the GPU lane
# (gpu_tests, bench_moe, bench_ridge, tune + adopt, memcheck, racecheck, bench_grouped_linear,
# ridge_diag, memcheck_pipeline, bench_quant, bench_wire, bench_stager, in that order of priority) and the CPU lane (zoo, then the whole suite with CUDA visible and the
# Triton kernels interpreted as in CI). Every step runs under `timeout` with its own limit, cut to
# what is left before the deadline; a step with no time left is skipped and counted as failed.
# What comes back (3 files): $OUT/session.log (timeline, rc and tail of every step),
# $OUT/failed.txt (one line per failure: "STEP" or "STEP NODEID" for failed pytest tests) and
# $OUT/results.tar.gz (logs/STEP.log, bench_*.json, the tuned NVIDIA_*.json, tune_ridge.json).
# --rerun-failed reads such a failed.txt (default benches/gpu_failed.txt: copy the last run's
# failed.txt there, it travels with the working tree) and reruns only those tests and steps
# (BUDGET 230 s), installing first when this machine does not have this tree installed.
# Give the device call a wall-clock limit of at least BUDGET + 40 s (e.g. 560 s for `all`, 270 s
# for a rerun), so that the deadline, not the caller, ends the session and the results get packed.
set -u
repo=$(pwd)
res=$OUT/results
logs=$res/logs
log=$OUT/session.log
failed=$OUT/failed.txt
mkdir -p "$logs"
: >"$failed"
t0=$SECONDS
export PYTHONUNBUFFERED=1 FASTDUME_CACHE=/tmp/fdcache HF_HUB_OFFLINE=1
pytest=(python3 -X faulthandler -m pytest -p no:cacheprovider -rfE --tb=short)
bench_opts=(--benchmark-only --benchmark-columns=median,rounds --benchmark-max-time=0.25)

step() {  # step NAME SECONDS COMMAND...: under its limit, cut to the time left before $deadline
    local name=$1 limit=$2 left rc
    shift 2
    left=$((deadline - SECONDS - 15)) # 15 s kept for packing the results
    ((limit > left)) && limit=$left
    if ((limit < 10)); then
        echo "=== $name skipped: no time left" | tee -a "$log"
        echo "$name" >>"$failed"
        return 1
    fi
    echo "=== $name (start at $((SECONDS - t0)) s, limit $limit s)" >>"$log"
    (cd /tmp && timeout -k 5 "$limit" "$@") >"$logs/$name.log" 2>&1
    rc=$?
    { echo "=== $name rc=$rc (end at $((SECONDS - t0)) s)"; tail -n 4 "$logs/$name.log"; } >>"$log"
    echo "=== $name rc=$rc"
    ((rc == 0)) || record "$name" "$rc"
    return "$rc"
}

record() {  # the failed pytest node ids of a step; the step itself if none (or it timed out)
    local name=$1 rc=$2 ids=""
    if ((rc != 124 && rc != 137)); then
        ids=$(grep -oE '(FAILED|ERROR) [^ ]+::[^ ]+' "$logs/$name.log" | cut -d' ' -f2 | sort -u)
    fi
    if [[ -n $ids ]]; then
        sed "s|^|$name |" <<<"$ids" >>"$failed"
    else
        echo "$name" >>"$failed"
    fi
}

tree_hash() { (cd "$repo" && find fastdume kernels csrc setup.py pyproject.toml -type f \
    -not -name '*.so' -not -path '*__pycache__*' | sort | xargs md5sum | md5sum | cut -c1-32); }

tuned_file() { python3 -c 'import torch, fastdume.ops.moe_configs as m
print(m.file_name(torch.cuda.get_device_name()))' 2>/dev/null; }

run() {  # run STEP [NODEID...]: one named step; node ids narrow a pytest step to those tests
    local name=$1
    shift
    local ids=("${@/#/$repo/}")
    case $name in
    install)
        if [[ $(cat /tmp/fastdume_installed 2>/dev/null) == $(tree_hash) ]]; then
            echo "=== install: this tree is installed already" | tee -a "$log"
        else
            step install 200 env MAX_JOBS=16 python3 -m pip install --no-build-isolation \
                --no-deps "$repo" && tree_hash >/tmp/fastdume_installed
        fi ;;
    gpu_tests) step gpu_tests 100 "${pytest[@]}" -q "${ids[@]:-$repo/tests}" -m gpu ;;
    bench_moe | bench_ridge | bench_grouped_linear | bench_quant | bench_wire | bench_stager)
        step "$name" 150 "${pytest[@]}" -q "${ids[@]:-$repo/benches/$name.py}" -m gpu \
            "${bench_opts[@]}" --benchmark-json="$res/$name.json" ;;
    bench)
        for b in bench_moe bench_ridge bench_grouped_linear bench_quant bench_wire bench_stager; do
            run "$b"
        done ;;
    bench_all) step bench_all 300 "${pytest[@]}" -q "${ids[@]:-$repo/benches}" \
        "${bench_opts[@]}" --benchmark-json="$res/bench_all.json" ;;
    tune) # the tuner keeps the shipped file's buckets and replaces the ones it finishes
        local start=() shipped
        shipped="$repo/fastdume/ops/moe_configs/$(tuned_file)"
        [[ -f $shipped ]] && start=(--start "$shipped")
        step tune "${TUNE_LIMIT:-120}" python3 "$repo/benches/tune_moe.py" --out "$res" \
            --budget "$((${TUNE_LIMIT:-120} - 40))" "${start[@]}" ${TUNE_ARGS:---tokens 1 16 128} ;;
    adopt) step adopt 30 python3 -c "import glob, os, shutil, fastdume.ops.moe_configs as m
for f in glob.glob('$res/NVIDIA_*.json'): shutil.copy(f, os.path.dirname(m.__file__)); print(f)" ;;
    ridge_diag) step ridge_diag 60 python3 "$repo/benches/tune_ridge.py" --budget 40 \
        --out "$res/tune_ridge.json" ;;
    memcheck) step memcheck 45 compute-sanitizer --tool memcheck --error-exitcode 9 \
        python3 "$repo/benches/sanitize.py" ;;
    racecheck) step racecheck 60 compute-sanitizer --tool racecheck --error-exitcode 9 \
        python3 "$repo/benches/sanitize.py" ;;
    memcheck_pipeline) step memcheck_pipeline 120 compute-sanitizer --tool memcheck \
        --error-exitcode 9 --target-processes all python3 "$repo/benches/sanitize.py" pipeline ;;
    sanitize) run memcheck && run racecheck ;;
    zoo) step zoo 120 python3 -c "from fastdume.data.zoo import build_zoo; build_zoo('test')" ;;
    suite) # interpreter kernels as in CI (CPU tensors), everything else with CUDA visible
        step suite 480 env TRITON_INTERPRET=1 "${pytest[@]}" -v "${ids[@]:-$repo/tests}" \
            -m "not gpu" -n "${SUITE_WORKERS:-8}" ;;
    *) echo "unknown step $name" | tee -a "$log" ;;
    esac
}

pack() {  # everything but the two summaries in one archive: at most 8 files come back
    tar czf "$OUT/results.tar.gz" -C "$OUT" results && rm -rf "$res"
    echo "=== packed at $((SECONDS - t0)) s; $(wc -l <"$failed") failure line(s)" | tee -a "$log"
}

gpu_lane() {
    run gpu_tests
    run bench_moe
    run bench_ridge
    run tune && run adopt
    run memcheck
    run racecheck
    run bench_grouped_linear
    run ridge_diag
    run memcheck_pipeline
    run bench_quant
    run bench_wire
    run bench_stager
}

cpu_lane() {
    run zoo
    run suite
}

rerun_failed() {  # each step of the list once: its listed node ids, or the whole step
    local file=$1 steps
    steps=$(awk '{print $1}' "$file" | awk '!seen[$0]++')
    for s in $steps; do
        mapfile -t ids < <(awk -v s="$s" '$1 == s && NF > 1 {print $2}' "$file")
        if grep -qxF "$s" "$file"; then ids=(); fi # the whole step failed (or timed out)
        run "$s" "${ids[@]}"
    done
}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c 'import torch, triton, transformers as t; print(torch.__version__, triton.__version__,
t.__version__, torch.cuda.get_device_name())'
} >>"$log" 2>&1
mode=${1:-all}
if [[ $mode == --rerun-failed ]]; then
    deadline=$((t0 + ${BUDGET:-230}))
    list=${2:-$repo/benches/gpu_failed.txt}
    cp "$list" "$logs/rerun_list.txt" 2>/dev/null || echo "no list $list" | tee -a "$log"
    run install
    [[ -s $list ]] && rerun_failed "$list"
elif [[ $mode == all ]]; then
    deadline=$((t0 + ${BUDGET:-520}))
    run install
    cpu_lane &
    gpu_lane
    wait
else
    deadline=$((t0 + ${BUDGET:-100000}))
    for s in "$@"; do run "$s"; done
fi
pack
