"""
Time spent in spectral evaluation as a fraction of training time, at a config's own cadence.

    python bench/spectra_overhead.py configs/cpu_demo.py [--steps=40] [--key=value ...]
    python bench/spectra_overhead.py configs/d12_bs512.py --steps=60      # one GPU

Runs the real trainer for --steps optimizer steps with a spectral evaluation every --steps/4
steps, and times, inside that run, (a) training throughput (the trainer's own tokens/s, which
excludes evaluations) and (b) every spectral evaluation: the measurement (one forward pass,
covariances, eigenvalues) plus its logging (fits, npz, plots, table). Then, for the config's full
budget and cadence (eval_every_tokens, spectra_every), it prints

    spectral share = n_spectral_evals x median spectral eval time / (total tokens / tokens per s)

Both times come from the same run on the same device, so the figure is a ratio, not a timing.
Goals (issue 3): <= 10% for cpu_demo on CPU, <= 2% for d12 on one GPU.
"""

import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import spectra  # noqa: E402
import train_gpt  # noqa: E402
from train_throughput import bench_config  # noqa: E402


def spectral_evals_at_cadence(cfg, n_steps, tokens_per_step):
    """How many evaluations of a full run measure spectra, by the trainer's own rule."""
    if cfg.eval_every_tokens < 0:
        return 0
    evals = [0] + [s for s in range(1, n_steps + 1) if s == n_steps or
                   train_gpt.crossed_multiple(cfg.eval_every_tokens, s * tokens_per_step, tokens_per_step)]
    return sum(train_gpt.spectral_eval(cfg, s, n_steps, tokens_per_step) for s in evals)


def timed(fn, times, device):
    """fn wrapped to append its wall time (after the device has finished earlier work) to `times`."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def wrapper(*args, **kwargs):
        sync()
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        sync()
        times.append(time.perf_counter() - t0)
        return out
    return wrapper


def main(argv):
    cfg, steps = bench_config(argv, steps=40)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tokens_per_step = cfg.batch_size * cfg.seq_len
    full_steps = train_gpt.total_steps(cfg)
    n_spectral = spectral_evals_at_cadence(cfg, full_steps, tokens_per_step)

    # the measured run: same model, batch and spectral settings; evaluations every steps/4 steps
    cfg.max_steps, cfg.train_tokens = steps, 0
    cfg.log_every = max(1, steps // 8)
    cfg.eval_every_tokens, cfg.spectra_every = max(1, steps // 4) * tokens_per_step, 1
    cfg.ckpt_every_tokens, cfg.wandb_mode, cfg.run_name = -1, "disabled", "bench"
    cfg.val_tokens = cfg.seq_len * cfg.device_batch_size if cfg.device_batch_size else cfg.seq_len
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    measure, write = [], []
    spectra.measure_activations = timed(spectra.measure_activations, measure, device)
    train_gpt.log_spectra = timed(train_gpt.log_spectra, write, device)
    with tempfile.TemporaryDirectory() as tmp:
        cfg.out_dir = tmp
        run_dir = train_gpt.train(cfg)
        if int(os.environ.get("RANK", "0")) != 0:
            return
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
    rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
    tps = statistics.median(rates[len(rates) // 4:])
    per_eval = [m + w for m, w in zip(measure, write)]
    t_eval = statistics.median(per_eval[1:] if len(per_eval) > 2 else per_eval)
    train_s = full_steps * tokens_per_step / tps
    share = n_spectral * t_eval / train_s
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    n_points = len(spectra.select_points(train_gpt.model_config(cfg).n_layer, cfg.spectra_points,
                                         cfg.spectra_sublayers))
    print(f"\n== {cfg.config_file} on {world} x {name}: {n_points} probe points, "
          f"{cfg.spectra_tokens:,} probe tokens, eval_every_tokens={cfg.eval_every_tokens:,} in the bench run")
    print(f"training tokens/s                  {tps:,.0f}  (median of {len(rates)} log intervals)")
    print(f"spectral evaluation                {t_eval:.3f} s median of {len(per_eval)} "
          f"(measure {statistics.median(measure):.3f} s + fits/files/plots {statistics.median(write):.3f} s; "
          f"first {per_eval[0]:.3f} s)")
    print(f"full run at the config's cadence   {full_steps} steps, {train_s:,.0f} s of training, "
          f"{n_spectral} spectral evaluations")
    print(f"spectral share of training time    {share:.4f}  ({100 * share:.2f}%)")


if __name__ == "__main__":
    main(sys.argv[1:])
