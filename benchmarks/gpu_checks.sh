#!/usr/bin/env bash
# One prepared GPU session (the device tool lends ~15 min): the `-m gpu` tests, the bf16 GPU
# variant of the neural-memory benchmark, the memory kernels' launch-setting sweep and the
# Triton kernel benchmark, each under its own time limit so one slow step cannot eat the
# others' time; about 7 minutes in all. Logs go to $OUT (or /tmp/gpu_out).
# Baselines (fla, titans-pytorch) come as wheels in .whl/ when the machine has no index:
#   bash benchmarks/gpu_checks.sh          (device tool: timeout_s 450, carry [".whl"])
# .whl/ (git-ignored; `pip download --no-deps --only-binary=:all: --python-version 3.12`):
#   titans-pytorch==0.5.5 assoc-scan accelerated-scan axial_positional_embedding einx frozendict
#   hyper-connections rotary-embedding-torch tensordict x-transformers torch-einops-utils loguru
#   pyvers flash-linear-attention==0.6.0 fla-core==0.6.0 (2.8 MB in all; torch/triton are there)
# Measured on an H100: the compiled memory MLP test compiles for > 100 s (fp32 IEEE dots), the
# tile sweep's 7 settings compile in ~2 min on 16 cores, and fla's chunk_retention autotunes
# for minutes on its first call (its column has not finished inside 120 s yet).
set -u
out=${OUT:-/tmp/gpu_out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:${PYTHONPATH:-}"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
# Compiles are CPU-bound (16 cores there) and the fp32 MLP one takes minutes: the tests and the
# launch-setting sweep's compiles run in the background while the GPU runs the benchmarks
# (their GPU work is a few tiny calls; the timed runs below are alone on the GPU otherwise).
timeout 330 python3 -m pytest -m gpu -q -p no:cacheprovider tests/unit/test_memory_triton_gpu.py \
  >"$out/gpu_tests_memory.log" 2>&1 &
timeout 200 python3 -m pytest -m gpu -q -p no:cacheprovider tests/unit/test_retention_triton_gpu.py \
  tests/unit/test_attention.py >"$out/gpu_tests_other.log" 2>&1 &
timeout 200 python3 benchmarks/memory_triton_tiles.py --compile-only --jobs 8 \
  >"$out/tiles_compile.log" 2>&1 &
tiles=$!
timeout 150 python3 benchmarks/memory_vs_titans_pytorch.py --device cuda --dtype bf16 \
  --impls ours,ours-triton,titans-bs64,titans --lengths 2k,8k,32k 2>&1 | tee "$out/memory_gpu.log"
wait $tiles; cat "$out/tiles_compile.log"
timeout 120 python3 benchmarks/memory_triton_tiles.py --lengths 2k,8k,32k --jobs 8 --iters 3 2>&1 \
  | tee "$out/tiles.log"
timeout 120 python3 benchmarks/kernels_gpu.py --T 4096 --iters 5 2>&1 | tee "$out/kernels_gpu.log"
wait
tail -n 30 "$out"/gpu_tests_*.log
