#!/usr/bin/env bash
# The one-GPU checks of the spectra issues in one go (a lent machine's time is short):
#   1. bench/grad_spectra.py at d12, n = 512, T = 1024: speedup over the batch-size-1 loop, error, memory;
#      at 5 layers (the issue's setting) fp32, TF32 and bf16 passes at batch 8 and 32, the head's
#      gradient eager and compiled (grad_spectra_compile), against one baseline, with the blocked
#      check; then all 12 layers in fp32
#   2. bench/spectra_overhead.py on configs/d12_bs512.py: spectral share of training time, with
#      torch.compile on (the trainer's CUDA default), so a compiled run with spectra on is exercised too
# Usage: bash bench/gpu_checks.sh [LOG_DIR]     (logs to LOG_DIR, default /tmp/gpu_checks)
# The embedded corpus stands in for FineWeb; its train split serves as the probe set, since the val
# split is shorter than 512 sequences of 1024 tokens.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:-/tmp/gpu_checks}
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOG/device.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$LOG/device.txt"
python3 bench/grad_spectra.py --profile d12 --samples 512 --seq_len 1024 --layers '' --max_gb 16 --blocks 2 \
    --repeats 1 --precision fp32,tf32,bf16 --batch_size 8,32 --compile 0,1 2>&1 | tee "$LOG/grad_spectra_precisions.txt"
python3 bench/grad_spectra.py --profile d12 --samples 512 --seq_len 1024 --max_gb 16 --blocks 0 --repeats 1 \
    2>&1 | tee "$LOG/grad_spectra_all_layers.txt"
python3 bench/spectra_overhead.py configs/d12_bs512.py --steps=40 \
    '--val_files=data/shakespeare/shakespeare_train_*.bin' 2>&1 | tee "$LOG/spectra_overhead.txt"
