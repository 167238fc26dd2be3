#!/usr/bin/env bash
# Every GPU check and timing of issue 24 in one device call (not a test; never in CI).
#
# Here, once:   pip download diffusers==0.42.1 --no-deps -d .whl   (the GPU machine has torch,
#               transformers and safetensors, not diffusers, and cannot fetch anything)
# Then:         device run, command "bash benchmarks/gpu.sh", carry [".whl"], timeout_s 580
#
# Writes under $OUT: gpu_checks.md (half precision against float32, host syncs), run.py's
# results for the CUDA float16 timings against diffusers at 512 px, and log (all output).
# Not in it yet: SDXL at 1024 px on the GPU (benchmarks/sdxl_unet.py runs on the CPU only).
set -uo pipefail
export PYTHONUNBUFFERED=1
PYTHONPATH="$(printf '%s:' "$PWD"/packages/*/src)"
export PYTHONPATH
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT/results"
exec > >(tee "$OUT/log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m pip install --no-deps --no-index -q .whl/*.whl || echo "no diffusers wheel: timings against diffusers will fail"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
timeout 150 python3 benchmarks/gpu_checks.py --device cuda --out "$OUT/gpu_checks.md"
timeout 330 python3 benchmarks/run.py --device cuda --dtype float16 --only unet vae_decode clip txt2img \
    --rounds 5 --threads 8 --out "$OUT/results"
echo done
