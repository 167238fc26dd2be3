#!/usr/bin/env bash
# Every GPU check and timing of issue 24, in device calls of under 10 minutes (not a test; never
# in CI). Nothing here has run on a GPU yet.
#
# Here, once:  pip download diffusers==0.42.1 --no-deps -d .whl   (the GPU machine has torch,
#              transformers and safetensors but not diffusers, and cannot fetch anything)
# Then two device runs, each carrying [".whl"] with timeout_s 580:
#              bash benchmarks/gpu.sh checks sdxl      half precision, host syncs; SDXL UNet 1024 px
#              bash benchmarks/gpu.sh timings          run.py: UNet, VAE, CLIP, txt2img at 512 px
#
# Writes under $OUT: gpu_checks.md, sdxl.log, results/ (run.py's tables) and log (all output).
set -uo pipefail
export PYTHONUNBUFFERED=1
PYTHONPATH="$(printf '%s:' "$PWD"/packages/*/src)"
export PYTHONPATH
OUT="${OUT:-/tmp/gpu-out}"
mkdir -p "$OUT/results"
exec > >(tee -a "$OUT/log") 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m pip install --no-deps --no-index -q .whl/*.whl || echo "no diffusers wheel in .whl/"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(checks sdxl timings)
for part in "${parts[@]}"; do
    case "$part" in
    checks) timeout 170 python3 benchmarks/gpu_checks.py --device cuda --out "$OUT/gpu_checks.md" ;;
    sdxl) timeout 300 python3 benchmarks/sdxl_unet.py --device cuda --dtype float16 --rounds 10 \
        --threads 8 | tee "$OUT/sdxl.log" ;;
    timings) timeout 540 python3 benchmarks/run.py --device cuda --dtype float16 \
        --only unet vae_decode clip txt2img --rounds 5 --threads 8 --out "$OUT/results" ;;
    *) echo "unknown part $part (checks, sdxl, timings)" ;;
    esac
done
echo done
