#!/usr/bin/env bash
# tinygpt on one CUDA GPU, pruning off and on (bench/efficiency.py's tinygpt sessions, new keep semantics).
#
#   bash bench/cuda_tinygpt.sh OUTDIR [SEEDS=6] [STEPS=600] [RUN_S=240] [DEADLINE_S=420]
#
# Each (seed, arm) session is its own process and they all run at once, sharing the one GPU: on a
# borrowed machine the lease is short, and both arms of a seed see the same sharing. A run trains for
# STEPS optimizer steps (a budget of work, so the sharing slows a run but does not change what it
# learns); a session stops once its runs used RUN_S run-seconds, or gracefully at DEADLINE_S
# wall-clock seconds, its row still written. Writes OUTDIR/gpu.txt (the card), OUTDIR/summary.md
# (bench/efficiency.py summary over every session) and one json + log per session.
set -u
out=${1:?usage: bash bench/cuda_tinygpt.sh OUTDIR [SEEDS] [STEPS] [RUN_S] [DEADLINE_S]}
seeds=${2:-6}; steps=${3:-600}; run_s=${4:-240}; deadline=${5:-420}
py=${PYTHON:-python3}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$py" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA DEVICE")'
    echo "cpus $(nproc); seeds $seeds; steps $steps; run-seconds per session $run_s; deadline ${deadline}s"
} 2>&1 | tee "$out/gpu.txt"
export OMP_NUM_THREADS=1  # each run drives the GPU from one core; 2 x SEEDS of them share the CPUs
for s in $(seq 0 $((seeds - 1))); do
    for arm in off on; do
        "$py" "$here/efficiency.py" labs --labs tinygpt --seeds 1 --seed-start "$s" --semantics measured \
            --arms "$arm" --tinygpt-steps "$steps" --tinygpt-s "$run_s" --deadline-s "$deadline" \
            --out "$out/s$s-$arm.json" >"$out/s$s-$arm.log" 2>&1 &
    done
done
wait
uptime | tee -a "$out/gpu.txt"
"$py" "$here/efficiency.py" summary "$out"/s*-*.json 2>&1 | tee "$out/summary.md"
