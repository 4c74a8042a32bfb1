"""
Training throughput of a config, as ratios against baselines measured in the same run.

    python bench/train_throughput.py configs/d12_bs512.py [--steps=300] [--key=value ...]

Runs the real trainer (train_gpt.train) for --steps optimizer steps with W&B, checkpoints and
evaluation off, takes the median tokens/s of the log intervals after the first
quarter (compilation and warm-up), and prints

  tokens/s                         the trainer's own measurement
  model FLOP/s                     tokens/s x GPT.flops_per_token()
  MFU                              model FLOP/s / the device's dense bf16 peak (datasheet; CUDA only)
  vs measured matmul               model FLOP/s / a large bf16 (CUDA) or fp32 (CPU) matmul's FLOP/s,
                                   timed here: the fraction of what this device really sustains

If the config's FineWeb shards are absent, the embedded corpus stands in (throughput does not
depend on which tokens are read).
"""

import glob
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_gpt  # noqa: E402
from model import GPT  # noqa: E402

# Dense bf16 tensor-core peaks (FLOP/s) from vendor datasheets, without sparsity.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
             "4090": 165e12, "A10G": 70e12}


def datasheet_peak(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def measured_matmul_flops(device, n=8192, reps=10):
    """FLOP/s of an n x n x n matmul in the training precision (bf16 on CUDA, fp32 on CPU)."""
    if device.type != "cuda":
        n, reps = 1024, 5
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def bench_config(argv, steps):
    """(config, --steps) from CONFIG.py [--steps=N] [--key=value ...]; the embedded corpus stands in
    for absent shards (speed does not depend on which tokens are read)."""
    if {"-h", "--help"} & set(argv):
        print(sys.modules["__main__"].__doc__)
        sys.exit(0)
    args = []
    for a in argv:
        if a.startswith("--steps="):
            steps = int(a.split("=", 1)[1])
        else:
            args.append(a)
    try:
        cfg = train_gpt.load_config(args)
    except train_gpt.ConfigError as e:
        sys.exit(f"error: {e}")
    for key in ("train_files", "val_files"):  # each missing pattern on its own, so --val_files=... can point elsewhere
        if not glob.glob(getattr(cfg, key)):
            stand_in = f"data/shakespeare/shakespeare_{key.split('_')[0]}_*.bin"
            print(f"note: {getattr(cfg, key)} not found; reading the embedded corpus ({stand_in}) instead")
            setattr(cfg, key, stand_in)
    return cfg, steps


def main(argv):
    cfg, steps = bench_config(argv, steps=300)
    cfg.max_steps, cfg.train_tokens = steps, 0
    cfg.log_every = max(1, steps // 20)
    cfg.eval_every_tokens, cfg.ckpt_every_tokens = -1, -1
    cfg.val_tokens = cfg.seq_len  # never evaluated; keeps the loader's val slice small
    cfg.wandb_mode, cfg.run_name = "disabled", "bench"
    with tempfile.TemporaryDirectory() as tmp:
        cfg.out_dir = tmp
        run_dir = train_gpt.train(cfg)
        rank = int(os.environ.get("RANK", "0"))
        if rank != 0:
            return
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    tps = statistics.median(rates[len(rates) // 4:])
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    with torch.device("meta"):
        flops_per_token = GPT(train_gpt.model_config(cfg)).flops_per_token()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model_flops = tps * flops_per_token / world  # per device
    matmul = measured_matmul_flops(device)
    peak = datasheet_peak(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\n== {cfg.config_file} on {world} x {name}: {steps} steps, batch {cfg.batch_size} x {cfg.seq_len}, "
          f"device batch {cfg.device_batch_size}, compile={cfg.compile}")
    print(f"tokens/s (all devices)       {tps:,.0f}")
    print(f"model FLOP/s per device      {model_flops / 1e12:.1f} TFLOP/s  ({flops_per_token / 1e6:.0f} MFLOP/token)")
    print(f"measured matmul FLOP/s       {matmul / 1e12:.1f} TFLOP/s")
    print(f"ratio vs measured matmul     {model_flops / matmul:.3f}")
    print("MFU (vs datasheet bf16 peak) " + (f"{model_flops / peak:.3f}  (peak {peak / 1e12:.0f} TFLOP/s)"
                                              if peak else "n/a (no datasheet peak for this device)"))
    if device.type == "cuda":
        print(f"peak GPU memory allocated    {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main(sys.argv[1:])
