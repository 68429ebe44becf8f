#!/usr/bin/env bash
# The one short GPU run of issue #13 (3) on a lent device machine, which has torch but neither diffusers nor torchao
# and no network: install the wheels carried in .whl/ offline, then run the quick bench. Every figure lands in
# $OUT/gpu_figures.jsonl the moment it is measured, so a time-out keeps what was measured.
#
#   device run:  command "bash bench/device_run.sh", carry [".whl"], timeout_s 420
#   (prepare .whl/ first: bench/RESULTS.md, "Running the GPU benchmark")
#
# BENCH_TIMEOUT_S (default 340) stops the bench itself before the device call's own limit, so the log and
# nvidia-smi's reading still come back; extra arguments go to bench/gpu_klein.py. Back in $OUT: gpu_figures.jsonl,
# gpu_report.json, RESULTS.md and gpu_results.json with the run merged in (these three only if it ran to its end),
# gpu_bench.log, nvidia-smi.txt, pip.txt.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/out/gpu-bench}"
mkdir -p "$OUT"
shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    echo "no wheels in .whl/: prepare them as bench/RESULTS.md says and pass carry [\".whl\"]" >&2
    exit 2
fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" || exit 3
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv > "$OUT/nvidia-smi.txt" 2>&1
python3 -m pip list 2>/dev/null | grep -iE '^(torch|diffusers|peft|torchao|transformers|accelerate|safetensors) ' > "$OUT/pip.txt"
# The measured table is merged into copies in $OUT (the working tree stays as it came): copy them back into bench/.
cp bench/RESULTS.md "$OUT/" && { [ ! -f bench/gpu_results.json ] || cp bench/gpu_results.json "$OUT/"; }
timeout "${BENCH_TIMEOUT_S:-340}" python3 bench/gpu_klein.py --quick --out "$OUT" --write-results --results-md "$OUT/RESULTS.md" "$@" \
    2>&1 | tee "$OUT/gpu_bench.log"
status=$?
echo "gpu_klein.py exit status $status; figures: $(wc -l < "$OUT/gpu_figures.jsonl" 2>/dev/null || echo 0) lines in $OUT/gpu_figures.jsonl"
exit "$status"
