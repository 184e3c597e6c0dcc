#!/usr/bin/env bash
# The GPU checks in one prepared run, sized for a lent GPU machine's 15 minutes (at most 8 minutes of runs): one
# adapted layer's branch eager and compiled against LoRA r = 8 (widths 1,024-4,096, 512 and 4,096 tokens), issue
# 32's tiny Llama step eager and compiled per method, and at 0.5B (random weights, bf16, all-linear) LoRA r = 8
# against S2FT with its sketched calibration (rank 64), eager and compiled. Each benchmark has its own time limit,
# so one that fails or runs long leaves the others' results; the log says which.
#
# Needs torch, transformers, peft and safetensors (the GPU machines' image has them); s2ft is read from src/.
#
#   bash benchmarks/gpu.sh                           # on the GPU machine: into $OUT, else benchmarks/results/cuda
#   GPU_SMOKE=1 bash benchmarks/gpu.sh /tmp/smoke    # on a CPU, tiny sizes: checks that the script runs
#
# Writes gpu.log (every command, its output and exit status) and gpu-results.tar.gz (the benchmarks' tables and
# JSON under runs/); with $OUT as the folder (the device tool brings back 8 files at most) runs/ is removed once
# archived.
set -uo pipefail
out=${1:-${OUT:-benchmarks/results/cuda}}
mkdir -p "$out/runs"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
log="$out/gpu.log"
: >"$log"

if [[ ${GPU_SMOKE:-0} == 1 ]]; then
    device=cpu slow=4 # a CPU compiles several times slower
    layers=(--widths 256 --tokens 64 --n 100 --repeats 2 --budget 1)
    step=(--repeats 2 --methods lora_r8 s2ft_auto)
    scale=(--sizes tiny --seq-len 64 --steps 1 --calibration-batches 1)
else
    device=cuda slow=1
    layers=(--widths 1024 2048 4096 --tokens 512 4096 --n 1000 --repeats 7 --budget 2)
    step=(--repeats 7 --methods lora_r8 fourierft_fft s2ft_auto s2ft_fft)
    scale=(--sizes 0.5b --seq-len 512 --steps 3 --calibration-batches 4)
fi

run() { # NAME SECONDS ARGS...: one benchmark under its own time limit, its output into the log
    local name=$1 limit=$(($2 * slow))
    shift 2
    echo "== $name ($(date -u +%H:%M:%S) UTC, limit ${limit} s): $py $*" | tee -a "$log"
    timeout "$limit" "$py" "$@" >>"$log" 2>&1
    echo "== $name: exit $?" | tee -a "$log"
}

{
    date -u
    git log --oneline -1 2>/dev/null || true
    nvidia-smi 2>/dev/null || true
    "$py" -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
          'transformers', transformers.__version__, 'peft', peft.__version__)"
} >>"$log" 2>&1

run layers 120 benchmarks/bench.py --device "$device" --layers-only --compile "${layers[@]}" \
    --output "$out/runs/bench"
run compile_step 75 benchmarks/compile_step.py --device "$device" "${step[@]}" --output "$out/runs/compile_step"
run llm_scale 285 benchmarks/llm_scale.py --device "$device" "${scale[@]}" --quant none --targets all-linear \
    --methods lora-8 s2ft --s2ft-prior-rank 64 --group-size 0 --compile --output-dir "$out/runs/llm_scale"

tar -czf "$out/gpu-results.tar.gz" -C "$out" runs
if [[ -n ${OUT:-} && $out == "$(cd "$OUT" && pwd)" ]]; then
    rm -rf "$out/runs"
fi
echo "== done: $log, $out/gpu-results.tar.gz" | tee -a "$log"
