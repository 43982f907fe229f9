#!/usr/bin/env bash
# One call on the GPU machine checks and times everything: the GPU-marked tests, the kernel benchmark,
# the worker benchmark. Logs go to $OUT (or ./.device-out) so they come back whole.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.device-out}
mkdir -p "$out"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)' | tee -a "$out/gpu.txt"
# PARTS picks what runs (default: all, which can take longer than the device tool's 10 minutes a call: split it,
# e.g. PARTS="tests worker" then PARTS="kernels steps"):
#   tests = every kernel test on CUDA and the engine's GPU tests (H200: ~2.6 and ~4.4 minutes; kernel-tests or
#     engine-tests runs one of them); kernels = the kernel benchmark; steps = step breakdown, decode kernels,
#     consumer kernels, the mixed step and the prefill rounds; worker = the worker benchmark.
#   Not in the default: gemms = the base projections at decode sizes, cuBLAS ways and the Triton candidate; silu =
#     SiLU's expand a row a program against its tiles at P = 16, alone and in the step; shrinks = the decode shrink's
#     spread-thin rule in batch-128 decode steps; cold = the decode steps
#     during cold loads; served (needs grpcio and msgpack, see benchmarks/README.md) = a worker serving 64 streams
#     through its gRPC API to 4 client processes (the Batch hand-over's cost first, benchmarks.batch_pipe), the
#     engine process's GIL switch interval A/B/A, then a profile of the engine's step loop while it serves.
parts=" ${PARTS:-tests kernels steps worker} "
if [[ $parts == *" tests "* || $parts == *" kernel-tests "* ]]; then
  python3 -m pytest -q -p no:cacheprovider tests/kernels 2>&1 | tail -n 30 | tee -a "$out/gpu_tests.log"
fi
if [[ $parts == *" tests "* || $parts == *" engine-tests "* ]]; then
  python3 -m pytest -q -m gpu -p no:cacheprovider tests/engine 2>&1 | tail -n 30 | tee -a "$out/gpu_tests.log"
fi
if [[ $parts == *" kernels "* ]]; then
  python3 -m kernels.bench ${KERNEL_BENCH_ARGS:-} 2>&1 | tee "$out/bench_kernels.log" | tail -n 80
fi
if [[ $parts == *" steps "* ]]; then
  # Decode step vs its graph replay alone, and the host phases: GPU- or host-bound, per batch, base and LoRA.
  python3 -m benchmarks.step_breakdown --compare-overlap --compare-shrink --compare-stacked --compare-gate-up 2>&1 | tee "$out/step_breakdown.log" | tail -n 40
  python3 -m benchmarks.decode_kernels 2>&1 | tee "$out/decode_kernels.log" | tail -n 60
  # The elementwise kernels alone, base and with the expand they carry.
  python3 -m benchmarks.consumer_kernels 2>&1 | tee "$out/consumer_kernels.log" | tail -n 8
  # The step a prompt joins: from graph pieces cut at attention and eager, side by side.
  python3 -m benchmarks.profile_step --compare-piecewise 2>&1 | tee "$out/profile_step.log" | tail -n 8
  # Prefill rounds, base against 8 adapters: wall, steps, adapter copies (should be none), kernels by name.
  python3 -m benchmarks.profile_prefill 2>&1 | tee "$out/profile_prefill.log" | tail -n 70
fi
if [[ $parts == *" gemms "* ]]; then
  python3 -m benchmarks.decode_gemms --ways linear,linear-lt,mm-kmajor,triton --workspaces 32768 2>&1 \
    | tee "$out/decode_gemms.log" | tail -n 60
fi
if [[ $parts == *" served "* ]]; then
  # What handing each step's Batch to the server costs the real engine's step loop (written by the loop itself
  # against the replaced sender thread, side by side).
  python3 -m benchmarks.batch_pipe --gpu --adapters 8 2>&1 | tail -n 4 | tee -a "$out/served.log"
  for g in 0.5 0.05 0.5 0.05; do
    python3 -m benchmarks.served_host --gpu --adapters 8 --tokens 512 --engine-process on --gil-switch-interval-ms $g \
      --client-procs 4 \
      2>&1 | grep "^batch" | sed "s/^/gil $g ms: /" | tee -a "$out/served.log"
  done
  python3 -m benchmarks.served_host --gpu --adapters 8 --tokens 512 --engine-process on --client-procs 4 \
    --profile-engine 40 --profile-sort cumtime 2>&1 | tee -a "$out/served.log" | tail -n 60
fi
if [[ $parts == *" silu "* ]]; then
  # SiLU's expand a row a program (from elementwise.SILU_ROW_EXPAND_MIN_SLOTS = 16 slots) against the tiles at
  # P = 16: alone, then in the step (graph replay, two engines).
  S=kernels.elementwise.SILU_ROW_EXPAND_MIN_SLOTS
  python3 -m benchmarks.consumer_kernels --adapters 16 --slots 16 --set "$S=1073741824" 2>&1 | grep -i "op \|silu" \
    | sed "s/^/P = 16: /" | tee -a "$out/silu.log"
  python3 -m benchmarks.step_breakdown --batches 32,64 --adapters 16 --steps 40 --compare-set $S=1073741824 2>&1 \
    | grep -v "^    " | tee -a "$out/silu.log"
fi
if [[ $parts == *" shrinks "* ]]; then
  # The decode shrink's spread-thin rule (kernels.lora_shrink.shrink_config) in batch-128 decode steps (their
  # graphs run the segmented shrink) against the config before it, graph replay, two engines.
  python3 -m benchmarks.step_breakdown --batches 128 --adapters 8,64 --steps 40 \
    --compare-set kernels.lora_shrink.SPREAD_MAX_ROWS=0 2>&1 | grep -v "^    " | tee -a "$out/shrinks.log"
fi
if [[ $parts == *" cold "* ]]; then
  # Decode steps while cold adapters are copied in (COLD_BENCH_ARGS: e.g. --set MODULE.NAME=VALUE, rounds
  # alternating with the defaults on one engine).
  python3 -m benchmarks.worker --cold-only ${COLD_BENCH_ARGS:-} 2>&1 \
    | grep "cold adapters" | tee "$out/cold.log"
fi
if [[ $parts == *" worker "* ]]; then
  python3 -m benchmarks.worker ${WORKER_BENCH_ARGS:-} 2>&1 | tee "$out/bench_worker.log" | tail -n 30
fi
# The cluster bench needs two GPUs and ~8 minutes (over the device tool's budget for one call together with
# the above): BENCH_CLUSTER=1 adds it.
if [ "${BENCH_CLUSTER:-0}" = 1 ]; then
  python3 -m benchmarks.cluster --out "$out" ${CLUSTER_BENCH_ARGS:-} 2>&1 | tee "$out/bench_cluster.log" | tail -n 20
fi
