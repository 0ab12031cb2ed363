#!/usr/bin/env bash
# One prepared GPU session (the device tool lends ~15 min): the `-m gpu` tests, the Triton
# kernel benchmark and the bf16 GPU variant of the neural-memory benchmark, each under its own
# time limit so one slow step cannot eat the others' time. Logs go to $OUT (or /tmp/gpu_out).
# Baselines (fla, titans-pytorch) come as wheels in .whl/ when the machine has no index:
#   bash benchmarks/gpu_checks.sh          (device tool: timeout_s 600, carry [".whl"])
# .whl/ (git-ignored; `pip download --no-deps --only-binary=:all: --python-version 3.12`):
#   titans-pytorch==0.5.5 assoc-scan accelerated-scan axial_positional_embedding einx frozendict
#   hyper-connections rotary-embedding-torch tensordict x-transformers torch-einops-utils loguru
#   pyvers flash-linear-attention==0.6.0 fla-core==0.6.0 (2.8 MB in all; torch/triton are there)
# Measured on an H100: the compiled memory MLP test compiles for > 100 s (fp32 IEEE dots), and
# fla's chunk_retention autotunes for minutes on its first call; the limits below allow both.
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
timeout 180 python3 -m pytest -m gpu -q -p no:cacheprovider tests/unit/test_memory_triton_gpu.py \
  tests/unit/test_retention_triton_gpu.py tests/unit/test_attention.py 2>&1 | tee "$out/gpu_tests.log"
timeout 140 python3 benchmarks/memory_vs_titans_pytorch.py --device cuda --dtype bf16 \
  --impls ours,ours-triton,titans-bs64,titans --lengths 2k,8k,32k 2>&1 | tee "$out/memory_gpu.log"
timeout 220 python3 benchmarks/kernels_gpu.py --T 4096,16384 --iters 5 2>&1 \
  | tee "$out/kernels_gpu.log"
