#!/usr/bin/env bash
# The one-GPU checks in one go (a lent machine's time is short; items 1-2 took ~6 min on an H200):
#   1. bench/grad_spectra.py at d12, n = 512, T = 1024, 5 layers of attn.c_proj (the gradient issue's
#      goal of 20x over the batch-size-1 loop): fp32, TF32 and bf16 passes at batch 8, the head's
#      gradient eager and compiled (grad_spectra_compile), all against one baseline
#   2. bench/spectra_overhead.py on configs/d12_bs512.py with the fastest gradient setting (bf16,
#      compiled head): spectral share of training time, torch.compile on (the trainer's CUDA default)
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
python3 bench/grad_spectra.py --profile d12 --samples 512 --seq_len 1024 --layers '' --max_gb 16 --blocks 0 \
    --repeats 1 --precision fp32,tf32,bf16 --batch_size 8 --compile 0,1 2>&1 | tee "$LOG/grad_spectra_precisions.txt"
python3 bench/spectra_overhead.py configs/d12_bs512.py --steps=40 --grad_spectra_precision=bf16 \
    --grad_spectra_compile=1 '--val_files=data/shakespeare/shakespeare_train_*.bin' 2>&1 | tee "$LOG/spectra_overhead.txt"
# 3. The ladder (configs/stages/) on CUDA: FlexAttention against the explicit masks, outputs and
#    gradients, and the FP8 head; the masks' cost (bench/attention_masks.py); tokens/s and MFU of
#    stages 08, 12, 16 and 17 at d12, each against a bf16 matmul timed in the same run. Not yet run
#    on a GPU: the session that wrote it had none.
python3 -m pytest -q tests/test_ladder.py -k "flex or fp8" 2>&1 | tee "$LOG/ladder_tests.txt"
python3 bench/attention_masks.py --device cuda 2>&1 | tee "$LOG/attention_masks.txt"
for stage in 08_unet 12_block_window 16_fp8_head 17_long_short_windows; do
    python3 bench/train_throughput.py "configs/stages/$stage.py" --steps=30 2>&1 | tail -8 | tee "$LOG/throughput_$stage.txt"
done
